//! Domain types: input is parsed once, here, into values that are known to be
//! valid. REST, the Kafka ingest and the WebSocket subscribe message all use
//! these parsers, so every path accepts and rejects the same things.

pub mod filter;
mod order;

pub use filter::{fold_case, Filter};
pub(crate) use order::{object, reject_unknown};
pub use order::{parse_version_body, NewOrder, OrderPatch, Status};

/// A rejected input: which field, a stable code, and a human message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: &'static str,
    pub code: &'static str,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        ValidationError { field, code: "validation_failed", message: message.into() }
    }

    pub fn with_code(field: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        ValidationError { field, code, message: message.into() }
    }
}
