//! The configuration JSON exactly as users write it. Unknown fields and
//! duplicate keys are refused here; meaning is checked in `validate`.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub upstreams: UniqueMap<RawUpstream>,
    pub models: UniqueMap<RawModel>,
    pub callers: Vec<RawCaller>,
    #[serde(default)]
    pub api_version: Option<String>,
    #[serde(default)]
    pub cluster_header: Option<String>,
    #[serde(default)]
    pub max_request_body_bytes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub endpoint: String,
    pub cluster: String,
    #[serde(default)]
    pub api_version: Option<String>,
    pub auth: RawAuth,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum RawAuth {
    ApiKey(RawSecret),
}

/// `{"env": "NAME"}` or `{"value": "..."}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum RawSecret {
    Env(String),
    Value(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub upstream: String,
    pub deployment: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCaller {
    pub name: String,
    pub key_sha256: String,
    pub models: Vec<String>,
}

/// A JSON object read into a sorted map, refusing a key that appears twice
/// (plain maps keep the last one silently, which would hide a mistake).
#[derive(Debug)]
pub struct UniqueMap<V>(pub BTreeMap<String, V>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for UniqueMap<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct UniqueMapVisitor<V>(PhantomData<V>);

        impl<'de, V: Deserialize<'de>> Visitor<'de> for UniqueMapVisitor<V> {
            type Value = UniqueMap<V>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
                let mut map = BTreeMap::new();
                while let Some(key) = access.next_key::<String>()? {
                    if map.contains_key(&key) {
                        return Err(serde::de::Error::custom(format!("duplicate key `{key}`")));
                    }
                    let value = access.next_value()?;
                    map.insert(key, value);
                }
                Ok(UniqueMap(map))
            }
        }

        deserializer.deserialize_map(UniqueMapVisitor(PhantomData))
    }
}
