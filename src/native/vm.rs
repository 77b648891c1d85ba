//! What Wasm keeps per VM, kept per worker thread: in Wasm every Envoy
//! worker has its own VM with its own [`Worker`]; a native module is one
//! copy shared by every thread, so each worker thread builds its own
//! [`Vm`] (thread-local, per filter configuration) the first time a stream
//! of that configuration reaches it. State shared across workers goes
//! through `shared` (process memory), as Envoy shared data does in Wasm.
//!
//! [`NativeHost`] and [`NativeStream`] are the seam's traits (`host_api`)
//! on the dynamic-module ABI.

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::abi::{self, Body, FilterPtr, HeaderMap, LogLevel, Move};
use super::callouts::{self, Job, MainThread};
use super::metrics::{self, Stat, WorkerStats, FAMILIES};
use super::{shared, timer};
use crate::config::Config;
use crate::headers;
use crate::host_api::{Callout, CalloutError, Host, HostError, Level, MetricKind, Stream, Write};
use crate::worker::{carry_out, Chore, Worker};

/// A tick period this short means requests wait (for a token: 20 ms), so
/// the worker is woken by the timer while they do; longer periods (metrics,
/// token refresh, pools) are served by the ticks traffic runs.
const TIMED_TICK_BELOW_MS: u32 = 100;

/// One filter configuration, as loaded on the main thread: read-only, seen
/// by every worker thread.
pub struct FilterConfig {
    /// Tells the configurations apart in the thread-local maps.
    pub id: u64,
    /// The configuration JSON, parsed again by each worker thread (the
    /// parsed `Config` is `Rc`-based, one per worker, as in Wasm).
    pub json: Vec<u8>,
    /// Envoy's id of each stat family (`metrics::FAMILIES`), defined at load.
    pub stat_ids: Vec<Option<usize>>,
    /// Where the workers' token fetches are sent from.
    pub main: MainThread,
}

/// Who sent a callout: the worker (a token fetch) or a request (failover).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Root,
    Request,
}

#[derive(Default)]
pub struct VmState {
    next_context: u32,
    /// Live streams of this worker by context id: their Envoy filter, and
    /// their scheduler once they have one.
    pub filters: HashMap<u32, FilterPtr>,
    /// Requests' callouts in flight by (stream, Envoy's callout id): the
    /// logic's id.
    pub callouts: HashMap<(u32, u64), u32>,
    next_callout: u32,
    pub tick_period_ms: u32,
    pub last_tick_ms: u64,
    pub last_flush_ms: u64,
    /// Somebody asked for a tick as soon as possible.
    pub wake: bool,
    stats: WorkerStats,
    /// Chores for a stream whose chain callback was running when they were
    /// decided: carried out from its scheduler.
    pub deferred: Vec<Chore>,
    /// Stat moves made when no stream was at hand (applied with the next).
    pending: Vec<(u32, Move)>,
}

pub struct Vm {
    pub config: Arc<FilterConfig>,
    pub worker: OnceCell<Rc<Worker>>,
    pub state: RefCell<VmState>,
    /// Set once the configuration failed to parse on this thread.
    pub broken: Cell<bool>,
    /// The stream whose chain callback (headers, body, trailers) is running
    /// (0: none).
    pub in_chain: Cell<u32>,
    /// Tells the workers' VMs apart (the token inbox's wakers).
    pub key: u64,
}

