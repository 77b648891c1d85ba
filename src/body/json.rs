//! The top-level `model` of a JSON body, found in one validating pass that
//! skips every other value without allocating it.
//!
//! Upstream servers do not all read JSON the same way, so the pass refuses
//! what some of them could read differently: a body that is not UTF-8 (a
//! lenient reader may pass bytes a strict one rejects), a second `model`,
//! and a top-level key equal to `model` but for case (Go's encoding/json,
//! behind Ollama and many OpenAI-compatible servers, matches keys without
//! regard to case and keeps the last match).

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::BodyEdit;
use crate::errors::ApiError;

/// The `model` member of a request body.
#[derive(Debug, PartialEq, Eq)]
pub struct ModelField<'a> {
    /// The alias, unescaped; None for `"model": null` (which clients such
    /// as LangChain's AzureChatOpenAI send, meaning "no model").
    pub value: Option<Cow<'a, str>>,
    /// Where the JSON literal (quotes included) sits in the body, for
    /// callers that rewrite it.
    pub span: Range<usize>,
}

/// Validates `body` as a JSON object and returns its single top-level
/// string `model`; a missing or null `model` is an error.
#[cfg(test)]
pub fn find_model(body: &[u8]) -> Result<ModelField<'_>, ApiError> {
    match model_field(body)? {
        Some(field) if field.value.is_some() => Ok(field),
        _ => Err(ApiError::missing_model()),
    }
}

/// As `find_model`, but a body without `model` (or with `"model": null`)
/// is fine: None, or a field whose value is None.
#[cfg(test)]
pub fn model_field(body: &[u8]) -> Result<Option<ModelField<'_>>, ApiError> {
    Ok(read_request(body)?.model)
}

/// The top-level members of a JSON request the gateway reads.
#[derive(Debug)]
pub struct JsonRequest<'a> {
    pub model: Option<ModelField<'a>>,
    /// `"stream": true`.
    pub stream: bool,
    /// The `stream_options` value, and where it sits.
    pub stream_options: Option<(&'a str, Range<usize>)>,
}

impl JsonRequest<'_> {
    /// Whether the caller asked for its stream's usage itself
    /// (`stream_options.include_usage: true`).
    pub fn asks_for_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|(raw, _)| {
            members(raw)
                .iter()
                .any(|(key, value)| key == "include_usage" && value.get() == "true")
        })
    }
}

/// Validates `body` as a JSON object and reads its top-level `model`,
/// `stream` and `stream_options`, each of which must appear at most once
/// and not also under another case (the upstream might read the other).
pub fn read_request(body: &[u8]) -> Result<JsonRequest<'_>, ApiError> {
    // JSON text is UTF-8 (RFC 8259); checked whole, because the pass below
    // skips the strings it does not need without looking inside them.
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::invalid_json("the body is not valid UTF-8 text"))?;
    let first = text.bytes().find(|b| !b.is_ascii_whitespace());
    if first != Some(b'{') {
        return Err(match serde_json::from_str::<IgnoredAny>(text) {
            Err(e) => ApiError::invalid_json(&e.to_string()),
            Ok(_) => ApiError::body_not_object(),
        });
    }
    let members: TopLevel<'_> =
        serde_json::from_str(text).map_err(|e| ApiError::invalid_json(&e.to_string()))?;
    if let Some((key, of)) = members.look_alike {
        return Err(ApiError::key_look_alike(&key, of));
    }
    if members.models > 1 {
        return Err(ApiError::duplicate_model());
    }
    if members.streams > 1 || members.stream_options_count > 1 {
        return Err(ApiError::invalid_json(
            "the body has more than one 'stream' or 'stream_options'",
        ));
    }
    let stream = members.stream.map(RawValue::get) == Some("true");
    let stream_options = match members.stream_options.map(RawValue::get) {
        Some(raw) => Some((raw, locate(body, text, raw)?)),
        None => None,
    };
    let Some(raw) = members.model.map(RawValue::get) else {
        return Ok(JsonRequest {
            model: None,
            stream,
            stream_options,
        });
    };
    let span = locate(body, text, raw)?;
    let value = match raw.as_bytes().first() {
        Some(b'"') => Some(string_value(raw)?),
        Some(b'n') => None,
        Some(b'{') => return Err(ApiError::model_not_string("an object")),
        Some(b'[') => return Err(ApiError::model_not_string("an array")),
        Some(b't' | b'f') => return Err(ApiError::model_not_string("a boolean")),
        _ => return Err(ApiError::model_not_string("a number")),
    };
    Ok(JsonRequest {
        model: Some(ModelField { value, span }),
        stream,
        stream_options,
    })
}

