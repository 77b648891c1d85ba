//! azure-openai-filter: a proxy-wasm HTTP filter that turns Envoy into an
//! Azure OpenAI gateway.
//!
//! The decisions live in plain modules with no proxy-wasm import, tested on
//! the native target. `host` (built only for wasm32) is the thin layer that
//! reads from Envoy, asks those modules, and applies the answer.

pub mod auth;
pub mod body;
pub mod body_watch;
pub mod config;
pub mod errors;
pub mod gateway;
pub mod headers;
pub mod json;
pub mod routes;
pub mod secret;
pub mod token;
pub mod upstream_errors;

#[cfg(target_arch = "wasm32")]
mod host;

#[cfg(test)]
mod robustness_tests;
