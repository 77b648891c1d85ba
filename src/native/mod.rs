//! The native layer: the same filter as an Envoy dynamic module (a `.so`
//! Envoy 1.40 loads with `envoy.filters.http.dynamic_modules`), built with
//! `--features native` for a non-wasm target (`native-build.sh`).
//!
//! It is the twin of `host/` (proxy-wasm): the seam's traits (`host_api`)
//! bound to the dynamic-module ABI (`abi`), and the hooks Envoy calls
//! (`hooks`), which hand each event to the same logic (`exchange`,
//! `worker`). What differs from Wasm, and why:
//! - One copy of the module serves every worker thread: the per-VM state of
//!   Wasm is per worker thread here (`vm`), state shared across workers is
//!   process memory (`shared`).
//! - Stats can only be defined while the configuration loads (`metrics`).
//! - HTTP filters have no timer: the worker's tick runs when traffic
//!   reaches the worker and, while requests wait, from a timer thread that
//!   wakes a waiting stream's scheduler (`timer`).
//! - No sandbox: the module runs with Envoy's privileges and memory, so
//!   every hook catches unwinding (`hooks`).

mod abi;
mod callouts;
mod hooks;
mod metrics;
mod shared;
mod timer;
mod vm;