thread_local! {
    static VMS: RefCell<HashMap<u64, Rc<Vm>>> = RefCell::new(HashMap::new());
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// This thread's VM for a configuration, made (with its worker) on first
/// use, with `filter` as the stream that carries the worker's first calls.
pub fn vm_for(config: &Arc<FilterConfig>, filter: FilterPtr) -> Rc<Vm> {
    let existing = VMS.with(|vms| vms.borrow().get(&config.id).cloned());
    if let Some(vm) = existing {
        return vm;
    }
    let vm = Rc::new(Vm {
        config: Arc::clone(config),
        worker: OnceCell::new(),
        state: RefCell::new(VmState {
            next_context: 1,
            next_callout: 1,
            tick_period_ms: crate::worker::METRICS_TICK_MS,
            ..VmState::default()
        }),
        broken: Cell::new(false),
        in_chain: Cell::new(0),
        key: next_vm_key(),
    });
    let released = VMS.with(|vms| {
        let mut vms = vms.borrow_mut();
        // A new configuration on this thread (a reload, usually): forget the
        // VMs of those Envoy destroyed. Envoy destroys one only after its
        // last stream, so none of theirs is left on this worker.
        let before = vms.len();
        vms.retain(|_, vm| !vm.config.main.is_shut_down());
        let released = before - vms.len();
        vms.insert(config.id, Rc::clone(&vm));
        released
    });
    if released > 0 {
        abi::log(
            LogLevel::Debug,
            &format!(
                "azure-openai-filter: worker state of {released} replaced configuration(s) released"
            ),
        );
    }
    match Config::from_json(&config.json, &|name| std::env::var(name).ok()) {
        Ok(parsed) => {
            let mut host = NativeHost::root(&vm, 0, filter);
            let thread_seed = std::thread::current().id();
            let seed = now_ms() ^ hash_of(&thread_seed);
            let worker = Rc::new(Worker::new(Rc::new(parsed), seed, &mut host));
            let _ = vm.worker.set(worker);
        }
        Err(error) => {
            vm.broken.set(true);
            abi::log(
                LogLevel::Error,
                &format!("azure-openai-filter: configuration refused on a worker: {error}"),
            );
        }
    }
    vm
}

fn next_vm_key() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn hash_of(value: &impl std::hash::Hash) -> u64 {
    use std::hash::{DefaultHasher, Hasher};
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// Forgets this thread's VM of a configuration Envoy destroyed.
pub fn drop_vm(config_id: u64) {
    // Called from the main thread: only its own map can be reached; a
    // worker forgets its VM when its next new configuration arrives
    // (`vm_for`).
    VMS.with(|vms| vms.borrow_mut().remove(&config_id));
}

impl Vm {
    pub fn worker(&self) -> Option<Rc<Worker>> {
        self.worker.get().cloned()
    }

    pub fn register(&self, filter: FilterPtr) -> u32 {
        let mut state = self.state.borrow_mut();
        let id = state.next_context;
        state.next_context = state.next_context.wrapping_add(1).max(1);
        state.filters.insert(id, filter);
        id
    }

    pub fn unregister(&self, context_id: u32) {
        let mut state = self.state.borrow_mut();
        state.filters.remove(&context_id);
        state
            .callouts
            .retain(|(carrier, _), _| *carrier != context_id);
        state.deferred.retain(|c| c.context_id() != context_id);
    }

    pub fn filter_of(&self, context_id: u32) -> Option<FilterPtr> {
        self.state.borrow().filters.get(&context_id).copied()
    }

    /// Whether the worker's tick is due.
    pub fn tick_due(&self, now: u64) -> bool {
        let state = self.state.borrow();
        state.wake
            || now
                >= state
                    .last_tick_ms
                    .saturating_add(u64::from(state.tick_period_ms))
    }

    /// The worker's tick, carried by the stream `carrier` (its callouts go
    /// out on that stream), then the chores it decided.
    pub fn tick(&self, carrier_id: u32, carrier: FilterPtr) {
        let Some(worker) = self.worker() else {
            return;
        };
        {
            let mut state = self.state.borrow_mut();
            state.last_tick_ms = now_ms();
            state.wake = false;
        }
        let mut host = NativeHost::root(self, carrier_id, carrier);
        let chores = worker.on_tick(&mut host);
        self.carry_out(chores);
        worker.schedule_tick(&mut NativeHost::root(self, carrier_id, carrier));
    }

    /// Carries out chores on their streams, with nothing borrowed: resuming
    /// a stream may call back into this module at once.
    pub fn carry_out(&self, chores: Vec<Chore>) {
        for chore in chores {
            if chore.context_id() == self.in_chain.get() {
                self.state.borrow_mut().deferred.push(chore);
                continue;
            }
            let Some(filter) = self.filter_of(chore.context_id()) else {
                continue; // the request is gone
            };
            let host = NativeHost::request(self, chore.context_id(), filter);
            carry_out(&host, &mut NativeStream::outside_body(filter), chore);
        }
    }

    /// Hands the worker the token answers that came (to a fetch of any
    /// worker: see `callouts`), carried by the stream `carrier`.
    pub fn receive(&self, carrier_id: u32, carrier: FilterPtr) {
        let answers = self.config.main.inbox.take();
        if answers.is_empty() {
            return;
        }
        let Some(worker) = self.worker() else {
            return; // a configuration this worker refused: no tokens to keep
        };
        for (fetch, mut response) in answers {
            response.body.truncate(worker.callout_body_limit());
            let mut host = NativeHost::root(self, carrier_id, carrier);
            let chores = worker.on_token_answer(&mut host, fetch, &response);
            self.carry_out(chores);
        }
        worker.schedule_tick(&mut NativeHost::root(self, carrier_id, carrier));
    }

    pub fn take_deferred(&self) -> Vec<Chore> {
        std::mem::take(&mut self.state.borrow_mut().deferred)
    }

    /// What a finished request leaves to the tick (the pools' cooldowns,
    /// stats, tokens charged to callers' limits), done as it ends when the
    /// worker goes idle with it (no other stream open) or once a second
    /// under traffic: a worker may get no other chance before its next
    /// request, and per request it would cost much (Envoy resolves a
    /// labelled stat's name on every move), so under load it is done at
    /// the pace of Wasm's tick.
    pub fn flush(&self, carrier_id: u32, carrier: FilterPtr) {
        let Some(worker) = self.worker() else {
            return;
        };
        let now = now_ms();
        {
            let mut state = self.state.borrow_mut();
            let others = state.filters.keys().any(|id| *id != carrier_id);
            let due = now
                >= state
                    .last_flush_ms
                    .saturating_add(u64::from(crate::worker::METRICS_TICK_MS));
            if others && !due {
                return;
            }
            state.last_flush_ms = now;
        }
        let mut host = NativeHost::root(self, carrier_id, carrier);
        let config = &worker.config;
        if config.models.iter().any(|m| m.targets.len() > 1) {
            // The pools' part of the tick: what this request's answer did to
            // its target's cooldown shows in the cooling gauge at once.
            if let Ok(mut cooldowns) = worker.cooldowns.try_borrow_mut() {
                cooldowns.refresh(&host, config);
                if let Ok(mut recorder) = worker.metrics.try_borrow_mut() {
                    recorder.cooling(&cooldowns, now_ms(), config.targets.len());
                }
            }
        }
        if let Ok(mut charges) = worker.charges.try_borrow_mut() {
            for (caller, tokens) in std::mem::take(&mut *charges) {
                crate::limits::charge(&mut host, &worker.config, caller, tokens);
            }
        }
        if let Ok(mut recorder) = worker.metrics.try_borrow_mut() {
            recorder.flush(&mut host, &worker.config);
        };
    }

    /// Whether a timed tick is wanted while streams are open: requests wait
    /// (for a token), so the worker must look again soon.
    pub fn wants_timed_tick(&self) -> Option<Duration> {
        let state = self.state.borrow();
        (state.tick_period_ms < TIMED_TICK_BELOW_MS)
            .then(|| Duration::from_millis(u64::from(state.tick_period_ms.max(1))))
    }

    fn apply(&self, filter: FilterPtr, id: u32, how: Move) {
        let state = self.state.borrow();
        let Some(stat) = usize::try_from(id)
            .ok()
            .and_then(|i| state.stats.stats.get(i))
        else {
            return;
        };
        let Some(Some(envoy_id)) = self.config.stat_ids.get(stat.family) else {
            return;
        };
        let values: Vec<&str> = stat.values.iter().map(String::as_str).collect();
        let _ = abi::record_metric(filter, *envoy_id, &values, how);
    }

    fn record(&self, filter: FilterPtr, id: u32, how: Move) {
        if filter.is_null() {
            self.state.borrow_mut().pending.push((id, how));
            return;
        }
        let pending = std::mem::take(&mut self.state.borrow_mut().pending);
        for (id, how) in pending {
            self.apply(filter, id, how);
        }
        self.apply(filter, id, how);
    }
}

/// The seam's `Host` for one worker thread's VM, on behalf of the worker
/// (`Root`) or of a request, with the stream whose Envoy filter carries
/// what needs one (callouts, stats).
pub struct NativeHost<'a> {
    vm: &'a Vm,
    owner: Owner,
    carrier_id: u32,
    carrier: FilterPtr,
}

impl<'a> NativeHost<'a> {
    pub fn root(vm: &'a Vm, carrier_id: u32, carrier: FilterPtr) -> Self {
        NativeHost {
            vm,
            owner: Owner::Root,
            carrier_id,
            carrier,
        }
    }

    pub fn request(vm: &'a Vm, carrier_id: u32, carrier: FilterPtr) -> Self {
        NativeHost {
            vm,
            owner: Owner::Request,
            carrier_id,
            carrier,
        }
    }
}

pub fn log_level(level: Level) -> LogLevel {
    match level {
        Level::Debug => LogLevel::Debug,
        Level::Info => LogLevel::Info,
        Level::Warn => LogLevel::Warn,
        Level::Error => LogLevel::Error,
    }
}

impl Host for NativeHost<'_> {
    fn now_ms(&self) -> u64 {
        now_ms()
    }

    fn shared_get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, HostError> {
        Ok(shared::get(key))
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: u32) -> Write {
        shared::set(key, value, cas)
    }

    fn http_call(&mut self, callout: &Callout<'_>) -> Result<u32, CalloutError> {
        let id = {
            let mut state = self.vm.state.borrow_mut();
            let id = state.next_callout;
            state.next_callout = state.next_callout.wrapping_add(1).max(1);
            id
        };
        if self.owner == Owner::Root {
            // The worker's own, a token fetch: from the main thread, its
            // answer to whichever worker takes it first (see `callouts`).
            let Some(fetch) = callout.token_for else {
                return Err(CalloutError::NoHost); // the root sends nothing else
            };
            if callouts::known_missing(callout.cluster) {
                return Err(CalloutError::UnknownCluster);
            }
            let job = Job {
                fetch,
                cluster: callout.cluster.to_string(),
                headers: callout
                    .headers
                    .iter()
                    .map(|(n, v)| ((*n).to_string(), (*v).to_string()))
                    .collect(),
                body: callout.body.map(<[u8]>::to_vec),
                timeout_ms: callout.timeout_ms,
            };
            if !self.vm.config.main.send(job) {
                return Err(CalloutError::NoHost);
            }
            return Ok(id);
        }
        if self.carrier.is_null() {
            return Err(CalloutError::NoHost);
        }
        let sent = abi::http_callout(
            self.carrier,
            callout.cluster,
            callout.headers,
            callout.body,
            callout.timeout_ms,
        );
        match sent {
            Ok(envoy_id) => {
                self.vm
                    .state
                    .borrow_mut()
                    .callouts
                    .insert((self.carrier_id, envoy_id), id);
                Ok(id)
            }
            Err(abi::CALLOUT_CLUSTER_NOT_FOUND | abi::CALLOUT_MISSING_HEADERS) => {
                Err(CalloutError::UnknownCluster)
            }
            Err(_) => Err(CalloutError::NoHost),
        }
    }

    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Result<u32, HostError> {
        let mut state = self.vm.state.borrow_mut();
        if let Some(id) = state.stats.by_name.get(name) {
            return Ok(*id);
        }
        let parsed = metrics::parse(name).ok_or(HostError(2))?;
        let family = FAMILIES.get(parsed.family).ok_or(HostError(2))?;
        if family.gauge != (kind == MetricKind::Gauge) {
            return Err(HostError(2));
        }
        if !matches!(self.vm.config.stat_ids.get(parsed.family), Some(Some(_))) {
            return Err(HostError(10));
        }
        let stats: &mut WorkerStats = &mut state.stats;
        let id = u32::try_from(stats.stats.len()).map_err(|_| HostError(10))?;
        stats.stats.push(Stat {
            family: parsed.family,
            values: parsed.values.iter().map(|v| (*v).to_string()).collect(),
        });
        stats.by_name.insert(name.to_string(), id);
        Ok(id)
    }

    fn add_to_metric(&mut self, id: u32, delta: i64) {
        let gauge = {
            let state = self.vm.state.borrow();
            usize::try_from(id)
                .ok()
                .and_then(|i| state.stats.stats.get(i))
                .and_then(|s| FAMILIES.get(s.family))
                .is_some_and(|f| f.gauge)
        };
        let how = match (gauge, delta) {
            (_, 0) => return,
            (false, d) if d > 0 => Move::Count(d.unsigned_abs()),
            (false, _) => return, // a counter never goes down
            (true, d) if d > 0 => Move::GaugeUp(d.unsigned_abs()),
            (true, d) => Move::GaugeDown(d.unsigned_abs()),
        };
        self.vm.record(self.carrier, id, how);
    }

    fn set_metric(&mut self, id: u32, value: u64) {
        self.vm.record(self.carrier, id, Move::GaugeSet(value));
    }

    fn log_enabled(&self, level: Level) -> bool {
        abi::log_enabled(log_level(level))
    }

    fn log(&self, level: Level, message: &str) {
        abi::log(log_level(level), message);
    }

    fn set_tick_period_ms(&mut self, period: u32) {
        let mut state = self.vm.state.borrow_mut();
        state.tick_period_ms = period;
        if period <= 1 {
            state.wake = true;
        }
    }
}

