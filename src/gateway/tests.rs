use super::*;
use crate::headers::Header;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::borrow::Cow;

fn hash(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn config() -> Config {
    let json = json!({
        "max_request_body_bytes": 1000,
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
            }
        },
        "models": {
            "gpt-4o": { "upstream": "west", "deployment": "gpt4o-prod" },
            "gpt-4o-mini": { "upstream": "east", "deployment": "mini" },
            "text-embedding-3-small": { "upstream": "west", "deployment": "embed-prod" }
        },
        "callers": [
            { "name": "team-a", "key_sha256": hash("key-a"), "models": ["gpt-4o", "gpt-4o-mini"] },
            { "name": "ops", "key_sha256": hash("key-ops"), "models": ["*"] }
        ]
    });
    Config::from_json(json.to_string().as_bytes(), &|_| None).unwrap()
}

fn head<'a>(path: &'a str, authorization: Option<&'a str>) -> RequestHead<'a> {
    RequestHead {
        method: b"POST",
        path: path.as_bytes(),
        authorization: authorization.map(str::as_bytes),
        api_key: None,
        api_key_repeated: false,
        content_length: None,
        has_body: true,
    }
}

fn admitted(config: &Config, path: &str, key: &str) -> Admitted {
    let bearer = format!("Bearer {key}");
    admit(config, &head(path, Some(&bearer))).unwrap()
}

#[test]
fn admits_a_known_caller_on_a_known_route() {
    let config = config();
    let a = admitted(&config, "/v1/chat/completions", "key-a");
    assert_eq!(
        a,
        Admitted {
            caller: 0,
            operation: Operation::ChatCompletions
        }
    );
    let ops = admit(
        &config,
        &RequestHead {
            api_key: Some(b"key-ops"),
            ..head("/v1/embeddings", None)
        },
    )
    .unwrap();
    assert_eq!(
        ops,
        Admitted {
            caller: 1,
            operation: Operation::Embeddings
        }
    );
}

#[test]
fn route_is_checked_before_the_key() {
    let config = config();
    assert_eq!(
        admit(&config, &head("/v1/nope", None)).unwrap_err().status,
        404
    );
    let get = RequestHead {
        method: b"GET",
        ..head("/v1/chat/completions", None)
    };
    assert_eq!(admit(&config, &get).unwrap_err().status, 405);
}

#[test]
fn refuses_missing_and_wrong_keys() {
    let config = config();
    let error = admit(&config, &head("/v1/chat/completions", None)).unwrap_err();
    assert_eq!((error.status, error.code), (401, "missing_api_key"));
    let error = admit(&config, &head("/v1/chat/completions", Some("Bearer key-x"))).unwrap_err();
    assert_eq!((error.status, error.code), (401, "invalid_api_key"));
    // The hash itself is not a key.
    let bearer = format!("Bearer {}", hash("key-a"));
    let error = admit(&config, &head("/v1/chat/completions", Some(&bearer))).unwrap_err();
    assert_eq!(error.status, 401);
}

#[test]
fn declared_body_size_over_the_limit_is_413_before_reading() {
    let config = config();
    let mut request = head("/v1/chat/completions", Some("Bearer key-a"));
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
    let mut request = head("/v1/chat/completions", None);
    request.content_length = Some(b"5000");
    assert_eq!(admit(&config, &request).unwrap_err().status, 401);
}

#[test]
fn request_without_body_is_400() {
    let config = config();
    let request = RequestHead {
        has_body: false,
        ..head("/v1/chat/completions", Some("Bearer key-a"))
    };
    let error = admit(&config, &request).unwrap_err();
    assert_eq!((error.status, error.code), (400, "invalid_json"));
}

#[test]
fn received_body_size_is_checked() {
    let config = config();
    assert!(check_body_size(&config, 1000).is_ok());
    assert_eq!(check_body_size(&config, 1001).unwrap_err().status, 413);
}

