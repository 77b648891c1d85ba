use super::*;
use serde_json::{json, Value};

pub const TEAM_A_HASH: &str = "4f1c5b3a0f6c2d1e9b8a7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f";
pub const OPS_HASH: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn base() -> Value {
    json!({
        "upstreams": {
            "west": {
                "endpoint": "https://acme-west.openai.azure.com",
                "cluster": "azure_west",
                "api_version": "2024-10-21",
                "auth": { "api_key": { "env": "AZURE_WEST_KEY" } }
            }
        },
        "models": {
            "gpt-4o": { "upstream": "west", "deployment": "gpt4o-prod" },
            "text-embedding-3-small": { "upstream": "west", "deployment": "embed-prod" }
        },
        "callers": [
            { "name": "team-a", "key_sha256": TEAM_A_HASH, "models": ["gpt-4o"] },
            { "name": "ops", "key_sha256": OPS_HASH, "models": ["*"] }
        ]
    })
}

fn env(name: &str) -> Option<String> {
    match name {
        "AZURE_WEST_KEY" => Some("west-secret".into()),
        "AZURE_EAST_KEY" => Some("east-secret".into()),
        "EMPTY" => Some(String::new()),
        _ => None,
    }
}

fn load(value: &Value) -> Result<Config, ConfigError> {
    Config::from_json(value.to_string().as_bytes(), &env)
}

fn refused(value: Value) -> String {
    load(&value)
        .expect_err("configuration should be refused")
        .to_string()
}

/// `value` with the member at `pointer` set (added when missing).
fn with(mut value: Value, pointer: &str, new: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let parent = value
        .pointer_mut(parent)
        .unwrap_or_else(|| panic!("{pointer}"));
    match parent {
        Value::Object(map) => {
            map.insert(key.to_string(), new);
        }
        Value::Array(items) => items[key.parse::<usize>().unwrap()] = new,
        _ => panic!("{pointer}"),
    }
    value
}

fn without(mut value: Value, pointer: &str) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    value
        .pointer_mut(parent)
        .unwrap()
        .as_object_mut()
        .unwrap()
        .remove(key);
    value
}

#[test]
fn the_documented_example_loads() {
    let config = load(&base()).unwrap();
    assert_eq!(config.cluster_header, "x-azure-openai-cluster");
    assert_eq!(config.max_request_body_bytes, 32 * 1024 * 1024);
    let upstream = &config.upstreams[0];
    assert_eq!(upstream.name, "west");
    assert_eq!(upstream.authority, "acme-west.openai.azure.com");
    assert_eq!(upstream.cluster, "azure_west");
    assert_eq!(upstream.api_version, "2024-10-21");
    let UpstreamAuth::ApiKey(key) = &upstream.auth;
    assert_eq!(key.expose(), "west-secret");

    let (index, model) = config.model("gpt-4o").unwrap();
    assert_eq!(model.deployment, "gpt4o-prod");
    assert_eq!(model.upstream, 0);
    assert!(config.callers[0].may_use(index));
    let (embed, _) = config.model("text-embedding-3-small").unwrap();
    assert!(!config.callers[0].may_use(embed));
    assert!(config.callers[1].may_use(embed));
    assert_eq!(config.callers[1].access, ModelAccess::Any);
    assert!(config.model("gpt-5").is_none());
}

#[test]
fn defaults_and_top_level_settings() {
    let value = without(base(), "/upstreams/west/api_version");
    assert_eq!(
        load(&value).unwrap().upstreams[0].api_version,
        DEFAULT_API_VERSION
    );

    let mut value = without(base(), "/upstreams/west/api_version");
    value["api_version"] = json!("2025-04-01-preview");
    value["cluster_header"] = json!("X-Route-To");
    value["max_request_body_bytes"] = json!(1024);
    let config = load(&value).unwrap();
    assert_eq!(config.upstreams[0].api_version, "2025-04-01-preview");
    assert_eq!(config.cluster_header, "x-route-to");
    assert_eq!(config.max_request_body_bytes, 1024);
}

