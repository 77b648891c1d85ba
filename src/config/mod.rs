//! The filter's configuration: parsed once at load, validated, then frozen
//! into the structure every request reads. Each refusal names the JSON path
//! of the offending field and says what to change.

mod api_version;
mod credential;
mod endpoint;
mod raw;
mod upstream;

use std::collections::BTreeMap;
use std::fmt;

/// The operations an upstream serves (`Upstream::operation_path`), for the
/// command-line tool, which sees only this module.
pub use crate::routes::Operation;
pub use api_version::{DEFAULT_API_VERSION, DEFAULT_PREVIEW_API_VERSION};
pub use credential::Credential;
pub use endpoint::{parse_endpoint, Endpoint};
use raw::{RawCaller, RawConfig, RawModel, RawSecret};
pub use upstream::{Flavor, Upstream, UpstreamAuth};

/// Looks up an environment variable of the Wasm VM.
type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

use crate::json::Json;
use crate::secret::Secret;

pub const DEFAULT_CLUSTER_HEADER: &str = "x-azure-openai-cluster";
/// 32 MiB: above OpenAI's 25 MB upload limit, with room for multipart framing.
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: usize = 32 * 1024 * 1024;
const MAX_REQUEST_BODY_BYTES_CEILING: u64 = 256 * 1024 * 1024;

/// Headers the filter itself reads or writes; none may serve as the routing header.
const RESERVED_HEADERS: &[&str] = &[
    "authorization",
    "api-key",
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
];

/// A configuration refused at load: where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

impl std::error::Error for ConfigError {}

fn error(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        path: path.into(),
        message: message.into(),
    }
}

/// The validated configuration shared by every request.
#[derive(Debug)]
pub struct Config {
    pub cluster_header: String,
    pub max_request_body_bytes: usize,
    /// Publish what Envoy's rate-limit filter needs (descriptor headers and
    /// the tokens a request used).
    pub global_rate_limit: bool,
    /// Publish the request's fields for Envoy's access log (filter state
    /// `wasm.azure_openai`).
    pub access_log: bool,
    /// The request headers in which callers may send their own upstream
    /// key (`x-upstream-api-key` and each upstream's own name for it).
    pub caller_key_headers: Vec<String>,
    pub upstreams: Vec<Upstream>,
    pub models: Vec<Model>,
    /// Every deployment some model uses, once.
    pub targets: Vec<Target>,
    pub callers: Vec<Caller>,
    /// Token credentials, shared by upstreams with the same identity.
    pub credentials: Vec<Credential>,
    /// Where stored responses (`/v1/responses/{id}`) live.
    pub responses_upstream: Option<usize>,
    model_index: BTreeMap<String, usize>,
}

#[derive(Debug)]
pub struct Model {
    pub alias: String,
    /// Where requests for it go (at least one): lower priority first,
    /// weighted within a priority.
    pub targets: Vec<ModelTarget>,
}

/// A deployment on an upstream. Aliases that name the same one share it,
/// and with it its cooldown.
#[derive(Debug)]
pub struct Target {
    /// Index into `Config::upstreams`.
    pub upstream: usize,
    pub deployment: String,
    /// Shared-data key of its cooldown (the same in every worker).
    pub cooldown_key: String,
}

/// A target as one model uses it.
#[derive(Debug, Clone)]
pub struct ModelTarget {
    /// Index into `Config::targets`.
    pub target: usize,
    pub priority: u32,
    pub weight: u32,
    /// Sent as `x-ms-spillover-deployment`: Azure overflows a provisioned
    /// deployment to this one.
    pub spillover: Option<String>,
}

impl Model {
    /// The first target, which a single-target model has alone.
    pub fn primary(&self) -> Option<&ModelTarget> {
        self.targets.first()
    }
}

/// Weights are 1 to this (a relative share within a priority).
const MAX_WEIGHT: u64 = 1_000_000;

