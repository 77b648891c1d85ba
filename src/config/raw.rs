//! The configuration JSON exactly as users write it, read field by field so
//! that every refusal names its JSON path: unknown fields, repeated keys,
//! missing fields and wrong types. Meaning is checked in `validate`.

use super::{error, ConfigError};
use crate::json::Json;

pub struct RawConfig {
    pub upstreams: Vec<(String, RawUpstream)>,
    pub models: Vec<(String, RawModel)>,
    pub callers: Vec<RawCaller>,
    pub api_version: Option<String>,
    pub cluster_header: Option<String>,
    pub max_request_body_bytes: Option<u64>,
    pub responses_upstream: Option<String>,
    pub global_rate_limit: Option<bool>,
    pub access_log: Option<bool>,
}

pub struct RawUpstream {
    pub kind: Option<String>,
    pub endpoint: String,
    pub cluster: String,
    pub api: Option<String>,
    pub api_version: Option<String>,
    /// Per operation (`"responses": "2025-04-01-preview"`), with paths.
    pub api_versions: Vec<(String, String, String)>,
    pub auth: RawAuth,
    /// Extra headers sent upstream: (path, name, value).
    pub headers: Vec<(String, String, RawSecret)>,
    pub caller_credentials: Option<RawCallerCredentials>,
}

/// Callers that may send their own key for this upstream.
pub struct RawCallerCredentials {
    pub path: String,
    /// The request header that carries the key (with its path).
    pub header: Option<(String, String)>,
    /// Caller names (or `*`), with their paths.
    pub callers: Vec<(String, String)>,
}

pub enum RawAuth {
    ApiKey(RawSecret),
    Bearer(RawSecret),
    Entra(RawEntra),
    ManagedIdentity(RawManagedIdentity),
}

/// `{"env": "NAME"}` or `{"value": "..."}`.
pub enum RawSecret {
    Env(String),
    Value(String),
}

/// Client credentials against Microsoft Entra ID.
pub struct RawEntra {
    pub tenant_id: String,
    pub client_id: String,
    pub client_secret: RawSecret,
    pub token_cluster: String,
    pub cloud: Option<Cloud>,
    pub authority_host: Option<String>,
    pub scope: Option<String>,
    pub timeout_ms: Option<u64>,
    pub max_wait_ms: Option<u64>,
}

