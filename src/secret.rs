//! Credentials held by the filter: never printed, compared in constant time.

use std::fmt;
use std::hint::black_box;

/// A credential the filter holds (an upstream key, a client secret, a token).
///
/// It has no `Display`, and its `Debug` prints a placeholder, so it cannot
/// reach a log line or an error message by accident. Code that needs the
/// value (to write a header) calls [`Secret::expose`] and says so.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    /// The plain value, for the one place that writes it into a request.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Compares two byte strings in time that depends only on their lengths:
/// every byte is looked at, differences are folded with OR, and only the
/// folded result is branched on.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_does_not_show_the_value() {
        let secret = Secret::new("hunter2".to_string());
        assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn constant_time_eq_compares_content_and_length() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn constant_time_eq_differences_do_not_cancel_out() {
        // Each byte differs by the same bits; folding with XOR instead of OR
        // would cancel them and call the strings equal.
        assert!(!constant_time_eq(b"aa", b"bb"));
        assert!(!constant_time_eq(&[0x01, 0x01, 0x00], &[0x00, 0x00, 0x00]));
    }
}
