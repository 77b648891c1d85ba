//! The `model` field of a multipart/form-data body (audio transcriptions
//! and translations, image edits), found without holding the body in
//! memory: the body is read through a window of at most 64 KiB at a time,
//! so a 25 MB audio file never lands in the VM whole, and it is never
//! changed. Field order, quoted boundaries and a preamble are handled.

use std::ops::Range;

use super::{BodyEdit, BodySource};
use crate::errors::ApiError;

const WINDOW: usize = 64 * 1024;
const MAX_PART_HEADERS: usize = 16 * 1024;
const MAX_MODEL_VALUE: usize = 1024;
const MAX_BOUNDARY: usize = 200;

/// A text field's value and where its bytes sit in the body.
#[derive(Debug, PartialEq, Eq)]
pub struct FormField {
    pub value: String,
    pub span: Range<usize>,
}

/// The boundary from a `multipart/form-data; boundary=...` content type.
pub fn boundary(content_type: Option<&[u8]>) -> Result<Vec<u8>, ApiError> {
    let content_type = content_type
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    let (media_type, params) = parameters(&content_type)
        .ok_or_else(|| ApiError::invalid_multipart("the content type has an unclosed quote"))?;
    if !media_type.eq_ignore_ascii_case("multipart/form-data") {
        return Err(ApiError::invalid_multipart(
            "this endpoint expects a multipart/form-data body",
        ));
    }
    let value = params
        .into_iter()
        .find(|(key, _)| key.eq_ignore_ascii_case("boundary"))
        .map(|(_, value)| value)
        .ok_or_else(|| {
            ApiError::invalid_multipart("the multipart/form-data content type has no boundary")
        })?;
    let valid = !value.is_empty()
        && value.len() <= MAX_BOUNDARY
        && value.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    if !valid {
        return Err(ApiError::invalid_multipart(
            "the multipart boundary is not valid",
        ));
    }
    Ok(value.into_bytes())
}

/// A header value like `type; key=value; key="quoted; value"`: the first
/// item and the parameters (keys as sent, values unquoted). None when a
/// quote is not closed.
fn parameters(value: &str) -> Option<(String, Vec<(String, String)>)> {
    let mut items = Vec::new();
    let mut item = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            ';' => items.push(std::mem::take(&mut item)),
            '"' => {
                // A quoted value keeps its `;` and loses its quotes.
                item.push('\0');
                loop {
                    match chars.next()? {
                        '"' => break,
                        '\\' => item.push(chars.next()?),
                        c => item.push(c),
                    }
                }
            }
            c => item.push(c),
        }
    }
    items.push(item);
    let mut items = items.into_iter();
    let first = items.next().unwrap_or_default().trim().to_string();
    let params = items
        .filter_map(|item| {
            let (key, value) = item.split_once('=')?;
            let value = value.trim();
            // \0 marks where a quoted value began: spaces inside it count.
            let value = value.strip_prefix('\0').unwrap_or(value);
            Some((key.trim().to_string(), value.to_string()))
        })
        .collect();
    Some((first, params))
}

