//! HTTP transport: REST (`orders`, `stats`, `health`, `dlq`), the realtime streams
//! (`ws`, `sse`), the OpenAPI document, the dashboard assets, and the 404/405
//! for what no route takes (`fallback`).

pub mod changes;
pub mod dlq;
pub mod fallback;
pub mod health;
pub mod metrics;
pub mod openapi;
pub mod orders;
pub mod session;
pub mod sse;
pub mod stats;
pub mod web;
pub mod ws;
pub mod ws_socket;

use actix_web::web::Query;

use crate::domain::{Filter, ValidationError};
use crate::error::ApiError;

/// Stream parameters shared by WebSocket and SSE: a filter, a resume
/// position and whether to start with a snapshot.
#[derive(Debug, Clone, Default)]
pub struct StreamParams {
    pub filter: Filter,
    pub since: Option<i64>,
    pub snapshot: bool,
    pub snapshot_limit: i64,
    /// The customer (folded) the caller's token is confined to; set with the
    /// filter's customer by `ws::restrict`.
    pub viewer: Option<String>,
}

pub const SNAPSHOT_DEFAULT_LIMIT: i64 = 1000;
pub const SNAPSHOT_MAX_LIMIT: i64 = 10_000;

impl StreamParams {
    pub fn from_query(query: &[(String, String)]) -> Result<StreamParams, ApiError> {
        let mut p = StreamParams { snapshot_limit: SNAPSHOT_DEFAULT_LIMIT, ..Default::default() };
        for (k, v) in query {
            if p.filter.apply_param(k, v)? {
                continue;
            }
            match k.as_str() {
                "since" => p.since = Some(parse_position(v)?),
                "snapshot" => p.snapshot = parse_bool("snapshot", v)?,
                "snapshot_limit" => {
                    p.snapshot_limit =
                        parse_limit("snapshot_limit", v, SNAPSHOT_MAX_LIMIT)?.unwrap_or(SNAPSHOT_DEFAULT_LIMIT)
                }
                "access_token" => {}
                other => return Err(unknown_parameter(other).into()),
            }
        }
        Ok(p)
    }
}

/// A resume position as sent back by clients: a non-negative integer.
pub fn parse_position(v: &str) -> Result<i64, ValidationError> {
    v.trim()
        .parse::<i64>()
        .ok()
        .filter(|p| *p >= 0)
        .ok_or_else(|| ValidationError::with_code("since", "invalid_position", format!("{v:?} is not a position")))
}

pub fn parse_bool(field: &'static str, v: &str) -> Result<bool, ValidationError> {
    match v {
        "true" | "1" | "yes" | "" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(ValidationError::new(field, "must be true or false")),
    }
}

pub fn parse_limit(field: &'static str, v: &str, max: i64) -> Result<Option<i64>, ValidationError> {
    if v.trim().is_empty() {
        return Ok(None);
    }
    let n: i64 = v.trim().parse().map_err(|_| ValidationError::new(field, "must be a whole number"))?;
    if n < 1 {
        return Err(ValidationError::new(field, "must be at least 1"));
    }
    Ok(Some(n.min(max)))
}

/// The error for a query parameter a route does not know.
pub fn unknown_parameter(name: &str) -> ValidationError {
    ValidationError::with_code("query", "unknown_parameter", format!("unknown query parameter {name:?}"))
}

/// A keyset cursor handed out by this API (an id, so at least 1); none for
/// an empty value, as for the first page.
pub fn parse_cursor(field: &'static str, v: &str) -> Result<Option<i64>, ValidationError> {
    if v.trim().is_empty() {
        return Ok(None);
    }
    v.trim()
        .parse::<i64>()
        .ok()
        .filter(|c| *c >= 1)
        .map(Some)
        .ok_or_else(|| ValidationError::with_code(field, "invalid_cursor", "not a cursor from this API"))
}

/// The raw query pairs, in order (repeated keys allowed).
pub type QueryPairs = Query<Vec<(String, String)>>;
