//! The root context: loads and validates the configuration, hands each
//! request context a shared reference to it, (when an upstream uses tokens)
//! drives token fetches and the requests waiting for them, and answers
//! requests whose body Envoy never delivers (see `body_watch`).

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use super::abi::{self, Buffer, HeaderMap};
use super::http::{apply_edits, send_error, Request, Shared};
use super::log;
use super::tokens::{Settlement, Tokens};
use crate::body_watch::BodyWatch;
use crate::config::Config;
use crate::errors::ApiError;
use crate::token::MAX_TOKEN_RESPONSE_BYTES;

/// The tick period while requests are held for a body not yet seen.
pub const WATCH_TICK_MS: u32 = 500;

pub struct Root {
    id: u32,
    shared: Shared,
    /// The missing-flag error has been logged (once per VM).
    reported_missing_flag: bool,
}

impl Root {
    pub fn new(id: u32) -> Self {
        Root {
            id,
            shared: Shared {
                config: None,
                tokens: None,
                body_watch: Rc::new(RefCell::new(BodyWatch::default())),
            },
            reported_missing_flag: false,
        }
    }

    /// Answers the held requests whose body Envoy will not deliver.
    fn answer_overdue(&mut self) {
        let overdue = match self.shared.body_watch.try_borrow_mut() {
            Ok(mut watch) => watch.overdue(abi::now_ms()),
            Err(_) => return,
        };
        if overdue.is_empty() {
            return;
        }
        if !self.reported_missing_flag {
            self.reported_missing_flag = true;
            log::error(format_args!(
                "azure-openai-filter: Envoy does not deliver request bodies to the filter, so \
                 every request whose model is in its body fails with 500: set \
                 `allow_on_headers_stop_iteration: true` in the Wasm filter's config"
            ));
        }
        for context_id in overdue {
            if abi::set_effective_context(context_id).is_ok() {
                log::debug(format_args!(
                    "request {context_id}: answered 500 gateway_error (no body delivered)"
                ));
                send_error(&ApiError::body_never_delivered());
            }
        }
        let _ = abi::set_effective_context(self.id);
    }

    /// Resumes or answers waiting requests. Runs with `Tokens` not
    /// borrowed: resuming a request may call back into this VM.
    fn carry_out(&mut self, settlements: Vec<Settlement>) {
        for settlement in settlements {
            let (context_id, outcome) = match settlement {
                Settlement::Resume { context_id, edits } => {
                    if abi::set_effective_context(context_id).is_err() {
                        continue; // the request is gone
                    }
                    let resumed = apply_edits(&edits).and_then(|()| abi::resume_request());
                    (
                        context_id,
                        resumed.map_err(|_| ApiError::internal("could not resume the request")),
                    )
                }
                Settlement::Fail { context_id, error } => {
                    if abi::set_effective_context(context_id).is_err() {
                        continue;
                    }
                    (context_id, Err(error))
                }
            };
            match outcome {
                Ok(()) => log::debug(format_args!("request {context_id}: token ready, forwarded")),
                Err(error) => {
                    log::debug(format_args!(
                        "request {context_id}: answered {} {}",
                        error.status, error.code
                    ));
                    send_error(&error);
                }
            }
        }
        let _ = abi::set_effective_context(self.id);
        self.schedule_tick();
    }

    /// Sets the tick period every time: a request that starts waiting
    /// shortens it to be served at once, and this puts it back (or stops
    /// the tick when nothing needs it).
    fn schedule_tick(&self) {
        let tokens = match &self.shared.tokens {
            Some(tokens) => match tokens.try_borrow() {
                Ok(tokens) => Some(tokens.tick_period_ms()),
                Err(_) => return,
            },
            None => None,
        };
        let watching = self
            .shared
            .body_watch
            .try_borrow()
            .map_or(true, |watch| watch.is_watching())
            .then_some(WATCH_TICK_MS);
        let period = match (tokens, watching) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(0),
        };
        let _ = abi::set_tick_period_ms(period);
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
        let Some(tokens) = self.shared.tokens.clone() else {
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
            abi::get_buffer(
                Buffer::CallResponseBody,
                0,
                body_size.min(MAX_TOKEN_RESPONSE_BYTES),
            )
            .unwrap_or_default()
        } else {
            Vec::new()
        };
        // Envoy defers callbacks made while the VM runs, so `Tokens` is never
        // borrowed here; were it, the answer would be dropped (the lease then
        // expires and another fetch follows) rather than panic.
        let Ok(mut borrowed) = tokens.try_borrow_mut() else {
            log::error(format_args!(
                "azure-openai-filter: token state busy; answer dropped"
            ));
            return;
        };
        let settlements = borrowed.on_response(callout, status, &body, abi::now_ms());
        drop(borrowed);
        self.carry_out(settlements);
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let json = match abi::get_buffer(Buffer::PluginConfiguration, 0, size) {
            Ok(json) => json,
            Err(status) => {
                log::error(format_args!(
                    "azure-openai-filter: could not read the plugin configuration (host status {})",
                    status.0
                ));
                return false;
            }
        };
        let config = match Config::from_json(&json, &|name| std::env::var(name).ok()) {
            Ok(config) => Rc::new(config),
            Err(error) => {
                // Returning false makes Envoy refuse the configuration.
                log::error(format_args!(
                    "azure-openai-filter: configuration refused: {error}"
                ));
                return false;
            }
        };
        log::info(format_args!(
            "azure-openai-filter {} configured: {} upstream(s), {} model(s), {} caller(s), {} token credential(s)",
            env!("CARGO_PKG_VERSION"),
            config.upstreams.len(),
            config.models.len(),
            config.callers.len(),
            config.credentials.len()
        ));
        self.shared.tokens = None;
        if !config.credentials.is_empty() {
            let seed = abi::now_ms() ^ (u64::from(self.id) << 32);
            let tokens = Tokens::new(config.clone(), seed);
            tokens.create_shared_entries();
            self.shared.tokens = Some(Rc::new(RefCell::new(tokens)));
            // The first tick fetches tokens before traffic needs them.
            self.schedule_tick();
        }
        self.shared.config = Some(config);
        true
    }

    fn on_tick(&mut self) {
        self.answer_overdue();
        let Some(tokens) = self.shared.tokens.clone() else {
            self.schedule_tick();
            return;
        };
        let Ok(mut borrowed) = tokens.try_borrow_mut() else {
            return; // busy: the next tick does the work
        };
        let settlements = borrowed.tick(abi::now_ms());
        drop(borrowed);
        self.carry_out(settlements);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request::new(context_id, self.shared.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
