//! Errors that reach clients: JSON (`application/problem+json`) with a stable
//! machine-readable `code`, a human `message`, and the field at fault when
//! there is one. Database errors are mapped here, in one place.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::domain::ValidationError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String, &'static str),
    #[error(transparent)]
    Validation(#[from] ValidationError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    TooMany(String),
    /// The server holds all the streaming connections it takes (503).
    #[error("{0}")]
    Full(String),
    #[error("{message}")]
    InvalidTransition { message: String, from: Option<String>, to: Option<String> },
    #[error("{0}")]
    Conflict(String),
    /// Another order holds the `external_id` (unique across customers).
    #[error("{0}")]
    DuplicateExternalId(String),
    /// The order has left `pending`: its line item can no longer change.
    #[error("{0}")]
    Locked(String),
    /// The order's steps (payment, stock) are not undone: it cannot be deleted.
    #[error("{0}")]
    Unsettled(String),
    #[error("{}", version_conflict(expected, *current))]
    VersionConflict { expected: Vec<i32>, current: i32 },
    #[error("the request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// The server holds all it may of something for now (503 `server_busy`).
    #[error("{0}")]
    Busy(String),
    /// The server is stopping: it opens no more streams (503).
    #[error("the server is shutting down: retry shortly (another instance, or this one once restarted)")]
    ShuttingDown,
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

#[derive(Serialize)]
struct Problem<'a> {
    status: u16,
    code: &'a str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    to: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    current_version: Option<i32>,
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_, code) => code,
            ApiError::Validation(v) => v.code,
            ApiError::NotFound(_) => "not_found",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::TooMany(_) | ApiError::Full(_) => "too_many_connections",
            ApiError::InvalidTransition { .. } => "invalid_transition",
            ApiError::Conflict(_) => "conflict",
            ApiError::DuplicateExternalId(_) => "duplicate_external_id",
            ApiError::Locked(_) => "order_locked",
            ApiError::Unsettled(_) => "order_not_settled",
            ApiError::VersionConflict { .. } => "version_conflict",
            ApiError::TooLarge(_) => "payload_too_large",
            ApiError::Unavailable(_) => "database_unavailable",
            ApiError::Busy(_) => "server_busy",
            ApiError::ShuttingDown => "shutting_down",
            ApiError::Unexpected(_) => "internal_error",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(..) => StatusCode::BAD_REQUEST,
            ApiError::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::InvalidTransition { .. }
            | ApiError::Conflict(_)
            | ApiError::DuplicateExternalId(_)
            | ApiError::Locked(_)
            | ApiError::Unsettled(_) => StatusCode::CONFLICT,
            ApiError::VersionConflict { .. } => StatusCode::PRECONDITION_FAILED,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) | ApiError::Full(_) | ApiError::Busy(_) | ApiError::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Unexpected(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let message = match self {
            ApiError::Unexpected(e) => {
                log::error!("request failed: {e:#}");
                "internal error; see the server log".to_string()
            }
            other => other.to_string(),
        };
        let (from, to) = match self {
            ApiError::InvalidTransition { from, to, .. } => (from.as_deref(), to.as_deref()),
            _ => (None, None),
        };
        let mut builder = HttpResponse::build(status);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            builder.insert_header(("Retry-After", "1"));
        }
        builder.content_type("application/problem+json").json(Problem {
            status: status.as_u16(),
            code: self.code(),
            message,
            field: match self {
                ApiError::Validation(v) => Some(&v.field),
                ApiError::DuplicateExternalId(_) => Some("external_id"),
                _ => None,
            },
            from,
            to,
            current_version: match self {
                ApiError::VersionConflict { current, .. } => Some(*current),
                _ => None,
            },
        })
    }
}

/// Versions as a request named them: `3`, or `2, 3`.
fn versions_text(versions: &[i32]) -> String {
    versions.iter().map(i32::to_string).collect::<Vec<_>>().join(", ")
}

/// Why a version precondition failed: the versions it named, or that it
/// named only weak tags, which never match.
fn version_conflict(expected: &[i32], current: i32) -> String {
    match expected {
        [] => format!(
            "If-Match names no tag that can match: weak tags never do (it compares strongly), and an \
             order's ETag is its version in quotes; the current version is {current}, ETag \"{current}\""
        ),
        [one] => format!("version {one} does not match the current version {current}"),
        many => format!("none of the versions {} is the current version {current}", versions_text(many)),
    }
}

