use super::*;
use crate::routes::{Operation, StoredTail};
use serde_json::{json, Value};

fn version(upstream: &Upstream, op: Operation) -> String {
    match &upstream.flavor {
        Flavor::AzureDeployments { api_versions } => api_versions[op.index()].clone(),
        other => panic!("{other:?}"),
    }
}

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
    assert_eq!(version(upstream, Operation::ChatCompletions), "2024-10-21");
    let UpstreamAuth::ApiKey(key) = &upstream.auth else {
        panic!("api key expected")
    };
    assert_eq!(key.expose(), "west-secret");

    let (index, model) = config.model("gpt-4o").unwrap();
    let (target, upstream) = config.target_upstream(model.targets[0].target).unwrap();
    assert_eq!(target.deployment, "gpt4o-prod");
    assert_eq!(upstream.name, "west");
    assert_eq!(model.targets.len(), 1);
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
        version(
            &load(&value).unwrap().upstreams[0],
            Operation::ChatCompletions
        ),
        DEFAULT_API_VERSION
    );

    let mut value = without(base(), "/upstreams/west/api_version");
    value["api_version"] = json!("2025-04-01-preview");
    value["cluster_header"] = json!("X-Route-To");
    value["max_request_body_bytes"] = json!(1024);
    let config = load(&value).unwrap();
    assert_eq!(
        version(&config.upstreams[0], Operation::ChatCompletions),
        "2025-04-01-preview"
    );
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
    let UpstreamAuth::ApiKey(key) = &config.upstreams[0].auth else {
        panic!("api key expected")
    };
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
        message.starts_with(
            "upstreams.west.auth.apikey: unknown field `apikey`; \
             expected one of `api_key`, `bearer`, `entra`, `managed_identity`"
        ),
        "{message}"
    );

    let value = with(
        base(),
        "/upstreams/west/auth",
        json!({"api_key": {"file": "/x"}}),
    );
    let message = refused(value);
    assert!(
        message.starts_with("upstreams.west.auth.api_key.file: unknown field `file`"),
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
        message == "callers[0].models: expected an array, got the string \"gpt-4o\"",
        "{message}"
    );
    let value = with(base(), "/max_request_body_bytes", json!(-1));
    assert_eq!(
        refused(value),
        "max_request_body_bytes: expected a whole number of 0 or more, got the number -1"
    );
    let value = with(base(), "/upstreams/west/cluster", json!(null));
    assert_eq!(
        refused(value),
        "upstreams.west.cluster: expected a string, got null"
    );
    let value = with(base(), "/upstreams/west", json!([]));
    assert_eq!(
        refused(value),
        "upstreams.west: expected an object, got an array"
    );
    let value = with(base(), "/upstreams/west/auth", json!({}));
    assert!(refused(value).starts_with("upstreams.west.auth: must have exactly one of `api_key`"));
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
    assert!(refused(value.clone()).contains("ceiling"));
    // The ceiling itself, 256 MiB, is allowed; one byte more is not.
    value["max_request_body_bytes"] = json!(256 * 1024 * 1024);
    assert_eq!(
        load(&value).unwrap().max_request_body_bytes,
        256 * 1024 * 1024
    );
    value["max_request_body_bytes"] = json!(256 * 1024 * 1024 + 1);
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

// ---------------------------------------------------------------- tokens

const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";

fn entra(extra: Value) -> Value {
    let mut auth = json!({
        "tenant_id": "72f988bf-86f1-41af-91ab-2d7cd011db47",
        "client_id": CLIENT_ID,
        "client_secret": { "env": "AZURE_WEST_KEY" },
        "token_cluster": "entra"
    });
    auth.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    with(base(), "/upstreams/west/auth", json!({ "entra": auth }))
}

fn managed(extra: Value) -> Value {
    let mut auth = json!({ "imds_cluster": "imds" });
    auth.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    with(
        base(),
        "/upstreams/west/auth",
        json!({ "managed_identity": auth }),
    )
}

fn form(credential: &Credential) -> String {
    credential
        .request
        .body
        .as_ref()
        .unwrap()
        .expose()
        .to_string()
}

