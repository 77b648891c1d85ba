//! Every rejection the filter answers itself, as OpenAI error JSON.
//!
//! The official SDKs choose their exception from the status code
//! (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, ...)
//! and show `error.message`, so the message says what to change.

use serde::Serialize;

/// An error answered by the gateway: status, OpenAI error body, extra headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub code: &'static str,
    pub param: Option<&'static str>,
    pub message: String,
    /// Headers beside `content-type` (for example `allow` on a 405).
    pub headers: Vec<(&'static str, String)>,
}

/// Longest piece of caller input echoed back in a message.
const ECHO_LIMIT: usize = 256;

const INVALID_REQUEST: &str = "invalid_request_error";

impl ApiError {
    fn new(status: u16, kind: &'static str, code: &'static str, message: String) -> Self {
        ApiError {
            status,
            kind,
            code,
            param: None,
            message,
            headers: Vec::new(),
        }
    }

    fn with_param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    pub fn missing_api_key() -> Self {
        Self::new(
            401,
            INVALID_REQUEST,
            "missing_api_key",
            "You didn't provide an API key. Send your gateway key as `Authorization: Bearer <key>` \
             or as an `api-key` header."
                .into(),
        )
    }

    pub fn malformed_authorization() -> Self {
        Self::new(
            401,
            INVALID_REQUEST,
            "invalid_api_key",
            "The Authorization header must be `Bearer <key>` with your gateway key.".into(),
        )
    }

    pub fn repeated_api_key() -> Self {
        Self::new(
            401,
            INVALID_REQUEST,
            "invalid_api_key",
            "The api-key header was sent more than once; send your gateway key once.".into(),
        )
    }

    /// A caller's own upstream key where its upstream does not take one
    /// from this caller.
    pub fn caller_key_not_allowed(header: &str, upstream: &str) -> Self {
        Self::new(
            400,
            INVALID_REQUEST,
            "caller_credentials_not_allowed",
            format!(
                "This request carries `{header}`, but upstream `{upstream}` does not take this \
                 caller's own key in it. Remove the header to use the gateway's credential."
            ),
        )
    }

    pub fn invalid_caller_key(header: &str) -> Self {
        Self::new(
            400,
            INVALID_REQUEST,
            "invalid_upstream_api_key",
            format!(
                "The `{header}` header must be sent once, holding one key (1 to 512 visible \
                 ASCII characters)."
            ),
        )
    }

    pub fn invalid_api_key() -> Self {
        Self::new(
            401,
            INVALID_REQUEST,
            "invalid_api_key",
            "Incorrect API key provided. Use a key issued for this gateway.".into(),
        )
    }

