//! The `model` field of a multipart/form-data body (audio transcriptions
//! and translations, image edits), found in one pass over the body as it
//! arrives: the scan reads Envoy's buffer through a read-ahead window of
//! 64 KiB, so each byte crosses into the VM about once and a 25 MB upload
//! never lands in the VM whole; the cost is linear in bytes whatever the
//! number of parts.
//!
//! Upstream servers parse forms differently (python-multipart behind
//! FastAPI and vLLM takes the last `Content-Disposition` header and the
//! last `name` parameter of a part and decodes RFC 2231 `name*=`; Werkzeug
//! takes the last `boundary` parameter and accepts bare-LF delimiters;
//! Python's `email` strips `<...>` around values). So the scan reads the
//! body strictly and refuses, rather than guesses at, anything two parsers
//! could read differently:
//! - the content type has exactly one `boundary` (1-70 RFC 2046 characters),
//!   no repeated or extended (`key*`) parameters, no backslashes;
//! - the body starts with the boundary (no preamble) and ends with the
//!   close delimiter (then at most whitespace); the boundary appears nowhere
//!   but as a delimiter at the start of a line;
//! - every part has exactly one `Content-Disposition`, of type `form-data`,
//!   with one plain `name` (letters, digits, `_ - . [ ]`) and no `name*`;
//!   part headers are `token: value` lines, unfolded, without control bytes;
//! - the `model` part carries no file name and no header but its
//!   disposition and a `text/plain` content type; no other part is named
//!   `model` but for case;
//! - at most [`MAX_PARTS`] parts.

use std::ops::Range;

use super::{BodyEdit, BodySource};
use crate::bytes::find as memmem;
use crate::errors::ApiError;

/// Parts a form may have (OpenAI's forms have a handful; Starlette refuses
/// more than 1000 fields).
pub const MAX_PARTS: usize = 1000;
const READ_AHEAD: usize = 64 * 1024;
const MAX_PART_HEADERS: usize = 16 * 1024;
const MAX_MODEL_VALUE: usize = 1024;
/// RFC 2046: a boundary is 1 to 70 characters.
const MAX_BOUNDARY: usize = 70;
const FIELD: &str = "model";

/// A text field's value and where its bytes sit in the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormField {
    pub value: String,
    pub span: Range<usize>,
}

/// The boundary from a `multipart/form-data; boundary=...` content type.
pub fn boundary(content_type: Option<&[u8]>) -> Result<Vec<u8>, ApiError> {
    let Some(content_type) = content_type else {
        return Err(ApiError::invalid_multipart(
            "this endpoint expects a multipart/form-data body",
        ));
    };
    let (media_type, params) = parameters(content_type)
        .map_err(|why| ApiError::invalid_multipart(&format!("the content type {why}")))?;
    // In lower case, as every client sends it: Werkzeug reads no form
    // under `MULTIPART/FORM-DATA`.
    if media_type != "multipart/form-data" {
        return Err(ApiError::invalid_multipart(
            "this endpoint expects a multipart/form-data body (the media type in lower case)",
        ));
    }
    // Starlette decodes field names in the declared charset (`m\0o\0d\0e\0l\0`
    // is `model` in UTF-16): only UTF-8 reads the same everywhere.
    let foreign_charset = params.iter().any(|(key, value)| {
        key == "charset"
            && !value.eq_ignore_ascii_case("utf-8")
            && !value.eq_ignore_ascii_case("us-ascii")
    });
    if foreign_charset {
        return Err(ApiError::invalid_multipart(
            "the content type declares a charset other than UTF-8",
        ));
    }
    let value = params
        .into_iter()
        .find(|(key, _)| key == "boundary")
        .map(|(_, value)| value)
        .ok_or_else(|| {
            ApiError::invalid_multipart("the multipart/form-data content type has no boundary")
        })?;
    let bchar = |b: u8| b.is_ascii_alphanumeric() || b"'()+_,-./:=? ".contains(&b);
    let valid = !value.is_empty()
        && value.len() <= MAX_BOUNDARY
        && value.bytes().all(bchar)
        && !value.ends_with(' ');
    if !valid {
        return Err(ApiError::invalid_multipart(
            "the multipart boundary is not valid (1 to 70 letters, digits or '()+_,-./:=? )",
        ));
    }
    Ok(value.into_bytes())
}

/// A header value's parameters, keys lower-cased.
type Params = Vec<(String, String)>;

/// A header value `type *( OWS ";" OWS key "=" value )` read strictly: the
/// type is returned as is, keys lower-cased. Refused: a repeated key, an
/// extended `key*` parameter, a backslash, a control or non-ASCII byte
/// outside a quoted string, an empty parameter, spaces around `=`.
fn parameters(value: &[u8]) -> Result<(String, Params), &'static str> {
    let mut at = 0;
    let skip_ows = |at: &mut usize| {
        while matches!(value.get(*at), Some(b' ' | b'\t')) {
            *at += 1;
        }
    };
    let token = |at: &mut usize, extra: &[u8]| -> String {
        let start = *at;
        while value
            .get(*at)
            .is_some_and(|&b| is_tchar(b) || extra.contains(&b))
        {
            *at += 1;
        }
        String::from_utf8_lossy(value.get(start..*at).unwrap_or_default()).into_owned()
    };
    if value.contains(&b'\\') {
        return Err("has a backslash");
    }
    skip_ows(&mut at);
    let kind = token(&mut at, b"/");
    if kind.is_empty() {
        return Err("is malformed");
    }
    let mut params: Params = Vec::new();
    loop {
        skip_ows(&mut at);
        match value.get(at) {
            None => return Ok((kind, params)),
            Some(b';') => at += 1,
            Some(_) => return Err("is malformed"),
        }
        skip_ows(&mut at);
        let key = token(&mut at, b"").to_ascii_lowercase();
        if key.is_empty() {
            return Err("has an empty parameter");
        }
        if key.contains('*') {
            return Err("has an extended (RFC 2231) parameter");
        }
        // No space around `=`: Werkzeug then reads no parameter at all.
        if value.get(at) != Some(&b'=') {
            return Err("has a parameter without a value, or spaces around `=`");
        }
        at += 1;
        let item = if value.get(at) == Some(&b'"') {
            let start = at + 1;
            let len = value
                .get(start..)
                .and_then(|rest| rest.iter().position(|&b| b == b'"'))
                .ok_or("has an unclosed quote")?;
            let inner = value.get(start..start + len).unwrap_or_default();
            if inner.iter().any(|&b| b < 0x20 || b == 0x7f) {
                return Err("has a control character");
            }
            at = start + len + 1;
            String::from_utf8_lossy(inner).into_owned()
        } else {
            let item = token(&mut at, b"");
            if item.is_empty() {
                return Err("has a parameter without a value");
            }
            item
        };
        if params.iter().any(|(k, _)| *k == key) {
            return Err("repeats a parameter");
        }
        params.push((key, item));
    }
}

