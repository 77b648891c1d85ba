//! What identity endpoints answer: Entra ID's token endpoint
//! (`expires_in` as a number) and IMDS (`expires_in` as a string), and
//! their error bodies (`error`, `error_description` with an AADSTS code,
//! `error_codes`). Failures become a short description that names the
//! status and codes and never quotes a secret.

use crate::json::Json;
use crate::secret::Secret;

/// Identity endpoints are small; anything past this is not read.
pub const MAX_TOKEN_RESPONSE_BYTES: usize = 64 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub struct Token {
    pub access_token: Secret,
    pub expires_in_s: u64,
}

/// Reads a token endpoint's answer. `status` is None when the connection
/// closed before any response headers arrived.
pub fn parse_token_response(status: Option<u16>, body: &[u8]) -> Result<Token, String> {
    let Some(status) = status else {
        return Err("the identity endpoint closed the connection before answering".into());
    };
    if status != 200 {
        return Err(describe_failure(status, body));
    }
    let success = Json::parse(body)
        .ok()
        .filter(|json| matches!(json, Json::Object(_)))
        .ok_or("the identity endpoint answered 200 with a body that is not token JSON")?;
    let access_token = success
        .get("access_token")
        .and_then(Json::as_str)
        .filter(|t| !t.is_empty())
        .ok_or("the identity endpoint answered 200 without an access_token")?;
    if !access_token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            "the identity endpoint answered 200 with an access_token a header cannot carry".into(),
        );
    }
    if let Some(kind) = success.get("token_type").and_then(Json::as_str) {
        if !kind.eq_ignore_ascii_case("bearer") {
            return Err(format!(
                "the identity endpoint answered 200 with token_type `{}`, not Bearer",
                clean(kind)
            ));
        }
    }
    // A number (Entra ID) or a string of digits (IMDS).
    let expires_in_s = match success.get("expires_in") {
        Some(Json::Unsigned(n)) => Some(*n),
        Some(Json::String(text)) => text.trim().parse().ok(),
        _ => None,
    }
    .filter(|&n| n > 0)
    .ok_or("the identity endpoint answered 200 without a usable expires_in")?;
    let access_token = Secret::new(access_token.to_string());
    Ok(Token {
        access_token,
        expires_in_s,
    })
}

fn describe_failure(status: u16, body: &[u8]) -> String {
    // Envoy's own answers when the endpoint cannot be reached or is too slow.
    if body.starts_with(b"upstream connect error") || body.starts_with(b"no healthy upstream") {
        return format!("the identity endpoint could not be reached (Envoy answered {status})");
    }
    if status == 504 && body.starts_with(b"upstream request timeout") {
        return "the identity endpoint did not answer in time".into();
    }
    let mut text = format!("the identity endpoint answered {status}");
    if let Ok(failure) = Json::parse(body) {
        let error = failure.get("error").and_then(Json::as_str).map(clean);
        if let Some(error) = error.filter(|e| !e.is_empty()) {
            text.push(' ');
            text.push_str(&error);
        }
        let first_code = match failure.get("error_codes") {
            Some(Json::Array(codes)) => match codes.first() {
                Some(Json::Unsigned(code)) => Some(*code),
                _ => None,
            },
            _ => None,
        };
        let code = first_code.or_else(|| {
            failure
                .get("error_description")
                .and_then(Json::as_str)
                .and_then(aadsts_code)
        });
        if let Some(code) = code {
            text.push_str(&format!(" (AADSTS{code})"));
        }
    }
    text
}

