//! azure-openai-filter: a proxy-wasm HTTP filter that turns Envoy into an
//! Azure OpenAI gateway.
//!
//! The decisions live in plain modules with no proxy-wasm import, tested on
//! the native target: per request (`exchange`, `gateway`, `body`, ...), per
//! VM (`worker`), and across VMs (`token`'s coordinator), reaching Envoy
//! only through the traits of `host_api`. `host` (built only for wasm32)
//! implements those traits with proxy-wasm calls and hands Envoy's
//! callbacks to the logic; `native` (built with `--features native` on a
//! non-wasm target) does the same on Envoy's dynamic-module ABI, as a
//! shared library.
//!
//! Only the configuration is public (the command-line tool reads it with
//! the very code the filter uses); everything else is crate-private, so the
//! compiler reports what nothing uses. It does so for the wasm32 build,
//! where the host layer uses the logic; a plain native build has no host
//! layer, so there everything but the configuration would look unused.
#![cfg_attr(
    not(any(target_arch = "wasm32", feature = "native")),
    allow(dead_code, unused_imports)
)]

mod auth;
mod body;
mod body_watch;
mod bytes;
pub mod config;
mod errors;
mod exchange;
mod gateway;
mod headers;
mod host_api;
mod json;
mod limits;
mod metrics;
mod pool;
mod routes;
mod secret;
mod shared_form;
mod stats;
mod token;
mod upstream_errors;
mod usage;
mod worker;

#[cfg(target_arch = "wasm32")]
mod host;

#[cfg(all(feature = "native", not(target_arch = "wasm32")))]
mod native;

#[cfg(test)]
mod robustness_tests;
#[cfg(test)]
mod testing;
