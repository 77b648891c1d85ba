//! One request: headers are held until the body is complete, then the
//! request is either answered by the filter or rewritten and let through.
//! A request to a token upstream with no token yet waits (paused) until the
//! root resumes or answers it. Responses are never touched, so streams flow
//! back unbuffered.
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
use crate::config::Config;
use crate::errors::ApiError;
use crate::gateway::{self, Admitted, HeaderEdit, RequestHead};
use crate::headers::{self, Header};

enum State {
    /// Headers not seen yet.
    New,
    /// Admitted on its headers; collecting the body. Holds the encoded
    /// request headers, from which the header edits are worked out.
    AwaitingBody(Admitted, Vec<u8>),
    /// Waiting for its upstream's token; the root resumes or answers it.
    WaitingForToken,
    /// Answered by the filter, or forwarded: nothing more to do.
    Done,
}

pub struct Request {
    id: u32,
    config: Option<Rc<Config>>,
    tokens: Option<Rc<RefCell<Tokens>>>,
    state: State,
}

impl Request {
    pub fn new(id: u32, config: Option<Rc<Config>>, tokens: Option<Rc<RefCell<Tokens>>>) -> Self {
        Request {
            id,
            config,
            tokens,
            state: State::New,
        }
    }

    fn config(&self) -> Result<&Config, ApiError> {
        self.config
            .as_deref()
            .ok_or_else(|| ApiError::internal("the filter is not configured"))
    }

    /// Header phase: admit the request (route, caller key, declared size).
    fn on_headers(&self, end_of_stream: bool) -> Result<(Admitted, Vec<u8>), ApiError> {
        let config = self.config()?;
        let encoded = abi::get_headers(HeaderMap::Request).map_err(|_| unreadable_headers())?;
        let request_headers = headers::decode(&encoded).ok_or_else(unreadable_headers)?;
        let head = RequestHead::from_headers(&request_headers, !end_of_stream);
        let admitted = gateway::admit(config, &head)?;
        Ok((admitted, encoded))
    }

    /// The body is complete: route the request, then forward it (Continue)
    /// or hold it for a token (Pause).
    fn on_complete_body(
        &mut self,
        admitted: Admitted,
        encoded_headers: &[u8],
        body_size: usize,
    ) -> Result<Action, ApiError> {
        let config = self.config()?;
        let body = abi::get_buffer(Buffer::RequestBody, 0, body_size)
            .map_err(|_| ApiError::internal("could not read the request body"))?;
        gateway::check_body_size(config, body.len())?;
        let forward = gateway::route(config, &admitted, &body)?;
        let request_headers = headers::decode(encoded_headers).ok_or_else(unreadable_headers)?;
        let token = match forward.token_credential() {
            None => None,
            Some(credential) => {
                let tokens = self
                    .tokens
                    .as_ref()
                    .ok_or_else(|| ApiError::internal("token credentials are not set up"))?;
                let now = abi::now_ms();
                let lookup = tokens.borrow_mut().lookup(credential, now);
                match lookup {
                    Lookup::Ready(token) => Some(token),
                    Lookup::GiveUp(error) => return Err(error),
                    Lookup::Hold => {
                        let edits = forward
                            .header_edits(config, &request_headers, None)
                            .into_iter()
                            .map(HeaderEdit::into_owned)
                            .collect();
                        tokens.borrow_mut().hold(self.id, credential, now, edits);
                        // Wake the root now rather than at its next tick.
                        let _ = abi::set_tick_period_ms(1);
                        log::debug(format_args!(
                            "request {}: caller `{}` model `{}` waits for a token for upstream `{}`",
                            self.id, forward.caller, forward.model, forward.upstream.name
                        ));
                        return Ok(Action::Pause);
                    }
                }
            }
        };
        apply_edits(&forward.header_edits(config, &request_headers, token.as_ref())).map_err(
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
            "request {}: caller `{}` model `{}` -> upstream `{}` deployment `{}`",
            self.id, forward.caller, forward.model, forward.upstream.name, forward.deployment
        ));
        Ok(Action::Continue)
    }

    /// Ends the body phase: forward (Continue), hold or answer (Pause).
    fn finish(&mut self, body_size: usize) -> Action {
        let State::AwaitingBody(admitted, encoded_headers) =
            std::mem::replace(&mut self.state, State::Done)
        else {
            return Action::Continue;
        };
        match self.on_complete_body(admitted, &encoded_headers, body_size) {
            Ok(Action::Pause) => {
                self.state = State::WaitingForToken;
                Action::Pause
            }
            Ok(action) => action,
            Err(error) => self.reject(&error),
        }
    }

    /// Answers with the OpenAI error JSON; nothing goes upstream.
    fn reject(&mut self, error: &ApiError) -> Action {
        self.state = State::Done;
        log::debug(format_args!(
            "request {}: answered {} {}",
            self.id, error.status, error.code
        ));
        send_error(error);
        Action::Pause
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
    if let Err(status) = abi::send_local_response(error.status, &reply_headers, &error.body()) {
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
        match self.on_headers(end_of_stream) {
            Ok((admitted, encoded_headers)) => {
                // Hold the headers; with allow_on_headers_stop_iteration the
                // body still arrives, and the headers can change once it has.
                self.state = State::AwaitingBody(admitted, encoded_headers);
                Action::Pause
            }
            Err(error) => self.reject(&error),
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !matches!(self.state, State::AwaitingBody(..)) {
            return Action::Continue;
        }
        if let Ok(config) = self.config() {
            if let Err(error) = gateway::check_body_size(config, body_size) {
                return self.reject(&error);
            }
        }
        if !end_of_stream {
            return Action::Pause; // buffer until the whole body is in
        }
        self.finish(body_size)
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        // Trailers end the body too; the buffer holds all of it.
        let limit = self.config().map_or(0, |c| c.max_request_body_bytes);
        self.finish(limit.saturating_add(1))
    }
}