/// A managed identity through the instance metadata service (IMDS).
pub struct RawManagedIdentity {
    pub imds_cluster: String,
    pub client_id: Option<String>,
    pub object_id: Option<String>,
    pub msi_res_id: Option<String>,
    pub cloud: Option<Cloud>,
    pub resource: Option<String>,
    pub timeout_ms: Option<u64>,
    pub max_wait_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cloud {
    Public,
    Usgov,
    China,
}

/// A model alias: one target (`{upstream, deployment}`), or a pool of them
/// (`{targets: [...]}`).
pub struct RawModel {
    pub targets: Vec<RawTarget>,
}

pub struct RawTarget {
    /// The JSON path of the target (`models.x` or `models.x.targets[0]`).
    pub path: String,
    pub upstream: String,
    pub deployment: String,
    pub priority: Option<u64>,
    pub weight: Option<u64>,
    pub spillover_deployment: Option<String>,
}

pub struct RawCaller {
    pub name: String,
    pub key_sha256: String,
    pub models: Vec<String>,
    /// `{requests_per_minute, tokens_per_minute}`, with the field's path.
    pub limits: Option<(String, Option<u64>, Option<u64>)>,
}

impl RawConfig {
    pub fn read(json: &Json) -> Result<Self, ConfigError> {
        let top = Object::new(
            "",
            json,
            &[
                "upstreams",
                "models",
                "callers",
                "api_version",
                "cluster_header",
                "max_request_body_bytes",
                "responses_upstream",
                "global_rate_limit",
                "access_log",
            ],
        )?;
        let upstreams = entries(&top.path_of("upstreams"), top.required("upstreams")?)?
            .into_iter()
            .map(|(path, name, json)| Ok((name, RawUpstream::read(&path, json)?)))
            .collect::<Result<_, ConfigError>>()?;
        let models = entries(&top.path_of("models"), top.required("models")?)?
            .into_iter()
            .map(|(path, alias, json)| Ok((alias, RawModel::read(&path, json)?)))
            .collect::<Result<_, ConfigError>>()?;
        let callers_path = top.path_of("callers");
        let callers = array(&callers_path, top.required("callers")?)?
            .iter()
            .enumerate()
            .map(|(i, json)| RawCaller::read(&format!("{callers_path}[{i}]"), json))
            .collect::<Result<_, ConfigError>>()?;
        Ok(RawConfig {
            upstreams,
            models,
            callers,
            api_version: top.optional_string("api_version")?,
            cluster_header: top.optional_string("cluster_header")?,
            max_request_body_bytes: top.optional_u64("max_request_body_bytes")?,
            responses_upstream: top.optional_string("responses_upstream")?,
            global_rate_limit: top.optional_bool("global_rate_limit")?,
            access_log: top.optional_bool("access_log")?,
        })
    }
}

impl RawUpstream {
    fn read(path: &str, json: &Json) -> Result<Self, ConfigError> {
        let object = Object::new(
            path,
            json,
            &[
                "kind",
                "endpoint",
                "cluster",
                "api",
                "api_version",
                "api_versions",
                "auth",
                "headers",
                "caller_credentials",
            ],
        )?;
        let auth_path = object.path_of("auth");
        let auth = object.required("auth")?;
        let choices = ["api_key", "bearer", "entra", "managed_identity"];
        let auth = match one_of(&auth_path, auth, &choices)? {
            ("api_key", secret) => {
                RawAuth::ApiKey(RawSecret::read(&format!("{auth_path}.api_key"), secret)?)
            }
            ("bearer", secret) => {
                RawAuth::Bearer(RawSecret::read(&format!("{auth_path}.bearer"), secret)?)
            }
            ("entra", entra) => {
                RawAuth::Entra(RawEntra::read(&format!("{auth_path}.entra"), entra)?)
            }
            (_, identity) => RawAuth::ManagedIdentity(RawManagedIdentity::read(
                &format!("{auth_path}.managed_identity"),
                identity,
            )?),
        };
        let api_versions = match object.optional("api_versions") {
            None => Vec::new(),
            Some(json) => entries(&object.path_of("api_versions"), json)?
                .into_iter()
                .map(|(path, op, json)| Ok((path.clone(), op, string(&path, json)?)))
                .collect::<Result<_, ConfigError>>()?,
        };
        let headers = match object.optional("headers") {
            None => Vec::new(),
            Some(json) => entries(&object.path_of("headers"), json)?
                .into_iter()
                .map(|(path, name, json)| {
                    let secret = RawSecret::read(&path, json)?;
                    Ok((path, name, secret))
                })
                .collect::<Result<_, ConfigError>>()?,
        };
        let caller_credentials = match object.optional("caller_credentials") {
            None => None,
            Some(json) => Some(RawCallerCredentials::read(
                &object.path_of("caller_credentials"),
                json,
            )?),
        };
        Ok(RawUpstream {
            headers,
            caller_credentials,
            kind: object.optional_string("kind")?,
            endpoint: object.string("endpoint")?,
            cluster: object.string("cluster")?,
            api: object.optional_string("api")?,
            api_version: object.optional_string("api_version")?,
            api_versions,
            auth,
        })
    }
}

impl RawCallerCredentials {
    fn read(path: &str, json: &Json) -> Result<Self, ConfigError> {
        let object = Object::new(path, json, &["header", "callers"])?;
        let callers_path = object.path_of("callers");
        let callers = array(&callers_path, object.required("callers")?)?
            .iter()
            .enumerate()
            .map(|(i, json)| {
                let path = format!("{callers_path}[{i}]");
                Ok((path.clone(), string(&path, json)?))
            })
            .collect::<Result<_, ConfigError>>()?;
        let header = object
            .optional_string("header")?
            .map(|name| (object.path_of("header"), name));
        Ok(RawCallerCredentials {
            path: path.to_string(),
            header,
            callers,
        })
    }
}

impl RawSecret {
    fn read(path: &str, json: &Json) -> Result<Self, ConfigError> {
        let (kind, value) = one_of(path, json, &["env", "value"])?;
        let value = string(&format!("{path}.{kind}"), value)?;
        Ok(if kind == "env" {
            RawSecret::Env(value)
        } else {
            RawSecret::Value(value)
        })
    }
}

impl RawEntra {
    fn read(path: &str, json: &Json) -> Result<Self, ConfigError> {
        let object = Object::new(
            path,
            json,
            &[
                "tenant_id",
                "client_id",
                "client_secret",
                "token_cluster",
                "cloud",
                "authority_host",
                "scope",
                "timeout_ms",
                "max_wait_ms",
            ],
        )?;
        Ok(RawEntra {
            tenant_id: object.string("tenant_id")?,
            client_id: object.string("client_id")?,
            client_secret: RawSecret::read(
                &object.path_of("client_secret"),
                object.required("client_secret")?,
            )?,
            token_cluster: object.string("token_cluster")?,
            cloud: object.cloud()?,
            authority_host: object.optional_string("authority_host")?,
            scope: object.optional_string("scope")?,
            timeout_ms: object.optional_u64("timeout_ms")?,
            max_wait_ms: object.optional_u64("max_wait_ms")?,
        })
    }
}

impl RawManagedIdentity {
    fn read(path: &str, json: &Json) -> Result<Self, ConfigError> {
        let object = Object::new(
            path,
            json,
            &[
                "imds_cluster",
                "client_id",
                "object_id",
                "msi_res_id",
                "cloud",
                "resource",
                "timeout_ms",
                "max_wait_ms",
            ],
        )?;
        Ok(RawManagedIdentity {
            imds_cluster: object.string("imds_cluster")?,
            client_id: object.optional_string("client_id")?,
            object_id: object.optional_string("object_id")?,
            msi_res_id: object.optional_string("msi_res_id")?,
            cloud: object.cloud()?,
            resource: object.optional_string("resource")?,
            timeout_ms: object.optional_u64("timeout_ms")?,
            max_wait_ms: object.optional_u64("max_wait_ms")?,
        })
    }
}

impl RawModel {
    fn read(path: &str, json: &Json) -> Result<Self, ConfigError> {
        if json.get("targets").is_none() {
            return Ok(RawModel {
                targets: vec![RawTarget::read(path, json, false)?],
            });
        }
        if json.get("upstream").is_some() || json.get("deployment").is_some() {
            return Err(error(
                join(path, "targets"),
                "a model takes `targets`, or `upstream` and `deployment`, not both",
            ));
        }
        let object = Object::new(path, json, &["targets"])?;
        let targets_path = object.path_of("targets");
        let targets = array(&targets_path, object.required("targets")?)?
            .iter()
            .enumerate()
            .map(|(i, json)| RawTarget::read(&format!("{targets_path}[{i}]"), json, true))
            .collect::<Result<Vec<_>, ConfigError>>()?;
        if targets.is_empty() {
            return Err(error(
                targets_path,
                "must list at least one target ({\"upstream\", \"deployment\"})",
            ));
        }
        Ok(RawModel { targets })
    }
}

impl RawTarget {
    /// A target; in a pool it may carry a priority and a weight.
    fn read(path: &str, json: &Json, in_pool: bool) -> Result<Self, ConfigError> {
        let known: &[&str] = if in_pool {
            &[
                "upstream",
                "deployment",
                "priority",
                "weight",
                "spillover_deployment",
            ]
        } else {
            &["upstream", "deployment", "spillover_deployment"]
        };
        let object = Object::new(path, json, known)?;
        Ok(RawTarget {
            path: path.to_string(),
            upstream: object.string("upstream")?,
            deployment: object.string("deployment")?,
            priority: object.optional_u64("priority")?,
            weight: object.optional_u64("weight")?,
            spillover_deployment: object.optional_string("spillover_deployment")?,
        })
    }
}

impl RawCaller {
    fn read(path: &str, json: &Json) -> Result<Self, ConfigError> {
        let object = Object::new(path, json, &["name", "key_sha256", "models", "limits"])?;
        let limits = match object.optional("limits") {
            None => None,
            Some(json) => {
                let limits_path = object.path_of("limits");
                let limits = Object::new(
                    &limits_path,
                    json,
                    &["requests_per_minute", "tokens_per_minute"],
                )?;
                Some((
                    limits_path,
                    limits.optional_u64("requests_per_minute")?,
                    limits.optional_u64("tokens_per_minute")?,
                ))
            }
        };
        let models_path = object.path_of("models");
        let models = array(&models_path, object.required("models")?)?
            .iter()
            .enumerate()
            .map(|(i, json)| string(&format!("{models_path}[{i}]"), json))
            .collect::<Result<_, ConfigError>>()?;
        Ok(RawCaller {
            name: object.string("name")?,
            key_sha256: object.string("key_sha256")?,
            models,
            limits,
        })
    }
}

/// An object whose keys are all known and each appears once.
struct Object<'a> {
    path: String,
    json: &'a Json,
}

