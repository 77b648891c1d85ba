//! Deployment pools: which target of a model a request goes to, and the
//! cooldowns every worker honours.
//!
//! A model's targets are tried lowest `priority` first; within a priority,
//! a target is picked at random in proportion to its `weight`. A target
//! that answers 429 cools down for the time Azure gives (`retry-after-ms`,
//! `x-ms-retry-after-ms`, `Retry-After`, in that order; 10 s when none,
//! at most 5 min); one that answers 5xx or cannot be reached cools down
//! with a backoff (1 s doubling to 30 s). A cooling target gets no requests
//! until its time is up.
//!
//! Each target's cooldown lives in Envoy's shared data (one value for every
//! worker, written with compare-and-swap); each worker keeps a copy,
//! refreshed on its tick, so choosing costs no host call. A worker that
//! sees a 429 cools the target in its copy at once and in shared data for
//! the others.

use crate::config::{Config, Model};
use crate::errors::ApiError;
use crate::gateway::Chooser;
use crate::host_api::{log, Host, Level, Write};
use crate::shared_form;

const DEFAULT_COOLDOWN_MS: u64 = 10_000;
const MAX_COOLDOWN_MS: u64 = 300_000;
const BACKOFF_FIRST_MS: u64 = 1_000;
const BACKOFF_MAX_MS: u64 = 30_000;
const CAS_ATTEMPTS: usize = 8;
/// First line of the shared form; another version reads as not cooling.
const FORMAT: &str = "cooldown/1";

/// One target's cooldown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cooldown {
    /// No requests before then.
    pub until_ms: u64,
    /// Failures (5xx, unreachable) in a row, for the backoff.
    pub failures: u32,
}

impl Cooldown {
    pub fn encode(&self) -> Vec<u8> {
        shared_form::encode(FORMAT, &[self.until_ms, u64::from(self.failures)])
    }

    pub fn decode(bytes: &[u8]) -> Self {
        let decoded = || -> Option<Cooldown> {
            let mut numbers = shared_form::decode(bytes, FORMAT)?;
            Some(Cooldown {
                until_ms: numbers.next()??,
                failures: u32::try_from(numbers.next()??).ok()?,
            })
        };
        decoded().unwrap_or_default()
    }
}

/// How a target answered, for its cooldown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 429, with the wait Azure asked for, if it said.
    Throttled(Option<u64>),
    /// 5xx, a reset, or no connection.
    Failed,
    /// Anything else: the target works.
    Served,
}

/// Azure's wait before a retry, most precise first.
pub fn retry_after_ms(
    retry_after_ms: Option<&[u8]>,
    x_ms_retry_after_ms: Option<&[u8]>,
    retry_after_s: Option<&[u8]>,
) -> Option<u64> {
    let number = |value: Option<&[u8]>| -> Option<u64> {
        std::str::from_utf8(value?)
            .ok()?
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|n| n.is_finite() && *n >= 0.0)
            .map(|n| n as u64)
    };
    number(retry_after_ms)
        .or_else(|| number(x_ms_retry_after_ms))
        .or_else(|| number(retry_after_s).map(|s| s.saturating_mul(1000)))
}

/// The cooldowns of every target, as this worker knows them.
#[derive(Debug)]
pub struct Cooldowns {
    /// Indexed like `Config::targets`; with the shared version read.
    known: Vec<(Cooldown, u32)>,
    rng: u64,
}

/// What choosing a target came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    Target(usize),
    /// Every target is cooling; the first is back after this long.
    AllCooling {
        retry_after_ms: u64,
    },
}

impl Cooldowns {
    pub fn new(config: &Config, seed: u64) -> Self {
        Cooldowns {
            known: vec![(Cooldown::default(), 0); config.targets.len()],
            rng: seed | 1,
        }
    }

    /// A target of `model` that is not cooling and not in `tried`: the
    /// lowest priority there is, weighted within it.
    pub fn choose(&mut self, model: &Model, now: u64, tried: &[usize]) -> Choice {
        let open = |t: &&crate::config::ModelTarget| {
            !tried.contains(&t.target) && !self.is_cooling(t.target, now)
        };
        let best = model.targets.iter().filter(open).map(|t| t.priority).min();
        let Some(priority) = best else {
            // The first of the model's targets to come back.
            let back = model
                .targets
                .iter()
                .map(|t| self.until(t.target).saturating_sub(now))
                .filter(|&wait| wait > 0)
                .min()
                .unwrap_or(1_000);
            return Choice::AllCooling {
                retry_after_ms: back,
            };
        };
        let level: Vec<&crate::config::ModelTarget> = model
            .targets
            .iter()
            .filter(open)
            .filter(|t| t.priority == priority)
            .collect();
        let total: u64 = level.iter().map(|t| u64::from(t.weight)).sum();
        let mut pick = self.next_random() % total.max(1);
        for candidate in &level {
            let weight = u64::from(candidate.weight);
            if pick < weight {
                return Choice::Target(candidate.target);
            }
            pick -= weight;
        }
        level.first().map_or(
            Choice::AllCooling {
                retry_after_ms: 1_000,
            },
            |t| Choice::Target(t.target),
        )
    }