/// Where a raw value borrowed from `text` (the body) sits in the body.
fn locate(body: &[u8], text: &str, raw: &str) -> Result<Range<usize>, ApiError> {
    let start = (raw.as_ptr() as usize).wrapping_sub(text.as_ptr() as usize);
    let span = start..start.wrapping_add(raw.len());
    if body.get(span.clone()) != Some(raw.as_bytes()) {
        // RawValue borrows from `body`; anything else would be a serde_json change.
        return Err(ApiError::internal("could not locate a member in the body"));
    }
    Ok(span)
}

/// Puts `deployment` in the body's `model`: the literal replaced, or (when
/// the body has none) a `model` member added first.
#[cfg(test)]
pub fn json_model_edit(body: &[u8], field: Option<&ModelField<'_>>, deployment: &str) -> BodyEdit {
    let mut edits = Edits::default();
    edits.model(field, deployment);
    edits.apply(body)
}

/// What a JSON body needs before it goes upstream: the deployment as its
/// `model` (where the upstream reads it there), and
/// `stream_options.include_usage: true` (where the filter asks for a
/// stream's usage). None when it needs nothing.
pub fn json_edit(
    body: &[u8],
    request: &JsonRequest<'_>,
    deployment: Option<&str>,
    include_usage: bool,
) -> Option<BodyEdit> {
    let mut edits = Edits::default();
    if let Some(deployment) = deployment {
        edits.model(request.model.as_ref(), deployment);
    }
    if include_usage {
        // The caller's other options kept, include_usage set (once).
        let merged = request.stream_options.as_ref().map(|(raw, span)| {
            let mut options = b"{".to_vec();
            for (key, value) in members(raw) {
                if key != "include_usage" {
                    options.extend(serde_json::to_vec(&key).unwrap_or_default());
                    options.push(b':');
                    options.extend_from_slice(value.get().as_bytes());
                    options.push(b',');
                }
            }
            options.extend_from_slice(br#""include_usage":true}"#);
            (span.clone(), options)
        });
        match merged {
            Some(replacement) => edits.replace.push(replacement),
            None => edits
                .insert
                .push(br#""stream_options":{"include_usage":true}"#.to_vec()),
        }
    }
    (!edits.is_empty()).then(|| edits.apply(body))
}

/// The members of a JSON object's text, values left as text (none when it
/// is not an object).
fn members(raw: &str) -> Vec<(String, &RawValue)> {
    struct Members;
    impl<'de> Visitor<'de> for Members {
        type Value = Vec<(String, &'de RawValue)>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut members = Vec::new();
            while let Some(key) = map.next_key::<String>()? {
                members.push((key, map.next_value::<&'de RawValue>()?));
            }
            Ok(members)
        }
    }
    let mut deserializer = serde_json::Deserializer::from_str(raw);
    deserializer.deserialize_map(Members).unwrap_or_default()
}

/// Changes to a JSON object's text: members inserted first, values replaced.
#[derive(Default)]
struct Edits {
    insert: Vec<Vec<u8>>,
    replace: Vec<(Range<usize>, Vec<u8>)>,
}

impl Edits {
    fn is_empty(&self) -> bool {
        self.insert.is_empty() && self.replace.is_empty()
    }

    fn model(&mut self, field: Option<&ModelField<'_>>, deployment: &str) {
        let literal = serde_json::to_vec(deployment).unwrap_or_else(|_| b"\"\"".to_vec());
        match field {
            Some(field) => self.replace.push((field.span.clone(), literal)),
            None => {
                let mut member = b"\"model\":".to_vec();
                member.extend(literal);
                self.insert.push(member);
            }
        }
    }

    /// The edit as a prefix rewrite: the body up to the last change.
    fn apply(mut self, body: &[u8]) -> BodyEdit {
        let open = body.iter().position(|&b| b == b'{').unwrap_or(0);
        self.replace.sort_by_key(|(span, _)| span.start);
        let mut with = Vec::new();
        let mut copied = 0;
        if !self.insert.is_empty() {
            with.extend_from_slice(body.get(..=open).unwrap_or(b"{"));
            with.extend(self.insert.join(&b","[..]));
            let empty = body
                .get(open + 1..)
                .and_then(|rest| rest.iter().find(|b| !b.is_ascii_whitespace()))
                == Some(&b'}');
            if !empty {
                with.push(b',');
            }
            copied = open + 1;
        }
        for (span, value) in self.replace {
            with.extend_from_slice(body.get(copied..span.start).unwrap_or_default());
            with.extend(value);
            copied = span.end;
        }
        BodyEdit {
            replace: copied,
            with,
            body_len: body.len(),
        }
    }
}

fn string_value(literal: &str) -> Result<Cow<'_, str>, ApiError> {
    let inner = literal
        .get(1..literal.len().saturating_sub(1))
        .unwrap_or_default();
    if !inner.contains('\\') {
        return Ok(Cow::Borrowed(inner));
    }
    serde_json::from_str::<String>(literal)
        .map(Cow::Owned)
        .map_err(|e| ApiError::invalid_json(&e.to_string()))
}

/// What the one pass over the top-level object keeps.
struct TopLevel<'a> {
    model: Option<&'a RawValue>,
    models: usize,
    stream: Option<&'a RawValue>,
    streams: usize,
    stream_options: Option<&'a RawValue>,
    stream_options_count: usize,
    /// The first key that a case-insensitive parser would read as one of
    /// the members the gateway reads, and which.
    look_alike: Option<(String, &'static str)>,
}

impl<'de> serde::Deserialize<'de> for TopLevel<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(TopLevelVisitor)
    }
}

struct TopLevelVisitor;

impl<'de> Visitor<'de> for TopLevelVisitor {
    type Value = TopLevel<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = TopLevel {
            model: None,
            models: 0,
            stream: None,
            streams: 0,
            stream_options: None,
            stream_options_count: 0,
            look_alike: None,
        };
        while let Some(key) = map.next_key_seed(KeySeed)? {
            match key {
                Key::Model => {
                    found.model = Some(map.next_value::<&'de RawValue>()?);
                    found.models += 1;
                }
                Key::Stream => {
                    found.stream = Some(map.next_value::<&'de RawValue>()?);
                    found.streams += 1;
                }
                Key::StreamOptions => {
                    found.stream_options = Some(map.next_value::<&'de RawValue>()?);
                    found.stream_options_count += 1;
                }
                Key::LookAlike(name, of) => {
                    found.look_alike.get_or_insert((name, of));
                    map.next_value::<IgnoredAny>()?;
                }
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(found)
    }
}

/// A top-level key, reduced to what matters about it.
enum Key {
    Model,
    Stream,
    StreamOptions,
    /// Not one of those, but one of them (named) to a parser that ignores case.
    LookAlike(String, &'static str),
    Other,
}

/// The members the gateway reads, and which a case-insensitive upstream
/// parser must not find a second time.
const READ_KEYS: [&str; 3] = ["model", "stream", "stream_options"];

/// Classifies a map key without allocating it (unless it is a look-alike).
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Key;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Key, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, key: &str) -> Result<Key, E> {
        Ok(match key {
            "model" => Key::Model,
            "stream" => Key::Stream,
            "stream_options" => Key::StreamOptions,
            _ => match READ_KEYS.into_iter().find(|read| reads_as(key, read)) {
                Some(of) => Key::LookAlike(key.to_string(), of),
                None => Key::Other,
            },
        })
    }
}

/// Whether a case-insensitive reader would take `key` for `name`. Go folds
/// case with Unicode simple folding; lower-casing covers it for these names
/// (the non-ASCII letters that fold to ASCII ones, the Kelvin sign and the
/// long s, fold to k and s, and lower-case to k and themselves: `ſtream` is
/// caught below) and errs on the side of refusing.
fn reads_as(key: &str, name: &str) -> bool {
    if key.is_ascii() {
        return key.eq_ignore_ascii_case(name);
    }
    // A look-alike has as many letters as the name, of at most four bytes.
    key.len() <= name.len() * 4 && key.to_lowercase().replace('ſ', "s") == name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(body: &str) -> String {
        find_model(body.as_bytes())
            .unwrap()
            .value
            .unwrap()
            .into_owned()
    }

    fn code(body: &[u8]) -> &'static str {
        let error = find_model(body).unwrap_err();
        assert_eq!(error.status, 400);
        error.code
    }

    #[test]
    fn finds_model_anywhere_at_top_level() {
        assert_eq!(model(r#"{"model":"gpt-4o","messages":[]}"#), "gpt-4o");
        assert_eq!(
            model(
                r#"{"messages":[{"role":"user","content":"{\"model\":\"x\"}"}],"model":"gpt-4o"}"#
            ),
            "gpt-4o"
        );
        assert_eq!(model(" \n{ \"model\" : \"m\" } \n"), "m");
    }

    #[test]
    fn nested_model_keys_are_not_the_model() {
        let body = r#"{"tools":[{"model":"nested"}],"metadata":{"model":"x"},"model":"top"}"#;
        assert_eq!(model(body), "top");
        assert_eq!(
            code(br#"{"metadata":{"model":"x"}}"#),
            "missing_required_parameter"
        );
    }

    #[test]
    fn span_points_at_the_literal() {
        let body = r#"{"messages":[],"model": "gpt-4o" }"#;
        let field = find_model(body.as_bytes()).unwrap();
        assert_eq!(&body[field.span.clone()], "\"gpt-4o\"");
    }

    #[test]
    fn escaped_keys_and_values_are_unescaped() {
        assert_eq!(model(r#"{"mod\u0065l":"gpt-4o"}"#), "gpt-4o");
        assert_eq!(model(r#"{"model":"gpt\u002d4o"}"#), "gpt-4o");
        assert_eq!(model(r#"{"model":"a\"b"}"#), "a\"b");
    }

    #[test]
    fn duplicate_model_is_refused_even_when_escaped() {
        assert_eq!(code(br#"{"model":"a","model":"b"}"#), "invalid_json");
        assert_eq!(
            find_model(br#"{"model":"a","mod\u0065l":"b"}"#)
                .unwrap_err()
                .message,
            ApiError::duplicate_model().message
        );
    }

    #[test]
    fn malformed_json() {
        for body in [
            &b""[..],
            b"{",
            b"{\"model\":\"a\"",
            b"{\"model\":\"a\",}",
            b"{\"model\":\"a\"} x",
            b"{model:\"a\"}",
            b"{\"model\":\"a\"}{}",
            b"\xff",
        ] {
            assert_eq!(code(body), "invalid_json", "{body:?}");
        }
        let error = find_model(b"{\"model\": }").unwrap_err();
        assert!(error.message.contains("line 1 column"), "{}", error.message);
    }

    #[test]
    fn non_object_bodies() {
        for body in [&b"[]"[..], b"\"model\"", b"42", b"null", b" true "] {
            let error = find_model(body).unwrap_err();
            assert_eq!(
                error.message,
                ApiError::body_not_object().message,
                "{body:?}"
            );
        }
    }

    #[test]
    fn missing_model() {
        assert_eq!(code(b"{}"), "missing_required_parameter");
        assert_eq!(code(br#"{"messages":[]}"#), "missing_required_parameter");
    }

    #[test]
    fn non_string_model() {
        for (body, found) in [
            (r#"{"model":1}"#, "a number"),
            (r#"{"model":-1.5}"#, "a number"),
            (r#"{"model":true}"#, "a boolean"),
            (r#"{"model":["a"]}"#, "an array"),
            (r#"{"model":{"a":1}}"#, "an object"),
        ] {
            let error = find_model(body.as_bytes()).unwrap_err();
            assert_eq!(error.code, "invalid_type");
            assert!(error.message.contains(found), "{body}: {}", error.message);
        }
    }

    #[test]
    fn null_model_is_no_model_but_can_be_rewritten() {
        assert_eq!(code(br#"{"model":null}"#), "missing_required_parameter");
        let body = r#"{"model" : null,"messages":[]}"#;
        let field = model_field(body.as_bytes()).unwrap().unwrap();
        assert_eq!(field.value, None);
        assert_eq!(&body[field.span.clone()], "null");
        let edit = json_model_edit(body.as_bytes(), Some(&field), "dep");
        assert_eq!(apply(body, &edit), r#"{"model" : "dep","messages":[]}"#);
        // null beside a string is still two models.
        assert_eq!(code(br#"{"model":null,"model":"a"}"#), "invalid_json");
    }

    #[test]
    fn keys_that_are_model_but_for_case_are_refused() {
        for body in [
            r#"{"Model":"gpt-4o"}"#,
            r#"{"model":"gpt-4o","MODEL":"secret"}"#,
            r#"{"mOdEl":"x","messages":[]}"#,
            r#"{"\u004dODEL":"x"}"#,
            r#"{"model":"a","mode\u004c":"b"}"#,
        ] {
            let error = find_model(body.as_bytes()).unwrap_err();
            assert_eq!((error.status, error.code), (400, "invalid_json"), "{body}");
            assert!(error.message.contains("only in case"), "{body}");
        }
        // Nested look-alikes are not top-level keys; other near misses are fine.
        assert_eq!(model(r#"{"tools":[{"Model":"x"}],"model":"m"}"#), "m");
        assert_eq!(model(r#"{"models":"x","modeL ":"y","model":"m"}"#), "m");
    }

    #[test]
    fn look_alike_check_covers_non_ascii_keys() {
        assert!(reads_as("MODEL", "model"));
        assert!(!reads_as("model\u{0301}", "model"));
        assert!(!reads_as("mödel", "model"));
        assert!(!reads_as(&"é".repeat(20), "model"));
        assert!(reads_as("ſtream", "stream"));
        assert!(reads_as("STREAM_options", "stream_options"));
    }

    #[test]
    fn invalid_utf8_anywhere_is_refused() {
        for body in [
            &b"{\"model\":\"m\",\"input\":\"\xff\"}"[..],
            b"{\"model\":\"m\",\"input\":\"\xc0\xaf\"}",
            b"{\"model\":\"m\",\"input\":\"\xed\xa0\x80\"}",
            b"{\"model\":\"m\",\"input\":[\"ok\",\"\xe2\x82\"]}",
        ] {
            let error = find_model(body).unwrap_err();
            assert_eq!(error.code, "invalid_json", "{body:?}");
            assert!(error.message.contains("UTF-8"), "{body:?}");
        }
        assert_eq!(
            model("{\"model\":\"m\",\"input\":\"h\u{e9}llo \u{1f600}\"}"),
            "m"
        );
    }

    #[test]
    fn deep_nesting_does_not_overflow_the_stack() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let body = format!(r#"{{"a":{deep},"model":"m"}}"#);
        assert_eq!(model(&body), "m");
        let body = format!(r#"{{"model":{deep}}}"#);
        assert_eq!(code(body.as_bytes()), "invalid_type");
    }

    fn apply(body: &str, edit: &BodyEdit) -> String {
        let mut out = edit.with.clone();
        out.extend_from_slice(&body.as_bytes()[edit.replace..]);
        assert_eq!(out.len(), edit.new_len());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn rewrites_the_model_literal_only() {
        let body = r#"{"input":"hi","model" : "gpt-4o","stream":true}"#;
        let field = find_model(body.as_bytes()).unwrap();
        let edit = json_model_edit(body.as_bytes(), Some(&field), "dep\"1");
        assert_eq!(
            apply(body, &edit),
            r#"{"input":"hi","model" : "dep\"1","stream":true}"#
        );
        assert_eq!(edit.replace, field.span.end);
    }

    #[test]
    fn adds_a_model_when_there_is_none() {
        for (body, expected) in [
            (r#"{"input":"hi"}"#, r#"{"model":"dep","input":"hi"}"#),
            (" { } ", r#" {"model":"dep" } "#),
            ("{\n}", "{\"model\":\"dep\"\n}"),
        ] {
            assert_eq!(model_field(body.as_bytes()).unwrap(), None);
            let edit = json_model_edit(body.as_bytes(), None, "dep");
            let rewritten = apply(body, &edit);
            assert_eq!(rewritten, expected);
            assert_eq!(
                find_model(rewritten.as_bytes()).unwrap().value.unwrap(),
                "dep"
            );
        }
    }

    #[test]
    fn large_bodies() {
        let content = "x".repeat(1 << 20);
        let body =
            format!(r#"{{"messages":[{{"role":"user","content":"{content}"}}],"model":"gpt-4o"}}"#);
        assert_eq!(model(&body), "gpt-4o");
    }
}
