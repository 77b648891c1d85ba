//! The root context: loads and validates the configuration into the VM's
//! [`Worker`], hands every request context a reference to it, and drives it
//! on ticks and callout answers, carrying out what it decides for requests
//! on their streams.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use super::abi::{self, Buffer, HeaderMap};
use super::bindings::{WasmHost, WasmStream};
use super::http::Request;
use crate::config::Config;
use crate::host_api::{log, CalloutResponse, Level};
use crate::worker::{carry_out, Chore, Worker};

pub struct Root {
    id: u32,
    worker: Option<Rc<Worker>>,
}

impl Root {
    pub fn new(id: u32) -> Self {
        Root { id, worker: None }
    }

    /// Carries out chores on their requests. Runs with nothing of the
    /// worker borrowed: resuming a request may call back into this VM.
    fn carry_out(&mut self, chores: Vec<Chore>) {
        for chore in chores {
            if abi::set_effective_context(chore.context_id()).is_err() {
                continue; // the request is gone
            }
            carry_out(&WasmHost, &mut WasmStream, chore);
        }
        let _ = abi::set_effective_context(self.id);
        if let Some(worker) = &self.worker {
            worker.schedule_tick(&mut WasmHost);
        }
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        callout: u32,
        num_headers: usize,
        body_size: usize,
        _: usize,
    ) {
        let Some(worker) = self.worker.clone() else {
            return;
        };
        // No headers: the endpoint closed the connection mid-response.
        let status = if num_headers == 0 {
            None
        } else {
            abi::get_header(HeaderMap::CallResponse, ":status")
                .ok()
                .flatten()
                .and_then(|s| std::str::from_utf8(&s).ok()?.parse().ok())
        };
        let body = if status.is_some() {
            let limit = body_size.min(worker.callout_body_limit());
            abi::get_buffer(Buffer::CallResponseBody, 0, limit).unwrap_or_default()
        } else {
            Vec::new()
        };
        let response = CalloutResponse { status, body };
        let chores = worker.on_callout_response(&mut WasmHost, callout, &response);
        self.carry_out(chores);
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let host = &mut WasmHost;
        let json = match abi::get_buffer(Buffer::PluginConfiguration, 0, size) {
            Ok(json) => json,
            Err(status) => {
                log(
                    host,
                    Level::Error,
                    format_args!(
                        "azure-openai-filter: could not read the plugin configuration (host status {})",
                        status.0
                    ),
                );
                return false;
            }
        };
        let config = match Config::from_json(&json, &|name| std::env::var(name).ok()) {
            Ok(config) => Rc::new(config),
            Err(error) => {
                // Returning false makes Envoy refuse the configuration.
                log(
                    host,
                    Level::Error,
                    format_args!("azure-openai-filter: configuration refused: {error}"),
                );
                return false;
            }
        };
        log(
            host,
            Level::Info,
            format_args!(
                "azure-openai-filter {} configured: {} upstream(s), {} model(s), {} caller(s), {} token credential(s)",
                env!("CARGO_PKG_VERSION"),
                config.upstreams.len(),
                config.models.len(),
                config.callers.len(),
                config.credentials.len()
            ),
        );
        let seed = abi::now_ms() ^ (u64::from(self.id) << 32);
        self.worker = Some(Rc::new(Worker::new(config, seed, host)));
        true
    }

    fn on_tick(&mut self) {
        let Some(worker) = self.worker.clone() else {
            return;
        };
        let chores = worker.on_tick(&mut WasmHost);
        self.carry_out(chores);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request::new(context_id, self.worker.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
