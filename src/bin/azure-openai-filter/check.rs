//! `check CONFIG`: the filter's own validation, the environment its
//! secrets come from, and what the configuration routes where.

use std::cell::RefCell;
use std::fmt::Write as _;

use azure_openai_filter::config::{Config, Flavor, ModelAccess, Operation, Upstream, UpstreamAuth};

use super::source::{self, EnvScope, Found, Lookup};
use super::{usage, OK, REFUSED};

/// Stands in for a secret whose variable is not set here, once allowed.
const PLACEHOLDER: &str = "placeholder-for-an-unset-variable";

pub fn main(args: &[String]) -> i32 {
    let mut allow_missing_env = false;
    let mut path = None;
    for arg in args {
        match arg.as_str() {
            "--allow-missing-env" => allow_missing_env = true,
            flag if flag.starts_with('-') && flag != "-" => {
                return usage(&format!("check: unknown option `{flag}`"))
            }
            _ if path.is_some() => return usage("check takes one CONFIG"),
            file => path = Some(file.to_string()),
        }
    }
    let Some(path) = path else {
        return usage("check needs a CONFIG file");
    };
    let text = if path == "-" {
        let mut text = String::new();
        match std::io::Read::read_to_string(&mut std::io::stdin(), &mut text) {
            Ok(_) => text,
            Err(e) => return usage(&format!("cannot read standard input: {e}")),
        }
    } else {
        match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) => return usage(&format!("cannot read {path}: {e}")),
        }
    };
    let found = match source::find(&text) {
        Ok(found) => found,
        Err(message) => {
            eprintln!("{path}: {message}");
            return REFUSED;
        }
    };
    let mut code = OK;
    for (i, config) in found.iter().enumerate() {
        if i > 0 {
            println!();
        }
        if check_one(&path, config, allow_missing_env) != OK {
            code = REFUSED;
        }
    }
    code
}

fn check_one(path: &str, found: &Found, allow_missing_env: bool) -> i32 {
    println!("{path}: {}", found.place);

    // First pass, with every variable standing in: which variables does the
    // configuration name? (An error here does not depend on the environment.)
    let asked = RefCell::new(Vec::<String>::new());
    let first = Config::from_json(found.json.as_bytes(), &|name| {
        if let Ok(mut asked) = asked.try_borrow_mut() {
            if !asked.iter().any(|a| a == name) {
                asked.push(name.to_string());
            }
        }
        Some(PLACEHOLDER.to_string())
    });
    if let Err(error) = first {
        println!("  configuration refused: {error}");
        return REFUSED;
    }

    let names = asked.into_inner();
    let mut refused = false;
    let mut allowed_missing = Vec::new();
    for name in &names {
        match found.env.lookup(name) {
            Lookup::Set(value) if value.is_empty() => {
                println!("  env {name}: set, but empty");
            }
            Lookup::Set(_) => println!("  env {name}: set"),
            Lookup::NotVisible => {
                refused = true;
                println!(
                    "  env {name}: not visible to the filter: list it in \
                     vm_config.environment_variables.host_env_keys (or key_values)"
                );
            }
            Lookup::Unset if allow_missing_env => {
                allowed_missing.push(name.clone());
                println!(
                    "  env {name}: not set in this environment (allowed by --allow-missing-env)"
                );
            }
            Lookup::Unset => {
                refused = true;
                println!(
                    "  env {name}: not set in this environment{}",
                    match found.env {
                        EnvScope::Shell => "",
                        EnvScope::Vm { .. } =>
                            " (Envoy must have it; --allow-missing-env checks the rest)",
                    }
                );
            }
        }
    }

    // The real pass: what the filter would get, exactly.
    let result = Config::from_json(
        found.json.as_bytes(),
        &|name| match found.env.lookup(name) {
            Lookup::Set(value) => Some(value),
            Lookup::Unset if allowed_missing.iter().any(|n| n == name) => {
                Some(PLACEHOLDER.to_string())
            }
            Lookup::Unset | Lookup::NotVisible => None,
        },
    );
    let config = match result {
        Ok(config) => config,
        Err(error) => {
            println!("  configuration refused: {error}");
            return REFUSED;
        }
    };
    if refused {
        println!("  configuration refused: see the environment variables above");
        return REFUSED;
    }
    print!("{}", describe(&config));
    OK
}

