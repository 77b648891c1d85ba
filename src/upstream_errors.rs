//! Azure error answers that OpenAI SDKs would misread, put in OpenAI's
//! error shape. Only two need it: Azure's 401 for a rejected token comes in
//! another envelope (`{"statusCode","message"}`), and 404
//! `DeploymentNotFound` would show callers a deployment name. Every other
//! error (content filter included) passes through unchanged.
//!
//! The filter asks upstreams for uncompressed answers; one that compresses
//! anyway is read through its `content-encoding` (gzip, deflate), and one
//! in an encoding the filter cannot read is replaced by a generic error of
//! the same status, so that nothing it holds (a deployment name) reaches
//! the caller unread.

use crate::errors::ApiError;
use crate::json::Json;

/// Statuses whose bodies may need translating (the rest are not read).
pub fn may_translate(status: u16) -> bool {
    status == 401 || status == 404
}

/// Error answers larger than this (as sent) are passed through unread.
pub const MAX_TRANSLATED_ERROR_BYTES: usize = 64 * 1024;
/// Nor is more than this inflated from a compressed one.
const MAX_INFLATED_BYTES: usize = 256 * 1024;

/// A `content-encoding`, as far as the filter reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Deflate,
    /// Anything else (br, zstd, several codings): not readable here.
    Other(String),
}

impl Encoding {
    pub fn of(content_encoding: Option<&[u8]>) -> Self {
        let Some(value) = content_encoding else {
            return Encoding::Identity;
        };
        let value = String::from_utf8_lossy(value).trim().to_ascii_lowercase();
        match value.as_str() {
            "" | "identity" => Encoding::Identity,
            "gzip" | "x-gzip" => Encoding::Gzip,
            "deflate" => Encoding::Deflate,
            _ => Encoding::Other(value.chars().take(40).collect()),
        }
    }
}

/// The body as sent, decoded; None when it cannot be read.
fn decode(body: &[u8], encoding: &Encoding) -> Option<Vec<u8>> {
    use miniz_oxide::inflate::{decompress_to_vec_with_limit, decompress_to_vec_zlib_with_limit};
    match encoding {
        Encoding::Identity => Some(body.to_vec()),
        Encoding::Gzip => {
            decompress_to_vec_with_limit(gzip_payload(body)?, MAX_INFLATED_BYTES).ok()
        }
        // HTTP's deflate is zlib-wrapped; some servers send it raw.
        Encoding::Deflate => decompress_to_vec_zlib_with_limit(body, MAX_INFLATED_BYTES)
            .or_else(|_| decompress_to_vec_with_limit(body, MAX_INFLATED_BYTES))
            .ok(),
        Encoding::Other(_) => None,
    }
}

/// The deflate stream inside a gzip member (RFC 1952), past its header.
fn gzip_payload(body: &[u8]) -> Option<&[u8]> {
    const FHCRC: u8 = 2;
    const FEXTRA: u8 = 4;
    const FNAME: u8 = 8;
    const FCOMMENT: u8 = 16;
    let (header, _) = body.split_at_checked(10)?;
    if header.get(..3)? != [0x1f, 0x8b, 8] {
        return None;
    }
    let flags = *header.get(3)?;
    let mut at = 10;
    if flags & FEXTRA != 0 {
        let len = u16::from_le_bytes([*body.get(at)?, *body.get(at + 1)?]) as usize;
        at += 2 + len;
    }
    for flag in [FNAME, FCOMMENT] {
        if flags & flag != 0 {
            at += body.get(at..)?.iter().position(|&b| b == 0)? + 1;
        }
    }
    if flags & FHCRC != 0 {
        at += 2;
    }
    body.get(at..)
}