/// Which body hook is running (the received body is readable only there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Outside,
    RequestBody,
    ResponseBody,
}

/// The seam's `Stream` for one Envoy filter (one stream).
///
/// Bodies: proxy-wasm shows a filter "the body so far" as one buffer; the
/// ABI shows what Envoy buffered for the filter and, during a body hook,
/// the piece just received. The stream reads them as one (buffered, then
/// received) and writes changes into the buffered body when there is one,
/// else into the received piece.
pub struct NativeStream {
    filter: FilterPtr,
    phase: Phase,
    /// Request headers changed: Envoy must choose the route again.
    rerouted: bool,
}

impl Drop for NativeStream {
    fn drop(&mut self) {
        if self.rerouted {
            // Once per hook, as Envoy does by itself for Wasm filters'
            // header changes: the cluster header picks the route.
            abi::clear_route_cache(self.filter);
        }
    }
}

impl NativeStream {
    pub fn new(filter: FilterPtr, phase: Phase) -> Self {
        NativeStream {
            filter,
            phase,
            rerouted: false,
        }
    }

    pub fn outside_body(filter: FilterPtr) -> Self {
        NativeStream::new(filter, Phase::Outside)
    }

    fn kinds(&self, request: bool) -> (Body, Option<Body>) {
        let (buffered, received, in_hook) = if request {
            (
                Body::BufferedRequest,
                Body::ReceivedRequest,
                self.phase == Phase::RequestBody,
            )
        } else {
            (
                Body::BufferedResponse,
                Body::ReceivedResponse,
                self.phase == Phase::ResponseBody,
            )
        };
        let received =
            (in_hook && !abi::received_is_buffered(self.filter, request)).then_some(received);
        (buffered, received)
    }

