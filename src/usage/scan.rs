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
        for &b in bytes {
            self.byte(b);
            self.pos += 1;
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
