//! One request. On its headers the filter admits it and either answers
//! (rejections, the model list), forwards it at once (the model is in the
//! path, or no model is needed), or holds the headers while the body comes
//! in, reading it as it arrives (a form is refused as soon as its model is
//! known to be off limits), and routes it once the body is whole. A request
//! to a token upstream with no token yet waits (paused) until the root
//! resumes or answers it.
//!
//! Responses stream through untouched, except Azure error answers that
//! OpenAI SDKs would misread (see `upstream_errors`), which are held and
//! read whole.
//!
//! Host calls per forwarded request: one to read every header, one to read
//! the body, then one per header edit (about six).

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use super::abi::{self, Buffer, HeaderMap, Status};
use super::log;
use super::tokens::{Lookup, Tokens};
use crate::body::BodySource;
use crate::body_watch::BodyWatch;
use crate::config::Config;
use crate::errors::ApiError;
use crate::gateway::{self, BodyReader, Forward, HeaderEdit, Pending, Plan, RequestHead};
use crate::headers::{self, Header};
use crate::upstream_errors::{self, Encoding, MAX_TRANSLATED_ERROR_BYTES};

enum State {
    /// Headers not seen yet.
    New,
    /// Held on its headers while the body comes in. Holds the encoded
    /// request headers.
    AwaitingBody(Pending, BodyReader, Vec<u8>),
    /// Waiting for its upstream's token; the root resumes or answers it.
    WaitingForToken,
    /// On its way upstream; `Some(n)` when its body streams through
    /// unread, `n` bytes of it so far (held to the body limit all the same).
    Forwarded(Option<usize>),
    /// Answered by the filter.
    Answered,
}

/// What an Azure error answer needs to be translated.
struct Translation {
    alias: String,
    upstream: String,
}

/// An Azure error answer held whole to be translated.
struct HeldError {
    status: u16,
    encoding: Encoding,
}

/// What the VM's requests share, owned by the root.
#[derive(Clone)]
pub struct Shared {
    pub config: Option<Rc<Config>>,
    pub tokens: Option<Rc<RefCell<Tokens>>>,
    pub body_watch: Rc<RefCell<BodyWatch>>,
}

pub struct Request {
    id: u32,
    shared: Shared,
    state: State,
    translation: Option<Translation>,
    held_error: Option<HeldError>,
}

impl Request {
    pub fn new(id: u32, shared: Shared) -> Self {
        Request {
            id,
            shared,
            state: State::New,
            translation: None,
            held_error: None,
        }
    }

    fn config(&self) -> Result<Rc<Config>, ApiError> {
        self.shared
            .config
            .clone()
            .ok_or_else(|| ApiError::internal("the filter is not configured"))
    }

    /// Header phase: admit the request, then answer, forward or wait for the body.
    fn on_headers(&mut self, end_of_stream: bool) -> Result<Action, ApiError> {
        let config = self.config()?;
        let encoded = abi::get_headers(HeaderMap::Request).map_err(|_| unreadable_headers())?;
        let request_headers = headers::decode(&encoded).ok_or_else(unreadable_headers)?;
        let head = RequestHead::from_headers(&request_headers, !end_of_stream);
        let admitted = gateway::admit(&config, &head)?;
        match gateway::plan(&config, admitted)? {
            Plan::Answer(status, body) => {
                self.state = State::Answered;
                send_json(status, &body);
                Ok(Action::Pause)
            }
            Plan::Forward(forward) => {
                let action = self.forward(&config, &forward, &request_headers)?;
                if !end_of_stream {
                    if let State::Forwarded(streamed) = &mut self.state {
                        *streamed = Some(0);
                    }
                }
                Ok(action)
            }
            Plan::ReadBody(pending) => {
                let content_types: Vec<&[u8]> =
                    headers::values(&request_headers, "content-type").collect();
                let reader = BodyReader::new(pending.op, &content_types)?;
                // Hold the headers; with allow_on_headers_stop_iteration the
                // body still arrives, and the headers can change once it has.
                self.state = State::AwaitingBody(pending, reader, encoded);
                let first = self
                    .shared
                    .body_watch
                    .try_borrow_mut()
                    .is_ok_and(|mut watch| watch.hold(self.id, abi::now_ms()));
                // The root must tick to check on it (it does anyway with tokens).
                if first && self.shared.tokens.is_none() {
                    let _ = abi::set_tick_period_ms(super::root::WATCH_TICK_MS);
                }
                Ok(Action::Pause)
            }
        }
    }

