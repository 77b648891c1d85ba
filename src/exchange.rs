//! One request, from its headers to the end of its response: the state
//! machine the host's request context drives, callback by callback.
//!
//! On its headers the filter admits the request and either answers
//! (rejections, the model list), forwards it at once (the model is in the
//! path, or no model is needed), or holds the headers while the body comes
//! in, reading it as it arrives (a form is refused as soon as its model is
//! known to be off limits), and routes it once the body is whole. A request
//! to a token upstream with no token yet waits (paused) until the worker
//! resumes or answers it.
//!
//! Responses stream through untouched, except Azure error answers that
//! OpenAI SDKs would misread (see `upstream_errors`), which are held and
//! read whole.
//!
//! Host calls per forwarded request: one to read every header, one to read
//! the body, then one per header edit (about six).

use std::rc::Rc;

use crate::body::BodySource;
use crate::config::Config;
use crate::errors::ApiError;
use crate::gateway::{self, BodyReader, Forward, HeaderEdit, Pending, Plan, Replay, RequestHead};
use crate::headers::{self, Header};
use crate::host_api::{log, Callout, CalloutReply, Flow, Host, Level, Stream};
use crate::limits::{self, Admission, Standing};
use crate::metrics::{RequestRecord, TargetEvent};
use crate::pool::{retry_after_ms, Choice, Outcome, PoolChooser};
use crate::routes::Operation;
use crate::token::Lookup;
use crate::upstream_errors::{self, Encoding, MAX_TRANSLATED_ERROR_BYTES};
use crate::usage::{Shape, Usage, UsageReader};
use crate::worker::{apply_edits, send_error, send_reply, Worker};

enum State {
    /// Headers not seen yet.
    New,
    /// Held on its headers while the body comes in. Holds the encoded
    /// request headers.
    AwaitingBody(Pending, BodyReader, Vec<u8>),
    /// Waiting for its upstream's token; the worker resumes or answers it.
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

pub struct Exchange {
    id: u32,
    /// None when the VM has no valid configuration.
    worker: Option<Rc<Worker>>,
    state: State,
    translation: Option<Translation>,
    held_error: Option<HeldError>,
    /// What the metrics and the access log say of the request.
    account: Account,
    /// For a model with several targets: what it takes to send the request
    /// to another one.
    failover: Option<Failover>,
}

/// A request that may fail over to another target of its model.
#[derive(Debug)]
struct Failover {
    replay: Replay,
    /// The caller's request headers, encoded.
    request_headers: Vec<u8>,
    /// Targets tried so far, the current one last.
    tried: Vec<usize>,
    /// The callout to the next target, while it is out.
    callout: Option<u32>,
}

/// The property (filter state `wasm.azure_openai`) with the request's
/// access-log fields.
pub const LOG_PROPERTY: &str = "azure_openai";

/// The access-log fields (null where the filter did not learn one).
#[derive(serde::Serialize)]
struct LogFields<'a> {
    caller: Option<&'a str>,
    model: Option<&'a str>,
    upstream: Option<&'a str>,
    deployment: Option<&'a str>,
    operation: Option<&'static str>,
    status: u16,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    ttfb_ms: Option<u64>,
}

/// The property (filter state `wasm.azure_openai_tokens`) that carries the
/// tokens a request used, for Envoy's rate-limit filter.
pub const TOKENS_PROPERTY: &str = "azure_openai_tokens";

/// Attempts a request makes, the first included (each to another target).
const MAX_ATTEMPTS: usize = 4;
/// How long a failover attempt may take (the answer comes whole).
const FAILOVER_TIMEOUT_MS: u64 = 600_000;

/// Who asked for what, and what came of it.
#[derive(Debug, Default)]
struct Account {
    caller: Option<usize>,
    model: Option<usize>,
    target: Option<usize>,
    op: Option<Operation>,
    /// The filter asked for the stream's usage: strip what that added.
    strip_usage: bool,
    started_ms: u64,
    first_byte_ms: Option<u64>,
    ended_ms: Option<u64>,
    /// The status the caller got (0: none yet).
    status: u16,
    /// Response body callbacks so far.
    response_pieces: u32,
    reader: Option<UsageReader>,
    usage: Option<Usage>,
    /// For a caller with limits: where it stood when admitted (its
    /// `x-ratelimit-*` headers).
    standing: Option<Standing>,
    /// The tokens used were published for Envoy's rate-limit filter.
    published: bool,
    /// The access-log fields were published.
    logged: bool,
    recorded: bool,
}

impl Exchange {
    pub fn new(id: u32, worker: Option<Rc<Worker>>) -> Self {
        Exchange {
            id,
            worker,
            state: State::New,
            translation: None,
            held_error: None,
            account: Account::default(),
            failover: None,
        }
    }

    fn worker(&self) -> Result<Rc<Worker>, ApiError> {
        self.worker
            .clone()
            .ok_or_else(|| ApiError::internal("the filter is not configured"))
    }

    pub fn on_request_headers(
        &mut self,
        host: &mut dyn Host,
        stream: &mut dyn Stream,
        end_of_stream: bool,
    ) -> Flow {
        let outcome = self.headers(host, stream, end_of_stream);
        self.conclude(host, stream, outcome)
    }

    pub fn on_request_body(
        &mut self,
        host: &mut dyn Host,
        stream: &mut dyn Stream,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        match &mut self.state {
            State::AwaitingBody(..) => {
                if let Some(worker) = &self.worker {
                    // A body reached a held request: the flag it needs is set.
                    if let Ok(mut watch) = worker.body_watch.try_borrow_mut() {
                        watch.body_arrived();
                    }
                }
                let outcome = self.body(host, stream, body_size, end_of_stream);
                self.conclude(host, stream, outcome)
            }
            State::WaitingForToken => {
                // Held on its headers, the body keeps arriving: keep it until
                // the worker has resumed (or answered) the request.
                let waiting = self
                    .worker
                    .as_ref()
                    .and_then(|w| w.tokens.as_ref())
                    .is_some_and(|t| t.try_borrow().map_or(true, |t| t.is_waiting(self.id)));
                if waiting {
                    return Flow::Pause;
                }
                self.state = State::Forwarded(None);
                Flow::Continue
            }
            State::Forwarded(Some(streamed)) => {
                // A body forwarded unread is held to the limit all the same;
                // over it, the upstream request is reset, never completed.
                *streamed = streamed.saturating_add(body_size);
                let received = *streamed;
                let over = self
                    .worker
                    .as_ref()
                    .and_then(|w| gateway::check_body_size(&w.config, received).err());
                match over {
                    Some(error) => self.reject(host, stream, error),
                    None => Flow::Continue,
                }
            }
            _ => Flow::Continue,
        }
    }

    pub fn on_request_trailers(&mut self, host: &mut dyn Host, stream: &mut dyn Stream) -> Flow {
        if !matches!(self.state, State::AwaitingBody(..)) {
            return Flow::Continue;
        }
        // Trailers end the body too; the buffer holds all of it.
        let size = stream.request_body_len().unwrap_or(0);
        let outcome = self.body(host, stream, size, true);
        self.conclude(host, stream, outcome)
    }