#[derive(Debug)]
pub struct Caller {
    pub name: String,
    pub key_sha256: [u8; 32],
    pub access: ModelAccess,
    /// Requests and tokens per minute, across all its models.
    pub limits: Option<CallerLimits>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerLimits {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
}

/// Limits are 1 to this.
const MAX_LIMIT: u64 = 1_000_000_000_000;

#[derive(Debug, PartialEq, Eq)]
pub enum ModelAccess {
    Any,
    /// Sorted indices into `Config::models`.
    Only(Vec<usize>),
}

impl Caller {
    pub fn may_use(&self, model: usize) -> bool {
        match &self.access {
            ModelAccess::Any => true,
            ModelAccess::Only(allowed) => allowed.binary_search(&model).is_ok(),
        }
    }
}

impl Config {
    /// The models a caller may use, in configuration order.
    pub fn models_of<'a>(&'a self, caller: &'a Caller) -> impl Iterator<Item = &'a Model> + 'a {
        self.models
            .iter()
            .enumerate()
            .filter(move |(index, _)| caller.may_use(*index))
            .map(|(_, model)| model)
    }
}

impl Config {
    /// Parses and validates the plugin configuration. `env` looks up the
    /// environment variables Envoy hands the VM (`std::env::var` in the filter).
    pub fn from_json(
        json: &[u8],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        if json.iter().all(u8::is_ascii_whitespace) {
            return Err(error(
                "configuration",
                "is empty; the filter needs its JSON configuration (a google.protobuf.StringValue)",
            ));
        }
        if json.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(error("configuration", "must be a JSON object"));
        }
        let json = Json::parse(json).map_err(|e| error("configuration", e.to_string()))?;
        let raw = RawConfig::read(&json)?;
        validate(raw, env)
    }

    /// The model with this alias, and its index.
    pub fn model(&self, alias: &str) -> Option<(usize, &Model)> {
        let index = *self.model_index.get(alias)?;
        self.models.get(index).map(|model| (index, model))
    }

    pub fn upstream(&self, index: usize) -> Option<&Upstream> {
        self.upstreams.get(index)
    }

    pub fn caller(&self, index: usize) -> Option<&Caller> {
        self.callers.get(index)
    }

    pub fn credential(&self, index: usize) -> Option<&Credential> {
        self.credentials.get(index)
    }

    pub fn target(&self, index: usize) -> Option<&Target> {
        self.targets.get(index)
    }

    /// A target and its upstream.
    pub fn target_upstream(&self, index: usize) -> Option<(&Target, &Upstream)> {
        let target = self.targets.get(index)?;
        Some((target, self.upstreams.get(target.upstream)?))
    }
}

