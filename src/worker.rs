//! What one VM (one Envoy worker) keeps across requests: the validated
//! configuration, the token coordinator, the watch on held request bodies.
//! The host's root context owns it and drives it on ticks and callout
//! answers; every request of the VM shares it.
//!
//! Work the worker decides for other requests (resume one that waited for a
//! token, answer one that waited in vain) comes back as [`Settlement`]s for
//! the host to carry out on those requests' streams ([`carry_out`]).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use crate::body_watch::BodyWatch;
use crate::config::Config;
use crate::errors::ApiError;
use crate::gateway::HeaderEdit;
use crate::host_api::{log, CalloutResponse, Host, HostError, Level, Stream, TokenFetch};
use crate::limits;
use crate::metrics::Recorder;
use crate::pool::Cooldowns;
use crate::token::{Settlement, Tokens, MAX_TOKEN_RESPONSE_BYTES};

/// The root ticks at least this often: to flush the metrics counted in the
/// VM, and to answer requests whose body never came.
pub const METRICS_TICK_MS: u32 = 1_000;
/// With pools, the tick reads the other workers' cooldowns this often.
pub const POOL_TICK_MS: u32 = 250;

pub struct Worker {
    pub config: Rc<Config>,
    /// Only when an upstream uses token credentials.
    pub tokens: Option<RefCell<Tokens>>,
    pub body_watch: RefCell<BodyWatch>,
    pub metrics: RefCell<Recorder>,
    /// The pools' cooldowns, as this worker knows them.
    pub cooldowns: RefCell<Cooldowns>,
    /// Tokens this VM's answers used, per limited caller, not yet charged
    /// to the callers' windows (the tick charges them).
    pub charges: RefCell<BTreeMap<usize, u64>>,
    /// Whether some model has several targets (whose cooldowns are read on
    /// every tick).
    pools: bool,
    /// The missing-flag error has been logged (once per VM).
    reported_missing_flag: Cell<bool>,
}

/// What the host does for a request of this VM, decided elsewhere.
#[derive(Debug)]
pub enum Chore {
    /// Carry out a token settlement.
    Settle(Settlement),
    /// Answer a request whose body never came: the flag is missing.
    BodyNeverDelivered(u32),
}

impl Chore {
    pub fn context_id(&self) -> u32 {
        match self {
            Chore::Settle(Settlement::Resume { context_id, .. })
            | Chore::Settle(Settlement::Fail { context_id, .. })
            | Chore::BodyNeverDelivered(context_id) => *context_id,
        }
    }
}

impl Worker {
    /// A VM's worker, once its configuration is validated. `seed` varies
    /// the jitter of token refreshes between VMs.
    pub fn new(config: Rc<Config>, seed: u64, host: &mut dyn Host) -> Self {
        let tokens = (!config.credentials.is_empty()).then(|| {
            let tokens = Tokens::new(config.clone(), seed, host);
            tokens.create_shared_entries(host);
            RefCell::new(tokens)
        });
        let pools = config.models.iter().any(|m| m.targets.len() > 1);
        limits::create_windows(host, &config);
        let worker = Worker {
            charges: RefCell::new(BTreeMap::new()),
            cooldowns: RefCell::new(Cooldowns::new(&config, seed)),
            pools,
            config,
            tokens,
            body_watch: RefCell::new(BodyWatch::default()),
            metrics: RefCell::new(Recorder::default()),
            reported_missing_flag: Cell::new(false),
        };
        // The first tick fetches tokens before traffic needs them.
        worker.schedule_tick(host);
        worker
    }

    /// Counts tokens a limited caller's answer used (charged on the tick).
    pub fn owe(&self, caller: usize, tokens: u64) {
        if tokens == 0 {
            return;
        }
        if let Ok(mut charges) = self.charges.try_borrow_mut() {
            let owed = charges.entry(caller).or_default();
            *owed = owed.saturating_add(tokens);
        }
    }

    /// The root's tick: cooldowns, tokens charged to limited callers, metrics,
    /// token work, and requests whose body never came.
    /// A busy borrow skips the work until the next tick.
    pub fn on_tick(&self, host: &mut dyn Host) -> Vec<Chore> {
        if self.pools {
            if let Ok(mut cooldowns) = self.cooldowns.try_borrow_mut() {
                cooldowns.refresh(host, &self.config);
                if let Ok(mut metrics) = self.metrics.try_borrow_mut() {
                    metrics.cooling(&cooldowns, host.now_ms(), self.config.targets.len());
                }
            }
        }
        if let Ok(mut charges) = self.charges.try_borrow_mut() {
            for (caller, tokens) in std::mem::take(&mut *charges) {
                limits::charge(host, &self.config, caller, tokens);
            }
        }
        if let Ok(mut metrics) = self.metrics.try_borrow_mut() {
            metrics.flush(host, &self.config);
        }
        let mut chores = self.overdue_bodies(host);
        if let Some(tokens) = &self.tokens {
            if let Ok(mut tokens) = tokens.try_borrow_mut() {
                chores.extend(tokens.tick(host).into_iter().map(Chore::Settle));
            }
        }
        chores
    }