/// The replacement body, and a line for the operators' log; None to pass
/// the answer through unchanged. `body` is the answer as sent.
pub fn translate(
    status: u16,
    body: &[u8],
    encoding: &Encoding,
    alias: &str,
    upstream: &str,
) -> Option<(Vec<u8>, String)> {
    let Some(body) = decode(body, encoding) else {
        let what = match encoding {
            Encoding::Other(name) => format!("`{name}`"),
            _ => "a compressed".to_string(),
        };
        let note = format!(
            "upstream `{upstream}` answered {status} in {what} encoding the gateway cannot read; \
             replaced by a generic error"
        );
        let detail = format!("it answered {status} in an encoding the gateway cannot read");
        let error = match status {
            401 => ApiError::upstream_unauthorized(upstream, &detail),
            _ => ApiError::upstream_unreadable(upstream, status, &detail),
        };
        return Some((error.body(), note));
    };
    let json = Json::parse(&body).ok()?;
    match status {
        401 if json.get("error").is_none() => {
            let message = json.get("message").and_then(Json::as_str)?;
            json.get("statusCode")?;
            Some((
                ApiError::upstream_unauthorized(upstream, message).body(),
                format!("upstream `{upstream}` rejected the gateway's credential: {message}"),
            ))
        }
        404 => {
            let code = json.get("error")?.get("code").and_then(Json::as_str)?;
            (code == "DeploymentNotFound").then(|| {
                (
                    ApiError::model_not_found(alias).body(),
                    format!("upstream `{upstream}` has no deployment for model alias `{alias}` (DeploymentNotFound)"),
                )
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn translated(status: u16, body: &Value) -> Option<Value> {
        let bytes = serde_json::to_vec(body).unwrap();
        translate(status, &bytes, &Encoding::Identity, "gpt-4o", "west")
            .map(|(body, _)| serde_json::from_slice(&body).unwrap())
    }

    fn gzip(bytes: &[u8], flags: u8, extra: &[u8]) -> Vec<u8> {
        let mut out = vec![0x1f, 0x8b, 8, flags, 0, 0, 0, 0, 0, 3];
        out.extend_from_slice(extra);
        out.extend(miniz_oxide::deflate::compress_to_vec(bytes, 6));
        out.extend_from_slice(&[0; 8]); // CRC32 and size, not checked
        out
    }

    #[test]
    fn compressed_errors_are_read_through_their_encoding() {
        let azure = json!({"error": {"code": "DeploymentNotFound", "message": "The API deployment for this resource does not exist (gpt4o-prod)."}});
        let plain = serde_json::to_vec(&azure).unwrap();
        let expected = ApiError::model_not_found("gpt-4o").body();
        let mut named = b"\x05\x00extra".to_vec();
        named.extend_from_slice(b"error.json\0a comment\0\xab\xcd");
        for (encoding, sent) in [
            (Encoding::of(Some(b"gzip")), gzip(&plain, 0, b"")),
            (
                Encoding::of(Some(b" X-GZIP ")),
                gzip(&plain, 2 | 4 | 8 | 16, &named),
            ),
            (
                Encoding::of(Some(b"deflate")),
                miniz_oxide::deflate::compress_to_vec_zlib(&plain, 6),
            ),
            (
                Encoding::of(Some(b"deflate")),
                miniz_oxide::deflate::compress_to_vec(&plain, 6),
            ),
        ] {
            let (body, _) = translate(404, &sent, &encoding, "gpt-4o", "west").unwrap();
            assert_eq!(body, expected, "{encoding:?}");
        }
    }

    #[test]
    fn unreadable_encodings_never_pass_through() {
        let secret = b"DeploymentNotFound gpt4o-prod";
        for (encoding, status, code) in [
            (Encoding::of(Some(b"br")), 404, "upstream_error"),
            (Encoding::of(Some(b"gzip, br")), 404, "upstream_error"),
            (Encoding::of(Some(b"gzip")), 404, "upstream_error"), // not gzip at all
            (Encoding::of(Some(b"zstd")), 401, "upstream_unauthorized"),
        ] {
            let (body, note) = translate(status, secret, &encoding, "gpt-4o", "west").unwrap();
            let body: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body["error"]["code"], code, "{encoding:?}");
            assert!(!body.to_string().contains("gpt4o-prod"));
            assert!(note.contains("cannot read"), "{note}");
        }
        assert_eq!(Encoding::of(None), Encoding::Identity);
        assert_eq!(Encoding::of(Some(b"identity")), Encoding::Identity);
        // A bomb is cut at the limit, then treated as unreadable.
        let bomb = gzip(&vec![b' '; 4 * MAX_INFLATED_BYTES], 0, b"");
        assert!(bomb.len() < MAX_TRANSLATED_ERROR_BYTES);
        let (body, _) = translate(404, &bomb, &Encoding::Gzip, "a", "west").unwrap();
        assert!(String::from_utf8(body).unwrap().contains("upstream_error"));
    }

    #[test]
    fn entra_401_envelope_becomes_openai_error() {
        let azure = json!({"statusCode": 401, "message": "Unauthorized. Access token is missing, invalid, audience is incorrect (https://cognitiveservices.azure.com), or have expired."});
        let body = translated(401, &azure).unwrap();
        assert_eq!(body["error"]["code"], "upstream_unauthorized");
        assert_eq!(body["error"]["type"], "authentication_error");
        assert_eq!(body["error"]["param"], Value::Null);
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("upstream `west`"), "{message}");
        assert!(message.contains("Access token is missing"), "{message}");
    }

    #[test]
    fn deployment_not_found_names_the_alias_only() {
        let azure = json!({"error": {"code": "DeploymentNotFound", "message": "The API deployment for this resource does not exist (gpt4o-prod)."}});
        let body = translated(404, &azure).unwrap();
        assert_eq!(
            body,
            serde_json::from_slice::<Value>(&ApiError::model_not_found("gpt-4o").body()).unwrap()
        );
        assert!(!body.to_string().contains("gpt4o-prod"));
    }

    #[test]
    fn everything_else_passes_through() {
        let key_401 = json!({"error": {"code": "401", "message": "Access denied due to invalid subscription key."}});
        assert_eq!(translated(401, &key_401), None);
        assert_eq!(
            translated(
                404,
                &json!({"error": {"code": "404", "message": "Resource not found"}})
            ),
            None
        );
        let filter = json!({"error": {"code": "content_filter", "message": "filtered", "innererror": {"code": "ResponsibleAIPolicyViolation"}}});
        assert_eq!(translated(400, &filter), None);
        assert_eq!(translated(429, &json!({"error": {"code": "429"}})), None);
        assert_eq!(
            translate(401, b"not json", &Encoding::Identity, "a", "u"),
            None
        );
        assert_eq!(translated(401, &json!({"message": "no status code"})), None);
        assert!(
            may_translate(401) && may_translate(404) && !may_translate(400) && !may_translate(200)
        );
    }
}