    pub fn is_cooling(&self, target: usize, now: u64) -> bool {
        now < self.until(target)
    }

    fn until(&self, target: usize) -> u64 {
        self.known.get(target).map_or(0, |(c, _)| c.until_ms)
    }

    /// Records how a target answered: a throttle or a failure cools it (in
    /// this worker's copy at once, and in shared data for the others); a
    /// success after failures clears its backoff. Returns how long it
    /// cools (0: not).
    pub fn record(
        &mut self,
        host: &mut dyn Host,
        config: &Config,
        target: usize,
        outcome: Outcome,
    ) -> u64 {
        let now = host.now_ms();
        let Some(current) = self.known.get(target).map(|(c, _)| *c) else {
            return 0;
        };
        let change = |state: &Cooldown| -> Option<Cooldown> {
            match outcome {
                Outcome::Throttled(wait) => {
                    let wait = wait.unwrap_or(DEFAULT_COOLDOWN_MS).min(MAX_COOLDOWN_MS);
                    let until = now.saturating_add(wait);
                    (until > state.until_ms).then_some(Cooldown {
                        until_ms: until,
                        failures: state.failures,
                    })
                }
                Outcome::Failed => {
                    let failures = state.failures.saturating_add(1);
                    let backoff = BACKOFF_FIRST_MS
                        .saturating_mul(1 << failures.saturating_sub(1).min(16))
                        .min(BACKOFF_MAX_MS);
                    Some(Cooldown {
                        until_ms: state.until_ms.max(now.saturating_add(backoff)),
                        failures,
                    })
                }
                Outcome::Served => (state.failures > 0).then_some(Cooldown {
                    until_ms: state.until_ms,
                    failures: 0,
                }),
            }
        };
        // Nothing to say when this worker already knows it (a success with
        // no failures behind it: the common case, with no host call).
        if change(&current).is_none() {
            return current.until_ms.saturating_sub(now);
        }
        let Some(key) = config.target(target).map(|t| t.cooldown_key.as_str()) else {
            return 0;
        };
        let mut written = None;
        for _ in 0..CAS_ATTEMPTS {
            let (shared, cas) = match host.shared_get(key) {
                Ok(Some((bytes, cas))) => (Cooldown::decode(&bytes), cas),
                Ok(None) => (Cooldown::default(), 0),
                Err(_) => break,
            };
            let Some(next) = change(&shared) else {
                written = Some((shared, cas));
                break;
            };
            match host.shared_set(key, &next.encode(), cas) {
                Write::Done => {
                    written = Some((next, 0));
                    break;
                }
                Write::Conflict => continue,
                Write::Failed(status) => {
                    log(
                        host,
                        Level::Error,
                        format_args!(
                            "azure-openai-filter: could not write a cooldown (status {})",
                            status.0
                        ),
                    );
                    break;
                }
            }
        }
        // Even when shared data failed, this worker honours what it saw.
        let state = written.map_or_else(|| change(&current).unwrap_or(current), |(s, _)| s);
        if let Some(slot) = self.known.get_mut(target) {
            *slot = (state, written.map_or(0, |(_, cas)| cas));
        }
        state.until_ms.saturating_sub(now)
    }

    /// The tick: the other workers' cooldowns, read from shared data.
    pub fn refresh(&mut self, host: &dyn Host, config: &Config) {
        for (slot, target) in self.known.iter_mut().zip(&config.targets) {
            if let Ok(Some((bytes, cas))) = host.shared_get(&target.cooldown_key) {
                if cas != slot.1 {
                    *slot = (Cooldown::decode(&bytes), cas);
                }
            }
        }
    }

    /// xorshift; for spreading load, not for secrets.
    fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }
}

/// Chooses with the cooldowns at `now`; none open gives 429.
pub struct PoolChooser<'a> {
    pub cooldowns: &'a mut Cooldowns,
    pub now: u64,
}

impl Chooser for PoolChooser<'_> {
    fn choose(&mut self, _config: &Config, model: &Model) -> Result<usize, ApiError> {
        // A model with one target has nowhere else to go: its own answers
        // (429 included) pass as Azure gives them.
        if let [only] = model.targets.as_slice() {
            return Ok(only.target);
        }
        match self.cooldowns.choose(model, self.now, &[]) {
            Choice::Target(target) => Ok(target),
            Choice::AllCooling { retry_after_ms } => {
                Err(ApiError::all_targets_cooling(&model.alias, retry_after_ms))
            }
        }
    }
}

#[cfg(test)]
mod tests;
