//! Finds one member of a JSON document (`usage`, or `response.usage`) in
//! a single pass over bytes fed in any pieces, without holding the document:
//! only the member's value is kept (bounded). Built for answers the upstream
//! sends, which are well-formed JSON; on anything odd it simply finds
//! nothing.

use std::ops::Range;

/// The largest value kept (a `usage` object is a few hundred bytes).
const MAX_VALUE: usize = 8 * 1024;
/// Nesting deeper than this is skipped, not tracked.
const MAX_DEPTH: usize = 64;
/// Keys longer than this cannot match a path segment.
const MAX_KEY: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// An object; whether the next string is a key.
    Object {
        expect_key: bool,
    },
    Array,
}

/// What the scan found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The value's bytes (None when it was longer than the bound).
    pub value: Option<Vec<u8>>,
    /// Where the member (key to the end of its value) sits.
    pub member: Range<usize>,
    /// The separator before the member, when it has one.
    pub comma_before: Option<usize>,
}

#[derive(Debug)]
pub struct JsonScanner {
    path: &'static [&'static str],
    /// Absolute offset of the next byte.
    pos: usize,
    stack: Vec<Frame>,
    /// Deeper nesting than MAX_DEPTH, counted only.
    overflow: usize,
    in_string: bool,
    escape: bool,
    string_is_key: bool,
    in_scalar: bool,
    key: Vec<u8>,
    key_start: usize,
    /// Path segments matched by the objects we are in.
    matched: usize,
    /// The key just read matches the next segment.
    key_matches: bool,
    /// Depth (stack length) of the frames entered through a matching key.
    entered: Vec<usize>,
    /// The most recent separator of the object the path points into.
    last_comma: Option<usize>,
    capture: Option<Capture>,
    found: Option<Found>,
}

#[derive(Debug)]
struct Capture {
    /// Stack length before the value.
    depth: usize,
    member_start: usize,
    comma_before: Option<usize>,
    bytes: Vec<u8>,
    too_long: bool,
}