    /// An answer to a callout the root sent.
    #[cfg_attr(all(feature = "native", not(target_arch = "wasm32")), allow(dead_code))]
    pub fn on_callout_response(
        &self,
        host: &mut dyn Host,
        callout: u32,
        response: &CalloutResponse,
    ) -> Vec<Chore> {
        self.with_tokens(host, |tokens, host| {
            tokens.on_response(host, callout, response)
        })
    }

    /// The answer to a token fetch that this or another worker sent (a host
    /// that hands answers to whichever worker can take them: `TokenFetch`).
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))] // read by the native module
    pub fn on_token_answer(
        &self,
        host: &mut dyn Host,
        fetch: TokenFetch,
        response: &CalloutResponse,
    ) -> Vec<Chore> {
        self.with_tokens(host, |tokens, host| tokens.on_answer(host, fetch, response))
    }

    fn with_tokens(
        &self,
        host: &mut dyn Host,
        answer: impl FnOnce(&mut Tokens, &mut dyn Host) -> Vec<Settlement>,
    ) -> Vec<Chore> {
        let Some(tokens) = &self.tokens else {
            return Vec::new();
        };
        // Envoy defers callbacks made while the VM runs, so `Tokens` is never
        // borrowed here; were it, the answer would be dropped (the lease then
        // expires and another fetch follows) rather than panic.
        let Ok(mut tokens) = tokens.try_borrow_mut() else {
            log(
                host,
                Level::Error,
                format_args!("azure-openai-filter: token state busy; answer dropped"),
            );
            return Vec::new();
        };
        answer(&mut tokens, host)
            .into_iter()
            .map(Chore::Settle)
            .collect()
    }

    /// How much of a callout's body the worker reads.
    pub fn callout_body_limit(&self) -> usize {
        MAX_TOKEN_RESPONSE_BYTES
    }

    /// Sets the tick period every time: a request that starts waiting
    /// shortens it to be served at once, and this puts it back. The tick
    /// always runs, at least to flush the metrics.
    pub fn schedule_tick(&self, host: &mut dyn Host) {
        let mut period = if self.pools {
            POOL_TICK_MS
        } else {
            METRICS_TICK_MS
        };
        if let Some(tokens) = &self.tokens {
            match tokens.try_borrow() {
                Ok(tokens) => period = period.min(tokens.tick_period_ms()),
                Err(_) => return,
            }
        }
        host.set_tick_period_ms(period);
    }

    fn overdue_bodies(&self, host: &mut dyn Host) -> Vec<Chore> {
        let overdue = match self.body_watch.try_borrow_mut() {
            Ok(mut watch) => watch.overdue(host.now_ms()),
            Err(_) => return Vec::new(),
        };
        if !overdue.is_empty() && !self.reported_missing_flag.replace(true) {
            log(
                host,
                Level::Error,
                format_args!(
                    "azure-openai-filter: Envoy does not deliver request bodies to the filter, so \
                     every request whose model is in its body fails with 500: set \
                     `allow_on_headers_stop_iteration: true` in the Wasm filter's config"
                ),
            );
        }
        overdue.into_iter().map(Chore::BodyNeverDelivered).collect()
    }
}

/// Carries out a chore on its request's stream (the host has made it the
/// one host calls act on).
pub fn carry_out(host: &dyn Host, stream: &mut dyn Stream, chore: Chore) {
    let context_id = chore.context_id();
    let outcome = match chore {
        Chore::Settle(Settlement::Resume { edits, .. }) => apply_edits(stream, &edits)
            .and_then(|()| stream.resume_request())
            .map_err(|_| ApiError::internal("could not resume the request")),
        Chore::Settle(Settlement::Fail { error, .. }) => Err(error),
        Chore::BodyNeverDelivered(_) => Err(ApiError::body_never_delivered()),
    };
    match outcome {
        Ok(()) => log(
            host,
            Level::Debug,
            format_args!("request {context_id}: token ready, forwarded"),
        ),
        Err(error) => {
            log(
                host,
                Level::Debug,
                format_args!(
                    "request {context_id}: answered {} {}",
                    error.status, error.code
                ),
            );
            send_error(host, stream, &error);
        }
    }
}

/// Applies header edits to a request.
pub fn apply_edits(stream: &mut dyn Stream, edits: &[HeaderEdit<'_>]) -> Result<(), HostError> {
    for edit in edits {
        match edit {
            HeaderEdit::Remove(name) => stream.remove_request_header(name)?,
            HeaderEdit::Set(name, value) => stream.set_request_header(name, value)?,
        }
    }
    Ok(())
}

/// Answers a request with an OpenAI error.
pub fn send_error(host: &dyn Host, stream: &mut dyn Stream, error: &ApiError) {
    let mut headers: Vec<(&[u8], &[u8])> = vec![(b"content-type", b"application/json")];
    headers.extend(
        error
            .headers
            .iter()
            .map(|(name, value)| (name.as_bytes(), value.as_bytes())),
    );
    send_reply(host, stream, error.status, &headers, &error.body());
}

pub fn send_reply(
    host: &dyn Host,
    stream: &mut dyn Stream,
    status: u16,
    headers: &[(&[u8], &[u8])],
    body: &[u8],
) {
    if let Err(status) = stream.send_reply(status, headers, body) {
        log(
            host,
            Level::Error,
            format_args!(
                "azure-openai-filter: could not send a local reply (status {})",
                status.0
            ),
        );
    }
}
