use super::*;
use crate::headers::Header;
use crate::routes::StoredTail;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::borrow::Cow;

/// `plan` for a single-target world.
fn plan(config: &Config, admitted: Admitted) -> Result<Plan<'_>, ApiError> {
    super::plan(config, admitted, &mut FirstTarget)
}

fn hash(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// west: deployments API (GA default); east: deployments API on a preview
/// version; v1: Azure's v1 API; vllm: an OpenAI-compatible server.
fn config() -> Config {
    let json = json!({
        "max_request_body_bytes": 1000,
        "responses_upstream": "east",
        "upstreams": {
            "west": {
                "endpoint": "https://acme-west.openai.azure.com",
                "cluster": "azure_west",
                "auth": { "api_key": { "value": "west-secret" } }
            },
            "east": {
                "endpoint": "http://127.0.0.1:8081",
                "cluster": "azure_east",
                "api_version": "2025-04-01-preview",
                "auth": { "api_key": { "value": "east-secret" } }
            },
            "v1": {
                "endpoint": "acme-v1",
                "cluster": "azure_v1",
                "api": "v1",
                "auth": { "api_key": { "value": "v1-secret" } }
            },
            "vllm": {
                "kind": "openai",
                "endpoint": "http://vllm.internal:8000/v1",
                "cluster": "vllm",
                "auth": { "bearer": { "value": "vllm-token" } }
            }
        },
        "models": {
            "gpt-4o": { "upstream": "west", "deployment": "gpt4o-prod" },
            "gpt-4o-mini": { "upstream": "east", "deployment": "mini" },
            "text-embedding-3-small": { "upstream": "west", "deployment": "embed-prod" },
            "whisper": { "upstream": "west", "deployment": "whisper-prod" },
            "gpt-4.1": { "upstream": "v1", "deployment": "gpt41-prod" },
            "llama": { "upstream": "vllm", "deployment": "meta-llama/Llama-3.1-8B-Instruct" }
        },
        "callers": [
            { "name": "team-a", "key_sha256": hash("key-a"), "models": ["gpt-4o", "gpt-4o-mini"] },
            { "name": "ops", "key_sha256": hash("key-ops"), "models": ["*"] }
        ]
    });
    Config::from_json(json.to_string().as_bytes(), &|_| None).unwrap()
}

fn head<'a>(method: &'a str, path: &'a str, authorization: Option<&'a str>) -> RequestHead<'a> {
    RequestHead {
        method: method.as_bytes(),
        path: path.as_bytes(),
        authorization: authorization.map(str::as_bytes),
        api_key: None,
        api_key_repeated: false,
        content_length: None,
        has_body: method == "POST",
    }
}

fn admitted_as(config: &Config, method: &str, path: &str, key: &str) -> Admitted {
    let bearer = format!("Bearer {key}");
    admit(config, &head(method, path, Some(&bearer))).unwrap()
}

fn admitted(config: &Config, path: &str, key: &str) -> Admitted {
    admitted_as(config, "POST", path, key)
}

/// Plan, then (if needed) route on `body` as the host would.
fn route<'c>(
    config: &'c Config,
    admitted: &Admitted,
    body: &[u8],
    content_type: &str,
) -> Result<Forward<'c>, ApiError> {
    match plan(config, admitted.clone())? {
        Plan::ReadBody(pending) => {
            let mut reader = BodyReader::new(pending.op, &[content_type.as_bytes()])?;
            let mut source: &[u8] = body;
            let forward = read_body(
                config,
                &pending,
                &mut reader,
                &mut source,
                true,
                &mut FirstTarget,
            )?;
            Ok(forward.expect("a complete body is routed"))
        }
        Plan::Forward(forward) => Ok(forward),
        Plan::Answer(..) => panic!("answered"),
    }
}

fn route_json<'c>(
    config: &'c Config,
    path: &str,
    key: &str,
    body: &Value,
) -> Result<Forward<'c>, ApiError> {
    let a = admitted(config, path, key);
    route(config, &a, body.to_string().as_bytes(), "application/json")
}

fn apply(body: &[u8], forward: &Forward<'_>) -> Vec<u8> {
    match &forward.body_edit {
        None => body.to_vec(),
        Some(edit) => {
            let mut out = edit.with.clone();
            out.extend_from_slice(&body[edit.replace..]);
            out
        }
    }
}

fn answer(config: &Config, method: &str, path: &str, key: &str) -> Result<(u16, Value), ApiError> {
    match plan(config, admitted_as(config, method, path, key))? {
        Plan::Answer(status, body) => Ok((status, serde_json::from_slice(&body).unwrap())),
        other => panic!("not answered: {other:?}"),
    }
}

