//! An upstream: where it is, how requests address it (Azure's deployments
//! API, Azure's v1 API, or an OpenAI-compatible server) and how the filter
//! authenticates to it.

use super::api_version::{for_operation, is_dated, serves_include_usage, too_old};
use super::endpoint::{parse_base_url, parse_endpoint, Endpoint};
use super::raw::{RawAuth, RawCallerCredentials, RawUpstream};
use super::{check_cluster, credential, error, resolve_secret, ConfigError, Credential, Env};
use crate::routes::{Operation, StoredTail};
use crate::secret::Secret;

#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub endpoint: Endpoint,
    /// `:authority` for requests to this upstream (derived from the endpoint).
    pub authority: String,
    pub cluster: String,
    pub flavor: Flavor,
    pub auth: UpstreamAuth,
    /// Sent on every request to this upstream (names lower case).
    pub headers: Vec<(String, Secret)>,
    /// Callers that may send their own key for it, and in which header.
    pub caller_keys: Option<CallerKeys>,
}

/// The callers whose own key, sent in `header`, replaces the upstream's.
#[derive(Debug)]
pub struct CallerKeys {
    pub header: String,
    /// None: every caller.
    pub callers: Option<Vec<String>>,
}

impl CallerKeys {
    pub fn allows(&self, caller: &str) -> bool {
        self.callers
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == caller))
    }
}

pub const DEFAULT_CALLER_KEY_HEADER: &str = "x-upstream-api-key";

/// What validating an upstream needs from the rest of the configuration.
pub(super) struct Context<'a> {
    pub default_api_version: &'a str,
    pub env: Env<'a>,
    pub cluster_header: &'a str,
    pub caller_names: &'a [String],
}

#[derive(Debug)]
pub enum Flavor {
    /// `/openai/deployments/{deployment}/{op}?api-version=...`; the
    /// api-version of each operation, indexed by `Operation::index`.
    AzureDeployments { api_versions: Vec<String> },
    /// `/openai/v1/{op}`, the deployment in the body's `model`; no dated
    /// api-version (`?api-version=preview` when `preview`).
    AzureV1 { preview: bool },
    /// `{base_path}/{op}` on an OpenAI-compatible server, the upstream's
    /// model name in the body's `model`.
    OpenAi { base_path: String },
}

#[derive(Debug)]
pub enum UpstreamAuth {
    /// A resource key, sent as `api-key`.
    ApiKey(Secret),
    /// A fixed bearer token, sent as `Authorization: Bearer`.
    Bearer(Secret),
    /// A token from `Config::credentials[i]`, sent as `Authorization: Bearer`.
    Token(usize),
}

impl Upstream {
    /// Whether the deployment (or upstream model name) travels in the
    /// body's `model` rather than in the path.
    pub fn model_in_body(&self, op: Operation) -> bool {
        match self.flavor {
            Flavor::AzureDeployments { .. } => op.resource_level(),
            Flavor::AzureV1 { .. } | Flavor::OpenAi { .. } => true,
        }
    }

    /// Whether a stream of this operation can be asked for its usage
    /// (`stream_options.include_usage`): chat and completions, where the
    /// upstream takes it (on the deployments API, from 2024-09-01-preview).
    pub fn takes_include_usage(&self, op: Operation) -> bool {
        if !matches!(op, Operation::ChatCompletions | Operation::Completions) {
            return false;
        }
        match &self.flavor {
            Flavor::AzureDeployments { api_versions } => api_versions
                .get(op.index())
                .is_some_and(|version| serves_include_usage(version)),
            Flavor::AzureV1 { .. } | Flavor::OpenAi { .. } => true,
        }
    }

    /// Whether answers come in Azure's shapes (to be translated for errors).
    pub fn is_azure(&self) -> bool {
        !matches!(self.flavor, Flavor::OpenAi { .. })
    }

