//! One request. On its headers the filter admits it and either answers
//! (rejections, the model list), forwards it at once (the model is in the
//! path, or no model is needed), or holds the headers until the body is in
//! to find the model there. A request to a token upstream with no token
//! yet waits (paused) until the root resumes or answers it.
//!
//! Responses stream through untouched, except Azure error answers that
//! OpenAI SDKs would misread (see `upstream_errors`), which are read whole.
//!
//! Host calls per forwarded request: one to read every header, one to read
//! the body, then one per header edit (about five).

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use super::abi::{self, Buffer, HeaderMap, Status};
use super::log;
use super::tokens::{Lookup, Tokens};
use crate::body::BodySource;
use crate::config::Config;
use crate::errors::ApiError;
use crate::gateway::{self, Forward, HeaderEdit, Pending, Plan, RequestHead};
use crate::headers::{self, Header};
use crate::upstream_errors;

/// Error answers larger than this are passed through unread.
const MAX_TRANSLATED_ERROR_BYTES: usize = 64 * 1024;

enum State {
    /// Headers not seen yet.
    New,
    /// Waiting for the whole body. Holds the encoded request headers.
    AwaitingBody(Pending, Vec<u8>),
    /// Waiting for its upstream's token; the root resumes or answers it.
    WaitingForToken,
    /// On its way upstream (or answered by the filter).
    Forwarded,
    /// An Azure error answer with this status, read whole to translate.
    ReadingError(u16),
}

/// What an Azure error answer needs to be translated.
struct Translation {
    alias: String,
    upstream: String,
}

pub struct Request {
    id: u32,
    config: Option<Rc<Config>>,
    tokens: Option<Rc<RefCell<Tokens>>>,
    state: State,
    translation: Option<Translation>,
}

impl Request {
    pub fn new(id: u32, config: Option<Rc<Config>>, tokens: Option<Rc<RefCell<Tokens>>>) -> Self {
        Request {
            id,
            config,
            tokens,
            state: State::New,
            translation: None,
        }
    }

    fn config(&self) -> Result<Rc<Config>, ApiError> {
        self.config
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
                self.state = State::Forwarded;
                send_json(status, &body);
                Ok(Action::Pause)
            }
            Plan::Forward(forward) => self.forward(&config, &forward, &request_headers),
            Plan::ReadBody(pending) => {
                // Hold the headers; with allow_on_headers_stop_iteration the
                // body still arrives, and the headers can change once it has.
                self.state = State::AwaitingBody(pending, encoded);
                Ok(Action::Pause)
            }
        }
    }

    /// The body is complete: route the request on it and forward it.
    fn on_complete_body(
        &mut self,
        pending: Pending,
        encoded_headers: &[u8],
        body_size: usize,
    ) -> Result<Action, ApiError> {
        let config = self.config()?;
        gateway::check_body_size(&config, body_size)?;
        let request_headers = headers::decode(encoded_headers).ok_or_else(unreadable_headers)?;
        let content_type = headers::first(&request_headers, "content-type");
        let mut body = EnvoyBody { len: body_size };
        let forward = gateway::route_body(&config, &pending, &mut body, content_type)?;
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
        self.state = State::Forwarded;
        self.translation = forward
            .model
            .filter(|_| forward.upstream.is_azure())
            .map(|model| Translation {
                alias: model.alias.clone(),
                upstream: forward.upstream.name.clone(),
            });
        let alias = forward.model.map_or("-", |m| m.alias.as_str());
        let token = match forward.token_credential() {
            None => None,
            Some(credential) => {
                let tokens = self
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
                 allow_on_headers_stop_iteration set on the Wasm filter?",
                    self.id, status.0
                ));
                ApiError::internal("could not rewrite the request")
            },
        )?;
        log::debug(format_args!(
            "request {}: caller `{}` model `{alias}` -> upstream `{}` {}",
            self.id, forward.caller, forward.upstream.name, forward.path
        ));
        Ok(Action::Continue)
    }

    /// Answers with the OpenAI error JSON; nothing goes upstream.
    fn reject(&mut self, error: &ApiError) -> Action {
        self.state = State::Forwarded;
        self.translation = None;
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
        if let (State::WaitingForToken, Some(tokens)) = (&self.state, &self.tokens) {
            if let Ok(mut tokens) = tokens.try_borrow_mut() {
                tokens.release(self.id);
            }
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
        match self.state {
            State::AwaitingBody(..) => {}
            State::WaitingForToken => {
                // Held on its headers, the body keeps arriving: keep it until
                // the root has resumed (or answered) the request.
                let waiting = self
                    .tokens
                    .as_ref()
                    .is_some_and(|t| t.try_borrow().map_or(true, |t| t.is_waiting(self.id)));
                if waiting {
                    return Action::Pause;
                }
                self.state = State::Forwarded;
                return Action::Continue;
            }
            _ => return Action::Continue,
        }
        if let Ok(config) = self.config() {
            if let Err(error) = gateway::check_body_size(&config, body_size) {
                return self.reject(&error);
            }
        }
        if !end_of_stream {
            return Action::Pause; // buffer until the whole body is in
        }
        self.finish_body(body_size)
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        if !matches!(self.state, State::AwaitingBody(..)) {
            return Action::Continue;
        }
        // Trailers end the body too; the buffer holds all of it.
        let size = abi::buffer_len(Buffer::RequestBody).unwrap_or(0);
        self.finish_body(size)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if self.translation.is_none() || end_of_stream {
            return Action::Continue;
        }
        let status = abi::get_header(HeaderMap::Response, ":status")
            .ok()
            .flatten()
            .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u16>().ok())
            .unwrap_or(0);
        if !upstream_errors::may_translate(status) {
            return Action::Continue;
        }
        let json = abi::get_header(HeaderMap::Response, "content-type")
            .ok()
            .flatten()
            .is_some_and(|t| t.starts_with(b"application/json"));
        if json {
            // The body may change length: let Envoy frame it.
            let _ = abi::remove_header(HeaderMap::Response, "content-length");
            self.state = State::ReadingError(status);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let State::ReadingError(status) = self.state else {
            return Action::Continue;
        };
        if !end_of_stream {
            return if body_size > MAX_TRANSLATED_ERROR_BYTES {
                self.state = State::Forwarded; // too big to be an error envelope
                Action::Continue
            } else {
                Action::Pause
            };
        }
        self.state = State::Forwarded;
        let (Some(translation), Ok(body)) = (
            &self.translation,
            abi::get_buffer(Buffer::ResponseBody, 0, body_size),
        ) else {
            return Action::Continue;
        };
        if let Some((replacement, note)) =
            upstream_errors::translate(status, &body, &translation.alias, &translation.upstream)
        {
            log::warn(format_args!("request {}: {note}", self.id));
            if abi::set_buffer(Buffer::ResponseBody, 0, body_size, &replacement).is_err() {
                log::error(format_args!(
                    "request {}: could not rewrite an upstream error",
                    self.id
                ));
            }
        }
        Action::Continue
    }
}

impl Request {
    fn finish_body(&mut self, body_size: usize) -> Action {
        let State::AwaitingBody(pending, encoded_headers) =
            std::mem::replace(&mut self.state, State::Forwarded)
        else {
            return Action::Continue;
        };
        let outcome = self.on_complete_body(pending, &encoded_headers, body_size);
        self.conclude(outcome)
    }
}
