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

use crate::domain::{fold_case, Filter};

/// Takes, in `tx`, the sequencer's lock (V2's `change_sequence`: keys
/// 1869767779, 1), waiting at most `wait` (a writer left holding it after
/// `SET CONSTRAINTS ALL IMMEDIATE` must not hold the caller): no commit
/// numbers its changes until `tx` ends.
pub async fn lock_sequencer(tx: &tokio_postgres::Transaction<'_>, wait: &str) -> Result<(), tokio_postgres::Error> {
    tx.batch_execute(&format!("SET LOCAL lock_timeout = '{wait}'; SELECT pg_advisory_xact_lock(1869767779, 1)")).await
}

/// Sets the position sequence to `to` if it is behind (the next commit is
/// numbered past it), under [`lock_sequencer`]'s lock; whether it moved.
pub async fn move_sequence_to(tx: &tokio_postgres::Transaction<'_>, to: i64) -> Result<bool, tokio_postgres::Error> {
    let moved = tx
        .execute(
            "SELECT setval('change_position', $1) FROM change_position \
             WHERE (CASE WHEN is_called THEN last_value ELSE last_value - 1 END) < $1",
            &[&to],
        )
        .await?;
    Ok(moved == 1)
}

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

/// How many bytes of row images (`after_row`, `before_row`) one read of the
/// log takes in at most, past the row that reaches it: rows are counted by
/// the caller's limit, and 2,000 changes of a megabyte each (a DBA's
/// `UPDATE` of a long text column) would otherwise be gigabytes in memory
/// at once. The rest of the read is left unread: PostgreSQL still sends it
/// and the connection drops it, so readers then ask for fewer rows.
pub const READ_BYTES: usize = 4 << 20;

/// Rows of a `READ_SQL` read, and whether `READ_BYTES` cut it short (more
/// may follow, whatever the count).
pub struct LogRows {
    pub rows: Vec<Row>,
    pub cut: bool,
}

/// Runs `READ_SQL` (prepared as `read`) for up to `limit` changes after
/// `after`, stopping at `READ_BYTES` of row images.
pub async fn read_rows(
    client: &tokio_postgres::Client,
    read: &tokio_postgres::Statement,
    after: i64,
    limit: i32,
) -> Result<LogRows, tokio_postgres::Error> {
    use futures_util::TryStreamExt;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&after, &limit];
    let stream = client.query_raw(read, params).await?;
    let mut stream = std::pin::pin!(stream);
    let (mut rows, mut bytes) = (Vec::new(), 0);
    while let Some(row) = stream.try_next().await? {
        // A row not in the expected shape counts for nothing here: reading
        // it fails where it is used (`Envelope::from_row`).
        let image = |i| row.try_get::<_, Option<&str>>(i).ok().flatten().map_or(0, str::len);
        bytes += image(7) + image(8);
        rows.push(row);
        if bytes >= READ_BYTES {
            return Ok(LogRows { rows, cut: true });
        }
    }
    Ok(LogRows { rows, cut: false })
}

/// The changes the next read of the log asks for, after one that asked for
/// `limit` (`most` at most) and got `read`: as many as fitted when
/// `READ_BYTES` cut it (the database sends every row asked for, read or
/// not), twice as many after a full read, up to `most`.
pub fn next_limit(limit: i32, most: i32, read: usize, cut: bool) -> i32 {
    if cut {
        (read as i32).clamp(1, most)
    } else if read as i32 == limit {
        limit.saturating_mul(2).min(most)
    } else {
        limit
    }
}

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
    /// Fails, rather than panics, on a row not in `READ_SQL`'s shape (a
    /// NULL where the log has none, another type): `change_read` is a
    /// function in the database, which someone can replace by hand.
    pub fn from_row(row: &'a Row) -> Result<Envelope<'a>, tokio_postgres::Error> {
        let pos: i64 = row.try_get(0)?;
        let op: &str = row.try_get(1)?;
        let order: &str = row.try_get(7)?;
        let old: Option<&str> = row.try_get(8)?;
        let actor: &str = row.try_get(9)?;
        let at: Option<DateTime<Utc>> = row.try_get(10)?;
        // The row images are JSON written by PostgreSQL (`to_json` in the
        // capture triggers): the envelope is assembled, not re-serialized.
        let json = envelope_json(pos, op, order, old, actor, at);
        Ok(Envelope { pos, op, order_id: row.try_get(2)?, actor, at, json })
    }
}

