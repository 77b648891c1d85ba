//! Where the filter's configuration is in a file: the file itself (the
//! filter's JSON), or every Wasm filter of this module inside an Envoy
//! bootstrap or Kubernetes manifests (YAML or JSON, several documents).

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde_json::Value;

const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const NATIVE_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter";
const STRING_VALUE_TYPE: &str = "type.googleapis.com/google.protobuf.StringValue";
/// The filter's root context id, as every shipped example sets it.
const ROOT_ID: &str = "azure_openai";

/// One configuration of the filter, as Envoy would hand it to the module.
#[derive(Debug)]
pub struct Found {
    /// Where it is, for messages.
    pub place: String,
    /// The JSON text the filter receives in `on_configure`.
    pub json: String,
    pub env: EnvScope,
}

/// Which environment variables the filter's VM sees.
#[derive(Debug, PartialEq, Eq)]
pub enum EnvScope {
    /// A bare JSON file, or the native module (which reads Envoy's own
    /// environment): the variables of this shell stand for the filter's.
    Shell,
    /// `vm_config.environment_variables`: only these names are visible.
    Vm {
        host_env_keys: BTreeSet<String>,
        key_values: BTreeMap<String, String>,
    },
}

impl EnvScope {
    /// What the filter's `std::env::var(name)` would return, given this
    /// shell's environment as Envoy's.
    pub fn lookup(&self, name: &str) -> Lookup {
        match self {
            EnvScope::Shell => match std::env::var(name) {
                Ok(value) => Lookup::Set(value),
                Err(_) => Lookup::Unset,
            },
            EnvScope::Vm {
                host_env_keys,
                key_values,
            } => {
                if let Some(value) = key_values.get(name) {
                    Lookup::Set(value.clone())
                } else if host_env_keys.contains(name) {
                    match std::env::var(name) {
                        Ok(value) => Lookup::Set(value),
                        Err(_) => Lookup::Unset,
                    }
                } else {
                    Lookup::NotVisible
                }
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    Set(String),
    /// Visible to the filter, but not set in this environment.
    Unset,
    /// Not listed in `vm_config.environment_variables`: the filter never sees it.
    NotVisible,
}

/// The configurations in `text`, or why there are none.
pub fn find(text: &str) -> Result<Vec<Found>, String> {
    let looks_like_json = matches!(text.trim_start().chars().next(), Some('{') | Some('['));
    let documents: Vec<Value> = if looks_like_json {
        match serde_json::from_str::<Value>(text) {
            Ok(value) => vec![value],
            // Not valid JSON: hand it to the filter as is, which names the error.
            Err(_) => return Ok(vec![bare(text)]),
        }
    } else {
        let mut documents = Vec::new();
        for document in serde_norway::Deserializer::from_str(text) {
            let value =
                Value::deserialize(document).map_err(|e| format!("neither JSON nor YAML: {e}"))?;
            if !value.is_null() {
                documents.push(value);
            }
        }
        documents
    };
    let mut found = Vec::new();
    let all_host_keys = collect_host_env_keys(&documents);
    for (index, document) in documents.iter().enumerate() {
        let prefix = describe_document(index, documents.len(), document);
        walk(document, &prefix, "", &all_host_keys, &mut found);
    }
    if found.is_empty() {
        if looks_like_json && documents.len() == 1 {
            return Ok(vec![bare(text)]);
        }
        return Err(format!(
            "no configuration of this filter found: looked for Wasm filters (root_id `{ROOT_ID}`, \
             or a module named azure_openai_filter / azure-openai-filter) and native module \
             filters (dynamic_modules, module azure_openai_filter) whose configuration is a \
             google.protobuf.StringValue, and Envoy Gateway EnvoyExtensionPolicy wasm entries"
        ));
    }
    Ok(found)
}

fn bare(text: &str) -> Found {
    Found {
        place: "the filter's JSON configuration".to_string(),
        json: text.to_string(),
        env: EnvScope::Shell,
    }
}

fn describe_document(index: usize, count: usize, document: &Value) -> String {
    let kind = document.get("kind").and_then(Value::as_str);
    let name = document
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("?");
    match (kind, count) {
        (Some(kind), _) => format!("{kind} {name}"),
        (None, 1) => "the bootstrap".to_string(),
        (None, _) => format!("document {}", index + 1),
    }
}

fn walk(
    value: &Value,
    document: &str,
    path: &str,
    host_keys: &BTreeSet<String>,
    out: &mut Vec<Found>,
) {
    match value {
        Value::Object(map) => {
            if map.get("@type").and_then(Value::as_str) == Some(WASM_TYPE) {
                if let Some(found) = wasm_filter(value, document, path) {
                    out.push(found);
                }
                return;
            }
            if map.get("@type").and_then(Value::as_str) == Some(NATIVE_TYPE) {
                if let Some(found) = native_filter(value, document, path) {
                    out.push(found);
                }
                return;
            }
            if map.get("kind").and_then(Value::as_str) == Some("EnvoyExtensionPolicy") {
                extension_policy(value, document, host_keys, out);
                return;
            }
            for (key, child) in map {
                walk(child, document, &format!("{path}.{key}"), host_keys, out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                walk(child, document, &format!("{path}[{i}]"), host_keys, out);
            }
        }
        _ => {}
    }
}

/// Whether a Wasm plugin config is this filter's.
fn is_this_filter(root_id: Option<&str>, code: &Value) -> bool {
    let code = code.to_string();
    root_id == Some(ROOT_ID)
        || code.contains("azure_openai_filter")
        || code.contains("azure-openai-filter")
}

fn wasm_filter(filter: &Value, document: &str, path: &str) -> Option<Found> {
    let config = filter.get("config")?;
    let root_id = config.get("root_id").and_then(Value::as_str);
    let vm = config.get("vm_config").unwrap_or(&Value::Null);
    if !is_this_filter(root_id, vm.get("code").unwrap_or(&Value::Null)) {
        return None;
    }
    let json = string_value(config.get("configuration")?)?;
    let variables = vm.get("environment_variables").unwrap_or(&Value::Null);
    let host_env_keys = variables
        .get("host_env_keys")
        .and_then(Value::as_array)
        .map(|keys| {
            keys.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let key_values = variables
        .get("key_values")
        .and_then(Value::as_object)
        .map(|map| {
            map.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default();
    Some(Found {
        place: format!("{document} ({})", path.trim_start_matches('.')),
        json,
        env: EnvScope::Vm {
            host_env_keys,
            key_values,
        },
    })
}

/// The text of a `google.protobuf.StringValue` (the filter's JSON).
fn string_value(configuration: &Value) -> Option<String> {
    if configuration.get("@type").and_then(Value::as_str) != Some(STRING_VALUE_TYPE) {
        return None;
    }
    Some(
        configuration
            .get("value")
            .and_then(Value::as_str)?
            .to_string(),
    )
}

/// The native module's filter entry (`envoy/native.yaml`): its
/// `dynamic_module_config.name` names the library.
fn native_filter(filter: &Value, document: &str, path: &str) -> Option<Found> {
    let module = filter.pointer("/dynamic_module_config/name")?;
    if !is_this_filter(None, module) {
        return None;
    }
    let json = string_value(filter.get("filter_config")?)?;
    Some(Found {
        place: format!("{document} ({})", path.trim_start_matches('.')),
        json,
        env: EnvScope::Shell,
    })
}

/// Envoy Gateway's EnvoyExtensionPolicy: `spec.wasm[].config` is the
/// filter's JSON (Envoy Gateway serialises it into a StringValue). The VM's
/// variables are set elsewhere (an EnvoyPatchPolicy in these manifests), so
/// every `host_env_keys` list in the file counts.
fn extension_policy(
    policy: &Value,
    document: &str,
    host_keys: &BTreeSet<String>,
    out: &mut Vec<Found>,
) {
    let Some(wasms) = policy.pointer("/spec/wasm").and_then(Value::as_array) else {
        return;
    };
    for (i, wasm) in wasms.iter().enumerate() {
        let root_id = wasm.get("rootID").and_then(Value::as_str);
        if !is_this_filter(root_id, wasm.get("code").unwrap_or(&Value::Null)) {
            continue;
        }
        let Some(config) = wasm.get("config") else {
            continue;
        };
        out.push(Found {
            place: format!("{document} (spec.wasm[{i}].config)"),
            json: config.to_string(),
            env: EnvScope::Vm {
                host_env_keys: host_keys.clone(),
                key_values: BTreeMap::new(),
            },
        });
    }
}

fn collect_host_env_keys(documents: &[Value]) -> BTreeSet<String> {
    fn visit(value: &Value, out: &mut BTreeSet<String>) {
        match value {
            Value::Object(map) => {
                for (key, child) in map {
                    if key == "host_env_keys" {
                        if let Some(keys) = child.as_array() {
                            out.extend(keys.iter().filter_map(Value::as_str).map(String::from));
                        }
                    }
                    visit(child, out);
                }
            }
            Value::Array(items) => items.iter().for_each(|child| visit(child, out)),
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    for document in documents {
        visit(document, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOTSTRAP: &str = r#"
static_resources:
  listeners:
  - filter_chains:
    - filters:
      - typed_config:
          http_filters:
          - name: other
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                root_id: someone_else
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: "not ours"
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                root_id: azure_openai
                vm_config:
                  environment_variables:
                    host_env_keys: [A_KEY]
                    key_values: { B_KEY: inline }
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '{"upstreams": {}}'
"#;

    #[test]
    fn finds_only_this_filter_in_a_yaml_bootstrap() {
        let found = find(BOOTSTRAP).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].json, r#"{"upstreams": {}}"#);
        assert!(
            found[0].place.contains("http_filters[1]"),
            "{}",
            found[0].place
        );
        let EnvScope::Vm {
            host_env_keys,
            key_values,
        } = &found[0].env
        else {
            panic!("{:?}", found[0].env)
        };
        assert!(host_env_keys.contains("A_KEY"));
        assert_eq!(key_values.get("B_KEY").map(String::as_str), Some("inline"));
        assert_eq!(found[0].env.lookup("B_KEY"), Lookup::Set("inline".into()));
        assert_eq!(found[0].env.lookup("NOT_LISTED_HERE"), Lookup::NotVisible);
    }

    #[test]
    fn a_bare_json_file_is_the_configuration_itself() {
        let found = find(r#" {"callers": []}"#).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].env, EnvScope::Shell);
        // Broken JSON goes to the filter, which names the error.
        assert_eq!(find("{upstreams: 1}").unwrap()[0].json, "{upstreams: 1}");
    }

    #[test]
    fn manifests_are_searched_document_by_document() {
        let text = "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n---\n\
            kind: EnvoyExtensionPolicy\nmetadata: {name: p}\nspec:\n  wasm:\n  - rootID: azure_openai\n    \
            code: {type: Image}\n    config: {upstreams: {}}\n---\n\
            kind: EnvoyPatchPolicy\nspec: {v: {host_env_keys: [K]}}\n";
        let found = find(text).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(
            found[0].place,
            "EnvoyExtensionPolicy p (spec.wasm[0].config)"
        );
        assert_eq!(found[0].json, r#"{"upstreams":{}}"#);
        assert_ne!(found[0].env.lookup("K"), Lookup::NotVisible);
        assert!(find("kind: Secret\n").is_err());
    }
}
