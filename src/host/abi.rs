//! The few proxy-wasm host calls made on the request path, bound directly so
//! that every host status comes back as a value. (The SDK's wrappers panic on
//! a status they do not expect, and a panic kills the worker's VM.)
//!
//! Two things here still lean on the pinned SDK (proxy-wasm 0.2.5):
//! - Buffers the host returns were allocated in this module's memory through
//!   `proxy_on_memory_allocate`, which the SDK exports: it hands out a boxed
//!   slice of exactly the requested size (capacity == length, alignment 1)
//!   from the global allocator. `take_host_buffer` rebuilds that allocation
//!   as a `Vec` to own and free it; this is sound only while the allocator
//!   works that way, so check it when the SDK is upgraded.
//! - HTTP callouts are not bound here: they go through the SDK's
//!   `dispatch_http_call`, because the SDK must register each callout's token
//!   to route `proxy_on_http_call_response` back to the context that made it
//!   (its dispatcher panics on a token it does not know). That wrapper
//!   panics only on a status Envoy's `httpCall` never returns (it answers
//!   Ok, BadArgument or InternalFailure).

use std::ptr::null_mut;

use crate::headers::{self, Header};

/// A host status other than Ok (1 NotFound, 2 BadArgument, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status(pub u32);

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;
pub const CAS_MISMATCH: Status = Status(8);

#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum HeaderMap {
    Request = 0,
    Response = 2,
    CallResponse = 6,
}

#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum Buffer {
    RequestBody = 0,
    ResponseBody = 1,
    CallResponseBody = 4,
    PluginConfiguration = 7,
}

#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum MetricType {
    Counter = 0,
    Gauge = 1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum LogLevel {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_log_level(return_level: *mut u32) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_get_buffer_status(
        buffer_type: u32,
        return_size: *mut usize,
        return_flags: *mut u32,
    ) -> u32;
    fn proxy_set_buffer_bytes(
        buffer_type: u32,
        start: usize,
        size: usize,
        buffer_data: *const u8,
        buffer_size: usize,
    ) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
}

fn check(status: u32) -> Result<(), Status> {
    if status == OK {
        Ok(())
    } else {
        Err(Status(status))
    }
}

/// Takes ownership of a buffer the host allocated through the module's
/// `proxy_on_memory_allocate` (a boxed slice of exactly `size` bytes).
///
/// # Safety
/// `data` must be null or come from the host with length `size`.
unsafe fn take_host_buffer(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        return Vec::new();
    }
    // SAFETY: the SDK's allocator hands the host a boxed slice of `size`
    // bytes, which the host filled and returned to us.
    unsafe { Vec::from_raw_parts(data, size, size) }
}

pub fn log(level: LogLevel, message: &str) {
    // SAFETY: pointer and length describe a live string.
    // A failed log call has nowhere to be reported; it is dropped.
    let _ = unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) };
}

pub fn log_level() -> LogLevel {
    let mut level = LogLevel::Info as u32;
    // SAFETY: the host writes one u32 through the pointer.
    let status = unsafe { proxy_get_log_level(&mut level) };
    match (status, level) {
        (OK, 0) => LogLevel::Trace,
        (OK, 1) => LogLevel::Debug,
        (OK, 3) => LogLevel::Warn,
        (OK, 4) => LogLevel::Error,
        (OK, 5) => LogLevel::Critical,
        _ => LogLevel::Info,
    }
}

/// One header's value as bytes; None when absent.
pub fn get_header(map: HeaderMap, name: &str) -> Result<Option<Vec<u8>>, Status> {
    let mut data = null_mut();
    let mut size = 0;
    // SAFETY: name is live; the host writes a buffer pointer and its length.
    let status = unsafe {
        proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), &mut data, &mut size)
    };
    match status {
        // SAFETY: on Ok the host returned a buffer it allocated in our memory.
        OK => Ok(Some(unsafe { take_host_buffer(data, size) })),
        NOT_FOUND => Ok(None),
        other => Err(Status(other)),
    }
}

/// The whole header map, encoded (see `crate::headers`): one host call.
pub fn get_headers(map: HeaderMap) -> Result<Vec<u8>, Status> {
    let mut data = null_mut();
    let mut size = 0;
    // SAFETY: the host writes a buffer pointer and its length.
    let status = unsafe { proxy_get_header_map_pairs(map as u32, &mut data, &mut size) };
    match status {
        // SAFETY: on Ok the host returned a buffer it allocated in our memory.
        OK => Ok(unsafe { take_host_buffer(data, size) }),
        other => Err(Status(other)),
    }
}

