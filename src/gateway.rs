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
    JsonRequest,
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
    /// The alias asked for (None for stored responses).
    pub model: Option<&'c Model>,
    /// The target chosen for it (index into `Config::targets`).
    pub target: Option<usize>,
    /// The body's `model` rewritten to the deployment, when the upstream
    /// reads it from there (and `stream_options` the filter added).
    pub body_edit: Option<BodyEdit>,
    /// The operation (None for stored responses): what its answer reports.
    pub op: Option<Operation>,
    /// The filter asked for the stream's usage, which the caller had not:
    /// what that adds to the stream is taken out of it.
    pub strip_usage: bool,
    /// `x-ms-spillover-deployment` for the target, if it has one.
    pub spillover: Option<&'c str>,
    /// The caller's own key for the upstream (see [`take_caller_key`]):
    /// sent as `api-key` in place of the upstream's credential.
    pub caller_key: Option<Secret>,
}

/// Picks a model's target (for pools: by priority, weight and cooldown).
pub trait Chooser {
    /// A target of `model` (index into `Config::targets`), or why none.
    fn choose(&mut self, config: &Config, model: &Model) -> Result<usize, ApiError>;
}

/// The first target of every model: for single-target models and tests.
pub struct FirstTarget;

impl Chooser for FirstTarget {
    fn choose(&mut self, _config: &Config, model: &Model) -> Result<usize, ApiError> {
        model
            .primary()
            .map(|t| t.target)
            .ok_or_else(|| ApiError::internal("a model without targets"))
    }
}

/// Header phase, after [`admit`].
pub fn plan<'c>(
    config: &'c Config,
    admitted: Admitted,
    chooser: &mut dyn Chooser,
) -> Result<Plan<'c>, ApiError> {
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
            // The body is read where the model goes there, where a stream
            // may have to be asked for its usage, and where another target
            // may have to be sent it again.
            let needs_body = model.targets.len() > 1
                || model.targets.iter().any(|t| {
                    config
                        .target_upstream(t.target)
                        .is_some_and(|(_, upstream)| {
                            upstream.model_in_body(op) || upstream.takes_include_usage(op)
                        })
                });
            if needs_body {
                return Ok(Plan::ReadBody(Pending {
                    caller: admitted.caller,
                    op,
                    model: Some(index),
                }));
            }
            let target = chooser.choose(config, model)?;
            Ok(Plan::Forward(forward_to(
                config, caller, model, target, op, None, false,
            )?))
        }
        Inbound::StoredResponse { id, tail, query } => {
            // Stored responses live on one upstream; a caller reaches them
            // if it may use a model there.
            let on_upstream = |u: usize| {
                config.models_of(caller).any(|m| {
                    m.targets
                        .iter()
                        .any(|t| config.target(t.target).is_some_and(|t| t.upstream == u))
                })
            };
            let upstream = config
                .responses_upstream
                .filter(|&u| on_upstream(u))
                .and_then(|u| config.upstream(u))
                .ok_or_else(|| ApiError::response_not_found(&id))?;
            Ok(Plan::Forward(Forward {
                upstream,
                path: upstream.stored_response_path(&id, tail, &query),
                caller: &caller.name,
                model: None,
                target: None,
                body_edit: None,
                op: None,
                strip_usage: false,
                spillover: None,
                caller_key: None,
            }))
        }
    }
}