/// RFC 9110 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Where the scan is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Expecting the body to start with the boundary.
    Start,
    /// Just after a boundary: a part follows (CRLF) or the form ends (`--`).
    AfterBoundary,
    /// The headers of a part; the line break before them ends at `position`.
    Headers,
    /// A part's content from `start`; `model` if it is the model field.
    Content { start: usize, model: bool },
    /// After the close delimiter: only whitespace may follow.
    Epilogue,
}

/// Scans a form as its body arrives ([`FormScanner::advance`] with what is
/// there so far), and says what its `model` field holds as soon as that
/// part has been read.
#[derive(Debug)]
pub struct FormScanner {
    /// `--` and the boundary.
    dash_boundary: Vec<u8>,
    state: State,
    /// Bytes before this are scanned.
    position: usize,
    parts: usize,
    model: Option<FormField>,
    window: Window,
}

impl FormScanner {
    pub fn new(boundary: &[u8]) -> Self {
        let mut dash_boundary = b"--".to_vec();
        dash_boundary.extend_from_slice(boundary);
        FormScanner {
            dash_boundary,
            state: State::Start,
            position: 0,
            parts: 0,
            model: None,
            window: Window::default(),
        }
    }

    /// The `model` field, once its part has been read whole.
    pub fn field(&self) -> Option<&FormField> {
        self.model.as_ref()
    }

    #[cfg(test)]
    pub fn into_field(self) -> Option<FormField> {
        self.model
    }

    /// Scans as far as the `body.len()` bytes there are allow; `complete`
    /// once that is the whole body, which must then be a whole form.
    pub fn advance(&mut self, body: &mut dyn BodySource, complete: bool) -> Result<(), ApiError> {
        loop {
            let progressed = match self.state.clone() {
                State::Start => self.start(body)?,
                State::AfterBoundary => self.after_boundary(body)?,
                State::Headers => self.headers(body)?,
                State::Content { start, model } => self.content(body, start, model)?,
                State::Epilogue => return self.epilogue(body),
            };
            if !progressed {
                return if complete {
                    Err(ApiError::invalid_multipart(
                        "the multipart body is truncated",
                    ))
                } else {
                    Ok(())
                };
            }
        }
    }

    /// `want` bytes from `position` (fewer when the body has no more yet).
    fn peek(&mut self, body: &mut dyn BodySource, want: usize) -> Result<&[u8], ApiError> {
        let bytes = self.window.slice(body, self.position, want)?;
        Ok(bytes.get(..want).unwrap_or(bytes))
    }

    fn start(&mut self, body: &mut dyn BodySource) -> Result<bool, ApiError> {
        let len = self.dash_boundary.len();
        let head = self.peek(body, len)?.to_vec();
        if head.len() < len {
            if !self.dash_boundary.starts_with(&head) {
                return Err(no_leading_boundary());
            }
            return Ok(false);
        }
        if head != self.dash_boundary {
            return Err(no_leading_boundary());
        }
        self.position += len;
        self.state = State::AfterBoundary;
        Ok(true)
    }

    fn after_boundary(&mut self, body: &mut dyn BodySource) -> Result<bool, ApiError> {
        let next = self.peek(body, 2)?;
        match next {
            b"--" => {
                self.position += 2;
                self.state = State::Epilogue;
            }
            b"\r\n" => {
                self.parts += 1;
                if self.parts > MAX_PARTS {
                    return Err(ApiError::invalid_multipart(&format!(
                        "the form has more than {MAX_PARTS} parts"
                    )));
                }
                self.position += 2;
                self.state = State::Headers;
            }
            [b'-'] | [b'\r'] | [] => return Ok(false),
            _ => {
                return Err(ApiError::invalid_multipart(
                    "a boundary is not followed by a line break or `--`",
                ))
            }
        }
        Ok(true)
    }

    fn headers(&mut self, body: &mut dyn BodySource) -> Result<bool, ApiError> {
        // The line break after the boundary is part of the search, so a part
        // without headers (an empty line at once) is found too.
        let from = self.position - 2;
        let window = self.window.slice(body, from, MAX_PART_HEADERS + 4)?;
        let window = window.get(..MAX_PART_HEADERS + 4).unwrap_or(window);
        let Some(end) = memmem(window, b"\r\n\r\n") else {
            if window.len() >= MAX_PART_HEADERS + 4 {
                return Err(ApiError::invalid_multipart("a part's headers are too long"));
            }
            return Ok(false);
        };
        let block = window.get(2..end).unwrap_or_default();
        if memmem(block, &self.dash_boundary).is_some() {
            return Err(stray_boundary());
        }
        let part = read_part_headers(block)?;
        let model = part.name == FIELD;
        if model {
            if self.model.is_some() {
                return Err(ApiError::invalid_multipart(
                    "the form has more than one `model` field; send exactly one",
                ));
            }
            part.check_as_model()?;
        } else if part.name.eq_ignore_ascii_case(FIELD) {
            return Err(ApiError::invalid_multipart(&format!(
                "the form has a field `{}` that differs from `model` only in case",
                part.name
            )));
        }
        let start = from + end + 4;
        self.position = start;
        self.state = State::Content { start, model };
        Ok(true)
    }