fn validate(raw: RawConfig, env: Env) -> Result<Config, ConfigError> {
    let default_api_version = match raw.api_version {
        Some(version) if api_version::is_dated(&version) => version,
        Some(version) => {
            return Err(error(
                "api_version",
                format!(
                "`{version}` is not an Azure OpenAI api-version (YYYY-MM-DD or YYYY-MM-DD-preview)"
            ),
            ))
        }
        None => DEFAULT_API_VERSION.to_string(),
    };
    let cluster_header = match raw.cluster_header {
        Some(name) => check_cluster_header(name)?,
        None => DEFAULT_CLUSTER_HEADER.to_string(),
    };
    let global_rate_limit = raw.global_rate_limit.unwrap_or(false);
    if global_rate_limit
        && ["x-azure-openai-caller", "x-azure-openai-model"].contains(&cluster_header.as_str())
    {
        return Err(error(
            "cluster_header",
            "is a header the filter sets for global_rate_limit; choose another name",
        ));
    }
    let max_request_body_bytes = check_max_body(raw.max_request_body_bytes)?;
    let caller_names: Vec<String> = raw.callers.iter().map(|c| c.name.clone()).collect();
    let context = upstream::Context {
        default_api_version: &default_api_version,
        env,
        cluster_header: &cluster_header,
        caller_names: &caller_names,
    };
    let (upstreams, credentials) = validate_upstreams(raw.upstreams, &context)?;
    // Every header a caller's own key may come in: refused wherever it is
    // not allowed, and never forwarded under its own name.
    let mut caller_key_headers = vec![upstream::DEFAULT_CALLER_KEY_HEADER.to_string()];
    for keys in upstreams.iter().filter_map(|u| u.caller_keys.as_ref()) {
        if !caller_key_headers.contains(&keys.header) {
            caller_key_headers.push(keys.header.clone());
        }
    }
    let responses_upstream = match raw.responses_upstream {
        Some(name) => Some(upstream_index(&upstreams, "responses_upstream", &name)?),
        // With one upstream there is no doubt where responses live.
        None => (upstreams.len() == 1).then_some(0),
    };
    let mut targets = Vec::new();
    let (models, model_index) = validate_models(raw.models, &upstreams, &mut targets)?;
    let callers = validate_callers(raw.callers, &model_index)?;
    Ok(Config {
        cluster_header,
        max_request_body_bytes,
        global_rate_limit,
        access_log: raw.access_log.unwrap_or(false),
        caller_key_headers,
        upstreams,
        models,
        targets,
        callers,
        credentials,
        responses_upstream,
        model_index,
    })
}

fn check_max_body(raw: Option<u64>) -> Result<usize, ConfigError> {
    match raw {
        None => Ok(DEFAULT_MAX_REQUEST_BODY_BYTES),
        Some(0) => Err(error("max_request_body_bytes", "must be greater than 0")),
        Some(n) if n > MAX_REQUEST_BODY_BYTES_CEILING => Err(error(
            "max_request_body_bytes",
            format!("{n} is above the ceiling of {MAX_REQUEST_BODY_BYTES_CEILING} bytes"),
        )),
        Some(n) => usize::try_from(n).map_err(|_| error("max_request_body_bytes", "too large")),
    }
}

/// The upstreams, and the token credentials they share.
fn validate_upstreams(
    raw: Vec<(String, raw::RawUpstream)>,
    context: &upstream::Context<'_>,
) -> Result<(Vec<Upstream>, Vec<Credential>), ConfigError> {
    if raw.is_empty() {
        return Err(error("upstreams", "must name at least one upstream"));
    }
    let mut upstreams = Vec::with_capacity(raw.len());
    let mut credentials = Vec::new();
    for (name, upstream) in raw {
        upstreams.push(upstream::validate(
            name,
            upstream,
            context,
            &mut credentials,
        )?);
    }
    Ok((upstreams, credentials))
}

/// The models, and the index from alias to model.
fn validate_models(
    raw: Vec<(String, RawModel)>,
    upstreams: &[Upstream],
    targets: &mut Vec<Target>,
) -> Result<(Vec<Model>, BTreeMap<String, usize>), ConfigError> {
    if raw.is_empty() {
        return Err(error(
            "models",
            "must map at least one model alias to a deployment",
        ));
    }
    let mut models = Vec::with_capacity(raw.len());
    let mut model_index = BTreeMap::new();
    for (alias, model) in raw {
        let model = validate_model(alias, model, upstreams, targets)?;
        model_index.insert(model.alias.clone(), models.len());
        models.push(model);
    }
    Ok((models, model_index))
}