    pub fn on_response_headers(
        &mut self,
        host: &mut dyn Host,
        stream: &mut dyn Stream,
        end_of_stream: bool,
    ) -> Flow {
        if matches!(self.state, State::Answered | State::New) {
            return Flow::Continue; // the filter's own answer, already counted
        }
        let now = host.now_ms();
        self.account.first_byte_ms = Some(now);
        if end_of_stream {
            self.account.ended_ms = Some(now);
        }
        let Ok(encoded) = stream.response_headers() else {
            return Flow::Continue;
        };
        let Some(response_headers) = headers::decode(&encoded) else {
            return Flow::Continue;
        };
        let header = |name| headers::first(&response_headers, name);
        let number = |name| {
            header(name).and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<u64>().ok())
        };
        let status = number(":status")
            .and_then(|s| u16::try_from(s).ok())
            .unwrap_or(0);
        self.account.status = status;
        if let Some(standing) = &self.account.standing {
            // The caller's own limits replace Azure's headers of the same kind.
            for (name, value) in standing.headers() {
                let _ = stream.set_response_header(name, value.as_bytes());
            }
        }
        if status == 429 && header("x-envoy-ratelimited").is_some() {
            // Envoy's rate-limit filter refused the request (global limits).
            if let Some(worker) = &self.worker {
                if let Ok(mut metrics) = worker.metrics.try_borrow_mut() {
                    metrics.limited(self.account.caller, "-", "global");
                }
            }
        }
        if let (Some(worker), Some(target)) = (&self.worker, self.account.target) {
            let requests = number("x-ratelimit-remaining-requests");
            let tokens = number("x-ratelimit-remaining-tokens");
            if requests.is_some() || tokens.is_some() {
                if let Ok(mut metrics) = worker.metrics.try_borrow_mut() {
                    metrics.remaining(target, requests, tokens);
                }
            }
        }
        // A pool's target that failed: another one is tried, the answer
        // held meanwhile (nothing of it has reached the caller).
        if self.failover.is_some() {
            let outcome = outcome_of(status, &response_headers);
            if let Some(flow) = self.after_attempt(host, stream, outcome) {
                return flow;
            }
        }
        if end_of_stream {
            self.publish(host, stream);
            return Flow::Continue;
        }
        let content_type = header("content-type").unwrap_or_default();
        let encoding = Encoding::of(header("content-encoding"));
        let json = content_type.starts_with(b"application/json");
        let sse = content_type.starts_with(b"text/event-stream");
        // Usage is read from plain answers to model operations.
        if let Some(op) = self.account.op.filter(|_| encoding == Encoding::Identity) {
            let shape = match (json, sse, op) {
                (true, _, _) => Some(Shape::Json),
                (_, true, Operation::Responses) => Some(Shape::ResponsesStream),
                (_, true, _) => Some(Shape::ChatStream),
                _ => None,
            };
            self.account.reader = shape.map(|shape| {
                UsageReader::new(
                    shape,
                    self.account.strip_usage && shape == Shape::ChatStream,
                )
            });
            if self.account.strip_usage && header("content-length").is_some() {
                // The stream changes length: let Envoy frame it.
                let _ = stream.remove_response_header("content-length");
            }
        }
        if self.translation.is_none() || !upstream_errors::may_translate(status) || !json {
            return Flow::Continue;
        }
        // Hold the headers with the body: whether they change (length,
        // encoding) is known once the body has been read.
        self.held_error = Some(HeldError { status, encoding });
        self.account.reader = None;
        Flow::Pause
    }

    pub fn on_response_body(
        &mut self,
        host: &mut dyn Host,
        stream: &mut dyn Stream,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        let flow = self.response_body(host, stream, body_size, end_of_stream);
        if end_of_stream && flow == Flow::Continue {
            self.publish(host, stream);
        }
        flow
    }

    fn response_body(
        &mut self,
        host: &mut dyn Host,
        stream: &mut dyn Stream,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        if self.failover.as_ref().is_some_and(|f| f.callout.is_some()) {
            return Flow::Pause; // the failed target's answer, to be replaced
        }
        if self.held_error.is_some() {
            return self.held_error_body(host, stream, body_size, end_of_stream);
        }
        if let Some(reader) = &mut self.account.reader {
            if body_size > 0 {
                if let Ok(piece) = stream.response_body(0, body_size) {
                    if let Some(replacement) = reader.feed(&piece, end_of_stream) {
                        let _ = stream.replace_response_body(0, body_size, &replacement);
                    }
                }
            } else if end_of_stream {
                if let Some(rest) = reader.feed(&[], true) {
                    let _ = stream.replace_response_body(0, 0, &rest);
                }
            }
            if end_of_stream {
                self.account.usage = reader.usage();
            }
        }
        self.account.response_pieces += 1;
        if end_of_stream {
            // An answer whose body came whole with its first piece ended when
            // its headers came (no host call to ask the time again).
            self.account.ended_ms = match (self.account.response_pieces, self.account.first_byte_ms)
            {
                (1, Some(first)) => Some(first),
                _ => Some(host.now_ms()),
            };
        }
        Flow::Continue
    }

    /// An answer that did not reach its end (the caller left, or the
    /// stream was reset, after its usage event came) is counted with the
    /// usage read so far.
    fn settle_usage(&mut self) {
        if self.account.usage.is_none() {
            if let Some(reader) = &self.account.reader {
                self.account.usage = reader.usage();
            }
        }
    }

    /// The answer is complete (its end passed, or the filter made it):
    /// what Envoy's access log and rate-limit filter read from the filter
    /// state, set now, in a callback the filter is in anyway. (Envoy's log
    /// callback would come later, but entering the VM once more per request
    /// costs more than the rest of the access-log fields.)
    fn publish(&mut self, host: &mut dyn Host, stream: &mut dyn Stream) {
        self.publish_usage(stream);
        self.publish_log(host, stream);
    }

    /// With `global_rate_limit`, once the answer has ended: the tokens it
    /// used, for the cost Envoy's rate-limit filter charges when the stream
    /// is done (filter state `wasm.azure_openai_tokens`; 0 when the answer
    /// reported no usage).
    fn publish_usage(&mut self, stream: &mut dyn Stream) {
        let global = self
            .worker
            .as_ref()
            .is_some_and(|w| w.config.global_rate_limit);
        if !global || std::mem::replace(&mut self.account.published, true) {
            return;
        }
        let tokens = self.account.usage.map_or(0, |u| u.total());
        let _ = stream.set_property(TOKENS_PROPERTY, tokens.to_string().as_bytes());
    }

    /// Answers with an OpenAI error, with the caller's `x-ratelimit-*`
    /// headers when it has limits; nothing (more) goes upstream.
    fn answer_error(&mut self, host: &mut dyn Host, stream: &mut dyn Stream, mut error: ApiError) {
        self.state = State::Answered;
        self.account.status = error.status;
        if let Some(standing) = &self.account.standing {
            error.headers.extend(standing.headers());
        }
        self.publish(host, stream);
        send_error(host, stream, &error);
    }

    /// A callout this request sent came back: the answer of another target
    /// after the first failed.
    pub fn on_callout_response(
        &mut self,
        host: &mut dyn Host,
        stream: &mut dyn Stream,
        callout: u32,
        reply: CalloutReply,
    ) {
        let Some(failover) = self.failover.as_mut() else {
            return;
        };
        if failover.callout != Some(callout) {
            return;
        }
        failover.callout = None;
        let headers = headers::decode(&reply.headers).unwrap_or_default();
        let status = headers::first(&headers, ":status")
            .and_then(|s| std::str::from_utf8(s).ok()?.parse::<u16>().ok());
        let outcome = match status {
            None => Outcome::Failed, // the connection closed before an answer
            Some(status) => outcome_of(status, &headers),
        };
        if self.after_attempt(host, stream, outcome).is_some() {
            return; // another target is being tried, or the caller was answered
        }
        self.deliver(host, stream, status, &headers, reply.body);
    }

    /// After a target answered: record how (its cooldown, the metrics);
    /// if it failed, try the next target of the pool. Some when that took
    /// the answer over (a callout is out, or the caller was answered);
    /// None when this answer goes to the caller.
    fn after_attempt(
        &mut self,
        host: &mut dyn Host,
        stream: &mut dyn Stream,
        outcome: Outcome,
    ) -> Option<Flow> {
        let worker = self.worker.clone()?;
        let config = &worker.config;
        let current = self.account.target?;
        let model = config.models.get(self.failover.as_ref()?.replay.model)?;
        if let Ok(mut cooldowns) = worker.cooldowns.try_borrow_mut() {
            cooldowns.record(host, config, current, outcome);
        }
        if outcome == Outcome::Served {
            return None;
        }
        if let (Outcome::Throttled(_), Ok(mut metrics)) = (outcome, worker.metrics.try_borrow_mut())
        {
            metrics.target(current, TargetEvent::Throttled);
        }
        loop {
            let failover = self.failover.as_mut()?;
            let now = host.now_ms();
            let exhausted = failover.tried.len() >= MAX_ATTEMPTS.min(model.targets.len());
            // Out of attempts: the caller gets this answer, unless every
            // target is cooling (then the gateway's 429 says until when).
            let tried: &[usize] = if exhausted { &[] } else { &failover.tried };
            let choice = worker
                .cooldowns
                .try_borrow_mut()
                .ok()?
                .choose(model, now, tried);
            if exhausted && matches!(choice, Choice::Target(_)) {
                return None;
            }
            let next = match choice {
                Choice::Target(next) => next,
                Choice::AllCooling { retry_after_ms } => {
                    let error = ApiError::all_targets_cooling(&model.alias, retry_after_ms);
                    self.account.ended_ms = Some(now);
                    self.answer_error(host, stream, error);
                    return Some(Flow::Pause);
                }
            };
            failover.tried.push(next);
            if let Ok(mut metrics) = worker.metrics.try_borrow_mut() {
                metrics.target(current, TargetEvent::Failover);
                metrics.target(next, TargetEvent::Request);
            }
            match self.send_to(host, &worker, next) {
                Ok(()) => return Some(Flow::Pause),
                Err(why) => {
                    log(
                        host,
                        Level::Warn,
                        format_args!("request {}: no failover to target {next}: {why}", self.id),
                    );
                    if let Ok(mut cooldowns) = worker.cooldowns.try_borrow_mut() {
                        cooldowns.record(host, config, next, Outcome::Failed);
                    }
                }
            }
        }
    }

    /// Sends the request to another target by callout.
    fn send_to(
        &mut self,
        host: &mut dyn Host,
        worker: &Worker,
        target: usize,
    ) -> Result<(), String> {
        let config = &worker.config;
        let failover = self.failover.as_mut().ok_or("no failover")?;
        let (forward, body) =
            gateway::replay_to(config, &failover.replay, target).map_err(|e| e.message)?;
        let token = match forward.token_credential() {
            None => None,
            Some(credential) => {
                let tokens = worker.tokens.as_ref().ok_or("no token credentials")?;
                match tokens
                    .try_borrow_mut()
                    .map_err(|_| "token state busy")?
                    .lookup(host, credential)
                {
                    Lookup::Ready(token) => Some(token),
                    _ => return Err("its upstream has no token yet".into()),
                }
            }
        };
        let caller_headers = headers::decode(&failover.request_headers).unwrap_or_default();
        let pairs = forward.callout_headers(config, &caller_headers, token.as_ref(), body.len());
        let refs: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let callout = host
            .http_call(&Callout {
                cluster: &forward.upstream.cluster,
                headers: &refs,
                body: Some(&body),
                timeout_ms: FAILOVER_TIMEOUT_MS,
                token_for: None,
            })
            .map_err(|e| format!("{e:?}"))?;
        failover.callout = Some(callout);
        self.account.target = Some(target);
        self.account.strip_usage = forward.strip_usage;
        if let Some(translation) = &mut self.translation {
            translation.upstream = forward.upstream.name.clone();
        }
        if !forward.upstream.is_azure() {
            self.translation = None;
        }
        log(
            host,
            Level::Debug,
            format_args!(
                "request {}: failover to upstream `{}` {}",
                self.id,
                forward.upstream.name,
                forward.path.split('?').next().unwrap_or_default()
            ),
        );
        Ok(())
    }

    /// Gives the caller a failover target's answer, read whole: its usage
    /// counted (and stripped), an Azure error translated.
    fn deliver(
        &mut self,
        host: &mut dyn Host,
        stream: &mut dyn Stream,
        status: Option<u16>,
        response_headers: &[Header<'_>],
        mut body: Vec<u8>,
    ) {
        let now = host.now_ms();
        self.state = State::Answered;
        self.account.ended_ms = Some(now);
        let Some(status) = status else {
            self.answer_error(host, stream, ApiError::upstream_unreachable());
            return;
        };
        self.account.status = status;
        let header = |name| headers::first(response_headers, name);
        let content_type = header("content-type").unwrap_or_default();
        let encoding = Encoding::of(header("content-encoding"));
        if let (Some(op), Encoding::Identity) = (self.account.op, &encoding) {
            let shape = if content_type.starts_with(b"application/json") {
                Some(Shape::Json)
            } else if content_type.starts_with(b"text/event-stream") {
                Some(if op == Operation::Responses {
                    Shape::ResponsesStream
                } else {
                    Shape::ChatStream
                })
            } else {
                None
            };
            if let Some(shape) = shape {
                let mut reader = UsageReader::new(
                    shape,
                    self.account.strip_usage && shape == Shape::ChatStream,
                );
                if let Some(stripped) = reader.feed(&body, true) {
                    body = stripped;
                }
                self.account.usage = reader.usage();
            }
        }
        let mut replaced = false;
        if let Some(translation) = &self.translation {
            let json = content_type.starts_with(b"application/json");
            if json && upstream_errors::may_translate(status) {
                if let Some((replacement, note)) = upstream_errors::translate(
                    status,
                    &body,
                    &encoding,
                    &translation.alias,
                    &translation.upstream,
                ) {
                    log(
                        host,
                        Level::Warn,
                        format_args!("request {}: {note}", self.id),
                    );
                    body = replacement;
                    replaced = true;
                }
            }
        }
        const DROPPED: [&[u8]; 5] = [
            b"content-length",
            b"transfer-encoding",
            b"connection",
            b"keep-alive",
            b"date",
        ];
        let own = self
            .account
            .standing
            .as_ref()
            .map(Standing::headers)
            .unwrap_or_default();
        let mut passed: Vec<(&[u8], &[u8])> = response_headers
            .iter()
            .filter(|(name, _)| {
                !name.starts_with(b":")
                    && !name.starts_with(b"x-envoy-")
                    && !DROPPED.contains(name)
                    && (!replaced || *name != b"content-encoding")
                    && !own.iter().any(|(n, _)| n.as_bytes() == *name)
            })
            .copied()
            .collect();
        passed.extend(own.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
        self.publish(host, stream);
        send_reply(host, stream, status, &passed, &body);
    }

    /// An Azure error answer, held whole to be translated.
    fn held_error_body(
        &mut self,
        host: &mut dyn Host,
        stream: &mut dyn Stream,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        let Some(held) = &self.held_error else {
            return Flow::Continue;
        };
        if body_size > MAX_TRANSLATED_ERROR_BYTES {
            self.held_error = None; // too big to be an error envelope
            return Flow::Continue;
        }
        if !end_of_stream {
            return Flow::Pause;
        }
        self.account.ended_ms = Some(host.now_ms());
        let (Some(translation), Ok(body)) = (&self.translation, stream.response_body(0, body_size))
        else {
            self.held_error = None;
            return Flow::Continue;
        };
        if let Some((replacement, note)) = upstream_errors::translate(
            held.status,
            &body,
            &held.encoding,
            &translation.alias,
            &translation.upstream,
        ) {
            log(
                host,
                Level::Warn,
                format_args!("request {}: {note}", self.id),
            );
            let rewritten = stream
                .remove_response_header("content-length")
                .and_then(|()| stream.remove_response_header("content-encoding"))
                .and_then(|()| stream.replace_response_body(0, body_size, &replacement));
            if rewritten.is_err() {
                log(
                    host,
                    Level::Error,
                    format_args!("request {}: could not rewrite an upstream error", self.id),
                );
            }
        }
        self.held_error = None;
        Flow::Continue
    }

    /// The request is over (done, reset, or its caller left): it leaves
    /// nothing behind. If the worker is busy right now, it skips gone
    /// requests by itself.
    pub fn on_done(&mut self, host: &mut dyn Host) {
        let Some(worker) = self.worker.clone() else {
            return;
        };
        self.settle_usage();
        self.record(host, &worker);
        match self.state {
            State::WaitingForToken => {
                if let Some(Ok(mut tokens)) = worker.tokens.as_ref().map(|t| t.try_borrow_mut()) {
                    tokens.release(host, self.id);
                }
            }
            State::AwaitingBody(..) => self.release_watch(),
            _ => {}
        }
        self.state = State::Answered;
    }

    /// The request's fields for Envoy's access log, as one JSON object in
    /// the property `azure_openai` (filter state `wasm.azure_openai`), for a
    /// `%CEL(...)%` or `%FILTER_STATE(wasm.azure_openai:PLAIN)%` in the log
    /// format; set once. Values come only from the configuration and from
    /// numbers; never a key, a token or a body.
    fn publish_log(&mut self, host: &mut dyn Host, stream: &mut dyn Stream) {
        if std::mem::replace(&mut self.account.logged, true) {
            return;
        }
        let Some(worker) = self.worker.clone().filter(|w| w.config.access_log) else {
            return;
        };
        let config = &worker.config;
        let account = &self.account;
        let (model, upstream, deployment) =
            match account.target.and_then(|t| config.target_upstream(t)) {
                Some((target, upstream)) => (
                    account
                        .model
                        .and_then(|m| config.models.get(m))
                        .map(|m| m.alias.as_str()),
                    Some(upstream.name.as_str()),
                    Some(target.deployment.as_str()),
                ),
                None => (None, None, None),
            };
        let fields = LogFields {
            caller: account
                .caller
                .and_then(|c| config.caller(c))
                .map(|c| c.name.as_str()),
            model,
            upstream,
            deployment,
            operation: account.op.map(Operation::name),
            status: account.status,
            input_tokens: account.usage.map(|u| u.input),
            output_tokens: account.usage.map(|u| u.output),
            ttfb_ms: account
                .first_byte_ms
                .map(|at| at.saturating_sub(account.started_ms)),
        };
        let Ok(json) = serde_json::to_vec(&fields) else {
            return;
        };
        if let Err(status) = stream.set_property(LOG_PROPERTY, &json) {
            log(
                host,
                Level::Debug,
                format_args!(
                    "request {}: access-log fields not set (status {})",
                    self.id, status.0
                ),
            );
        }
    }

    /// Counts the request in the VM's metrics (once).
    fn record(&mut self, host: &mut dyn Host, worker: &Worker) {
        let account = &mut self.account;
        if std::mem::replace(&mut account.recorded, true) {
            return;
        }
        let ended = account.ended_ms.unwrap_or_else(|| host.now_ms());
        let record = RequestRecord {
            caller: account.caller,
            model: account.model,
            target: account.target,
            operation: account.op,
            status: account.status,
            usage: account.usage,
            duration_ms: ended.saturating_sub(account.started_ms),
            ttfb_ms: account
                .first_byte_ms
                .map(|at| at.saturating_sub(account.started_ms)),
        };
        if let Ok(mut metrics) = worker.metrics.try_borrow_mut() {
            metrics.record(&record);
        }
        if let (Some(_), Some(caller), Some(usage)) =
            (&account.standing, account.caller, account.usage)
        {
            worker.owe(caller, usage.total());
        }
    }

    /// Header phase: admit the request, then answer, forward or wait for the body.
    fn headers(
        &mut self,
        host: &mut dyn Host,
        stream: &mut dyn Stream,
        end_of_stream: bool,
    ) -> Result<Flow, ApiError> {
        let worker = self.worker()?;
        let config = &worker.config;
        self.account.started_ms = host.now_ms();
        let encoded = stream.request_headers().map_err(|_| unreadable_headers())?;
        let request_headers = headers::decode(&encoded).ok_or_else(unreadable_headers)?;
        let head = RequestHead::from_headers(&request_headers, !end_of_stream);
        let admitted = gateway::admit(config, &head)?;
        self.account.caller = Some(admitted.caller);
        match limits::admit(host, config, admitted.caller) {
            None => {}
            Some(Admission::Admitted(standing)) => self.account.standing = Some(standing),
            Some(Admission::Limited { kind, standing }) => {
                if let Ok(mut metrics) = worker.metrics.try_borrow_mut() {
                    metrics.limited(Some(admitted.caller), kind.name(), "local");
                }
                let error = standing.refusal(&config.callers, admitted.caller, kind);
                self.account.standing = Some(standing);
                return Err(error);
            }
        }
        let cooldowns = worker.cooldowns.try_borrow_mut();
        let plan = match cooldowns {
            Ok(mut cooldowns) => {
                let mut chooser = PoolChooser {
                    cooldowns: &mut cooldowns,
                    now: self.account.started_ms,
                };
                gateway::plan(config, admitted, &mut chooser)?
            }
            Err(_) => gateway::plan(config, admitted, &mut gateway::FirstTarget)?,
        };
        match plan {
            Plan::Answer(status, body) => {
                self.state = State::Answered;
                self.account.status = status;
                let own = self
                    .account
                    .standing
                    .as_ref()
                    .map(Standing::headers)
                    .unwrap_or_default();
                let mut reply: Vec<(&[u8], &[u8])> = vec![(b"content-type", b"application/json")];
                reply.extend(own.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
                self.publish(host, stream);
                send_reply(host, stream, status, &reply, &body);
                Ok(Flow::Pause)
            }
            Plan::Forward(mut forward) => {
                gateway::take_caller_key(config, &mut forward, &request_headers)?;
                let flow = self.forward(host, stream, &worker, &forward, &request_headers)?;
                if !end_of_stream {
                    if let State::Forwarded(streamed) = &mut self.state {
                        *streamed = Some(0);
                    }
                }
                Ok(flow)
            }
            Plan::ReadBody(pending) => {
                let content_types: Vec<&[u8]> =
                    headers::values(&request_headers, "content-type").collect();
                let reader = BodyReader::new(pending.op, &content_types)?;
                // Hold the headers; with allow_on_headers_stop_iteration the
                // body still arrives, and the headers can change once it has.
                self.state = State::AwaitingBody(pending, reader, encoded);
                // The root's tick (at least once a second) checks on it.
                let now = host.now_ms();
                if let Ok(mut watch) = worker.body_watch.try_borrow_mut() {
                    watch.hold(self.id, now);
                }
                Ok(Flow::Pause)
            }
        }
    }

    /// More of a held request's body is in (all of it when `complete`):
    /// refuse early, keep holding, or route and forward.
    fn body(
        &mut self,
        host: &mut dyn Host,
        stream: &mut dyn Stream,
        body_size: usize,
        complete: bool,
    ) -> Result<Flow, ApiError> {
        let worker = self.worker()?;
        let State::AwaitingBody(pending, mut reader, encoded_headers) =
            std::mem::replace(&mut self.state, State::Answered)
        else {
            return Ok(Flow::Continue);
        };
        let mut body = StreamBody {
            stream: &mut *stream,
            len: body_size,
        };
        let routed = match worker.cooldowns.try_borrow_mut() {
            Ok(mut cooldowns) => {
                let mut chooser = PoolChooser {
                    cooldowns: &mut cooldowns,
                    now: self.account.started_ms,
                };
                gateway::read_body(
                    &worker.config,
                    &pending,
                    &mut reader,
                    &mut body,
                    complete,
                    &mut chooser,
                )?
            }
            Err(_) => gateway::read_body(
                &worker.config,
                &pending,
                &mut reader,
                &mut body,
                complete,
                &mut gateway::FirstTarget,
            )?,
        };
        let Some(mut forward) = routed else {
            self.state = State::AwaitingBody(pending, reader, encoded_headers);
            return Ok(Flow::Pause); // buffer until the whole body is in
        };
        self.release_watch();
        let request_headers = headers::decode(&encoded_headers).ok_or_else(unreadable_headers)?;
        gateway::take_caller_key(&worker.config, &mut forward, &request_headers)?;
        // A pool's request keeps its body as sent, to send it again to
        // another target should this one fail (read before it is edited).
        // One with the caller's own key stays on the upstream it was meant
        // for.
        let pooled = pool_model(&worker, &forward).filter(|_| forward.caller_key.is_none());
        if let (Some(model), Some(target)) = (pooled, forward.target) {
            let body = stream
                .request_body(0, body_size)
                .map_err(|_| ApiError::internal("could not read the request body"))?;
            let boundary = match &reader {
                BodyReader::Form { boundary, .. } => Some(boundary.clone()),
                BodyReader::Json => None,
            };
            self.failover = Some(Failover {
                replay: Replay {
                    caller: pending.caller,
                    model,
                    op: pending.op,
                    body,
                    boundary,
                },
                request_headers: encoded_headers.clone(),
                tried: vec![target],
                callout: None,
            });
        }
        if let Some(edit) = &forward.body_edit {
            stream
                .replace_request_body_prefix(edit.replace, &edit.with)
                .map_err(|_| ApiError::internal("could not rewrite the request body"))?;
        }
        self.forward(host, stream, &worker, &forward, &request_headers)
    }

    /// Sends the request upstream (Continue), or holds it until its
    /// upstream's token is there (Pause).
    fn forward(
        &mut self,
        host: &mut dyn Host,
        stream: &mut dyn Stream,
        worker: &Worker,
        forward: &Forward<'_>,
        request_headers: &[Header<'_>],
    ) -> Result<Flow, ApiError> {
        let config: &Config = &worker.config;
        self.state = State::Forwarded(None);
        self.account.model = forward
            .model
            .and_then(|m| config.model(&m.alias))
            .map(|(index, _)| index);
        self.account.op = forward.op.filter(|_| forward.model.is_some());
        self.account.strip_usage = forward.strip_usage;
        self.account.target = forward.target;
        if let Some(target) = forward.target {
            if let Ok(mut metrics) = worker.metrics.try_borrow_mut() {
                metrics.target(target, TargetEvent::Request);
            }
        }
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
                let tokens = worker
                    .tokens
                    .as_ref()
                    .ok_or_else(|| ApiError::internal("token credentials are not set up"))?;
                let busy = || ApiError::internal("the token state is busy");
                let lookup = tokens
                    .try_borrow_mut()
                    .map_err(|_| busy())?
                    .lookup(host, credential);
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
                            .hold(host, self.id, credential, edits);
                        self.state = State::WaitingForToken;
                        // Wake the root now rather than at its next tick.
                        host.set_tick_period_ms(1);
                        log(
                            host,
                            Level::Debug,
                            format_args!(
                                "request {}: caller `{}` model `{alias}` waits for a token for upstream `{}`",
                                self.id, forward.caller, forward.upstream.name
                            ),
                        );
                        return Ok(Flow::Pause);
                    }
                }
            }
        };
        let edits = forward.header_edits(config, request_headers, token.as_ref());
        if let Err(status) = apply_edits(stream, &edits) {
            log(
                host,
                Level::Error,
                format_args!(
                    "request {}: Envoy refused a header change (status {}); is \
                     allow_on_headers_stop_iteration: true set on the Wasm filter?",
                    self.id, status.0
                ),
            );
            return Err(ApiError::internal(
                "Envoy refused to let the filter rewrite the request (its operators must \
                 set `allow_on_headers_stop_iteration: true` on the Wasm filter)",
            ));
        }
        log(
            host,
            Level::Debug,
            format_args!(
                "request {}: caller `{}` model `{alias}` -> upstream `{}` {path}{}",
                self.id,
                forward.caller,
                forward.upstream.name,
                if forward.caller_key.is_some() {
                    " (with the caller's own key)"
                } else {
                    ""
                }
            ),
        );
        Ok(Flow::Continue)
    }

    /// Answers with the OpenAI error JSON; nothing goes upstream.
    fn reject(&mut self, host: &mut dyn Host, stream: &mut dyn Stream, error: ApiError) -> Flow {
        self.translation = None;
        self.release_watch();
        log(
            host,
            Level::Debug,
            format_args!(
                "request {}: answered {} {}",
                self.id, error.status, error.code
            ),
        );
        self.answer_error(host, stream, error);
        Flow::Pause
    }

    fn conclude(
        &mut self,
        host: &mut dyn Host,
        stream: &mut dyn Stream,
        outcome: Result<Flow, ApiError>,
    ) -> Flow {
        match outcome {
            Ok(flow) => flow,
            Err(error) => self.reject(host, stream, error),
        }
    }

    fn release_watch(&self) {
        if let Some(worker) = &self.worker {
            if let Ok(mut watch) = worker.body_watch.try_borrow_mut() {
                watch.release(self.id);
            }
        }
    }
}