#[test]
fn entra_credential_defaults_to_the_public_cloud() {
    let config = load(&entra(json!({}))).unwrap();
    assert!(matches!(config.upstreams[0].auth, UpstreamAuth::Token(0)));
    let credential = &config.credentials[0];
    assert_eq!(credential.label, "west");
    assert_eq!(credential.cluster, "entra");
    assert_eq!(credential.timeout_ms, 5_000);
    assert_eq!(credential.max_wait_ms, 10_000);
    let request = &credential.request;
    assert_eq!(request.method, "POST");
    assert_eq!(request.authority, "login.microsoftonline.com");
    assert_eq!(
        request.path,
        "/72f988bf-86f1-41af-91ab-2d7cd011db47/oauth2/v2.0/token"
    );
    assert!(request
        .headers
        .contains(&("content-type", "application/x-www-form-urlencoded")));
    assert_eq!(
        form(credential),
        format!(
            "grant_type=client_credentials&client_id={CLIENT_ID}&client_secret=west-secret\
             &scope=https%3A%2F%2Fcognitiveservices.azure.com%2F.default"
        )
    );
    assert!(credential
        .shared_key
        .starts_with("azure-openai-filter.token."));
    assert!(!format!("{config:?}").contains("west-secret"));
}

#[test]
fn sovereign_clouds_set_authority_and_scope() {
    let config = load(&entra(json!({ "cloud": "usgov" }))).unwrap();
    assert_eq!(
        config.credentials[0].request.authority,
        "login.microsoftonline.us"
    );
    assert!(form(&config.credentials[0])
        .ends_with("scope=https%3A%2F%2Fcognitiveservices.azure.us%2F.default"));
    let config = load(&entra(json!({ "cloud": "china" }))).unwrap();
    assert_eq!(
        config.credentials[0].request.authority,
        "login.chinacloudapi.cn"
    );
    assert!(form(&config.credentials[0])
        .ends_with("scope=https%3A%2F%2Fcognitiveservices.azure.cn%2F.default"));
    // Naming the public cloud is the same as leaving it out.
    let public = load(&entra(json!({ "cloud": "public" }))).unwrap();
    let default = load(&entra(json!({}))).unwrap();
    assert_eq!(
        public.credentials[0].request.authority,
        "login.microsoftonline.com"
    );
    assert_eq!(form(&public.credentials[0]), form(&default.credentials[0]));
    let message = refused(entra(json!({ "cloud": "mars" })));
    assert!(
        message.starts_with("upstreams.west.auth.entra.cloud: unknown cloud `mars`"),
        "{message}"
    );
}

#[test]
fn authority_host_and_scope_overrides() {
    let config = load(&entra(json!({
        "authority_host": "http://127.0.0.1:9000",
        "scope": "api://custom/.default",
        "timeout_ms": 800,
        "max_wait_ms": 0
    })))
    .unwrap();
    let credential = &config.credentials[0];
    assert_eq!(credential.request.authority, "127.0.0.1:9000");
    assert!(form(credential).ends_with("scope=api%3A%2F%2Fcustom%2F.default"));
    assert_eq!((credential.timeout_ms, credential.max_wait_ms), (800, 0));
}

#[test]
fn client_secret_is_form_encoded() {
    let value = with(
        entra(json!({})),
        "/upstreams/west/auth/entra/client_secret",
        json!({"value": "a+b&c=d~e f"}),
    );
    let config = load(&value).unwrap();
    assert!(form(&config.credentials[0]).contains("&client_secret=a%2Bb%26c%3Dd~e%20f&"));
}

#[test]
fn entra_refusals_name_the_field() {
    for (extra, expected) in [
        (
            json!({ "client_id": "not-a-guid" }),
            "upstreams.west.auth.entra.client_id: `not-a-guid` is not a GUID",
        ),
        (
            json!({ "tenant_id": "common" }),
            "upstreams.west.auth.entra.tenant_id: `common` cannot issue",
        ),
        (
            json!({ "tenant_id": "a/b" }),
            "upstreams.west.auth.entra.tenant_id: `a/b` is not a tenant",
        ),
        (
            json!({ "client_secret": { "env": "NOPE" } }),
            "upstreams.west.auth.entra.client_secret.env: environment variable `NOPE`",
        ),
        (
            json!({ "token_cluster": "" }),
            "upstreams.west.auth.entra.token_cluster: must be the name",
        ),
        (
            json!({ "authority_host": "https://login.microsoftonline.com/tenant" }),
            "upstreams.west.auth.entra.authority_host: must be an origin",
        ),
        (
            json!({ "scope": " " }),
            "upstreams.west.auth.entra.scope: must be non-empty",
        ),
        (
            json!({ "timeout_ms": 0 }),
            "upstreams.west.auth.entra.timeout_ms: 0 is outside",
        ),
        (
            json!({ "max_wait_ms": 999999 }),
            "upstreams.west.auth.entra.max_wait_ms: 999999 is outside",
        ),
        (
            json!({ "secret": "x" }),
            "upstreams.west.auth.entra.secret: unknown field `secret`",
        ),
    ] {
        let message = refused(entra(extra));
        assert!(message.starts_with(expected), "{message}");
    }
    // A client ID is exactly five groups of 8-4-4-4-12 hexadecimal digits.
    for not_a_guid in [
        "11111111-2222-3333-4444-555555555555-6",
        "11111111-2222-3333-4444",
        "1111111g-2222-3333-4444-555555555555",
        "11111111-2222-3333-4444-55555555555",
        "111111111-222-3333-4444-555555555555",
    ] {
        let message = refused(entra(json!({ "client_id": not_a_guid })));
        assert!(message.contains("is not a GUID"), "{message}");
    }
    assert!(load(&entra(
        json!({ "client_id": "ABCDEF01-2222-3333-4444-abcdef555555" })
    ))
    .is_ok());
    let value = entra(json!({}));
    let mut value = value;
    value["upstreams"]["west"]["auth"]["entra"]
        .as_object_mut()
        .unwrap()
        .remove("token_cluster");
    assert!(refused(value).starts_with("upstreams.west.auth.entra: missing field `token_cluster`"));
}

