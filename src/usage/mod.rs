//! Token usage, read from answers as they stream to the caller, never held:
//! the `usage` of a JSON answer (chat, completions, embeddings, images,
//! the Responses API), the usage event of a chat or completions stream, and
//! the `response.usage` of the Responses API's `response.completed` event.
//!
//! When the filter itself asked the upstream for a stream's usage
//! (`stream_options.include_usage`, which the caller had not), it also
//! takes out of the stream what that request added: the usage-only event,
//! and the `"usage": null` member of the other events, so the caller's
//! stream is what it would have been.

mod scan;
mod sse;

use crate::json::Json;
use scan::JsonScanner;
use sse::SseReader;

/// Tokens one answer reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
    pub cached_input: u64,
    pub reasoning_output: u64,
}

impl Usage {
    /// The tokens a caller's limit is charged: input (cached included) and
    /// output (reasoning included).
    pub fn total(&self) -> u64 {
        self.input.saturating_add(self.output)
    }

    /// Reads a `usage` object, in either naming (chat's
    /// `prompt_tokens`/`completion_tokens` or the Responses API's
    /// `input_tokens`/`output_tokens`). None when it holds no counts.
    pub fn from_json(bytes: &[u8]) -> Option<Usage> {
        let usage = Json::parse(bytes).ok()?;
        let count = |json: Option<&Json>| match json {
            Some(Json::Unsigned(n)) => Some(*n),
            _ => None,
        };
        let either = |a: &str, b: &str| count(usage.get(a)).or_else(|| count(usage.get(b)));
        let detail = |a: &str, b: &str, field: &str| {
            count(usage.get(a).and_then(|d| d.get(field)))
                .or_else(|| count(usage.get(b).and_then(|d| d.get(field))))
                .unwrap_or(0)
        };
        let input = either("prompt_tokens", "input_tokens");
        let output = either("completion_tokens", "output_tokens");
        if input.is_none() && output.is_none() {
            return None;
        }
        Some(Usage {
            input: input.unwrap_or(0),
            output: output.unwrap_or(0),
            cached_input: detail(
                "prompt_tokens_details",
                "input_tokens_details",
                "cached_tokens",
            ),
            reasoning_output: detail(
                "completion_tokens_details",
                "output_tokens_details",
                "reasoning_tokens",
            ),
        })
    }
}

/// Where an answer keeps its usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A JSON answer: top-level `usage`.
    Json,
    /// A chat/completions stream: the usage event's top-level `usage`.
    ChatStream,
    /// A Responses API stream: `response.usage` of `response.completed`.
    ResponsesStream,
}

/// A JSON answer's bytes are kept (they are read into the VM anyway) up to
/// this much, and looked at once whole; a longer one is scanned as it comes.
const KEEP_JSON: usize = 64 * 1024;

/// Reads one answer's usage from its body, piece by piece.
#[derive(Debug)]
pub enum UsageReader {
    Json(Vec<u8>),
    LongJson(JsonScanner),
    Stream(SseReader),
}

impl UsageReader {
    /// `strip`: the filter asked for this stream's usage; take what that
    /// added out of it (see the module's doc).
    pub fn new(shape: Shape, strip: bool) -> Self {
        match shape {
            Shape::Json => UsageReader::Json(Vec::new()),
            Shape::ChatStream => UsageReader::Stream(SseReader::new(&["usage"], strip)),
            Shape::ResponsesStream => {
                UsageReader::Stream(SseReader::new(&["response", "usage"], false))
            }
        }
    }

    /// The next piece of the body; for a stream being stripped, what the
    /// caller gets instead of the piece (None: the piece as it is).
    pub fn feed(&mut self, piece: &[u8], last: bool) -> Option<Vec<u8>> {
        match self {
            UsageReader::Json(kept) if kept.len() + piece.len() <= KEEP_JSON => {
                kept.extend_from_slice(piece);
                None
            }
            UsageReader::Json(kept) => {
                let mut scanner = JsonScanner::new(&["usage"]);
                scanner.feed(kept);
                scanner.feed(piece);
                *self = UsageReader::LongJson(scanner);
                None
            }
            UsageReader::LongJson(scanner) => {
                scanner.feed(piece);
                None
            }
            UsageReader::Stream(reader) => reader.feed(piece, last),
        }
    }

    /// The usage the answer reported (once its body is whole).
    pub fn usage(&self) -> Option<Usage> {
        match self {
            UsageReader::Json(kept) => {
                Usage::from_json(scan::find_in(kept, &["usage"])?.value.as_deref()?)
            }
            UsageReader::LongJson(scanner) => Usage::from_json(scanner.found()?.value.as_deref()?),
            UsageReader::Stream(reader) => reader.usage(),
        }
    }
}

#[cfg(test)]
mod tests;