    /// The body so far, in pieces: buffered, then received.
    fn pieces(&self, request: bool) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let (buffered, received) = self.kinds(request);
        let first = abi::body_chunks(self.filter, buffered);
        let second = received.map_or_else(Vec::new, |r| abi::body_chunks(self.filter, r));
        (first, second)
    }

    fn read(&self, request: bool, start: usize, len: usize) -> Vec<u8> {
        let (first, second) = self.pieces(request);
        let mut out = Vec::new();
        let mut offset = 0usize;
        let end = start.saturating_add(len);
        for chunk in first.iter().chain(second.iter()) {
            let chunk_end = offset.saturating_add(chunk.len());
            if chunk_end > start && offset < end {
                let from = start.saturating_sub(offset);
                let to = end.min(chunk_end) - offset;
                if let Some(part) = chunk.get(from..to) {
                    out.extend_from_slice(part);
                }
            }
            offset = chunk_end;
            if offset >= end {
                break;
            }
        }
        out
    }

    /// The size of the body so far (buffered and received).
    pub fn body_len(&self, request: bool) -> usize {
        let (first, second) = self.pieces(request);
        first.iter().chain(second.iter()).map(Vec::len).sum()
    }

    /// Replaces `len` bytes from `start` with `with`: the whole body is
    /// rewritten into one place.
    fn replace(
        &self,
        request: bool,
        start: usize,
        len: usize,
        with: &[u8],
    ) -> Result<(), HostError> {
        let (buffered, received) = self.kinds(request);
        let (first, second) = self.pieces(request);
        let whole: Vec<u8> = first
            .iter()
            .chain(second.iter())
            .flatten()
            .copied()
            .collect();
        let start = start.min(whole.len());
        let end = start.saturating_add(len).min(whole.len());
        let mut new = Vec::with_capacity(whole.len() - (end - start) + with.len());
        new.extend_from_slice(whole.get(..start).unwrap_or_default());
        new.extend_from_slice(with);
        new.extend_from_slice(whole.get(end..).unwrap_or_default());
        let buffered_len: usize = first.iter().map(Vec::len).sum();
        let target = match received {
            Some(r) if buffered_len == 0 => r,
            _ => buffered,
        };
        if buffered_len > 0 && !abi::drain_body(self.filter, buffered, buffered_len) {
            return Err(HostError(2));
        }
        if let Some(r) = received {
            let received_len: usize = second.iter().map(Vec::len).sum();
            if received_len > 0 && !abi::drain_body(self.filter, r, received_len) {
                return Err(HostError(2));
            }
        }
        if new.is_empty() || abi::append_body(self.filter, target, &new) {
            Ok(())
        } else {
            Err(HostError(2))
        }
    }

    fn headers(&self, map: HeaderMap) -> Result<Vec<u8>, HostError> {
        let pairs = abi::headers(self.filter, map).ok_or(HostError(2))?;
        let refs: Vec<(&[u8], &[u8])> = pairs
            .iter()
            .map(|(n, v)| (n.as_slice(), v.as_slice()))
            .collect();
        Ok(headers::encode(&refs))
    }

    fn set(&mut self, map: HeaderMap, name: &str, value: Option<&[u8]>) -> Result<(), HostError> {
        if abi::set_header(self.filter, map, name, value) {
            if matches!(map, HeaderMap::Request) {
                self.rerouted = true;
            }
            Ok(())
        } else {
            Err(HostError(2))
        }
    }
}

