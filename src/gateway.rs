//! The request pipeline, as two decisions the host layer asks for:
//! [`admit`] on the request headers (before any body is read) and [`route`]
//! once the whole body is in. Both answer with what to do, never do it.

use std::borrow::Cow;

use crate::auth::{authenticate, presented_key};
use crate::body::find_model;
use crate::config::{Config, Upstream, UpstreamAuth};
use crate::errors::ApiError;
use crate::headers::{self, Header};
use crate::routes::{classify, Operation};
use crate::secret::Secret;

/// The request headers the decisions need.
#[derive(Debug, Default, Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a [u8],
    pub path: &'a [u8],
    pub authorization: Option<&'a [u8]>,
    pub api_key: Option<&'a [u8]>,
    /// More than one `api-key` header: which one is meant is unclear.
    /// (Envoy joins repeated Authorization headers into one value.)
    pub api_key_repeated: bool,
    pub content_length: Option<&'a [u8]>,
    /// False when the headers ended the request (no body follows).
    pub has_body: bool,
}

impl<'a> RequestHead<'a> {
    pub fn from_headers(headers: &[Header<'a>], has_body: bool) -> Self {
        RequestHead {
            method: headers::first(headers, ":method").unwrap_or_default(),
            path: headers::first(headers, ":path").unwrap_or_default(),
            authorization: headers::first(headers, "authorization"),
            api_key: headers::first(headers, "api-key"),
            api_key_repeated: headers::values(headers, "api-key").nth(1).is_some(),
            content_length: headers::first(headers, "content-length"),
            has_body,
        }
    }
}

/// A request that passed the header checks and now needs its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    pub caller: usize,
    pub operation: Operation,
}

/// Header phase: operation, caller key, declared body size.
pub fn admit(config: &Config, head: &RequestHead<'_>) -> Result<Admitted, ApiError> {
    let operation = classify(head.method, head.path)?;
    if head.api_key_repeated {
        return Err(ApiError::repeated_api_key());
    }
    let key = presented_key(head.authorization, head.api_key)?;
    let caller = authenticate(&config.callers, key).ok_or_else(ApiError::invalid_api_key)?;
    if let Some(length) = head.content_length.and_then(parse_content_length) {
        if length > config.max_request_body_bytes as u64 {
            return Err(ApiError::body_too_large(config.max_request_body_bytes));
        }
    }
    if !head.has_body {
        return Err(ApiError::invalid_json("the request has no body"));
    }
    Ok(Admitted { caller, operation })
}

/// Body phase, checked as chunks arrive: is the body still within the limit?
pub fn check_body_size(config: &Config, received: usize) -> Result<(), ApiError> {
    if received > config.max_request_body_bytes {
        return Err(ApiError::body_too_large(config.max_request_body_bytes));
    }
    Ok(())
}

/// Where an admitted request goes, and as whom.
#[derive(Debug)]
pub struct Forward<'c> {
    pub upstream: &'c Upstream,
    /// The new `:path`, query included.
    pub path: String,
    pub caller: &'c str,
    pub model: String,
    pub deployment: &'c str,
}

/// Body phase, once the body is complete: model, allowlist, upstream path.
pub fn route<'c>(
    config: &'c Config,
    admitted: &Admitted,
    body: &[u8],
) -> Result<Forward<'c>, ApiError> {
    let field = find_model(body)?;
    let alias = field.value.as_ref();
    let caller = config
        .caller(admitted.caller)
        .ok_or_else(|| ApiError::internal("unknown caller"))?;
    let (_, model) = config
        .model(alias)
        .filter(|(index, _)| caller.may_use(*index))
        .ok_or_else(|| ApiError::model_not_found(alias))?;
    let upstream = config
        .upstream(model.upstream)
        .ok_or_else(|| ApiError::internal("unknown upstream"))?;
    let path = format!(
        "/openai/deployments/{}/{}?api-version={}",
        model.deployment,
        admitted.operation.azure_path(),
        upstream.api_version
    );
    Ok(Forward {
        upstream,
        path,
        caller: &caller.name,
        model: model.alias.clone(),
        deployment: &model.deployment,
    })
}

/// A change to the request headers before it goes upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderEdit<'a> {
    Remove(&'static str),
    /// Replaces every value the header had.
    Set(Cow<'a, str>, Cow<'a, [u8]>),
}

impl HeaderEdit<'_> {
    pub fn into_owned(self) -> HeaderEdit<'static> {
        match self {
            HeaderEdit::Remove(name) => HeaderEdit::Remove(name),
            HeaderEdit::Set(name, value) => HeaderEdit::Set(
                Cow::Owned(name.into_owned()),
                Cow::Owned(value.into_owned()),
            ),
        }
    }
}

/// `Authorization: Bearer <token>` for a token upstream.
pub fn bearer(token: &Secret) -> HeaderEdit<'static> {
    let value = format!("Bearer {}", token.expose());
    HeaderEdit::Set(
        Cow::Borrowed("authorization"),
        Cow::Owned(value.into_bytes()),
    )
}

/// Caller credentials: they never travel upstream.
pub const CALLER_CREDENTIAL_HEADERS: [&str; 2] = ["authorization", "api-key"];

impl Forward<'_> {
    /// The token credential (index into `Config::credentials`) this request
    /// needs, if its upstream uses one.
    pub fn token_credential(&self) -> Option<usize> {
        match self.upstream.auth {
            UpstreamAuth::Token(index) => Some(index),
            UpstreamAuth::ApiKey(_) => None,
        }
    }

    /// The header edits, given the caller's headers: drop the caller's
    /// credentials, set authority, path and routing header (replacing any
    /// value the caller sent in it), then the upstream's credential. For a
    /// token upstream, `token` is the bearer token; without one the
    /// caller's `authorization` is removed and the bearer is added later
    /// (a request held until a token arrives).
    ///
    /// Edits go to Envoy one by one: cheaper than rewriting the whole map,
    /// which makes Envoy remove and re-add every header.
    pub fn header_edits<'a>(
        &'a self,
        config: &'a Config,
        caller: &[Header<'_>],
        token: Option<&Secret>,
    ) -> Vec<HeaderEdit<'a>> {
        let credential = match (&self.upstream.auth, token) {
            (UpstreamAuth::ApiKey(key), _) => Some(HeaderEdit::Set(
                Cow::Borrowed("api-key"),
                Cow::Borrowed(key.expose().as_bytes()),
            )),
            (UpstreamAuth::Token(_), Some(token)) => Some(bearer(token)),
            (UpstreamAuth::Token(_), None) => None,
        };
        let overwritten = match &credential {
            Some(HeaderEdit::Set(name, _)) => name.as_ref(),
            _ => "",
        };
        let mut edits = Vec::with_capacity(6);
        for name in CALLER_CREDENTIAL_HEADERS {
            if name != overwritten && headers::first(caller, name).is_some() {
                edits.push(HeaderEdit::Remove(name));
            }
        }
        let mut set = |name: &'a str, value: &'a str| {
            edits.push(HeaderEdit::Set(
                Cow::Borrowed(name),
                Cow::Borrowed(value.as_bytes()),
            ));
        };
        set(":authority", &self.upstream.authority);
        set(":path", &self.path);
        set(&config.cluster_header, &self.upstream.cluster);
        edits.extend(credential);
        edits
    }
}

/// `content-length` as a number; anything malformed is left to Envoy, which
/// refuses it before the filter runs.
fn parse_content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value)
        .ok()?
        .parse()
        .ok()
        .or(Some(u64::MAX))
}

#[cfg(test)]
mod tests;