// ------------------------------------------------------------- admission

#[test]
fn admits_a_known_caller_on_a_known_route() {
    let config = config();
    let a = admitted(&config, "/v1/chat/completions", "key-a");
    assert_eq!(
        a,
        Admitted {
            caller: 0,
            inbound: Inbound::Model {
                op: Operation::ChatCompletions
            }
        }
    );
    let ops = admit(
        &config,
        &RequestHead {
            api_key: Some(b"key-ops"),
            ..head("POST", "/v1/embeddings", None)
        },
    )
    .unwrap();
    assert_eq!(ops.caller, 1);
}

#[test]
fn route_is_checked_before_the_key() {
    let config = config();
    assert_eq!(
        admit(&config, &head("POST", "/v1/nope", None))
            .unwrap_err()
            .status,
        404
    );
    assert_eq!(
        admit(&config, &head("GET", "/v1/chat/completions", None))
            .unwrap_err()
            .status,
        405
    );
}

#[test]
fn refuses_missing_and_wrong_keys() {
    let config = config();
    let error = admit(&config, &head("POST", "/v1/chat/completions", None)).unwrap_err();
    assert_eq!((error.status, error.code), (401, "missing_api_key"));
    let error = admit(
        &config,
        &head("POST", "/v1/chat/completions", Some("Bearer key-x")),
    )
    .unwrap_err();
    assert_eq!((error.status, error.code), (401, "invalid_api_key"));
    // The hash itself is not a key.
    let bearer = format!("Bearer {}", hash("key-a"));
    let error = admit(
        &config,
        &head("POST", "/v1/chat/completions", Some(&bearer)),
    )
    .unwrap_err();
    assert_eq!(error.status, 401);
    // The model list needs a key too.
    assert_eq!(
        admit(&config, &head("GET", "/v1/models", None))
            .unwrap_err()
            .status,
        401
    );
}

#[test]
fn declared_body_size_over_the_limit_is_413_before_reading() {
    let config = config();
    let mut request = head("POST", "/v1/chat/completions", Some("Bearer key-a"));
    request.content_length = Some(b"1001");
    assert_eq!(admit(&config, &request).unwrap_err().status, 413);
    request.content_length = Some(b"99999999999999999999999");
    assert_eq!(admit(&config, &request).unwrap_err().status, 413);
    request.content_length = Some(b"1000");
    assert!(admit(&config, &request).is_ok());
}

#[test]
fn key_is_checked_before_the_declared_size() {
    let config = config();
    let mut request = head("POST", "/v1/chat/completions", None);
    request.content_length = Some(b"5000");
    assert_eq!(admit(&config, &request).unwrap_err().status, 401);
}

#[test]
fn request_without_body_is_400_where_a_body_is_needed() {
    let config = config();
    let request = RequestHead {
        has_body: false,
        ..head("POST", "/v1/chat/completions", Some("Bearer key-a"))
    };
    let error = admit(&config, &request).unwrap_err();
    assert_eq!((error.status, error.code), (400, "invalid_json"));
    let get = head("GET", "/v1/responses/resp_1", Some("Bearer key-a"));
    assert!(admit(&config, &get).is_ok());
}

#[test]
fn received_body_size_is_checked() {
    let config = config();
    assert!(check_body_size(&config, 1000).is_ok());
    assert_eq!(check_body_size(&config, 1001).unwrap_err().status, 413);
}

#[test]
fn repeated_api_key_is_refused() {
    let config = config();
    let headers: Vec<Header> = vec![
        (b":method", b"POST"),
        (b":path", b"/v1/embeddings"),
        (b"api-key", b"key-a"),
        (b"api-key", b"key-ops"),
    ];
    let head = RequestHead::from_headers(&headers, true);
    assert!(head.api_key_repeated);
    let error = admit(&config, &head).unwrap_err();
    assert_eq!((error.status, error.code), (401, "invalid_api_key"));
}

#[test]
fn head_is_read_from_the_header_map() {
    let headers: Vec<Header> = vec![
        (b":method", b"POST"),
        (b":path", b"/v1/embeddings"),
        (b"authorization", b"Bearer key-a"),
        (b"content-length", b"12"),
    ];
    let head = RequestHead::from_headers(&headers, true);
    assert_eq!(head.method, b"POST");
    assert_eq!(head.path, b"/v1/embeddings");
    assert_eq!(head.authorization, Some(&b"Bearer key-a"[..]));
    assert_eq!(head.api_key, None);
    assert!(!head.api_key_repeated);
    assert_eq!(head.content_length, Some(&b"12"[..]));
}