/// Sets a header, replacing every value it had.
pub fn set_header(map: HeaderMap, name: &str, value: &[u8]) -> Result<(), Status> {
    // SAFETY: both slices are live for the call.
    check(unsafe {
        proxy_replace_header_map_value(
            map as u32,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

pub fn remove_header(map: HeaderMap, name: &str) -> Result<(), Status> {
    // SAFETY: name is live for the call.
    check(unsafe { proxy_remove_header_map_value(map as u32, name.as_ptr(), name.len()) })
}

/// Sets a property of the stream: Envoy keeps it as filter state
/// `wasm.<name>` (a one-segment path: no NUL in `name`).
pub fn set_property(name: &str, value: &[u8]) -> Result<(), Status> {
    // SAFETY: both slices are live for the call.
    check(unsafe { proxy_set_property(name.as_ptr(), name.len(), value.as_ptr(), value.len()) })
}

/// Up to `max` bytes of a buffer from `start`.
pub fn get_buffer(buffer: Buffer, start: usize, max: usize) -> Result<Vec<u8>, Status> {
    let mut data = null_mut();
    let mut size = 0;
    // SAFETY: the host writes a buffer pointer and its length.
    let status = unsafe { proxy_get_buffer_bytes(buffer as u32, start, max, &mut data, &mut size) };
    match status {
        // SAFETY: on Ok the host returned a buffer it allocated in our memory.
        OK => Ok(unsafe { take_host_buffer(data, size) }),
        NOT_FOUND => Ok(Vec::new()),
        other => Err(Status(other)),
    }
}

/// How many bytes a buffer holds.
pub fn buffer_len(buffer: Buffer) -> Result<usize, Status> {
    let mut size = 0;
    let mut flags = 0;
    // SAFETY: the host writes one usize and one u32.
    check(unsafe { proxy_get_buffer_status(buffer as u32, &mut size, &mut flags) })?;
    Ok(size)
}

/// Replaces `size` bytes of a buffer from `start` with `data`. Envoy
/// supports a prefix (`start` 0) or an append (`start` at the end).
pub fn set_buffer(buffer: Buffer, start: usize, size: usize, data: &[u8]) -> Result<(), Status> {
    // SAFETY: the slice is live for the call.
    check(unsafe { proxy_set_buffer_bytes(buffer as u32, start, size, data.as_ptr(), data.len()) })
}

/// Answers the request from the filter; nothing goes upstream.
///
/// Every reply carries the response code details `azure_openai_filter`
/// (`%RESPONSE_CODE_DETAILS%`, CEL `response.code_details`): the shipped
/// `local_reply_config` rewrites Envoy's own replies into OpenAI error JSON
/// and leaves replies with these details byte for byte alone.
pub fn send_local_response(status: u16, headers: &[Header<'_>], body: &[u8]) -> Result<(), Status> {
    const DETAILS: &[u8] = b"azure_openai_filter";
    let headers = headers::encode(headers);
    // SAFETY: every pointer/length pair describes a live slice.
    check(unsafe {
        proxy_send_local_response(
            u32::from(status),
            DETAILS.as_ptr(),
            DETAILS.len(),
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            -1,
        )
    })
}

/// Host time in milliseconds since the Unix epoch (0 if the host fails).
pub fn now_ms() -> u64 {
    let mut nanos = 0u64;
    // SAFETY: the host writes one u64 through the pointer.
    match unsafe { proxy_get_current_time_nanoseconds(&mut nanos) } {
        OK => nanos / 1_000_000,
        _ => 0,
    }
}

/// Sets the tick period of this VM's root context (also from a request
/// context, which belongs to that root).
pub fn set_tick_period_ms(period: u32) -> Result<(), Status> {
    // SAFETY: no pointers.
    check(unsafe { proxy_set_tick_period_milliseconds(period) })
}

/// A value shared by every VM with this vm_id, and its CAS version.
pub fn get_shared_data(key: &str) -> Result<Option<(Vec<u8>, u32)>, Status> {
    let mut data = null_mut();
    let mut size = 0;
    let mut cas = 0;
    // SAFETY: key is live; the host writes a buffer pointer, its length and the CAS.
    let status =
        unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
    match status {
        // SAFETY: on Ok the host returned a buffer it allocated in our memory.
        OK => Ok(Some((unsafe { take_host_buffer(data, size) }, cas))),
        NOT_FOUND => Ok(None),
        other => Err(Status(other)),
    }
}

/// Writes a shared value; with `cas` other than 0 only if the value is still
/// at that version (else `CAS_MISMATCH`).
pub fn set_shared_data(key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
    // SAFETY: both slices are live for the call.
    check(unsafe {
        proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
    })
}

/// Makes later host calls act on another context of this VM (a held request).
pub fn set_effective_context(context_id: u32) -> Result<(), Status> {
    // SAFETY: no pointers.
    check(unsafe { proxy_set_effective_context(context_id) })
}

/// Lets the effective context's request go on upstream.
pub fn resume_request() -> Result<(), Status> {
    // SAFETY: no pointers; 0 is the HTTP request stream.
    check(unsafe { proxy_continue_stream(0) })
}

pub fn define_metric(kind: MetricType, name: &str) -> Result<u32, Status> {
    let mut id = 0;
    // SAFETY: name is live; the host writes one u32.
    check(unsafe { proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

pub fn increment_metric(id: u32, offset: i64) -> Result<(), Status> {
    // SAFETY: no pointers.
    check(unsafe { proxy_increment_metric(id, offset) })
}

/// Sets a gauge (or records a histogram sample).
pub fn record_metric(id: u32, value: u64) -> Result<(), Status> {
    // SAFETY: no pointers.
    check(unsafe { proxy_record_metric(id, value) })
}