    /// More of a held request's body is in (all of it when `complete`):
    /// refuse early, keep holding, or route and forward.
    fn on_body(&mut self, body_size: usize, complete: bool) -> Result<Action, ApiError> {
        let config = self.config()?;
        let State::AwaitingBody(pending, mut reader, encoded_headers) =
            std::mem::replace(&mut self.state, State::Answered)
        else {
            return Ok(Action::Continue);
        };
        let mut body = EnvoyBody { len: body_size };
        let Some(forward) =
            gateway::read_body(&config, &pending, &mut reader, &mut body, complete)?
        else {
            self.state = State::AwaitingBody(pending, reader, encoded_headers);
            return Ok(Action::Pause); // buffer until the whole body is in
        };
        self.release_watch();
        let request_headers = headers::decode(&encoded_headers).ok_or_else(unreadable_headers)?;
        if let Some(edit) = &forward.body_edit {
            abi::set_buffer(Buffer::RequestBody, 0, edit.replace, &edit.with)
                .map_err(|_| ApiError::internal("could not rewrite the request body"))?;
        }
        self.forward(&config, &forward, &request_headers)
    }

    /// Sends the request upstream (Continue), or holds it until its
    /// upstream's token is there (Pause).
    fn forward(
        &mut self,
        config: &Config,
        forward: &Forward<'_>,
        request_headers: &[Header<'_>],
    ) -> Result<Action, ApiError> {
        self.state = State::Forwarded(None);
        self.translation = forward
            .model
            .filter(|_| forward.upstream.is_azure())
            .map(|model| Translation {
                alias: model.alias.clone(),
                upstream: forward.upstream.name.clone(),
            });
        let alias = forward.model.map_or("-", |m| m.alias.as_str());
        // The path without its query: a query is never logged.
        let path = forward.path.split('?').next().unwrap_or_default();
        let token = match forward.token_credential() {
            None => None,
            Some(credential) => {
                let tokens = self
                    .shared
                    .tokens
                    .as_ref()
                    .ok_or_else(|| ApiError::internal("token credentials are not set up"))?;
                let now = abi::now_ms();
                let busy = || ApiError::internal("the token state is busy");
                let lookup = tokens
                    .try_borrow_mut()
                    .map_err(|_| busy())?
                    .lookup(credential, now);
                match lookup {
                    Lookup::Ready(token) => Some(token),
                    Lookup::GiveUp(error) => return Err(error),
                    Lookup::Hold => {
                        let edits = forward
                            .header_edits(config, request_headers, None)
                            .into_iter()
                            .map(HeaderEdit::into_owned)
                            .collect();
                        tokens
                            .try_borrow_mut()
                            .map_err(|_| busy())?
                            .hold(self.id, credential, now, edits);
                        self.state = State::WaitingForToken;
                        // Wake the root now rather than at its next tick.
                        let _ = abi::set_tick_period_ms(1);
                        log::debug(format_args!(
                            "request {}: caller `{}` model `{alias}` waits for a token for upstream `{}`",
                            self.id, forward.caller, forward.upstream.name
                        ));
                        return Ok(Action::Pause);
                    }
                }
            }
        };
        apply_edits(&forward.header_edits(config, request_headers, token.as_ref())).map_err(
            |status| {
                log::error(format_args!(
                    "request {}: Envoy refused a header change (status {}); is \
                     allow_on_headers_stop_iteration: true set on the Wasm filter?",
                    self.id, status.0
                ));
                ApiError::internal(
                    "Envoy refused to let the filter rewrite the request (its operators must \
                     set `allow_on_headers_stop_iteration: true` on the Wasm filter)",
                )
            },
        )?;
        log::debug(format_args!(
            "request {}: caller `{}` model `{alias}` -> upstream `{}` {path}",
            self.id, forward.caller, forward.upstream.name
        ));
        Ok(Action::Continue)
    }

    /// Answers with the OpenAI error JSON; nothing goes upstream.
    fn reject(&mut self, error: &ApiError) -> Action {
        self.state = State::Answered;
        self.translation = None;
        self.release_watch();
        log::debug(format_args!(
            "request {}: answered {} {}",
            self.id, error.status, error.code
        ));
        send_error(error);
        Action::Pause
    }

    fn conclude(&mut self, outcome: Result<Action, ApiError>) -> Action {
        match outcome {
            Ok(action) => action,
            Err(error) => self.reject(&error),
        }
    }

    fn release_watch(&self) {
        if let Ok(mut watch) = self.shared.body_watch.try_borrow_mut() {
            watch.release(self.id);
        }
    }
}

/// The request body in Envoy's buffer, read in pieces.
struct EnvoyBody {
    len: usize,
}

impl BodySource for EnvoyBody {
    fn len(&self) -> usize {
        self.len
    }