impl JsonScanner {
    pub fn new(path: &'static [&'static str]) -> Self {
        JsonScanner {
            path,
            pos: 0,
            stack: Vec::new(),
            overflow: 0,
            in_string: false,
            escape: false,
            string_is_key: false,
            in_scalar: false,
            key: Vec::new(),
            key_start: 0,
            matched: 0,
            key_matches: false,
            entered: Vec::new(),
            last_comma: None,
            capture: None,
            found: None,
        }
    }

    /// The member, once its value has been read whole (the last one, if the
    /// document has several).
    pub fn found(&self) -> Option<&Found> {
        self.found.as_ref()
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        let mut at = 0;
        while let Some(&b) = bytes.get(at) {
            // Most of an answer is string content: skip to the string's next
            // quote or backslash at once, unless the bytes are kept.
            if self.in_string && !self.escape && !self.string_is_key && self.capture.is_none() {
                let rest = bytes.get(at..).unwrap_or_default();
                let skip = rest
                    .iter()
                    .position(|&c| c == b'"' || c == b'\\')
                    .unwrap_or(rest.len());
                if skip > 0 {
                    at += skip;
                    self.pos += skip;
                    continue;
                }
            }
            self.byte(b);
            self.pos += 1;
            at += 1;
        }
    }

    fn depth(&self) -> usize {
        self.stack.len() + self.overflow
    }

    fn byte(&mut self, b: u8) {
        if self.in_string {
            self.keep(b);
            if self.escape {
                self.escape = false;
                self.push_key(b);
            } else if b == b'\\' {
                self.escape = true;
                self.push_key(b);
            } else if b == b'"' {
                self.in_string = false;
                if self.string_is_key {
                    self.end_key();
                } else {
                    self.value_end(self.pos + 1);
                }
            } else {
                self.push_key(b);
            }
            return;
        }
        if self.in_scalar && matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'\n') {
            self.in_scalar = false;
            self.value_end(self.pos);
        }
        match b {
            b'"' => {
                let is_key = matches!(self.stack.last(), Some(Frame::Object { expect_key: true }))
                    && self.overflow == 0;
                if is_key {
                    self.string_is_key = true;
                    self.key.clear();
                    self.key_start = self.pos;
                } else {
                    self.string_is_key = false;
                    self.value_start(false);
                }
                self.in_string = true;
                self.keep(b);
            }
            b'{' | b'[' => {
                self.value_start(b == b'{');
                self.keep(b);
                let entering = std::mem::take(&mut self.key_matches);
                if self.stack.len() >= MAX_DEPTH || self.overflow > 0 {
                    self.overflow += 1;
                    return;
                }
                if b == b'{' {
                    self.stack.push(Frame::Object { expect_key: true });
                    if entering {
                        self.matched += 1;
                        self.entered.push(self.stack.len());
                        self.last_comma = None;
                    }
                } else {
                    self.stack.push(Frame::Array);
                }
            }
            b'}' | b']' => {
                self.keep(b);
                if self.overflow > 0 {
                    self.overflow -= 1;
                } else {
                    if self.entered.last() == Some(&self.stack.len()) {
                        self.entered.pop();
                        self.matched = self.matched.saturating_sub(1);
                    }
                    self.stack.pop();
                }
                self.value_end(self.pos + 1);
            }
            b':' => {
                self.keep(b);
                if let Some(Frame::Object { expect_key }) = self.stack.last_mut() {
                    *expect_key = false;
                }
            }
            b',' => {
                self.keep(b);
                if self.overflow == 0 {
                    if let Some(Frame::Object { expect_key }) = self.stack.last_mut() {
                        *expect_key = true;
                    }
                    if self.stack.len() == self.matched + 1 {
                        self.last_comma = Some(self.pos);
                    }
                }
            }
            b' ' | b'\t' | b'\r' | b'\n' => self.keep(b),
            _ => {
                if !self.in_scalar {
                    self.in_scalar = true;
                    self.value_start(false);
                }
                self.keep(b);
            }
        }
    }

    fn push_key(&mut self, b: u8) {
        if self.string_is_key && self.key.len() <= MAX_KEY {
            self.key.push(b);
        }
    }

    fn end_key(&mut self) {
        let at_path = self.stack.len() == self.matched + 1 && self.overflow == 0;
        self.key_matches = at_path
            && self
                .path
                .get(self.matched)
                .is_some_and(|segment| segment.as_bytes() == self.key.as_slice());
    }

    /// A value starts at the current depth (`object`: it is an object).
    fn value_start(&mut self, object: bool) {
        if !self.key_matches {
            return;
        }
        if self.matched + 1 == self.path.len() {
            if self.capture.is_none() {
                self.capture = Some(Capture {
                    depth: self.depth(),
                    member_start: self.key_start,
                    comma_before: self.last_comma,
                    bytes: Vec::new(),
                    too_long: false,
                });
            }
        } else if object {
            return; // entered by the object that opens now
        }
        self.key_matches = false;
    }

    /// A value ends at `end` (exclusive), back at its own depth.
    fn value_end(&mut self, end: usize) {
        let done = self
            .capture
            .as_ref()
            .is_some_and(|capture| capture.depth == self.depth());
        if done {
            if let Some(capture) = self.capture.take() {
                self.found = Some(Found {
                    value: (!capture.too_long).then_some(capture.bytes),
                    member: capture.member_start..end,
                    comma_before: capture.comma_before,
                });
            }
        }
    }

    fn keep(&mut self, b: u8) {
        if let Some(capture) = &mut self.capture {
            if capture.bytes.len() < MAX_VALUE {
                capture.bytes.push(b);
            } else {
                capture.too_long = true;
            }
        }
    }
}

/// Finds the member at `path` in a whole document: at once when it is the
/// document's last top-level member (where Azure writes `usage`: its keys
/// come in alphabetical order), else by a scan; not at all when the key's
/// name is nowhere in the document.
pub fn find_in(document: &[u8], path: &'static [&'static str]) -> Option<Found> {
    let key = path.last()?;
    if let [only] = path {
        if let Some(found) = last_member(document, only) {
            return Some(found);
        }
    }
    let mut quoted = Vec::with_capacity(key.len() + 2);
    quoted.push(b'"');
    quoted.extend_from_slice(key.as_bytes());
    quoted.push(b'"');
    crate::bytes::find(document, &quoted)?;
    let mut scanner = JsonScanner::new(path);
    scanner.feed(document);
    scanner.found
}