/// The change envelope (see `Envelope`), assembled from the row images as
/// PostgreSQL wrote them.
pub(crate) fn envelope_json(
    pos: i64,
    op: &str,
    order: &str,
    old: Option<&str>,
    actor: &str,
    at: Option<DateTime<Utc>>,
) -> String {
    format!(
        r#"{{"type":"change","seq":{pos},"op":"{op}","order":{order},"old":{},"actor":{},"at":"{}"}}"#,
        old.unwrap_or("null"),
        serde_json::Value::String(actor.to_string()),
        at.map(|t| t.to_rfc3339_opts(SecondsFormat::Micros, true)).unwrap_or_default(),
    )
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
    /// Set only when the change moves the order from one customer to
    /// another: what a viewer confined to either of them gets instead of
    /// the full change, which shows both customers' rows.
    pub moved: Option<Box<Move>>,
}

/// A change as one WebSocket text frame and one SSE `change` event.
#[derive(Debug, Clone)]
pub struct Frames {
    pub ws_frame: Bytes,
    pub sse: Bytes,
}

impl Frames {
    fn new(pos: i64, json: &str) -> Frames {
        Frames {
            ws_frame: wire::frame(wire::OP_TEXT, json.as_bytes()),
            sse: Bytes::from(format!("id: {pos}\nevent: change\ndata: {json}\n\n")),
        }
    }
}

/// An order moved from customer `from` to customer `to` (both folded, see
/// `fold_case`), and the change as each of them may see it: `leave`
/// (`"op":"leave"`, the row before the change, no old image) for a viewer
/// confined to `from`, `enter` (`"op":"enter"`, the row after, no old image)
/// for one confined to `to`. Built once per move, shared like the full frames.
#[derive(Debug)]
pub struct Move {
    pub from: String,
    pub to: String,
    pub leave: Frames,
    pub enter: Frames,
}

impl Move {
    /// The redacted variants of an update from `before` to `after`, when the
    /// customer changes (case-insensitively, as filters compare): None
    /// otherwise.
    pub fn build(
        pos: i64,
        customer: Option<&str>,
        old_customer: Option<&str>,
        after: &str,
        before: Option<&str>,
        actor: &str,
        at: Option<DateTime<Utc>>,
    ) -> Option<Box<Move>> {
        let (from, to) = moved_between(customer, old_customer)?;
        let before = before?;
        let leave = Frames::new(pos, &envelope_json(pos, "leave", before, None, actor, at));
        let enter = Frames::new(pos, &envelope_json(pos, "enter", after, None, actor, at));
        Some(Box::new(Move { from, to, leave, enter }))
    }

    fn bytes(&self) -> usize {
        [&self.leave, &self.enter].iter().map(|f| f.ws_frame.len() + f.sse.len()).sum()
    }

    /// The side of the move a viewer confined to `viewer` (folded) sees;
    /// None for a viewer confined to neither customer, who must not get the
    /// change.
    pub fn side(&self, viewer: &str) -> Option<Side> {
        if viewer == self.from {
            Some(Side::Leave)
        } else if viewer == self.to {
            Some(Side::Enter)
        } else {
            None
        }
    }

    pub fn frames(&self, side: Side) -> &Frames {
        match side {
            Side::Leave => &self.leave,
            Side::Enter => &self.enter,
        }
    }
}

/// The customers (folded, see `fold_case`) an order moved from and to, when
/// a change with these customers after and before it moved it.
fn moved_between(customer: Option<&str>, old_customer: Option<&str>) -> Option<(String, String)> {
    let (to, from) = (fold_case(customer?), fold_case(old_customer?));
    (to != from).then_some((from, to))
}

/// Which side of a move between customers a confined viewer is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The order was its customer's before the change (`"op":"leave"`).
    Leave,
    /// The order is its customer's after the change (`"op":"enter"`).
    Enter,
}

