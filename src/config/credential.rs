//! Token credentials (Entra ID client credentials, managed identity): the
//! identity endpoint request each one needs, worked out once at load.

use sha2::{Digest, Sha256};

use super::endpoint::parse_endpoint;
use super::raw::{Cloud, RawEntra, RawManagedIdentity};
use super::{check_cluster, error, resolve_secret, ConfigError, Env};
use crate::secret::Secret;

pub const DEFAULT_TOKEN_TIMEOUT_MS: u64 = 5_000;
pub const DEFAULT_MAX_WAIT_MS: u64 = 10_000;
const MAX_TOKEN_TIMEOUT_MS: u64 = 60_000;
const MAX_MAX_WAIT_MS: u64 = 300_000;
const IMDS_AUTHORITY: &str = "169.254.169.254";

/// A credential whose upstream requests carry `Authorization: Bearer <token>`.
#[derive(Debug)]
pub struct Credential {
    /// The upstreams that use it, for log lines ("west, east").
    pub label: String,
    /// The Envoy cluster of the identity endpoint.
    pub cluster: String,
    pub request: TokenRequest,
    /// How long one token request may take.
    pub timeout_ms: u64,
    /// How long a request may wait for a token before it gets a 503.
    pub max_wait_ms: u64,
    /// Shared-data key of this credential's token state: the same identity
    /// gets the same key in every worker and across reloads.
    pub shared_key: String,
}

/// The HTTP request that fetches a token.
#[derive(Debug)]
pub struct TokenRequest {
    pub method: &'static str,
    pub authority: String,
    pub path: String,
    /// Extra headers (beyond `:method`, `:path`, `:authority`).
    pub headers: Vec<(&'static str, &'static str)>,
    /// The form body; it holds the client secret.
    pub body: Option<Secret>,
}

struct CloudNames {
    authority_host: &'static str,
    scope: &'static str,
    resource: &'static str,
}

fn cloud_names(cloud: Option<Cloud>) -> CloudNames {
    match cloud.unwrap_or(Cloud::Public) {
        Cloud::Public => CloudNames {
            authority_host: "https://login.microsoftonline.com",
            scope: "https://cognitiveservices.azure.com/.default",
            resource: "https://cognitiveservices.azure.com/",
        },
        Cloud::Usgov => CloudNames {
            authority_host: "https://login.microsoftonline.us",
            scope: "https://cognitiveservices.azure.us/.default",
            resource: "https://cognitiveservices.azure.us/",
        },
        Cloud::China => CloudNames {
            authority_host: "https://login.chinacloudapi.cn",
            scope: "https://cognitiveservices.azure.cn/.default",
            resource: "https://cognitiveservices.azure.cn/",
        },
    }
}

pub fn entra(path: &str, raw: RawEntra, env: Env) -> Result<Credential, ConfigError> {
    let names = cloud_names(raw.cloud);
    check_tenant(&format!("{path}.tenant_id"), &raw.tenant_id)?;
    check_guid(&format!("{path}.client_id"), &raw.client_id)?;
    let secret = resolve_secret(&format!("{path}.client_secret"), raw.client_secret, env)?;
    let cluster = check_cluster(&format!("{path}.token_cluster"), raw.token_cluster)?;
    let authority_host = raw
        .authority_host
        .as_deref()
        .unwrap_or(names.authority_host);
    let authority = parse_endpoint(authority_host)
        .map_err(|m| error(format!("{path}.authority_host"), m))?
        .authority();
    let scope = raw.scope.unwrap_or_else(|| names.scope.to_string());
    check_text(&format!("{path}.scope"), &scope)?;

    let form = format!(
        "grant_type=client_credentials&client_id={}&client_secret={}&scope={}",
        form_encode(&raw.client_id),
        form_encode(secret.expose()),
        form_encode(&scope)
    );
    let secret_digest = hex(&Sha256::digest(secret.expose().as_bytes()));
    let identity = format!(
        "entra\n{authority}\n{}\n{}\n{scope}\n{secret_digest}\n{cluster}",
        raw.tenant_id, raw.client_id
    );
    Ok(Credential {
        label: String::new(),
        shared_key: shared_key(&identity),
        request: TokenRequest {
            method: "POST",
            path: format!("/{}/oauth2/v2.0/token", raw.tenant_id),
            authority,
            headers: vec![
                ("content-type", "application/x-www-form-urlencoded"),
                ("accept", "application/json"),
            ],
            body: Some(Secret::new(form)),
        },
        cluster,
        timeout_ms: timeout(path, raw.timeout_ms)?,
        max_wait_ms: max_wait(path, raw.max_wait_ms)?,
    })
}