#[test]
fn managed_identity_request() {
    let config = load(&managed(json!({}))).unwrap();
    let request = &config.credentials[0].request;
    assert_eq!(request.method, "GET");
    assert_eq!(request.authority, "169.254.169.254");
    assert_eq!(
        request.path,
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fcognitiveservices.azure.com%2F"
    );
    assert_eq!(request.headers, vec![("metadata", "true")]);
    assert!(request.body.is_none());

    let config = load(&managed(
        json!({ "client_id": CLIENT_ID, "cloud": "usgov" }),
    ))
    .unwrap();
    assert_eq!(
        config.credentials[0].request.path,
        format!("/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fcognitiveservices.azure.us%2F&client_id={CLIENT_ID}")
    );
    let id = "/subscriptions/s/resourceGroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/gw";
    let config = load(&managed(json!({ "msi_res_id": id }))).unwrap();
    assert!(config.credentials[0].request.path.ends_with("&msi_res_id=%2Fsubscriptions%2Fs%2FresourceGroups%2Fg%2Fproviders%2FMicrosoft.ManagedIdentity%2FuserAssignedIdentities%2Fgw"));
}

#[test]
fn managed_identity_refusals() {
    let message = refused(managed(
        json!({ "client_id": CLIENT_ID, "object_id": CLIENT_ID }),
    ));
    assert!(
        message.starts_with(
            "upstreams.west.auth.managed_identity.object_id: choose the identity with one of"
        ),
        "{message}"
    );
    let message = refused(managed(json!({ "object_id": "x" })));
    assert!(
        message.starts_with("upstreams.west.auth.managed_identity.object_id: `x` is not a GUID"),
        "{message}"
    );
    let message = refused(managed(json!({ "msi_res_id": "gw" })));
    assert!(
        message.starts_with("upstreams.west.auth.managed_identity.msi_res_id: must be"),
        "{message}"
    );
    let message = refused(with(
        base(),
        "/upstreams/west/auth",
        json!({ "managed_identity": {} }),
    ));
    assert!(
        message.contains("missing field `imds_cluster`"),
        "{message}"
    );
}

#[test]
fn upstreams_with_one_identity_share_one_credential() {
    let mut value = entra(json!({}));
    let west = value["upstreams"]["west"].clone();
    let mut east = west.clone();
    east["cluster"] = json!("azure_east");
    east["endpoint"] = json!("acme-east");
    value["upstreams"]["east"] = east;
    let mut north = west;
    north["auth"]["entra"]["client_id"] = json!("99999999-2222-3333-4444-555555555555");
    value["upstreams"]["north"] = north;
    let config = load(&value).unwrap();
    assert_eq!(config.credentials.len(), 2);
    assert_eq!(config.credentials[0].label, "east, west");
    assert_eq!(config.credentials[1].label, "north");
    // The host finds a token upstream's credential by this index.
    let north = config.upstreams.iter().find(|u| u.name == "north").unwrap();
    let UpstreamAuth::Token(index) = north.auth else {
        panic!("{:?}", north.auth)
    };
    assert_eq!(config.credential(index).unwrap().label, "north");
    assert!(config.credential(config.credentials.len()).is_none());
    assert_ne!(
        config.credentials[0].shared_key,
        config.credentials[1].shared_key
    );
}

#[test]
fn shared_key_changes_with_the_identity() {
    let a = load(&entra(json!({}))).unwrap();
    let b = load(&entra(json!({ "scope": "api://other/.default" }))).unwrap();
    let c = load(&with(
        entra(json!({})),
        "/upstreams/west/auth/entra/client_secret",
        json!({"value": "rotated"}),
    ))
    .unwrap();
    assert_ne!(a.credentials[0].shared_key, b.credentials[0].shared_key);
    assert_ne!(a.credentials[0].shared_key, c.credentials[0].shared_key);
    assert_eq!(
        a.credentials[0].shared_key,
        load(&entra(json!({}))).unwrap().credentials[0].shared_key
    );
}

