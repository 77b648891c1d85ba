//! `new-key` and `hash-key`: caller keys and the `key_sha256` the filter
//! compares them with (SHA-256 of the key's bytes, 64 lowercase hex digits).

use std::io::Read;

use sha2::{Digest, Sha256};

use super::{usage, OK, REFUSED};

/// Random bytes in a new key: 256 bits, far beyond guessing, which matters
/// because `key_sha256` is an unsalted hash.
const KEY_BYTES: usize = 32;
const KEY_PREFIX: &str = "sk-";
/// Longest key `hash-key` reads: longer input is not a key.
const MAX_KEY_LEN: usize = 4096;

pub fn key_sha256(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Base64url without padding (RFC 4648 section 5): no `+`, `/` or `=`, so
/// the key needs no quoting in headers, URLs or shells.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        let symbols = chunk.len() + 1;
        for i in 0..symbols {
            let index = (n >> (18 - 6 * i)) & 0x3f;
            if let Some(&c) = ALPHABET.get(index as usize) {
                out.push(char::from(c));
            }
        }
    }
    out
}

pub fn new_key() -> Result<String, String> {
    let mut random = [0u8; KEY_BYTES];
    getrandom::fill(&mut random)
        .map_err(|e| format!("the operating system gave no random bytes: {e}"))?;
    Ok(format!("{KEY_PREFIX}{}", base64url(&random)))
}

/// Why `key` can never authenticate, if so: the filter trims whitespace
/// around the key a caller presents, so a key with surrounding whitespace
/// (or none at all) would never match its own hash.
pub fn unusable(key: &str) -> Option<&'static str> {
    if key.is_empty() {
        return Some("the key is empty");
    }
    if key.trim() != key {
        return Some(
            "the key has leading or trailing whitespace; the filter trims what callers \
             send, so this hash would never match",
        );
    }
    if key.chars().any(char::is_control) {
        return Some("the key contains control characters, which an HTTP header cannot carry");
    }
    None
}

pub fn new_key_main(args: &[String]) -> i32 {
    let mut name = None;
    let mut models = None;
    let mut json = false;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--name" => match args.next() {
                Some(value) => name = Some(value.clone()),
                None => return usage("--name needs a value"),
            },
            "--models" => match args.next() {
                Some(value) => models = Some(value.clone()),
                None => return usage("--models needs a value (aliases separated by commas, or *)"),
            },
            "--json" => json = true,
            other => return usage(&format!("new-key: unexpected argument `{other}`")),
        }
    }
    let key = match new_key() {
        Ok(key) => key,
        Err(message) => {
            eprintln!("azure-openai-filter: {message}");
            return REFUSED;
        }
    };
    let hash = key_sha256(&key);
    let name = name.unwrap_or_else(|| format!("caller-{}", hash.get(..8).unwrap_or("")));
    if name.trim().is_empty() || name.chars().any(char::is_control) {
        return usage("--name must be non-empty, without control characters");
    }
    let models: Vec<String> = match &models {
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(String::from)
            .collect(),
        None => vec!["*".to_string()],
    };
    if models.is_empty() {
        return usage("--models needs at least one alias, or *");
    }
    let entry = serde_json::json!({"name": name, "key_sha256": hash, "models": models});
    if json {
        let out = serde_json::json!({"key": key, "key_sha256": hash, "caller": entry});
        println!("{out}");
    } else {
        println!("key:        {key}");
        println!("key_sha256: {hash}");
        println!("callers[] entry:");
        println!("  {entry}");
        eprintln!(
            "The key is shown only now: give it to the caller through a secret store. \
             The configuration holds only key_sha256."
        );
    }
    if models == ["*"] {
        eprintln!("note: this caller may use every model; narrow it with --models a,b");
    }
    OK
}

pub fn hash_key_main(args: &[String]) -> i32 {
    if let Some(arg) = args.first() {
        return usage(&format!(
            "hash-key reads the key on standard input, not as an argument (`{arg}`), \
             so it stays out of shell history: printf %s \"$KEY\" | azure-openai-filter hash-key"
        ));
    }
    let mut input = Vec::new();
    let read = std::io::stdin()
        .take(MAX_KEY_LEN as u64 + 1)
        .read_to_end(&mut input);
    if let Err(e) = read {
        eprintln!("azure-openai-filter: could not read standard input: {e}");
        return REFUSED;
    }
    if input.len() > MAX_KEY_LEN {
        eprintln!(
            "azure-openai-filter: more than {MAX_KEY_LEN} bytes on standard input: not a key"
        );
        return REFUSED;
    }
    let Ok(text) = String::from_utf8(input) else {
        eprintln!("azure-openai-filter: the key is not UTF-8 text");
        return REFUSED;
    };
    // One trailing newline (as `echo` or a file adds) is not part of the key.
    let key = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    if let Some(reason) = unusable(key) {
        eprintln!("azure-openai-filter: {reason}");
        return REFUSED;
    }
    println!("{}", key_sha256(key));
    OK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_matches_rfc4648_vectors() {
        // RFC 4648 section 10, in the URL-safe alphabet and without padding.
        for (input, expected) in [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64url(input.as_bytes()), expected, "{input}");
        }
        assert_eq!(base64url(&[0xfb, 0xff, 0xbf]), "-_-_");
    }

    #[test]
    fn new_keys_are_long_distinct_and_header_safe() {
        let a = new_key().unwrap();
        let b = new_key().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("sk-"));
        assert_eq!(a.len(), 3 + 43);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        assert_eq!(unusable(&a), None);
    }

    #[test]
    fn key_hash_is_sha256_hex() {
        assert_eq!(
            key_sha256("sk-demo-team-a"),
            "50a734ef22b610c7ad5e602d7a1aa5e39a9a39a6f6cc38aa2415f9d58b52146e"
        );
    }

    #[test]
    fn keys_that_could_never_match_are_refused() {
        assert!(unusable("").is_some());
        assert!(unusable(" sk-x").is_some());
        assert!(unusable("sk-x\n").is_some());
        assert!(unusable("sk\u{7}x").is_some());
        assert_eq!(unusable("sk-x"), None);
    }
}
