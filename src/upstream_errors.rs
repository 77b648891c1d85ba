//! Azure error answers that OpenAI SDKs would misread, put in OpenAI's
//! error shape. Only two need it: Azure's 401 for a rejected token comes in
//! another envelope (`{"statusCode","message"}`), and 404
//! `DeploymentNotFound` would show callers a deployment name. Every other
//! error (content filter included) passes through unchanged.

use crate::errors::ApiError;
use crate::json::Json;

/// Statuses whose bodies may need translating (the rest are not read).
pub fn may_translate(status: u16) -> bool {
    status == 401 || status == 404
}

/// The replacement body, and a line for the operators' log; None to pass
/// the answer through unchanged.
pub fn translate(
    status: u16,
    body: &[u8],
    alias: &str,
    upstream: &str,
) -> Option<(Vec<u8>, String)> {
    let json = Json::parse(body).ok()?;
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
        translate(status, &bytes, "gpt-4o", "west")
            .map(|(body, _)| serde_json::from_slice(&body).unwrap())
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
        assert_eq!(translate(401, b"not json", "a", "u"), None);
        assert_eq!(translated(401, &json!({"message": "no status code"})), None);
        assert!(
            may_translate(401) && may_translate(404) && !may_translate(400) && !may_translate(200)
        );
    }
}