// ---------------------------------------------------------------- surfaces

#[test]
fn per_operation_api_versions() {
    let value = with(
        base(),
        "/upstreams/west/api_versions",
        json!({
            "responses": "2025-04-01-preview",
            "audio/transcriptions": "2024-06-01"
        }),
    );
    let config = load(&value).unwrap();
    let west = &config.upstreams[0];
    assert_eq!(version(west, Operation::Responses), "2025-04-01-preview");
    assert_eq!(version(west, Operation::AudioTranscriptions), "2024-06-01");
    assert_eq!(version(west, Operation::ChatCompletions), "2024-10-21");
    // Preview-only operations default to a preview that serves them.
    assert_eq!(
        version(west, Operation::ImageEdits),
        DEFAULT_PREVIEW_API_VERSION
    );
    assert_eq!(
        version(west, Operation::AudioSpeech),
        DEFAULT_PREVIEW_API_VERSION
    );
}

#[test]
fn api_versions_known_to_be_too_old_are_refused() {
    let value = with(
        base(),
        "/upstreams/west/api_versions",
        json!({ "responses": "2024-10-21" }),
    );
    assert_eq!(
        refused(value),
        "upstreams.west.api_versions.responses: api-version 2024-10-21 is too old for responses; it needs 2025-03-01-preview or later"
    );
    let value = with(
        base(),
        "/upstreams/west/api_versions",
        json!({ "images/edits": "2025-03-01-preview" }),
    );
    assert!(refused(value).contains("needs 2025-04-01-preview or later"));
    let value = with(
        base(),
        "/upstreams/west/api_versions",
        json!({ "chat": "2024-10-21" }),
    );
    assert!(refused(value).starts_with("upstreams.west.api_versions.chat: unknown operation `chat`; expected one of `chat/completions`"));
    let value = with(
        base(),
        "/upstreams/west/api_versions",
        json!({ "responses": "latest" }),
    );
    assert!(refused(value).contains("YYYY-MM-DD"));
}

#[test]
fn azure_v1_api() {
    let value = with(base(), "/upstreams/west/api", json!("v1"));
    let value = without(value, "/upstreams/west/api_version");
    let config = load(&value).unwrap();
    assert!(matches!(
        config.upstreams[0].flavor,
        Flavor::AzureV1 { preview: false }
    ));
    let upstream = &config.upstreams[0];
    assert_eq!(
        upstream.operation_path(Operation::Embeddings, "d"),
        "/openai/v1/embeddings"
    );
    assert!(upstream.model_in_body(Operation::ChatCompletions));

    let preview = with(
        value.clone(),
        "/upstreams/west/api_version",
        json!("preview"),
    );
    let config = load(&preview).unwrap();
    assert_eq!(
        config.upstreams[0].operation_path(Operation::Responses, "d"),
        "/openai/v1/responses?api-version=preview"
    );
    let dated = with(
        value.clone(),
        "/upstreams/west/api_version",
        json!("2024-10-21"),
    );
    assert!(refused(dated)
        .starts_with("upstreams.west.api_version: the v1 API takes no dated api-version"));
    let bad = with(value, "/upstreams/west/api", json!("v2"));
    assert!(refused(bad).starts_with("upstreams.west.api: unknown API `v2`"));
}

#[test]
fn openai_compatible_upstream() {
    let mut value = base();
    value["upstreams"]["vllm"] = json!({
        "kind": "openai",
        "endpoint": "http://vllm.internal:8000/v1",
        "cluster": "vllm",
        "auth": { "bearer": { "value": "tok" } }
    });
    value["models"]["llama"] =
        json!({ "upstream": "vllm", "deployment": "meta-llama/Llama-3.1-8B:fp8" });
    let config = load(&value).unwrap();
    let vllm = config.upstreams.iter().find(|u| u.name == "vllm").unwrap();
    assert!(matches!(&vllm.flavor, Flavor::OpenAi { base_path } if base_path == "/v1"));
    assert_eq!(vllm.authority, "vllm.internal:8000");
    assert_eq!(
        vllm.operation_path(Operation::AudioTranscriptions, "x"),
        "/v1/audio/transcriptions"
    );
    assert_eq!(
        vllm.stored_response_path("resp_1", StoredTail::InputItems, "?limit=1"),
        "/v1/responses/resp_1/input_items?limit=1"
    );
    assert!(matches!(&vllm.auth, UpstreamAuth::Bearer(s) if s.expose() == "tok"));

    let mut api_key = value.clone();
    api_key["upstreams"]["vllm"]["auth"] = json!({ "api_key": { "value": "k" } });
    assert!(refused(api_key)
        .starts_with("upstreams.vllm.auth.api_key: an `openai` upstream takes `bearer`"));
    let mut versioned = value.clone();
    versioned["upstreams"]["vllm"]["api_version"] = json!("2024-10-21");
    assert!(refused(versioned)
        .starts_with("upstreams.vllm.api_version: applies to Azure upstreams only"));
    let mut kind = value.clone();
    kind["upstreams"]["vllm"]["kind"] = json!("anthropic");
    assert!(refused(kind).starts_with("upstreams.vllm.kind: unknown kind `anthropic`"));
    let mut path = value;
    path["upstreams"]["vllm"]["endpoint"] = json!("http://vllm/v1?x");
    assert!(refused(path).starts_with("upstreams.vllm.endpoint: "));
}