/// Finds the form field `name` (exactly once) in a well-formed multipart
/// body; None if it is absent. Every part is checked, so a truncated body
/// or a second field of that name is refused.
pub fn find_field(
    body: &mut dyn BodySource,
    boundary: &[u8],
    name: &str,
) -> Result<Option<FormField>, ApiError> {
    let len = body.len();
    let mut delimiter = b"--".to_vec();
    delimiter.extend_from_slice(boundary);
    let mut next_delimiter = b"\r\n".to_vec();
    next_delimiter.extend_from_slice(&delimiter);

    let first = find(body, 0, &delimiter)?.ok_or_else(|| {
        ApiError::invalid_multipart("the body has no part with the declared boundary")
    })?;
    let line_start = match first.checked_sub(2) {
        None => first == 0,
        Some(before) => body.read(before, 2)? == b"\r\n",
    };
    if !line_start {
        return Err(ApiError::invalid_multipart(
            "the first boundary does not start a line",
        ));
    }
    let mut position = first + delimiter.len();
    let mut found: Option<FormField> = None;
    loop {
        let after = body.read(position, 2)?;
        if after == b"--" {
            return Ok(found); // the closing boundary
        }
        if after != b"\r\n" {
            return Err(truncated_or_malformed(position + 2 > len));
        }
        // Part headers, then an empty line (no headers: the empty line at once).
        let headers_start = position + 2;
        let window = body.read(headers_start - 2, MAX_PART_HEADERS + 4)?;
        let headers_end = memmem(&window, b"\r\n\r\n")
            .map(|at| headers_start - 2 + at)
            .ok_or_else(|| truncated_or_malformed(headers_start + MAX_PART_HEADERS > len))?;
        let headers = window
            .get(2..headers_end + 2 - headers_start)
            .unwrap_or_default();
        let content_start = headers_end + 4;
        let content_end = find(body, content_start, &next_delimiter)?
            .ok_or_else(|| ApiError::invalid_multipart("the multipart body is truncated"))?;
        if field_name(headers).as_deref() == Some(name) {
            if found.is_some() {
                return Err(ApiError::invalid_multipart(&format!(
                    "the form has more than one `{name}` field; send exactly one"
                )));
            }
            if content_end - content_start > MAX_MODEL_VALUE {
                return Err(ApiError::invalid_multipart(&format!(
                    "the `{name}` field is too long"
                )));
            }
            let value = String::from_utf8(body.read(content_start, content_end - content_start)?)
                .map_err(|_| {
                ApiError::invalid_multipart(&format!("the `{name}` field is not UTF-8 text"))
            })?;
            found = Some(FormField {
                value,
                span: content_start..content_end,
            });
        }
        position = content_end + next_delimiter.len();
    }
}

/// Puts `deployment` in the `model` field: its value replaced, or (when the
/// form has none) a `model` field added before the first part.
pub fn multipart_model_edit(
    body: &mut dyn BodySource,
    boundary: &[u8],
    field: Option<&FormField>,
    deployment: &str,
) -> Result<BodyEdit, ApiError> {
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
            let mut delimiter = b"--".to_vec();
            delimiter.extend_from_slice(boundary);
            let first = find(body, 0, &delimiter)?.unwrap_or(0);
            let mut with = body.read(0, first)?;
            with.extend_from_slice(&delimiter);
            with.extend_from_slice(b"\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n");
            with.extend_from_slice(deployment.as_bytes());
            with.extend_from_slice(b"\r\n");
            Ok(BodyEdit {
                replace: first,
                with,
                body_len: body.len(),
            })
        }
    }
}

fn truncated_or_malformed(past_the_end: bool) -> ApiError {
    if past_the_end {
        ApiError::invalid_multipart("the multipart body is truncated")
    } else {
        ApiError::invalid_multipart("the multipart body is malformed")
    }
}

/// The `name` parameter of a part's Content-Disposition header.
fn field_name(headers: &[u8]) -> Option<String> {
    let headers = String::from_utf8_lossy(headers);
    let disposition = headers.split("\r\n").find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case("content-disposition")
            .then_some(value)
    })?;
    let (kind, params) = parameters(disposition)?;
    if !kind.eq_ignore_ascii_case("form-data") {
        return None;
    }
    params
        .into_iter()
        .find(|(key, _)| key.eq_ignore_ascii_case("name"))
        .map(|(_, value)| value)
}

/// The first position at or after `from` where `needle` starts, reading
/// the body through overlapping windows.
fn find(body: &mut dyn BodySource, from: usize, needle: &[u8]) -> Result<Option<usize>, ApiError> {
    let len = body.len();
    let mut start = from;
    while start < len {
        let chunk = body.read(start, WINDOW + needle.len())?;
        if let Some(at) = memmem(&chunk, needle) {
            return Ok(Some(start + at));
        }
        if start + chunk.len() >= len || chunk.len() < needle.len() {
            return Ok(None);
        }
        start += chunk.len() + 1 - needle.len();
    }
    Ok(None)
}