    fn content(
        &mut self,
        body: &mut dyn BodySource,
        start: usize,
        model: bool,
    ) -> Result<bool, ApiError> {
        let needle_len = self.dash_boundary.len();
        // A boundary must follow a line break: look two bytes back.
        let lookbehind = (self.position - start).min(2);
        let from = self.position - lookbehind;
        let window = self.window.slice(body, from, READ_AHEAD)?;
        let Some(at) = memmem(window, &self.dash_boundary) else {
            // Every position where a whole boundary fits has been looked at;
            // the next one to look at may start a boundary cut by the end.
            let next = (from + window.len() + 1)
                .saturating_sub(needle_len)
                .max(self.position);
            if model && next - start > MAX_MODEL_VALUE + 2 {
                return Err(ApiError::invalid_multipart("the `model` field is too long"));
            }
            let progressed = next > self.position;
            self.position = next;
            return Ok(progressed);
        };
        let found = from + at;
        let line_break = at.checked_sub(2).and_then(|b| window.get(b..at));
        if found < start + 2 || line_break != Some(b"\r\n") {
            return Err(stray_boundary());
        }
        if model {
            let span = start..found - 2;
            if span.len() > MAX_MODEL_VALUE {
                return Err(ApiError::invalid_multipart("the `model` field is too long"));
            }
            // The value may have been scanned in pieces: read it again (it is short).
            let bytes = self.window.slice(body, span.start, span.len())?;
            let bytes = bytes.get(..span.len()).unwrap_or_default().to_vec();
            let value = String::from_utf8(bytes)
                .map_err(|_| ApiError::invalid_multipart("the `model` field is not UTF-8 text"))?;
            self.model = Some(FormField { value, span });
        }
        self.position = found + needle_len;
        self.state = State::AfterBoundary;
        Ok(true)
    }

    fn epilogue(&mut self, body: &mut dyn BodySource) -> Result<(), ApiError> {
        loop {
            let rest = self.peek(body, READ_AHEAD)?;
            if rest.is_empty() {
                return Ok(());
            }
            if !rest.iter().all(|b| b" \t\r\n".contains(b)) {
                return Err(ApiError::invalid_multipart(
                    "the body goes on after the closing boundary",
                ));
            }
            self.position += rest.len();
        }
    }
}

fn no_leading_boundary() -> ApiError {
    ApiError::invalid_multipart(
        "the body does not start with the boundary the content type declares",
    )
}

fn stray_boundary() -> ApiError {
    ApiError::invalid_multipart(
        "the boundary appears inside a part or not at the start of a line; choose another boundary",
    )
}

/// What a part's headers say.
struct PartHeaders {
    name: String,
    filename: bool,
    content_type: Option<Vec<u8>>,
    others: usize,
}

impl PartHeaders {
    /// The model part is plain text: no file, no other encoding.
    fn check_as_model(&self) -> Result<(), ApiError> {
        if self.filename {
            return Err(ApiError::invalid_multipart(
                "the `model` field is a file; send it as a text field",
            ));
        }
        if self.others > 0 {
            return Err(ApiError::invalid_multipart(
                "the `model` field has headers other than Content-Disposition and Content-Type",
            ));
        }
        if let Some(content_type) = &self.content_type {
            let plain = parameters(content_type).is_ok_and(|(kind, params)| {
                kind.eq_ignore_ascii_case("text/plain")
                    && params
                        .iter()
                        .all(|(k, v)| k == "charset" && v.eq_ignore_ascii_case("utf-8"))
            });
            if !plain {
                return Err(ApiError::invalid_multipart(
                    "the `model` field must be text/plain (UTF-8)",
                ));
            }
        }
        Ok(())
    }
}

/// Reads a part's header lines (`block` without the final empty line).
fn read_part_headers(block: &[u8]) -> Result<PartHeaders, ApiError> {
    let malformed = |what: &str| ApiError::invalid_multipart(&format!("a part's headers {what}"));
    let mut disposition: Option<&[u8]> = None;
    let mut content_type: Option<&[u8]> = None;
    let mut others = 0;
    let lines = if block.is_empty() {
        Vec::new()
    } else {
        split_crlf(block)
    };
    for line in lines {
        if line
            .iter()
            .any(|&b| b == b'\r' || b == b'\n' || b == 0 || b == 0x7f || (b < 0x20 && b != b'\t'))
        {
            return Err(malformed("have a control character or a bare line break"));
        }
        if matches!(line.first(), Some(b' ' | b'\t')) {
            return Err(malformed("are folded over several lines"));
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or_else(|| malformed("have a line without a colon"))?;
        let (name, value) = line.split_at(colon);
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return Err(malformed("have a malformed header name"));
        }
        let value = value.get(1..).unwrap_or_default();
        let slot = if name.eq_ignore_ascii_case(b"content-disposition") {
            &mut disposition
        } else if name.eq_ignore_ascii_case(b"content-type") {
            &mut content_type
        } else {
            others += 1;
            continue;
        };
        if slot.is_some() {
            return Err(malformed(&format!(
                "repeat {}",
                String::from_utf8_lossy(name)
            )));
        }
        *slot = Some(value);
    }
    let disposition =
        disposition.ok_or_else(|| malformed("have no Content-Disposition naming the part"))?;
    let (kind, params) = parameters(disposition).map_err(|why| {
        ApiError::invalid_multipart(&format!("a part's Content-Disposition {why}"))
    })?;
    if !kind.eq_ignore_ascii_case("form-data") {
        return Err(ApiError::invalid_multipart(
            "a part's Content-Disposition is not form-data",
        ));
    }
    let mut name = None;
    let mut filename = false;
    for (key, value) in params {
        match key.as_str() {
            "name" => name = Some(value),
            "filename" => filename = true,
            _ => {}
        }
    }
    let name = name.ok_or_else(|| malformed("have a Content-Disposition without a name"))?;
    let plain = !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.[]".contains(&b));
    if !plain {
        return Err(ApiError::invalid_multipart(
            "a form field name may hold only letters, digits and _ - . [ ]",
        ));
    }
    Ok(PartHeaders {
        name,
        filename,
        content_type: content_type.map(<[u8]>::to_vec),
        others,
    })
}