    /// Unknown alias and alias outside the caller's allowlist get this same
    /// answer, so a caller cannot probe which aliases exist.
    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            404,
            INVALID_REQUEST,
            "model_not_found",
            format!(
                "The model `{}` does not exist or you do not have access to it.",
                echo(model)
            ),
        )
        .with_param("model")
    }

    pub fn unknown_url(method: &[u8], path: &[u8]) -> Self {
        Self::new(
            404,
            INVALID_REQUEST,
            "unknown_url",
            format!("Invalid URL ({} {}).", echo_bytes(method), echo_bytes(path)),
        )
    }

    pub fn method_not_allowed(method: &[u8], path: &str, allowed: &'static str) -> Self {
        let mut error = Self::new(
            405,
            INVALID_REQUEST,
            "method_not_allowed",
            format!(
                "Method {} is not allowed on {}; use {}.",
                echo_bytes(method),
                path,
                allowed
            ),
        );
        error.headers.push(("allow", allowed.to_string()));
        error
    }

    pub fn body_too_large(limit: usize) -> Self {
        Self::new(
            413,
            INVALID_REQUEST,
            "request_too_large",
            format!("The request body is larger than this gateway's limit of {limit} bytes."),
        )
    }

    pub fn invalid_json(detail: &str) -> Self {
        Self::new(
            400,
            INVALID_REQUEST,
            "invalid_json",
            format!(
                "We could not parse the JSON body of your request ({}). \
                 The body must be a JSON object.",
                echo(detail)
            ),
        )
    }

    pub fn body_not_object() -> Self {
        Self::new(
            400,
            INVALID_REQUEST,
            "invalid_json",
            "The request body must be a JSON object.".into(),
        )
    }

    pub fn invalid_multipart(detail: &str) -> Self {
        Self::new(
            400,
            INVALID_REQUEST,
            "invalid_multipart",
            format!("We could not read the multipart/form-data body: {detail}."),
        )
    }

    /// A known query parameter with a value the gateway does not forward.
    pub fn invalid_query_parameter(name: &'static str) -> Self {
        Self::new(
            400,
            INVALID_REQUEST,
            "invalid_value",
            format!(
                "The query parameter '{name}' must be letters, digits, '.', '_' or '-' \
                 (at most 256)."
            ),
        )
        .with_param(name)
    }

    pub fn repeated_query_parameter(name: &'static str) -> Self {
        Self::new(
            400,
            INVALID_REQUEST,
            "invalid_value",
            format!("The query parameter '{name}' was sent more than once; send it once."),
        )
        .with_param(name)
    }

    /// A stored response the caller cannot reach through this gateway (or
    /// the gateway does not know where responses are stored).
    pub fn response_not_found(id: &str) -> Self {
        Self::new(
            404,
            INVALID_REQUEST,
            "not_found",
            format!(
                "No response with id `{}` is available through this gateway.",
                echo(id)
            ),
        )
    }

    /// Azure rejected the gateway's own credential for an upstream.
    pub fn upstream_unauthorized(upstream: &str, detail: &str) -> Self {
        Self::new(
            401,
            "authentication_error",
            "upstream_unauthorized",
            format!(
                "Your key was accepted, but the Azure OpenAI resource behind upstream `{upstream}` \
                 rejected the gateway's credential ({}). The gateway's operators need to fix its \
                 upstream authentication.",
                echo(detail)
            ),
        )
    }

    /// An upstream error answer the gateway could not read, replaced.
    pub fn upstream_unreadable(upstream: &str, status: u16, detail: &str) -> Self {
        Self::new(
            status,
            if status >= 500 {
                "server_error"
            } else {
                INVALID_REQUEST
            },
            "upstream_error",
            format!(
                "The Azure OpenAI resource behind upstream `{upstream}` refused the request ({}).",
                echo(detail)
            ),
        )
    }

    /// Every deployment of a model is cooling down after 429s or failures.
    pub fn all_targets_cooling(alias: &str, retry_after_ms: u64) -> Self {
        let seconds = retry_after_ms.div_ceil(1000).max(1);
        let mut error = Self::new(
            429,
            "requests",
            "rate_limit_exceeded",
            format!(
                "Every deployment behind model `{}` is over its rate limit or failing right now. \
                 Please retry after {seconds} seconds.",
                echo(alias)
            ),
        );
        error.headers.push(("retry-after", seconds.to_string()));
        error
            .headers
            .push(("retry-after-ms", retry_after_ms.to_string()));
        error
    }

    /// A caller's own limit for the minute is reached (`kind`: `requests` or
    /// `tokens`); worded as OpenAI words its own.
    pub fn caller_limited(
        caller: &str,
        kind: &'static str,
        limit: u64,
        used: u64,
        retry_after_ms: u64,
    ) -> Self {
        let seconds = retry_after_ms.div_ceil(1000).max(1);
        let mut error = Self::new(
            429,
            kind,
            "rate_limit_exceeded",
            format!(
                "Rate limit reached for caller `{}` on {kind} per minute: limit {limit}, used \
                 {used}. Please try again in {seconds}s.",
                echo(caller)
            ),
        );
        error.headers.push(("retry-after", seconds.to_string()));
        error
            .headers
            .push(("retry-after-ms", retry_after_ms.to_string()));
        error
    }

    /// No target of a pool could be reached.
    pub fn upstream_unreachable() -> Self {
        Self::new(
            503,
            "server_error",
            "upstream_unavailable",
            "The gateway could not reach the Azure OpenAI resource for this model. Try again \
             later."
                .into(),
        )
    }

    pub fn missing_model() -> Self {
        Self::new(
            400,
            INVALID_REQUEST,
            "missing_required_parameter",
            "You must provide a model parameter.".into(),
        )
        .with_param("model")
    }

    pub fn model_not_string(found: &str) -> Self {
        Self::new(
            400,
            INVALID_REQUEST,
            "invalid_type",
            format!("Invalid type for 'model': expected a string, but got {found} instead."),
        )
        .with_param("model")
    }

    pub fn duplicate_model() -> Self {
        Self::new(
            400,
            INVALID_REQUEST,
            "invalid_json",
            "The request body has more than one 'model' field; send exactly one.".into(),
        )
        .with_param("model")
    }

    /// A top-level key that is one the gateway reads but for case:
    /// case-insensitive parsers (Go's encoding/json) would read it as that.
    pub fn key_look_alike(key: &str, of: &'static str) -> Self {
        Self::new(
            400,
            INVALID_REQUEST,
            "invalid_json",
            format!(
                "The request body has a top-level key `{}` that differs from '{of}' only in \
                 case; send it once, as '{of}'.",
                echo(key)
            ),
        )
        .with_param(of)
    }

    /// No access token for a token upstream could be had in time. `reason`
    /// says what the identity endpoint did (status, error, AADSTS code).
    pub fn token_unavailable(upstream: &str, reason: Option<&str>, waited_ms: u64) -> Self {
        let reason = match reason {
            Some(reason) => reason.to_string(),
            None => format!("no token arrived within {waited_ms} ms"),
        };
        Self::new(
            503,
            "server_error",
            "token_unavailable",
            format!(
                "The gateway could not get an access token for upstream `{upstream}`: {reason}. \
                 Try again later; if this persists, the gateway's identity configuration needs attention."
            ),
        )
    }

    /// The gateway itself failed (a host call it relies on did not work).
    pub fn internal(what: &str) -> Self {
        Self::new(
            500,
            "server_error",
            "gateway_error",
            format!("The gateway could not process the request: {what}."),
        )
    }

    /// Envoy never delivered the body of a request the filter held for it:
    /// the Wasm filter lacks `allow_on_headers_stop_iteration: true`.
    pub fn body_never_delivered() -> Self {
        Self::new(
            500,
            "server_error",
            "gateway_error",
            "The gateway is misconfigured: Envoy did not deliver the request body to the filter. \
             Its operators must set `allow_on_headers_stop_iteration: true` in the Wasm filter's \
             config."
                .into(),
        )
    }

    /// The JSON body: `{"error":{"message","type","param","code"}}`.
    pub fn body(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Envelope<'a> {
            error: Body<'a>,
        }
        #[derive(Serialize)]
        struct Body<'a> {
            message: &'a str,
            #[serde(rename = "type")]
            kind: &'a str,
            param: Option<&'a str>,
            code: &'a str,
        }
        let envelope = Envelope {
            error: Body {
                message: &self.message,
                kind: self.kind,
                param: self.param,
                code: self.code,
            },
        };
        // Serializing plain strings into a Vec cannot fail; the fallback keeps
        // this path panic-free all the same.
        serde_json::to_vec(&envelope).unwrap_or_else(|_| {
            br#"{"error":{"message":"gateway error","type":"server_error","param":null,"code":"gateway_error"}}"#
                .to_vec()
        })
    }
}