#[test]
fn inline_secret_value() {
    let value = with(
        base(),
        "/upstreams/west/auth",
        json!({"api_key": {"value": "inline"}}),
    );
    let config = load(&value).unwrap();
    let UpstreamAuth::ApiKey(key) = &config.upstreams[0].auth;
    assert_eq!(key.expose(), "inline");
}

#[test]
fn secrets_do_not_appear_in_debug_output() {
    let config = load(&base()).unwrap();
    assert!(!format!("{config:?}").contains("west-secret"));
}

#[test]
fn bare_resource_name_endpoint() {
    let value = with(base(), "/upstreams/west/endpoint", json!("acme-east"));
    assert_eq!(
        load(&value).unwrap().upstreams[0].authority,
        "acme-east.openai.azure.com"
    );
}

#[test]
fn refuses_empty_and_non_json() {
    assert!(Config::from_json(b"", &env)
        .unwrap_err()
        .to_string()
        .contains("empty"));
    assert!(Config::from_json(b"  \n", &env)
        .unwrap_err()
        .to_string()
        .contains("empty"));
    let message = Config::from_json(b"{", &env).unwrap_err().to_string();
    assert!(message.contains("EOF"), "{message}");
    let message = Config::from_json(b"[]", &env).unwrap_err().to_string();
    assert_eq!(message, "configuration: must be a JSON object");
    let message = Config::from_json(format!("{} x", base()).as_bytes(), &env)
        .unwrap_err()
        .to_string();
    assert!(message.contains("trailing"), "{message}");
}

#[test]
fn refuses_unknown_fields_with_their_path() {
    let mut value = base();
    value["upstream"] = json!({});
    assert!(refused(value).starts_with("upstream: unknown field `upstream`"));

    let value = with(base(), "/upstreams/west/apiversion", json!("x"));
    let message = refused(value);
    assert!(
        message.starts_with("upstreams.west.apiversion: unknown field `apiversion`"),
        "{message}"
    );

    let value = with(base(), "/callers/0/model", json!([]));
    assert!(refused(value).starts_with("callers[0].model: unknown field"));

    let value = with(
        base(),
        "/upstreams/west/auth",
        json!({"apikey": {"env": "X"}}),
    );
    let message = refused(value);
    assert!(
        message.starts_with("upstreams.west.auth: unknown variant `apikey`"),
        "{message}"
    );

    let value = with(
        base(),
        "/upstreams/west/auth",
        json!({"api_key": {"file": "/x"}}),
    );
    let message = refused(value);
    assert!(
        message.starts_with("upstreams.west.auth.api_key: unknown variant `file`"),
        "{message}"
    );
}

#[test]
fn refuses_missing_required_fields() {
    let message = refused(without(base(), "/upstreams/west/cluster"));
    assert!(
        message.starts_with("upstreams.west: missing field `cluster`"),
        "{message}"
    );
    let message = refused(without(base(), "/callers/0/key_sha256"));
    assert!(
        message.starts_with("callers[0]: missing field `key_sha256`"),
        "{message}"
    );
    let message = refused(without(base(), "/models"));
    assert!(message.contains("missing field `models`"), "{message}");
}

#[test]
fn refuses_wrong_types() {
    let value = with(base(), "/callers/0/models", json!("gpt-4o"));
    let message = refused(value);
    assert!(
        message.starts_with("callers[0].models: invalid type: string"),
        "{message}"
    );
    let value = with(base(), "/max_request_body_bytes", json!(-1));
    assert!(refused(value).starts_with("max_request_body_bytes: invalid value"));
}

#[test]
fn refuses_duplicate_keys() {
    let text = base().to_string().replacen(
        "\"models\":{",
        "\"models\":{\"gpt-4o\":{\"upstream\":\"west\",\"deployment\":\"other\"},",
        1,
    );
    let message = Config::from_json(text.as_bytes(), &env)
        .unwrap_err()
        .to_string();
    assert!(
        message.starts_with("models: duplicate key `gpt-4o`"),
        "{message}"
    );
}

