//! Caller limits: requests and tokens per minute, across the workers of one
//! Envoy.
//!
//! Windows are fixed minutes of the wall clock (every worker agrees on them
//! without talking). A caller's window lives in Envoy's shared data: its
//! start, the requests admitted in it, and the tokens charged to it.
//!
//! - A request is admitted, or refused with 429, as it arrives: refused
//!   when the window holds `requests_per_minute` requests already, or when
//!   its `tokens_per_minute` are spent. Admission counts the request at
//!   once, with compare-and-swap, so no more than the limit pass in a
//!   window whatever the workers and however concurrent the callers.
//! - Tokens are charged when an answer ends, from the usage it reported
//!   (streams included). A worker adds them up in the VM and charges them on
//!   its tick (a second at most later), so a request pays no host call for
//!   them. An admitted request is never cut, so requests in flight can take
//!   a caller past its token budget; what it overspent is carried into the
//!   next minute (and no further).

use crate::config::{Caller, CallerLimits, Config};
use crate::errors::ApiError;
use crate::host_api::{log, Host, Level, Write};
use crate::shared_form;

pub const WINDOW_MS: u64 = 60_000;
const CAS_ATTEMPTS: usize = 8;
/// First line of the shared form; another version reads as an empty window.
const FORMAT: &str = "limits/1";

/// One caller's window, as it is in shared data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Window {
    pub start_ms: u64,
    pub requests: u64,
    pub tokens: u64,
}

impl Window {
    pub fn encode(&self) -> Vec<u8> {
        shared_form::encode(FORMAT, &[self.start_ms, self.requests, self.tokens])
    }

    pub fn decode(bytes: &[u8]) -> Self {
        let decoded = || -> Option<Window> {
            let mut numbers = shared_form::decode(bytes, FORMAT)?;
            Some(Window {
                start_ms: numbers.next()??,
                requests: numbers.next()??,
                tokens: numbers.next()??,
            })
        };
        decoded().unwrap_or_default()
    }

    /// This window as it stands at `now`: a new minute starts empty, but
    /// for the tokens the last one overspent.
    fn at(self, now: u64, limits: &CallerLimits) -> Window {
        let start = now - now % WINDOW_MS;
        if self.start_ms == start {
            return self;
        }
        let carried = match limits.tokens_per_minute {
            Some(budget) if self.start_ms + WINDOW_MS == start => {
                self.tokens.saturating_sub(budget)
            }
            _ => 0,
        };
        Window {
            start_ms: start,
            requests: 0,
            tokens: carried,
        }
    }
}

/// Which limit a refused request met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Requests,
    Tokens,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Requests => "requests",
            Kind::Tokens => "tokens",
        }
    }
}

/// What admission decided, with what the caller's headers say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Admitted(Standing),
    Limited { kind: Kind, standing: Standing },
}

/// Where a caller stands in its window, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standing {
    pub limits: CallerLimits,
    pub window: Window,
    pub now_ms: u64,
}

impl Standing {
    /// Milliseconds until the window ends.
    pub fn reset_ms(&self) -> u64 {
        (self.window.start_ms + WINDOW_MS).saturating_sub(self.now_ms)
    }

    /// The 429 for a request refused at this standing.
    pub fn refusal(&self, callers: &[Caller], index: usize, kind: Kind) -> ApiError {
        let name = callers.get(index).map_or("-", |c| c.name.as_str());
        let (limit, used) = match kind {
            Kind::Requests => (self.limits.requests_per_minute, self.window.requests),
            Kind::Tokens => (self.limits.tokens_per_minute, self.window.tokens),
        };
        ApiError::caller_limited(name, kind.name(), limit.unwrap_or(0), used, self.reset_ms())
    }

    /// The headers OpenAI sends for a caller's own limits, for each limit
    /// the caller has.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let reset = duration(self.reset_ms());
        let mut out = Vec::with_capacity(6);
        if let Some(limit) = self.limits.requests_per_minute {
            out.push(("x-ratelimit-limit-requests", limit.to_string()));
            out.push((
                "x-ratelimit-remaining-requests",
                limit.saturating_sub(self.window.requests).to_string(),
            ));
            out.push(("x-ratelimit-reset-requests", reset.clone()));
        }
        if let Some(limit) = self.limits.tokens_per_minute {
            out.push(("x-ratelimit-limit-tokens", limit.to_string()));
            out.push((
                "x-ratelimit-remaining-tokens",
                limit.saturating_sub(self.window.tokens).to_string(),
            ));
            out.push(("x-ratelimit-reset-tokens", reset));
        }
        out
    }
}