/// The request body the stream has received so far, read in pieces.
struct StreamBody<'s> {
    stream: &'s mut dyn Stream,
    len: usize,
}

impl BodySource for StreamBody<'_> {
    fn len(&self) -> usize {
        self.len
    }

    fn read(&mut self, start: usize, len: usize) -> Result<Vec<u8>, ApiError> {
        let len = len.min(self.len.saturating_sub(start));
        if len == 0 {
            return Ok(Vec::new());
        }
        self.stream
            .request_body(start, len)
            .map_err(|_| ApiError::internal("could not read the request body"))
    }
}

/// How a target's answer counts for its cooldown.
fn outcome_of(status: u16, response_headers: &[Header<'_>]) -> Outcome {
    match status {
        429 => Outcome::Throttled(retry_after_ms(
            headers::first(response_headers, "retry-after-ms"),
            headers::first(response_headers, "x-ms-retry-after-ms"),
            headers::first(response_headers, "retry-after"),
        )),
        500 | 502 | 503 | 504 => Outcome::Failed,
        _ => Outcome::Served,
    }
}

/// The index of a request's model when it has several targets.
fn pool_model(worker: &Worker, forward: &Forward<'_>) -> Option<usize> {
    let model = forward.model.filter(|m| m.targets.len() > 1)?;
    worker.config.model(&model.alias).map(|(index, _)| index)
}

fn unreadable_headers() -> ApiError {
    ApiError::internal("could not read the request headers")
}

#[cfg(test)]
mod tests {
    //! Whole requests through the state machine, on the fake host: what the
    //! upstream would get, and what the caller gets.

    use super::*;
    use crate::testing::{FakeHost, FakeStream, World};
    use crate::worker::{carry_out, Chore};
    use sha2::{Digest, Sha256};

    const KEY: &str = "sk-caller-1";

    fn worker(host: &mut FakeHost, auth: serde_json::Value) -> Rc<Worker> {
        let json = serde_json::json!({
            "upstreams": {"west": {"endpoint": "https://acme-west.openai.azure.com",
                                   "cluster": "azure_west", "auth": auth}},
            "models": {"gpt-4o": {"upstream": "west", "deployment": "gpt4o-prod"}},
            "callers": [{"name": "team", "key_sha256": hex::encode(Sha256::digest(KEY)),
                         "models": ["gpt-4o"]}]
        });
        let config = Config::from_json(json.to_string().as_bytes(), &|_| None).unwrap();
        Rc::new(Worker::new(Rc::new(config), 1, host))
    }

    mod hex {
        pub fn encode(bytes: impl AsRef<[u8]>) -> String {
            bytes.as_ref().iter().map(|b| format!("{b:02x}")).collect()
        }
    }

    fn chat(body: &str) -> FakeStream {
        FakeStream::request(
            "POST",
            "/v1/chat/completions",
            &[
                ("authorization", &format!("Bearer {KEY}")),
                ("content-type", "application/json"),
            ],
            body.as_bytes(),
        )
    }

    /// Sends a request through headers and its whole body.
    fn send(exchange: &mut Exchange, host: &mut FakeHost, stream: &mut FakeStream) -> Flow {
        let flow = exchange.on_request_headers(host, stream, false);
        if flow == Flow::Continue || stream.reply.is_some() {
            return flow;
        }
        let len = stream.request_body.len();
        exchange.on_request_body(host, stream, len, true)
    }

    #[test]
    fn a_chat_request_goes_upstream_with_the_upstreams_credential() {
        let world = World::new(1_000);
        let mut host = FakeHost::new(&world, 1);
        let worker = worker(
            &mut host,
            serde_json::json!({"api_key": {"value": "west-key"}}),
        );
        let mut stream = chat(r#"{"model":"gpt-4o","messages":[]}"#);
        let mut exchange = Exchange::new(1, Some(worker));
        assert_eq!(send(&mut exchange, &mut host, &mut stream), Flow::Continue);
        assert_eq!(stream.reply, None);
        assert_eq!(stream.header("authorization"), Vec::<String>::new());
        assert_eq!(stream.header("api-key"), ["west-key"]);
        assert_eq!(
            stream.header(":path"),
            ["/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"]
        );
        assert_eq!(stream.header("x-azure-openai-cluster"), ["azure_west"]);
        assert_eq!(stream.header("accept-encoding"), ["identity"]);
        assert!(host.logged("caller `team` model `gpt-4o` -> upstream `west`"));
        assert!(!host.logged(KEY) && !host.logged("west-key"));
    }

    #[test]
    fn a_request_waits_for_its_token_and_is_resumed_with_it() {
        let world = World::new(1_000_000);
        let mut host = FakeHost::new(&world, 1);
        let worker = worker(
            &mut host,
            serde_json::json!({"managed_identity": {"imds_cluster": "imds"}}),
        );
        let mut stream = chat(r#"{"model":"gpt-4o"}"#);
        let mut exchange = Exchange::new(5, Some(worker.clone()));
        assert_eq!(send(&mut exchange, &mut host, &mut stream), Flow::Pause);
        assert_eq!(host.tick_period_ms, 1, "the root is woken at once");
        assert!(!stream.resumed, "held, nothing goes upstream yet");
        assert!(worker.on_tick(&mut host).is_empty());
        let callout = host.callouts.last().unwrap().clone();
        assert_eq!(callout.cluster, "imds");
        let response = crate::host_api::CalloutResponse {
            status: Some(200),
            body: br#"{"access_token":"imds-token","expires_in":"3599","token_type":"Bearer"}"#
                .to_vec(),
        };
        let chores = worker.on_callout_response(&mut host, callout.id, &response);
        assert_eq!(chores.len(), 1);
        for chore in chores {
            assert_eq!(chore.context_id(), 5);
            carry_out(&host, &mut stream, chore);
        }
        assert!(stream.resumed);
        assert_eq!(stream.header("authorization"), ["Bearer imds-token"]);
        // Body chunks that arrive later go through.
        assert_eq!(
            exchange.on_request_body(&mut host, &mut stream, 18, true),
            Flow::Continue
        );
    }

    #[test]
    fn a_held_request_whose_body_never_comes_is_answered_500() {
        let world = World::new(1_000);
        let mut host = FakeHost::new(&world, 1);
        let worker = worker(&mut host, serde_json::json!({"api_key": {"value": "k"}}));
        let mut stream = chat(r#"{"model":"gpt-4o"}"#);
        let mut exchange = Exchange::new(3, Some(worker.clone()));
        assert_eq!(
            exchange.on_request_headers(&mut host, &mut stream, false),
            Flow::Pause
        );
        assert_eq!(host.tick_period_ms, crate::worker::METRICS_TICK_MS);
        world.advance(crate::body_watch::OVERDUE_MS);
        let chores = worker.on_tick(&mut host);
        assert!(matches!(chores.as_slice(), [Chore::BodyNeverDelivered(3)]));
        for chore in chores {
            carry_out(&host, &mut stream, chore);
        }
        let reply = stream.reply.clone().unwrap();
        assert_eq!(reply.status, 500);
        assert!(reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("allow_on_headers_stop_iteration"));
        assert!(host.logged("Envoy does not deliver request bodies"));
        worker.schedule_tick(&mut host);
        assert_eq!(
            host.tick_period_ms,
            crate::worker::METRICS_TICK_MS,
            "nothing left to watch"
        );
    }

    #[test]
    fn a_body_proves_the_flag_and_later_requests_are_not_watched() {
        let world = World::new(1_000);
        let mut host = FakeHost::new(&world, 1);
        let worker = worker(&mut host, serde_json::json!({"api_key": {"value": "k"}}));
        let mut first = chat(r#"{"model":"gpt-4o"}"#);
        let mut exchange = Exchange::new(1, Some(worker.clone()));
        assert_eq!(send(&mut exchange, &mut host, &mut first), Flow::Continue);
        let mut slow = chat(r#"{"model":"gpt-4o"}"#);
        let mut second = Exchange::new(2, Some(worker.clone()));
        assert_eq!(
            second.on_request_headers(&mut host, &mut slow, false),
            Flow::Pause
        );
        world.advance(10 * crate::body_watch::OVERDUE_MS);
        assert!(worker.on_tick(&mut host).is_empty());
    }

    #[test]
    fn a_deployment_not_found_is_answered_as_an_unknown_model() {
        let world = World::new(1_000);
        let mut host = FakeHost::new(&world, 1);
        let worker = worker(&mut host, serde_json::json!({"api_key": {"value": "k"}}));
        let mut stream = chat(r#"{"model":"gpt-4o"}"#);
        let mut exchange = Exchange::new(1, Some(worker));
        send(&mut exchange, &mut host, &mut stream);
        stream.response_headers = vec![
            (":status".into(), b"404".to_vec()),
            ("content-type".into(), b"application/json".to_vec()),
            ("content-length".into(), b"99".to_vec()),
        ];
        stream.response_body =
            br#"{"error":{"code":"DeploymentNotFound","message":"no gpt4o-prod"}}"#.to_vec();
        assert_eq!(
            exchange.on_response_headers(&mut host, &mut stream, false),
            Flow::Pause
        );
        let len = stream.response_body.len();
        assert_eq!(
            exchange.on_response_body(&mut host, &mut stream, len, true),
            Flow::Continue
        );
        let body: serde_json::Value = serde_json::from_slice(&stream.response_body).unwrap();
        assert_eq!(body["error"]["code"], "model_not_found");
        assert!(!stream
            .response_headers
            .iter()
            .any(|(n, _)| n == "content-length"));
        assert!(host.logged("DeploymentNotFound"));
    }

    fn pool_worker(host: &mut FakeHost) -> Rc<Worker> {
        let json = serde_json::json!({
            "upstreams": {
                "ptu": {"endpoint": "acme-ptu", "cluster": "c_ptu", "auth": {"api_key": {"value": "ptu-key"}}},
                "east": {"endpoint": "acme-east", "cluster": "c_east", "auth": {"api_key": {"value": "east-key"}}}
            },
            "models": {"gpt-4o": {"targets": [
                {"upstream": "ptu", "deployment": "ptu-dep", "priority": 0},
                {"upstream": "east", "deployment": "east-dep", "priority": 1}
            ]}},
            "callers": [{"name": "team", "key_sha256": hex::encode(Sha256::digest(KEY)),
                         "models": ["gpt-4o"]}]
        });
        let config = Config::from_json(json.to_string().as_bytes(), &|_| None).unwrap();
        Rc::new(Worker::new(Rc::new(config), 1, host))
    }

    #[test]
    fn a_throttled_target_fails_over_by_callout_and_the_caller_gets_that_answer() {
        let world = World::new(1_000);
        let mut host = FakeHost::new(&world, 1);
        let worker = pool_worker(&mut host);
        let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
        let mut stream = chat(body);
        let mut exchange = Exchange::new(1, Some(worker.clone()));
        assert_eq!(send(&mut exchange, &mut host, &mut stream), Flow::Continue);
        assert_eq!(stream.header("api-key"), ["ptu-key"]);
        // The PTU answers 429: its answer is held, the request goes on by callout.
        stream.response_headers = vec![
            (":status".into(), b"429".to_vec()),
            ("retry-after-ms".into(), b"5000".to_vec()),
            ("content-type".into(), b"application/json".to_vec()),
        ];
        assert_eq!(
            exchange.on_response_headers(&mut host, &mut stream, false),
            Flow::Pause
        );
        assert_eq!(
            exchange.on_response_body(&mut host, &mut stream, 10, true),
            Flow::Pause
        );
        let callout = host.callouts.last().unwrap().clone();
        assert_eq!(callout.cluster, "c_east");
        let header = |name: &str| {
            callout
                .headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(
            header(":path").unwrap(),
            "/openai/deployments/east-dep/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(header(":authority").unwrap(), "acme-east.openai.azure.com");
        assert_eq!(header("api-key").unwrap(), "east-key");
        assert_eq!(header("authorization"), None);
        assert_eq!(header("content-length").unwrap(), body.len().to_string());
        assert_eq!(callout.body.as_deref(), Some(body.as_bytes()));
        // Its answer reaches the caller, its usage counted.
        let mut answer = vec![];
        answer.extend_from_slice(&crate::headers::encode(&[
            (b":status", b"200"),
            (b"content-type", b"application/json"),
            (b"x-ms-region", b"East US"),
            (b"content-length", b"999"),
        ]));
        let reply = CalloutReply {
            headers: answer,
            body: br#"{"id":"x","choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}"#
                .to_vec(),
        };
        exchange.on_callout_response(&mut host, &mut stream, callout.id, reply.clone());
        let delivered = stream.reply.clone().unwrap();
        assert_eq!(delivered.status, 200);
        assert!(delivered
            .headers
            .contains(&("x-ms-region".into(), "East US".into())));
        assert!(!delivered.headers.iter().any(|(n, _)| n == "content-length"));
        assert_eq!(delivered.body, reply.body);
        assert_eq!(
            exchange.account.usage.map(|u| (u.input, u.output)),
            Some((4, 2))
        );
        assert_eq!(exchange.account.target, Some(1));
        // The PTU cools down for this worker at once: the next request goes east.
        let mut next = chat(body);
        let mut second = Exchange::new(2, Some(worker.clone()));
        send(&mut second, &mut host, &mut next);
        assert_eq!(next.header("api-key"), ["east-key"]);
    }

    #[test]
    fn a_callout_that_fails_too_ends_in_the_gateways_429_when_all_cool() {
        let world = World::new(1_000);
        let mut host = FakeHost::new(&world, 1);
        let worker = pool_worker(&mut host);
        let mut stream = chat(r#"{"model":"gpt-4o"}"#);
        let mut exchange = Exchange::new(1, Some(worker));
        send(&mut exchange, &mut host, &mut stream);
        stream.response_headers = vec![(":status".into(), b"503".to_vec())];
        assert_eq!(
            exchange.on_response_headers(&mut host, &mut stream, false),
            Flow::Pause
        );
        let callout = host.callouts.last().unwrap().id;
        // No headers: the connection closed before an answer.
        exchange.on_callout_response(&mut host, &mut stream, callout, CalloutReply::default());
        let reply = stream.reply.clone().unwrap();
        assert_eq!(reply.status, 429);
        assert_eq!(reply.json()["error"]["code"], "rate_limit_exceeded");
        assert!(reply
            .headers
            .iter()
            .any(|(n, v)| n == "retry-after" && v == "1"));
    }

    fn limited_worker(host: &mut FakeHost, limits: serde_json::Value, global: bool) -> Rc<Worker> {
        logging_worker(host, limits, global, true)
    }

    fn logging_worker(
        host: &mut FakeHost,
        limits: serde_json::Value,
        global: bool,
        access_log: bool,
    ) -> Rc<Worker> {
        let json = serde_json::json!({
            "upstreams": {"west": {"endpoint": "https://acme-west.openai.azure.com",
                                   "cluster": "azure_west", "auth": {"api_key": {"value": "k"}}}},
            "models": {"gpt-4o": {"upstream": "west", "deployment": "gpt4o-prod"}},
            "callers": [{"name": "team", "key_sha256": hex::encode(Sha256::digest(KEY)),
                         "models": ["gpt-4o"], "limits": limits},
                        {"name": "other", "key_sha256": hex::encode(Sha256::digest("sk-other")),
                         "models": ["gpt-4o"]}],
            "global_rate_limit": global,
            "access_log": access_log,
            "responses_upstream": "west"
        });
        let config = Config::from_json(json.to_string().as_bytes(), &|_| None).unwrap();
        Rc::new(Worker::new(Rc::new(config), 1, host))
    }

    /// A request answered by the upstream with `usage` tokens, to its end.
    fn answered(
        exchange: &mut Exchange,
        host: &mut FakeHost,
        stream: &mut FakeStream,
        prompt: u64,
        completion: u64,
    ) {
        let body = format!(
            r#"{{"id":"x","choices":[],"usage":{{"prompt_tokens":{prompt},"completion_tokens":{completion}}}}}"#
        );
        stream.response_headers = vec![
            (":status".into(), b"200".to_vec()),
            ("content-type".into(), b"application/json".to_vec()),
            ("x-ratelimit-remaining-requests".into(), b"4999".to_vec()),
            ("x-ratelimit-remaining-tokens".into(), b"90000".to_vec()),
        ];
        stream.response_body = body.clone().into_bytes();
        assert_eq!(
            exchange.on_response_headers(host, stream, false),
            Flow::Continue
        );
        assert_eq!(
            exchange.on_response_body(host, stream, body.len(), true),
            Flow::Continue
        );
        exchange.on_done(host);
    }

    const BODY: &str = r#"{"model":"gpt-4o","messages":[]}"#;

    #[test]
    fn the_request_limit_holds_across_workers_and_the_refusal_says_until_when() {
        let world = World::new(60_000 * 1_000 + 15_000);
        let mut hosts = [FakeHost::new(&world, 1), FakeHost::new(&world, 1)];
        let workers: Vec<_> = hosts
            .iter_mut()
            .map(|h| limited_worker(h, serde_json::json!({"requests_per_minute": 3}), false))
            .collect();
        let mut passed = 0;
        for i in 0..6 {
            let vm = i % 2;
            let mut stream = chat(BODY);
            let mut exchange = Exchange::new(i as u32, Some(workers[vm].clone()));
            if send(&mut exchange, &mut hosts[vm], &mut stream) == Flow::Continue {
                passed += 1;
                continue;
            }
            let reply = stream.reply.clone().unwrap();
            assert_eq!(reply.status, 429);
            let error = reply.json();
            assert_eq!(error["error"]["code"], "rate_limit_exceeded");
            assert_eq!(error["error"]["type"], "requests");
            assert!(error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("caller `team` on requests per minute: limit 3, used 3"));
            let header = |name: &str| {
                reply
                    .headers
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.clone())
            };
            assert_eq!(header("retry-after").as_deref(), Some("45"));
            assert_eq!(
                header("x-ratelimit-remaining-requests").as_deref(),
                Some("0")
            );
            assert_eq!(header("x-ratelimit-reset-requests").as_deref(), Some("45s"));
            exchange.on_done(&mut hosts[vm]);
        }
        assert_eq!(passed, 3);
        for (worker, host) in workers.iter().zip(hosts.iter_mut()) {
            worker.on_tick(host);
        }
        assert_eq!(
            world.stat(
                "azure_openai_limited_total_caller=.=team;.;limit=.=requests;.;scope=.=local;.;"
            ),
            3
        );
        // Another caller is not limited; the next minute admits the caller again.
        let mut other = FakeStream::request(
            "POST",
            "/v1/chat/completions",
            &[
                ("authorization", "Bearer sk-other"),
                ("content-type", "application/json"),
            ],
            BODY.as_bytes(),
        );
        let mut exchange = Exchange::new(10, Some(workers[0].clone()));
        assert_eq!(
            send(&mut exchange, &mut hosts[0], &mut other),
            Flow::Continue
        );
        world.advance(45_000);
        let mut stream = chat(BODY);
        let mut exchange = Exchange::new(11, Some(workers[1].clone()));
        assert_eq!(
            send(&mut exchange, &mut hosts[1], &mut stream),
            Flow::Continue
        );
    }

    #[test]
    fn access_log_fields_are_set_when_the_answer_ends_or_the_filter_answers() {
        let world = World::new(60_000 * 1_000);
        let mut host = FakeHost::new(&world, 1);
        let worker = limited_worker(
            &mut host,
            serde_json::json!({"requests_per_minute": 1}),
            false,
        );
        let mut stream = chat(BODY);
        let mut exchange = Exchange::new(1, Some(worker.clone()));
        assert_eq!(send(&mut exchange, &mut host, &mut stream), Flow::Continue);
        assert!(!stream.properties.contains_key(LOG_PROPERTY));
        answered(&mut exchange, &mut host, &mut stream, 40, 20);
        let fields: serde_json::Value =
            serde_json::from_slice(&stream.properties[LOG_PROPERTY]).unwrap();
        assert_eq!(fields["status"], 200);
        assert_eq!(fields["model"], "gpt-4o");
        assert_eq!(
            (
                fields["input_tokens"].clone(),
                fields["output_tokens"].clone()
            ),
            (40.into(), 20.into())
        );
        // A refusal the filter makes itself (over the request limit).
        let mut refused = chat(BODY);
        let mut exchange = Exchange::new(2, Some(worker.clone()));
        assert_eq!(send(&mut exchange, &mut host, &mut refused), Flow::Pause);
        let fields: serde_json::Value =
            serde_json::from_slice(&refused.properties[LOG_PROPERTY]).unwrap();
        assert_eq!(fields["status"], 429);
        assert_eq!(fields["input_tokens"], serde_json::Value::Null);
        // Without `access_log`, nothing is published (no host call).
        let worker = logging_worker(
            &mut host,
            serde_json::json!({"requests_per_minute": 9}),
            false,
            false,
        );
        let mut quiet = chat(BODY);
        let mut exchange = Exchange::new(3, Some(worker));
        assert_eq!(send(&mut exchange, &mut host, &mut quiet), Flow::Continue);
        answered(&mut exchange, &mut host, &mut quiet, 40, 20);
        assert!(quiet.properties.is_empty());
    }

    #[test]
    fn a_stream_left_after_its_usage_event_is_still_charged() {
        let world = World::new(60_000 * 1_000);
        let mut host = FakeHost::new(&world, 1);
        let worker = limited_worker(
            &mut host,
            serde_json::json!({"tokens_per_minute": 50}),
            false,
        );
        let body = r#"{"model":"gpt-4o","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#;
        let mut stream = chat(body);
        let mut exchange = Exchange::new(1, Some(worker.clone()));
        assert_eq!(send(&mut exchange, &mut host, &mut stream), Flow::Continue);
        stream.response_headers = vec![
            (":status".into(), b"200".to_vec()),
            ("content-type".into(), b"text/event-stream".to_vec()),
        ];
        let events = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":40,\"completion_tokens\":20}}\n\ndata: [DONE]\n\n";
        stream.response_body = events.as_bytes().to_vec();
        assert_eq!(
            exchange.on_response_headers(&mut host, &mut stream, false),
            Flow::Continue
        );
        // The caller leaves before the end of the stream comes.
        assert_eq!(
            exchange.on_response_body(&mut host, &mut stream, events.len(), false),
            Flow::Continue
        );
        exchange.on_done(&mut host);
        worker.on_tick(&mut host);
        let mut next = chat(BODY);
        let mut exchange = Exchange::new(2, Some(worker.clone()));
        assert_eq!(send(&mut exchange, &mut host, &mut next), Flow::Pause);
        let reply = next.reply.clone().unwrap();
        assert_eq!(reply.status, 429);
        assert_eq!(reply.json()["error"]["type"], "tokens");
    }

    #[test]
    fn tokens_are_charged_on_the_tick_and_a_spent_budget_refuses() {
        let world = World::new(60_000 * 1_000);
        let mut host = FakeHost::new(&world, 1);
        let worker = limited_worker(
            &mut host,
            serde_json::json!({"requests_per_minute": 100, "tokens_per_minute": 50}),
            false,
        );
        let mut stream = chat(BODY);
        let mut exchange = Exchange::new(1, Some(worker.clone()));
        assert_eq!(send(&mut exchange, &mut host, &mut stream), Flow::Continue);
        answered(&mut exchange, &mut host, &mut stream, 40, 20);
        // The caller's own headers replace Azure's of the same kind.
        assert_eq!(
            stream.response_header("x-ratelimit-remaining-requests"),
            ["99"]
        );
        assert_eq!(
            stream.response_header("x-ratelimit-remaining-tokens"),
            ["50"]
        );
        assert_eq!(stream.response_header("x-ratelimit-limit-tokens"), ["50"]);
        // Until the tick charges them, the tokens are owed in the VM.
        let mut second = chat(BODY);
        let mut exchange = Exchange::new(2, Some(worker.clone()));
        assert_eq!(send(&mut exchange, &mut host, &mut second), Flow::Continue);
        worker.on_tick(&mut host);
        let mut third = chat(BODY);
        let mut exchange = Exchange::new(3, Some(worker.clone()));
        assert_eq!(send(&mut exchange, &mut host, &mut third), Flow::Pause);
        let reply = third.reply.clone().unwrap();
        assert_eq!(reply.status, 429);
        assert_eq!(reply.json()["error"]["type"], "tokens");
        assert!(reply
            .headers
            .contains(&("x-ratelimit-remaining-tokens".into(), "0".into())));
        // The 10 overspent tokens are carried into the next minute, no further.
        world.advance(60_000);
        let mut fourth = chat(BODY);
        let mut exchange = Exchange::new(4, Some(worker.clone()));
        assert_eq!(send(&mut exchange, &mut host, &mut fourth), Flow::Continue);
        answered(&mut exchange, &mut host, &mut fourth, 1, 1);
        assert_eq!(
            fourth.response_header("x-ratelimit-remaining-tokens"),
            ["40"]
        );
    }

    #[test]
    fn global_limits_get_the_caller_and_model_as_headers_and_the_tokens_as_a_property() {
        let world = World::new(1_000);
        let mut host = FakeHost::new(&world, 1);
        let worker = limited_worker(
            &mut host,
            serde_json::json!({"requests_per_minute": 9}),
            true,
        );
        let mut stream = chat(BODY);
        stream
            .request_headers
            .push(("x-azure-openai-caller".into(), b"someone-else".to_vec()));
        let mut exchange = Exchange::new(1, Some(worker.clone()));
        assert_eq!(send(&mut exchange, &mut host, &mut stream), Flow::Continue);
        assert_eq!(stream.header("x-azure-openai-caller"), ["team"]);
        assert_eq!(stream.header("x-azure-openai-model"), ["gpt-4o"]);
        assert!(stream.properties.is_empty());
        answered(&mut exchange, &mut host, &mut stream, 7, 5);
        assert_eq!(
            stream.properties.get(TOKENS_PROPERTY).map(Vec::as_slice),
            Some(&b"12"[..])
        );
        // A request with no model: the model header goes.
        let mut stored = FakeStream::request(
            "GET",
            "/v1/responses/resp_1",
            &[
                ("authorization", &format!("Bearer {KEY}")),
                ("x-azure-openai-model", "gpt-4o"),
            ],
            b"",
        );
        let mut exchange = Exchange::new(2, Some(worker));
        exchange.on_request_headers(&mut host, &mut stored, true);
        assert_eq!(stored.reply, None);
        assert_eq!(stored.header("x-azure-openai-caller"), ["team"]);
        assert!(stored.header("x-azure-openai-model").is_empty());
    }

    fn byok_worker(host: &mut FakeHost, auth: serde_json::Value) -> Rc<Worker> {
        let json = serde_json::json!({
            "upstreams": {"west": {"endpoint": "https://acme-west.openai.azure.com",
                                   "cluster": "azure_west", "auth": auth,
                                   "headers": {"Ocp-Apim-Subscription-Key": {"value": "apim-sub"}},
                                   "caller_credentials": {"callers": ["team"]}}},
            "models": {"gpt-4o": {"upstream": "west", "deployment": "gpt4o-prod"}},
            "callers": [{"name": "team", "key_sha256": hex::encode(Sha256::digest(KEY)),
                         "models": ["gpt-4o"]},
                        {"name": "other", "key_sha256": hex::encode(Sha256::digest("sk-other")),
                         "models": ["gpt-4o"]}]
        });
        let config = Config::from_json(json.to_string().as_bytes(), &|_| None).unwrap();
        Rc::new(Worker::new(Rc::new(config), 1, host))
    }

    #[test]
    fn a_callers_own_key_replaces_the_upstreams_where_allowed_and_never_travels_as_sent() {
        let world = World::new(1_000);
        let mut host = FakeHost::new(&world, 1);
        let worker = byok_worker(
            &mut host,
            serde_json::json!({"api_key": {"value": "west-key"}}),
        );
        let mut stream = chat(BODY);
        stream
            .request_headers
            .push(("x-upstream-api-key".into(), b"tenant-own-key".to_vec()));
        let mut exchange = Exchange::new(1, Some(worker.clone()));
        assert_eq!(send(&mut exchange, &mut host, &mut stream), Flow::Continue);
        assert_eq!(stream.header("api-key"), ["tenant-own-key"]);
        assert!(stream.header("x-upstream-api-key").is_empty());
        assert!(stream.header("authorization").is_empty());
        assert_eq!(stream.header("ocp-apim-subscription-key"), ["apim-sub"]);
        assert!(host.logged("(with the caller's own key)"));
        assert!(!host.logged("tenant-own-key") && !host.logged("apim-sub"));
        // Without the header, the upstream's own key (and the extra header).
        let mut plain = chat(BODY);
        let mut exchange = Exchange::new(2, Some(worker.clone()));
        assert_eq!(send(&mut exchange, &mut host, &mut plain), Flow::Continue);
        assert_eq!(plain.header("api-key"), ["west-key"]);
        assert_eq!(plain.header("ocp-apim-subscription-key"), ["apim-sub"]);
        // Another caller may not send one: 400, nothing forwarded, the key not echoed.
        for (key, value, code) in [
            (
                "sk-other",
                "tenant-own-key",
                "caller_credentials_not_allowed",
            ),
            (KEY, "two keys", "invalid_upstream_api_key"),
        ] {
            let mut refused = FakeStream::request(
                "POST",
                "/v1/chat/completions",
                &[
                    ("authorization", &format!("Bearer {key}")),
                    ("content-type", "application/json"),
                    ("x-upstream-api-key", value),
                ],
                BODY.as_bytes(),
            );
            let mut exchange = Exchange::new(3, Some(worker.clone()));
            assert_eq!(send(&mut exchange, &mut host, &mut refused), Flow::Pause);
            let reply = refused.reply.clone().unwrap();
            assert_eq!(
                (reply.status, reply.json()["error"]["code"].as_str()),
                (400, Some(code))
            );
            assert!(!String::from_utf8_lossy(&reply.body).contains(value));
        }
    }

    #[test]
    fn a_callers_own_key_on_a_token_upstream_needs_no_token() {
        let world = World::new(1_000_000);
        let mut host = FakeHost::new(&world, 1);
        let worker = byok_worker(
            &mut host,
            serde_json::json!({"managed_identity": {"imds_cluster": "imds"}}),
        );
        let mut stream = chat(BODY);
        stream
            .request_headers
            .push(("x-upstream-api-key".into(), b"tenant-own-key".to_vec()));
        let mut exchange = Exchange::new(1, Some(worker));
        assert_eq!(send(&mut exchange, &mut host, &mut stream), Flow::Continue);
        assert_eq!(stream.header("api-key"), ["tenant-own-key"]);
        assert!(stream.header("authorization").is_empty());
    }
}