fn memmem(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let first = *needle.first()?;
    let mut at = 0;
    while let Some(offset) = haystack.get(at..)?.iter().position(|&b| b == first) {
        let candidate = at + offset;
        if haystack.get(candidate..candidate + needle.len())? == needle {
            return Some(candidate);
        }
        at = candidate + 1;
    }
    None
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
        find_field(&mut source, B, "model")
    }

    #[test]
    fn boundary_from_content_type() {
        assert_eq!(
            boundary(Some(b"multipart/form-data; boundary=abc")).unwrap(),
            b"abc"
        );
        assert_eq!(
            boundary(Some(b"Multipart/Form-Data;boundary=\"a b;c\"")).unwrap(),
            b"a b;c"
        );
        assert_eq!(
            boundary(Some(b"multipart/form-data; charset=x; Boundary=z")).unwrap(),
            b"z"
        );
        for bad in [
            &b"application/json"[..],
            b"multipart/form-data",
            b"multipart/form-data; boundary=",
            b"multipart/form-data; boundary=\"abc",
            b"multipart/form-data; boundary=\"\"",
            b"multipart/mixed; boundary=abc",
        ] {
            let error = boundary(Some(bad)).unwrap_err();
            assert_eq!(
                (error.status, error.code),
                (400, "invalid_multipart"),
                "{bad:?}"
            );
        }
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
    fn names_quoted_unquoted_and_odd() {
        let unquoted =
            b"------formdata-abc123\r\ncontent-disposition: form-data; name=model\r\n\r\nm1\r\n"
                .to_vec();
        assert_eq!(model(&body(&[unquoted])).unwrap().unwrap().value, "m1");
        let semicolon = part("a;model", None, b"x");
        assert_eq!(model(&body(&[semicolon])).unwrap(), None);
        let modelx = part("models", None, b"x");
        assert_eq!(model(&body(&[modelx])).unwrap(), None);
    }

    #[test]
    fn empty_value_and_preamble() {
        let mut bytes = b"preamble text\r\n".to_vec();
        bytes.extend(body(&[part("model", None, b"")]));
        let field = model(&bytes).unwrap().unwrap();
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
        for cut in [10, 30, 60, 100, 500, good.len() - 30, good.len() - 3] {
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
        assert!(model(&two)
            .unwrap_err()
            .message
            .contains("more than one `model`"));
        let long = body(&[part("model", None, &[b'a'; 2000])]);
        assert!(model(&long).unwrap_err().message.contains("too long"));
        let binary = body(&[part("model", None, b"\xff\xfe")]);
        assert!(model(&binary).unwrap_err().message.contains("UTF-8"));
    }

    #[test]
    fn reads_stay_within_a_window() {
        struct Counting<'a> {
            bytes: &'a [u8],
            largest: usize,
        }
        impl BodySource for Counting<'_> {
            fn len(&self) -> usize {
                self.bytes.len()
            }
            fn read(&mut self, start: usize, len: usize) -> Result<Vec<u8>, ApiError> {
                let end = (start + len).min(self.bytes.len());
                let out = self
                    .bytes
                    .get(start.min(end)..end)
                    .unwrap_or_default()
                    .to_vec();
                self.largest = self.largest.max(out.len());
                Ok(out)
            }
        }
        let audio = vec![7u8; 3_000_000];
        let bytes = body(&[part("file", Some("a"), &audio), part("model", None, b"w")]);
        let mut source = Counting {
            bytes: &bytes,
            largest: 0,
        };
        assert_eq!(
            find_field(&mut source, B, "model").unwrap().unwrap().value,
            "w"
        );
        assert!(source.largest <= WINDOW + 64, "{}", source.largest);
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
    fn memmem_finds_first_match() {
        assert_eq!(memmem(b"abcabc", b"ca"), Some(2));
        assert_eq!(memmem(b"abc", b"abcd"), None);
        assert_eq!(memmem(b"abc", b""), None);
        assert_eq!(memmem(b"\r\r\n", b"\r\n"), Some(1));
    }
}