/// A duration as OpenAI writes it: `1s`, `6m0s`, `20ms`.
pub fn duration(ms: u64) -> String {
    if ms < 1_000 {
        return format!("{ms}ms");
    }
    let seconds = ms.div_ceil(1_000);
    match (seconds / 60, seconds % 60) {
        (0, s) => format!("{s}s"),
        (m, s) => format!("{m}m{s}s"),
    }
}

/// Admits a request of `caller` (index `index`) at `now`, or not.
pub fn admit(host: &mut dyn Host, config: &Config, index: usize) -> Option<Admission> {
    let caller = config.caller(index)?;
    let limits = caller.limits.clone()?;
    let now = host.now_ms();
    let key = shared_key(caller);
    for _ in 0..CAS_ATTEMPTS {
        let (window, cas) = read(host, &key)?;
        let mut window = window.at(now, &limits);
        let spent = |kind: Kind, window: &Window| match kind {
            Kind::Requests => limits
                .requests_per_minute
                .is_some_and(|l| window.requests >= l),
            Kind::Tokens => limits.tokens_per_minute.is_some_and(|l| window.tokens >= l),
        };
        for kind in [Kind::Requests, Kind::Tokens] {
            if spent(kind, &window) {
                return Some(Admission::Limited {
                    kind,
                    standing: Standing {
                        limits,
                        window,
                        now_ms: now,
                    },
                });
            }
        }
        window.requests += 1;
        match host.shared_set(&key, &window.encode(), cas) {
            Write::Done => {
                return Some(Admission::Admitted(Standing {
                    limits,
                    window,
                    now_ms: now,
                }))
            }
            Write::Conflict => continue,
            Write::Failed(status) => {
                log(
                    host,
                    Level::Error,
                    format_args!(
                        "azure-openai-filter: could not write a caller's limit window (status {}); admitted",
                        status.0
                    ),
                );
                return None;
            }
        }
    }
    log(
        host,
        Level::Warn,
        format_args!("azure-openai-filter: a caller's limit window stayed busy; admitted"),
    );
    None
}

/// Charges tokens to a caller's window (the tick, for what its answers
/// used since the last).
pub fn charge(host: &mut dyn Host, config: &Config, index: usize, tokens: u64) {
    let Some(caller) = config.caller(index) else {
        return;
    };
    let Some(limits) = &caller.limits else {
        return;
    };
    let now = host.now_ms();
    let key = shared_key(caller);
    for _ in 0..CAS_ATTEMPTS {
        let Some((window, cas)) = read(host, &key) else {
            return;
        };
        let mut window = window.at(now, limits);
        window.tokens = window.tokens.saturating_add(tokens);
        match host.shared_set(&key, &window.encode(), cas) {
            Write::Done | Write::Failed(_) => return,
            Write::Conflict => continue,
        }
    }
}

fn shared_key(caller: &Caller) -> String {
    format!("azure_openai_filter/limits/{}", caller.name)
}

/// The caller's window and its version (0 when no worker wrote it yet: a
/// write at version 0 is unconditional, so the first writes race; the
/// entry is created before traffic by [`create_windows`]).
fn read(host: &dyn Host, key: &str) -> Option<(Window, u32)> {
    match host.shared_get(key) {
        Ok(Some((bytes, cas))) => Some((Window::decode(&bytes), cas)),
        Ok(None) => Some((Window::default(), 0)),
        Err(_) => None,
    }
}

/// Creates each limited caller's window if no worker has, so that every
/// later write is a compare-and-swap on an existing entry.
pub fn create_windows(host: &dyn Host, config: &Config) {
    for caller in config.callers.iter().filter(|c| c.limits.is_some()) {
        let key = shared_key(caller);
        if let Ok(None) = host.shared_get(&key) {
            let _ = host.shared_set(&key, &Window::default().encode(), 0);
        }
    }
}

#[cfg(test)]
mod tests;