/// A request for `model` to one of its targets.
fn forward_to<'c>(
    config: &'c Config,
    caller: &'c Caller,
    model: &'c Model,
    target: usize,
    op: Operation,
    body_edit: Option<BodyEdit>,
    strip_usage: bool,
) -> Result<Forward<'c>, ApiError> {
    let (chosen, upstream) = config
        .target_upstream(target)
        .ok_or_else(|| ApiError::internal("unknown target"))?;
    let spillover = model
        .targets
        .iter()
        .find(|t| t.target == target)
        .and_then(|t| t.spillover.as_deref());
    Ok(Forward {
        upstream,
        path: upstream.operation_path(op, &chosen.deployment),
        caller: &caller.name,
        model: Some(model),
        target: Some(target),
        body_edit,
        op: Some(op),
        strip_usage,
        spillover,
        caller_key: None,
    })
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
/// allowlist, target, upstream path, and the body edit the upstream needs.
pub fn read_body<'c>(
    config: &'c Config,
    pending: &Pending,
    reader: &mut BodyReader,
    body: &mut dyn BodySource,
    complete: bool,
    chooser: &mut dyn Chooser,
) -> Result<Option<Forward<'c>>, ApiError> {
    check_body_size(config, body.len())?;
    let caller = config
        .caller(pending.caller)
        .ok_or_else(|| ApiError::internal("unknown caller"))?;
    let from_path = pending.model.and_then(|i| config.models.get(i));
    let model = match reader {
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
            let target = chooser.choose(config, model)?;
            return json_forward(config, caller, model, target, pending.op, &bytes, &request)
                .map(Some);
        }
        BodyReader::Form { scanner, .. } => {
            scanner.advance(body, complete)?;
            match (from_path, scanner.field()) {
                (Some(model), _) => model,
                // Checked as soon as the field is read, whole body or not.
                (None, Some(field)) => resolve(config, caller, &field.value)?.1,
                (None, None) if complete => {
                    return Err(ApiError::invalid_multipart("the form has no `model` field"))
                }
                (None, None) => return Ok(None),
            }
        }
    };
    if !complete {
        return Ok(None);
    }
    let BodyReader::Form { boundary, scanner } = reader else {
        return Err(ApiError::internal("not a form"));
    };
    let target = chooser.choose(config, model)?;
    form_forward(
        config,
        caller,
        model,
        target,
        pending.op,
        body,
        boundary,
        scanner.field(),
    )
    .map(Some)
}

/// A JSON request to a target: `model` rewritten where the upstream reads
/// it, a stream asked for its usage where the caller did not.
fn json_forward<'c>(
    config: &'c Config,
    caller: &'c Caller,
    model: &'c Model,
    target: usize,
    op: Operation,
    bytes: &[u8],
    request: &JsonRequest<'_>,
) -> Result<Forward<'c>, ApiError> {
    let (chosen, upstream) = config
        .target_upstream(target)
        .ok_or_else(|| ApiError::internal("unknown target"))?;
    // A stream is asked for its usage, so that it is counted.
    let strip_usage =
        request.stream && !request.asks_for_usage() && upstream.takes_include_usage(op);
    let deployment = upstream
        .model_in_body(op)
        .then_some(chosen.deployment.as_str());
    let edit = json_edit(bytes, request, deployment, strip_usage);
    forward_to(config, caller, model, target, op, edit, strip_usage)
}

/// A form to a target: its `model` field rewritten where the upstream
/// reads it.
#[allow(clippy::too_many_arguments)]
fn form_forward<'c>(
    config: &'c Config,
    caller: &'c Caller,
    model: &'c Model,
    target: usize,
    op: Operation,
    body: &mut dyn BodySource,
    boundary: &[u8],
    field: Option<&crate::body::FormField>,
) -> Result<Forward<'c>, ApiError> {
    let (chosen, upstream) = config
        .target_upstream(target)
        .ok_or_else(|| ApiError::internal("unknown target"))?;
    let edit = if upstream.model_in_body(op) {
        Some(multipart_model_edit(
            body,
            boundary,
            field,
            &chosen.deployment,
        )?)
    } else {
        None
    };
    forward_to(config, caller, model, target, op, edit, false)
}

/// What a request needs to be sent again to another of its model's
/// targets (failover): its body as the caller sent it.
#[derive(Debug)]
pub struct Replay {
    pub caller: usize,
    pub model: usize,
    pub op: Operation,
    pub body: Vec<u8>,
    /// A form's boundary; None for JSON.
    pub boundary: Option<Vec<u8>>,
}

