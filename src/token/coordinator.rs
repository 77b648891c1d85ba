//! The token coordinator: each credential's state lives in data shared by
//! every worker VM (Envoy's shared data), fetches go out through the root
//! context only, under a lease taken with compare-and-swap, so at most one
//! token request per credential is in flight in the whole Envoy process.
//!
//! Why shared data and not a singleton bootstrap service: the filter then
//! works wherever an HTTP filter can be installed (Istio's WasmPlugin and
//! Envoy Gateway's EnvoyExtensionPolicy have no bootstrap extensions), and
//! any VM can take over a fetch if another dies.
//!
//! Every VM's root ticks (250 ms idle, 20 ms while requests wait): it reads
//! the shared state into a local copy, starts a fetch when one is due, and
//! resumes or fails the requests waiting on this worker. Requests read the
//! local copy, so a request with a token pays no host call for it.

use std::rc::Rc;

use super::{parse_token_response, Settled, TokenState, Wait, Waiter, Waiters};
use crate::config::Config;
use crate::errors::ApiError;
use crate::gateway::HeaderEdit;
use crate::host_api::{log, Callout, CalloutError, CalloutResponse, Host, Level, Write};
use crate::secret::Secret;
use crate::stats::{Metric, Metrics};

pub const IDLE_TICK_MS: u32 = 250;
pub const WAITING_TICK_MS: u32 = 20;
/// Compare-and-swap retries before giving up on a shared-data update.
const CAS_ATTEMPTS: usize = 8;

/// A request's header edits, kept while it waits for its token.
pub type PendingEdits = Vec<HeaderEdit<'static>>;

/// What a request with a token upstream should do now.
pub enum Lookup {
    Ready(Secret),
    Hold,
    GiveUp(ApiError),
}

#[derive(Default)]
struct Local {
    state: TokenState,
    /// Shared-data version the local copy was read at (0: none yet).
    cas: u32,
}

struct InFlight {
    callout: u32,
    credential: usize,
    sent_at: u64,
}

pub struct Tokens {
    config: Rc<Config>,
    local: Vec<Local>,
    waiters: Waiters<PendingEdits>,
    in_flight: Vec<InFlight>,
    metrics: Metrics,
    rng: u64,
}

impl Tokens {
    pub fn new(config: Rc<Config>, seed: u64, host: &mut dyn Host) -> Self {
        let local = config
            .credentials
            .iter()
            .map(|_| Local::default())
            .collect();
        Tokens {
            config,
            local,
            waiters: Waiters::default(),
            in_flight: Vec::new(),
            metrics: Metrics::define(host),
            rng: seed | 1,
        }
    }

    /// Creates each credential's shared entry if no VM has yet, so leases
    /// are always taken by compare-and-swap on an existing entry.
    pub fn create_shared_entries(&self, host: &dyn Host) {
        for credential in &self.config.credentials {
            if let Ok(None) = host.shared_get(&credential.shared_key) {
                let empty = TokenState::default().encode();
                let _ = host.shared_set(&credential.shared_key, &empty, 0);
            }
        }
    }

    pub fn tick_period_ms(&self) -> u32 {
        if self.waiters.is_empty() {
            IDLE_TICK_MS
        } else {
            WAITING_TICK_MS
        }
    }

    /// For a request whose upstream uses `credential`.
    pub fn lookup(&mut self, host: &mut dyn Host, credential: usize) -> Lookup {
        let now = host.now_ms();
        let Some(max_wait) = self.config.credential(credential).map(|c| c.max_wait_ms) else {
            return Lookup::GiveUp(ApiError::internal("unknown credential"));
        };
        if let Some(token) = self.usable(credential, now) {
            return Lookup::Ready(token);
        }
        // Another worker may have fetched one since this worker's last tick.
        self.read_shared(host, credential);
        if let Some(token) = self.usable(credential, now) {
            return Lookup::Ready(token);
        }
        let Some(local) = self.local.get(credential) else {
            return Lookup::GiveUp(ApiError::internal("unknown credential"));
        };
        match local.state.wait(now, now + max_wait) {
            Wait::Ready | Wait::Hold => Lookup::Hold,
            Wait::GiveUp => {
                self.metrics.add(host, Metric::TokenUnavailable, 1);
                Lookup::GiveUp(self.unavailable(credential, local.state.last_error.as_deref(), 0))
            }
        }
    }

    fn usable(&self, credential: usize, now: u64) -> Option<Secret> {
        self.local.get(credential)?.state.usable(now).cloned()
    }