impl Stream for NativeStream {
    fn request_headers(&mut self) -> Result<Vec<u8>, HostError> {
        self.headers(HeaderMap::Request)
    }

    fn set_request_header(&mut self, name: &str, value: &[u8]) -> Result<(), HostError> {
        self.set(HeaderMap::Request, name, Some(value))
    }

    fn remove_request_header(&mut self, name: &str) -> Result<(), HostError> {
        self.set(HeaderMap::Request, name, None)
    }

    fn request_body(&mut self, start: usize, len: usize) -> Result<Vec<u8>, HostError> {
        Ok(self.read(true, start, len))
    }

    fn request_body_len(&mut self) -> Result<usize, HostError> {
        Ok(self.body_len(true))
    }

    fn replace_request_body_prefix(&mut self, len: usize, with: &[u8]) -> Result<(), HostError> {
        self.replace(true, 0, len, with)
    }

    fn response_headers(&mut self) -> Result<Vec<u8>, HostError> {
        self.headers(HeaderMap::Response)
    }

    fn set_response_header(&mut self, name: &str, value: &[u8]) -> Result<(), HostError> {
        self.set(HeaderMap::Response, name, Some(value))
    }

    fn remove_response_header(&mut self, name: &str) -> Result<(), HostError> {
        self.set(HeaderMap::Response, name, None)
    }

