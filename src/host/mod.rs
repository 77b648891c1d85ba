//! The proxy-wasm layer: reads from Envoy, asks the logic, applies the answer.

mod abi;
mod http;
mod log;
mod metrics;
mod root;
mod tokens;

use proxy_wasm::traits::RootContext;

proxy_wasm::main! {{
    // With panic = "abort" a panic still runs this hook first, so the reason
    // reaches Envoy's log before the VM stops.
    std::panic::set_hook(Box::new(|info| {
        abi::log(abi::LogLevel::Critical, &format!("azure-openai-filter panicked: {info}"));
    }));
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> { Box::new(root::Root::new(context_id)) });
}}