#[test]
fn refuses_missing_or_empty_env_var() {
    let value = with(base(), "/upstreams/west/auth/api_key/env", json!("NOT_SET"));
    let message = refused(value);
    assert!(
        message.starts_with(
            "upstreams.west.auth.api_key.env: environment variable `NOT_SET` is not visible"
        ),
        "{message}"
    );
    assert!(message.contains("host_env_keys"));
    let value = with(base(), "/upstreams/west/auth/api_key/env", json!("EMPTY"));
    assert!(refused(value).contains("`EMPTY` is empty"));
    let value = with(base(), "/upstreams/west/auth/api_key/env", json!(""));
    assert!(refused(value).contains("must name an environment variable"));
}

#[test]
fn refuses_secrets_a_header_cannot_carry_without_echoing_them() {
    let value = with(
        base(),
        "/upstreams/west/auth",
        json!({"api_key": {"value": "abc\r\nx-evil: 1"}}),
    );
    let message = refused(value);
    assert!(
        message.starts_with("upstreams.west.auth.api_key.value:"),
        "{message}"
    );
    assert!(!message.contains("abc"));
    let value = with(
        base(),
        "/upstreams/west/auth",
        json!({"api_key": {"value": ""}}),
    );
    assert!(refused(value).contains("must not be empty"));
}

#[test]
fn refuses_bad_endpoints() {
    for (endpoint, expected) in [
        ("https://acme.openai.azure.com/openai", "without a path"),
        ("https://acme.openai.azure.com?x", "without a query"),
        ("https://acme.openai.azure.com#x", "without a fragment"),
        ("https://u:p@acme.openai.azure.com", "without user info"),
        ("grpc://acme", "scheme `grpc`"),
        ("not a host", "resource name"),
    ] {
        let message = refused(with(base(), "/upstreams/west/endpoint", json!(endpoint)));
        assert!(
            message.starts_with("upstreams.west.endpoint: "),
            "{message}"
        );
        assert!(message.contains(expected), "{endpoint}: {message}");
    }
}

#[test]
fn refuses_bad_cluster() {
    for cluster in ["", "azure west", "azure\nwest"] {
        let message = refused(with(base(), "/upstreams/west/cluster", json!(cluster)));
        assert!(message.starts_with("upstreams.west.cluster: "), "{message}");
    }
}

#[test]
fn refuses_bad_api_versions() {
    for version in ["2024-10", "latest", "2024-10-21-beta", "24-10-2021", "v1"] {
        let message = refused(with(base(), "/upstreams/west/api_version", json!(version)));
        assert!(
            message.starts_with("upstreams.west.api_version: "),
            "{message}"
        );
        assert!(message.contains("YYYY-MM-DD"));
    }
    let mut value = base();
    value["api_version"] = json!("2024");
    assert!(refused(value).starts_with("api_version: "));
}

#[test]
fn refuses_bad_cluster_header() {
    for (name, expected) in [
        ("", "not a valid header name"),
        ("x cluster", "not a valid header name"),
        (":authority", "not a valid header name"),
        ("Authorization", "reads or rewrites"),
        ("api-key", "reads or rewrites"),
    ] {
        let mut value = base();
        value["cluster_header"] = json!(name);
        let message = refused(value);
        assert!(message.starts_with("cluster_header: "), "{message}");
        assert!(message.contains(expected), "{name}: {message}");
    }
}

#[test]
fn refuses_body_limit_out_of_range() {
    let mut value = base();
    value["max_request_body_bytes"] = json!(0);
    assert!(refused(value.clone()).contains("greater than 0"));
    value["max_request_body_bytes"] = json!(1u64 << 40);
    assert!(refused(value).contains("ceiling"));
}

