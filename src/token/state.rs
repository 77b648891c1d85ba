//! One credential's token state. It lives in Envoy's shared data, so every
//! worker sees the same token, and it carries a lease so that at most one
//! token request is in flight per credential in the whole process.
//!
//! Rules:
//! - a token is used only until `usable_until_ms`, which is before the
//!   `expires_in` the identity endpoint gave (counted from when the request
//!   was sent, not when the answer came);
//! - a refresh starts at 50-60% of the lifetime, so traffic never waits on a
//!   token once the first one is in;
//! - a failed fetch keeps the current token (while usable) and backs off
//!   exponentially with jitter before the next attempt.

use crate::secret::Secret;

/// A fetch holds the lease this much longer than its own timeout, so a lease
/// left by a VM that died mid-fetch expires and another VM takes over.
const LEASE_SLACK_MS: u64 = 2_000;
const BACKOFF_FIRST_MS: u64 = 500;
const BACKOFF_MAX_MS: u64 = 30_000;
/// A token stops being used this long before it expires (at most).
const EXPIRY_SKEW_MAX_MS: u64 = 60_000;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenState {
    pub token: Option<Secret>,
    pub usable_until_ms: u64,
    pub refresh_at_ms: u64,
    /// A token request is in flight until then.
    pub lease_until_ms: u64,
    /// No token request before then (backoff after failures).
    pub next_attempt_ms: u64,
    /// Consecutive failed fetches.
    pub failures: u32,
    /// Why the last fetch failed, for logs and 503 messages (never a secret).
    pub last_error: Option<String>,
}

/// First line of the shared form; another version reads as no state.
const FORMAT: &str = "token-state/1";

/// What a request without a usable token should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    /// A token is usable now.
    Ready,
    /// A token may arrive before the request's deadline: hold it.
    Hold,
    /// No token can arrive in time: answer 503.
    GiveUp,
}

impl TokenState {
    /// The form kept in shared data: one field per line, the token last
    /// (tokens and error texts hold no newline).
    pub fn encode(&self) -> Vec<u8> {
        let one_line = |text: &str| text.replace(['\r', '\n'], " ");
        format!(
            "{FORMAT}\n{}\n{}\n{}\n{}\n{}\n{}\n{}",
            self.usable_until_ms,
            self.refresh_at_ms,
            self.lease_until_ms,
            self.next_attempt_ms,
            self.failures,
            self.last_error.as_deref().map(one_line).unwrap_or_default(),
            self.token
                .as_ref()
                .map(|t| one_line(t.expose()))
                .unwrap_or_default(),
        )
        .into_bytes()
    }

    /// Reads `encode`'s form; anything else is an empty state.
    pub fn decode(bytes: &[u8]) -> Self {
        Self::try_decode(bytes).unwrap_or_default()
    }

    fn try_decode(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut lines = text.splitn(8, '\n');
        if lines.next()? != FORMAT {
            return None;
        }
        let mut number = || lines.next()?.parse::<u64>().ok();
        let (usable_until_ms, refresh_at_ms, lease_until_ms, next_attempt_ms) =
            (number()?, number()?, number()?, number()?);
        let failures = u32::try_from(number()?).ok()?;
        let text_or_none = |line: &str| (!line.is_empty()).then(|| line.to_string());
        let last_error = text_or_none(lines.next()?);
        let token = text_or_none(lines.next()?).map(Secret::new);
        Some(TokenState {
            token,
            usable_until_ms,
            refresh_at_ms,
            lease_until_ms,
            next_attempt_ms,
            failures,
            last_error,
        })
    }

    /// The token, if it may still be used at `now`.
    pub fn usable(&self, now: u64) -> Option<&Secret> {
        self.token.as_ref().filter(|_| now < self.usable_until_ms)
    }

    pub fn fetch_in_flight(&self, now: u64) -> bool {
        now < self.lease_until_ms
    }

    /// Is a token request due (no usable token, or time to refresh), with
    /// none in flight and no backoff in the way?
    pub fn wants_fetch(&self, now: u64) -> bool {
        let due = self.usable(now).is_none() || now >= self.refresh_at_ms;
        due && !self.fetch_in_flight(now) && now >= self.next_attempt_ms
    }

    /// The state once this VM has taken the lease for a fetch.
    pub fn leased(&self, now: u64, timeout_ms: u64) -> Self {
        TokenState {
            lease_until_ms: now + timeout_ms + LEASE_SLACK_MS,
            ..self.clone()
        }
    }