// ------------------------------------------------------------- routing

#[test]
fn deployments_api_paths_for_json_operations() {
    let config = config();
    for (op, version) in [
        ("chat/completions", "2024-10-21"),
        ("completions", "2024-10-21"),
        ("embeddings", "2024-10-21"),
        ("images/generations", "2024-10-21"),
        ("audio/speech", "2025-04-01-preview"),
    ] {
        let body = json!({ "model": "gpt-4o", "input": "x" });
        let forward = route_json(&config, &format!("/v1/{op}"), "key-ops", &body).unwrap();
        assert_eq!(
            forward.path,
            format!("/openai/deployments/gpt4o-prod/{op}?api-version={version}")
        );
        assert_eq!(forward.upstream.name, "west");
        assert_eq!(
            forward.body_edit, None,
            "{op}: the body goes through untouched"
        );
        assert_eq!(forward.model.map(|m| m.alias.as_str()), Some("gpt-4o"));
    }
    let forward = route_json(
        &config,
        "/v1/chat/completions",
        "key-a",
        &json!({"model": "gpt-4o-mini"}),
    )
    .unwrap();
    assert_eq!(
        forward.path,
        "/openai/deployments/mini/chat/completions?api-version=2025-04-01-preview"
    );
    assert_eq!(forward.upstream.name, "east");
}

#[test]
fn responses_go_to_the_resource_with_the_deployment_in_the_body() {
    let config = config();
    let body = json!({ "input": "hi", "model": "gpt-4o" });
    let forward = route_json(&config, "/v1/responses", "key-ops", &body).unwrap();
    assert_eq!(
        forward.path,
        "/openai/responses?api-version=2025-04-01-preview"
    );
    let sent: Value =
        serde_json::from_slice(&apply(body.to_string().as_bytes(), &forward)).unwrap();
    assert_eq!(sent, json!({ "input": "hi", "model": "gpt4o-prod" }));
    // Azure-style callers reach it too.
    let forward = route_json(
        &config,
        "/openai/responses?api-version=2025-01-01",
        "key-ops",
        &body,
    )
    .unwrap();
    assert_eq!(
        forward.path,
        "/openai/responses?api-version=2025-04-01-preview"
    );
}

#[test]
fn azure_v1_api_puts_the_deployment_in_the_body() {
    let config = config();
    let body = json!({ "messages": [], "model": "gpt-4.1" });
    let forward = route_json(&config, "/v1/chat/completions", "key-ops", &body).unwrap();
    assert_eq!(forward.path, "/openai/v1/chat/completions");
    assert_eq!(forward.upstream.authority, "acme-v1.openai.azure.com");
    let sent: Value =
        serde_json::from_slice(&apply(body.to_string().as_bytes(), &forward)).unwrap();
    assert_eq!(sent["model"], "gpt41-prod");
}

#[test]
fn openai_compatible_upstreams_get_their_model_name_and_base_path() {
    let config = config();
    let body = json!({ "model": "llama", "messages": [] });
    let forward = route_json(&config, "/v1/chat/completions", "key-ops", &body).unwrap();
    assert_eq!(forward.path, "/v1/chat/completions");
    assert_eq!(forward.upstream.authority, "vllm.internal:8000");
    let sent: Value =
        serde_json::from_slice(&apply(body.to_string().as_bytes(), &forward)).unwrap();
    assert_eq!(sent["model"], "meta-llama/Llama-3.1-8B-Instruct");
    assert!(!forward.upstream.is_azure());
}

