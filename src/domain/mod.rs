//! Domain types: input is parsed once, here, into values that are known to be
//! valid. REST, the Kafka ingest and the WebSocket subscribe message all use
//! these parsers, so every path accepts and rejects the same things.

use std::borrow::Cow;

pub mod filter;
pub mod json;
mod order;

pub use filter::{fold_case, Filter};
pub(crate) use order::{object, reject_unknown};
pub use order::{parse_version_body, NewOrder, OrderPatch, Status};

/// The longest unknown key repeated in an error's `field`.
const MAX_FIELD_NAME: usize = 64;

/// A rejected input: which field, a stable code, and a human message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// The field named by the input itself for an unknown one, else ours.
    pub field: Cow<'static, str>,
    pub code: &'static str,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        ValidationError { field: Cow::Borrowed(field), code: "validation_failed", message: message.into() }
    }

    pub fn with_code(field: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        ValidationError { field: Cow::Borrowed(field), code, message: message.into() }
    }

    /// `unknown_field` for a key of an object that its parser does not
    /// know: the key itself is the field (up to `MAX_FIELD_NAME` characters).
    pub fn unknown_field(key: &str, message: impl Into<String>) -> Self {
        let field = match key.char_indices().nth(MAX_FIELD_NAME) {
            Some((end, _)) => format!("{}...", &key[..end]),
            None => key.to_owned(),
        };
        ValidationError { field: Cow::Owned(field), code: "unknown_field", message: message.into() }
    }
}