fn split_crlf(block: &[u8]) -> Vec<&[u8]> {
    let mut lines = Vec::new();
    let mut rest = block;
    while let Some(at) = memmem(rest, b"\r\n") {
        lines.push(rest.get(..at).unwrap_or_default());
        rest = rest.get(at + 2..).unwrap_or_default();
    }
    lines.push(rest);
    lines
}

/// A read-ahead cache over the body: bytes are fetched in pieces of 64 KiB
/// and dropped once the scan has passed them.
#[derive(Debug, Default)]
struct Window {
    start: usize,
    bytes: Vec<u8>,
}

impl Window {
    /// The body from `from`, at least `want` bytes of it where the body has
    /// them. Bytes before `from` are dropped only when more must be read,
    /// so each refill moves at most one window's worth.
    fn slice(
        &mut self,
        body: &mut dyn BodySource,
        from: usize,
        want: usize,
    ) -> Result<&[u8], ApiError> {
        let end = self.start + self.bytes.len();
        if from < self.start || from > end {
            self.start = from;
            self.bytes.clear();
        }
        let target = from.saturating_add(want).min(body.len());
        let end = self.start + self.bytes.len();
        if end < target {
            self.bytes.drain(..from - self.start);
            self.start = from;
            let read = (target - end).max(READ_AHEAD).min(body.len() - end);
            let more = body.read(end, read)?;
            self.bytes.extend_from_slice(&more);
        }
        Ok(self.bytes.get(from - self.start..).unwrap_or_default())
    }
}

/// Finds the form's `model` field in a whole body; None if it has none.
#[cfg(test)]
pub fn find_field(
    body: &mut dyn BodySource,
    boundary: &[u8],
) -> Result<Option<FormField>, ApiError> {
    let mut scanner = FormScanner::new(boundary);
    scanner.advance(body, true)?;
    Ok(scanner.into_field())
}

