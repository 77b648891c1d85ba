//! The seam between the gateway's logic and the proxy it runs in: what the
//! logic needs from Envoy, as two narrow traits. `host/` implements them
//! with proxy-wasm calls; the tests implement them with fakes that simulate
//! several VMs sharing data (`testing`).
//!
//! - [`Host`]: what one VM (one Envoy worker) has: a clock, data shared by
//!   every VM with compare-and-swap, HTTP callouts, metrics, logs, a tick.
//! - [`Stream`]: the one request a callback is about: its headers and body
//!   on the way up, the response on the way back, and local replies.
//!
//! Every operation answers a value, never panics; a failure the logic
//! cannot act on is a [`HostError`]. Header maps travel in the proxy-wasm
//! encoding (`headers::decode`), read in one call.

use std::fmt;

/// A host call that did not work (the status it gave, for logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostError(pub u32);

/// What a stream callback tells the proxy to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Hold the headers (or buffer the body) until told to go on.
    Pause,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

/// How a compare-and-swap write of shared data ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    Done,
    /// Another VM wrote the value since it was read.
    Conflict,
    // The native build's shared data (process memory) never fails.
    #[cfg_attr(all(feature = "native", not(target_arch = "wasm32")), allow(dead_code))]
    Failed(HostError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
}

/// An HTTP request the filter sends itself (a token fetch, a failover
/// attempt).
#[derive(Debug)]
pub struct Callout<'a> {
    pub cluster: &'a str,
    /// Pseudo-headers (`:method`, `:path`, `:authority`) and headers.
    pub headers: &'a [(&'a str, &'a str)],
    pub body: Option<&'a [u8]>,
    pub timeout_ms: u64,
    /// Set on a root's token fetch. Its answer is a fact about the
    /// credential, not about the VM that asked: a host that cannot hand it
    /// back to that VM soon (the native module's worker may have no stream
    /// open to carry it) may give it to another VM of the filter, which
    /// applies it with `Tokens::on_answer`.
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))] // read by the native module
    pub token_for: Option<TokenFetch>,
}

/// Which credential a token fetch is for, and when it was sent (the
/// token's lifetime counts from then).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenFetch {
    pub credential: usize,
    pub sent_at_ms: u64,
}

/// Why a callout could not be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalloutError {
    /// Envoy has no such cluster (or the request lacks a pseudo-header).
    UnknownCluster,
    /// The cluster has no host to send to (DNS found none, all unhealthy).
    NoHost,
}

/// What a callout brought back. `status` is None when the connection
/// closed before any response headers came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalloutResponse {
    pub status: Option<u16>,
    pub body: Vec<u8>,
}

/// A callout's answer as a request context gets it: headers (encoded;
/// empty when the connection closed before any came) and body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CalloutReply {
    pub headers: Vec<u8>,
    pub body: Vec<u8>,
}

/// What one VM has from the proxy.
pub trait Host {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;

    /// A value every VM of this filter sees, and its version; None if no VM
    /// has written it.
    fn shared_get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, HostError>;
    /// Writes a shared value if it is still at version `cas` (0: whatever
    /// its version).
    fn shared_set(&self, key: &str, value: &[u8], cas: u32) -> Write;

    /// Sends a callout; its answer comes back (with the id returned) to the
    /// context that sent it: the root, or the request whose callback this
    /// is.
    fn http_call(&mut self, callout: &Callout<'_>) -> Result<u32, CalloutError>;

    /// Defines a metric (once per VM per name) and returns its id.
    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Result<u32, HostError>;
    fn add_to_metric(&mut self, id: u32, delta: i64);
    /// Sets a gauge.
    fn set_metric(&mut self, id: u32, value: u64);

    fn log_enabled(&self, level: Level) -> bool;
    /// A log line; never a key, a token or a body.
    fn log(&self, level: Level, message: &str);

    /// How often the VM's root ticks (0: not at all).
    fn set_tick_period_ms(&mut self, period: u32);
}

/// The request a callback is about.
pub trait Stream {
    /// Every request header, encoded (one call).
    fn request_headers(&mut self) -> Result<Vec<u8>, HostError>;
    /// Replaces every value the header had.
    fn set_request_header(&mut self, name: &str, value: &[u8]) -> Result<(), HostError>;
    fn remove_request_header(&mut self, name: &str) -> Result<(), HostError>;
    /// Up to `len` bytes of the request body received so far, from `start`.
    fn request_body(&mut self, start: usize, len: usize) -> Result<Vec<u8>, HostError>;
    /// How much of the request body has been received.
    fn request_body_len(&mut self) -> Result<usize, HostError>;
    /// Replaces the first `len` bytes of the request body with `with`.
    fn replace_request_body_prefix(&mut self, len: usize, with: &[u8]) -> Result<(), HostError>;

    fn response_headers(&mut self) -> Result<Vec<u8>, HostError>;
    /// Replaces every value the response header had.
    fn set_response_header(&mut self, name: &str, value: &[u8]) -> Result<(), HostError>;
    fn remove_response_header(&mut self, name: &str) -> Result<(), HostError>;
    fn response_body(&mut self, start: usize, len: usize) -> Result<Vec<u8>, HostError>;
    /// Replaces `len` bytes of the response body from `start` (0 or the
    /// end, as Envoy allows) with `with`.
    fn replace_response_body(
        &mut self,
        start: usize,
        len: usize,
        with: &[u8],
    ) -> Result<(), HostError>;

    /// Answers the request from the filter; nothing (more) goes upstream.
    fn send_reply(
        &mut self,
        status: u16,
        headers: &[(&[u8], &[u8])],
        body: &[u8],
    ) -> Result<(), HostError>;
    /// Lets a request held on its headers go on.
    fn resume_request(&mut self) -> Result<(), HostError>;
    /// Publishes a value for Envoy's other filters and access logs (filter
    /// state `wasm.<name>`).
    fn set_property(&mut self, name: &str, value: &[u8]) -> Result<(), HostError>;
}

/// Writes a log line if the host's level lets it through; the message is
/// formatted only then.
pub fn log(host: &dyn Host, level: Level, args: fmt::Arguments<'_>) {
    if host.log_enabled(level) {
        host.log(level, &args.to_string());
    }
}
