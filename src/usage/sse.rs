//! Server-sent events read as they pass: each event's `data` is scanned for
//! usage; when stripping, what the filter's own `include_usage` added is
//! taken out of the events on their way to the caller.

use super::scan::find_in;
use super::Usage;

/// An event longer than this is passed through unread.
const MAX_EVENT: usize = 4 * 1024 * 1024;

#[derive(Debug)]
pub struct SseReader {
    path: &'static [&'static str],
    strip: bool,
    /// The unfinished event: bytes after the last event boundary.
    pending: Vec<u8>,
    /// The unfinished event is too long: skip to its end.
    skipping: bool,
    usage: Option<Usage>,
}

impl SseReader {
    pub fn new(path: &'static [&'static str], strip: bool) -> Self {
        SseReader {
            path,
            strip,
            pending: Vec::new(),
            skipping: false,
            usage: None,
        }
    }

    /// The last usage an event reported.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// The next piece of the stream (`last`: the stream ends with it). When
    /// stripping, returns what the caller gets instead, if it differs: the
    /// finished events (an unfinished one waits for the next piece).
    pub fn feed(&mut self, piece: &[u8], last: bool) -> Option<Vec<u8>> {
        let held_before = !self.pending.is_empty();
        // Where the last finished event in `pending + piece` ends.
        let end = last_boundary(&self.pending, piece);
        let mut out = Vec::new();
        let mut changed = false;
        match end {
            Some(end) => {
                let mut events = std::mem::take(&mut self.pending);
                let (head, tail) = piece.split_at(end.min(piece.len()));
                events.extend_from_slice(head);
                if !self.skipping {
                    changed |= self.events(&events, &mut out);
                } else {
                    out.extend_from_slice(&events);
                }
                self.skipping = false;
                self.pending.extend_from_slice(tail);
            }
            None => self.pending.extend_from_slice(piece),
        }
        if self.pending.len() > MAX_EVENT {
            // Too long to read: let what there is go, and skip to its end.
            self.skipping = true;
            out.extend_from_slice(&std::mem::take(&mut self.pending));
        }
        if last && !self.pending.is_empty() {
            let rest = std::mem::take(&mut self.pending);
            if self.skipping {
                out.extend_from_slice(&rest);
            } else {
                changed |= self.events(&rest, &mut out);
            }
        }
        if !self.strip {
            return None;
        }
        let held_now = !self.pending.is_empty();
        (changed || held_before || held_now).then_some(out)
    }

    /// Reads finished events; appends what the caller gets of them to `out`.
    /// True if that differs from the events.
    fn events(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> bool {
        let mut changed = false;
        let mut rest = bytes;
        while !rest.is_empty() {
            let len = event_len(rest);
            let (event, after) = rest.split_at(len);
            rest = after;
            match self.event(event) {
                Keep::Whole => out.extend_from_slice(event),
                Keep::Drop => changed = true,
                Keep::Without(range) => {
                    out.extend_from_slice(event.get(..range.start).unwrap_or_default());
                    out.extend_from_slice(event.get(range.end..).unwrap_or_default());
                    changed = true;
                }
            }
        }
        changed
    }

    fn event(&mut self, event: &[u8]) -> Keep {
        // Offset of the data within the event, when it is one line.
        let mut data_at = None;
        let mut data: Vec<&[u8]> = Vec::new();
        let mut at = 0;
        for line in event.split_inclusive(|&b| b == b'\n') {
            let text = line.strip_suffix(b"\n").unwrap_or(line);
            let text = text.strip_suffix(b"\r").unwrap_or(text);
            if let Some(value) = text.strip_prefix(b"data:") {
                let (value, skipped) = match value.strip_prefix(b" ") {
                    Some(v) => (v, 6),
                    None => (value, 5),
                };
                data.push(value);
                data_at = Some(at + skipped);
            }
            at += line.len();
        }
        let data_lines = data.len();
        let joined;
        let document = match data.as_slice() {
            [one] => *one,
            many => {
                joined = many.join(&b"\n"[..]);
                &joined
            }
        };
        let Some(found) = find_in(document, self.path) else {
            return Keep::Whole;
        };
        let value = found.value.as_deref();
        let usage = value.and_then(Usage::from_json);
        if let Some(usage) = usage {
            self.usage = Some(usage);
        }
        if !self.strip {
            return Keep::Whole;
        }
        if usage.is_some() {
            return Keep::Drop; // the usage-only event the filter asked for
        }
        let (Some(data_at), 1, Some(b"null")) = (data_at, data_lines, value) else {
            return Keep::Whole;
        };
        // `"usage": null`, which the filter's include_usage added: cut it
        // and the comma that joins it to its neighbours.
        let member = found.member.clone();
        let range = match found.comma_before {
            Some(comma) => comma..member.end,
            None => {
                let after = event.get(data_at + member.end..).unwrap_or_default();
                let spaces = after.iter().take_while(|b| **b == b' ').count();
                if after.get(spaces) == Some(&b',') {
                    let more = after.get(spaces + 1..).unwrap_or_default();
                    let trailing = more.iter().take_while(|b| **b == b' ').count();
                    member.start..member.end + spaces + 1 + trailing
                } else {
                    member
                }
            }
        };
        Keep::Without(data_at + range.start..data_at + range.end)
    }
}

enum Keep {
    Whole,
    Drop,
    Without(std::ops::Range<usize>),
}

/// The end (in `piece`) of the last event boundary in `pending + piece`:
/// an empty line ends an event.
fn last_boundary(pending: &[u8], piece: &[u8]) -> Option<usize> {
    // A boundary is "\n\n" or "\n\r\n"; look back one or two bytes into
    // what is pending.
    let tail = pending.len().min(2);
    let mut joined = pending
        .get(pending.len() - tail..)
        .unwrap_or_default()
        .to_vec();
    joined.extend_from_slice(piece);
    let mut found = None;
    for (i, window) in joined.windows(2).enumerate() {
        let crlf_after_lf = window == b"\r\n" && i >= 1 && joined.get(i - 1) == Some(&b'\n');
        if window == b"\n\n" || crlf_after_lf {
            found = Some(i + 2);
        }
    }
    found.and_then(|end| end.checked_sub(tail))
}

/// The length of the first event in `bytes` (to and with its empty line),
/// or all of it.
fn event_len(bytes: &[u8]) -> usize {
    let mut previous_newline = false;
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'\n' {
            if previous_newline {
                return i + 1;
            }
            previous_newline = true;
        } else if b != b'\r' {
            previous_newline = false;
        }
        i += 1;
    }
    bytes.len()
}
