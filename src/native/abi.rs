//! The few Envoy dynamic-module callbacks the native filter calls, bound by
//! hand from the ABI header of Envoy 1.40.0 (`source/extensions/dynamic_modules/abi/abi.h`,
//! ABI version `v0.2.0`), with safe wrappers that answer values.
//!
//! Only what the filter uses is declared here: every symbol below is
//! checked against `nm -D --defined-only` of the Envoy 1.40.0 binary (see
//! the README's "Native module" section). The declarations follow the
//! header's layout: buffers are `{pointer, length}` structs passed by
//! value, enums are C `int`s, `bool` is C `bool`.
//!
//! Ownership, as the header states it:
//! - Buffers Envoy hands out (headers, body chunks, callout answers) stay
//!   valid until the end of the current event hook, or until a setter is
//!   called on the same map/body; every wrapper here copies them into owned
//!   `Vec`s at once, so nothing borrowed from Envoy outlives the call.
//! - Buffers the module passes (`ModuleBuffer`) are only read during the
//!   call.
//! - A scheduler is allocated by Envoy and owned by the module, which must
//!   delete it.
//!
//! Threads: every `http_*` callback here takes the filter's Envoy pointer
//! and must run on the worker thread of that stream (inside one of its
//! hooks), except `scheduler_commit`, which Envoy allows from any thread.

use std::ffi::c_void;
use std::ptr::{null, null_mut};

/// Envoy's HTTP filter object (`DynamicModuleHttpFilter*`), for one stream.
pub type FilterPtr = *mut c_void;
/// Envoy's filter configuration object (`DynamicModuleHttpFilterConfig*`).
pub type ConfigPtr = *mut c_void;
/// A scheduler Envoy allocated for one filter (owned by the module).
pub type SchedulerPtr = *mut c_void;
/// A scheduler onto the main thread, for one filter configuration.
pub type ConfigSchedulerPtr = *mut c_void;

/// The ABI version this build reports (`ENVOY_DYNAMIC_MODULES_ABI_VERSION`
/// of Envoy 1.40.0's header), NUL-terminated.
pub const ABI_VERSION: &[u8] = b"v0.2.0\0";

/// `envoy_dynamic_module_type_envoy_buffer`: bytes owned by Envoy.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EnvoyBuffer {
    pub ptr: *const u8,
    pub length: usize,
}

impl EnvoyBuffer {
    const EMPTY: EnvoyBuffer = EnvoyBuffer {
        ptr: null(),
        length: 0,
    };

    /// A copy of the bytes.
    ///
    /// # Safety
    /// `ptr` must be null or point to `length` readable bytes.
    pub unsafe fn to_vec(self) -> Vec<u8> {
        if self.ptr.is_null() || self.length == 0 {
            return Vec::new();
        }
        // SAFETY: the caller guarantees `length` readable bytes at `ptr`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.length) }.to_vec()
    }
}

/// `envoy_dynamic_module_type_module_buffer`: bytes owned by the module.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ModuleBuffer {
    pub ptr: *const u8,
    pub length: usize,
}

impl ModuleBuffer {
    pub fn of(bytes: &[u8]) -> Self {
        ModuleBuffer {
            ptr: bytes.as_ptr(),
            length: bytes.len(),
        }
    }

    /// The null buffer (a header setter removes the header).
    const NULL: ModuleBuffer = ModuleBuffer {
        ptr: null(),
        length: 0,
    };
}

/// `envoy_dynamic_module_type_module_http_header`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ModuleHeader {
    pub key_ptr: *const u8,
    pub key_length: usize,
    pub value_ptr: *const u8,
    pub value_length: usize,
}

impl ModuleHeader {
    fn of(name: &[u8], value: &[u8]) -> Self {
        ModuleHeader {
            key_ptr: name.as_ptr(),
            key_length: name.len(),
            value_ptr: value.as_ptr(),
            value_length: value.len(),
        }
    }
}

/// `envoy_dynamic_module_type_envoy_http_header`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EnvoyHeader {
    pub key_ptr: *const u8,
    pub key_length: usize,
    pub value_ptr: *const u8,
    pub value_length: usize,
}