fn form(model: Option<&str>) -> Vec<u8> {
    let mut body = Vec::new();
    if let Some(model) = model {
        body.extend_from_slice(b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n");
        body.extend_from_slice(model.as_bytes());
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.mp3\"\r\n\r\n\x00\x01\xff\r\n--XyZ--\r\n");
    body
}

#[test]
fn multipart_operations_route_on_the_form_field() {
    let config = config();
    let a = admitted(&config, "/v1/audio/transcriptions", "key-ops");
    let forward = route(
        &config,
        &a,
        &form(Some("whisper")),
        "multipart/form-data; boundary=XyZ",
    )
    .unwrap();
    assert_eq!(
        forward.path,
        "/openai/deployments/whisper-prod/audio/transcriptions?api-version=2024-10-21"
    );
    assert_eq!(forward.body_edit, None);

    let a = admitted(&config, "/v1/audio/translations", "key-ops");
    let forward = route(
        &config,
        &a,
        &form(Some("gpt-4.1")),
        "multipart/form-data; boundary=\"XyZ\"",
    )
    .unwrap();
    assert_eq!(forward.path, "/openai/v1/audio/translations");
    let sent = apply(&form(Some("gpt-4.1")), &forward);
    assert_eq!(sent, form(Some("gpt41-prod")));

    let a = admitted(&config, "/v1/images/edits", "key-ops");
    let forward = route(
        &config,
        &a,
        &form(Some("gpt-4o")),
        "multipart/form-data; boundary=XyZ",
    )
    .unwrap();
    assert_eq!(
        forward.path,
        "/openai/deployments/gpt4o-prod/images/edits?api-version=2025-04-01-preview"
    );
}

#[test]
fn multipart_refusals() {
    let config = config();
    let a = admitted(&config, "/v1/audio/transcriptions", "key-a");
    let error = route(
        &config,
        &a,
        &form(Some("whisper")),
        "multipart/form-data; boundary=XyZ",
    )
    .unwrap_err();
    assert_eq!((error.status, error.code), (404, "model_not_found"));
    let error = route(
        &config,
        &a,
        &form(None),
        "multipart/form-data; boundary=XyZ",
    )
    .unwrap_err();
    assert_eq!((error.status, error.code), (400, "invalid_multipart"));
    let error = route(&config, &a, &form(Some("gpt-4o")), "application/json").unwrap_err();
    assert_eq!((error.status, error.code), (400, "invalid_multipart"));
    let error = route(
        &config,
        &a,
        &form(Some("gpt-4o"))[..40],
        "multipart/form-data; boundary=XyZ",
    )
    .unwrap_err();
    assert_eq!((error.status, error.code), (400, "invalid_multipart"));
}

/// Feeds `body` to `read_body` as Envoy would, one growing prefix at a
/// time, and returns what each call answered (the last with `complete`).
fn read_form_in_pieces<'c>(
    config: &'c Config,
    key: &str,
    body: &[u8],
    piece: usize,
) -> Vec<Result<Option<Forward<'c>>, ApiError>> {
    let a = admitted(config, "/v1/audio/transcriptions", key);
    let Plan::ReadBody(pending) = plan(config, a).unwrap() else {
        panic!("a form is read");
    };
    let mut reader = BodyReader::new(pending.op, &[b"multipart/form-data; boundary=XyZ"]).unwrap();
    let mut answers = Vec::new();
    let mut end = 0;
    while end < body.len() {
        end = (end + piece).min(body.len());
        let mut source: &[u8] = &body[..end];
        let answer = read_body(
            config,
            &pending,
            &mut reader,
            &mut source,
            end == body.len(),
            &mut FirstTarget,
        );
        let stop = !matches!(answer, Ok(None));
        answers.push(answer);
        if stop {
            break;
        }
    }
    answers
}

/// A form whose `model` follows the file: the filter waits for more body
/// rather than calling the form model-less before it is whole.
fn form_with_the_model_last(model: &str) -> Vec<u8> {
    let mut body =
        b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.mp3\"\r\n\r\n"
            .to_vec();
    body.extend_from_slice(&[7u8; 64]);
    body.extend_from_slice(b"\r\n--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n");
    body.extend_from_slice(model.as_bytes());
    body.extend_from_slice(b"\r\n--XyZ--\r\n");
    body
}

#[test]
fn a_form_still_arriving_waits_for_its_model_field() {
    let config = config();
    let body = form_with_the_model_last("whisper");
    let answers = read_form_in_pieces(&config, "key-ops", &body, 16);
    let (last, waiting) = answers.split_last().unwrap();
    assert_eq!(answers.len(), body.len().div_ceil(16));
    assert!(waiting.iter().all(|answer| matches!(answer, Ok(None))));
    let forward = last.as_ref().unwrap().as_ref().unwrap();
    assert_eq!(
        forward.path,
        "/openai/deployments/whisper-prod/audio/transcriptions?api-version=2024-10-21"
    );
}

#[test]
fn a_form_is_refused_as_soon_as_its_model_is_known_to_be_forbidden() {
    let config = config();
    let mut body = form(Some("whisper"));
    // A large upload after the model field: the refusal comes before it.
    body.splice(body.len() - 12..body.len() - 12, [0u8; 4096]);
    let answers = read_form_in_pieces(&config, "key-a", &body, 128);
    let error = answers.last().unwrap().as_ref().unwrap_err();
    assert_eq!((error.status, error.code), (404, "model_not_found"));
    assert!(answers.len() < body.len() / 128, "refused only at the end");
}