    /// Path and query of an operation for `deployment`.
    pub fn operation_path(&self, op: Operation, deployment: &str) -> String {
        match &self.flavor {
            Flavor::AzureDeployments { api_versions } => {
                let version = api_versions.get(op.index()).map_or("", String::as_str);
                if op.resource_level() {
                    format!("/openai/{}?api-version={version}", op.name())
                } else {
                    format!(
                        "/openai/deployments/{deployment}/{}?api-version={version}",
                        op.name()
                    )
                }
            }
            Flavor::AzureV1 { preview } => {
                format!("/openai/v1/{}{}", op.name(), v1_query(*preview, ""))
            }
            Flavor::OpenAi { base_path } => format!("{base_path}/{}", op.name()),
        }
    }

    /// Path and query of a stored response; `query` is the caller's own
    /// (without api-version), `?`-prefixed or empty.
    pub fn stored_response_path(&self, id: &str, tail: StoredTail, query: &str) -> String {
        let item = format!("responses/{id}{}", tail.suffix());
        match &self.flavor {
            Flavor::AzureDeployments { api_versions } => {
                let version = api_versions
                    .get(Operation::Responses.index())
                    .map_or("", String::as_str);
                let joiner = if query.is_empty() { "?" } else { "&" };
                format!("/openai/{item}{query}{joiner}api-version={version}")
            }
            Flavor::AzureV1 { preview } => {
                format!("/openai/v1/{item}{}", v1_query(*preview, query))
            }
            Flavor::OpenAi { base_path } => format!("{base_path}/{item}{query}"),
        }
    }
}

fn v1_query(preview: bool, query: &str) -> String {
    match (preview, query.is_empty()) {
        (false, _) => query.to_string(),
        (true, true) => "?api-version=preview".to_string(),
        (true, false) => format!("{query}&api-version=preview"),
    }
}

pub(super) fn validate(
    name: String,
    raw: RawUpstream,
    context: &Context<'_>,
    credentials: &mut Vec<Credential>,
) -> Result<Upstream, ConfigError> {
    let (default_api_version, env) = (context.default_api_version, context.env);
    let path = format!("upstreams.{name}");
    if name.is_empty() {
        return Err(error("upstreams", "an upstream name must not be empty"));
    }
    super::check_label(&path, &name)?;
    let openai = match raw.kind.as_deref() {
        None | Some("azure") => false,
        Some("openai") => true,
        Some(other) => {
            return Err(error(
                format!("{path}.kind"),
                format!("unknown kind `{other}`; expected `azure` (the default) or `openai`"),
            ))
        }
    };
    let cluster = check_cluster(&format!("{path}.cluster"), raw.cluster.clone())?;
    let (endpoint, flavor) = if openai {
        openai_flavor(&path, &raw)?
    } else {
        azure_flavor(&path, &raw, default_api_version)?
    };
    let auth = validate_auth(&path, &name, raw.auth, openai, env, credentials)?;
    let mut headers = Vec::with_capacity(raw.headers.len());
    for (field, header, value) in raw.headers {
        let header = check_extra_header(&field, &header, context.cluster_header)?;
        if headers.iter().any(|(h, _)| *h == header) {
            return Err(error(field, "names a header twice (names ignore case)"));
        }
        // A secret is checked to be a value a header can carry.
        let value = resolve_secret(&field, value, env)?;
        headers.push((header, value));
    }
    let caller_keys = match raw.caller_credentials {
        None => None,
        Some(_) if openai => {
            return Err(error(
                format!("{path}.caller_credentials"),
                "applies to Azure upstreams only (a caller's own key goes as `api-key`)",
            ))
        }
        Some(raw) => Some(caller_keys(raw, context, &headers)?),
    };
    Ok(Upstream {
        name,
        authority: endpoint.authority(),
        endpoint,
        cluster,
        flavor,
        auth,
        headers,
        caller_keys,
    })
}