/// What the configuration routes where, as the filter would.
pub fn describe(config: &Config) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "  configuration accepted: {} upstream(s), {} model(s), {} caller(s)",
        config.upstreams.len(),
        config.models.len(),
        config.callers.len()
    );
    let _ = writeln!(out, "  upstreams:");
    for upstream in &config.upstreams {
        let _ = writeln!(
            out,
            "    {}: {} at {}, Envoy cluster `{}`, {}",
            upstream.name,
            flavor(upstream),
            upstream.authority,
            upstream.cluster,
            credential(config, upstream)
        );
        if let Flavor::AzureDeployments { api_versions } = &upstream.flavor {
            let versions: Vec<String> = Operation::ALL
                .iter()
                .map(|op| {
                    let version = api_versions.get(op.index()).map_or("?", String::as_str);
                    format!("{} {version}", op.name())
                })
                .collect();
            let _ = writeln!(out, "      api-version: {}", versions.join(", "));
        }
    }
    let _ = writeln!(
        out,
        "  models (alias -> upstream, deployment: what is sent):"
    );
    for model in &config.models {
        let pool = model.targets.len() > 1;
        for (i, target) in model.targets.iter().enumerate() {
            let Some((chosen, upstream)) = config.target_upstream(target.target) else {
                continue;
            };
            let alias = if i == 0 { model.alias.as_str() } else { "" };
            let mut extra = String::new();
            if pool {
                extra.push_str(&format!(
                    " [priority {}, weight {}]",
                    target.priority, target.weight
                ));
            }
            if let Some(spillover) = &target.spillover {
                extra.push_str(&format!(" [spillover to {spillover}]"));
            }
            let _ = writeln!(
                out,
                "    {:<w$} -> {}, {}: {}{extra}",
                alias,
                upstream.name,
                chosen.deployment,
                request_template(upstream, &chosen.deployment),
                w = model.alias.len()
            );
        }
    }
    match config.responses_upstream.and_then(|i| config.upstream(i)) {
        Some(upstream) => {
            let _ = writeln!(
                out,
                "  stored responses (/v1/responses/{{id}}): {}",
                upstream.name
            );
        }
        None => {
            let _ = writeln!(
                out,
                "  stored responses (/v1/responses/{{id}}): none (answered 404; set responses_upstream)"
            );
        }
    }
    let _ = writeln!(out, "  callers (name: models):");
    for caller in &config.callers {
        let models = match &caller.access {
            ModelAccess::Any => "every model".to_string(),
            ModelAccess::Only(_) => config
                .models_of(caller)
                .map(|m| m.alias.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        };
        let limits = match &caller.limits {
            None => String::new(),
            Some(limits) => {
                let mut parts = Vec::new();
                if let Some(rpm) = limits.requests_per_minute {
                    parts.push(format!("{rpm} requests"));
                }
                if let Some(tpm) = limits.tokens_per_minute {
                    parts.push(format!("{tpm} tokens"));
                }
                format!(" (limits per minute: {})", parts.join(", "))
            }
        };
        let _ = writeln!(out, "    {}: {models}{limits}", caller.name);
    }
    let _ = writeln!(
        out,
        "  routing header: {}; largest request body: {} bytes",
        config.cluster_header, config.max_request_body_bytes
    );
    if config.access_log {
        let _ = writeln!(
            out,
            "  access-log fields: on (filter state wasm.azure_openai)"
        );
    }
    if config.global_rate_limit {
        let _ = writeln!(
            out,
            "  global rate limits: on (headers x-azure-openai-caller and x-azure-openai-model, \
             filter state wasm.azure_openai_tokens; the route must remove the headers)"
        );
    }
    out
}

/// The request an operation becomes, with `{operation}` for its name, from
/// the filter's own path builder.
fn request_template(upstream: &Upstream, deployment: &str) -> String {
    let op = Operation::ChatCompletions;
    let path = upstream
        .operation_path(op, deployment)
        .replacen(op.name(), "{operation}", 1);
    let path = match path.split_once("?api-version=") {
        Some((path, _)) if matches!(upstream.flavor, Flavor::AzureDeployments { .. }) => {
            format!("{path}?api-version={{per operation}}")
        }
        _ => path,
    };
    if upstream.model_in_body(op) {
        format!("POST {path} with body model `{deployment}`")
    } else {
        format!("POST {path}")
    }
}

fn flavor(upstream: &Upstream) -> String {
    match &upstream.flavor {
        Flavor::AzureDeployments { .. } => "Azure OpenAI (deployments API)".to_string(),
        Flavor::AzureV1 { preview: false } => "Azure OpenAI (v1 API)".to_string(),
        Flavor::AzureV1 { preview: true } => {
            "Azure OpenAI (v1 API, api-version=preview)".to_string()
        }
        Flavor::OpenAi { base_path } => format!("OpenAI-compatible (base path `{base_path}`)"),
    }
}

fn credential(config: &Config, upstream: &Upstream) -> String {
    match &upstream.auth {
        UpstreamAuth::ApiKey(_) => "credential: resource key (api-key header)".to_string(),
        UpstreamAuth::Bearer(_) => "credential: fixed bearer token".to_string(),
        UpstreamAuth::Token(i) => match config.credential(*i) {
            Some(credential) => format!(
                "credential: token from {}{} through cluster `{}`",
                credential.request.authority, credential.request.path, credential.cluster
            ),
            None => "credential: token".to_string(),
        },
    }
}