fn validate_callers(
    raw: Vec<RawCaller>,
    model_index: &BTreeMap<String, usize>,
) -> Result<Vec<Caller>, ConfigError> {
    if raw.is_empty() {
        return Err(error(
            "callers",
            "must list at least one caller; without callers every request is refused",
        ));
    }
    let mut callers: Vec<Caller> = Vec::with_capacity(raw.len());
    for (i, caller) in raw.into_iter().enumerate() {
        let caller = validate_caller(i, caller, model_index)?;
        if let Some((j, other)) = callers
            .iter()
            .enumerate()
            .find(|(_, c)| c.name == caller.name)
        {
            return Err(error(
                format!("callers[{i}].name"),
                format!("duplicate caller name `{}` (also callers[{j}])", other.name),
            ));
        }
        if let Some((j, other)) = callers
            .iter()
            .enumerate()
            .find(|(_, c)| c.key_sha256 == caller.key_sha256)
        {
            return Err(error(
                format!("callers[{i}].key_sha256"),
                format!(
                    "same key hash as callers[{j}] (`{}`); every caller needs its own key",
                    other.name
                ),
            ));
        }
        callers.push(caller);
    }
    Ok(callers)
}

/// Names, aliases and deployments are labels of the filter's metrics, carried
/// in Envoy stat names as `label=.=value;.;`: a value holding `;` or `=`
/// would break that encoding.
pub(super) fn check_label(path: &str, value: &str) -> Result<(), ConfigError> {
    if value.contains(';') || value.contains('=') {
        return Err(error(
            path,
            format!(
                "`{value}` cannot hold `;` or `=`: it is a label of the filter's metrics \
                 (Envoy stat tags)"
            ),
        ));
    }
    Ok(())
}

fn upstream_index(upstreams: &[Upstream], path: &str, name: &str) -> Result<usize, ConfigError> {
    upstreams
        .iter()
        .position(|u| u.name == name)
        .ok_or_else(|| {
            error(
                path,
                format!(
                    "unknown upstream `{name}`; known upstreams: {}",
                    join(upstreams.iter().map(|u| u.name.as_str()))
                ),
            )
        })
}

/// The name of an Envoy cluster: printable ASCII without spaces.
pub(super) fn check_cluster(path: &str, cluster: String) -> Result<String, ConfigError> {
    if cluster.is_empty() || !cluster.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(error(
            path,
            "must be the name of an Envoy cluster (printable ASCII, no spaces)",
        ));
    }
    Ok(cluster)
}

fn validate_model(
    alias: String,
    raw: RawModel,
    upstreams: &[Upstream],
    targets: &mut Vec<Target>,
) -> Result<Model, ConfigError> {
    let path = format!("models.{alias}");
    if alias.is_empty() || alias != alias.trim() || alias.chars().any(char::is_control) {
        return Err(error(
            path,
            "a model alias must be non-empty, without surrounding spaces or control characters",
        ));
    }
    if alias == "*" {
        return Err(error(
            path,
            "`*` is reserved for caller allowlists meaning every model",
        ));
    }
    check_label(&path, &alias)?;
    let mut model_targets: Vec<ModelTarget> = Vec::with_capacity(raw.targets.len());
    for raw in raw.targets {
        let model_target = validate_target(raw, upstreams, targets)?;
        model_targets.push(model_target);
    }
    for (i, a) in model_targets.iter().enumerate() {
        if let Some(j) = model_targets
            .iter()
            .skip(i + 1)
            .position(|b| b.target == a.target)
        {
            return Err(error(
                format!("{path}.targets[{}]", i + 1 + j),
                format!("the same upstream and deployment as {path}.targets[{i}]"),
            ));
        }
    }
    Ok(Model {
        alias,
        targets: model_targets,
    })
}

