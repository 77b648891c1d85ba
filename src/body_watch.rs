//! Requests held on their headers until their body is in. Envoy delivers
//! that body only when the Wasm filter is configured with
//! `allow_on_headers_stop_iteration: true`; without it, Envoy holds the
//! body back and the request would hang until the client gives up.
//!
//! The flag cannot be read from inside the VM, so it is inferred: the first
//! body delivered to a held request proves it set, for good. Until then, a
//! held request that has seen none of its body after [`OVERDUE_MS`] is
//! taken as proof of the opposite, and answered 500 naming the setting.
//! Once the flag is known to be set this watch costs nothing.

/// How long a held request may see none of its body before the flag is
/// taken to be missing (a real client sends its body right after the
/// headers; curl's `Expect: 100-continue` waits 1 s at most).
pub const OVERDUE_MS: u64 = 3_000;

#[derive(Debug, Default)]
pub struct BodyWatch {
    /// A body was delivered to a held request: the flag is set.
    confirmed: bool,
    /// Held requests with no body yet, and since when.
    waiting: Vec<(u32, u64)>,
}

impl BodyWatch {
    /// A request is held for its body.
    pub fn hold(&mut self, context_id: u32, now_ms: u64) {
        if !self.confirmed {
            self.waiting.push((context_id, now_ms));
        }
    }

    /// Part of a held request's body arrived: the flag is set.
    pub fn body_arrived(&mut self) {
        if !self.confirmed {
            self.confirmed = true;
            self.waiting.clear();
        }
    }

    /// A held request ended (answered, or its caller left).
    pub fn release(&mut self, context_id: u32) {
        self.waiting.retain(|(id, _)| *id != context_id);
    }

    #[cfg(test)]
    pub fn is_watching(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// The held requests that have waited too long for a body Envoy will
    /// never deliver: they are answered 500 and forgotten.
    pub fn overdue(&mut self, now_ms: u64) -> Vec<u32> {
        let mut overdue = Vec::new();
        self.waiting.retain(|&(id, since)| {
            let late = now_ms.saturating_sub(since) >= OVERDUE_MS;
            if late {
                overdue.push(id);
            }
            !late
        });
        overdue
    }

    #[cfg(test)]
    pub fn confirmed(&self) -> bool {
        self.confirmed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_requests_without_a_body_are_overdue_after_the_wait() {
        let mut watch = BodyWatch::default();
        watch.hold(7, 1_000);
        watch.hold(8, 2_000);
        assert!(watch.is_watching());
        assert_eq!(watch.overdue(1_000 + OVERDUE_MS - 1), Vec::<u32>::new());
        assert_eq!(watch.overdue(1_000 + OVERDUE_MS), vec![7]);
        assert_eq!(watch.overdue(2_000 + OVERDUE_MS), vec![8]);
        assert!(!watch.is_watching());
        assert!(!watch.confirmed());
    }

    #[test]
    fn one_body_proves_the_flag_for_good() {
        let mut watch = BodyWatch::default();
        watch.hold(1, 0);
        watch.hold(2, 0);
        watch.body_arrived();
        assert!(watch.confirmed());
        assert!(!watch.is_watching());
        assert!(watch.overdue(10 * OVERDUE_MS).is_empty());
        // Later requests are not watched at all.
        watch.hold(3, 0);
        assert!(!watch.is_watching());
        assert!(watch.overdue(10 * OVERDUE_MS).is_empty());
    }

    #[test]
    fn released_requests_are_forgotten() {
        let mut watch = BodyWatch::default();
        watch.hold(1, 0);
        watch.release(1);
        assert!(!watch.is_watching());
        assert!(watch.overdue(OVERDUE_MS).is_empty());
    }
}