/// The number of the first `AADSTSnnnn` in an error description.
fn aadsts_code(description: &str) -> Option<u64> {
    let start = description.find("AADSTS")? + "AADSTS".len();
    let digits: String = description
        .get(start..)?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// An error name as sent, kept to letters, digits and `_` and cut short.
fn clean(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &str) -> Token {
        parse_token_response(Some(200), body.as_bytes()).unwrap()
    }

    fn err(status: Option<u16>, body: &str) -> String {
        parse_token_response(status, body.as_bytes()).unwrap_err()
    }

    #[test]
    fn entra_success_with_numeric_expires_in() {
        let token = ok(
            r#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"eyJ0eXAi.abc.def"}"#,
        );
        assert_eq!(token.access_token.expose(), "eyJ0eXAi.abc.def");
        assert_eq!(token.expires_in_s, 3599);
    }

    #[test]
    fn imds_success_with_string_expires_in() {
        let token = ok(
            r#"{"access_token":"eyJ.x.y","client_id":"c","expires_in":"86399","expires_on":"1700000000","ext_expires_in":"86399","not_before":"1699913300","resource":"https://cognitiveservices.azure.com/","token_type":"Bearer"}"#,
        );
        assert_eq!(token.expires_in_s, 86399);
    }

    #[test]
    fn refuses_success_without_a_token_or_lifetime() {
        assert!(err(Some(200), r#"{"expires_in":3599}"#).contains("without an access_token"));
        assert!(err(Some(200), r#"{"access_token":"","expires_in":3599}"#)
            .contains("without an access_token"));
        assert!(err(Some(200), r#"{"access_token":"t"}"#).contains("expires_in"));
        assert!(
            err(Some(200), r#"{"access_token":"t","expires_in":"soon"}"#).contains("expires_in")
        );
        assert!(err(Some(200), r#"{"access_token":"t","expires_in":0}"#).contains("expires_in"));
        assert!(err(Some(200), r#"{"access_token":"t","expires_in":-5}"#).contains("expires_in"));
        assert!(err(Some(200), r#"{"access_token":"t","expires_in":1.5}"#).contains("expires_in"));
        assert!(err(Some(200), r#"{"access_token":"t","expires_in":[1]}"#).contains("expires_in"));
        assert!(err(Some(200), "<html>").contains("not token JSON"));
        assert!(err(Some(200), r#"{"access_token":"a b","expires_in":5}"#).contains("header"));
        assert!(err(
            Some(200),
            r#"{"access_token":"t","expires_in":5,"token_type":"pop"}"#
        )
        .contains("`pop`"));
    }

    #[test]
    fn entra_error_names_status_error_and_aadsts_code() {
        let body = r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app 'abc'.\r\nTrace ID: 1\r\nCorrelation ID: 2\r\nTimestamp: 2024-01-01 00:00:00Z","error_codes":[7000215],"timestamp":"2024-01-01 00:00:00Z","trace_id":"1","correlation_id":"2"}"#;
        assert_eq!(
            err(Some(401), body),
            "the identity endpoint answered 401 invalid_client (AADSTS7000215)"
        );
    }

    #[test]
    fn aadsts_code_from_the_description_when_codes_are_missing() {
        let body = r#"{"error":"unauthorized_client","error_description":"AADSTS700016: Application with identifier 'x' was not found."}"#;
        assert_eq!(
            err(Some(400), body),
            "the identity endpoint answered 400 unauthorized_client (AADSTS700016)"
        );
    }

    #[test]
    fn imds_and_opaque_errors() {
        assert_eq!(
            err(
                Some(400),
                r#"{"error":"invalid_request","error_description":"Identity not found"}"#
            ),
            "the identity endpoint answered 400 invalid_request"
        );
        assert_eq!(err(Some(500), "oops"), "the identity endpoint answered 500");
        assert_eq!(
            err(Some(429), r#"{"error":"<script>alert(1)</script>"}"#),
            "the identity endpoint answered 429 scriptalert1script"
        );
    }

    #[test]
    fn envoy_answers_for_unreachable_and_slow_endpoints() {
        assert_eq!(
            err(Some(503), "upstream connect error or disconnect/reset before headers. reset reason: connection failure"),
            "the identity endpoint could not be reached (Envoy answered 503)"
        );
        assert_eq!(
            err(Some(504), "upstream request timeout"),
            "the identity endpoint did not answer in time"
        );
        assert_eq!(
            err(None, ""),
            "the identity endpoint closed the connection before answering"
        );
    }

    #[test]
    fn failures_never_quote_the_description() {
        let body = r#"{"error":"invalid_client","error_description":"secret s3cr3t was wrong"}"#;
        assert!(!err(Some(401), body).contains("s3cr3t"));
    }
}