    pub fn hold(
        &mut self,
        host: &mut dyn Host,
        context_id: u32,
        credential: usize,
        edits: PendingEdits,
    ) {
        let now = host.now_ms();
        let max_wait = self
            .config
            .credential(credential)
            .map_or(0, |c| c.max_wait_ms);
        self.waiters.add(Waiter {
            context_id,
            credential,
            since_ms: now,
            deadline_ms: now + max_wait,
            pending: edits,
        });
        self.metrics.add(host, Metric::RequestsHeld, 1);
        self.metrics.add(host, Metric::RequestsWaiting, 1);
    }

    /// Whether a request is still waiting (not yet resumed or answered).
    pub fn is_waiting(&self, context_id: u32) -> bool {
        self.waiters.contains(context_id)
    }

    /// A held request went away (its caller disconnected).
    pub fn release(&mut self, host: &mut dyn Host, context_id: u32) {
        if self.waiters.remove(context_id) {
            self.metrics.add(host, Metric::RequestsWaiting, -1);
        }
    }

    /// Root tick: refresh local copies, start due fetches, settle waiters.
    pub fn tick(&mut self, host: &mut dyn Host) -> Vec<Settlement> {
        let now = host.now_ms();
        for credential in 0..self.local.len() {
            self.read_shared(host, credential);
            let due = self
                .local
                .get(credential)
                .is_some_and(|l| l.state.wants_fetch(now));
            if due {
                self.start_fetch(host, credential, now);
            }
        }
        self.settle(host, now)
    }

    /// Root: an identity endpoint answered.
    pub fn on_response(
        &mut self,
        host: &mut dyn Host,
        callout: u32,
        response: &CalloutResponse,
    ) -> Vec<Settlement> {
        let now = host.now_ms();
        let Some(position) = self.in_flight.iter().position(|f| f.callout == callout) else {
            return Vec::new();
        };
        let fetch = self.in_flight.swap_remove(position);
        let Some(credential) = self.config.credential(fetch.credential) else {
            return Vec::new();
        };
        let label = credential.label.clone();
        match parse_token_response(response.status, &response.body) {
            Ok(token) => {
                let jitter = self.jitter();
                let lifetime = token.expires_in_s;
                self.update(host, fetch.credential, |state| {
                    Some(state.with_token(
                        token.access_token.clone(),
                        lifetime,
                        fetch.sent_at,
                        jitter,
                    ))
                });
                log(
                    host,
                    Level::Info,
                    format_args!(
                        "azure-openai-filter: token for upstream `{label}` obtained, valid {lifetime} s"
                    ),
                );
            }
            Err(reason) => {
                self.metrics.add(host, Metric::TokenFetchFailures, 1);
                let jitter = self.jitter();
                let updated = self.update(host, fetch.credential, |state| {
                    Some(state.with_failure(reason.clone(), now, jitter))
                });
                let (keeping, retry_in) = updated.map_or((false, 0), |s| {
                    (
                        s.usable(now).is_some(),
                        s.next_attempt_ms.saturating_sub(now),
                    )
                });
                log(
                    host,
                    Level::Warn,
                    format_args!(
                        "azure-openai-filter: token request for upstream `{label}` failed: {reason}; {}; next attempt in {retry_in} ms",
                        if keeping { "still using the current token" } else { "no usable token" }
                    ),
                );
            }
        }
        self.settle(host, now)
    }

    /// Takes the lease and sends the token request, from the root context.
    fn start_fetch(&mut self, host: &mut dyn Host, index: usize, now: u64) {
        let config = Rc::clone(&self.config);
        let Some(credential) = config.credential(index) else {
            return;
        };
        let timeout = credential.timeout_ms;
        let leased = self.update(host, index, |state| {
            state.wants_fetch(now).then(|| state.leased(now, timeout))
        });
        if leased.is_none() {
            return; // another VM has it, or nothing is due after all
        }
        let request = &credential.request;
        let mut headers = vec![
            (":method", request.method),
            (":path", request.path.as_str()),
            (":authority", request.authority.as_str()),
        ];
        headers.extend(request.headers.iter().copied());
        let body = request.body.as_ref().map(|b| b.expose().as_bytes());
        let sent = host.http_call(&Callout {
            cluster: &credential.cluster,
            headers: &headers,
            body,
            timeout_ms: timeout,
        });
        self.metrics.add(host, Metric::TokenFetches, 1);
        match sent {
            Ok(callout) => {
                log(
                    host,
                    Level::Debug,
                    format_args!(
                        "azure-openai-filter: requesting a token for upstream `{}` from cluster `{}`",
                        credential.label, credential.cluster
                    ),
                );
                self.in_flight.push(InFlight {
                    callout,
                    credential: index,
                    sent_at: now,
                });
            }
            Err(error) => {
                self.metrics.add(host, Metric::TokenFetchFailures, 1);
                let reason = match error {
                    CalloutError::UnknownCluster => format!(
                        "Envoy has no cluster `{}` for the identity endpoint",
                        credential.cluster
                    ),
                    CalloutError::NoHost => format!(
                        "the identity endpoint could not be reached (no usable host in cluster `{}`)",
                        credential.cluster
                    ),
                };
                log(
                    host,
                    Level::Error,
                    format_args!(
                        "azure-openai-filter: token for upstream `{}`: {reason}",
                        credential.label
                    ),
                );
                let jitter = self.jitter();
                self.update(host, index, |state| {
                    Some(state.with_failure(reason.clone(), now, jitter))
                });
            }
        }
    }