impl EnvoyHeader {
    const EMPTY: EnvoyHeader = EnvoyHeader {
        key_ptr: null(),
        key_length: 0,
        value_ptr: null(),
        value_length: 0,
    };

    /// Copies of name and value.
    ///
    /// # Safety
    /// Both pointers must be null or point to their lengths of bytes.
    pub unsafe fn to_pair(self) -> (Vec<u8>, Vec<u8>) {
        // SAFETY: forwarded from the caller.
        unsafe {
            (
                EnvoyBuffer {
                    ptr: self.key_ptr,
                    length: self.key_length,
                }
                .to_vec(),
                EnvoyBuffer {
                    ptr: self.value_ptr,
                    length: self.value_length,
                }
                .to_vec(),
            )
        }
    }
}

/// `envoy_dynamic_module_type_http_header_type`.
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum HeaderMap {
    Request = 0,
    Response = 2,
}

/// `envoy_dynamic_module_type_http_body_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Body {
    ReceivedRequest = 0,
    BufferedRequest = 1,
    ReceivedResponse = 2,
    BufferedResponse = 3,
}

/// `envoy_dynamic_module_type_log_level`.
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum LogLevel {
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

/// `envoy_dynamic_module_type_http_callout_init_result`.
pub const CALLOUT_SUCCESS: u32 = 0;
pub const CALLOUT_MISSING_HEADERS: u32 = 1;
pub const CALLOUT_CLUSTER_NOT_FOUND: u32 = 2;
/// `envoy_dynamic_module_type_http_callout_result_Success`.
pub const CALLOUT_RESULT_SUCCESS: u32 = 0;
/// `envoy_dynamic_module_type_metrics_result_Success`.
const METRICS_SUCCESS: u32 = 0;

extern "C" {
    fn envoy_dynamic_module_callback_log(level: u32, message: ModuleBuffer);
    fn envoy_dynamic_module_callback_log_enabled(level: u32) -> bool;

    fn envoy_dynamic_module_callback_http_get_headers_size(filter: FilterPtr, map: u32) -> usize;
    fn envoy_dynamic_module_callback_http_get_headers(
        filter: FilterPtr,
        map: u32,
        result_headers: *mut EnvoyHeader,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_set_header(
        filter: FilterPtr,
        map: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;

    fn envoy_dynamic_module_callback_http_send_response(
        filter: FilterPtr,
        status_code: u32,
        headers: *mut ModuleHeader,
        headers_size: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );

    fn envoy_dynamic_module_callback_http_get_body_chunks_size(
        filter: FilterPtr,
        body: u32,
    ) -> usize;
    fn envoy_dynamic_module_callback_http_get_body_chunks(
        filter: FilterPtr,
        body: u32,
        result: *mut EnvoyBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_append_body(
        filter: FilterPtr,
        body: u32,
        data: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_drain_body(
        filter: FilterPtr,
        body: u32,
        number_of_bytes: usize,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_received_buffered_request_body(filter: FilterPtr)
        -> bool;
    fn envoy_dynamic_module_callback_http_received_buffered_response_body(
        filter: FilterPtr,
    ) -> bool;

    fn envoy_dynamic_module_callback_http_set_filter_state_bytes(
        filter: FilterPtr,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;

    fn envoy_dynamic_module_callback_http_filter_http_callout(
        filter: FilterPtr,
        callout_id_out: *mut u64,
        cluster_name: ModuleBuffer,
        headers: *mut ModuleHeader,
        headers_size: usize,
        body: ModuleBuffer,
        timeout_milliseconds: u64,
    ) -> u32;

    fn envoy_dynamic_module_callback_http_filter_continue_decoding(filter: FilterPtr);
    fn envoy_dynamic_module_callback_http_clear_route_cache(filter: FilterPtr);

    fn envoy_dynamic_module_callback_http_filter_scheduler_new(filter: FilterPtr) -> SchedulerPtr;
    fn envoy_dynamic_module_callback_http_filter_scheduler_commit(
        scheduler: SchedulerPtr,
        event_id: u64,
    );
    fn envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler: SchedulerPtr);

    fn envoy_dynamic_module_callback_http_filter_config_http_callout(
        config: ConfigPtr,
        callout_id_out: *mut u64,
        cluster_name: ModuleBuffer,
        headers: *mut ModuleHeader,
        headers_size: usize,
        body: ModuleBuffer,
        timeout_milliseconds: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(
        config: ConfigPtr,
    ) -> ConfigSchedulerPtr;
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
        scheduler: ConfigSchedulerPtr,
        event_id: u64,
    );
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(
        scheduler: ConfigSchedulerPtr,
    );

    fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config: ConfigPtr,
        name: ModuleBuffer,
        label_names: *mut ModuleBuffer,
        label_names_length: usize,
        counter_id: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
        config: ConfigPtr,
        name: ModuleBuffer,
        label_names: *mut ModuleBuffer,
        label_names_length: usize,
        gauge_id: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter: FilterPtr,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_increment_gauge(
        filter: FilterPtr,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_decrement_gauge(
        filter: FilterPtr,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_set_gauge(
        filter: FilterPtr,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
}

pub fn log(level: LogLevel, message: &str) {
    // SAFETY: the buffer describes a live string, read during the call.
    unsafe { envoy_dynamic_module_callback_log(level as u32, ModuleBuffer::of(message.as_bytes())) }
}

pub fn log_enabled(level: LogLevel) -> bool {
    // SAFETY: no pointers.
    unsafe { envoy_dynamic_module_callback_log_enabled(level as u32) }
}

/// Every header of a map, copied, in order.
pub fn headers(filter: FilterPtr, map: HeaderMap) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    // SAFETY: `filter` is the live filter of the current hook.
    let size = unsafe { envoy_dynamic_module_callback_http_get_headers_size(filter, map as u32) };
    let mut raw = vec![EnvoyHeader::EMPTY; size];
    // SAFETY: `raw` has room for `size` headers, as the header requires.
    let ok = unsafe {
        envoy_dynamic_module_callback_http_get_headers(filter, map as u32, raw.as_mut_ptr())
    };
    if !ok && size > 0 {
        return None;
    }
    // SAFETY: Envoy filled each entry with buffers valid until the hook ends.
    Some(raw.into_iter().map(|h| unsafe { h.to_pair() }).collect())
}

/// Sets a header (every earlier value replaced); `None` removes it.
pub fn set_header(filter: FilterPtr, map: HeaderMap, name: &str, value: Option<&[u8]>) -> bool {
    let value = value.map_or(ModuleBuffer::NULL, ModuleBuffer::of);
    // SAFETY: both buffers are live for the call.
    unsafe {
        envoy_dynamic_module_callback_http_set_header(
            filter,
            map as u32,
            ModuleBuffer::of(name.as_bytes()),
            value,
        )
    }
}

/// Answers the stream from the filter, with response code details.
pub fn send_response(
    filter: FilterPtr,
    status: u16,
    headers: &[(&[u8], &[u8])],
    body: &[u8],
    details: &[u8],
) {
    let mut raw: Vec<ModuleHeader> = headers
        .iter()
        .map(|(n, v)| ModuleHeader::of(n, v))
        .collect();
    // SAFETY: every buffer is live for the call; Envoy copies them.
    unsafe {
        envoy_dynamic_module_callback_http_send_response(
            filter,
            u32::from(status),
            raw.as_mut_ptr(),
            raw.len(),
            ModuleBuffer::of(body),
            ModuleBuffer::of(details),
        )
    }
}

/// A body's chunks, copied (empty when Envoy has none).
pub fn body_chunks(filter: FilterPtr, body: Body) -> Vec<Vec<u8>> {
    // SAFETY: `filter` is the live filter of the current hook.
    let count =
        unsafe { envoy_dynamic_module_callback_http_get_body_chunks_size(filter, body as u32) };
    if count == 0 {
        return Vec::new();
    }
    let mut raw = vec![EnvoyBuffer::EMPTY; count];
    // SAFETY: `raw` has room for `count` buffers.
    let ok = unsafe {
        envoy_dynamic_module_callback_http_get_body_chunks(filter, body as u32, raw.as_mut_ptr())
    };
    if !ok {
        return Vec::new();
    }
    // SAFETY: Envoy filled each buffer, valid until the hook ends.
    raw.into_iter().map(|b| unsafe { b.to_vec() }).collect()
}

pub fn append_body(filter: FilterPtr, body: Body, data: &[u8]) -> bool {
    // SAFETY: the buffer is live for the call.
    unsafe {
        envoy_dynamic_module_callback_http_append_body(filter, body as u32, ModuleBuffer::of(data))
    }
}

pub fn drain_body(filter: FilterPtr, body: Body, bytes: usize) -> bool {
    // SAFETY: no module pointers.
    unsafe { envoy_dynamic_module_callback_http_drain_body(filter, body as u32, bytes) }
}

/// Whether the body this hook received is the one buffered earlier (then
/// reading both would count it twice).
pub fn received_is_buffered(filter: FilterPtr, request: bool) -> bool {
    // SAFETY: no module pointers.
    unsafe {
        if request {
            envoy_dynamic_module_callback_http_received_buffered_request_body(filter)
        } else {
            envoy_dynamic_module_callback_http_received_buffered_response_body(filter)
        }
    }
}

pub fn set_filter_state(filter: FilterPtr, key: &str, value: &[u8]) -> bool {
    // SAFETY: both buffers are live for the call.
    unsafe {
        envoy_dynamic_module_callback_http_set_filter_state_bytes(
            filter,
            ModuleBuffer::of(key.as_bytes()),
            ModuleBuffer::of(value),
        )
    }
}

/// Sends a callout from the stream's filter; its answer comes to that
/// filter's `on_http_filter_http_callout_done`. Returns Envoy's callout id
/// or the init result.
pub fn http_callout(
    filter: FilterPtr,
    cluster: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    timeout_ms: u64,
) -> Result<u64, u32> {
    let mut raw: Vec<ModuleHeader> = headers
        .iter()
        .map(|(n, v)| ModuleHeader::of(n.as_bytes(), v.as_bytes()))
        .collect();
    let mut id = 0u64;
    let body = body.map_or(ModuleBuffer::NULL, ModuleBuffer::of);
    // SAFETY: every buffer is live for the call; Envoy writes one u64.
    let result = unsafe {
        envoy_dynamic_module_callback_http_filter_http_callout(
            filter,
            &mut id,
            ModuleBuffer::of(cluster.as_bytes()),
            raw.as_mut_ptr(),
            raw.len(),
            body,
            timeout_ms,
        )
    };
    if result == CALLOUT_SUCCESS {
        Ok(id)
    } else {
        Err(result)
    }
}

/// Sends a callout from the filter configuration, on the main thread only;
/// its answer comes to `on_http_filter_config_http_callout_done` there.
pub fn config_http_callout(
    config: ConfigPtr,
    cluster: &str,
    headers: &[(String, String)],
    body: Option<&[u8]>,
    timeout_ms: u64,
) -> Result<u64, u32> {
    let mut raw: Vec<ModuleHeader> = headers
        .iter()
        .map(|(n, v)| ModuleHeader::of(n.as_bytes(), v.as_bytes()))
        .collect();
    let mut id = 0u64;
    let body = body.map_or(ModuleBuffer::NULL, ModuleBuffer::of);
    // SAFETY: every buffer is live for the call; Envoy writes one u64.
    let result = unsafe {
        envoy_dynamic_module_callback_http_filter_config_http_callout(
            config,
            &mut id,
            ModuleBuffer::of(cluster.as_bytes()),
            raw.as_mut_ptr(),
            raw.len(),
            body,
            timeout_ms,
        )
    };
    if result == CALLOUT_SUCCESS {
        Ok(id)
    } else {
        Err(result)
    }
}

/// A scheduler onto the main thread (made on the main thread, in
/// `config_new`).
pub fn config_scheduler_new(config: ConfigPtr) -> ConfigSchedulerPtr {
    // SAFETY: `config` is the configuration being made.
    unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_new(config) }
}

/// Posts `event_id` to the configuration on the main thread (from any
/// thread).
pub fn config_scheduler_commit(scheduler: ConfigSchedulerPtr, event_id: u64) {
    // SAFETY: `scheduler` came from `config_scheduler_new`, not deleted yet.
    unsafe {
        envoy_dynamic_module_callback_http_filter_config_scheduler_commit(scheduler, event_id)
    }
}

pub fn config_scheduler_delete(scheduler: ConfigSchedulerPtr) {
    // SAFETY: `scheduler` came from `config_scheduler_new`; deleted once.
    unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_delete(scheduler) }
}

pub fn continue_decoding(filter: FilterPtr) {
    // SAFETY: `filter` is a live filter of this worker thread.
    unsafe { envoy_dynamic_module_callback_http_filter_continue_decoding(filter) }
}

/// Makes Envoy choose the route again (after request headers changed, as
/// Envoy does by itself for Wasm filters): the cluster header picks it.
pub fn clear_route_cache(filter: FilterPtr) {
    // SAFETY: `filter` is a live filter of this worker thread.
    unsafe { envoy_dynamic_module_callback_http_clear_route_cache(filter) }
}

pub fn scheduler_new(filter: FilterPtr) -> SchedulerPtr {
    // SAFETY: `filter` is the live filter of the current hook.
    unsafe { envoy_dynamic_module_callback_http_filter_scheduler_new(filter) }
}

/// Posts `event_id` to the scheduler's filter on its worker thread (from any
/// thread); dropped by Envoy if the filter is gone by then.
pub fn scheduler_commit(scheduler: SchedulerPtr, event_id: u64) {
    // SAFETY: `scheduler` came from `scheduler_new` and is not deleted yet.
    unsafe { envoy_dynamic_module_callback_http_filter_scheduler_commit(scheduler, event_id) }
}

pub fn scheduler_delete(scheduler: SchedulerPtr) {
    // SAFETY: `scheduler` came from `scheduler_new`; deleted once.
    unsafe { envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler) }
}

/// Defines a counter or gauge with label names, during `config_new` only.
pub fn define_metric(config: ConfigPtr, gauge: bool, name: &str, labels: &[&str]) -> Option<usize> {
    let mut raw: Vec<ModuleBuffer> = labels
        .iter()
        .map(|l| ModuleBuffer::of(l.as_bytes()))
        .collect();
    let labels_ptr = if raw.is_empty() {
        null_mut()
    } else {
        raw.as_mut_ptr()
    };
    let mut id = 0usize;
    let name = ModuleBuffer::of(name.as_bytes());
    // SAFETY: every buffer is live for the call; Envoy writes one usize.
    let result = unsafe {
        if gauge {
            envoy_dynamic_module_callback_http_filter_config_define_gauge(
                config,
                name,
                labels_ptr,
                raw.len(),
                &mut id,
            )
        } else {
            envoy_dynamic_module_callback_http_filter_config_define_counter(
                config,
                name,
                labels_ptr,
                raw.len(),
                &mut id,
            )
        }
    };
    (result == METRICS_SUCCESS).then_some(id)
}

/// How a stat moves.
#[derive(Debug, Clone, Copy)]
pub enum Move {
    /// A counter goes up by this much.
    Count(u64),
    GaugeUp(u64),
    GaugeDown(u64),
    GaugeSet(u64),
}

/// Moves a counter or gauge, through a live filter of the config that
/// defined it. Label values must match the definition's names.
pub fn record_metric(filter: FilterPtr, id: usize, values: &[&str], how: Move) -> bool {
    let mut raw: Vec<ModuleBuffer> = values
        .iter()
        .map(|v| ModuleBuffer::of(v.as_bytes()))
        .collect();
    let values_ptr = if raw.is_empty() {
        null_mut()
    } else {
        raw.as_mut_ptr()
    };
    let len = raw.len();
    // SAFETY: every buffer is live for the call.
    let result = unsafe {
        match how {
            Move::Count(n) => envoy_dynamic_module_callback_http_filter_increment_counter(
                filter, id, values_ptr, len, n,
            ),
            Move::GaugeUp(n) => envoy_dynamic_module_callback_http_filter_increment_gauge(
                filter, id, values_ptr, len, n,
            ),
            Move::GaugeDown(n) => envoy_dynamic_module_callback_http_filter_decrement_gauge(
                filter, id, values_ptr, len, n,
            ),
            Move::GaugeSet(n) => {
                envoy_dynamic_module_callback_http_filter_set_gauge(filter, id, values_ptr, len, n)
            }
        }
    };
    result == METRICS_SUCCESS
}
