//! What an incoming request is, from its method and path: an OpenAI-style
//! operation (model in the body), an Azure-style one (alias in the path), a
//! stored response, or the model list.

use crate::errors::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    ChatCompletions,
    Completions,
    Embeddings,
    ImageGenerations,
    ImageEdits,
    AudioTranscriptions,
    AudioTranslations,
    AudioSpeech,
    Responses,
}

/// How the body carries `model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    Json,
    /// multipart/form-data, `model` as a form field.
    Multipart,
}

impl Operation {
    pub const ALL: [Operation; 9] = [
        Operation::ChatCompletions,
        Operation::Completions,
        Operation::Embeddings,
        Operation::ImageGenerations,
        Operation::ImageEdits,
        Operation::AudioTranscriptions,
        Operation::AudioTranslations,
        Operation::AudioSpeech,
        Operation::Responses,
    ];

    /// The operation's path, the same below `/v1/`, `/openai/v1/` and
    /// `/openai/deployments/{deployment}/`; also its key in `api_versions`.
    pub fn name(self) -> &'static str {
        match self {
            Operation::ChatCompletions => "chat/completions",
            Operation::Completions => "completions",
            Operation::Embeddings => "embeddings",
            Operation::ImageGenerations => "images/generations",
            Operation::ImageEdits => "images/edits",
            Operation::AudioTranscriptions => "audio/transcriptions",
            Operation::AudioTranslations => "audio/translations",
            Operation::AudioSpeech => "audio/speech",
            Operation::Responses => "responses",
        }
    }

    pub fn from_name(name: &str) -> Option<Operation> {
        Operation::ALL.into_iter().find(|op| op.name() == name)
    }

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn body_format(self) -> BodyFormat {
        match self {
            Operation::ImageEdits
            | Operation::AudioTranscriptions
            | Operation::AudioTranslations => BodyFormat::Multipart,
            _ => BodyFormat::Json,
        }
    }

    /// Azure serves it at the resource (`/openai/responses`), not under a
    /// deployment: the deployment goes in the body's `model`.
    pub fn resource_level(self) -> bool {
        self == Operation::Responses
    }
}

/// The part of a stored response's path after its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredTail {
    /// GET or DELETE `/responses/{id}`.
    Itself,
    /// GET `/responses/{id}/input_items`.
    InputItems,
    /// POST `/responses/{id}/cancel`.
    Cancel,
}