    fn settle(&mut self, host: &mut dyn Host, now: u64) -> Vec<Settlement> {
        let local = &self.local;
        let settled = self
            .waiters
            .settle(now, |credential| local.get(credential).map(|l| &l.state));
        let mut out = Vec::with_capacity(settled.len());
        for item in settled {
            self.metrics.add(host, Metric::RequestsWaiting, -1);
            out.push(match item {
                Settled::Resume {
                    context_id,
                    token,
                    mut pending,
                } => {
                    pending.push(crate::gateway::bearer(&token));
                    Settlement::Resume {
                        context_id,
                        edits: pending,
                    }
                }
                Settled::Fail {
                    context_id,
                    credential,
                    reason,
                    waited_ms,
                } => {
                    self.metrics.add(host, Metric::TokenUnavailable, 1);
                    Settlement::Fail {
                        context_id,
                        error: self.unavailable(credential, reason.as_deref(), waited_ms),
                    }
                }
            });
        }
        out
    }

    fn unavailable(&self, credential: usize, reason: Option<&str>, waited_ms: u64) -> ApiError {
        let label = self
            .config
            .credential(credential)
            .map_or("?", |c| c.label.as_str());
        ApiError::token_unavailable(label, reason, waited_ms)
    }

    /// Refreshes the local copy of a credential's state if the shared one
    /// changed since it was read.
    fn read_shared(&mut self, host: &dyn Host, credential: usize) {
        let Some(key) = self
            .config
            .credential(credential)
            .map(|c| c.shared_key.as_str())
        else {
            return;
        };
        let Ok(Some((bytes, cas))) = host.shared_get(key) else {
            return;
        };
        if let Some(local) = self.local.get_mut(credential) {
            if local.cas != cas {
                local.state = TokenState::decode(&bytes);
                local.cas = cas;
            }
        }
    }

    /// Read-modify-write of a credential's shared state with compare-and-swap;
    /// `change` returns None to leave it as it is. Returns the state written.
    fn update(
        &mut self,
        host: &mut dyn Host,
        credential: usize,
        change: impl Fn(&TokenState) -> Option<TokenState>,
    ) -> Option<TokenState> {
        let key = self.config.credential(credential)?.shared_key.clone();
        for _ in 0..CAS_ATTEMPTS {
            let (current, cas) = match host.shared_get(&key) {
                Ok(Some((bytes, cas))) => (TokenState::decode(&bytes), cas),
                Ok(None) => (TokenState::default(), 0),
                Err(_) => return None,
            };
            let Some(next) = change(&current) else {
                if let Some(local) = self.local.get_mut(credential) {
                    *local = Local {
                        state: current,
                        cas,
                    };
                }
                return None;
            };
            match host.shared_set(&key, &next.encode(), cas) {
                Write::Done => {
                    if let Some(local) = self.local.get_mut(credential) {
                        // The new version number is not returned: read it next time.
                        *local = Local {
                            state: next.clone(),
                            cas: 0,
                        };
                    }
                    return Some(next);
                }
                Write::Conflict => continue,
                Write::Failed(status) => {
                    log(
                        host,
                        Level::Error,
                        format_args!(
                            "azure-openai-filter: could not write shared token state (status {})",
                            status.0
                        ),
                    );
                    return None;
                }
            }
        }
        None
    }

    /// A number in [0, 1) for jitter (xorshift; not for secrets).
    fn jitter(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What the root does for a waiting request, once it no longer borrows
/// `Tokens` (resuming a request may call back into this VM).
#[derive(Debug)]
pub enum Settlement {
    Resume {
        context_id: u32,
        edits: PendingEdits,
    },
    Fail {
        context_id: u32,
        error: ApiError,
    },
}
