//! The request pipeline, as decisions the host layer asks for: [`admit`]
//! on the request headers (before any body is read), [`plan`] for what can
//! be decided without the body, [`route_body`] once the body is in, and
//! the header edits of a forwarded request. They answer with what to do,
//! never do it.

use std::borrow::Cow;

use serde::Serialize;

use crate::auth::{authenticate, presented_key};
use crate::body::{
    boundary, json_edit, multipart_model_edit, read_request, BodyEdit, BodySource, FormScanner,
};
use crate::config::{Caller, Config, Model, Upstream, UpstreamAuth};
use crate::errors::ApiError;
use crate::headers::{self, Header};
use crate::routes::{classify, BodyFormat, Inbound, Operation};
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

/// A request that passed the header checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub caller: usize,
    pub inbound: Inbound,
}

/// Header phase: what the request is, whose key, declared body size.
pub fn admit(config: &Config, head: &RequestHead<'_>) -> Result<Admitted, ApiError> {
    let inbound = classify(head.method, head.path)?;
    if head.api_key_repeated {
        return Err(ApiError::repeated_api_key());
    }
    let key = presented_key(head.authorization, head.api_key)?;
    let caller = authenticate(&config.callers, key).ok_or_else(ApiError::invalid_api_key)?;
    if inbound.needs_body() {
        if let Some(length) = head.content_length.and_then(parse_content_length) {
            if length > config.max_request_body_bytes as u64 {
                return Err(ApiError::body_too_large(config.max_request_body_bytes));
            }
        }
        if !head.has_body {
            return Err(ApiError::invalid_json("the request has no body"));
        }
    }
    Ok(Admitted { caller, inbound })
}

/// Body phase, checked as chunks arrive: is the body still within the limit?
pub fn check_body_size(config: &Config, received: usize) -> Result<(), ApiError> {
    if received > config.max_request_body_bytes {
        return Err(ApiError::body_too_large(config.max_request_body_bytes));
    }
    Ok(())
}

/// What to do with an admitted request.
#[derive(Debug)]
pub enum Plan<'c> {
    /// The gateway answers itself (the model list): status and JSON body.
    Answer(u16, Vec<u8>),
    /// Forward now; any body goes through untouched and unbuffered.
    Forward(Forward<'c>),
    /// Read the whole body, then [`route_body`].
    ReadBody(Pending),
}

/// A request waiting for its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub caller: usize,
    pub op: Operation,
    /// The model, when an Azure-style path named it.
    pub model: Option<usize>,
}

/// Where an admitted request goes, and as whom.
#[derive(Debug)]
pub struct Forward<'c> {
    pub upstream: &'c Upstream,
    /// The new `:path`, query included.
    pub path: String,
    pub caller: &'c str,
    /// The alias asked for and its deployment (None for stored responses).
    pub model: Option<&'c Model>,
    /// The body's `model` rewritten to the deployment, when the upstream
    /// reads it from there (and `stream_options` the filter added).
    pub body_edit: Option<BodyEdit>,
    /// The operation (None for stored responses): what its answer reports.
    pub op: Option<Operation>,
    /// The filter asked for the stream's usage, which the caller had not:
    /// what that adds to the stream is taken out of it.
    pub strip_usage: bool,
}