    fn read(&mut self, start: usize, len: usize) -> Result<Vec<u8>, ApiError> {
        let len = len.min(self.len.saturating_sub(start));
        if len == 0 {
            return Ok(Vec::new());
        }
        abi::get_buffer(Buffer::RequestBody, start, len)
            .map_err(|_| ApiError::internal("could not read the request body"))
    }
}

fn unreadable_headers() -> ApiError {
    ApiError::internal("could not read the request headers")
}

/// Applies header edits to the effective context's request.
pub fn apply_edits(edits: &[HeaderEdit<'_>]) -> Result<(), Status> {
    for edit in edits {
        match edit {
            HeaderEdit::Remove(name) => abi::remove_header(HeaderMap::Request, name)?,
            HeaderEdit::Set(name, value) => abi::set_header(HeaderMap::Request, name, value)?,
        }
    }
    Ok(())
}

/// Answers the effective context's request with an OpenAI error.
pub fn send_error(error: &ApiError) {
    let mut reply_headers: Vec<Header> = vec![(b"content-type", b"application/json")];
    reply_headers.extend(
        error
            .headers
            .iter()
            .map(|(name, value)| (name.as_bytes(), value.as_bytes())),
    );
    send_reply(error.status, &reply_headers, &error.body());
}

fn send_json(status: u16, body: &[u8]) {
    send_reply(status, &[(b"content-type", b"application/json")], body);
}

fn send_reply(status: u16, reply_headers: &[Header<'_>], body: &[u8]) {
    if let Err(status) = abi::send_local_response(status, reply_headers, body) {
        log::error(format_args!(
            "azure-openai-filter: could not send a local reply (status {})",
            status.0
        ));
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        // A caller that went away while waiting leaves nothing behind. If the
        // root is busy with the waiters right now it skips gone requests.
        match (&self.state, &self.shared.tokens) {
            (State::WaitingForToken, Some(tokens)) => {
                if let Ok(mut tokens) = tokens.try_borrow_mut() {
                    tokens.release(self.id);
                }
            }
            (State::AwaitingBody(..), _) => self.release_watch(),
            _ => {}
        }
    }
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let outcome = self.on_headers(end_of_stream);
        self.conclude(outcome)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        match &mut self.state {
            State::AwaitingBody(..) => {
                // A body reached a held request: the flag it needs is set.
                if let Ok(mut watch) = self.shared.body_watch.try_borrow_mut() {
                    watch.body_arrived();
                }
                let outcome = self.on_body(body_size, end_of_stream);
                self.conclude(outcome)
            }
            State::WaitingForToken => {
                // Held on its headers, the body keeps arriving: keep it until
                // the root has resumed (or answered) the request.
                let waiting = self
                    .shared
                    .tokens
                    .as_ref()
                    .is_some_and(|t| t.try_borrow().map_or(true, |t| t.is_waiting(self.id)));
                if waiting {
                    return Action::Pause;
                }
                self.state = State::Forwarded(None);
                Action::Continue
            }
            State::Forwarded(Some(streamed)) => {
                // A body forwarded unread is held to the limit all the same;
                // over it, the upstream request is reset, never completed.
                *streamed = streamed.saturating_add(body_size);
                let received = *streamed;
                let over = self
                    .shared
                    .config
                    .as_ref()
                    .and_then(|config| gateway::check_body_size(config, received).err());
                match over {
                    Some(error) => self.reject(&error),
                    None => Action::Continue,
                }
            }
            _ => Action::Continue,
        }
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        if !matches!(self.state, State::AwaitingBody(..)) {
            return Action::Continue;
        }
        // Trailers end the body too; the buffer holds all of it.
        let size = abi::buffer_len(Buffer::RequestBody).unwrap_or(0);
        let outcome = self.on_body(size, true);
        self.conclude(outcome)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if self.translation.is_none() || end_of_stream {
            return Action::Continue;
        }
        let Ok(encoded) = abi::get_headers(HeaderMap::Response) else {
            return Action::Continue;
        };
        let Some(response_headers) = headers::decode(&encoded) else {
            return Action::Continue;
        };
        let status = headers::first(&response_headers, ":status")
            .and_then(|s| std::str::from_utf8(s).ok()?.parse::<u16>().ok())
            .unwrap_or(0);
        let json = headers::first(&response_headers, "content-type")
            .is_some_and(|t| t.starts_with(b"application/json"));
        if !upstream_errors::may_translate(status) || !json {
            return Action::Continue;
        }
        // Hold the headers with the body: whether they change (length,
        // encoding) is known once the body has been read.
        self.held_error = Some(HeldError {
            status,
            encoding: Encoding::of(headers::first(&response_headers, "content-encoding")),
        });
        Action::Pause
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(held) = &self.held_error else {
            return Action::Continue;
        };
        if body_size > MAX_TRANSLATED_ERROR_BYTES {
            self.held_error = None; // too big to be an error envelope
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let (Some(translation), Ok(body)) = (
            &self.translation,
            abi::get_buffer(Buffer::ResponseBody, 0, body_size),
        ) else {
            self.held_error = None;
            return Action::Continue;
        };
        if let Some((replacement, note)) = upstream_errors::translate(
            held.status,
            &body,
            &held.encoding,
            &translation.alias,
            &translation.upstream,
        ) {
            log::warn(format_args!("request {}: {note}", self.id));
            let rewritten = abi::remove_header(HeaderMap::Response, "content-length")
                .and_then(|()| abi::remove_header(HeaderMap::Response, "content-encoding"))
                .and_then(|()| abi::set_buffer(Buffer::ResponseBody, 0, body_size, &replacement));
            if rewritten.is_err() {
                log::error(format_args!(
                    "request {}: could not rewrite an upstream error",
                    self.id
                ));
            }
        }
        self.held_error = None;
        Action::Continue
    }
}