impl StoredTail {
    pub fn suffix(self) -> &'static str {
        match self {
            StoredTail::Itself => "",
            StoredTail::InputItems => "/input_items",
            StoredTail::Cancel => "/cancel",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// `/v1/{op}` or `/openai/v1/{op}` (and Azure's `/openai/responses`):
    /// the alias is the body's `model`.
    Model {
        op: Operation,
    },
    /// Azure-style `/openai/deployments/{alias}/{op}`.
    Deployment {
        op: Operation,
        alias: String,
    },
    /// A response stored by the Responses API.
    StoredResponse {
        id: String,
        tail: StoredTail,
        /// The Responses API parameters of the caller's query string
        /// (`include[]`, pagination, ...), re-encoded; `?`-prefixed or empty.
        query: String,
    },
    ListModels,
    GetModel {
        id: String,
    },
}

impl Inbound {
    /// Whether the request must carry a body.
    pub fn needs_body(&self) -> bool {
        matches!(self, Inbound::Model { .. } | Inbound::Deployment { .. })
    }
}

/// Classifies a request; unknown paths get 404 and known paths with another
/// method get 405. Except for a stored response's known parameters, the
/// caller's query string plays no part and is not forwarded.
pub fn classify(method: &[u8], path_and_query: &[u8]) -> Result<Inbound, ApiError> {
    let (path, query) = match path_and_query.iter().position(|&b| b == b'?') {
        Some(at) => path_and_query.split_at(at),
        None => (path_and_query, &b""[..]),
    };
    let unknown = || ApiError::unknown_url(method, path);
    let Ok(text) = std::str::from_utf8(path) else {
        return Err(unknown());
    };
    let (mut inbound, allowed) = match_path(text).ok_or_else(unknown)?;
    if !allowed.split(", ").any(|m| m.as_bytes() == method) {
        return Err(ApiError::method_not_allowed(method, text, allowed));
    }
    if let Inbound::StoredResponse { query: kept, .. } = &mut inbound {
        *kept = responses_query(query)?;
    }
    Ok(inbound)
}

/// The request a path names, and the methods it takes.
fn match_path(path: &str) -> Option<(Inbound, &'static str)> {
    // The OpenAI prefixes: /v1/ (OpenAI SDKs) and /openai/v1/ (Azure's v1 API).
    let rest = path
        .strip_prefix("/v1/")
        .or_else(|| path.strip_prefix("/openai/v1/"));
    if let Some(rest) = rest {
        return match_openai_path(rest);
    }
    let rest = path.strip_prefix("/openai/")?;
    if let Some(rest) = rest.strip_prefix("deployments/") {
        let (alias, op) = rest.split_once('/')?;
        let op = Operation::from_name(op).filter(|op| !op.resource_level())?;
        let alias = percent_decode(alias)?;
        return (!alias.is_empty()).then_some((Inbound::Deployment { op, alias }, "POST"));
    }
    // Azure's resource-level paths: /openai/responses[/...], /openai/models[/...].
    let resource_level = rest == "responses"
        || rest == "models"
        || rest.starts_with("responses/")
        || rest.starts_with("models/");
    resource_level.then(|| match_openai_path(rest)).flatten()
}

fn match_openai_path(rest: &str) -> Option<(Inbound, &'static str)> {
    if let Some(op) = Operation::from_name(rest) {
        return Some((Inbound::Model { op }, "POST"));
    }
    if rest == "models" {
        return Some((Inbound::ListModels, "GET"));
    }
    if let Some(id) = rest.strip_prefix("models/") {
        let id = percent_decode(id).filter(|id| !id.is_empty())?;
        return Some((Inbound::GetModel { id }, "GET"));
    }
    let stored = rest.strip_prefix("responses/")?;
    let (id, tail, methods) = match stored.split_once('/') {
        None => (stored, StoredTail::Itself, "GET, DELETE"),
        Some((id, "input_items")) => (id, StoredTail::InputItems, "GET"),
        Some((id, "cancel")) => (id, StoredTail::Cancel, "POST"),
        Some(_) => return None,
    };
    let id_ok = !id.is_empty()
        && id.len() <= 256
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    id_ok.then(|| {
        let inbound = Inbound::StoredResponse {
            id: id.to_string(),
            tail,
            query: String::new(),
        };
        (inbound, methods)
    })
}

/// The Responses API's query parameters on stored responses; `include[]`
/// may repeat.
const RESPONSES_PARAMETERS: [&str; 7] = [
    "include[]",
    "limit",
    "order",
    "after",
    "before",
    "stream",
    "starting_after",
];

/// The caller's query string (with its `?`) reduced to the Responses API's
/// known parameters, decoded, checked and encoded again; anything else
/// (`api-version` in any spelling, a credential, unknown parameters) is
/// dropped. A known parameter with a value outside `[A-Za-z0-9._-]`, or
/// repeated (but `include[]`), is refused: servers differ on which copy
/// they read.
fn responses_query(query: &[u8]) -> Result<String, ApiError> {
    let query = query.strip_prefix(b"?").unwrap_or(query);
    let mut kept: Vec<(&'static str, String)> = Vec::new();
    for pair in query.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
        let (key, value) = match pair.iter().position(|&b| b == b'=') {
            Some(at) => {
                let (key, rest) = pair.split_at(at);
                (key, rest.get(1..).unwrap_or_default())
            }
            None => (pair, &b""[..]),
        };
        let Some(key) = query_decode(key)
            .and_then(|k| RESPONSES_PARAMETERS.into_iter().find(|known| *known == k))
        else {
            continue;
        };
        let value = query_decode(value)
            .filter(|v| {
                !v.is_empty()
                    && v.len() <= 256
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            })
            .ok_or_else(|| ApiError::invalid_query_parameter(key))?;
        if key != "include[]" && kept.iter().any(|(k, _)| *k == key) {
            return Err(ApiError::repeated_query_parameter(key));
        }
        kept.push((key, value));
    }
    if kept.is_empty() {
        return Ok(String::new());
    }
    let pairs: Vec<String> = kept
        .iter()
        .map(|(key, value)| format!("{}={value}", key.replace('[', "%5B").replace(']', "%5D")))
        .collect();
    Ok(format!("?{}", pairs.join("&")))
}

/// A query-string key or value decoded (`%XX`, `+` as space); None when
/// malformed.
fn query_decode(bytes: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(bytes).ok()?.replace('+', " ");
    percent_decode(&text)
}

/// `%XX` escapes decoded; None for a bad escape or non-UTF-8 result.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(path: &str) -> Result<Inbound, ApiError> {
        classify(b"POST", path.as_bytes())
    }

    #[test]
    fn openai_paths_for_every_operation() {
        for op in Operation::ALL {
            assert_eq!(
                post(&format!("/v1/{}", op.name())),
                Ok(Inbound::Model { op })
            );
            assert_eq!(
                post(&format!("/openai/v1/{}", op.name())),
                Ok(Inbound::Model { op })
            );
        }
        assert_eq!(
            post("/v1/chat/completions?api-version=1&x=y"),
            Ok(Inbound::Model {
                op: Operation::ChatCompletions
            })
        );
    }

    #[test]
    fn azure_deployment_paths() {
        assert_eq!(
            post("/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"),
            Ok(Inbound::Deployment {
                op: Operation::ChatCompletions,
                alias: "gpt-4o".into()
            })
        );
        assert_eq!(
            post("/openai/deployments/whisper/audio/transcriptions"),
            Ok(Inbound::Deployment {
                op: Operation::AudioTranscriptions,
                alias: "whisper".into()
            })
        );
        assert_eq!(
            post("/openai/deployments/my%20model/embeddings"),
            Ok(Inbound::Deployment {
                op: Operation::Embeddings,
                alias: "my model".into()
            })
        );
        // Responses live at the resource, not under a deployment.
        assert_eq!(
            post("/openai/deployments/gpt-4o/responses")
                .unwrap_err()
                .status,
            404
        );
        assert_eq!(
            post("/openai/deployments//chat/completions")
                .unwrap_err()
                .status,
            404
        );
        assert_eq!(post("/openai/deployments/gpt-4o").unwrap_err().status, 404);
        assert_eq!(
            post("/openai/responses?api-version=2025-04-01-preview"),
            Ok(Inbound::Model {
                op: Operation::Responses
            })
        );
    }

    #[test]
    fn stored_responses() {
        let get = classify(
            b"GET",
            b"/v1/responses/resp_abc-1?include[]=x&api-version=1",
        )
        .unwrap();
        assert_eq!(
            get,
            Inbound::StoredResponse {
                id: "resp_abc-1".into(),
                tail: StoredTail::Itself,
                query: "?include%5B%5D=x".into()
            }
        );
        assert!(classify(b"DELETE", b"/openai/responses/resp_1").is_ok());
        assert!(matches!(
            classify(b"GET", b"/openai/v1/responses/resp_1/input_items?limit=2"),
            Ok(Inbound::StoredResponse { tail: StoredTail::InputItems, ref query, .. }) if query == "?limit=2"
        ));
        assert!(matches!(
            post("/v1/responses/resp_1/cancel"),
            Ok(Inbound::StoredResponse {
                tail: StoredTail::Cancel,
                ..
            })
        ));
        let error = classify(b"PUT", b"/v1/responses/resp_1").unwrap_err();
        assert_eq!(error.status, 405);
        assert_eq!(error.headers, vec![("allow", "GET, DELETE".to_string())]);
        assert_eq!(
            classify(b"GET", b"/v1/responses/../x").unwrap_err().status,
            404
        );
        assert_eq!(
            classify(b"GET", b"/v1/responses/resp_1/other")
                .unwrap_err()
                .status,
            404
        );
        assert_eq!(classify(b"GET", b"/v1/responses/").unwrap_err().status, 404);
        // Response ids are capped at 256 characters.
        let longest = format!("/v1/responses/{}", "r".repeat(256));
        assert!(classify(b"GET", longest.as_bytes()).is_ok());
        let too_long = format!("/v1/responses/{}", "r".repeat(257));
        assert_eq!(
            classify(b"GET", too_long.as_bytes()).unwrap_err().status,
            404
        );
    }

    fn stored_query(query: &str) -> Result<String, ApiError> {
        let path = format!("/v1/responses/resp_1/input_items?{query}");
        match classify(b"GET", path.as_bytes())? {
            Inbound::StoredResponse { query, .. } => Ok(query),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn stored_response_queries_keep_only_known_parameters() {
        assert_eq!(
            stored_query("include%5B%5D=file_search_call.results&include[]=message.input_image.image_url&limit=20&order=desc&after=msg_1&before=msg_9").unwrap(),
            "?include%5B%5D=file_search_call.results&include%5B%5D=message.input_image.image_url&limit=20&order=desc&after=msg_1&before=msg_9"
        );
        assert_eq!(
            stored_query("stream=true&starting_after=3").unwrap(),
            "?stream=true&starting_after=3"
        );
        // Credentials and api-versions in any spelling never go upstream.
        for dropped in [
            "api-key=sk-caller",
            "api-version=2024-10-21",
            "Api-Version=1",
            "API-VERSION=1",
            "api%2Dversion=1",
            "api-version",
            "key=sk-caller",
            "Limit=5",
            "include=x",
            "%zz=1",
            "&&",
        ] {
            assert_eq!(stored_query(dropped).unwrap(), "", "{dropped}");
        }
        assert_eq!(
            stored_query("api-key=sk-caller&limit=2&subscription-key=x").unwrap(),
            "?limit=2"
        );
    }

    #[test]
    fn stored_response_query_values_are_checked() {
        for (query, code) in [
            ("limit=1&limit=2", "invalid_request_error"),
            ("order=asc&order=desc", "invalid_request_error"),
            ("limit=", "invalid_request_error"),
            ("after=a%26api-version%3D1", "invalid_request_error"),
            ("after=a%20b", "invalid_request_error"),
            ("after=a+b", "invalid_request_error"),
            ("include%5B%5D=%ff", "invalid_request_error"),
            ("limit=%zz", "invalid_request_error"),
        ] {
            let error = stored_query(query).unwrap_err();
            assert_eq!((error.status, error.kind), (400, code), "{query}");
        }
        let long = format!("after={}", "a".repeat(257));
        assert!(stored_query(&long).is_err());
        let longest = format!("after={}", "a".repeat(256));
        assert!(stored_query(&longest).is_ok());
    }

    #[test]
    fn models() {
        assert_eq!(classify(b"GET", b"/v1/models"), Ok(Inbound::ListModels));
        assert_eq!(
            classify(b"GET", b"/openai/models?api-version=x"),
            Ok(Inbound::ListModels)
        );
        assert_eq!(
            classify(b"GET", b"/v1/models/meta%2Fllama-3"),
            Ok(Inbound::GetModel {
                id: "meta/llama-3".into()
            })
        );
        assert_eq!(
            classify(b"GET", b"/v1/models/org/model"),
            Ok(Inbound::GetModel {
                id: "org/model".into()
            })
        );
        assert_eq!(classify(b"POST", b"/v1/models").unwrap_err().status, 405);
        assert_eq!(classify(b"GET", b"/v1/models/%zz").unwrap_err().status, 404);
    }

    #[test]
    fn body_formats() {
        assert_eq!(Operation::ChatCompletions.body_format(), BodyFormat::Json);
        assert_eq!(Operation::AudioSpeech.body_format(), BodyFormat::Json);
        assert_eq!(
            Operation::AudioTranscriptions.body_format(),
            BodyFormat::Multipart
        );
        assert_eq!(
            Operation::AudioTranslations.body_format(),
            BodyFormat::Multipart
        );
        assert_eq!(Operation::ImageEdits.body_format(), BodyFormat::Multipart);
        assert_eq!(
            Operation::from_name("images/generations"),
            Some(Operation::ImageGenerations)
        );
        assert_eq!(Operation::from_name("chat"), None);
    }

    #[test]
    fn unknown_paths_are_404() {
        for path in [
            &b"/v1/chat/completions/"[..],
            b"/v1/chat",
            b"/chat/completions",
            b"/v1/CHAT/completions",
            b"/v1/chat%2Fcompletions",
            b"/v1/assistants",
            b"/openai/files",
            b"/openai/chat/completions",
            b"/",
            b"",
            b"/v1/\xff",
        ] {
            let error = classify(b"POST", path).unwrap_err();
            assert_eq!(error.status, 404, "{path:?}");
            assert_eq!(error.code, "unknown_url");
        }
    }

    #[test]
    fn wrong_method_is_405_with_allow() {
        let error = classify(b"GET", b"/v1/chat/completions").unwrap_err();
        assert_eq!(error.status, 405);
        assert_eq!(error.headers, vec![("allow", "POST".to_string())]);
        assert_eq!(
            error.message,
            "Method GET is not allowed on /v1/chat/completions; use POST."
        );
        assert_eq!(
            classify(b"post", b"/v1/embeddings").unwrap_err().status,
            405
        );
    }

    #[test]
    fn needs_body() {
        assert!(post("/v1/embeddings").unwrap().needs_body());
        assert!(!classify(b"GET", b"/v1/models").unwrap().needs_body());
        assert!(!classify(b"GET", b"/v1/responses/r").unwrap().needs_body());
    }
}