impl<'a> Object<'a> {
    fn new(path: &str, json: &'a Json, known: &[&str]) -> Result<Self, ConfigError> {
        let members = members(path, json)?;
        for (key, _) in members {
            if !known.contains(&key.as_str()) {
                return Err(error(
                    join(path, key),
                    format!("unknown field `{key}`; expected one of {}", quoted(known)),
                ));
            }
        }
        Ok(Object {
            path: path.to_string(),
            json,
        })
    }

    fn path_of(&self, key: &str) -> String {
        join(&self.path, key)
    }

    fn optional(&self, key: &str) -> Option<&'a Json> {
        self.json.get(key)
    }

    fn required(&self, key: &str) -> Result<&'a Json, ConfigError> {
        self.optional(key).ok_or_else(|| {
            error(
                if self.path.is_empty() {
                    "configuration"
                } else {
                    &self.path
                },
                format!("missing field `{key}`"),
            )
        })
    }

    fn string(&self, key: &str) -> Result<String, ConfigError> {
        string(&self.path_of(key), self.required(key)?)
    }

    fn optional_string(&self, key: &str) -> Result<Option<String>, ConfigError> {
        self.optional(key)
            .map(|json| string(&self.path_of(key), json))
            .transpose()
    }

    fn optional_bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.optional(key) {
            None => Ok(None),
            Some(Json::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(error(
                self.path_of(key),
                format!("expected true or false, got {}", describe(other)),
            )),
        }
    }

    fn optional_u64(&self, key: &str) -> Result<Option<u64>, ConfigError> {
        match self.optional(key) {
            None => Ok(None),
            Some(Json::Unsigned(n)) => Ok(Some(*n)),
            Some(other) => Err(error(
                self.path_of(key),
                format!(
                    "expected a whole number of 0 or more, got {}",
                    describe(other)
                ),
            )),
        }
    }

    fn cloud(&self) -> Result<Option<Cloud>, ConfigError> {
        let Some(name) = self.optional_string("cloud")? else {
            return Ok(None);
        };
        match name.as_str() {
            "public" => Ok(Some(Cloud::Public)),
            "usgov" => Ok(Some(Cloud::Usgov)),
            "china" => Ok(Some(Cloud::China)),
            _ => Err(error(
                self.path_of("cloud"),
                format!("unknown cloud `{name}`; expected one of `public`, `usgov`, `china`"),
            )),
        }
    }
}