#[test]
fn azure_style_paths_use_the_alias_in_the_path() {
    let config = config();
    // Deployments API: forwarded on the headers, the body untouched...
    let a = admitted(
        &config,
        "/openai/deployments/text-embedding-3-small/embeddings?api-version=2023-05-15",
        "key-ops",
    );
    let Plan::Forward(forward) = plan(&config, a).unwrap() else {
        panic!("not forwarded at once")
    };
    assert_eq!(
        forward.path,
        "/openai/deployments/embed-prod/embeddings?api-version=2024-10-21"
    );
    // ...but for chat, whose stream may have to be asked for its usage.
    let a = admitted(
        &config,
        "/openai/deployments/gpt-4o/chat/completions?api-version=2023-05-15",
        "key-a",
    );
    assert!(matches!(
        plan(&config, a.clone()).unwrap(),
        Plan::ReadBody(_)
    ));
    let body = br#"{"messages":[]}"#;
    let forward = route(&config, &a, body, "application/json").unwrap();
    assert_eq!(
        forward.path,
        "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
    );
    assert_eq!(
        (forward.body_edit.is_none(), forward.strip_usage),
        (true, false)
    );
    let body = br#"{"messages":[],"stream":true}"#;
    let forward = route(&config, &a, body, "application/json").unwrap();
    assert!(forward.strip_usage);
    let sent: Value = serde_json::from_slice(&apply(body, &forward)).unwrap();
    assert_eq!(sent["stream_options"], json!({"include_usage": true}));
    assert_eq!(
        sent.get("model"),
        None,
        "the deployments API reads the path"
    );
    // The allowlist still applies.
    let a = admitted(
        &config,
        "/openai/deployments/text-embedding-3-small/embeddings",
        "key-a",
    );
    assert_eq!(plan(&config, a).unwrap_err().code, "model_not_found");
    // v1 API: the body's model becomes the deployment, added when missing.
    let a = admitted(
        &config,
        "/openai/deployments/gpt-4.1/chat/completions",
        "key-ops",
    );
    let body = br#"{"messages":[]}"#;
    let forward = route(&config, &a, body, "application/json").unwrap();
    assert_eq!(forward.path, "/openai/v1/chat/completions");
    let sent: Value = serde_json::from_slice(&apply(body, &forward)).unwrap();
    assert_eq!(sent, json!({ "model": "gpt41-prod", "messages": [] }));
    let body = br#"{"model":"gpt-4.1","messages":[]}"#;
    let sent: Value = serde_json::from_slice(&apply(
        body,
        &route(&config, &a, body, "application/json").unwrap(),
    ))
    .unwrap();
    assert_eq!(sent["model"], "gpt41-prod");
}

#[test]
fn unknown_and_forbidden_models_get_the_same_answer() {
    let config = config();
    let forbidden = route_json(
        &config,
        "/v1/embeddings",
        "key-a",
        &json!({"model": "text-embedding-3-small"}),
    )
    .unwrap_err();
    let unknown = route_json(
        &config,
        "/v1/embeddings",
        "key-a",
        &json!({"model": "text-embedding-3-large"}),
    )
    .unwrap_err();
    assert_eq!(forbidden.status, 404);
    assert_eq!(forbidden.code, "model_not_found");
    assert_eq!(
        forbidden.message.replace("text-embedding-3-small", "X"),
        unknown.message.replace("text-embedding-3-large", "X")
    );
    assert!(route_json(
        &config,
        "/v1/embeddings",
        "key-ops",
        &json!({"model": "text-embedding-3-small"})
    )
    .is_ok());
}

#[test]
fn alias_match_is_exact() {
    let config = config();
    for alias in ["GPT-4o", "gpt-4o ", " gpt-4o", "gpt4o-prod", ""] {
        let error = route_json(
            &config,
            "/v1/chat/completions",
            "key-ops",
            &json!({ "model": alias }),
        )
        .unwrap_err();
        assert_eq!(error.status, 404, "{alias:?}");
    }
}

#[test]
fn body_errors_surface_as_400() {
    let config = config();
    let a = admitted(&config, "/v1/chat/completions", "key-a");
    for body in [
        &b"not json"[..],
        b"[]",
        b"{}",
        br#"{"model":4}"#,
        br#"{"model":"gpt-4o","model":"x"}"#,
    ] {
        assert_eq!(
            route(&config, &a, body, "application/json")
                .unwrap_err()
                .status,
            400,
            "{body:?}"
        );
    }
}