/// The position after the last non-whitespace byte before `end`.
fn trim_end(document: &[u8], end: usize) -> usize {
    let mut end = end.min(document.len());
    while end > 0 && document.get(end - 1).is_some_and(u8::is_ascii_whitespace) {
        end -= 1;
    }
    end
}

/// `key` as the last member of a document's top-level object, with an
/// object or `null` for value, read from the end: `,"key":{...}}`.
fn last_member(document: &[u8], key: &str) -> Option<Found> {
    let close = trim_end(document, document.len()).checked_sub(1)?;
    if document.get(close) != Some(&b'}') {
        return None;
    }
    let value_end = trim_end(document, close);
    let value_start = match document.get(value_end.checked_sub(1)?)? {
        b'}' => {
            // Back to the matching brace, over strings (whose braces do
            // not count; a quote is escaped after an odd run of backslashes).
            let mut depth = 0usize;
            let mut at = value_end;
            loop {
                at = at.checked_sub(1)?;
                match document.get(at)? {
                    b'}' => depth += 1,
                    b'{' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            break at;
                        }
                    }
                    b'"' => loop {
                        at = at.checked_sub(1)?;
                        if document.get(at)? == &b'"' {
                            let backslashes = document
                                .get(..at)?
                                .iter()
                                .rev()
                                .take_while(|&&b| b == b'\\')
                                .count();
                            if backslashes % 2 == 0 {
                                break;
                            }
                        }
                    },
                    _ => {}
                }
            }
        }
        b'l' if document.get(..value_end)?.ends_with(b"null") => value_end - 4,
        _ => return None,
    };
    let colon = trim_end(document, value_start).checked_sub(1)?;
    if document.get(colon) != Some(&b':') {
        return None;
    }
    let key_end = trim_end(document, colon);
    let key_start = key_end.checked_sub(key.len() + 2)?;
    let quoted = document.get(key_start..key_end)?;
    if quoted.first() != Some(&b'"')
        || quoted.last() != Some(&b'"')
        || quoted.get(1..quoted.len() - 1)? != key.as_bytes()
    {
        return None;
    }
    let before = trim_end(document, key_start).checked_sub(1)?;
    let comma_before = match document.get(before)? {
        b',' => Some(before),
        // The first member: that brace must open the document.
        b'{' if trim_end(document, before) == 0 => None,
        _ => return None,
    };
    Some(Found {
        value: document.get(value_start..value_end).map(<[u8]>::to_vec),
        member: key_start..value_end,
        comma_before,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both(document: &str, path: &'static [&'static str]) -> (Option<Found>, Option<Found>) {
        let mut scanner = JsonScanner::new(path);
        scanner.feed(document.as_bytes());
        (find_in(document.as_bytes(), path), scanner.found)
    }

    #[test]
    fn the_fast_path_agrees_with_the_scan() {
        for document in [
            r#"{"a":1,"usage":{"prompt_tokens":1,"x":{"y":2}}}"#,
            "{ \"usage\" : { \"prompt_tokens\" : 1 } }\n",
            r#"{"id":"x","usage":null}"#,
            r#"{"usage":{"p":1},"user":null}"#,
            r#"{"a":{"b":1,"usage":{"p":9}}}"#,
            r#"{"a":"\"usage\":{\"p\":1}"}"#,
            r#"{"a":[{"usage":{"p":1}}]}"#,
            r#"{"usage":{"note":"}"}}"#,
            r#"{"usage":{"note":"{\"}"}}"#,
            r#"{"usage":{"note":"a\\"}}"#,
            r#"{"x":1,"usage":1}"#,
            r#"["usage",{"usage":{}}]"#,
            r#"{"usage\u0022":{"p":1}}"#,
        ] {
            let (fast, scanned) = both(document, &["usage"]);
            assert_eq!(fast, scanned, "{document}");
        }
        let responses = r#"{"type":"response.completed","response":{"id":"r","usage":{"input_tokens":3},"user":null}}"#;
        let (fast, scanned) = both(responses, &["response", "usage"]);
        assert!(fast.is_some());
        assert_eq!(fast, scanned);
        assert_eq!(find_in(br#"{"a":1}"#, &["usage"]), None);
    }
}