/// An object's members, refusing a key that appears twice (a plain map
/// would keep one silently and hide the mistake).
fn members<'a>(path: &str, json: &'a Json) -> Result<&'a [(String, Json)], ConfigError> {
    let Json::Object(members) = json else {
        return Err(error(
            if path.is_empty() {
                "configuration"
            } else {
                path
            },
            format!("expected an object, got {}", json.kind()),
        ));
    };
    for (i, (key, _)) in members.iter().enumerate() {
        if members.iter().skip(i + 1).any(|(other, _)| other == key) {
            return Err(error(
                if path.is_empty() {
                    "configuration"
                } else {
                    path
                },
                format!("duplicate key `{key}`"),
            ));
        }
    }
    Ok(members)
}

/// A map object (upstreams, models): (path of the entry, key, value).
fn entries<'a>(path: &str, json: &'a Json) -> Result<Vec<(String, String, &'a Json)>, ConfigError> {
    Ok(members(path, json)?
        .iter()
        .map(|(key, value)| (join(path, key), key.clone(), value))
        .collect())
}

/// An object with exactly one of `choices` as its key.
fn one_of<'a>(
    path: &str,
    json: &'a Json,
    choices: &[&'static str],
) -> Result<(&'static str, &'a Json), ConfigError> {
    let members = members(path, json)?;
    for (key, _) in members {
        if !choices.contains(&key.as_str()) {
            return Err(error(
                join(path, key),
                format!("unknown field `{key}`; expected one of {}", quoted(choices)),
            ));
        }
    }
    match members {
        [(key, value)] => {
            let choice = choices
                .iter()
                .find(|c| **c == key)
                .copied()
                .unwrap_or_default();
            Ok((choice, value))
        }
        _ => Err(error(
            path,
            format!("must have exactly one of {}", quoted(choices)),
        )),
    }
}

fn array<'a>(path: &str, json: &'a Json) -> Result<&'a [Json], ConfigError> {
    match json {
        Json::Array(items) => Ok(items),
        other => Err(error(
            path,
            format!("expected an array, got {}", describe(other)),
        )),
    }
}

fn string(path: &str, json: &Json) -> Result<String, ConfigError> {
    match json {
        Json::String(text) => Ok(text.clone()),
        other => Err(error(
            path,
            format!("expected a string, got {}", describe(other)),
        )),
    }
}

fn describe(json: &Json) -> String {
    match json {
        Json::String(text) => format!(
            "the string \"{}\"",
            text.chars().take(40).collect::<String>()
        ),
        Json::Unsigned(n) => format!("the number {n}"),
        Json::Number(n) => format!("the number {n}"),
        other => other.kind().to_string(),
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}
