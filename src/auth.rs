//! Caller authentication: the key comes from `Authorization: Bearer <key>`
//! (OpenAI SDKs) or `api-key: <key>` (Azure SDKs); its SHA-256 is compared
//! in constant time against every configured caller.

use sha2::{Digest, Sha256};

use crate::config::Caller;
use crate::errors::ApiError;
use crate::secret::constant_time_eq;

/// The caller key presented with a request. A `Bearer` Authorization header
/// wins over `api-key` when both are sent.
pub fn presented_key<'a>(
    authorization: Option<&'a [u8]>,
    api_key: Option<&'a [u8]>,
) -> Result<&'a [u8], ApiError> {
    if let Some(value) = authorization {
        return match bearer_token(value) {
            Some(key) => Ok(key),
            // A non-Bearer Authorization (Basic, say) is no key of ours; an
            // api-key beside it still counts.
            None => api_key
                .map(trim)
                .filter(|key| !key.is_empty())
                .ok_or_else(ApiError::malformed_authorization),
        };
    }
    match api_key.map(trim) {
        Some(key) if !key.is_empty() => Ok(key),
        _ => Err(ApiError::missing_api_key()),
    }
}

fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let value = trim(value);
    let scheme = value.get(..7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = trim(value.get(7..)?);
    (!token.is_empty()).then_some(token)
}

fn trim(bytes: &[u8]) -> &[u8] {
    bytes.trim_ascii()
}

/// The index of the caller whose key hash matches, checking every caller so
/// the time taken does not depend on which one (if any) matched.
pub fn authenticate(callers: &[Caller], key: &[u8]) -> Option<usize> {
    let digest: [u8; 32] = Sha256::digest(key).into();
    let mut found = None;
    for (index, caller) in callers.iter().enumerate() {
        if constant_time_eq(&caller.key_sha256, &digest) {
            found = Some(index);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelAccess;

    fn caller(name: &str, key: &str) -> Caller {
        Caller {
            name: name.to_string(),
            key_sha256: Sha256::digest(key.as_bytes()).into(),
            access: ModelAccess::Any,
            limits: None,
        }
    }

    #[test]
    fn bearer_key() {
        assert_eq!(
            presented_key(Some(b"Bearer sk-abc"), None),
            Ok(&b"sk-abc"[..])
        );
        assert_eq!(
            presented_key(Some(b"bearer  sk-abc "), None),
            Ok(&b"sk-abc"[..])
        );
        assert_eq!(
            presented_key(Some(b"BEARER sk-abc"), None),
            Ok(&b"sk-abc"[..])
        );
    }

    #[test]
    fn api_key_header() {
        assert_eq!(presented_key(None, Some(b"sk-abc")), Ok(&b"sk-abc"[..]));
        assert_eq!(presented_key(None, Some(b" sk-abc ")), Ok(&b"sk-abc"[..]));
    }

    #[test]
    fn bearer_wins_over_api_key() {
        assert_eq!(
            presented_key(Some(b"Bearer from-bearer"), Some(b"from-api-key")),
            Ok(&b"from-bearer"[..])
        );
    }

    #[test]
    fn non_bearer_authorization_falls_back_to_api_key() {
        assert_eq!(
            presented_key(Some(b"Basic dXNlcg=="), Some(b"k")),
            Ok(&b"k"[..])
        );
    }

    #[test]
    fn missing_or_malformed() {
        assert_eq!(
            presented_key(None, None).unwrap_err().code,
            "missing_api_key"
        );
        assert_eq!(
            presented_key(None, Some(b"  ")).unwrap_err().code,
            "missing_api_key"
        );
        for value in [
            &b"Basic dXNlcg=="[..],
            b"Bearer",
            b"Bearer ",
            b"Bearersk-abc",
            b"sk-abc",
            b"",
        ] {
            let error = presented_key(Some(value), None).unwrap_err();
            assert_eq!(error.status, 401);
            assert_eq!(error.code, "invalid_api_key");
        }
    }

    #[test]
    fn non_utf8_key_is_just_a_wrong_key() {
        let key = presented_key(Some(b"Bearer \xff\xfe"), None).unwrap();
        assert_eq!(authenticate(&[caller("a", "k")], key), None);
    }

    #[test]
    fn finds_the_matching_caller() {
        let callers = [caller("a", "key-a"), caller("b", "key-b")];
        assert_eq!(authenticate(&callers, b"key-a"), Some(0));
        assert_eq!(authenticate(&callers, b"key-b"), Some(1));
        assert_eq!(authenticate(&callers, b"key-c"), None);
        assert_eq!(authenticate(&callers, b""), None);
        assert_eq!(authenticate(&[], b"key-a"), None);
    }
}