/// Header phase, after [`admit`].
pub fn plan(config: &Config, admitted: Admitted) -> Result<Plan<'_>, ApiError> {
    let caller = config
        .caller(admitted.caller)
        .ok_or_else(|| ApiError::internal("unknown caller"))?;
    match admitted.inbound {
        Inbound::ListModels => Ok(Plan::Answer(200, model_list(config, caller))),
        Inbound::GetModel { id } => {
            let (_, model) = resolve(config, caller, &id)?;
            Ok(Plan::Answer(200, json_bytes(&ModelObject::of(model))))
        }
        Inbound::Model { op } => Ok(Plan::ReadBody(Pending {
            caller: admitted.caller,
            op,
            model: None,
        })),
        Inbound::Deployment { op, alias } => {
            let (index, model) = resolve(config, caller, &alias)?;
            let upstream = upstream_of(config, model)?;
            // The body is read where the model goes there, and where a
            // stream may have to be asked for its usage.
            if upstream.model_in_body(op) || upstream.takes_include_usage(op) {
                return Ok(Plan::ReadBody(Pending {
                    caller: admitted.caller,
                    op,
                    model: Some(index),
                }));
            }
            Ok(Plan::Forward(Forward {
                upstream,
                path: upstream.operation_path(op, &model.deployment),
                caller: &caller.name,
                model: Some(model),
                body_edit: None,
                op: Some(op),
                strip_usage: false,
            }))
        }
        Inbound::StoredResponse { id, tail, query } => {
            // Stored responses live on one upstream; a caller reaches them
            // if it may use a model there.
            let upstream = config
                .responses_upstream
                .filter(|&u| config.models_of(caller).any(|m| m.upstream == u))
                .and_then(|u| config.upstream(u))
                .ok_or_else(|| ApiError::response_not_found(&id))?;
            Ok(Plan::Forward(Forward {
                upstream,
                path: upstream.stored_response_path(&id, tail, &query),
                caller: &caller.name,
                model: None,
                body_edit: None,
                op: None,
                strip_usage: false,
            }))
        }
    }
}

/// How a held request's body is read as it arrives.
#[derive(Debug)]
pub enum BodyReader {
    /// Read whole at the end (the JSON is validated in one pass).
    Json,
    /// Scanned as it arrives, so that a form naming a model the caller may
    /// not use is refused before the rest of the upload is in.
    Form {
        boundary: Vec<u8>,
        scanner: FormScanner,
    },
}

impl BodyReader {
    /// Set up in the header phase, from the request's content type (every
    /// value it was sent with: a form's must be sent once).
    pub fn new(op: Operation, content_types: &[&[u8]]) -> Result<Self, ApiError> {
        match op.body_format() {
            BodyFormat::Json => Ok(BodyReader::Json),
            BodyFormat::Multipart => {
                if content_types.len() > 1 {
                    return Err(ApiError::invalid_multipart(
                        "the request has more than one Content-Type header",
                    ));
                }
                let boundary = boundary(content_types.first().copied())?;
                let scanner = FormScanner::new(&boundary);
                Ok(BodyReader::Form { boundary, scanner })
            }
        }
    }
}

/// Body phase, each time more of the body has arrived (`body` holds all of
/// it so far, `complete` once it is whole): refuses as soon as the request
/// cannot go (too large, a malformed form, a model the caller may not
/// use), and once the body is complete says where it goes: model,
/// allowlist, upstream path, and the body edit the upstream needs.
pub fn read_body<'c>(
    config: &'c Config,
    pending: &Pending,
    reader: &mut BodyReader,
    body: &mut dyn BodySource,
    complete: bool,
) -> Result<Option<Forward<'c>>, ApiError> {
    check_body_size(config, body.len())?;
    let caller = config
        .caller(pending.caller)
        .ok_or_else(|| ApiError::internal("unknown caller"))?;
    let from_path = pending.model.and_then(|i| config.models.get(i));
    let mut strip_usage = false;
    let (model, body_edit) = match reader {
        BodyReader::Json => {
            if !complete {
                return Ok(None);
            }
            let bytes = body.read(0, body.len())?;
            let request = read_request(&bytes)?;
            let alias = request.model.as_ref().and_then(|f| f.value.as_deref());
            let model = match (from_path, alias) {
                (Some(model), _) => model,
                (None, Some(alias)) => resolve(config, caller, alias)?.1,
                (None, None) => return Err(ApiError::missing_model()),
            };
            let upstream = upstream_of(config, model)?;
            // A stream is asked for its usage, so that it is counted.
            strip_usage = request.stream
                && !request.asks_for_usage()
                && upstream.takes_include_usage(pending.op);
            let deployment = upstream
                .model_in_body(pending.op)
                .then_some(model.deployment.as_str());
            let edit = json_edit(&bytes, &request, deployment, strip_usage);
            (model, edit)
        }
        BodyReader::Form { boundary, scanner } => {
            scanner.advance(body, complete)?;
            let field = scanner.field();
            let model = match (from_path, field) {
                (Some(model), _) => model,
                // Checked as soon as the field is read, whole body or not.
                (None, Some(field)) => resolve(config, caller, &field.value)?.1,
                (None, None) if complete => {
                    return Err(ApiError::invalid_multipart("the form has no `model` field"))
                }
                (None, None) => return Ok(None),
            };
            if !complete {
                return Ok(None);
            }
            let upstream = upstream_of(config, model)?;
            let edit = if upstream.model_in_body(pending.op) {
                Some(multipart_model_edit(
                    body,
                    boundary,
                    field,
                    &model.deployment,
                )?)
            } else {
                None
            };
            (model, edit)
        }
    };
    let upstream = upstream_of(config, model)?;
    Ok(Some(Forward {
        upstream,
        path: upstream.operation_path(pending.op, &model.deployment),
        caller: &caller.name,
        model: Some(model),
        body_edit,
        op: Some(pending.op),
        strip_usage,
    }))
}

