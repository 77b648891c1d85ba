//! The workers' token fetches, sent from the main thread.
//!
//! In Wasm they leave from the VM's root context, which lives as long as
//! the VM. A dynamic-module HTTP filter can send a callout only from a
//! stream (and Envoy cancels it when that stream ends, which for a token
//! fetch started by a short request is often before the answer) or from
//! the filter configuration, on the main thread. So a worker thread queues
//! the fetch here and wakes the main thread with the configuration's
//! scheduler; the main thread sends it; its answer goes into the
//! configuration's [`Inbox`], and every worker with a live stream has that
//! stream woken (its scheduler) to take it. Whichever worker takes it
//! applies it (`Tokens::on_answer`): the answer is a fact about the
//! credential, written to the state every worker reads, so a worker that
//! sent a fetch and then carried no more traffic does not keep the token
//! (or the failure) from the others. With no stream open on any worker,
//! the answer waits for the next stream's first hook.
//!
//! Whether Envoy has the cluster is learnt only on the main thread: a
//! fetch to a missing cluster is answered as unanswered, the cluster is
//! remembered, and later fetches to it fail at once as "unknown cluster"
//! (as in Wasm, where that is known when the fetch is sent).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use super::abi::{self, ConfigPtr, ConfigSchedulerPtr, LogLevel, SchedulerPtr};
use crate::host_api::{CalloutResponse, TokenFetch};
use crate::token::MAX_TOKEN_RESPONSE_BYTES;

/// The event id that wakes a stream for the token answers that came.
pub const INBOX_EVENT: u64 = 2;

/// Token answers for the workers of one filter configuration.
#[derive(Default)]
pub struct Inbox {
    /// Fetches sent whose answers no worker has taken yet.
    expected: AtomicUsize,
    waiting: AtomicUsize,
    answers: Mutex<Vec<(TokenFetch, CalloutResponse)>>,
    /// At most one live stream's scheduler per worker (by `Vm::key`).
    wakers: Mutex<Vec<(u64, usize)>>,
}

impl Inbox {
    fn deliver(&self, fetch: TokenFetch, response: CalloutResponse) {
        self.answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((fetch, response));
        self.waiting.fetch_add(1, Ordering::AcqRel);
        // Every worker that can is woken: the first takes the answer, the
        // others find nothing (a stream may end before its event runs).
        let wakers = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
        for (_, scheduler) in wakers.iter() {
            // Under the lock: the scheduler is not deleted meanwhile.
            abi::scheduler_commit(*scheduler as SchedulerPtr, INBOX_EVENT);
        }
    }

    /// The answers that came (cheap when none did).
    pub fn take(&self) -> Vec<(TokenFetch, CalloutResponse)> {
        if self.waiting.load(Ordering::Acquire) == 0 {
            return Vec::new();
        }
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        self.waiting.store(0, Ordering::Release);
        let taken = std::mem::take(&mut *answers);
        let _ = self
            .expected
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(taken.len()))
            });
        taken
    }

    /// Whether worker `worker` should offer a stream's scheduler: an answer
    /// is expected and it has none registered (cheap when none is).
    pub fn wants_waker(&self, worker: u64) -> bool {
        self.expected.load(Ordering::Acquire) > 0
            && !self
                .wakers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|(w, _)| *w == worker)
    }

    /// Makes `scheduler` worker `worker`'s one woken, unless another is.
    pub fn set_waker(&self, worker: u64, scheduler: SchedulerPtr) {
        let mut wakers = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
        if !wakers.iter().any(|(w, _)| *w == worker) {
            wakers.push((worker, scheduler as usize));
        }
    }

    /// Before `scheduler` is deleted.
    pub fn forget_waker(&self, worker: u64, scheduler: SchedulerPtr) {
        self.wakers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|entry| *entry != (worker, scheduler as usize));
    }
}

/// One fetch for the main thread to send.
pub struct Job {
    pub fetch: TokenFetch,
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    pub timeout_ms: u64,
}

