//! The worker's own callouts (token fetches), sent from the main thread.
//!
//! In Wasm they leave from the VM's root context, which lives as long as
//! the VM. A dynamic-module HTTP filter can send a callout only from a
//! stream (and Envoy cancels it when that stream ends, which for a token
//! fetch started by a short request is often before the answer) or from
//! the filter configuration, on the main thread. So a worker thread queues
//! the fetch here and wakes the main thread with the configuration's
//! scheduler; the main thread sends it; its answer goes into the worker's
//! [`Inbox`], and a live stream of that worker is woken (its scheduler) to
//! hand it to the worker. With no stream open on the worker, the answer
//! waits for the next stream's first hook.
//!
//! Whether Envoy has the cluster is learnt only on the main thread: a
//! fetch to a missing cluster is answered as unanswered, the cluster is
//! remembered, and later fetches to it fail at once as "unknown cluster"
//! (as in Wasm, where that is known when the fetch is sent).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::abi::{self, ConfigPtr, ConfigSchedulerPtr, LogLevel, SchedulerPtr};
use crate::host_api::CalloutResponse;
use crate::token::MAX_TOKEN_RESPONSE_BYTES;

/// The event id that wakes a stream for its worker's callout answers.
pub const INBOX_EVENT: u64 = 2;

/// Callout answers for one worker thread's VM.
#[derive(Default)]
pub struct Inbox {
    waiting: AtomicUsize,
    answers: Mutex<Vec<(u32, CalloutResponse)>>,
    /// The scheduler of a live stream of that worker (0: none).
    waker: Mutex<usize>,
}

impl Inbox {
    fn deliver(&self, id: u32, response: CalloutResponse) {
        self.answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, response));
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let waker = self.waker.lock().unwrap_or_else(|e| e.into_inner());
        if *waker != 0 {
            // Under the lock: the scheduler is not deleted meanwhile.
            abi::scheduler_commit(*waker as SchedulerPtr, INBOX_EVENT);
        }
    }

    /// The answers that came (cheap when none did).
    pub fn take(&self) -> Vec<(u32, CalloutResponse)> {
        if self.waiting.load(Ordering::Acquire) == 0 {
            return Vec::new();
        }
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        self.waiting.store(0, Ordering::Release);
        std::mem::take(&mut *answers)
    }

    /// Makes `scheduler` the one woken, unless another is.
    pub fn set_waker(&self, scheduler: SchedulerPtr) {
        let mut waker = self.waker.lock().unwrap_or_else(|e| e.into_inner());
        if *waker == 0 {
            *waker = scheduler as usize;
        }
    }

    /// Before `scheduler` is deleted.
    pub fn forget_waker(&self, scheduler: SchedulerPtr) {
        let mut waker = self.waker.lock().unwrap_or_else(|e| e.into_inner());
        if *waker == scheduler as usize {
            *waker = 0;
        }
    }
}

/// One fetch for the main thread to send.
pub struct Job {
    pub inbox: Arc<Inbox>,
    pub id: u32,
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    pub timeout_ms: u64,
}

#[derive(Default)]
struct Queue {
    jobs: Vec<Job>,
    in_flight: HashMap<u64, (Arc<Inbox>, u32)>,
}

/// A filter configuration's way to the main thread.
pub struct MainThread {
    /// Envoy's configuration object (valid until `config_destroy`).
    envoy: usize,
    /// Its scheduler onto the main thread (0 once destroyed).
    scheduler: Mutex<usize>,
    queue: Mutex<Queue>,
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
        }
    }

    /// From a worker thread: queues a fetch and wakes the main thread.
    /// False when the configuration is gone.
    pub fn send(&self, job: Job) -> bool {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .jobs
            .push(job);
        let scheduler = self.scheduler.lock().unwrap_or_else(|e| e.into_inner());
        if *scheduler == 0 {
            return false;
        }
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
                        .insert(envoy_id, (job.inbox, job.id));
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
                    job.inbox.deliver(
                        job.id,
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
        let Some((inbox, id)) = entry else {
            return;
        };
        body.truncate(MAX_TOKEN_RESPONSE_BYTES);
        if status.is_none() {
            body.clear();
        }
        inbox.deliver(id, CalloutResponse { status, body });
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