// ------------------------------------------------------------- stored responses and models

#[test]
fn stored_responses_go_to_the_responses_upstream() {
    let config = config();
    let a = admitted_as(
        &config,
        "GET",
        "/v1/responses/resp_123/input_items?limit=5&api-version=x",
        "key-a",
    );
    let Plan::Forward(forward) = plan(&config, a).unwrap() else {
        panic!()
    };
    assert_eq!(forward.upstream.name, "east");
    assert_eq!(
        forward.path,
        "/openai/responses/resp_123/input_items?limit=5&api-version=2025-04-01-preview"
    );
    assert!(forward.model.is_none());
    let a = admitted_as(&config, "DELETE", "/v1/responses/resp_123", "key-a");
    let Plan::Forward(forward) = plan(&config, a).unwrap() else {
        panic!()
    };
    assert_eq!(
        forward.path,
        "/openai/responses/resp_123?api-version=2025-04-01-preview"
    );
}

#[test]
fn stored_responses_need_a_model_on_that_upstream() {
    let json = json!({
        "upstreams": {
            "a": { "endpoint": "acme-a", "cluster": "a", "auth": { "api_key": { "value": "k" } } },
            "b": { "endpoint": "acme-b", "cluster": "b", "api": "v1", "auth": { "api_key": { "value": "k" } } }
        },
        "responses_upstream": "b",
        "models": {
            "m-a": { "upstream": "a", "deployment": "d" },
            "m-b": { "upstream": "b", "deployment": "d" }
        },
        "callers": [
            { "name": "only-a", "key_sha256": hash("key-1"), "models": ["m-a"] },
            { "name": "has-b", "key_sha256": hash("key-2"), "models": ["m-b"] }
        ]
    });
    let config = Config::from_json(json.to_string().as_bytes(), &|_| None).unwrap();
    let a = admitted_as(&config, "GET", "/v1/responses/resp_1", "key-1");
    assert_eq!(plan(&config, a).unwrap_err().code, "not_found");
    let a = admitted_as(&config, "GET", "/v1/responses/resp_1", "key-2");
    let Plan::Forward(forward) = plan(&config, a).unwrap() else {
        panic!()
    };
    assert_eq!(forward.path, "/openai/v1/responses/resp_1");
}

#[test]
fn model_list_is_the_callers_own() {
    let config = config();
    let (status, list) = answer(&config, "GET", "/v1/models", "key-a").unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        list,
        json!({"object": "list", "data": [
            {"id": "gpt-4o", "object": "model", "created": 0, "owned_by": "azure-openai-filter"},
            {"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "azure-openai-filter"}
        ]})
    );
    let (_, all) = answer(&config, "GET", "/openai/models", "key-ops").unwrap();
    assert_eq!(all["data"].as_array().unwrap().len(), config.models.len());
    assert!(
        !all.to_string().contains("gpt4o-prod"),
        "deployments never show"
    );

    let (_, one) = answer(&config, "GET", "/v1/models/gpt-4o", "key-a").unwrap();
    assert_eq!(one["id"], "gpt-4o");
    let error = answer(&config, "GET", "/v1/models/text-embedding-3-small", "key-a").unwrap_err();
    assert_eq!((error.status, error.code), (404, "model_not_found"));
}

// ------------------------------------------------------------- header edits

fn set<'a>(name: &'a str, value: &'a [u8]) -> HeaderEdit<'a> {
    HeaderEdit::Set(Cow::Borrowed(name), Cow::Borrowed(value))
}

#[test]
fn header_edits_swap_credentials_and_route() {
    let config = config();
    let forward = route_json(
        &config,
        "/v1/chat/completions",
        "key-a",
        &json!({"model": "gpt-4o"}),
    )
    .unwrap();
    let caller: Vec<Header> = vec![
        (b":method", b"POST"),
        (b":path", b"/v1/chat/completions?x=1"),
        (b"authorization", b"Bearer key-a"),
        (b"api-key", b"key-a"),
        (b"x-azure-openai-cluster", b"azure_east"),
    ];
    assert_eq!(
        forward.header_edits(&config, &caller, None),
        vec![
            // The caller's api-key is overwritten by the upstream's.
            HeaderEdit::Remove("authorization".into()),
            set(":authority", b"acme-west.openai.azure.com"),
            set(
                ":path",
                b"/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
            ),
            set("x-azure-openai-cluster", b"azure_west"),
            set("accept-encoding", b"identity"),
            set("api-key", b"west-secret"),
        ]
    );
}