#[test]
fn routes_to_the_deployment_path_of_the_right_upstream() {
    let config = config();
    let a = admitted(&config, "/v1/chat/completions", "key-a");
    let forward = route(&config, &a, br#"{"messages":[],"model":"gpt-4o"}"#).unwrap();
    assert_eq!(
        forward.path,
        "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
    );
    assert_eq!(forward.upstream.name, "west");
    assert_eq!(
        (forward.caller, forward.model.as_str(), forward.deployment),
        ("team-a", "gpt-4o", "gpt4o-prod")
    );

    let forward = route(&config, &a, br#"{"model":"gpt-4o-mini"}"#).unwrap();
    assert_eq!(
        forward.path,
        "/openai/deployments/mini/chat/completions?api-version=2025-04-01-preview"
    );
    assert_eq!(forward.upstream.name, "east");
}

#[test]
fn every_operation_maps_to_its_azure_path() {
    let config = config();
    for (inbound, outbound) in [
        ("/v1/chat/completions", "chat/completions"),
        ("/v1/completions", "completions"),
        ("/v1/embeddings", "embeddings"),
    ] {
        let a = admitted(&config, inbound, "key-ops");
        let forward = route(&config, &a, br#"{"model":"text-embedding-3-small"}"#).unwrap();
        assert_eq!(
            forward.path,
            format!("/openai/deployments/embed-prod/{outbound}?api-version=2024-10-21")
        );
    }
}

#[test]
fn unknown_and_forbidden_models_get_the_same_answer() {
    let config = config();
    let a = admitted(&config, "/v1/embeddings", "key-a");
    let forbidden = route(&config, &a, br#"{"model":"text-embedding-3-small"}"#).unwrap_err();
    let unknown = route(&config, &a, br#"{"model":"text-embedding-3-large"}"#).unwrap_err();
    assert_eq!(forbidden.status, 404);
    assert_eq!(forbidden.code, "model_not_found");
    assert_eq!(
        forbidden.message.replace("text-embedding-3-small", "X"),
        unknown.message.replace("text-embedding-3-large", "X")
    );
    // The wildcard caller reaches it.
    let ops = admitted(&config, "/v1/embeddings", "key-ops");
    assert!(route(&config, &ops, br#"{"model":"text-embedding-3-small"}"#).is_ok());
}

#[test]
fn alias_match_is_exact() {
    let config = config();
    let ops = admitted(&config, "/v1/chat/completions", "key-ops");
    for alias in ["GPT-4o", "gpt-4o ", " gpt-4o", "gpt4o-prod", ""] {
        let body = json!({ "model": alias }).to_string();
        assert_eq!(
            route(&config, &ops, body.as_bytes()).unwrap_err().status,
            404,
            "{alias:?}"
        );
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
            route(&config, &a, body).unwrap_err().status,
            400,
            "{body:?}"
        );
    }
}

fn set<'a>(name: &'a str, value: &'a [u8]) -> HeaderEdit<'a> {
    HeaderEdit::Set(Cow::Borrowed(name), Cow::Borrowed(value))
}

#[test]
fn header_edits_swap_credentials_and_route() {
    let config = config();
    let a = admitted(&config, "/v1/chat/completions", "key-a");
    let forward = route(&config, &a, br#"{"model":"gpt-4o"}"#).unwrap();
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
            HeaderEdit::Remove("authorization"),
            set(":authority", b"acme-west.openai.azure.com"),
            set(
                ":path",
                b"/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
            ),
            set("x-azure-openai-cluster", b"azure_west"),
            set("api-key", b"west-secret"),
        ]
    );
}

#[test]
fn header_edits_remove_only_what_the_caller_sent() {
    let config = config();
    let a = admitted(&config, "/v1/chat/completions", "key-a");
    let forward = route(&config, &a, br#"{"model":"gpt-4o-mini"}"#).unwrap();
    let caller: Vec<Header> = vec![(b"authorization", b"Bearer key-a")];
    let edits = forward.header_edits(&config, &caller, None);
    assert_eq!(edits[0], HeaderEdit::Remove("authorization"));
    assert!(!edits.contains(&HeaderEdit::Remove("api-key")));
    assert_eq!(edits.last(), Some(&set("api-key", b"east-secret")));
    assert_eq!(forward.token_credential(), None);
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
    let a = admitted(&config, "/v1/chat/completions", "key-a");
    let forward = route(&config, &a, br#"{"model":"gpt-4o"}"#).unwrap();
    assert_eq!(forward.token_credential(), Some(0));
    let caller: Vec<Header> = vec![(b"authorization", b"Bearer key-a"), (b"api-key", b"key-a")];

    let token = Secret::new("tok".into());
    let edits = forward.header_edits(&config, &caller, Some(&token));
    assert_eq!(edits[0], HeaderEdit::Remove("api-key"));
    assert!(!edits.contains(&HeaderEdit::Remove("authorization")));
    assert_eq!(edits.last(), Some(&set("authorization", b"Bearer tok")));

    // Without the token yet: the caller's authorization is removed now,
    // the bearer comes later.
    let pending = forward.header_edits(&config, &caller, None);
    assert!(pending.contains(&HeaderEdit::Remove("authorization")));
    assert!(pending.contains(&HeaderEdit::Remove("api-key")));
    assert!(!pending
        .iter()
        .any(|e| matches!(e, HeaderEdit::Set(n, _) if n == "authorization")));
    assert_eq!(
        bearer(&token),
        set("authorization", b"Bearer tok").into_owned()
    );
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
    assert!(head.has_body);
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
