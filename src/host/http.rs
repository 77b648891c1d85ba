//! A request context: each proxy-wasm callback hands the request's
//! [`Exchange`] the VM's host and the request's stream, and returns what it
//! answers.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use super::abi::{self, Buffer, HeaderMap};
use super::bindings::{WasmHost, WasmStream};
use crate::exchange::Exchange;
use crate::host_api::{CalloutReply, Flow};
use crate::worker::Worker;

pub struct Request {
    exchange: Exchange,
}

impl Request {
    pub fn new(id: u32, worker: Option<Rc<Worker>>) -> Self {
        Request {
            exchange: Exchange::new(id, worker),
        }
    }
}

fn action(flow: Flow) -> Action {
    match flow {
        Flow::Continue => Action::Continue,
        Flow::Pause => Action::Pause,
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        self.exchange.on_done(&mut WasmHost);
    }
}

impl Context for Request {
    /// A callout this request sent (a failover attempt) came back.
    fn on_http_call_response(
        &mut self,
        callout: u32,
        num_headers: usize,
        body_size: usize,
        _: usize,
    ) {
        // No headers: the connection closed before an answer.
        let headers = if num_headers == 0 {
            Vec::new()
        } else {
            abi::get_headers(HeaderMap::CallResponse).unwrap_or_default()
        };
        let body = if headers.is_empty() {
            Vec::new()
        } else {
            abi::get_buffer(Buffer::CallResponseBody, 0, body_size).unwrap_or_default()
        };
        let reply = CalloutReply { headers, body };
        self.exchange
            .on_callout_response(&mut WasmHost, &mut WasmStream, callout, reply);
    }
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        action(
            self.exchange
                .on_request_headers(&mut WasmHost, &mut WasmStream, end_of_stream),
        )
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(self.exchange.on_request_body(
            &mut WasmHost,
            &mut WasmStream,
            body_size,
            end_of_stream,
        ))
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        action(
            self.exchange
                .on_request_trailers(&mut WasmHost, &mut WasmStream),
        )
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        action(
            self.exchange
                .on_response_headers(&mut WasmHost, &mut WasmStream, end_of_stream),
        )
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(self.exchange.on_response_body(
            &mut WasmHost,
            &mut WasmStream,
            body_size,
            end_of_stream,
        ))
    }
}
