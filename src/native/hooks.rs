//! The event hooks Envoy looks up in the module (`envoy_dynamic_module_on_*`,
//! signatures from the ABI header of Envoy 1.40.0), each handing its event
//! to the logic (`Exchange`, `Worker`) through this thread's [`Vm`].
//!
//! Every hook body runs inside `catch_unwind`: a panic is logged as
//! critical and, where a request is in hand, answered with a 500 OpenAI
//! error; it never unwinds into Envoy (which would abort the process).
//!
//! Envoy requires every HTTP filter hook below to exist (the streamed
//! callout and watermark ones included, which the filter does not use), or
//! it refuses the configuration; the per-route, local-reply and
//! configuration-level callout/scheduler hooks are optional and left out.
//!
//! Re-entrancy: a hook may cause Envoy to call back into the module at once
//! (a local reply passes through the same filter's response hooks; resuming
//! another stream runs that stream's hooks). A filter's `Exchange` sits in
//! a `RefCell`; a hook that finds it busy lets the event pass (`Continue`),
//! which is what the logic answers for its own replies anyway, and a
//! stream completed meanwhile is finished when the outer hook returns.
//! Chores for the stream whose chain callback is running are carried out
//! from its scheduler instead (resuming a stream inside its own callback is
//! not allowed).

use std::cell::{Cell, RefCell};
use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::null;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::abi::{self, EnvoyBuffer, EnvoyHeader, FilterPtr, LogLevel, SchedulerPtr};
use super::callouts::MainThread;
use super::metrics::FAMILIES;
use super::timer::{self, TICK_EVENT};
use super::vm::{self, now_ms, FilterConfig, NativeHost, NativeStream, Phase, Vm};
use crate::config::Config;
use crate::errors::ApiError;
use crate::exchange::Exchange;
use crate::headers;
use crate::host_api::{CalloutReply, Flow};

/// One stream's filter in the module.
struct Filter {
    vm: Rc<Vm>,
    id: u32,
    envoy: FilterPtr,
    exchange: RefCell<Exchange>,
    scheduler: Cell<SchedulerPtr>,
    completed: Cell<bool>,
    /// Envoy completed the stream while a hook of it was running.
    complete_pending: Cell<bool>,
}

impl Filter {
    fn scheduler(&self) -> SchedulerPtr {
        let mut scheduler = self.scheduler.get();
        if scheduler.is_null() {
            scheduler = abi::scheduler_new(self.envoy);
            self.scheduler.set(scheduler);
        }
        scheduler
    }

    /// Before a hook's logic: the worker's tick, when due (Wasm ticks on a
    /// timer; here traffic runs it, see `timer` for waits).
    fn before(&self) {
        self.vm.receive(self.id, self.envoy);
        if !self.vm.broken.get() && self.vm.tick_due(now_ms()) && !self.vm.state.borrow().wake {
            self.vm.tick(self.id, self.envoy);
        }
    }

    /// After a hook's logic: a completion that came meanwhile, a tick asked
    /// for at once (run from the scheduler, after the hook), chores
    /// deferred to this stream, a timed tick while requests wait.
    fn after(&self) {
        if self.complete_pending.get() {
            self.complete();
        }
        if self.completed.get() {
            return;
        }
        let (wake, deferred) = {
            let state = self.vm.state.borrow();
            (
                state.wake,
                state.deferred.iter().any(|c| c.context_id() == self.id),
            )
        };
        if wake || deferred {
            abi::scheduler_commit(self.scheduler(), TICK_EVENT);
        } else if self.vm.wants_timed_tick().is_some() {
            vm::arm_timer(&self.vm, self.scheduler());
        }
        let inbox = &self.vm.config.main.inbox;
        if inbox.wants_waker(self.vm.key) {
            // Woken when the main thread has a token answer.
            inbox.set_waker(self.vm.key, self.scheduler());
        }
    }

    /// The request's end, and what it leaves to the tick (stats, tokens
    /// charged to limits), flushed now.
    fn complete(&self) {
        self.complete_pending.set(false);
        if self.completed.get() {
            return;
        }
        let Ok(mut exchange) = self.exchange.try_borrow_mut() else {
            self.complete_pending.set(true);
            return;
        };
        self.completed.set(true);
        // (The access log's fields are set when the answer ends, in a hook
        // the filter is in anyway.)
        let mut host = NativeHost::request(&self.vm, self.id, self.envoy);
        exchange.on_done(&mut host);
        drop(exchange);
        self.vm.flush(self.id, self.envoy);
        self.vm.unregister(self.id);
    }