#[test]
fn deployment_names_in_the_path_stay_path_safe() {
    // An Azure deployments upstream takes the name into the URL path.
    let message = refused(with(
        base(),
        "/models/gpt-4o/deployment",
        json!("meta-llama/x"),
    ));
    assert!(
        message.starts_with("models.gpt-4o.deployment: "),
        "{message}"
    );
    // In the body (v1 API) any text without control characters will do.
    let v1 = with(base(), "/upstreams/west/api", json!("v1"));
    let v1 = without(v1, "/upstreams/west/api_version");
    assert!(load(&with(
        v1.clone(),
        "/models/gpt-4o/deployment",
        json!("a/b:c d")
    ))
    .is_ok());
    assert!(refused(with(
        v1.clone(),
        "/models/gpt-4o/deployment",
        json!("a\r\nb")
    ))
    .contains("control characters"));
    // Names in the body are capped at 256 bytes.
    let longest = with(
        v1.clone(),
        "/models/gpt-4o/deployment",
        json!("d".repeat(256)),
    );
    assert!(load(&longest).is_ok());
    assert!(refused(with(
        v1,
        "/models/gpt-4o/deployment",
        json!("d".repeat(257))
    ))
    .contains("at most 256 bytes"));
    // Azure deployment names in the path may hold `.`, `_` and `-`.
    for name in ["gpt-4.1", "gpt_4o", "o3.mini_2025-01"] {
        let config = load(&with(base(), "/models/gpt-4o/deployment", json!(name))).unwrap();
        let (target, _) = config
            .target_upstream(config.models[0].targets[0].target)
            .unwrap();
        assert_eq!(target.deployment, name);
    }
}

#[test]
fn responses_upstream_defaults_to_the_only_one() {
    assert_eq!(load(&base()).unwrap().responses_upstream, Some(0));
    let mut two = base();
    two["upstreams"]["east"] = json!({
        "endpoint": "acme-east", "cluster": "e", "auth": { "api_key": { "value": "k" } }
    });
    assert_eq!(load(&two).unwrap().responses_upstream, None);
    two["responses_upstream"] = json!("east");
    let config = load(&two).unwrap();
    assert_eq!(
        config.upstreams[config.responses_upstream.unwrap()].name,
        "east"
    );
    two["responses_upstream"] = json!("north");
    assert!(refused(two).starts_with("responses_upstream: unknown upstream `north`"));
}

#[test]
fn bearer_auth_for_azure_too() {
    let value = with(
        base(),
        "/upstreams/west/auth",
        json!({ "bearer": { "env": "AZURE_WEST_KEY" } }),
    );
    let config = load(&value).unwrap();
    assert!(
        matches!(&config.upstreams[0].auth, UpstreamAuth::Bearer(s) if s.expose() == "west-secret")
    );
}

#[test]
fn names_that_cannot_be_metric_labels_are_refused() {
    for (change, path) in [
        (
            json!({"callers": [{"name": "team;a", "key_sha256": "0".repeat(64), "models": ["*"]}]}),
            "callers[0].name",
        ),
        (
            json!({"models": {"gpt=4o": {"upstream": "west", "deployment": "d"}}}),
            "models.gpt=4o",
        ),
        (
            json!({"models": {"gpt-4o": {"upstream": "west", "deployment": "a;b"}}}),
            "models.gpt-4o.deployment",
        ),
    ] {
        let mut config = json!({
            "upstreams": {"west": {"endpoint": "acme-west", "cluster": "w",
                                   "auth": {"api_key": {"value": "k"}}}},
            "models": {"gpt-4o": {"upstream": "west", "deployment": "d"}},
            "callers": [{"name": "team-a", "key_sha256": "0".repeat(64), "models": ["*"]}]
        });
        for (key, value) in change.as_object().unwrap() {
            config[key] = value.clone();
        }
        let error = Config::from_json(config.to_string().as_bytes(), &|_| None).unwrap_err();
        assert_eq!(error.path, path);
        assert!(
            error.message.contains("label of the filter's metrics"),
            "{}",
            error.message
        );
    }
    let upstream = json!({
        "upstreams": {"we;st": {"endpoint": "acme-west", "cluster": "w",
                                "auth": {"api_key": {"value": "k"}}}},
        "models": {"gpt-4o": {"upstream": "we;st", "deployment": "d"}},
        "callers": [{"name": "team-a", "key_sha256": "0".repeat(64), "models": ["*"]}]
    });
    let error = Config::from_json(upstream.to_string().as_bytes(), &|_| None).unwrap_err();
    assert_eq!(error.path, "upstreams.we;st");
}

