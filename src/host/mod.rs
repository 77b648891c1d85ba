//! The proxy-wasm layer: the seam's traits bound to proxy-wasm host calls,
//! and the contexts Envoy calls, which hand each callback to the logic
//! (`exchange`, `worker`) and apply its answer.

mod abi;
mod bindings;
mod http;
mod log;
mod root;

use proxy_wasm::traits::RootContext;

proxy_wasm::main! {{
    // With panic = "abort" a panic still runs this hook first, so the reason
    // reaches Envoy's log before the VM stops.
    std::panic::set_hook(Box::new(|info| {
        abi::log(abi::LogLevel::Critical, &format!("azure-openai-filter panicked: {info}"));
    }));
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> { Box::new(root::Root::new(context_id)) });
}}