impl Change {
    /// Fails on a row not in `READ_SQL`'s shape (see `Envelope::from_row`).
    pub fn from_row(row: &Row) -> Result<Change, tokio_postgres::Error> {
        let Envelope { pos, order_id, actor, at, json, .. } = Envelope::from_row(row)?;
        let committed_micros = at.map(|t| t.timestamp_micros()).unwrap_or_default();
        let customer: Option<String> = row.try_get(5)?;
        let old_customer: Option<String> = row.try_get(6)?;
        // Customers differ only when an update moves the order (an insert
        // has no old customer, a delete the same one twice).
        let moved = match (&customer, &old_customer) {
            (Some(c), Some(o)) if c != o => {
                Move::build(pos, Some(c), Some(o), row.try_get(7)?, row.try_get(8)?, actor, at)
            }
            _ => None,
        };
        let Frames { ws_frame, sse } = Frames::new(pos, &json);
        Ok(Change {
            pos,
            committed_micros,
            order_id,
            status: row.try_get(3)?,
            old_status: row.try_get(4)?,
            customer,
            old_customer,
            ws_frame,
            sse,
            moved,
        })
    }

    /// The bytes this change holds in frames (its WebSocket frame, its SSE
    /// event, and a move's variants).
    pub fn bytes(&self) -> usize {
        self.ws_frame.len() + self.sse.len() + self.moved.as_ref().map_or(0, |m| m.bytes())
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

/// What `read_after` read.
pub struct CatchUp {
    pub changes: Vec<SharedChange>,
    /// The retention horizon in the same snapshot as the rows (None when
    /// there are none).
    pub pruned: Option<i64>,
    /// `READ_BYTES` cut the read short (see `LogRows`).
    pub cut: bool,
}

/// Reads up to `limit` changes after `after` with a pooled client.
pub async fn read_after(
    client: &deadpool_postgres::Client,
    after: i64,
    limit: i32,
) -> Result<CatchUp, tokio_postgres::Error> {
    let stmt = client.prepare_cached(READ_SQL).await?;
    let LogRows { rows, cut } = read_rows(client, &stmt, after, limit).await?;
    let pruned = rows.last().map(|r| r.try_get("pruned")).transpose()?;
    let changes = rows.iter().map(|r| Change::from_row(r).map(Arc::new)).collect::<Result<_, _>>()?;
    Ok(CatchUp { changes, pruned, cut })
}

/// The JSON of a change row (a row in `READ_SQL`'s shape) that a viewer may
/// see: all of it for an unconfined one (`viewer` None); for one confined to
/// a customer (folded), the change of its customer's order, or of a move
/// between customers its own side (`leave`: the row before, `enter`: the row
/// after, as the streams send it; see `Move`); None for another customer's.
/// Fails on a row not in `READ_SQL`'s shape (see `Envelope::from_row`).
pub fn visible_json(row: &Row, viewer: Option<&str>) -> Result<Option<String>, tokio_postgres::Error> {
    let envelope = Envelope::from_row(row)?;
    let Some(viewer) = viewer else { return Ok(Some(envelope.json)) };
    let customer: Option<&str> = row.try_get(5)?;
    let old_customer: Option<&str> = row.try_get(6)?;
    Ok(match moved_between(customer, old_customer) {
        Some((from, to)) => {
            let (op, image) = if from == viewer {
                match row.try_get::<_, Option<&str>>(8)? {
                    Some(before) => ("leave", before),
                    None => return Ok(None),
                }
            } else if to == viewer {
                ("enter", row.try_get(7)?)
            } else {
                return Ok(None);
            };
            Some(envelope_json(envelope.pos, op, image, None, envelope.actor, envelope.at))
        }
        None => [customer, old_customer].into_iter().flatten().any(|c| fold_case(c) == viewer).then_some(envelope.json),
    })
}

/// The log's head as a read hands it to a client (a page's position), with
/// what the listener checks it by after a reconnect (`Hub::note_handed_out`).
pub struct HandedHead {
    pub pos: i64,
    /// The commit time (microseconds) of the transaction that ends at the
    /// head; none when the head is the retention horizon or just past a
    /// recorded loss.
    pub committed_micros: Option<i64>,
    /// The retention horizon (positions at or below it are gone).
    pub pruned: i64,
}

/// Reads the head to hand out (in a page's snapshot: the position its rows
/// reflect).
pub async fn handed_head(client: &impl tokio_postgres::GenericClient) -> Result<HandedHead, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT h, (SELECT committed_at FROM change_tx WHERE end_pos = h), \
                    (SELECT pruned_through FROM change_retention) \
             FROM change_head() h",
            &[],
        )
        .await?;
    Ok(HandedHead {
        pos: row.try_get(0)?,
        committed_micros: row.try_get::<_, Option<DateTime<Utc>>>(1)?.map(|t| t.timestamp_micros()),
        pruned: row.try_get(2)?,
    })
}