/// A target of a model; the same upstream and deployment is one target for
/// every model that names it.
fn validate_target(
    raw: raw::RawTarget,
    upstreams: &[Upstream],
    targets: &mut Vec<Target>,
) -> Result<ModelTarget, ConfigError> {
    let path = raw.path;
    check_label(&format!("{path}.deployment"), &raw.deployment)?;
    let upstream = upstream_index(upstreams, &format!("{path}.upstream"), &raw.upstream)?;
    let flavor = upstreams.get(upstream).map(|u| &u.flavor);
    let in_path = matches!(flavor, Some(Flavor::AzureDeployments { .. }));
    check_deployment(&format!("{path}.deployment"), &raw.deployment, in_path)?;
    if let Some(spillover) = &raw.spillover_deployment {
        let field = format!("{path}.spillover_deployment");
        if !matches!(
            flavor,
            Some(Flavor::AzureDeployments { .. } | Flavor::AzureV1 { .. })
        ) {
            return Err(error(field, "applies to Azure upstreams only"));
        }
        check_deployment(&field, spillover, true)?;
    }
    let weight = match raw.weight {
        None => 1,
        Some(0) => {
            return Err(error(
                format!("{path}.weight"),
                "must be at least 1 (leave the target out to send it nothing)",
            ))
        }
        Some(w) if w > MAX_WEIGHT => {
            return Err(error(
                format!("{path}.weight"),
                format!("must be at most {MAX_WEIGHT}"),
            ))
        }
        Some(w) => w as u32,
    };
    let priority = match raw.priority {
        None => 0,
        Some(p) => u32::try_from(p)
            .ok()
            .filter(|&p| p <= 1000)
            .ok_or_else(|| error(format!("{path}.priority"), "must be 0 to 1000"))?,
    };
    let index = match targets
        .iter()
        .position(|t| t.upstream == upstream && t.deployment == raw.deployment)
    {
        Some(index) => index,
        None => {
            let name = upstreams.get(upstream).map_or("", |u| u.name.as_str());
            targets.push(Target {
                upstream,
                cooldown_key: format!("azure_openai_filter/cooldown/{name}/{}", raw.deployment),
                deployment: raw.deployment,
            });
            targets.len() - 1
        }
    };
    Ok(ModelTarget {
        target: index,
        priority,
        weight,
        spillover: raw.spillover_deployment,
    })
}

fn validate_caller(
    i: usize,
    raw: RawCaller,
    model_index: &BTreeMap<String, usize>,
) -> Result<Caller, ConfigError> {
    let path = format!("callers[{i}]");
    if raw.name.trim().is_empty() || raw.name.chars().any(char::is_control) {
        return Err(error(
            format!("{path}.name"),
            "must be a non-empty name without control characters",
        ));
    }
    check_label(&format!("{path}.name"), &raw.name)?;
    let key_sha256 =
        parse_sha256_hex(&raw.key_sha256).map_err(|m| error(format!("{path}.key_sha256"), m))?;
    let limits = match raw.limits {
        None => None,
        Some((path, requests, tokens)) => Some(check_limits(&path, requests, tokens)?),
    };

    if raw.models.is_empty() {
        return Err(error(
            format!("{path}.models"),
            "must list at least one model alias, or \"*\" for every model",
        ));
    }
    let mut allowed = Vec::with_capacity(raw.models.len());
    for (j, alias) in raw.models.iter().enumerate() {
        let item = format!("{path}.models[{j}]");
        if alias == "*" {
            if raw.models.len() > 1 {
                return Err(error(
                    item,
                    "\"*\" already allows every model; it must be the only entry",
                ));
            }
            return Ok(Caller {
                name: raw.name,
                key_sha256,
                access: ModelAccess::Any,
                limits,
            });
        }
        let index = *model_index.get(alias).ok_or_else(|| {
            error(
                item.clone(),
                format!(
                    "unknown model alias `{alias}`; known aliases: {}",
                    join(model_index.keys().map(String::as_str))
                ),
            )
        })?;
        if allowed.contains(&index) {
            return Err(error(item, format!("`{alias}` is listed twice")));
        }
        allowed.push(index);
    }
    allowed.sort_unstable();
    Ok(Caller {
        name: raw.name,
        key_sha256,
        access: ModelAccess::Only(allowed),
        limits,
    })
}