fn pool_config(targets: Value) -> Result<Config, ConfigError> {
    let json = json!({
        "upstreams": {
            "west-ptu": {"endpoint": "acme-west", "cluster": "w", "auth": {"api_key": {"value": "k"}}},
            "west": {"endpoint": "acme-west2", "cluster": "w2", "auth": {"api_key": {"value": "k"}}},
            "east": {"endpoint": "acme-east", "cluster": "e", "auth": {"api_key": {"value": "k"}}},
            "v1": {"endpoint": "acme-v1", "cluster": "v", "api": "v1", "auth": {"api_key": {"value": "k"}}},
            "vllm": {"kind": "openai", "endpoint": "http://vllm:8000/v1", "cluster": "vllm",
                     "auth": {"bearer": {"value": "t"}}}
        },
        "models": {
            "gpt-4o": {"targets": targets},
            "gpt-4o-solo": {"upstream": "west", "deployment": "gpt4o"}
        },
        "callers": [{"name": "a", "key_sha256": "0".repeat(64), "models": ["*"]}]
    });
    Config::from_json(json.to_string().as_bytes(), &|_| None)
}

#[test]
fn pools_list_targets_by_priority_and_weight() {
    let config = pool_config(json!([
        {"upstream": "west-ptu", "deployment": "gpt4o-ptu", "priority": 0,
         "spillover_deployment": "gpt4o-standard"},
        {"upstream": "west", "deployment": "gpt4o", "priority": 1, "weight": 3},
        {"upstream": "east", "deployment": "gpt4o", "priority": 1}
    ]))
    .unwrap();
    let (_, model) = config.model("gpt-4o").unwrap();
    let shape: Vec<(u32, u32, Option<&str>)> = model
        .targets
        .iter()
        .map(|t| (t.priority, t.weight, t.spillover.as_deref()))
        .collect();
    assert_eq!(
        shape,
        vec![(0, 1, Some("gpt4o-standard")), (1, 3, None), (1, 1, None)]
    );
    // The same deployment on the same upstream is one target for every
    // alias (one cooldown); on another upstream it is another.
    let (_, solo) = config.model("gpt-4o-solo").unwrap();
    assert_eq!(solo.targets[0].target, model.targets[1].target);
    assert_ne!(model.targets[1].target, model.targets[2].target);
    assert_eq!(config.targets.len(), 3);
    let keys: Vec<&str> = config
        .targets
        .iter()
        .map(|t| t.cooldown_key.as_str())
        .collect();
    assert_eq!(
        keys,
        vec![
            "azure_openai_filter/cooldown/west-ptu/gpt4o-ptu",
            "azure_openai_filter/cooldown/west/gpt4o",
            "azure_openai_filter/cooldown/east/gpt4o"
        ]
    );
}