/// Caller input shown in a message: cut to a bounded length.
fn echo(text: &str) -> &str {
    if text.len() <= ECHO_LIMIT {
        return text;
    }
    let mut end = ECHO_LIMIT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or("")
}

fn echo_bytes(bytes: &[u8]) -> String {
    let cut = bytes.get(..ECHO_LIMIT).unwrap_or(bytes);
    String::from_utf8_lossy(cut).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn parsed(error: &ApiError) -> Value {
        serde_json::from_slice(&error.body()).unwrap()
    }

    #[test]
    fn body_has_the_openai_shape() {
        let error = ApiError::model_not_found("gpt-4o");
        assert_eq!(error.status, 404);
        assert_eq!(
            parsed(&error),
            json!({"error": {
                "message": "The model `gpt-4o` does not exist or you do not have access to it.",
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_found"
            }})
        );
    }

    #[test]
    fn param_is_null_when_not_about_a_parameter() {
        let body = parsed(&ApiError::invalid_api_key());
        assert_eq!(body["error"]["param"], Value::Null);
        assert_eq!(body["error"]["code"], "invalid_api_key");
    }

    #[test]
    fn caller_input_is_escaped_and_bounded() {
        let model = format!("\"}}{}", "x".repeat(1000));
        let body = parsed(&ApiError::model_not_found(&model));
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.starts_with("The model `\"}xxx"));
        assert!(message.len() < 400);
    }

    #[test]
    fn echo_cuts_on_a_char_boundary() {
        let text = "é".repeat(200); // 400 bytes
        let cut = echo(&text);
        assert!(cut.len() <= ECHO_LIMIT);
        assert!(cut.chars().all(|c| c == 'é'));
    }

    #[test]
    fn non_utf8_path_is_shown_lossily() {
        let error = ApiError::unknown_url(b"POST", b"/v1/\xff");
        assert_eq!(error.message, "Invalid URL (POST /v1/\u{fffd}).");
    }

    #[test]
    fn token_unavailable_names_the_reason_or_the_wait() {
        let error = ApiError::token_unavailable(
            "west",
            Some("the identity endpoint answered 401 invalid_client (AADSTS7000215)"),
            10_000,
        );
        assert_eq!(
            (error.status, error.code, error.kind),
            (503, "token_unavailable", "server_error")
        );
        assert!(error.message.contains(
            "upstream `west`: the identity endpoint answered 401 invalid_client (AADSTS7000215)."
        ));
        let error = ApiError::token_unavailable("west", None, 2_500);
        assert!(error.message.contains("no token arrived within 2500 ms"));
    }

    #[test]
    fn method_not_allowed_carries_allow_header() {
        let error = ApiError::method_not_allowed(b"GET", "/v1/embeddings", "POST");
        assert_eq!(error.status, 405);
        assert_eq!(error.headers, vec![("allow", "POST".to_string())]);
    }

    #[test]
    fn statuses_match_the_sdk_exception_classes() {
        assert_eq!(ApiError::missing_api_key().status, 401);
        assert_eq!(ApiError::malformed_authorization().status, 401);
        assert_eq!(ApiError::invalid_json("x").status, 400);
        assert_eq!(ApiError::body_not_object().status, 400);
        assert_eq!(ApiError::missing_model().status, 400);
        assert_eq!(ApiError::model_not_string("a number").status, 400);
        assert_eq!(ApiError::duplicate_model().status, 400);
        assert_eq!(ApiError::body_too_large(10).status, 413);
        assert_eq!(ApiError::internal("x").status, 500);
        assert_eq!(ApiError::token_unavailable("west", None, 10).status, 503);
        assert_eq!(ApiError::invalid_multipart("x").status, 400);
        assert_eq!(ApiError::response_not_found("r").status, 404);
        assert_eq!(ApiError::upstream_unauthorized("west", "x").status, 401);
    }
}
