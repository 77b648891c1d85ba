//! A small JSON tree for the few documents the filter reads whole (its
//! configuration, identity endpoint answers). It keeps object members in
//! order and keeps repeated keys, so the reader can refuse them, which
//! `serde_json::Value` cannot. One `Deserialize` impl serves every
//! document, which keeps the module small.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    /// A non-negative integer.
    Unsigned(u64),
    /// Any other number (negative, fractional, huge).
    Number(f64),
    String(String),
    Array(Vec<Json>),
    /// Members in document order, repeated keys included.
    Object(Vec<(String, Json)>),
}

impl Json {
    pub fn parse(bytes: &[u8]) -> Result<Json, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The first member called `key`, if this is an object.
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(text) => Some(text),
            _ => None,
        }
    }

    /// What kind of value this is, for messages ("a string", "an object").
    pub fn kind(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "a boolean",
            Json::Unsigned(_) | Json::Number(_) => "a number",
            Json::String(_) => "a string",
            Json::Array(_) => "an array",
            Json::Object(_) => "an object",
        }
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }

    fn visit_bool<E>(self, value: bool) -> Result<Json, E> {
        Ok(Json::Bool(value))
    }

    fn visit_u64<E>(self, value: u64) -> Result<Json, E> {
        Ok(Json::Unsigned(value))
    }

    fn visit_i64<E>(self, value: i64) -> Result<Json, E> {
        Ok(match u64::try_from(value) {
            Ok(unsigned) => Json::Unsigned(unsigned),
            Err(_) => Json::Number(value as f64),
        })
    }

    fn visit_f64<E>(self, value: f64) -> Result<Json, E> {
        Ok(Json::Number(value))
    }

    fn visit_str<E>(self, value: &str) -> Result<Json, E> {
        Ok(Json::String(value.to_string()))
    }

    fn visit_string<E>(self, value: String) -> Result<Json, E> {
        Ok(Json::String(value))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut members = Vec::new();
        while let Some((key, value)) = map.next_entry::<String, Json>()? {
            members.push((key, value));
        }
        Ok(Json::Object(members))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind() {
        let json =
            Json::parse(br#"{"a":null,"b":true,"c":7,"d":-2,"e":1.5,"f":"x","g":[1],"h":{}}"#)
                .unwrap();
        assert_eq!(json.get("a"), Some(&Json::Null));
        assert_eq!(json.get("b"), Some(&Json::Bool(true)));
        assert_eq!(json.get("c"), Some(&Json::Unsigned(7)));
        assert_eq!(json.get("d"), Some(&Json::Number(-2.0)));
        assert_eq!(json.get("e"), Some(&Json::Number(1.5)));
        assert_eq!(json.get("f").and_then(Json::as_str), Some("x"));
        assert_eq!(json.get("g"), Some(&Json::Array(vec![Json::Unsigned(1)])));
        assert_eq!(json.get("h").map(Json::kind), Some("an object"));
        assert_eq!(json.get("zz"), None);
    }

    #[test]
    fn keeps_order_and_repeated_keys() {
        let json = Json::parse(br#"{"b":1,"a":2,"b":3}"#).unwrap();
        let Json::Object(members) = &json else {
            panic!()
        };
        let keys: Vec<&str> = members.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["b", "a", "b"]);
        assert_eq!(json.get("b"), Some(&Json::Unsigned(1)));
    }

    #[test]
    fn syntax_errors_say_where() {
        let error = Json::parse(b"{\"a\": }").unwrap_err().to_string();
        assert!(error.contains("line 1 column 7"), "{error}");
        assert!(Json::parse(b"{} x").is_err());
    }
}