/// Headers Envoy or the filter owns: never the operator's extra headers,
/// nor the one callers send their own key in.
fn reserved_header(name: &str, cluster_header: &str) -> Option<&'static str> {
    const HOP_BY_HOP: [&str; 8] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    ];
    const OWN: [&str; 8] = [
        "api-key",
        "authorization",
        "content-length",
        "host",
        "accept-encoding",
        "x-ms-spillover-deployment",
        "x-azure-openai-caller",
        "x-azure-openai-model",
    ];
    if HOP_BY_HOP.contains(&name) {
        Some("is a hop-by-hop header, which does not travel past Envoy")
    } else if OWN.contains(&name) || name == cluster_header {
        Some("is a header the filter sets or removes itself")
    } else if name.starts_with("x-envoy-") {
        Some("is one of Envoy's own headers")
    } else {
        None
    }
}

/// A header name: an HTTP token, lower-cased; not a pseudo-header nor one
/// Envoy or the filter owns.
fn check_extra_header(path: &str, name: &str, cluster_header: &str) -> Result<String, ConfigError> {
    if name.starts_with(':') {
        return Err(error(
            path,
            "is a pseudo-header; only ordinary headers can be added",
        ));
    }
    let token = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !token {
        return Err(error(path, "is not a valid header name (an HTTP token)"));
    }
    let name = name.to_ascii_lowercase();
    if let Some(why) = reserved_header(&name, cluster_header) {
        return Err(error(path, why));
    }
    Ok(name)
}

fn caller_keys(
    raw: RawCallerCredentials,
    context: &Context<'_>,
    extra: &[(String, Secret)],
) -> Result<CallerKeys, ConfigError> {
    let header = match raw.header {
        None => DEFAULT_CALLER_KEY_HEADER.to_string(),
        Some((field, name)) => {
            let name = check_extra_header(&field, &name, context.cluster_header)?;
            if name.starts_with("x-ms-") {
                return Err(error(
                    field,
                    "is an Azure header (x-ms-*), which the filter removes from requests",
                ));
            }
            if extra.iter().any(|(h, _)| *h == name) {
                return Err(error(field, "is also one of this upstream's extra headers"));
            }
            name
        }
    };
    let callers_path = format!("{}.callers", raw.path);
    if raw.callers.is_empty() {
        return Err(error(
            callers_path,
            "name the callers that may send their own key, or [\"*\"] for all",
        ));
    }
    if raw.callers.iter().any(|(_, name)| name == "*") {
        if raw.callers.len() > 1 {
            return Err(error(callers_path, "`*` stands alone"));
        }
        return Ok(CallerKeys {
            header,
            callers: None,
        });
    }
    let mut callers = Vec::with_capacity(raw.callers.len());
    for (field, name) in raw.callers {
        if !context.caller_names.contains(&name) {
            return Err(error(field, format!("no caller is named `{name}`")));
        }
        callers.push(name);
    }
    Ok(CallerKeys {
        header,
        callers: Some(callers),
    })
}

/// An OpenAI-compatible server: a base URL, and no api-version.
fn openai_flavor(path: &str, raw: &RawUpstream) -> Result<(Endpoint, Flavor), ConfigError> {
    for (field, set) in [
        ("api", raw.api.is_some()),
        ("api_version", raw.api_version.is_some()),
        ("api_versions", !raw.api_versions.is_empty()),
    ] {
        if set {
            return Err(error(
                format!("{path}.{field}"),
                "applies to Azure upstreams only; an `openai` upstream takes no api-version",
            ));
        }
    }
    let (endpoint, base_path) =
        parse_base_url(&raw.endpoint).map_err(|m| error(format!("{path}.endpoint"), m))?;
    Ok((endpoint, Flavor::OpenAi { base_path }))
}

/// An Azure resource: its origin, and the deployments API or the v1 API.
fn azure_flavor(
    path: &str,
    raw: &RawUpstream,
    default_api_version: &str,
) -> Result<(Endpoint, Flavor), ConfigError> {
    let endpoint =
        parse_endpoint(&raw.endpoint).map_err(|m| error(format!("{path}.endpoint"), m))?;
    let flavor = match raw.api.as_deref() {
        None | Some("deployments") => deployments_flavor(path, raw, default_api_version)?,
        Some("v1") => {
            if !raw.api_versions.is_empty() {
                return Err(error(
                    format!("{path}.api_versions"),
                    "the v1 API takes no dated api-version",
                ));
            }
            let preview = match raw.api_version.as_deref() {
                None => false,
                Some("preview") => true,
                Some(other) => {
                    return Err(error(
                        format!("{path}.api_version"),
                        format!("the v1 API takes no dated api-version: omit it, or use \"preview\" (not `{other}`)"),
                    ))
                }
            };
            Flavor::AzureV1 { preview }
        }
        Some(other) => {
            return Err(error(
                format!("{path}.api"),
                format!("unknown API `{other}`; expected `deployments` (the default) or `v1`"),
            ))
        }
    };
    Ok((endpoint, flavor))
}