    /// Runs one chain callback's logic.
    fn chain<R>(
        &self,
        busy: R,
        phase: Phase,
        call: impl FnOnce(&mut Exchange, &mut NativeHost<'_>, &mut NativeStream) -> R,
    ) -> R {
        let outer = self.vm.in_chain.replace(self.id);
        self.before();
        let result = match self.exchange.try_borrow_mut() {
            Ok(mut exchange) => {
                let mut host = NativeHost::request(&self.vm, self.id, self.envoy);
                let mut stream = NativeStream::new(self.envoy, phase);
                call(&mut exchange, &mut host, &mut stream)
            }
            Err(_) => busy,
        };
        self.vm.in_chain.set(outer);
        self.after();
        result
    }
}

/// # Safety
/// `ptr` must be null or a pointer `on_http_filter_new` returned and
/// `on_http_filter_destroy` has not freed.
unsafe fn filter<'a>(ptr: *const c_void) -> Option<&'a Filter> {
    // SAFETY: forwarded from the caller.
    unsafe { ptr.cast::<Filter>().as_ref() }
}

fn critical(what: &str) {
    abi::log(
        LogLevel::Critical,
        &format!("azure-openai-filter: panic caught in {what}; the request is answered 500"),
    );
}

/// A panicked request hook's answer: a 500 in OpenAI error JSON.
fn answer_panic(envoy: FilterPtr, what: &str) {
    critical(what);
    let error = ApiError::internal("the filter failed");
    let _ = catch_unwind(|| {
        abi::send_response(
            envoy,
            error.status,
            &[(b"content-type", b"application/json")],
            &error.body(),
            b"azure_openai_filter",
        );
    });
}

/// Runs a chain callback hook: the logic, or on a panic a 500 and `stop`.
fn chain_hook<R: Copy>(
    filter_ptr: *const c_void,
    what: &str,
    phase: Phase,
    pass: R,
    stop: R,
    call: impl FnOnce(&mut Exchange, &mut NativeHost<'_>, &mut NativeStream) -> R,
) -> R {
    // SAFETY: Envoy passes the pointer `on_http_filter_new` returned.
    let Some(filter) = (unsafe { filter(filter_ptr) }) else {
        return pass;
    };
    match catch_unwind(AssertUnwindSafe(|| filter.chain(pass, phase, call))) {
        Ok(result) => result,
        Err(_) => {
            answer_panic(filter.envoy, what);
            stop
        }
    }
}

fn headers_status(flow: Flow) -> u32 {
    match flow {
        Flow::Continue => 0, // Continue
        Flow::Pause => 1,    // StopIteration
    }
}

fn body_status(flow: Flow) -> u32 {
    match flow {
        Flow::Continue => 0, // Continue
        Flow::Pause => 1,    // StopIterationAndBuffer
    }
}

// ------------------------------------------------------------------ program

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    let init = catch_unwind(|| {
        std::panic::set_hook(Box::new(|info| {
            abi::log(
                LogLevel::Critical,
                &format!("azure-openai-filter panicked: {info}"),
            );
        }));
    });
    match init {
        // The ABI version of the Envoy this build is for; Envoy logs
        // whether it matched its own.
        Ok(()) => abi::ABI_VERSION.as_ptr().cast(),
        Err(_) => null(),
    }
}

// ------------------------------------------------------------ configuration

static NEXT_CONFIG: AtomicU64 = AtomicU64::new(1);

/// Validates the configuration (refused: Envoy rejects the filter config)
/// and defines the filter's stats (only possible now).
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    config_envoy: abi::ConfigPtr,
    _name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    let made = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: Envoy's buffer is valid during this hook.
        let json = unsafe { config.to_vec() };
        let parsed = match Config::from_json(&json, &|name| std::env::var(name).ok()) {
            Ok(parsed) => parsed,
            Err(error) => {
                abi::log(
                    LogLevel::Error,
                    &format!("azure-openai-filter: configuration refused: {error}"),
                );
                return null();
            }
        };
        abi::log(
            LogLevel::Info,
            &format!(
                "azure-openai-filter {} (native) configured: {} upstream(s), {} model(s), {} caller(s), {} token credential(s)",
                env!("CARGO_PKG_VERSION"),
                parsed.upstreams.len(),
                parsed.models.len(),
                parsed.callers.len(),
                parsed.credentials.len()
            ),
        );
        let stat_ids = FAMILIES
            .iter()
            .map(|family| {
                let id = abi::define_metric(config_envoy, family.gauge, family.name, family.labels);
                if id.is_none() {
                    abi::log(
                        LogLevel::Error,
                        &format!("azure-openai-filter: could not define stat {}", family.name),
                    );
                }
                id
            })
            .collect();
        let config = Arc::new(FilterConfig {
            id: NEXT_CONFIG.fetch_add(1, Ordering::Relaxed),
            json,
            stat_ids,
            main: MainThread::new(config_envoy),
        });
        Box::into_raw(Box::new(config))
            .cast_const()
            .cast::<c_void>()
    }));
    made.unwrap_or_else(|_| {
        critical("on_http_filter_config_new");
        null()
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: *const c_void) {
    let _ = catch_unwind(|| {
        if config.is_null() {
            return;
        }
        // SAFETY: `config` came from Box::into_raw in config_new, freed once.
        let config = unsafe { Box::from_raw(config.cast::<Arc<FilterConfig>>().cast_mut()) };
        config.main.shutdown();
        vm::drop_vm(config.id);
    });
}

// ------------------------------------------------------------------ streams

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: *const c_void,
    envoy: FilterPtr,
) -> *const c_void {
    let made = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `config` is the pointer config_new returned, alive while
        // Envoy creates filters from it.
        let Some(config) = (unsafe { config.cast::<Arc<FilterConfig>>().as_ref() }) else {
            return null();
        };
        let vm = vm::vm_for(config, envoy);
        let id = vm.register(envoy);
        let exchange = Exchange::new(id, vm.worker());
        let filter = Filter {
            vm,
            id,
            envoy,
            exchange: RefCell::new(exchange),
            scheduler: Cell::new(std::ptr::null_mut()),
            completed: Cell::new(false),
            complete_pending: Cell::new(false),
        };
        Box::into_raw(Box::new(filter))
            .cast_const()
            .cast::<c_void>()
    }));
    made.unwrap_or_else(|_| {
        critical("on_http_filter_new");
        null()
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    _envoy: FilterPtr,
    filter: *const c_void,
    end_of_stream: bool,
) -> u32 {
    chain_hook(
        filter,
        "request headers",
        Phase::Outside,
        0,
        1,
        |ex, host, stream| headers_status(ex.on_request_headers(host, stream, end_of_stream)),
    )
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    _envoy: FilterPtr,
    filter: *const c_void,
    end_of_stream: bool,
) -> u32 {
    chain_hook(
        filter,
        "request body",
        Phase::RequestBody,
        0,
        3,
        |ex, host, stream| {
            let size = stream.body_len(true);
            body_status(ex.on_request_body(host, stream, size, end_of_stream))
        },
    )
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _envoy: FilterPtr,
    filter: *const c_void,
) -> u32 {
    chain_hook(
        filter,
        "request trailers",
        Phase::Outside,
        0,
        1,
        |ex, host, stream| headers_status(ex.on_request_trailers(host, stream)),
    )
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    _envoy: FilterPtr,
    filter: *const c_void,
    end_of_stream: bool,
) -> u32 {
    chain_hook(
        filter,
        "response headers",
        Phase::Outside,
        0,
        1,
        |ex, host, stream| headers_status(ex.on_response_headers(host, stream, end_of_stream)),
    )
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _envoy: FilterPtr,
    filter: *const c_void,
    end_of_stream: bool,
) -> u32 {
    chain_hook(
        filter,
        "response body",
        Phase::ResponseBody,
        0,
        3,
        |ex, host, stream| {
            // proxy-wasm hands the size of the body so far; so does this.
            let size = stream.body_len(false);
            body_status(ex.on_response_body(host, stream, size, end_of_stream))
        },
    )
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _envoy: FilterPtr,
    _filter: *const c_void,
) -> u32 {
    0 // Continue: the filter does nothing with response trailers
}

/// Runs before Envoy writes the access log (and before destroy).
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    _envoy: FilterPtr,
    filter_ptr: *const c_void,
) {
    // SAFETY: Envoy passes the pointer `on_http_filter_new` returned.
    let Some(filter) = (unsafe { filter(filter_ptr) }) else {
        return;
    };
    if catch_unwind(AssertUnwindSafe(|| filter.complete())).is_err() {
        critical("stream complete");
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(filter_ptr: *const c_void) {
    if filter_ptr.is_null() {
        return;
    }
    // SAFETY: the pointer came from Box::into_raw in filter_new; Envoy
    // destroys a filter once, after its last hook.
    let filter = unsafe { Box::from_raw(filter_ptr.cast::<Filter>().cast_mut()) };
    let ended = catch_unwind(AssertUnwindSafe(|| {
        if !filter.completed.get() {
            filter.completed.set(true);
            if let Ok(mut exchange) = filter.exchange.try_borrow_mut() {
                // No stream to carry stats any more: they wait for the next.
                exchange.on_done(&mut NativeHost::request(
                    &filter.vm,
                    filter.id,
                    std::ptr::null_mut(),
                ));
            }
        }
        let scheduler = filter.scheduler.replace(std::ptr::null_mut());
        if !scheduler.is_null() {
            filter
                .vm
                .config
                .main
                .inbox
                .forget_waker(filter.vm.key, scheduler);
            timer::forget(scheduler);
            abi::scheduler_delete(scheduler);
        }
        filter.vm.unregister(filter.id);
    }));
    if ended.is_err() {
        critical("filter destroy");
    }
    drop(filter);
}

/// A callout this stream sent came back: a failover attempt of its own
/// request.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _envoy: FilterPtr,
    filter_ptr: *const c_void,
    callout_id: u64,
    result: u32,
    headers_ptr: *mut EnvoyHeader,
    headers_size: usize,
    chunks_ptr: *mut EnvoyBuffer,
    chunks_size: usize,
) {
    // SAFETY: Envoy passes the pointer `on_http_filter_new` returned.
    let Some(filter) = (unsafe { filter(filter_ptr) }) else {
        return;
    };
    let done = catch_unwind(AssertUnwindSafe(|| {
        let entry = filter
            .vm
            .state
            .borrow_mut()
            .callouts
            .remove(&(filter.id, callout_id));
        let Some(id) = entry else {
            return;
        };
        let (pairs, body) =
            // SAFETY: Envoy's arrays and buffers are valid during the hook.
            unsafe { callout_answer(result, headers_ptr, headers_size, chunks_ptr, chunks_size) };
        let refs: Vec<(&[u8], &[u8])> = pairs
            .iter()
            .map(|(n, v)| (n.as_slice(), v.as_slice()))
            .collect();
        // No headers: the connection closed before an answer.
        let reply = if refs.is_empty() {
            CalloutReply::default()
        } else {
            CalloutReply {
                headers: headers::encode(&refs),
                body,
            }
        };
        if let Ok(mut exchange) = filter.exchange.try_borrow_mut() {
            let mut host = NativeHost::request(&filter.vm, filter.id, filter.envoy);
            exchange.on_callout_response(
                &mut host,
                &mut NativeStream::outside_body(filter.envoy),
                id,
                reply,
            );
        }
        filter.after();
    }));
    if done.is_err() {
        answer_panic(filter.envoy, "callout answer");
    }
}

/// The stream's scheduler fired: chores deferred to it, the worker's tick.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    _envoy: FilterPtr,
    filter_ptr: *const c_void,
    _event_id: u64,
) {
    // SAFETY: Envoy passes the pointer `on_http_filter_new` returned.
    let Some(filter) = (unsafe { filter(filter_ptr) }) else {
        return;
    };
    let done = catch_unwind(AssertUnwindSafe(|| {
        if filter.completed.get() {
            return;
        }
        // Not a chain callback: resuming this stream is allowed here.
        let outer = filter.vm.in_chain.replace(0);
        filter.vm.receive(filter.id, filter.envoy);
        let deferred = filter.vm.take_deferred();
        filter.vm.carry_out(deferred);
        filter.vm.tick(filter.id, filter.envoy);
        filter.vm.in_chain.set(outer);
        filter.after();
    }));
    if done.is_err() {
        answer_panic(filter.envoy, "scheduled event");
    }
}