/// Where the log stands: the newest committed position and the retention
/// horizon (positions at or below it are gone).
pub async fn log_bounds(client: &tokio_postgres::Client) -> Result<(i64, i64), tokio_postgres::Error> {
    let row = client.query_one("SELECT change_head(), (SELECT pruned_through FROM change_retention)", &[]).await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON in a server text frame.
    fn payload(frame: &Bytes) -> serde_json::Value {
        assert_eq!(frame[0], 0x80 | wire::OP_TEXT);
        let header = match frame[1] & 0x7f {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        serde_json::from_slice(&frame[header..]).unwrap()
    }

    fn sse_data(event: &Bytes) -> (String, serde_json::Value) {
        let text = std::str::from_utf8(event).unwrap();
        let (head, data) = text.split_once("data: ").unwrap();
        (head.to_string(), serde_json::from_str(data.trim_end()).unwrap())
    }

    #[test]
    fn a_move_between_customers_has_a_leave_and_an_enter_variant_without_the_other_side() {
        let before = r#"{"id":7,"customer_name":"Ada","customer_email":"ada@a.example","quantity":1}"#;
        let after = r#"{"id":7,"customer_name":"Bob","customer_email":"bob@b.example","quantity":1}"#;
        let at = DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z").unwrap().with_timezone(&Utc);
        let moved =
            Move::build(42, Some("Bob"), Some("ADA"), after, Some(before), "api:writer", Some(at)).expect("a move");
        assert_eq!((moved.from.as_str(), moved.to.as_str()), ("ada", "bob"));

        let leave = moved.frames(moved.side("ada").unwrap());
        let expected = serde_json::json!({"type": "change", "seq": 42, "op": "leave",
            "order": serde_json::from_str::<serde_json::Value>(before).unwrap(), "old": null,
            "actor": "api:writer", "at": "2026-01-02T03:04:05.000000Z"});
        assert_eq!(payload(&leave.ws_frame), expected);
        let (head, data) = sse_data(&leave.sse);
        assert_eq!(head, "id: 42\nevent: change\n");
        assert_eq!(data, expected);
        for bytes in [&leave.ws_frame, &leave.sse] {
            let text = String::from_utf8_lossy(bytes);
            assert!(!text.contains("Bob") && !text.contains("bob@"), "{text}");
        }

        let enter = moved.frames(moved.side("bob").unwrap());
        assert_eq!(payload(&enter.ws_frame)["op"], "enter");
        assert_eq!(payload(&enter.ws_frame)["order"]["customer_name"], "Bob");
        assert_eq!(payload(&enter.ws_frame)["old"], serde_json::Value::Null);
        assert_eq!(sse_data(&enter.sse).1, payload(&enter.ws_frame));
        for bytes in [&enter.ws_frame, &enter.sse] {
            let text = String::from_utf8_lossy(bytes);
            assert!(!text.contains("Ada") && !text.contains("ada@"), "{text}");
        }

        assert!(moved.side("carol").is_none(), "a third customer sees neither side");
    }

    #[test]
    fn changes_that_keep_the_customer_have_no_variants() {
        let row = r#"{"id":1,"customer_name":"Ada"}"#;
        // Insert (no old customer), delete or update within one customer,
        // and a change of case only (the same customer to filters).
        assert!(Move::build(1, Some("Ada"), None, row, None, "sql:x", None).is_none());
        assert!(Move::build(1, Some("Ada"), Some("Ada"), row, Some(row), "sql:x", None).is_none());
        assert!(Move::build(1, Some("ADA"), Some("ada"), row, Some(row), "sql:x", None).is_none());
        assert!(Move::build(1, Some("İsmail"), Some("ismail"), row, Some(row), "sql:x", None).is_none());
    }
}