#[test]
fn bad_pools_are_refused_naming_the_field() {
    for (targets, path, message) in [
        (json!([]), "models.gpt-4o.targets", "at least one target"),
        (
            json!([{"upstream": "north", "deployment": "d"}]),
            "models.gpt-4o.targets[0].upstream",
            "unknown upstream `north`",
        ),
        (
            json!([{"upstream": "west", "deployment": "d", "weight": 0}]),
            "models.gpt-4o.targets[0].weight",
            "at least 1",
        ),
        (
            json!([{"upstream": "west", "deployment": "d", "weight": 2_000_000}]),
            "models.gpt-4o.targets[0].weight",
            "at most",
        ),
        (
            json!([{"upstream": "west", "deployment": "d", "priority": 5000}]),
            "models.gpt-4o.targets[0].priority",
            "0 to 1000",
        ),
        (
            json!([{"upstream": "west", "deployment": "d"}, {"upstream": "west", "deployment": "d"}]),
            "models.gpt-4o.targets[1]",
            "same upstream and deployment",
        ),
        (
            json!([{"upstream": "west", "deployment": "d", "colour": "red"}]),
            "models.gpt-4o.targets[0].colour",
            "unknown field",
        ),
        (
            json!([{"upstream": "west", "deployment": "bad/name"}]),
            "models.gpt-4o.targets[0].deployment",
            "not a deployment name",
        ),
        (
            json!([{"upstream": "vllm", "deployment": "m", "spillover_deployment": "s"}]),
            "models.gpt-4o.targets[0].spillover_deployment",
            "Azure upstreams only",
        ),
        (
            json!([{"upstream": "west", "deployment": "d", "spillover_deployment": "a b"}]),
            "models.gpt-4o.targets[0].spillover_deployment",
            "not a deployment name",
        ),
        (
            json!([{"upstream": "west"}]),
            "models.gpt-4o.targets[0]",
            "missing field `deployment`",
        ),
    ] {
        let error = pool_config(targets.clone()).unwrap_err();
        assert_eq!(error.path, path, "{targets}");
        assert!(
            error.message.contains(message),
            "{targets}: {}",
            error.message
        );
    }
    // `targets` beside `upstream` is one or the other.
    let json = json!({
        "upstreams": {"west": {"endpoint": "acme-west", "cluster": "w", "auth": {"api_key": {"value": "k"}}}},
        "models": {"gpt-4o": {"upstream": "west", "deployment": "d", "targets": []}},
        "callers": [{"name": "a", "key_sha256": "0".repeat(64), "models": ["*"]}]
    });
    let error = Config::from_json(json.to_string().as_bytes(), &|_| None).unwrap_err();
    assert_eq!(error.path, "models.gpt-4o.targets");
    assert!(error.message.contains("not both"), "{}", error.message);
}

#[test]
fn caller_limits_are_read_and_checked() {
    let limited = with(
        base(),
        "/callers/0/limits",
        json!({"requests_per_minute": 600, "tokens_per_minute": 200000}),
    );
    let config = load(&limited).unwrap();
    assert_eq!(
        config.callers[0].limits,
        Some(CallerLimits {
            requests_per_minute: Some(600),
            tokens_per_minute: Some(200_000),
        })
    );
    assert_eq!(config.callers[1].limits, None);
    assert!(!config.global_rate_limit);
    assert!(!config.access_log);
    assert!(
        load(&with(base(), "/access_log", json!(true)))
            .unwrap()
            .access_log
    );
    assert!(refused(with(base(), "/access_log", json!(1)))
        .contains("access_log: expected true or false"));
    let only_tokens = with(base(), "/callers/0/limits", json!({"tokens_per_minute": 5}));
    assert_eq!(
        load(&only_tokens).unwrap().callers[0].limits,
        Some(CallerLimits {
            requests_per_minute: None,
            tokens_per_minute: Some(5),
        })
    );
    for (limits, expected) in [
        (
            json!({"requests_per_minute": 0}),
            "callers[0].limits.requests_per_minute: must be 1 to",
        ),
        (
            json!({"tokens_per_minute": -3}),
            "callers[0].limits.tokens_per_minute",
        ),
        (
            json!({"tokens_per_minute": 2e12}),
            "callers[0].limits.tokens_per_minute",
        ),
        (json!({}), "callers[0].limits: set requests_per_minute"),
        (
            json!({"requests_per_min": 5}),
            "callers[0].limits.requests_per_min",
        ),
        (json!(600), "callers[0].limits"),
    ] {
        let message = refused(with(base(), "/callers/0/limits", limits.clone()));
        assert!(message.contains(expected), "{limits}: {message}");
    }
}

#[test]
fn global_rate_limit_is_a_flag_whose_headers_are_not_the_routing_header() {
    let global = with(base(), "/global_rate_limit", json!(true));
    assert!(load(&global).unwrap().global_rate_limit);
    let message = refused(with(base(), "/global_rate_limit", json!("yes")));
    assert!(
        message.contains("global_rate_limit: expected true or false"),
        "{message}"
    );
    let clash = with(global, "/cluster_header", json!("X-Azure-OpenAI-Caller"));
    assert!(refused(clash).contains("cluster_header: is a header the filter sets"));
}

