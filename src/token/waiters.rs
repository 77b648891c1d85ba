//! Requests held because their upstream's token is not there yet: resumed
//! when it arrives, answered 503 when it cannot arrive before their deadline.

use super::state::{TokenState, Wait};
use crate::secret::Secret;

#[derive(Debug)]
pub struct Waiter<E> {
    pub context_id: u32,
    pub credential: usize,
    pub since_ms: u64,
    pub deadline_ms: u64,
    /// What the request needs to go on (its header edits, minus the token).
    pub pending: E,
}

#[derive(Debug, PartialEq)]
pub enum Settled<E> {
    Resume {
        context_id: u32,
        token: Secret,
        pending: E,
    },
    Fail {
        context_id: u32,
        credential: usize,
        /// Why the last token request failed, if one did.
        reason: Option<String>,
        waited_ms: u64,
    },
}

#[derive(Debug)]
pub struct Waiters<E> {
    waiting: Vec<Waiter<E>>,
}

impl<E> Default for Waiters<E> {
    fn default() -> Self {
        Waiters {
            waiting: Vec::new(),
        }
    }
}

impl<E> Waiters<E> {
    pub fn add(&mut self, waiter: Waiter<E>) {
        self.waiting.push(waiter);
    }

    /// Forgets a request (its caller went away); true if it was waiting.
    pub fn remove(&mut self, context_id: u32) -> bool {
        let before = self.waiting.len();
        self.waiting.retain(|w| w.context_id != context_id);
        self.waiting.len() != before
    }

    pub fn contains(&self, context_id: u32) -> bool {
        self.waiting.iter().any(|w| w.context_id == context_id)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Takes out every request that can be decided at `now`, given each
    /// credential's token state: a usable token resumes it, a deadline that
    /// no token can meet fails it. The rest keep waiting.
    pub fn settle<'s>(
        &mut self,
        now: u64,
        state_of: impl Fn(usize) -> Option<&'s TokenState>,
    ) -> Vec<Settled<E>> {
        let mut settled = Vec::new();
        let mut still = Vec::with_capacity(self.waiting.len());
        for waiter in self.waiting.drain(..) {
            let state = state_of(waiter.credential);
            let token = state.and_then(|s| s.usable(now)).cloned();
            let wait = state.map_or(Wait::GiveUp, |s| s.wait(now, waiter.deadline_ms));
            match (token, wait) {
                (Some(token), _) => settled.push(Settled::Resume {
                    context_id: waiter.context_id,
                    token,
                    pending: waiter.pending,
                }),
                (None, Wait::Hold) => still.push(waiter),
                (None, _) => settled.push(Settled::Fail {
                    context_id: waiter.context_id,
                    credential: waiter.credential,
                    reason: state.and_then(|s| s.last_error.clone()),
                    waited_ms: now.saturating_sub(waiter.since_ms),
                }),
            }
        }
        self.waiting = still;
        settled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiter(context_id: u32, credential: usize, deadline_ms: u64) -> Waiter<&'static str> {
        Waiter {
            context_id,
            credential,
            since_ms: 0,
            deadline_ms,
            pending: "edits",
        }
    }

    #[test]
    fn a_token_resumes_every_waiter_of_its_credential() {
        let mut waiters = Waiters::default();
        waiters.add(waiter(1, 0, 5_000));
        waiters.add(waiter(2, 1, 5_000));
        waiters.add(waiter(3, 0, 5_000));
        let ready = TokenState::default().with_token(Secret::new("t".into()), 60, 0, 0.0);
        let fetching = TokenState::default().leased(0, 5_000);
        let states = [ready, fetching];
        let settled = waiters.settle(100, |i| states.get(i));
        assert_eq!(
            settled,
            vec![
                Settled::Resume {
                    context_id: 1,
                    token: Secret::new("t".into()),
                    pending: "edits"
                },
                Settled::Resume {
                    context_id: 3,
                    token: Secret::new("t".into()),
                    pending: "edits"
                },
            ]
        );
        assert_eq!(waiters.len(), 1);
    }

    #[test]
    fn deadline_fails_with_the_last_error() {
        let mut waiters = Waiters::default();
        waiters.add(waiter(1, 0, 2_000));
        let state = TokenState::default().with_failure("answered 500".into(), 0, 0.0);
        assert!(waiters.settle(1_000, |_| Some(&state)).is_empty());
        let settled = waiters.settle(2_000, |_| Some(&state));
        assert_eq!(
            settled,
            vec![Settled::Fail {
                context_id: 1,
                credential: 0,
                reason: Some("answered 500".into()),
                waited_ms: 2_000
            }]
        );
        assert!(waiters.is_empty());
    }

    #[test]
    fn fails_early_when_the_next_attempt_is_after_the_deadline() {
        let mut waiters = Waiters::default();
        waiters.add(waiter(1, 0, 2_000));
        let mut state = TokenState::default().with_failure("answered 401".into(), 0, 0.0);
        state.next_attempt_ms = 30_000;
        let settled = waiters.settle(10, |_| Some(&state));
        assert!(matches!(
            settled.as_slice(),
            [Settled::Fail { context_id: 1, .. }]
        ));
    }

    #[test]
    fn removed_waiters_are_forgotten() {
        let mut waiters = Waiters::default();
        waiters.add(waiter(1, 0, 2_000));
        assert!(waiters.contains(1));
        assert!(waiters.remove(1));
        assert!(!waiters.contains(1));
        assert!(!waiters.remove(1));
        let state = TokenState::default().with_token(Secret::new("t".into()), 60, 0, 0.0);
        assert!(waiters.settle(10, |_| Some(&state)).is_empty());
    }

    #[test]
    fn unknown_credential_fails() {
        let mut waiters = Waiters::default();
        waiters.add(waiter(1, 9, 2_000));
        let settled = waiters.settle(10, |_| None);
        assert!(matches!(
            settled.as_slice(),
            [Settled::Fail { reason: None, .. }]
        ));
    }
}