// ---------------------------------------------------- main thread callouts

/// # Safety
/// `ptr` must be null or a pointer `config_new` returned, not yet destroyed.
unsafe fn config_of<'a>(ptr: *const c_void) -> Option<&'a Arc<FilterConfig>> {
    // SAFETY: forwarded from the caller.
    unsafe { ptr.cast::<Arc<FilterConfig>>().as_ref() }
}

/// The main thread was woken: it sends the workers' queued token fetches.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    _config_envoy: abi::ConfigPtr,
    config_ptr: *const c_void,
    _event_id: u64,
) {
    let _ = catch_unwind(|| {
        // SAFETY: Envoy passes the pointer config_new returned.
        if let Some(config) = unsafe { config_of(config_ptr) } {
            config.main.on_scheduled();
        }
    })
    .map_err(|_| critical("configuration scheduled event"));
}

/// A token fetch sent from the main thread came back.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    _config_envoy: abi::ConfigPtr,
    config_ptr: *const c_void,
    callout_id: u64,
    result: u32,
    headers_ptr: *mut EnvoyHeader,
    headers_size: usize,
    chunks_ptr: *mut EnvoyBuffer,
    chunks_size: usize,
) {
    let _ = catch_unwind(|| {
        // SAFETY: Envoy passes the pointer config_new returned.
        let Some(config) = (unsafe { config_of(config_ptr) }) else {
            return;
        };
        let (pairs, body) =
            // SAFETY: Envoy's arrays and buffers are valid during the hook.
            unsafe { callout_answer(result, headers_ptr, headers_size, chunks_ptr, chunks_size) };
        let status = pairs
            .iter()
            .find(|(name, _)| name.as_slice() == b":status")
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok());
        config.main.on_done(callout_id, status, body);
    })
    .map_err(|_| critical("configuration callout answer"));
}