/// Puts `deployment` in the `model` field: its value replaced, or (when the
/// form has none) a `model` field added before the first part. Only a
/// prefix of the body is rewritten (Envoy replaces a prefix in place), so
/// when the field follows a file, the file is copied through the VM.
pub fn multipart_model_edit(
    body: &mut dyn BodySource,
    boundary: &[u8],
    field: Option<&FormField>,
    deployment: &str,
) -> Result<BodyEdit, ApiError> {
    if memmem(deployment.as_bytes(), boundary).is_some() {
        return Err(ApiError::invalid_multipart(
            "the boundary appears in the model's name upstream; choose another boundary",
        ));
    }
    match field {
        Some(field) => {
            let mut with = body.read(0, field.span.start)?;
            with.extend_from_slice(deployment.as_bytes());
            Ok(BodyEdit {
                replace: field.span.end,
                with,
                body_len: body.len(),
            })
        }
        None => {
            // The body starts with the boundary: the new part goes first.
            let mut with = b"--".to_vec();
            with.extend_from_slice(boundary);
            with.extend_from_slice(b"\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n");
            with.extend_from_slice(deployment.as_bytes());
            with.extend_from_slice(b"\r\n");
            Ok(BodyEdit {
                replace: 0,
                with,
                body_len: body.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: &[u8] = b"----formdata-abc123";

    fn part(name: &str, filename: Option<&str>, content: &[u8]) -> Vec<u8> {
        let mut out = b"------formdata-abc123\r\n".to_vec();
        match filename {
            Some(f) => out.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: audio/mpeg\r\n\r\n").as_bytes(),
            ),
            None => out.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes()),
        }
        out.extend_from_slice(content);
        out.extend_from_slice(b"\r\n");
        out
    }

    /// A part with these header lines, verbatim.
    fn raw_part(headers: &str, content: &[u8]) -> Vec<u8> {
        let mut out = b"------formdata-abc123\r\n".to_vec();
        out.extend_from_slice(headers.as_bytes());
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(content);
        out.extend_from_slice(b"\r\n");
        out
    }

    fn close() -> Vec<u8> {
        b"------formdata-abc123--\r\n".to_vec()
    }

    fn body(parts: &[Vec<u8>]) -> Vec<u8> {
        let mut out: Vec<u8> = parts.concat();
        out.extend(close());
        out
    }

    fn model(bytes: &[u8]) -> Result<Option<FormField>, ApiError> {
        let mut source: &[u8] = bytes;
        find_field(&mut source, B)
    }

    fn refused(bytes: &[u8]) -> String {
        let error = model(bytes).unwrap_err();
        assert_eq!((error.status, error.code), (400, "invalid_multipart"));
        error.message
    }

    #[test]
    fn boundary_from_content_type() {
        assert_eq!(
            boundary(Some(b"multipart/form-data; boundary=abc")).unwrap(),
            b"abc"
        );
        assert_eq!(
            boundary(Some(b"multipart/form-data;boundary=\"a b:c\"")).unwrap(),
            b"a b:c"
        );
        assert_eq!(
            boundary(Some(b"multipart/form-data; charset=UTF-8; Boundary=z")).unwrap(),
            b"z"
        );
        let longest = format!("multipart/form-data; boundary={}", "b".repeat(70));
        assert_eq!(boundary(Some(longest.as_bytes())).unwrap().len(), 70);
        for bad in [
            &b"application/json"[..],
            b"multipart/form-data",
            b"multipart/form-data; boundary=",
            b"multipart/form-data; boundary=\"abc",
            b"multipart/form-data; boundary=\"\"",
            b"multipart/mixed; boundary=abc",
            // Werkzeug reads the last boundary, others the first.
            b"multipart/form-data; boundary=a; boundary=b",
            b"multipart/form-data; boundary=a; BOUNDARY=b",
            b"multipart/form-data; boundary*=UTF-8''a",
            b"multipart/form-data; boundary=\"a\\\"b\"",
            b"multipart/form-data; boundary=\"a\x01b\"",
            b"multipart/form-data; boundary=\"ends with space \"",
            b"multipart/form-data; boundary=\"a\xffb\"",
            b"multipart/form-data; boundary=a;",
            b"multipart/form-data; boundary=\"a;b\"",
            b"multipart/form-data boundary=a",
            b"Multipart/Form-Data; boundary=a",
            b"multipart/form-data; charset=utf-16le; boundary=a",
            b"multipart/form-data; boundary =a",
            b"multipart/form-data; boundary= a",
        ] {
            let error = boundary(Some(bad)).unwrap_err();
            assert_eq!(
                (error.status, error.code),
                (400, "invalid_multipart"),
                "{bad:?}"
            );
        }
        let too_long = format!("multipart/form-data; boundary={}", "b".repeat(71));
        assert!(boundary(Some(too_long.as_bytes())).is_err());
        assert!(boundary(None).is_err());
    }

    #[test]
    fn model_before_the_file() {
        let audio = vec![0xffu8; 200_000];
        let bytes = body(&[
            part("model", None, b"whisper"),
            part("file", Some("a.mp3"), &audio),
        ]);
        let field = model(&bytes).unwrap().unwrap();
        assert_eq!(field.value, "whisper");
        assert_eq!(&bytes[field.span.clone()], b"whisper");
    }

    #[test]
    fn model_after_a_large_file_with_boundary_like_bytes() {
        // The file holds CRLF and dashes, and crosses several windows.
        let mut audio = Vec::new();
        while audio.len() < 300_000 {
            audio.extend_from_slice(b"\r\n----formdata-abc12\r\n--\x00\xff");
        }
        let bytes = body(&[
            part("file", Some("a.wav"), &audio),
            part("language", None, b"en"),
            part("model", None, b"whisper-1"),
        ]);
        let field = model(&bytes).unwrap().unwrap();
        assert_eq!(field.value, "whisper-1");
        assert_eq!(&bytes[field.span], b"whisper-1");
    }

    #[test]
    fn names_quoted_unquoted_and_field_lists() {
        let unquoted = raw_part("content-disposition: form-data; name=model", b"m1");
        assert_eq!(model(&body(&[unquoted])).unwrap().unwrap().value, "m1");
        let spaced = raw_part("Content-Disposition:form-data ;name=\"model\" ", b"m2");
        assert_eq!(model(&body(&[spaced])).unwrap().unwrap().value, "m2");
        let lists = body(&[
            part("timestamp_granularities[]", None, b"word"),
            part("image[]", Some("a.png"), b"png"),
            part("models", None, b"x"),
        ]);
        assert_eq!(model(&lists).unwrap(), None);
        let utf8_filename = raw_part(
            "Content-Disposition: form-data; name=\"file\"; filename=\"r\u{e9}sum\u{e9}; 1.mp3\"",
            b"data",
        );
        assert_eq!(model(&body(&[utf8_filename])).unwrap(), None);
    }

    #[test]
    fn part_headers_other_parsers_could_read_differently_are_refused() {
        for headers in [
            // python-multipart takes the last Content-Disposition and the last name.
            "Content-Disposition: form-data; name=\"file\"\r\nContent-Disposition: form-data; name=\"model\"",
            "Content-Disposition: form-data; name=\"language\"; name=\"model\"",
            "Content-Disposition: form-data; name=\"a\"; NAME=\"model\"",
            // RFC 2231 names, which the email package decodes.
            "Content-Disposition: form-data; name*=UTF-8''model",
            "Content-Disposition: form-data; name*0=mo; name*1=del",
            "Content-Disposition: form-data; name=\"x\"; filename*=UTF-8''a",
            // email.utils.unquote strips <...>.
            "Content-Disposition: form-data; name=<model>",
            "Content-Disposition: form-data; name=\"<model>\"",
            // Backslashes are read differently by different unquoters.
            "Content-Disposition: form-data; name=\"file\"; filename=\"a\\\"; name=model; x=\"",
            // Not form-data: other parsers ignore the type and read the name.
            "Content-Disposition: attachment; name=\"model\"",
            "Content-Disposition: form-data",
            "Content-Type: text/plain",
            "Content-Disposition: form-data; name=\"model\"\r\n folded: on",
            "Content-Disposition : form-data; name=\"model\"",
            "Content-Disposition: form-data; name=\"mo del\"",
            "Content-Disposition: form-data; name=\"Model\"",
            "Content-Disposition: form-data; name=\"model\"; filename=\"m.txt\"",
            "Content-Disposition: form-data; name=\"model\"\r\nContent-Transfer-Encoding: base64",
            "Content-Disposition: form-data; name=\"model\"\r\nContent-Type: text/plain; charset=utf-16",
            "Content-Disposition: form-data; name=\"model\"\r\nContent-Type: text/plain\r\nContent-Type: text/html",
            "Content-Disposition: form-data; name=\"model\"\x00",
            "Content-Disposition: form-data; name=\"model\"\nX-A: b",
            "Content-Disposition: form-data; name=model; x",
            "Content-Disposition: form-data; name = \"model\"",
            "Content-Disposition: form-data; name= \"model\"",
        ] {
            let bytes = body(&[raw_part(headers, b"dep-secret")]);
            refused(&bytes);
        }
        let text_plain = raw_part(
            "Content-Disposition: form-data; name=\"model\"\r\nContent-Type: text/plain; charset=UTF-8",
            b"m",
        );
        assert_eq!(model(&body(&[text_plain])).unwrap().unwrap().value, "m");
        let file_headers = raw_part(
            "Content-Disposition: form-data; name=\"file\"; filename=\"a\"\r\nContent-Type: audio/wav\r\nX-Extra: 1",
            b"RIFF",
        );
        assert_eq!(model(&body(&[file_headers])).unwrap(), None);
    }

    #[test]
    fn the_boundary_may_appear_only_as_a_delimiter() {
        let mut bytes = b"preamble text\r\n".to_vec();
        bytes.extend(body(&[part("model", None, b"m")]));
        assert!(refused(&bytes).contains("start with the boundary"));
        // Werkzeug accepts bare-LF delimiters: a part hidden in a file.
        let hidden = part(
            "file",
            Some("a"),
            b"x\n------formdata-abc123\nContent-Disposition: form-data; name=\"model\"\n\ndep-secret",
        );
        assert!(refused(&body(&[part("model", None, b"m"), hidden])).contains("boundary appears"));
        let mid_line = part("file", Some("a"), b"abc------formdata-abc123--");
        refused(&body(&[mid_line]));
        let in_headers = raw_part(
            "Content-Disposition: form-data; name=\"a\"; filename=\"------formdata-abc123\"",
            b"x",
        );
        refused(&body(&[in_headers]));
        let mut epilogue = body(&[part("model", None, b"m")]);
        epilogue.extend_from_slice(b"\r\n------formdata-abc123\r\n");
        refused(&epilogue);
        let mut trailing_text = body(&[part("model", None, b"m")]);
        trailing_text.extend_from_slice(b"more");
        refused(&trailing_text);
        let mut whitespace = body(&[part("model", None, b"m")]);
        whitespace.extend_from_slice(b"\r\n\r\n");
        assert_eq!(model(&whitespace).unwrap().unwrap().value, "m");
        // Padding after a boundary, which python-multipart refuses.
        let padded = b"------formdata-abc123 \r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm\r\n------formdata-abc123--";
        refused(padded);
        // Content right after the headers' empty line, no line break before the boundary.
        let glued = b"------formdata-abc123\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n------formdata-abc123--";
        refused(glued);
    }

    #[test]
    fn empty_value() {
        let field = model(&body(&[part("model", None, b"")])).unwrap().unwrap();
        assert_eq!(field.value, "");
        assert_eq!(field.span.start, field.span.end);
    }

    #[test]
    fn missing_model_is_none() {
        assert_eq!(
            model(&body(&[part("file", Some("a"), b"xx")])).unwrap(),
            None
        );
        assert_eq!(model(&close()).unwrap(), None);
    }

    #[test]
    fn malformed_bodies_are_400() {
        let good = body(&[
            part("model", None, b"whisper"),
            part("file", Some("a"), &[1u8; 1000]),
        ]);
        for cut in 0..good.len() - 2 {
            let error = model(&good[..cut]).unwrap_err();
            assert_eq!(
                (error.status, error.code),
                (400, "invalid_multipart"),
                "cut at {cut}"
            );
        }
        assert!(model(b"").is_err());
        assert!(model(b"no boundary here").is_err());
        assert!(model(b"------formdata-abc123XX").is_err());
        let two = body(&[part("model", None, b"a"), part("model", None, b"b")]);
        assert!(refused(&two).contains("more than one `model`"));
        let long = body(&[part("model", None, &[b'a'; 2000])]);
        assert!(refused(&long).contains("too long"));
        let longest = body(&[part("model", None, &[b'a'; MAX_MODEL_VALUE])]);
        assert_eq!(
            model(&longest).unwrap().unwrap().value.len(),
            MAX_MODEL_VALUE
        );
        let one_more = body(&[part("model", None, &[b'a'; MAX_MODEL_VALUE + 1])]);
        assert!(refused(&one_more).contains("too long"));
        let binary = body(&[part("model", None, b"\xff\xfe")]);
        assert!(refused(&binary).contains("UTF-8"));
    }

    #[test]
    fn part_count_is_capped() {
        let many: Vec<Vec<u8>> = (0..MAX_PARTS).map(|_| part("x", None, b"1")).collect();
        assert_eq!(model(&body(&many)).unwrap(), None);
        let mut too_many = many.clone();
        too_many.push(part("model", None, b"m"));
        assert!(refused(&body(&too_many)).contains("more than 1000 parts"));
    }

    #[test]
    fn long_part_headers_are_refused() {
        let name = format!(
            "Content-Disposition: form-data; name=\"a\"\r\nX-Pad: {}",
            "p".repeat(MAX_PART_HEADERS)
        );
        assert!(refused(&body(&[raw_part(&name, b"x")])).contains("too long"));
    }

    /// A body source that counts what it hands out.
    struct Counting<'a> {
        bytes: &'a [u8],
        available: usize,
        largest: usize,
        total: usize,
        reads: usize,
    }

    impl<'a> Counting<'a> {
        fn new(bytes: &'a [u8]) -> Self {
            Counting {
                bytes,
                available: bytes.len(),
                largest: 0,
                total: 0,
                reads: 0,
            }
        }
    }

    impl BodySource for Counting<'_> {
        fn len(&self) -> usize {
            self.available
        }
        fn read(&mut self, start: usize, len: usize) -> Result<Vec<u8>, ApiError> {
            let end = (start + len).min(self.available);
            let out = self
                .bytes
                .get(start.min(end)..end)
                .unwrap_or_default()
                .to_vec();
            self.largest = self.largest.max(out.len());
            self.total += out.len();
            // An empty read never reaches Envoy (the host layer returns at once).
            if !out.is_empty() {
                self.reads += 1;
            }
            Ok(out)
        }
    }

    #[test]
    fn reads_stay_within_a_window_and_each_byte_is_read_about_once() {
        let audio = vec![7u8; 3_000_000];
        let bytes = body(&[part("file", Some("a"), &audio), part("model", None, b"w")]);
        let mut source = Counting::new(&bytes);
        let mut scanner = FormScanner::new(B);
        scanner.advance(&mut source, true).unwrap();
        assert_eq!(scanner.field().unwrap().value, "w");
        assert!(source.largest <= READ_AHEAD + 64, "{}", source.largest);
        assert!(
            source.total < bytes.len() + bytes.len() / 100,
            "{}",
            source.total
        );
    }

    #[test]
    fn a_large_upload_is_read_in_few_large_pieces() {
        // Each read is a call into Envoy: a 3 MB upload takes about
        // 3 MB / 64 KiB of them, not one per line or per small chunk.
        let audio = vec![7u8; 3_000_000];
        let bytes = body(&[part("file", Some("a"), &audio), part("model", None, b"w")]);
        let mut source = Counting::new(&bytes);
        let mut scanner = FormScanner::new(B);
        scanner.advance(&mut source, true).unwrap();
        assert_eq!(scanner.field().unwrap().value, "w");
        assert!(
            source.reads <= bytes.len() / (64 * 1024) + 3,
            "{} reads",
            source.reads
        );
    }

    /// Feeds `bytes` to a scanner in pieces of `piece` bytes, as Envoy
    /// hands a body over; stops at the first refusal. Returns the outcome,
    /// how much of the body had arrived then, and the source's counts.
    fn scan_in_pieces(
        bytes: &[u8],
        piece: usize,
    ) -> (Result<Option<FormField>, ApiError>, usize, usize) {
        let mut source = Counting::new(bytes);
        source.available = 0;
        let mut scanner = FormScanner::new(B);
        while source.available < bytes.len() {
            source.available = (source.available + piece).min(bytes.len());
            let complete = source.available == bytes.len();
            if let Err(error) = scanner.advance(&mut source, complete) {
                return (Err(error), source.available, source.total);
            }
        }
        (Ok(scanner.into_field()), source.available, source.total)
    }

    #[test]
    fn fed_in_pieces_each_byte_is_read_about_once() {
        // Long part headers and a long upload, arriving a little at a time:
        // a piece that does not complete what the scan waits for must not
        // make it read again what it already holds.
        let headers = format!(
            "Content-Disposition: form-data; name=\"file\"; filename=\"a\"\r\nX-Pad: {}",
            "p".repeat(4000)
        );
        let audio: Vec<u8> = (0..=255u8).cycle().take(20_000).collect();
        let bytes = body(&[raw_part(&headers, &audio), part("model", None, b"w")]);
        for piece in [1usize, 10, 333] {
            let (outcome, _, total) = scan_in_pieces(&bytes, piece);
            assert_eq!(outcome.unwrap().unwrap().value, "w");
            assert!(
                total < bytes.len() + bytes.len() / 10,
                "piece {piece}: read {total} bytes of {}",
                bytes.len()
            );
        }
    }

    /// A form whose only part has a header block (its header lines with the
    /// line breaks between them) of `len` bytes.
    fn form_with_header_block(len: usize) -> Vec<u8> {
        let start = "Content-Disposition: form-data; name=\"file\"; filename=\"a\"\r\nX-Pad: ";
        let headers = format!("{start}{}", "p".repeat(len - start.len()));
        assert_eq!(headers.len(), len);
        body(&[raw_part(&headers, b"data"), part("model", None, b"m")])
    }

    #[test]
    fn part_headers_up_to_16_kib_are_read_whole_or_in_pieces() {
        // 16 KiB for the header block with the line break before it and the
        // empty line after it (2 + block + 4).
        let longest = form_with_header_block(16 * 1024 - 2);
        assert_eq!(model(&longest).unwrap().unwrap().value, "m");
        for piece in [1usize, 7, 4096] {
            let (outcome, _, _) = scan_in_pieces(&longest, piece);
            assert_eq!(outcome.unwrap().unwrap().value, "m", "piece {piece}");
        }
        let one_more = form_with_header_block(16 * 1024 - 1);
        assert!(refused(&one_more).contains("headers are too long"));
        let (outcome, _, _) = scan_in_pieces(&one_more, 7);
        assert!(outcome
            .unwrap_err()
            .message
            .contains("headers are too long"));
    }

    fn form_with_model_of(len: usize) -> Vec<u8> {
        body(&[
            part("model", None, &vec![b'a'; len]),
            part("file", Some("a"), b"data"),
        ])
    }

    #[test]
    fn the_longest_model_value_is_read_in_any_pieces() {
        let bytes = form_with_model_of(MAX_MODEL_VALUE);
        for piece in [1usize, 2, 3, 50] {
            let (outcome, _, _) = scan_in_pieces(&bytes, piece);
            assert_eq!(
                outcome.unwrap().unwrap().value.len(),
                MAX_MODEL_VALUE,
                "piece {piece}"
            );
        }
    }

    #[test]
    fn an_overlong_model_value_is_refused_before_the_rest_arrives() {
        // A file sent as the `model` field: refused once more than 1 KiB of
        // it (and a boundary's length) is in, not after the whole upload.
        let bytes = form_with_model_of(1_000_000);
        let value_start = memmem(&bytes, b"\r\n\r\n").unwrap() + 4;
        for piece in [1usize, 100] {
            let (outcome, arrived, _) = scan_in_pieces(&bytes, piece);
            assert!(outcome.unwrap_err().message.contains("too long"));
            assert!(
                arrived < value_start + 2 * 1024,
                "piece {piece}: refused with {} bytes of the value in",
                arrived - value_start
            );
        }
        // Whole, it is refused after reading the first windows, not the megabyte.
        let mut source = Counting::new(&bytes);
        let mut scanner = FormScanner::new(B);
        assert!(scanner.advance(&mut source, true).is_err());
        assert!(source.total <= 2 * READ_AHEAD + 64, "{}", source.total);
    }

    #[test]
    fn quoted_parameter_values_with_control_characters_are_refused() {
        for bad in [
            &b"multipart/form-data; boundary=a; x=\"1\x012\""[..],
            b"multipart/form-data; boundary=a; x=\"\x7f\"",
        ] {
            assert!(boundary(Some(bad)).is_err(), "{bad:?}");
        }
        // A tab may separate a header's parts, but not sit inside a quoted name.
        let tab = raw_part(
            "Content-Disposition: form-data; name=\"file\"; filename=\"a\tb.mp3\"",
            b"x",
        );
        refused(&body(&[tab]));
    }

    #[test]
    fn part_header_lines_with_control_bytes_or_malformed_names_are_refused() {
        let file = "Content-Disposition: form-data; name=\"file\"; filename=\"a\"";
        for extra in [
            "X-A: a\x01b",
            "X-A: \x1f",
            "X-A: a\x7fb",
            // A lenient parser trims the name and reads a second
            // Content-Disposition, naming the part `model`.
            "Content-Disposition : form-data; name=\"model\"",
            "X Bad: 1",
            ": no name",
        ] {
            let headers = format!("{file}\r\n{extra}");
            refused(&body(&[raw_part(&headers, b"x")]));
        }
        let tabs = raw_part("Content-Disposition:\tform-data;\tname=\"model\"", b"m");
        assert_eq!(model(&body(&[tabs])).unwrap().unwrap().value, "m");
    }

    #[test]
    fn many_tiny_parts_cost_linear_reads() {
        // The review's 650,000-part form: refused at the cap, after reading
        // only what the first thousand parts take.
        let tiny = part("a", None, b"1");
        let bytes = body(&vec![tiny.clone(); 650_000]);
        let mut source = Counting::new(&bytes);
        let mut scanner = FormScanner::new(B);
        assert!(scanner.advance(&mut source, true).is_err());
        assert!(
            source.total < (MAX_PARTS + 10) * tiny.len() + 2 * READ_AHEAD,
            "{}",
            source.total
        );
        // Just under the cap, a whole form of tiny parts reads each byte about once.
        let bytes = body(&vec![tiny; MAX_PARTS]);
        let mut source = Counting::new(&bytes);
        let mut scanner = FormScanner::new(B);
        scanner.advance(&mut source, true).unwrap();
        assert!(
            source.total < bytes.len() + READ_AHEAD,
            "{} of {}",
            source.total,
            bytes.len()
        );
    }

    #[test]
    fn fed_in_pieces_it_reads_the_same_and_knows_the_model_early() {
        let audio: Vec<u8> = (0..=255u8).cycle().take(150_000).collect();
        let bytes = body(&[
            part("model", None, b"whisper-1"),
            part("file", Some("a"), &audio),
        ]);
        for piece in [1usize, 2, 3, 7, 64, 1000, 65_536, 70_000] {
            let mut source = Counting::new(&bytes);
            source.available = 0;
            let mut scanner = FormScanner::new(B);
            let mut known_at = None;
            while source.available < bytes.len() {
                source.available = (source.available + piece).min(bytes.len());
                let complete = source.available == bytes.len();
                scanner.advance(&mut source, complete).unwrap();
                if known_at.is_none() && scanner.field().is_some() {
                    known_at = Some(source.available);
                }
            }
            let field = scanner.field().unwrap();
            assert_eq!(field.value, "whisper-1", "piece {piece}");
            assert_eq!(&bytes[field.span.clone()], b"whisper-1");
            // Known long before the upload is in.
            assert!(
                known_at.unwrap() < 200 + piece,
                "piece {piece}: {known_at:?}"
            );
        }
        // Refusals are the same too.
        let bad = body(&[part("model", None, b"a"), part("model", None, b"b")]);
        for piece in [1usize, 5, 100] {
            let mut source = Counting::new(&bad);
            source.available = 0;
            let mut scanner = FormScanner::new(B);
            let mut outcome = Ok(());
            while source.available < bad.len() && outcome.is_ok() {
                source.available = (source.available + piece).min(bad.len());
                let complete = source.available == bad.len();
                outcome = scanner.advance(&mut source, complete);
            }
            assert!(outcome.unwrap_err().message.contains("more than one"));
        }
    }

    fn apply(bytes: &[u8], edit: &BodyEdit) -> Vec<u8> {
        let mut out = edit.with.clone();
        out.extend_from_slice(&bytes[edit.replace..]);
        assert_eq!(out.len(), edit.new_len());
        out
    }

    #[test]
    fn rewriting_the_model_keeps_every_other_byte() {
        let audio: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
        let bytes = body(&[
            part("model", None, b"whisper"),
            part("file", Some("a"), &audio),
        ]);
        let field = model(&bytes).unwrap().unwrap();
        let mut source: &[u8] = &bytes;
        let edit = multipart_model_edit(&mut source, B, Some(&field), "whisper-prod").unwrap();
        assert!(edit.with.len() < 200, "only the start is rewritten");
        let rewritten = apply(&bytes, &edit);
        let again = model(&rewritten).unwrap().unwrap();
        assert_eq!(again.value, "whisper-prod");
        assert_eq!(&rewritten[again.span.end..], &bytes[field.span.end..]);
    }

    #[test]
    fn a_missing_model_field_is_added_first() {
        let bytes = body(&[part("file", Some("a"), b"data")]);
        let mut source: &[u8] = &bytes;
        let edit = multipart_model_edit(&mut source, B, None, "dep").unwrap();
        assert_eq!(edit.replace, 0);
        let rewritten = apply(&bytes, &edit);
        assert_eq!(model(&rewritten).unwrap().unwrap().value, "dep");
        assert!(rewritten.ends_with(&bytes));
    }

    #[test]
    fn a_deployment_holding_the_boundary_is_refused() {
        let bytes = body(&[part("model", None, b"m")]);
        let field = model(&bytes).unwrap().unwrap();
        let mut source: &[u8] = &bytes;
        let odd = "x----formdata-abc123";
        assert!(multipart_model_edit(&mut source, B, Some(&field), odd).is_err());
    }
}