    /// The state after a fetch sent at `sent_at` returned a token living
    /// `lifetime_s` seconds. `jitter` is in [0, 1).
    pub fn with_token(&self, token: Secret, lifetime_s: u64, sent_at: u64, jitter: f64) -> Self {
        let lifetime_ms = lifetime_s.saturating_mul(1000);
        let skew = (lifetime_ms / 10).min(EXPIRY_SKEW_MAX_MS);
        let refresh_after = lifetime_ms as f64 * (0.5 + 0.1 * jitter.clamp(0.0, 1.0));
        TokenState {
            token: Some(token),
            usable_until_ms: sent_at.saturating_add(lifetime_ms - skew),
            refresh_at_ms: sent_at.saturating_add(refresh_after as u64),
            lease_until_ms: 0,
            next_attempt_ms: 0,
            failures: 0,
            last_error: None,
        }
    }

    /// The state after a failed fetch: the current token is kept (it is used
    /// while usable) and the next attempt waits out a backoff.
    pub fn with_failure(&self, error: String, now: u64, jitter: f64) -> Self {
        let failures = self.failures.saturating_add(1);
        TokenState {
            lease_until_ms: 0,
            next_attempt_ms: now + backoff_ms(failures, jitter),
            failures,
            last_error: Some(error),
            ..self.clone()
        }
    }

    /// For a request that needs a token by `deadline`.
    pub fn wait(&self, now: u64, deadline: u64) -> Wait {
        if self.usable(now).is_some() {
            return Wait::Ready;
        }
        if now >= deadline {
            return Wait::GiveUp;
        }
        // A fetch is in flight, or one will start before the deadline.
        if self.fetch_in_flight(now) || self.next_attempt_ms <= deadline {
            return Wait::Hold;
        }
        Wait::GiveUp
    }
}

