//! Request bodies: finding the model alias (JSON or multipart form) without
//! building a tree or holding a large upload, and writing the deployment in
//! its place where the upstream wants it in the body.

mod json;
mod multipart;

#[cfg(test)]
pub use json::find_model;
pub use json::{json_edit, read_request, JsonRequest};
#[cfg(test)]
pub use multipart::find_field;
pub use multipart::{boundary, multipart_model_edit, FormField, FormScanner};

use crate::errors::ApiError;

/// A request body read in pieces: Envoy's buffer in the filter, a slice in
/// tests.
pub trait BodySource {
    fn len(&self) -> usize;
    /// Up to `len` bytes from `start` (fewer at the end of the body).
    fn read(&mut self, start: usize, len: usize) -> Result<Vec<u8>, ApiError>;
}

impl BodySource for &[u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }

    fn read(&mut self, start: usize, len: usize) -> Result<Vec<u8>, ApiError> {
        let end = start.saturating_add(len).min(<[u8]>::len(self));
        Ok(self.get(start.min(end)..end).unwrap_or_default().to_vec())
    }
}

/// A change to the body: its first `replace` bytes become `with`. Only the
/// start of a body is ever rewritten (Envoy can replace a prefix in place),
/// so an upload after the changed field is never copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyEdit {
    pub replace: usize,
    pub with: Vec<u8>,
    /// The whole body's length before the edit.
    pub body_len: usize,
}

impl BodyEdit {
    /// The body's length after the edit (its new `content-length`).
    pub fn new_len(&self) -> usize {
        self.body_len - self.replace.min(self.body_len) + self.with.len()
    }
}