pub fn managed_identity(path: &str, raw: RawManagedIdentity) -> Result<Credential, ConfigError> {
    let names = cloud_names(raw.cloud);
    let cluster = check_cluster(&format!("{path}.imds_cluster"), raw.imds_cluster)?;
    let resource = raw.resource.unwrap_or_else(|| names.resource.to_string());
    check_text(&format!("{path}.resource"), &resource)?;

    let mut query = format!("api-version=2018-02-01&resource={}", form_encode(&resource));
    let chosen = [
        ("client_id", raw.client_id),
        ("object_id", raw.object_id),
        ("msi_res_id", raw.msi_res_id),
    ];
    let mut named = chosen
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (*k, v)));
    if let Some((key, value)) = named.next() {
        if let Some((other, _)) = named.next() {
            return Err(error(
                format!("{path}.{other}"),
                format!("choose the identity with one of client_id, object_id or msi_res_id, not both {key} and {other}"),
            ));
        }
        if key == "msi_res_id" {
            if !value.starts_with("/subscriptions/") || value.chars().any(char::is_whitespace) {
                return Err(error(
                    format!("{path}.msi_res_id"),
                    "must be the identity's Azure resource ID (/subscriptions/.../userAssignedIdentities/...)",
                ));
            }
        } else {
            check_guid(&format!("{path}.{key}"), value)?;
        }
        query.push_str(&format!("&{key}={}", form_encode(value)));
    }
    let request_path = format!("/metadata/identity/oauth2/token?{query}");
    let identity = format!("managed_identity\n{request_path}\n{cluster}");
    Ok(Credential {
        label: String::new(),
        shared_key: shared_key(&identity),
        request: TokenRequest {
            method: "GET",
            authority: IMDS_AUTHORITY.to_string(),
            path: request_path,
            headers: vec![("metadata", "true")],
            body: None,
        },
        cluster,
        timeout_ms: timeout(path, raw.timeout_ms)?,
        max_wait_ms: max_wait(path, raw.max_wait_ms)?,
    })
}

fn timeout(path: &str, value: Option<u64>) -> Result<u64, ConfigError> {
    match value.unwrap_or(DEFAULT_TOKEN_TIMEOUT_MS) {
        n @ 1..=MAX_TOKEN_TIMEOUT_MS => Ok(n),
        n => Err(error(
            format!("{path}.timeout_ms"),
            format!("{n} is outside 1..={MAX_TOKEN_TIMEOUT_MS}"),
        )),
    }
}

fn max_wait(path: &str, value: Option<u64>) -> Result<u64, ConfigError> {
    match value.unwrap_or(DEFAULT_MAX_WAIT_MS) {
        n @ 0..=MAX_MAX_WAIT_MS => Ok(n),
        n => Err(error(
            format!("{path}.max_wait_ms"),
            format!("{n} is outside 0..={MAX_MAX_WAIT_MS}"),
        )),
    }
}

fn shared_key(identity: &str) -> String {
    let digest = Sha256::digest(identity.as_bytes());
    format!(
        "azure-openai-filter.token.{}",
        hex(digest.get(..8).unwrap_or_default())
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `8-4-4-4-12` hexadecimal, as Entra application and object IDs are.
fn check_guid(path: &str, value: &str) -> Result<(), ConfigError> {
    let groups: Vec<&str> = value.split('-').collect();
    let shape = [8, 4, 4, 4, 12];
    let ok = groups.len() == shape.len()
        && groups
            .iter()
            .zip(shape)
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
    if !ok {
        return Err(error(
            path,
            format!("`{value}` is not a GUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)"),
        ));
    }
    Ok(())
}

/// A tenant ID (GUID) or verified domain; the multi-tenant aliases do not
/// work with client credentials.
fn check_tenant(path: &str, value: &str) -> Result<(), ConfigError> {
    if ["common", "organizations", "consumers"].contains(&value.to_ascii_lowercase().as_str()) {
        return Err(error(
            path,
            format!(
                "`{value}` cannot issue client-credential tokens; use the tenant's ID or domain"
            ),
        ));
    }
    let ok = !value.is_empty()
        && value.len() <= 256
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !ok {
        return Err(error(
            path,
            format!("`{value}` is not a tenant ID or domain"),
        ));
    }
    Ok(())
}

fn check_text(path: &str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() || value.chars().any(char::is_control) {
        return Err(error(
            path,
            "must be non-empty text without control characters",
        ));
    }
    Ok(())
}

/// Percent-encodes everything but unreserved characters; valid both in a
/// query string and in an application/x-www-form-urlencoded body.
pub fn form_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
