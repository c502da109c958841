//! Changes: what the database's change log holds, read in position order.
//!
//! `listener` holds the one dedicated LISTEN connection and feeds the hub;
//! `feed` gives each client session its own gapless stream (catch-up from the
//! log, then live changes from the hub).

pub mod feed;
pub mod listener;
pub mod maintenance;
pub mod wire;

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use tokio_postgres::Row;

use crate::domain::Filter;

/// The SQL every reader of the log uses (the listener, catch-up, the outbox
/// relay): up to $2 changes after $1.
///
/// `pruned` is the retention horizon in the same snapshot as the rows: when
/// it is past the reader's position, the rows follow a gap (changes pruned
/// before this reader got to them), and the reader must say so.
pub const READ_SQL: &str =
    "SELECT pos, op, order_id, status, old_status, customer, old_customer, after_row, before_row, actor, at, \
            (SELECT pruned_through FROM change_retention) AS pruned \
     FROM change_read($1, $2)";

/// What every reader of the log takes from a `READ_SQL` row: where the
/// change stands, what it did, and `json`, the change envelope that the
/// WebSocket `change` message, the SSE event and the outbox relay's Kafka
/// message all carry: `{"type":"change","seq":N,"op":"...","order":{...},
/// "old":{...}|null,"actor":"...","at":"..."}`.
pub struct Envelope<'a> {
    pub pos: i64,
    pub op: &'a str,
    pub order_id: i64,
    pub actor: &'a str,
    /// The commit time, set by the sequencer for every committed change.
    pub at: Option<DateTime<Utc>>,
    pub json: String,
}

impl<'a> Envelope<'a> {
    pub fn from_row(row: &'a Row) -> Envelope<'a> {
        let pos: i64 = row.get(0);
        let op: &str = row.get(1);
        let order: &str = row.get(7);
        let old: Option<&str> = row.get(8);
        let actor: &str = row.get(9);
        let at: Option<DateTime<Utc>> = row.get(10);
        // The row images are JSON written by PostgreSQL (`to_json` in the
        // capture triggers): the envelope is assembled, not re-serialized.
        let json = format!(
            r#"{{"type":"change","seq":{pos},"op":"{op}","order":{order},"old":{},"actor":{},"at":"{}"}}"#,
            old.unwrap_or("null"),
            serde_json::Value::String(actor.to_string()),
            at.map(|t| t.to_rfc3339_opts(SecondsFormat::Micros, true)).unwrap_or_default(),
        );
        Envelope { pos, op, order_id: row.get(2), actor, at, json }
    }
}

/// One committed change, serialized once: `ws_frame` is the complete WebSocket
/// text frame (header included: server frames are unmasked, so it is the same
/// for every client) and `sse` the SSE event, shared by every client that
/// receives it.
#[derive(Debug)]
pub struct Change {
    pub pos: i64,
    /// When the change committed (the sequencer's clock), in microseconds.
    pub committed_micros: i64,
    pub order_id: i64,
    pub status: Option<String>,
    pub old_status: Option<String>,
    pub customer: Option<String>,
    pub old_customer: Option<String>,
    pub ws_frame: Bytes,
    pub sse: Bytes,
}

impl Change {
    pub fn from_row(row: &Row) -> Change {
        let Envelope { pos, order_id, at, json, .. } = Envelope::from_row(row);
        let committed_micros = at.map(|t| t.timestamp_micros()).unwrap_or_default();
        let sse = format!("id: {pos}\nevent: change\ndata: {json}\n\n");
        Change {
            pos,
            committed_micros,
            order_id,
            status: row.get(3),
            old_status: row.get(4),
            customer: row.get(5),
            old_customer: row.get(6),
            ws_frame: wire::frame(wire::OP_TEXT, json.as_bytes()),
            sse: Bytes::from(sse),
        }
    }

    pub fn matches(&self, filter: &Filter) -> bool {
        filter.is_empty()
            || filter.matches(
                self.order_id,
                self.status.as_deref(),
                self.old_status.as_deref(),
                self.customer.as_deref(),
                self.old_customer.as_deref(),
            )
    }
}

pub type SharedChange = Arc<Change>;

/// Reads up to `limit` changes after `after` with a pooled client.
pub async fn read_after(
    client: &deadpool_postgres::Client,
    after: i64,
    limit: i32,
) -> Result<Vec<SharedChange>, tokio_postgres::Error> {
    let stmt = client.prepare_cached(READ_SQL).await?;
    let rows = client.query(&stmt, &[&after, &limit]).await?;
    Ok(rows.iter().map(|r| Arc::new(Change::from_row(r))).collect())
}

/// Where the log stands: the newest committed position and the retention
/// horizon (positions at or below it are gone).
pub async fn log_bounds(client: &tokio_postgres::Client) -> Result<(i64, i64), tokio_postgres::Error> {
    let row = client.query_one("SELECT change_head(), (SELECT pruned_through FROM change_retention)", &[]).await?;
    Ok((row.get(0), row.get(1)))
}