#[test]
fn header_edits_remove_only_what_the_caller_sent() {
    let config = config();
    let forward = route_json(
        &config,
        "/v1/chat/completions",
        "key-a",
        &json!({"model": "gpt-4o-mini"}),
    )
    .unwrap();
    // The caller sent only the header the upstream's credential overwrites:
    // nothing to remove.
    let caller: Vec<Header> = vec![(b"api-key", b"key-a")];
    let edits = forward.header_edits(&config, &caller, None);
    assert!(
        !edits.iter().any(|e| matches!(e, HeaderEdit::Remove(_))),
        "{edits:?}"
    );
    assert_eq!(edits.last(), Some(&set("api-key", b"east-secret")));
    // Authorization, sent, is removed; api-key is overwritten, not removed.
    let caller: Vec<Header> = vec![(b"authorization", b"Bearer key-a")];
    let edits = forward.header_edits(&config, &caller, None);
    assert_eq!(edits[0], HeaderEdit::Remove("authorization".into()));
    assert!(!edits.contains(&HeaderEdit::Remove("api-key".into())));
    assert_eq!(forward.token_credential(), None);
}

#[test]
fn bearer_upstreams_and_content_length_after_a_body_edit() {
    let config = config();
    let body = json!({ "model": "llama", "messages": [] }).to_string();
    let a = admitted(&config, "/v1/chat/completions", "key-ops");
    let forward = route(&config, &a, body.as_bytes(), "application/json").unwrap();
    let length = body.len().to_string();
    let caller: Vec<Header> = vec![
        (b"authorization", b"Bearer key-ops"),
        (b"content-length", length.as_bytes()),
    ];
    let edits = forward.header_edits(&config, &caller, None);
    let new_length = apply(body.as_bytes(), &forward).len().to_string();
    assert!(
        edits.contains(&set("content-length", new_length.as_bytes())),
        "{edits:?}"
    );
    assert_eq!(
        edits.last(),
        Some(&set("authorization", b"Bearer vllm-token"))
    );
    assert!(!edits.contains(&HeaderEdit::Remove("authorization".into())));
    // Without content-length (a chunked body) none is added.
    let edits = forward.header_edits(&config, &caller[..1], None);
    assert!(!edits
        .iter()
        .any(|e| matches!(e, HeaderEdit::Set(n, _) if n == "content-length")));
}

fn token_config() -> Config {
    let json = json!({
        "upstreams": {
            "west": {
                "endpoint": "https://acme-west.openai.azure.com",
                "cluster": "azure_west",
                "auth": { "entra": {
                    "tenant_id": "contoso.onmicrosoft.com",
                    "client_id": "11111111-2222-3333-4444-555555555555",
                    "client_secret": { "value": "s3cret" },
                    "token_cluster": "entra"
                } }
            }
        },
        "models": { "gpt-4o": { "upstream": "west", "deployment": "gpt4o-prod" } },
        "callers": [ { "name": "team-a", "key_sha256": hash("key-a"), "models": ["*"] } ]
    });
    Config::from_json(json.to_string().as_bytes(), &|_| None).unwrap()
}

#[test]
fn token_upstreams_get_a_bearer_and_never_the_callers_authorization() {
    let config = token_config();
    let forward = route_json(
        &config,
        "/v1/chat/completions",
        "key-a",
        &json!({"model": "gpt-4o"}),
    )
    .unwrap();
    assert_eq!(forward.token_credential(), Some(0));
    let caller: Vec<Header> = vec![(b"authorization", b"Bearer key-a"), (b"api-key", b"key-a")];

    let token = Secret::new("tok".into());
    let edits = forward.header_edits(&config, &caller, Some(&token));
    assert_eq!(edits[0], HeaderEdit::Remove("api-key".into()));
    assert!(!edits.contains(&HeaderEdit::Remove("authorization".into())));
    assert_eq!(edits.last(), Some(&set("authorization", b"Bearer tok")));

    // Without the token yet: the caller's authorization is removed now,
    // the bearer comes later.
    let pending = forward.header_edits(&config, &caller, None);
    assert!(pending.contains(&HeaderEdit::Remove("authorization".into())));
    assert!(pending.contains(&HeaderEdit::Remove("api-key".into())));
    assert!(!pending
        .iter()
        .any(|e| matches!(e, HeaderEdit::Set(n, _) if n == "authorization")));
    assert_eq!(
        bearer(&token),
        set("authorization", b"Bearer tok").into_owned()
    );
}