/// The request `replay` makes to another target, and the whole body it
/// sends there.
pub fn replay_to<'c>(
    config: &'c Config,
    replay: &Replay,
    target: usize,
) -> Result<(Forward<'c>, Vec<u8>), ApiError> {
    let caller = config
        .caller(replay.caller)
        .ok_or_else(|| ApiError::internal("unknown caller"))?;
    let model = config
        .models
        .get(replay.model)
        .ok_or_else(|| ApiError::internal("unknown model"))?;
    let forward = match &replay.boundary {
        None => {
            let request = read_request(&replay.body)?;
            json_forward(
                config,
                caller,
                model,
                target,
                replay.op,
                &replay.body,
                &request,
            )?
        }
        Some(boundary) => {
            let mut body: &[u8] = &replay.body;
            let mut scanner = FormScanner::new(boundary);
            scanner.advance(&mut body, true)?;
            let mut body: &[u8] = &replay.body;
            form_forward(
                config,
                caller,
                model,
                target,
                replay.op,
                &mut body,
                boundary,
                scanner.field(),
            )?
        }
    };
    let sent = match &forward.body_edit {
        None => replay.body.clone(),
        Some(edit) => {
            let mut sent = edit.with.clone();
            sent.extend_from_slice(replay.body.get(edit.replace..).unwrap_or_default());
            sent
        }
    };
    Ok((forward, sent))
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
    Remove(Cow<'a, str>),
    /// Replaces every value the header had.
    Set(Cow<'a, str>, Cow<'a, [u8]>),
}

impl HeaderEdit<'_> {
    pub fn into_owned(self) -> HeaderEdit<'static> {
        match self {
            HeaderEdit::Remove(name) => HeaderEdit::Remove(Cow::Owned(name.into_owned())),
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

/// With `global_rate_limit`, the caller's name and the model's alias, for
/// the descriptors of Envoy's rate-limit filter (the route removes them
/// before the request goes upstream). The filter always sets them,
/// replacing whatever the caller sent.
pub const RATE_LIMIT_HEADERS: [&str; 2] = ["x-azure-openai-caller", "x-azure-openai-model"];

/// A caller's own upstream key, in the header its upstream names
/// (`upstreams.<name>.caller_credentials`): taken into the request (after
/// the caller's gateway key and allowlist were checked) where its upstream
/// allows it for this caller; anywhere else, and in any other of the
/// headers some upstream names, it gets 400. The key is never echoed.
pub fn take_caller_key(
    config: &Config,
    forward: &mut Forward<'_>,
    caller: &[Header<'_>],
) -> Result<(), ApiError> {
    let mut sent = config
        .caller_key_headers
        .iter()
        .flat_map(|name| headers::values(caller, name).map(move |value| (name, value)));
    let Some((name, value)) = sent.next() else {
        return Ok(());
    };
    let allowed = forward
        .upstream
        .caller_keys
        .as_ref()
        .filter(|keys| keys.header == *name && keys.allows(forward.caller));
    if allowed.is_none() {
        return Err(ApiError::caller_key_not_allowed(
            name,
            &forward.upstream.name,
        ));
    }
    if sent.next().is_some() {
        return Err(ApiError::invalid_caller_key(name));
    }
    let plausible = (1..=512).contains(&value.len()) && value.iter().all(|b| b.is_ascii_graphic());
    let key = std::str::from_utf8(value)
        .ok()
        .filter(|_| plausible)
        .ok_or_else(|| ApiError::invalid_caller_key(name))?;
    forward.caller_key = Some(Secret::new(key.to_string()));
    Ok(())
}

impl Forward<'_> {
    /// The token credential (index into `Config::credentials`) this request
    /// needs, if its upstream uses one (and the caller sent no key of its own).
    pub fn token_credential(&self) -> Option<usize> {
        if self.caller_key.is_some() {
            return None;
        }
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
            _ if self.caller_key.is_some() => self.caller_key.as_ref().map(|key| {
                HeaderEdit::Set(
                    Cow::Borrowed("api-key"),
                    Cow::Borrowed(key.expose().as_bytes()),
                )
            }),
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
                edits.push(HeaderEdit::Remove(Cow::Borrowed(name)));
            }
        }
        // A caller's own upstream key never travels under its own name.
        for name in &config.caller_key_headers {
            if headers::first(caller, name).is_some() {
                edits.push(HeaderEdit::Remove(Cow::Borrowed(name.as_str())));
            }
        }
        // Headers that steer Azure (`x-ms-spillover-deployment`, ...) are
        // the operator's to set, not the caller's.
        for (name, _) in caller {
            if name.starts_with(b"x-ms-") {
                let name = String::from_utf8_lossy(name).into_owned();
                if !edits.contains(&HeaderEdit::Remove(Cow::Borrowed(name.as_str()))) {
                    edits.push(HeaderEdit::Remove(Cow::Owned(name)));
                }
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
        if let Some(spillover) = self.spillover {
            edits.push(HeaderEdit::Set(
                Cow::Borrowed("x-ms-spillover-deployment"),
                Cow::Borrowed(spillover.as_bytes()),
            ));
        }
        if config.global_rate_limit {
            edits.push(HeaderEdit::Set(
                Cow::Borrowed(RATE_LIMIT_HEADERS[0]),
                Cow::Borrowed(self.caller.as_bytes()),
            ));
            match self.model {
                Some(model) => edits.push(HeaderEdit::Set(
                    Cow::Borrowed(RATE_LIMIT_HEADERS[1]),
                    Cow::Borrowed(model.alias.as_bytes()),
                )),
                None if headers::first(caller, RATE_LIMIT_HEADERS[1]).is_some() => {
                    edits.push(HeaderEdit::Remove(Cow::Borrowed(RATE_LIMIT_HEADERS[1])))
                }
                None => {}
            }
        }
        for (name, value) in &self.upstream.headers {
            edits.push(HeaderEdit::Set(
                Cow::Borrowed(name.as_str()),
                Cow::Borrowed(value.expose().as_bytes()),
            ));
        }
        edits.extend(credential);
        edits
    }

    /// The headers of this request sent by callout (to another target,
    /// after a failure): the caller's, less what never goes upstream
    /// (credentials, hop-by-hop and Envoy's own headers, the framing, what
    /// steers Azure), then the same edits as [`Forward::header_edits`].
    pub fn callout_headers(
        &self,
        config: &Config,
        caller: &[Header<'_>],
        token: Option<&Secret>,
        body_len: usize,
    ) -> Vec<(String, String)> {
        const DROPPED: [&str; 12] = [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "content-length",
            "expect",
            "host",
            "accept-encoding",
            "x-ms-spillover-deployment",
        ];
        let mut out: Vec<(String, String)> = caller
            .iter()
            .filter(|(name, _)| {
                !name.starts_with(b":")
                    && !name.starts_with(b"x-envoy-")
                    && !name.starts_with(b"x-ms-")
                    && !DROPPED.iter().any(|d| d.as_bytes() == *name)
                    && !RATE_LIMIT_HEADERS.iter().any(|r| r.as_bytes() == *name)
                    && !config
                        .caller_key_headers
                        .iter()
                        .any(|c| c.as_bytes() == *name)
                    && !CALLER_CREDENTIAL_HEADERS
                        .iter()
                        .any(|c| c.as_bytes() == *name)
                    && *name != config.cluster_header.as_bytes()
            })
            .filter_map(|(name, value)| {
                Some((
                    std::str::from_utf8(name).ok()?.to_string(),
                    std::str::from_utf8(value).ok()?.to_string(),
                ))
            })
            .collect();
        let method = headers::first(caller, ":method").unwrap_or(b"POST");
        out.push((
            ":method".into(),
            String::from_utf8_lossy(method).into_owned(),
        ));
        for edit in self.header_edits(config, &[], token) {
            match edit {
                HeaderEdit::Set(name, value)
                    if name != config.cluster_header.as_str()
                        && !RATE_LIMIT_HEADERS.contains(&name.as_ref()) =>
                {
                    out.retain(|(n, _)| *n != name);
                    out.push((
                        name.into_owned(),
                        String::from_utf8_lossy(&value).into_owned(),
                    ));
                }
                _ => {}
            }
        }
        out.push(("content-length".into(), body_len.to_string()));
        out
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