    fn response_body(&mut self, start: usize, len: usize) -> Result<Vec<u8>, HostError> {
        Ok(self.read(false, start, len))
    }

    fn replace_response_body(
        &mut self,
        start: usize,
        len: usize,
        with: &[u8],
    ) -> Result<(), HostError> {
        self.replace(false, start, len, with)
    }

    fn send_reply(
        &mut self,
        status: u16,
        headers: &[(&[u8], &[u8])],
        body: &[u8],
    ) -> Result<(), HostError> {
        // The same response code details as the Wasm build: the shipped
        // `local_reply_config` leaves replies with them alone.
        abi::send_response(self.filter, status, headers, body, b"azure_openai_filter");
        Ok(())
    }

    fn resume_request(&mut self) -> Result<(), HostError> {
        if std::mem::take(&mut self.rerouted) {
            abi::clear_route_cache(self.filter);
        }
        abi::continue_decoding(self.filter);
        Ok(())
    }

    fn set_property(&mut self, name: &str, value: &[u8]) -> Result<(), HostError> {
        // Filter state under the Wasm build's key (`wasm.<name>`), so that
        // access-log and rate-limit configurations carry over.
        if abi::set_filter_state(self.filter, &format!("wasm.{name}"), value) {
            Ok(())
        } else {
            Err(HostError(2))
        }
    }
}

/// Arms a timed tick on `scheduler` when the VM wants one.
pub fn arm_timer(vm: &Vm, scheduler: abi::SchedulerPtr) {
    if let Some(delay) = vm.wants_timed_tick() {
        timer::wake_after(scheduler, delay);
    }
}
