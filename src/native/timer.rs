//! Delayed wake-ups onto a worker thread.
//!
//! The dynamic-module ABI has no timer for HTTP filters (Wasm roots have
//! `proxy_set_tick_period_milliseconds`). It has a scheduler per filter,
//! which posts an event to that filter on its worker thread and may be
//! committed from any thread. So one background thread of the module keeps
//! the due wake-ups and commits each filter's scheduler when it is due; the
//! filter's `on_http_filter_scheduled` then runs the worker's tick.
//!
//! A scheduler is deleted only under the same lock the thread commits
//! under ([`forget`] before `scheduler_delete`), so the thread never
//! commits a deleted scheduler; a committed event for a filter that is gone
//! meanwhile is dropped by Envoy.

use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::abi::{self, SchedulerPtr};

/// The event id of a tick.
pub const TICK_EVENT: u64 = 1;

struct Entry {
    due: Instant,
    /// The scheduler's address (a pointer is not `Send`).
    scheduler: usize,
}

#[derive(Default)]
struct Queue {
    entries: Vec<Entry>,
    started: bool,
}

struct Timer {
    queue: Mutex<Queue>,
    changed: Condvar,
}

fn timer() -> &'static Timer {
    static TIMER: OnceLock<Timer> = OnceLock::new();
    TIMER.get_or_init(|| Timer {
        queue: Mutex::new(Queue::default()),
        changed: Condvar::new(),
    })
}

/// Commits `scheduler` with [`TICK_EVENT`] in `delay` (once; an earlier
/// pending wake-up of the same scheduler is kept if it is sooner).
pub fn wake_after(scheduler: SchedulerPtr, delay: Duration) {
    let timer = timer();
    let mut queue = timer.queue.lock().unwrap_or_else(|e| e.into_inner());
    let due = Instant::now() + delay;
    let address = scheduler as usize;
    match queue.entries.iter_mut().find(|e| e.scheduler == address) {
        Some(entry) => entry.due = entry.due.min(due),
        None => queue.entries.push(Entry {
            due,
            scheduler: address,
        }),
    }
    if !queue.started {
        // Without the thread there are no timed ticks, only ticks run by
        // traffic; that is logged, not fatal.
        let spawned = std::thread::Builder::new()
            .name("azure-openai-timer".into())
            .spawn(run);
        match spawned {
            Ok(_) => queue.started = true,
            Err(_) => abi::log(
                abi::LogLevel::Error,
                "azure-openai-filter: could not start the timer thread",
            ),
        }
    }
    timer.changed.notify_one();
}

/// Drops the pending wake-ups of a scheduler about to be deleted.
pub fn forget(scheduler: SchedulerPtr) {
    let address = scheduler as usize;
    let mut queue = timer().queue.lock().unwrap_or_else(|e| e.into_inner());
    queue.entries.retain(|e| e.scheduler != address);
}

fn run() {
    let timer = timer();
    let mut queue = timer.queue.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        queue.entries.retain(|entry| {
            if entry.due <= now {
                // Under the lock: the scheduler is not deleted meanwhile.
                abi::scheduler_commit(entry.scheduler as SchedulerPtr, TICK_EVENT);
                false
            } else {
                next = Some(next.map_or(entry.due, |n| n.min(entry.due)));
                true
            }
        });
        let wait = next.map_or(Duration::from_secs(3600), |n| {
            n.saturating_duration_since(now)
        });
        queue = match timer.changed.wait_timeout(queue, wait) {
            Ok((guard, _)) => guard,
            Err(poisoned) => poisoned.into_inner().0,
        };
    }
}