/// A JSON error body for errors raised outside handlers (extractors, limits).
pub fn problem_response(status: StatusCode, code: &str, message: &str) -> HttpResponse {
    HttpResponse::build(status).content_type("application/problem+json").json(serde_json::json!({
        "status": status.as_u16(),
        "code": code,
        "message": message,
    }))
}

/// Maps a database error to what the client should hear.
impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        let Some(db) = e.as_db_error() else {
            return ApiError::Unavailable(e.to_string());
        };
        match db.code().code() {
            "OC409" => {
                let detail: serde_json::Value =
                    db.detail().and_then(|d| serde_json::from_str(d).ok()).unwrap_or_default();
                ApiError::InvalidTransition {
                    message: crate::db::message_with_hint(db),
                    from: detail["from"].as_str().map(str::to_owned),
                    to: detail["to"].as_str().map(str::to_owned),
                }
            }
            "OC423" => ApiError::Locked(crate::db::message_with_hint(db)),
            "OC424" => ApiError::Unsettled(crate::db::message_with_hint(db)),
            "OC400" => ApiError::BadRequest(db.message().to_string(), "invalid_change"),
            // The database's words name the constraint and repeat the key:
            // the client hears which field, in ours.
            "23505" if db.constraint() == Some("orders_external_id_key") => ApiError::DuplicateExternalId(
                "another order already has this external_id (it is unique across all orders)".into(),
            ),
            // 40001, 40P01: the database gave up this transaction for a
            // concurrent one (a serialization failure under a stricter
            // isolation set on the database, a deadlock with a DBA's
            // statement): nothing was written, and the same request may go
            // again. 25006: a read-only database (a standby, or just after a
            // failover) is not there for writes yet.
            "40001" | "40P01" => ApiError::Conflict(
                "the database gave this request's transaction up for a concurrent one (a serialization failure \
                 or a deadlock); nothing was written: try again"
                    .into(),
            ),
            "25006" => ApiError::Unavailable("the database is read-only (a standby, or during a failover)".into()),
            // A `lock_timeout` set for the role: a lock the request needed
            // was held by another session longer than that.
            "55P03" => ApiError::Unavailable(
                "a row or table this request needed stayed locked by another session past the database's \
                 lock_timeout; nothing was written: try again"
                    .into(),
            ),
            // 22021: a NUL or bytes not in the encoding; 22P05: a character
            // the database's encoding (LATIN1, say) cannot hold.
            "23514" | "23502" | "22001" | "22003" | "22P02" | "22021" | "22P05" => {
                ApiError::Validation(ValidationError {
                    field: constraint_field(db.constraint().or(db.column()).unwrap_or("")).into(),
                    code: "validation_failed",
                    message: db.message().to_string(),
                })
            }
            // Connection-class and shutdown errors: the database is not there.
            c if c.starts_with("08") || c.starts_with("57") || c == "53300" => {
                ApiError::Unavailable(db.message().to_string())
            }
            // Anything else, another unique key among them (a change-log
            // position, an id taken by hand where the sequence had not yet
            // gone, see `create`): nothing the client did. Logged; the
            // client hears no PostgreSQL words.
            _ => ApiError::Unexpected(anyhow::anyhow!(
                "database error {}: {} {}",
                db.code().code(),
                db.message(),
                db.detail().unwrap_or("")
            )),
        }
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        // Failing to get a connection at all means the database is not
        // reachable (down, restarting, renamed, refusing connections).
        match e {
            // The database's words (a role or database name, an address)
            // are the operator's: health shows them to admins; a client
            // hears only that the database is not there.
            deadpool_postgres::PoolError::Backend(e) => {
                log::debug!("a connection to the database failed: {:#}", crate::db::describe(e));
                ApiError::Unavailable("no connection to it could be opened; try again shortly".into())
            }
            other => ApiError::Unavailable(other.to_string()),
        }
    }
}

/// `orders_quantity_check` -> `quantity`.
fn constraint_field(name: &str) -> &'static str {
    const FIELDS: [&str; 8] = [
        "customer_name",
        "customer_email",
        "external_id",
        "product",
        "quantity",
        "unit_price",
        "status",
        "error_message",
    ];
    FIELDS.iter().find(|f| name.contains(*f)).copied().unwrap_or("order")
}

/// Runs `task`; a panic in it (a bug) comes back as an error saying what it
/// said, for the long-running tasks that must go on after one.
pub async fn caught<T>(task: impl std::future::Future<Output = T>) -> Result<T, String> {
    futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(task)).await.map_err(|p| panic_message(&*p))
}

/// What a caught panic said.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}