#[derive(Default)]
struct Queue {
    jobs: Vec<Job>,
    in_flight: HashMap<u64, TokenFetch>,
}

/// A filter configuration's way to the main thread.
pub struct MainThread {
    /// Envoy's configuration object (valid until `config_destroy`).
    envoy: usize,
    /// Its scheduler onto the main thread (0 once destroyed).
    scheduler: Mutex<usize>,
    queue: Mutex<Queue>,
    /// Where the answers go, for every worker.
    pub inbox: Inbox,
}

fn missing_clusters() -> &'static Mutex<HashSet<String>> {
    static MISSING: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    MISSING.get_or_init(|| Mutex::new(HashSet::new()))
}

/// Whether a fetch to `cluster` already found that Envoy has no such
/// cluster.
pub fn known_missing(cluster: &str) -> bool {
    missing_clusters()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(cluster)
}

impl MainThread {
    /// On the main thread, in `config_new`.
    pub fn new(config: ConfigPtr) -> Self {
        MainThread {
            envoy: config as usize,
            scheduler: Mutex::new(abi::config_scheduler_new(config) as usize),
            queue: Mutex::new(Queue::default()),
            inbox: Inbox::default(),
        }
    }

    /// From a worker thread: queues a fetch and wakes the main thread.
    /// False when the configuration is gone.
    pub fn send(&self, job: Job) -> bool {
        let scheduler = self.scheduler.lock().unwrap_or_else(|e| e.into_inner());
        if *scheduler == 0 {
            return false;
        }
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .jobs
            .push(job);
        self.inbox.expected.fetch_add(1, Ordering::AcqRel);
        abi::config_scheduler_commit(*scheduler as ConfigSchedulerPtr, 0);
        true
    }

    /// On the main thread: sends the queued fetches.
    pub fn on_scheduled(&self) {
        let jobs = std::mem::take(&mut self.queue.lock().unwrap_or_else(|e| e.into_inner()).jobs);
        for job in jobs {
            // No lock held: Envoy may answer a failed send at once.
            let sent = abi::config_http_callout(
                self.envoy as ConfigPtr,
                &job.cluster,
                &job.headers,
                job.body.as_deref(),
                job.timeout_ms,
            );
            match sent {
                Ok(envoy_id) => {
                    self.queue
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .in_flight
                        .insert(envoy_id, job.fetch);
                }
                Err(code) => {
                    if code == abi::CALLOUT_CLUSTER_NOT_FOUND {
                        abi::log(
                            LogLevel::Error,
                            &format!(
                                "azure-openai-filter: Envoy has no cluster `{}` for the identity endpoint",
                                job.cluster
                            ),
                        );
                        missing_clusters()
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(job.cluster.clone());
                    }
                    self.inbox.deliver(
                        job.fetch,
                        CalloutResponse {
                            status: None,
                            body: Vec::new(),
                        },
                    );
                }
            }
        }
    }

    /// On the main thread: a fetch came back (`status` None: no answer).
    pub fn on_done(&self, envoy_id: u64, status: Option<u16>, mut body: Vec<u8>) {
        let entry = self
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .in_flight
            .remove(&envoy_id);
        let Some(fetch) = entry else {
            return;
        };
        body.truncate(MAX_TOKEN_RESPONSE_BYTES);
        if status.is_none() {
            body.clear();
        }
        self.inbox.deliver(fetch, CalloutResponse { status, body });
    }

    /// Whether Envoy destroyed the configuration (`shutdown` ran).
    pub fn is_shut_down(&self) -> bool {
        *self.scheduler.lock().unwrap_or_else(|e| e.into_inner()) == 0
    }

    /// On the main thread, in `config_destroy`.
    pub fn shutdown(&self) {
        let mut scheduler = self.scheduler.lock().unwrap_or_else(|e| e.into_inner());
        if *scheduler != 0 {
            abi::config_scheduler_delete(*scheduler as ConfigSchedulerPtr);
            *scheduler = 0;
        }
    }
}