/// A header's name and value, copied.
type Pair = (Vec<u8>, Vec<u8>);

/// A callout's headers and body, copied; nothing when it failed.
///
/// # Safety
/// The pointers must be null or hold their sizes of entries, valid now.
unsafe fn callout_answer(
    result: u32,
    headers_ptr: *mut EnvoyHeader,
    headers_size: usize,
    chunks_ptr: *mut EnvoyBuffer,
    chunks_size: usize,
) -> (Vec<Pair>, Vec<u8>) {
    if result != abi::CALLOUT_RESULT_SUCCESS {
        return (Vec::new(), Vec::new());
    }
    let pairs = if headers_ptr.is_null() {
        Vec::new()
    } else {
        // SAFETY: forwarded from the caller.
        unsafe { std::slice::from_raw_parts(headers_ptr, headers_size) }
            .iter()
            // SAFETY: each header's buffers are valid now.
            .map(|h| unsafe { h.to_pair() })
            .collect()
    };
    let body = if chunks_ptr.is_null() {
        Vec::new()
    } else {
        // SAFETY: forwarded from the caller.
        unsafe { std::slice::from_raw_parts(chunks_ptr, chunks_size) }
            .iter()
            // SAFETY: each buffer is valid now.
            .flat_map(|c| unsafe { c.to_vec() })
            .collect()
    };
    (pairs, body)
}

// Hooks Envoy requires that the filter has no use for.

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _envoy: FilterPtr,
    _filter: *const c_void,
    _stream_id: u64,
    _headers: *mut EnvoyHeader,
    _headers_size: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _envoy: FilterPtr,
    _filter: *const c_void,
    _stream_id: u64,
    _data: *const EnvoyBuffer,
    _data_count: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _envoy: FilterPtr,
    _filter: *const c_void,
    _stream_id: u64,
    _trailers: *mut EnvoyHeader,
    _trailers_size: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _envoy: FilterPtr,
    _filter: *const c_void,
    _stream_id: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _envoy: FilterPtr,
    _filter: *const c_void,
    _stream_id: u64,
    _reason: u32,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _envoy: FilterPtr,
    _filter: *const c_void,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _envoy: FilterPtr,
    _filter: *const c_void,
) {
}