/// Delay before attempt `failures + 1`: 0.5 s doubling to 30 s, of which a
/// random half (`jitter` in [0, 1)) so that gateways do not retry in step.
pub fn backoff_ms(failures: u32, jitter: f64) -> u64 {
    let exponent = failures.saturating_sub(1).min(16);
    let full = BACKOFF_FIRST_MS
        .saturating_mul(1u64 << exponent)
        .min(BACKOFF_MAX_MS);
    let half = full / 2;
    half + (half as f64 * jitter.clamp(0.0, 1.0)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(value: &str) -> Secret {
        Secret::new(value.to_string())
    }

    #[test]
    fn fresh_state_wants_a_token() {
        let state = TokenState::default();
        assert!(state.usable(0).is_none());
        assert!(state.wants_fetch(1_000));
        assert_eq!(state.wait(1_000, 5_000), Wait::Hold);
    }

    #[test]
    fn token_is_used_until_shortly_before_expiry_and_refreshed_at_half_life() {
        // 3600 s token fetched at t=10 s: skew is capped at 60 s.
        let state = TokenState::default().with_token(token("t1"), 3600, 10_000, 0.0);
        assert_eq!(state.usable_until_ms, 10_000 + 3_600_000 - 60_000);
        assert_eq!(state.refresh_at_ms, 10_000 + 1_800_000);
        assert_eq!(state.usable(11_000).map(Secret::expose), Some("t1"));
        assert!(!state.wants_fetch(11_000));
        assert!(state.wants_fetch(10_000 + 1_800_000));
        assert!(state.usable(10_000 + 3_540_000).is_none());
        assert!(state.usable(10_000 + 3_600_000).is_none());
    }

    #[test]
    fn short_tokens_keep_a_proportional_margin() {
        // 4 s token: usable 3.6 s, refresh between 2.0 and 2.4 s.
        let early = TokenState::default().with_token(token("t"), 4, 0, 0.0);
        let late = TokenState::default().with_token(token("t"), 4, 0, 0.999);
        assert_eq!(early.usable_until_ms, 3_600);
        assert_eq!(early.refresh_at_ms, 2_000);
        assert!((2_000..2_400).contains(&late.refresh_at_ms));
    }

    #[test]
    fn never_used_past_expires_in() {
        for lifetime in [1u64, 2, 4, 60, 3599, 86_399] {
            let state = TokenState::default().with_token(token("t"), lifetime, 5, 0.5);
            assert!(state.usable_until_ms <= 5 + lifetime * 1000);
            assert!(state.refresh_at_ms < state.usable_until_ms || lifetime == 1);
        }
    }

    #[test]
    fn the_lease_stops_a_second_fetch() {
        let state = TokenState::default().leased(1_000, 5_000);
        assert!(state.fetch_in_flight(1_000));
        assert!(!state.wants_fetch(1_000));
        assert!(!state.wants_fetch(7_999));
        // A lease left by a VM that died expires.
        assert!(state.wants_fetch(8_000));
    }

    #[test]
    fn success_clears_lease_and_failures() {
        let state = TokenState::default()
            .leased(0, 5_000)
            .with_failure("x".into(), 100, 0.0)
            .leased(2_000, 5_000)
            .with_token(token("t"), 60, 2_000, 0.0);
        assert_eq!(state.failures, 0);
        assert_eq!(state.lease_until_ms, 0);
        assert_eq!(state.last_error, None);
        assert_eq!(state.next_attempt_ms, 0);
    }

    #[test]
    fn failure_keeps_a_usable_token_and_backs_off() {
        let good = TokenState::default().with_token(token("t"), 60, 0, 0.0);
        let failed = good
            .leased(30_000, 5_000)
            .with_failure("answered 500".into(), 30_100, 0.0);
        assert_eq!(failed.usable(30_100).map(Secret::expose), Some("t"));
        assert_eq!(failed.wait(30_100, 40_000), Wait::Ready);
        assert_eq!(failed.failures, 1);
        assert_eq!(failed.next_attempt_ms, 30_100 + 250);
        assert!(!failed.wants_fetch(30_200));
        assert!(failed.wants_fetch(30_350));
        assert_eq!(failed.last_error.as_deref(), Some("answered 500"));
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        assert_eq!(backoff_ms(1, 0.0), 250);
        assert_eq!(backoff_ms(1, 0.999), 499);
        assert_eq!(backoff_ms(2, 0.0), 500);
        assert_eq!(backoff_ms(3, 0.0), 1_000);
        assert_eq!(backoff_ms(7, 0.0), 15_000);
        assert_eq!(backoff_ms(8, 0.0), 15_000);
        assert_eq!(backoff_ms(1_000, 0.999), 29_985);
        assert_eq!(backoff_ms(0, 0.0), 250);
    }

    #[test]
    fn repeated_failures_make_a_bounded_number_of_attempts() {
        // Attempts over 10 s of an endpoint that always fails.
        let mut state = TokenState::default();
        let mut attempts = 0;
        for now in (0..10_000).step_by(10) {
            if state.wants_fetch(now) {
                attempts += 1;
                state = state
                    .leased(now, 5_000)
                    .with_failure("e".into(), now + 5, 0.5);
            }
        }
        assert!((4..=7).contains(&attempts), "{attempts}");
    }

    #[test]
    fn waiting_requests_hold_or_give_up_by_deadline() {
        let in_flight = TokenState::default().leased(0, 5_000);
        assert_eq!(in_flight.wait(100, 2_000), Wait::Hold);
        assert_eq!(in_flight.wait(2_000, 2_000), Wait::GiveUp);

        // After a failure, hold only if the next attempt starts in time.
        let failed = TokenState::default().with_failure("e".into(), 0, 0.0); // next at 250
        assert_eq!(failed.wait(10, 1_000), Wait::Hold);
        let backed_off = TokenState {
            next_attempt_ms: 20_000,
            ..failed
        };
        assert_eq!(backed_off.wait(10, 10_000), Wait::GiveUp);
        // No waiting allowed at all.
        assert_eq!(TokenState::default().wait(10, 10), Wait::GiveUp);
    }

    #[test]
    fn shared_form_round_trips_and_hides_the_token_from_debug() {
        let state = TokenState::default()
            .with_token(token("secret-token"), 60, 0, 0.0)
            .with_failure("answered 500".into(), 1, 0.0);
        assert_eq!(TokenState::decode(&state.encode()), state);
        assert!(!format!("{state:?}").contains("secret-token"));
        let empty = TokenState::default();
        assert_eq!(TokenState::decode(&empty.encode()), empty);
        let leased = TokenState::default().leased(10, 5);
        assert_eq!(TokenState::decode(&leased.encode()), leased);
        for junk in [
            &b""[..],
            b"{}",
            b"token-state/2\n1\n2\n3\n4\n5\n\n",
            b"token-state/1\n1\n2",
            b"\xff",
        ] {
            assert_eq!(TokenState::decode(junk), TokenState::default());
        }
        // Line breaks cannot cut the form.
        let odd = TokenState::default().with_failure("a\nb".into(), 0, 0.0);
        assert_eq!(
            TokenState::decode(&odd.encode()).last_error.as_deref(),
            Some("a b")
        );
    }
}