#[test]
fn extra_upstream_headers_are_read_from_secrets_and_checked() {
    let config = with(
        base(),
        "/upstreams/west/headers",
        json!({
            "Ocp-Apim-Subscription-Key": {"env": "AZURE_EAST_KEY"},
            "x-corp-proxy": {"value": "proxy token 1"}
        }),
    );
    let config = load(&config).unwrap();
    let headers: Vec<(&str, &str)> = config.upstreams[0]
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.expose()))
        .collect();
    assert_eq!(
        headers,
        [
            ("ocp-apim-subscription-key", "east-secret"),
            ("x-corp-proxy", "proxy token 1")
        ]
    );
    assert!(!format!("{config:?}").contains("east-secret"));
    let field = "upstreams.west.headers";
    for (name, value, expected) in [
        ("connection", json!({"value": "x"}), "hop-by-hop"),
        ("Transfer-Encoding", json!({"value": "x"}), "hop-by-hop"),
        (":authority", json!({"value": "x"}), "pseudo-header"),
        ("api-key", json!({"value": "x"}), "sets or removes itself"),
        (
            "Authorization",
            json!({"value": "x"}),
            "sets or removes itself",
        ),
        (
            "x-azure-openai-cluster",
            json!({"value": "x"}),
            "sets or removes itself",
        ),
        (
            "content-length",
            json!({"value": "1"}),
            "sets or removes itself",
        ),
        ("host", json!({"value": "x"}), "sets or removes itself"),
        (
            "x-envoy-upstream-rq-timeout-ms",
            json!({"value": "1"}),
            "Envoy's own",
        ),
        (
            "bad header",
            json!({"value": "x"}),
            "not a valid header name",
        ),
        ("", json!({"value": "x"}), "not a valid header name"),
        ("x-a", json!({"value": "line\r\nbreak"}), "cannot carry"),
        ("x-a", json!({"value": " padded"}), "cannot carry"),
        ("x-a", json!({"value": "caf\u{e9}"}), "cannot carry"),
        (
            "x-a",
            json!({"env": "MISSING"}),
            "not visible to the filter",
        ),
        ("x-a", json!("plain"), "expected an object"),
    ] {
        let headers = json!({ name: value });
        let message = refused(with(base(), "/upstreams/west/headers", headers));
        assert!(
            message.contains(&format!("{field}.{name}")) && message.contains(expected),
            "{name}: {message}"
        );
        assert!(!message.contains("line\r\nbreak") && !message.contains("padded"));
    }
    let twice = json!({"X-A": {"value": "1"}, "x-a": {"value": "2"}});
    let message = refused(with(base(), "/upstreams/west/headers", twice));
    assert!(message.contains("names a header twice"), "{message}");
}

#[test]
fn caller_credentials_name_known_callers_and_a_free_header() {
    let allowed = with(
        base(),
        "/upstreams/west/caller_credentials",
        json!({"callers": ["team-a"]}),
    );
    let config = load(&allowed).unwrap();
    let keys = config.upstreams[0].caller_keys.as_ref().unwrap();
    assert_eq!(keys.header, "x-upstream-api-key");
    assert!(keys.allows("team-a") && !keys.allows("ops"));
    assert_eq!(config.caller_key_headers, ["x-upstream-api-key"]);
    let everyone = with(
        base(),
        "/upstreams/west/caller_credentials",
        json!({"callers": ["*"], "header": "X-Tenant-Key"}),
    );
    let config = load(&everyone).unwrap();
    let keys = config.upstreams[0].caller_keys.as_ref().unwrap();
    assert!(keys.allows("ops") && keys.header == "x-tenant-key");
    assert_eq!(
        config.caller_key_headers,
        ["x-upstream-api-key", "x-tenant-key"]
    );
    // Without caller_credentials the default header is still known (and refused).
    assert_eq!(
        load(&base()).unwrap().caller_key_headers,
        ["x-upstream-api-key"]
    );
    let field = "upstreams.west.caller_credentials";
    for (value, expected) in [
        (
            json!({"callers": ["nobody"]}),
            "callers[0]: no caller is named `nobody`",
        ),
        (json!({"callers": []}), "callers: name the callers"),
        (
            json!({"callers": ["*", "ops"]}),
            "callers: `*` stands alone",
        ),
        (json!({}), "callers"),
        (
            json!({"callers": ["ops"], "header": "api-key"}),
            "header: is a header the filter",
        ),
        (
            json!({"callers": ["ops"], "header": "x-ms-key"}),
            "header: is an Azure header",
        ),
        (
            json!({"callers": ["ops"], "header": "x y"}),
            "header: is not a valid header name",
        ),
        (json!({"callers": ["ops"], "extra": 1}), "extra"),
    ] {
        let message = refused(with(
            base(),
            "/upstreams/west/caller_credentials",
            value.clone(),
        ));
        assert!(
            message.contains(&format!("{field}.{expected}"))
                || message.contains(&format!("{field}: ")) && message.contains(expected),
            "{value}: {message}"
        );
    }
    let openai = json!({
        "upstreams": {"vllm": {"kind": "openai", "endpoint": "http://vllm:8000/v1",
                               "cluster": "vllm", "auth": {"bearer": {"value": "t"}},
                               "caller_credentials": {"callers": ["*"]}}},
        "models": {"m": {"upstream": "vllm", "deployment": "m"}},
        "callers": [{"name": "a", "key_sha256": TEAM_A_HASH, "models": ["*"]}]
    });
    assert!(refused(openai).contains("upstreams.vllm.caller_credentials: applies to Azure"));
}
