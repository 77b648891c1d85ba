//! The root context: loads and validates the configuration, then hands each
//! request context a shared reference to it.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use super::abi::{self, Buffer};
use super::http::Request;
use super::log;
use crate::config::Config;

#[derive(Default)]
pub struct Root {
    config: Option<Rc<Config>>,
}

impl Context for Root {}

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
        match Config::from_json(&json, &|name| std::env::var(name).ok()) {
            Ok(config) => {
                log::info(format_args!(
                    "azure-openai-filter {} configured: {} upstream(s), {} model(s), {} caller(s)",
                    env!("CARGO_PKG_VERSION"),
                    config.upstreams.len(),
                    config.models.len(),
                    config.callers.len()
                ));
                self.config = Some(Rc::new(config));
                true
            }
            Err(error) => {
                // Returning false makes Envoy refuse the configuration.
                log::error(format_args!(
                    "azure-openai-filter: configuration refused: {error}"
                ));
                false
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request::new(context_id, self.config.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