/// The model an alias names, if the caller may use it. Unknown and
/// forbidden aliases get the same answer, so callers cannot probe.
fn resolve<'c>(
    config: &'c Config,
    caller: &Caller,
    alias: &str,
) -> Result<(usize, &'c Model), ApiError> {
    config
        .model(alias)
        .filter(|(index, _)| caller.may_use(*index))
        .ok_or_else(|| ApiError::model_not_found(alias))
}

fn upstream_of<'c>(config: &'c Config, model: &Model) -> Result<&'c Upstream, ApiError> {
    config
        .upstream(model.upstream)
        .ok_or_else(|| ApiError::internal("unknown upstream"))
}

/// OpenAI's model object, for the caller's own aliases.
#[derive(Serialize)]
struct ModelObject<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

impl<'a> ModelObject<'a> {
    fn of(model: &'a Model) -> Self {
        ModelObject {
            id: &model.alias,
            object: "model",
            created: 0,
            owned_by: "azure-openai-filter",
        }
    }
}

fn model_list(config: &Config, caller: &Caller) -> Vec<u8> {
    #[derive(Serialize)]
    struct List<'a> {
        object: &'static str,
        data: Vec<ModelObject<'a>>,
    }
    json_bytes(&List {
        object: "list",
        data: config.models_of(caller).map(ModelObject::of).collect(),
    })
}

fn json_bytes(value: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
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

/// `Authorization: Bearer <token>`.
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
            UpstreamAuth::ApiKey(_) | UpstreamAuth::Bearer(_) => None,
        }
    }

    /// The header edits, given the caller's headers: drop the caller's
    /// credentials (only those it sent: each edit is a host call), set
    /// authority, path and routing header (replacing any value the caller
    /// sent in it), ask for an uncompressed answer, fix `content-length`
    /// after a body edit, then add the upstream's credential. For a token upstream,
    /// `token` is the bearer token; without one the caller's
    /// `authorization` is removed and the bearer is added later (a request
    /// held until a token arrives).
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
            (UpstreamAuth::Bearer(secret), _) => Some(bearer(secret)),
            (UpstreamAuth::Token(_), Some(token)) => Some(bearer(token)),
            (UpstreamAuth::Token(_), None) => None,
        };
        let overwritten = match &credential {
            Some(HeaderEdit::Set(name, _)) => name.as_ref(),
            _ => "",
        };
        let mut edits = Vec::with_capacity(8);
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
        // Answers come back uncompressed, so that the filter can read the
        // ones it must (errors to translate) whatever the caller accepts.
        set("accept-encoding", "identity");
        if let Some(edit) = &self.body_edit {
            if headers::first(caller, "content-length").is_some() {
                let length = edit.new_len().to_string();
                edits.push(HeaderEdit::Set(
                    Cow::Borrowed("content-length"),
                    Cow::Owned(length.into_bytes()),
                ));
            }
        }
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