pub(super) fn resolve_secret(path: &str, raw: RawSecret, env: Env) -> Result<Secret, ConfigError> {
    let (value, path) = match raw {
        RawSecret::Env(name) => {
            let path = format!("{path}.env");
            if name.is_empty() {
                return Err(error(path, "must name an environment variable"));
            }
            match env(&name) {
                Some(value) if !value.is_empty() => (value, path),
                Some(_) => return Err(error(path, format!("environment variable `{name}` is empty"))),
                None => {
                    return Err(error(
                        path,
                        format!(
                            "environment variable `{name}` is not visible to the filter; set it in \
                             Envoy's environment and list it in vm_config.environment_variables.host_env_keys"
                        ),
                    ))
                }
            }
        }
        RawSecret::Value(value) => {
            let path = format!("{path}.value");
            if value.is_empty() {
                return Err(error(path, "must not be empty"));
            }
            (value, path)
        }
    };
    // The secret ends up in a header: refuse what a header cannot carry,
    // without echoing the value.
    if !value.bytes().all(|b| b.is_ascii_graphic() || b == b' ') || value.trim() != value {
        return Err(error(
            path,
            "the secret contains characters a header cannot carry (control characters, \
             non-ASCII, or surrounding spaces)",
        ));
    }
    Ok(Secret::new(value))
}

fn check_limits(
    path: &str,
    requests: Option<u64>,
    tokens: Option<u64>,
) -> Result<CallerLimits, ConfigError> {
    for (field, value) in [
        ("requests_per_minute", requests),
        ("tokens_per_minute", tokens),
    ] {
        if let Some(value) = value {
            if value == 0 || value > MAX_LIMIT {
                return Err(error(
                    format!("{path}.{field}"),
                    format!("must be 1 to {MAX_LIMIT}"),
                ));
            }
        }
    }
    if requests.is_none() && tokens.is_none() {
        return Err(error(
            path,
            "set requests_per_minute, tokens_per_minute or both (or leave limits out)",
        ));
    }
    Ok(CallerLimits {
        requests_per_minute: requests,
        tokens_per_minute: tokens,
    })
}

fn check_cluster_header(name: String) -> Result<String, ConfigError> {
    let name = name.to_ascii_lowercase();
    let token = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !token {
        return Err(error(
            "cluster_header",
            format!("`{name}` is not a valid header name"),
        ));
    }
    if RESERVED_HEADERS.contains(&name.as_str()) {
        return Err(error(
            "cluster_header",
            format!("`{name}` is a header the filter reads or rewrites; choose another name"),
        ));
    }
    Ok(name)
}

/// Deployment names that go into the URL path: letters, digits, `-`,
/// `_`, `.`. Names that go into the body (v1 API, OpenAI-compatible
/// servers, whose model names often hold `/` or `:`) need only be text.
fn check_deployment(path: &str, deployment: &str, in_path: bool) -> Result<(), ConfigError> {
    if deployment.is_empty() {
        return Err(error(path, "must not be empty"));
    }
    if !in_path {
        if deployment.chars().any(char::is_control) || deployment.len() > 256 {
            return Err(error(
                path,
                "must be text without control characters, at most 256 bytes",
            ));
        }
        return Ok(());
    }
    let valid = deployment
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && deployment != "."
        && deployment != "..";
    if !valid {
        return Err(error(
            path,
            format!("`{deployment}` is not a deployment name (letters, digits, `-`, `_`, `.`)"),
        ));
    }
    Ok(())
}

fn parse_sha256_hex(text: &str) -> Result<[u8; 32], String> {
    let hint = "must be the SHA-256 of the caller key as 64 lowercase hex digits \
                (for example: printf %s \"$KEY\" | sha256sum)";
    if text.len() != 64 {
        return Err(format!("{hint}; got {} characters", text.len()));
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        match pair {
            [hi, lo] => match (digit(*hi), digit(*lo)) {
                (Some(hi), Some(lo)) => *byte = hi << 4 | lo,
                _ => return Err(format!("{hint}; found a character outside 0-9a-f")),
            },
            _ => return Err(hint.to_string()),
        }
    }
    Ok(out)
}

fn join<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names.collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests;