/// How the filter authenticates to the upstream; token credentials are
/// shared by upstreams with the same identity.
fn validate_auth(
    path: &str,
    name: &str,
    raw: RawAuth,
    openai: bool,
    env: Env,
    credentials: &mut Vec<Credential>,
) -> Result<UpstreamAuth, ConfigError> {
    Ok(match raw {
        RawAuth::ApiKey(_) if openai => return Err(error(
            format!("{path}.auth.api_key"),
            "an `openai` upstream takes `bearer` (sent as Authorization: Bearer), not `api_key`",
        )),
        RawAuth::ApiKey(secret) => UpstreamAuth::ApiKey(resolve_secret(
            &format!("{path}.auth.api_key"),
            secret,
            env,
        )?),
        RawAuth::Bearer(secret) => {
            UpstreamAuth::Bearer(resolve_secret(&format!("{path}.auth.bearer"), secret, env)?)
        }
        RawAuth::Entra(entra) => {
            let credential = credential::entra(&format!("{path}.auth.entra"), entra, env)?;
            UpstreamAuth::Token(share(credentials, credential, name))
        }
        RawAuth::ManagedIdentity(identity) => {
            let credential =
                credential::managed_identity(&format!("{path}.auth.managed_identity"), identity)?;
            UpstreamAuth::Token(share(credentials, credential, name))
        }
    })
}

fn deployments_flavor(
    path: &str,
    raw: &RawUpstream,
    default_api_version: &str,
) -> Result<Flavor, ConfigError> {
    let upstream_version = match &raw.api_version {
        Some(version) => {
            check_dated(&format!("{path}.api_version"), version)?;
            version.as_str()
        }
        None => default_api_version,
    };
    let mut api_versions: Vec<String> = Operation::ALL
        .iter()
        .map(|op| for_operation(*op, upstream_version))
        .collect();
    for (field_path, name, version) in &raw.api_versions {
        let op = Operation::from_name(name).ok_or_else(|| {
            error(
                field_path.clone(),
                format!(
                    "unknown operation `{name}`; expected one of {}",
                    Operation::ALL
                        .iter()
                        .map(|op| format!("`{}`", op.name()))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })?;
        check_dated(field_path, version)?;
        if let Some(first) = too_old(op, version) {
            return Err(error(
                field_path.clone(),
                format!("api-version {version} is too old for {name}; it needs {first} or later"),
            ));
        }
        if let Some(slot) = api_versions.get_mut(op.index()) {
            *slot = version.clone();
        }
    }
    Ok(Flavor::AzureDeployments { api_versions })
}

fn check_dated(path: &str, version: &str) -> Result<(), ConfigError> {
    if !is_dated(version) {
        return Err(error(
            path,
            format!(
                "`{version}` is not an Azure OpenAI api-version (YYYY-MM-DD or YYYY-MM-DD-preview)"
            ),
        ));
    }
    Ok(())
}

/// Upstreams with the same identity share one credential (one token, one
/// refresh); returns its index.
fn share(credentials: &mut Vec<Credential>, credential: Credential, upstream: &str) -> usize {
    let index = match credentials
        .iter()
        .position(|c| c.shared_key == credential.shared_key)
    {
        Some(index) => index,
        None => {
            credentials.push(credential);
            credentials.len() - 1
        }
    };
    if let Some(shared) = credentials.get_mut(index) {
        if !shared.label.is_empty() {
            shared.label.push_str(", ");
        }
        shared.label.push_str(upstream);
    }
    index
}