#[test]
fn refuses_model_pointing_at_unknown_upstream() {
    let message = refused(with(base(), "/models/gpt-4o/upstream", json!("east")));
    assert_eq!(
        message,
        "models.gpt-4o.upstream: unknown upstream `east`; known upstreams: west"
    );
}

#[test]
fn refuses_bad_deployments() {
    for deployment in ["", "gpt4o/prod", "..", "a b", "x?y"] {
        let message = refused(with(base(), "/models/gpt-4o/deployment", json!(deployment)));
        assert!(
            message.starts_with("models.gpt-4o.deployment: "),
            "{deployment}: {message}"
        );
    }
}

#[test]
fn refuses_bad_aliases() {
    let mut value = base();
    value["models"]["*"] = json!({"upstream": "west", "deployment": "d"});
    assert!(refused(value).starts_with("models.*: `*` is reserved"));
    let mut value = base();
    value["models"][" gpt"] = json!({"upstream": "west", "deployment": "d"});
    assert!(refused(value).contains("surrounding spaces"));
}

#[test]
fn refuses_empty_sections() {
    assert!(refused(with(base(), "/upstreams", json!({}))).starts_with("upstreams: must name"));
    assert!(refused(with(base(), "/models", json!({}))).starts_with("models: must map"));
    assert!(refused(with(base(), "/callers", json!([]))).starts_with("callers: must list"));
}

#[test]
fn refuses_allowlist_naming_unknown_alias() {
    let message = refused(with(
        base(),
        "/callers/0/models",
        json!(["gpt-4o", "gpt-5"]),
    ));
    assert_eq!(
        message,
        "callers[0].models[1]: unknown model alias `gpt-5`; known aliases: gpt-4o, text-embedding-3-small"
    );
}

#[test]
fn refuses_odd_allowlists() {
    let message = refused(with(base(), "/callers/0/models", json!([])));
    assert!(message.starts_with("callers[0].models: must list at least one"));
    let message = refused(with(base(), "/callers/0/models", json!(["gpt-4o", "*"])));
    assert!(message.starts_with("callers[0].models[1]: \"*\" already allows"));
    let message = refused(with(
        base(),
        "/callers/0/models",
        json!(["gpt-4o", "gpt-4o"]),
    ));
    assert!(message.starts_with("callers[0].models[1]: `gpt-4o` is listed twice"));
}

#[test]
fn refuses_duplicate_caller_names_and_hashes() {
    let message = refused(with(base(), "/callers/1/name", json!("team-a")));
    assert_eq!(
        message,
        "callers[1].name: duplicate caller name `team-a` (also callers[0])"
    );
    let message = refused(with(base(), "/callers/1/key_sha256", json!(TEAM_A_HASH)));
    assert!(
        message.starts_with("callers[1].key_sha256: same key hash as callers[0] (`team-a`)"),
        "{message}"
    );
}

#[test]
fn refuses_malformed_hashes() {
    for (hash, expected) in [
        ("abc", "got 3 characters"),
        (&TEAM_A_HASH.to_uppercase()[..], "outside 0-9a-f"),
        (&format!("{}zz", &TEAM_A_HASH[..62])[..], "outside 0-9a-f"),
        (&format!("{TEAM_A_HASH}00")[..], "got 66 characters"),
    ] {
        let message = refused(with(base(), "/callers/0/key_sha256", json!(hash)));
        assert!(
            message.starts_with("callers[0].key_sha256: must be the SHA-256"),
            "{message}"
        );
        assert!(message.contains(expected), "{hash}: {message}");
    }
}

#[test]
fn refuses_blank_caller_name() {
    assert!(refused(with(base(), "/callers/0/name", json!(" "))).starts_with("callers[0].name: "));
}

#[test]
fn parses_hash_bytes() {
    let config = load(&base()).unwrap();
    assert_eq!(config.callers[1].key_sha256[0], 0x01);
    assert_eq!(config.callers[1].key_sha256[31], 0xef);
}
