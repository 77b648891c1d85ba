//! The seam's traits (`host_api`) on proxy-wasm: [`WasmHost`] for the VM,
//! [`WasmStream`] for the request Envoy's current (effective) context is.

use std::time::Duration;

use super::abi::{self, Buffer, HeaderMap, MetricType, CAS_MISMATCH};
use super::log;
use crate::host_api::{Callout, CalloutError, Host, HostError, Level, MetricKind, Stream, Write};

/// The VM's host calls. Stateless: every VM has one host.
pub struct WasmHost;

fn host_error(status: abi::Status) -> HostError {
    HostError(status.0)
}

impl Host for WasmHost {
    fn now_ms(&self) -> u64 {
        abi::now_ms()
    }

    fn shared_get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, HostError> {
        abi::get_shared_data(key).map_err(host_error)
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: u32) -> Write {
        match abi::set_shared_data(key, value, cas) {
            Ok(()) => Write::Done,
            Err(CAS_MISMATCH) => Write::Conflict,
            Err(status) => Write::Failed(host_error(status)),
        }
    }

    fn http_call(&mut self, callout: &Callout<'_>) -> Result<u32, CalloutError> {
        // Through the SDK, which routes the answer back (see abi.rs).
        proxy_wasm::hostcalls::dispatch_http_call(
            callout.cluster,
            callout.headers.to_vec(),
            callout.body,
            Vec::new(),
            Duration::from_millis(callout.timeout_ms),
        )
        .map_err(|status| match status {
            proxy_wasm::types::Status::BadArgument => CalloutError::UnknownCluster,
            _ => CalloutError::NoHost,
        })
    }

    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Result<u32, HostError> {
        let kind = match kind {
            MetricKind::Counter => MetricType::Counter,
            MetricKind::Gauge => MetricType::Gauge,
        };
        abi::define_metric(kind, name).map_err(host_error)
    }

    fn add_to_metric(&mut self, id: u32, delta: i64) {
        let _ = abi::increment_metric(id, delta);
    }

    fn set_metric(&mut self, id: u32, value: u64) {
        let _ = abi::record_metric(id, value);
    }

    fn log_enabled(&self, level: Level) -> bool {
        log::enabled(level)
    }

    fn log(&self, level: Level, message: &str) {
        abi::log(log::abi_level(level), message);
    }

    fn set_tick_period_ms(&mut self, period: u32) {
        let _ = abi::set_tick_period_ms(period);
    }
}

/// The request of Envoy's effective context: the one a callback is for, or
/// the one the root chose with `set_effective_context`.
pub struct WasmStream;

impl Stream for WasmStream {
    fn request_headers(&mut self) -> Result<Vec<u8>, HostError> {
        abi::get_headers(HeaderMap::Request).map_err(host_error)
    }

    fn set_request_header(&mut self, name: &str, value: &[u8]) -> Result<(), HostError> {
        abi::set_header(HeaderMap::Request, name, value).map_err(host_error)
    }

    fn remove_request_header(&mut self, name: &str) -> Result<(), HostError> {
        abi::remove_header(HeaderMap::Request, name).map_err(host_error)
    }

    fn request_body(&mut self, start: usize, len: usize) -> Result<Vec<u8>, HostError> {
        abi::get_buffer(Buffer::RequestBody, start, len).map_err(host_error)
    }

    fn request_body_len(&mut self) -> Result<usize, HostError> {
        abi::buffer_len(Buffer::RequestBody).map_err(host_error)
    }

    fn replace_request_body_prefix(&mut self, len: usize, with: &[u8]) -> Result<(), HostError> {
        abi::set_buffer(Buffer::RequestBody, 0, len, with).map_err(host_error)
    }

    fn response_headers(&mut self) -> Result<Vec<u8>, HostError> {
        abi::get_headers(HeaderMap::Response).map_err(host_error)
    }

    fn set_response_header(&mut self, name: &str, value: &[u8]) -> Result<(), HostError> {
        abi::set_header(HeaderMap::Response, name, value).map_err(host_error)
    }

    fn remove_response_header(&mut self, name: &str) -> Result<(), HostError> {
        abi::remove_header(HeaderMap::Response, name).map_err(host_error)
    }

    fn response_body(&mut self, start: usize, len: usize) -> Result<Vec<u8>, HostError> {
        abi::get_buffer(Buffer::ResponseBody, start, len).map_err(host_error)
    }

    fn replace_response_body(
        &mut self,
        start: usize,
        len: usize,
        with: &[u8],
    ) -> Result<(), HostError> {
        abi::set_buffer(Buffer::ResponseBody, start, len, with).map_err(host_error)
    }

    fn send_reply(
        &mut self,
        status: u16,
        headers: &[(&[u8], &[u8])],
        body: &[u8],
    ) -> Result<(), HostError> {
        abi::send_local_response(status, headers, body).map_err(host_error)
    }

    fn resume_request(&mut self) -> Result<(), HostError> {
        abi::resume_request().map_err(host_error)
    }

    fn set_property(&mut self, name: &str, value: &[u8]) -> Result<(), HostError> {
        abi::set_property(name, value).map_err(host_error)
    }
}