#[test]
fn content_length_parsing() {
    assert_eq!(parse_content_length(b"0"), Some(0));
    assert_eq!(parse_content_length(b"123"), Some(123));
    assert_eq!(
        parse_content_length(b"99999999999999999999999"),
        Some(u64::MAX)
    );
    assert_eq!(parse_content_length(b""), None);
    assert_eq!(parse_content_length(b"-1"), None);
    assert_eq!(parse_content_length(b"1 2"), None);
}

#[test]
fn stored_tail_suffixes() {
    assert_eq!(StoredTail::Itself.suffix(), "");
    assert_eq!(StoredTail::InputItems.suffix(), "/input_items");
    assert_eq!(StoredTail::Cancel.suffix(), "/cancel");
}

// ------------------------------------------------------------- stream usage

fn stream_edit<'c>(config: &'c Config, path: &str, body: &str) -> (Forward<'c>, Value) {
    let a = admitted(config, path, "key-ops");
    let forward = route(config, &a, body.as_bytes(), "application/json").unwrap();
    let sent = serde_json::from_slice(&apply(body.as_bytes(), &forward)).unwrap();
    (forward, sent)
}

#[test]
fn streams_are_asked_for_their_usage_where_the_upstream_takes_it() {
    let config = config();
    // A stream whose caller did not ask: asked, and stripped on the way back.
    let (forward, sent) = stream_edit(
        &config,
        "/v1/chat/completions",
        r#"{"model":"gpt-4.1","stream":true,"messages":[]}"#,
    );
    assert!(forward.strip_usage);
    assert_eq!(
        sent,
        json!({"model": "gpt41-prod", "stream": true, "messages": [],
               "stream_options": {"include_usage": true}})
    );
    // Other stream options are kept, include_usage: false is overridden.
    let (forward, sent) = stream_edit(
        &config,
        "/v1/chat/completions",
        r#"{"stream_options":{"include_usage":false,"x":1},"model":"llama","stream":true}"#,
    );
    assert!(forward.strip_usage);
    assert_eq!(
        sent["stream_options"],
        json!({"include_usage": true, "x": 1})
    );
    assert_eq!(sent["model"], "meta-llama/Llama-3.1-8B-Instruct");
    // A caller that asked gets its stream as it is.
    let body = r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true}}"#;
    let (forward, _) = stream_edit(&config, "/v1/chat/completions", body);
    assert!(!forward.strip_usage);
    assert_eq!(forward.body_edit, None);
    // Not a stream, not chat, or an upstream version that refuses it: untouched.
    for (path, body) in [
        (
            "/v1/chat/completions",
            r#"{"model":"gpt-4o","stream":false}"#,
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"gpt-4o","stream":"true"}"#,
        ),
        (
            "/v1/embeddings",
            r#"{"model":"text-embedding-3-small","stream":true}"#,
        ),
    ] {
        let (forward, _) = stream_edit(&config, path, body);
        assert!(!forward.strip_usage, "{body}");
        assert_eq!(forward.body_edit, None, "{body}");
    }
    let old = json!({
        "upstreams": {"old": {"endpoint": "acme-old", "cluster": "old", "api_version": "2024-06-01",
                              "auth": {"api_key": {"value": "k"}}}},
        "models": {"gpt-4o": {"upstream": "old", "deployment": "d"}},
        "callers": [{"name": "ops", "key_sha256": hash("key-ops"), "models": ["*"]}]
    });
    let old = Config::from_json(old.to_string().as_bytes(), &|_| None).unwrap();
    let (forward, _) = stream_edit(
        &old,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","stream":true}"#,
    );
    assert!(!forward.strip_usage, "2024-06-01 refuses stream_options");
    assert_eq!(forward.body_edit, None);
}

#[test]
fn stream_keys_an_upstream_could_read_twice_are_refused() {
    let config = config();
    for body in [
        r#"{"model":"gpt-4o","stream":true,"Stream":false}"#,
        r#"{"model":"gpt-4o","stream":true,"STREAM_OPTIONS":{"include_usage":false}}"#,
        r#"{"model":"gpt-4o","stream":true,"stream":false}"#,
        r#"{"model":"gpt-4o","stream_options":{},"stream_options":{"include_usage":false}}"#,
    ] {
        let a = admitted(&config, "/v1/chat/completions", "key-ops");
        let error = route(&config, &a, body.as_bytes(), "application/json").unwrap_err();
        assert_eq!((error.status, error.code), (400, "invalid_json"), "{body}");
    }
}
