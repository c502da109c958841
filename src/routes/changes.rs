//! `GET /api/changes`: the change log's most recent changes, newest first,
//! in the shape the streams send them: what happened lately and who did it
//! (the dashboard's activity feed starts from it), without a stream.

use actix_web::{route, web, HttpRequest, HttpResponse};

use super::{parse_cursor, parse_limit, QueryPairs};
use crate::error::ApiError;
use crate::startup::AppState;

const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 200;
/// How many positions back a token confined to one customer is looked
/// for, per request (`next_before` then goes on from there): the rows read
/// stay bounded however rare the customer's changes.
const CONFINED_WINDOW: i64 = 10_000;

/// The newest changes at positions in [`$3`, `$1`), at most `$2`, from the
/// newest `$5` transactions there, of the customer `$4` (folded as REST reads
/// do; NULL: every customer). A transaction's positions are `base_pos + 1`
/// to `end_pos`. Columns as `changes::READ_SQL`'s.
///
/// The scan of `change_tx` starts at the first transaction that ends at or
/// past `$1` (transactions never overlap: one that starts below `$1` ends
/// there at the latest), not at the log's head: `base_pos` is not in the
/// index, and a page far back visited every transaction above it.
pub const RECENT_SQL: &str = "SELECT t.base_pos + c.ord AS pos, c.op, c.order_id, c.status, c.old_status, \
            c.customer, c.old_customer, c.after_row::text, c.before_row::text, c.actor, t.committed_at \
     FROM (SELECT txid, base_pos, end_pos, committed_at FROM change_tx \
           WHERE base_pos + 1 < $1 AND end_pos >= $3 \
             AND end_pos <= COALESCE((SELECT min(end_pos) FROM change_tx WHERE end_pos >= $1), \
                                     9223372036854775807) \
           ORDER BY end_pos DESC LIMIT $5) t \
     CROSS JOIN LATERAL ( \
         SELECT * FROM change_log c \
         WHERE c.txid = t.txid AND c.ord < $1 - t.base_pos AND c.ord >= $3 - t.base_pos \
           AND ($4::text IS NULL OR lower(c.customer) = $4 OR lower(c.old_customer) = $4) \
         ORDER BY c.ord DESC LIMIT $2) c \
     ORDER BY t.end_pos DESC, c.ord DESC \
     LIMIT $2";

/// Recent changes, newest first.
#[utoipa::path(get, path = "/api/changes", tag = "realtime",
    params(
        ("before" = Option<i64>, Query, description = "Only changes at positions below this (next_before of the previous answer); default: the newest"),
        ("limit" = Option<i64>, Query, description = "At most this many changes (default 50, at most 200); an answer also ends once its changes reach 4 MiB (next_before goes on)"),
    ),
    responses(
        (status = 200, description = "{\"changes\": [change messages, as the streams send them, newest first], \"position\": the log's head, \"next_before\": where older changes go on, or null at the start of the log}. A token confined to one customer gets its customer's changes (a move between customers as leave or enter), looked for among 10,000 positions per request", body = serde_json::Value),
        (status = 422, description = "Invalid parameter (invalid_cursor, validation_failed, unknown_parameter)", body = crate::routes::openapi::ProblemDoc),
    ))]
#[route("/api/changes", method = "GET", method = "HEAD")]
pub async fn recent(req: HttpRequest, query: QueryPairs, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let mut before: Option<i64> = None;
    let mut limit = DEFAULT_LIMIT;
    for (k, v) in query.iter() {
        match k.as_str() {
            "before" => before = parse_cursor("before", v)?,
            "limit" => limit = parse_limit("limit", v, MAX_LIMIT)?.unwrap_or(DEFAULT_LIMIT),
            "access_token" => {}
            other => return Err(super::unknown_parameter(other).into()),
        }
    }
    let viewer = crate::auth::principal(&req).customer;
    let mut client = state.pool.get().await?;
    let handed = crate::changes::handed_head(&**client).await?;
    let (head, pruned) = (handed.pos, handed.pruned);
    let before = before.unwrap_or(head + 1).min(head + 1);
    // An unconfined token's `limit` newest changes lie in the newest `limit`
    // transactions; a confined one's are looked for in a window of positions.
    let (from, transactions) = match viewer {
        Some(_) => ((before - CONFINED_WINDOW).max(1), CONFINED_WINDOW),
        None => (1, limit),
    };
    let stmt = client.prepare_cached(RECENT_SQL).await?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] = [&before, &limit, &from, &viewer, &transactions];
    let (mut changes, mut read, mut last, mut bytes) = (Vec::new(), 0, None, 0);
    // Like a page of orders, the answer ends at `PAGE_BYTES` (then
    // `next_before` goes on below its last change), read through a portal
    // so that the database stops sending there too.
    let tx = client.build_transaction().read_only(true).start().await?;
    crate::db::portal_rows(&tx, &stmt, &params, |row| {
        read += 1;
        last = Some(row.try_get::<_, i64>(0)?);
        if let Some(json) = crate::changes::visible_json(&row, viewer.as_deref())? {
            bytes += json.len();
            changes.push(json);
        }
        Ok(bytes < crate::routes::orders::PAGE_BYTES)
    })
    .await?;
    tx.commit().await?;
    let next_before = if read == limit || bytes >= crate::routes::orders::PAGE_BYTES {
        last
    } else {
        // Fewer than asked: the window ended (older positions the log still
        // holds go on below it), or the log did.
        Some(from).filter(|&f| f > pruned + 1)
    };
    state.hub.note_handed_out(head, handed.committed_micros);
    let body = format!(
        r#"{{"changes":[{}],"position":{head},"next_before":{}}}"#,
        changes.join(","),
        next_before.map_or("null".to_string(), |p| p.to_string())
    );
    Ok(HttpResponse::Ok().content_type("application/json").body(body))
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(recent);
}
