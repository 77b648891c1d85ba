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
use crate::host_api::{
    log, Callout, CalloutError, CalloutResponse, Host, Level, TokenFetch, Write,
};
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

/// A fetch this VM sent, by the host's callout id (the native module's
/// answers come by `TokenFetch` alone).
struct InFlight {
    #[cfg_attr(all(feature = "native", not(target_arch = "wasm32")), allow(dead_code))]
    callout: u32,
    fetch: TokenFetch,
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

    /// Root: an identity endpoint answered a fetch this VM sent.
    #[cfg_attr(all(feature = "native", not(target_arch = "wasm32")), allow(dead_code))]
    pub fn on_response(
        &mut self,
        host: &mut dyn Host,
        callout: u32,
        response: &CalloutResponse,
    ) -> Vec<Settlement> {
        let Some(position) = self.in_flight.iter().position(|f| f.callout == callout) else {
            return Vec::new();
        };
        let fetch = self.in_flight.swap_remove(position).fetch;
        self.on_answer(host, fetch, response)
    }

    /// Root: the answer to a token fetch, whichever VM of the filter sent it
    /// (the shared state carries the result to every VM; see
    /// `Callout::token_for`).
    pub fn on_answer(
        &mut self,
        host: &mut dyn Host,
        fetch: TokenFetch,
        response: &CalloutResponse,
    ) -> Vec<Settlement> {
        let now = host.now_ms();
        // This VM's own record of it, if it sent it.
        self.in_flight.retain(|f| f.fetch != fetch);
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
                        fetch.sent_at_ms,
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
        let fetch = TokenFetch {
            credential: index,
            sent_at_ms: now,
        };
        // The lease was free (or expired): any earlier fetch of this VM for
        // the credential is over, answered to another VM or never.
        self.in_flight.retain(|f| f.fetch.credential != index);
        let sent = host.http_call(&Callout {
            cluster: &credential.cluster,
            headers: &headers,
            body,
            timeout_ms: timeout,
            token_for: Some(fetch),
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
                self.in_flight.push(InFlight { callout, fetch });
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

#[cfg(test)]
mod tests {
    //! The coordinator across several VMs of one Envoy (`testing::World`):
    //! one fetch per credential, leases taken over when their VM dies,
    //! compare-and-swap conflicts, identity endpoints that fail.

    use super::*;
    use crate::testing::{FakeHost, World};

    const CLIENT_ID: &str = "00000000-0000-0000-0000-0000000000c1";

    fn config(max_wait_ms: u64) -> Rc<Config> {
        let json = serde_json::json!({
            "upstreams": {
                "west": {
                    "endpoint": "https://acme-west.openai.azure.com", "cluster": "azure_west",
                    "auth": {"entra": {
                        "tenant_id": "contoso.onmicrosoft.com", "client_id": CLIENT_ID,
                        "client_secret": {"value": "client-secret-1"},
                        "token_cluster": "entra", "timeout_ms": 5000, "max_wait_ms": max_wait_ms
                    }}
                }
            },
            "models": {"gpt-4o": {"upstream": "west", "deployment": "gpt4o"}},
            "callers": [{"name": "a", "key_sha256": "0".repeat(64), "models": ["*"]}]
        });
        Rc::new(Config::from_json(json.to_string().as_bytes(), &|_| None).unwrap())
    }

    /// A VM: its host and its coordinator.
    struct Vm {
        host: FakeHost,
        tokens: Tokens,
    }

    impl Vm {
        fn new(world: &Rc<World>, config: &Rc<Config>, number: u32) -> Self {
            let mut host = FakeHost::new(world, number * 1000);
            let tokens = Tokens::new(config.clone(), u64::from(number) * 7919, &mut host);
            tokens.create_shared_entries(&host);
            Vm { host, tokens }
        }

        fn tick(&mut self) -> Vec<Settlement> {
            self.tokens.tick(&mut self.host)
        }

        fn lookup(&mut self) -> Lookup {
            self.tokens.lookup(&mut self.host, 0)
        }

        fn last_callout(&self) -> u32 {
            self.host.callouts.last().expect("a callout").id
        }

        fn answer(&mut self, callout: u32, status: Option<u16>, body: &str) -> Vec<Settlement> {
            let response = CalloutResponse {
                status,
                body: body.as_bytes().to_vec(),
            };
            self.tokens.on_response(&mut self.host, callout, &response)
        }
    }

    fn token_json(token: &str, expires_in: u64) -> String {
        format!(r#"{{"token_type":"Bearer","expires_in":{expires_in},"access_token":"{token}"}}"#)
    }

    fn ready(lookup: Lookup) -> Option<String> {
        match lookup {
            Lookup::Ready(token) => Some(token.expose().to_string()),
            _ => None,
        }
    }

    #[test]
    fn one_fetch_for_all_vms_and_every_vm_uses_the_token() {
        let world = World::new(1_000_000);
        let config = config(10_000);
        let mut a = Vm::new(&world, &config, 1);
        let mut b = Vm::new(&world, &config, 2);
        a.tick();
        b.tick();
        assert_eq!(a.host.callouts.len() + b.host.callouts.len(), 1);
        let sent = a.host.callouts[0].clone();
        assert_eq!(sent.cluster, "entra");
        assert_eq!(sent.timeout_ms, 5_000);
        assert!(sent
            .headers
            .contains(&(":authority".into(), "login.microsoftonline.com".into())));
        let body = String::from_utf8(sent.body.unwrap()).unwrap();
        assert!(body.contains("grant_type=client_credentials"), "{body}");
        // b sees the lease: it holds a request rather than fetching again.
        assert!(matches!(b.lookup(), Lookup::Hold));
        world.advance(300);
        assert!(a
            .answer(sent.id, Some(200), &token_json("tok-1", 3600))
            .is_empty());
        // b reads the token from shared data, with no fetch of its own.
        assert_eq!(ready(b.lookup()).as_deref(), Some("tok-1"));
        assert_eq!(ready(a.lookup()).as_deref(), Some("tok-1"));
        b.tick();
        assert!(b.host.callouts.is_empty());
        assert_eq!(world.stat("azure_openai_filter.token_fetches"), 1);
    }

    #[test]
    fn an_answer_is_applied_by_whichever_vm_takes_it() {
        // The native module hands an answer to any worker with a stream
        // open: the one that sent the fetch may carry no traffic any more.
        let world = World::new(1_000_000);
        let config = config(10_000);
        let mut a = Vm::new(&world, &config, 1);
        let mut b = Vm::new(&world, &config, 2);
        a.tick();
        let sent = a.host.callouts[0].clone();
        let fetch = sent.token_for.expect("a token fetch says what it is for");
        assert_eq!(
            fetch,
            TokenFetch {
                credential: 0,
                sent_at_ms: 1_000_000
            }
        );
        a.tokens.hold(&mut a.host, 9, 0, Vec::new());
        world.advance(300);
        let response = CalloutResponse {
            status: Some(200),
            body: token_json("tok-1", 100).into_bytes(),
        };
        assert!(b.tokens.on_answer(&mut b.host, fetch, &response).is_empty());
        assert!(b.host.logged("token for upstream `west` obtained"));
        assert_eq!(ready(b.lookup()).as_deref(), Some("tok-1"));
        // The sender's waiting request resumes at its next tick.
        world.advance(20);
        assert!(matches!(
            a.tick().as_slice(),
            [Settlement::Resume { context_id: 9, .. }]
        ));
        // The lifetime counts from the sending: refreshed by 60 s after it.
        world.advance(60_000 - 320);
        a.tick();
        assert_eq!(a.host.callouts.len(), 2, "the refresh");
        // The sender's record of the first fetch went with the new one: the
        // first answer, were it to come by its callout id, changes nothing.
        assert_eq!(a.tokens.in_flight.len(), 1);
        a.answer(sent.id, Some(200), &token_json("tok-stale", 100));
        assert_eq!(ready(a.lookup()).as_deref(), Some("tok-1"));
        assert_eq!(world.stat("azure_openai_filter.token_fetches"), 2);
    }

    #[test]
    fn a_request_held_on_one_vm_resumes_when_another_vm_fetches() {
        let world = World::new(1_000_000);
        let config = config(10_000);
        let mut a = Vm::new(&world, &config, 1);
        let mut b = Vm::new(&world, &config, 2);
        a.tick(); // a holds the lease
        assert!(matches!(b.lookup(), Lookup::Hold));
        b.tokens.hold(
            &mut b.host,
            42,
            0,
            vec![HeaderEdit::Remove("api-key".into())],
        );
        assert!(b.tick().is_empty());
        let id = a.last_callout();
        a.answer(id, Some(200), &token_json("tok-1", 3600));
        world.advance(20);
        let settled = b.tick();
        match settled.as_slice() {
            [Settlement::Resume {
                context_id: 42,
                edits,
            }] => {
                assert_eq!(edits.len(), 2);
                assert!(matches!(
                    edits.last(),
                    Some(HeaderEdit::Set(name, value))
                        if name == "authorization" && value.as_ref() == b"Bearer tok-1"
                ));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            world.stat("azure_openai_filter.requests_waiting_for_token"),
            0
        );
        assert_eq!(world.stat("azure_openai_filter.requests_held_for_token"), 1);
    }

    #[test]
    fn a_lease_left_by_a_vm_that_died_is_taken_over() {
        let world = World::new(1_000_000);
        let config = config(30_000);
        let mut a = Vm::new(&world, &config, 1);
        let mut b = Vm::new(&world, &config, 2);
        a.tick(); // a takes the lease, then never answers (its VM died)
        world.advance(5_000 + 2_000 - 1);
        b.tick();
        assert!(b.host.callouts.is_empty(), "the lease still holds");
        world.advance(1);
        b.tick();
        assert_eq!(b.host.callouts.len(), 1, "b takes over");
        let id = b.last_callout();
        b.answer(id, Some(200), &token_json("tok-b", 3600));
        assert_eq!(ready(a.lookup()).as_deref(), Some("tok-b"));
        // The first VM's answer, should it come late after all, is one more
        // good token: both VMs go on with a usable one.
        let late = a.last_callout();
        a.answer(late, Some(200), &token_json("tok-late", 3600));
        assert_eq!(ready(a.lookup()).as_deref(), Some("tok-late"));
        assert!(ready(b.lookup()).is_some());
    }

    #[test]
    fn compare_and_swap_conflicts_are_retried() {
        let world = World::new(1_000_000);
        let config = config(10_000);
        let mut a = Vm::new(&world, &config, 1);
        world.conflicts_to_inject.set(CAS_ATTEMPTS - 1);
        a.tick();
        assert_eq!(
            a.host.callouts.len(),
            1,
            "the lease is taken on the last attempt"
        );
        // With every attempt in conflict, the VM backs off instead of
        // fetching without a lease.
        let mut b = Vm::new(&world, &config, 2);
        world.advance(10_000);
        world.conflicts_to_inject.set(CAS_ATTEMPTS);
        b.tick();
        assert!(b.host.callouts.is_empty());
    }

    #[test]
    fn only_one_vm_wins_a_race_for_the_lease() {
        let world = World::new(1_000_000);
        let config = config(10_000);
        let mut vms: Vec<Vm> = (1..=4).map(|n| Vm::new(&world, &config, n)).collect();
        // Every VM reads the shared state before any writes (their ticks
        // interleave): each sees no lease, but compare-and-swap lets one win.
        for vm in &mut vms {
            vm.tokens.read_shared(&vm.host, 0);
        }
        for vm in &mut vms {
            vm.tick();
        }
        let fetches: usize = vms.iter().map(|vm| vm.host.callouts.len()).sum();
        assert_eq!(fetches, 1);
    }

    #[test]
    fn an_unknown_token_cluster_backs_off_and_answers_waiters_with_the_reason() {
        let world = World::new(1_000_000);
        let config = config(2_000);
        let mut a = Vm::new(&world, &config, 1);
        a.host.refuse_callouts = Some(CalloutError::UnknownCluster);
        a.tick();
        assert!(a.host.logged("Envoy has no cluster `entra`"));
        assert!(
            matches!(a.lookup(), Lookup::Hold),
            "a retry comes within the wait"
        );
        a.tokens.hold(&mut a.host, 7, 0, Vec::new());
        let mut attempts = 1;
        let mut failed = Vec::new();
        for _ in 0..150 {
            world.advance(20);
            let before = world.stat("azure_openai_filter.token_fetches");
            failed.extend(a.tick());
            attempts += (world.stat("azure_openai_filter.token_fetches") - before) as usize;
        }
        // 3 s of a missing cluster: a few attempts, not one per tick.
        assert!((2..=5).contains(&attempts), "{attempts}");
        match failed.as_slice() {
            [Settlement::Fail {
                context_id: 7,
                error,
            }] => {
                assert_eq!((error.status, error.code), (503, "token_unavailable"));
                assert!(
                    error.message.contains("no cluster `entra`"),
                    "{}",
                    error.message
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_failing_endpoint_keeps_the_token_while_it_is_usable_then_recovers() {
        let world = World::new(1_000_000);
        let config = config(10_000);
        let mut a = Vm::new(&world, &config, 1);
        let mut b = Vm::new(&world, &config, 2);
        a.tick();
        let id = a.last_callout();
        a.answer(id, Some(200), &token_json("tok-1", 100));
        // Past 60% of its life the token is refreshed; the refresh fails.
        world.advance(61_000);
        a.tick();
        b.tick();
        let refreshes: Vec<u32> = a
            .host
            .callouts
            .iter()
            .chain(&b.host.callouts)
            .map(|c| c.id)
            .filter(|&c| c != id)
            .collect();
        assert_eq!(refreshes.len(), 1, "one refresh for both VMs");
        let (vm, callout) = if a.host.callouts.len() == 2 {
            (&mut a, refreshes[0])
        } else {
            (&mut b, refreshes[0])
        };
        vm.answer(
            callout,
            Some(401),
            r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret.","error_codes":[7000215]}"#,
        );
        assert!(vm.host.logged("still using the current token"));
        assert!(vm.host.logged("AADSTS7000215"));
        assert!(!vm.host.logged("client-secret-1"));
        assert_eq!(ready(a.lookup()).as_deref(), Some("tok-1"));
        assert_eq!(ready(b.lookup()).as_deref(), Some("tok-1"));
        // The connection closing mid-answer is one more failure, then a success.
        world.advance(1_000);
        a.tick();
        b.tick();
        let third = a
            .host
            .callouts
            .iter()
            .chain(&b.host.callouts)
            .map(|c| c.id)
            .max()
            .unwrap();
        let owner = if a.host.callouts.iter().any(|c| c.id == third) {
            &mut a
        } else {
            &mut b
        };
        owner.answer(third, None, "");
        world.advance(2_000);
        a.tick();
        b.tick();
        let fourth = a
            .host
            .callouts
            .iter()
            .chain(&b.host.callouts)
            .map(|c| c.id)
            .max()
            .unwrap();
        assert_ne!(fourth, third);
        let owner = if a.host.callouts.iter().any(|c| c.id == fourth) {
            &mut a
        } else {
            &mut b
        };
        owner.answer(fourth, Some(200), &token_json("tok-2", 3600));
        // Each VM picks the new token up on its next tick.
        a.tick();
        b.tick();
        assert_eq!(ready(a.lookup()).as_deref(), Some("tok-2"));
        assert_eq!(ready(b.lookup()).as_deref(), Some("tok-2"));
    }

    #[test]
    fn a_request_that_cannot_get_a_token_in_time_gives_up_at_once() {
        let world = World::new(1_000_000);
        let config = config(0);
        let mut a = Vm::new(&world, &config, 1);
        match a.lookup() {
            Lookup::GiveUp(error) => assert_eq!(error.code, "token_unavailable"),
            _ => panic!("no waiting allowed"),
        }
        assert_eq!(
            world.stat("azure_openai_filter.requests_token_unavailable"),
            1
        );
    }

    #[test]
    fn released_waiters_are_not_settled() {
        let world = World::new(1_000_000);
        let config = config(10_000);
        let mut a = Vm::new(&world, &config, 1);
        a.tick();
        a.tokens.hold(&mut a.host, 9, 0, Vec::new());
        a.tokens.release(&mut a.host, 9);
        let id = a.last_callout();
        assert!(a.answer(id, Some(200), &token_json("t", 60)).is_empty());
        assert_eq!(
            world.stat("azure_openai_filter.requests_waiting_for_token"),
            0
        );
    }
}
