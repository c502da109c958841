//! Applies a batch of Kafka messages to PostgreSQL in one transaction: the
//! exactly-once core of the ingest.
//!
//! In one transaction, per batch:
//! 1. lock each partition's row in `kafka_offsets` (creating it if missing);
//!    a message below the stored `next_offset` was applied before (a
//!    redelivery after a crash or a rebalance) and is skipped — unless the
//!    partition's log now ends below the stored position (asked of the broker
//!    only then, between two transactions: the batch's transaction is rolled
//!    back, the broker asked, and the batch begun again with its answer, so a
//!    slow or failing broker never holds the positions' locks): that position
//!    belongs to a log that no longer exists (a topic deleted and recreated),
//!    and the new log's messages are applied. A message at or below an
//!    offset of its partition (and log) earlier in the same batch is a copy
//!    read again within the batch, a redelivery too;
//! 2. record the event ids in `ingested_events`; an id that is already there
//!    is a producer's duplicate and is skipped. A second copy of an id in the
//!    same batch is a duplicate only if the first copy is applied: a
//!    dead-lettered event sent again is retried, in the batch as across batches;
//! 3. apply the events with multi-row statements, in rounds so that a round
//!    holds at most one event per order (one UPDATE cannot change a row
//!    twice, and one order's events must apply in offset order) and a copy of
//!    an event id comes after the copy before it;
//! 4. record rejected messages in `dead_letters`, advance `next_offset`.
//!
//! The common path costs a fixed number of round trips per batch, whatever
//! its size. Business failures the database would raise (an unknown order, a
//! forbidden transition, an existing external_id) are predicted by the
//! statements themselves (RETURNING, a transition check in the WHERE clause)
//! and dead-lettered without aborting anything. Should the database still
//! reject a statement for one message (a constraint a DBA added), the batch is
//! rolled back and redone "carefully": one message at a time, each under a
//! savepoint, so only the culprit is dead-lettered.
//!
//! A careful redo can still fail as a whole with a data error: at COMMIT
//! (what runs there cannot be made immediate: the change log's sequencer, and
//! whatever triggers it sets off, e.g. a DBA's trigger on `change_tx` that
//! sees a transaction's changes once they have positions), or in a statement
//! outside the messages' savepoints. Then the batch is applied one
//! transaction per message: a message whose own transaction fails with a data
//! error (its COMMIT included) is dead-lettered in a transaction of its own,
//! and the others are applied, each exactly once, since each transaction
//! moves the position past its message.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::anyhow;
use chrono::{DateTime, Datelike, Utc};
use rust_decimal::Decimal;
use tokio_postgres::{Client, GenericClient, Statement, Transaction};
use uuid::Uuid;

use super::consumer::LogEnds;
use super::event::{cap_detail, Change, Reason, Rejection};
use super::{Batch, Message};
use crate::domain::{OrderPatch, Status};

/// A whole attempt (all statements and the commit) must finish in this time,
/// or the connection is presumed dead and replaced.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long cancelling a timed-out attempt's query may take.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// An attempt that did not finish within its limit: the connection is
/// presumed dead.
#[derive(Debug, thiserror::Error)]
#[error("the database did not answer within {0:?}")]
struct TimedOut(Duration);

/// What a careful attempt may take on top, per message: it costs three
/// round trips each (SAVEPOINT, the statement, RELEASE), so a batch of
/// thousands on a database a few milliseconds away takes minutes. With one
/// fixed limit, that redo timed out, counted as transient, and the batch
/// began again from its batch statements, forever.
const CAREFUL_PER_MESSAGE: Duration = Duration::from_millis(20);

/// What happened to one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    Pending,
    /// Below the stored position: applied by an earlier transaction.
    Redelivered,
    /// Its event_id was applied before.
    Duplicate,
    Applied,
    Dead(Rejection),
    /// Not applied now: its partition's new log is read again from its start
    /// first (see `Outcome::rewind`), which brings this message back.
    Reread,
}

/// A partition whose stored position was beyond the end of its log: the
/// position belonged to a log that no longer exists (the topic was deleted
/// and recreated, or the log otherwise reset), and the new log is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogReset {
    pub partition: i32,
    /// The stored position found beyond the log's end.
    pub stale: i64,
    /// The log's end, as the broker reported it.
    pub log_end: i64,
    /// The first offset applied from the new log: the log's start.
    pub first: i64,
    /// The new stored position.
    pub next: i64,
    /// The new log's generation (`kafka_offsets.log_generation`).
    pub generation: i32,
}

/// A partition whose new log the consumer did not read from its start:
/// seek back to `to` (see `find_log_resets`). Nothing of it was applied, so
/// a seek that does not take effect only means the next batch asks again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewind {
    pub partition: i32,
    pub to: i64,
}

/// A partition's row in `kafka_offsets`, as the batch locked it.
#[derive(Debug, Clone, Copy)]
struct Stored {
    next: Option<i64>,
    generation: i32,
    /// When the position last moved: a redelivered message was in the log
    /// before that, a recreated topic's new messages come after it.
    updated_at: DateTime<Utc>,
}

/// What a committed batch did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub fates: Vec<Fate>,
    pub written: u64,
    /// The new stored position per partition.
    pub next_offsets: Vec<(i32, i64)>,
    /// Partitions whose messages were all far behind the stored position:
    /// the consumer may jump ahead instead of reading them.
    pub seek: Vec<(i32, i64)>,
    /// Partitions whose log was found reset, and started over.
    pub resets: Vec<LogReset>,
    /// Partitions to read again from an earlier offset.
    pub rewind: Vec<Rewind>,
    /// Partitions whose stored position went back below what this writer
    /// had committed (the database restored from a backup, a failover to a
    /// replica that lacked the last commits, an operator's rewind): read
    /// again from the stored position.
    pub went_back: Vec<Rewind>,
    /// The stored positions: (partition, log generation, position).
    pub positions: Vec<(i32, i32, i64)>,
}

impl Outcome {
    pub fn count(&self, pred: impl Fn(&Fate) -> bool) -> u64 {
        self.fates.iter().filter(|f| pred(f)).count() as u64
    }
}

/// Why a batch did not commit.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Try the same batch again later (database down, connection reset,
    /// serialization failure, a schema problem an operator must fix).
    #[error("{0:#}")]
    Transient(anyhow::Error),
    /// A statement or the COMMIT failed because of a row's data: redo
    /// carefully, then one message per transaction. `rejection`: what the
    /// message is dead-lettered with when its own transaction fails so.
    #[error("{error:#}")]
    Data { error: anyhow::Error, rejection: Rejection },
    /// The broker could not say where a partition's log ends: try the same
    /// batch again later (the database connection is fine).
    #[error("{0:#}")]
    Broker(anyhow::Error),
}

/// Errors caused by the data of a row (SQL classes 22 and 23, a RAISE in a
/// trigger, ordercast's own OC4xx codes). Anything else — connection
/// failures, shutdowns, serialization failures, a dropped table — is not the
/// message's fault and must never dead-letter it.
fn is_data_error(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        let c = db.code().code();
        c.starts_with("22") || c.starts_with("23") || c.starts_with("P0") || c.starts_with("OC")
    })
}

fn classify(e: tokio_postgres::Error, step: &'static str) -> WriteError {
    if is_data_error(&e) {
        let mut rejection = rejection_from_db(&e);
        rejection.detail = cap_detail(format!("{step}: {}", rejection.detail));
        WriteError::Data { error: crate::db::describe(e).context(step), rejection }
    } else {
        WriteError::Transient(crate::db::describe(e).context(step))
    }
}

/// The reason a statement error gives for one message, in careful mode.
fn rejection_from_db(e: &tokio_postgres::Error) -> Rejection {
    let Some(db) = e.as_db_error() else { return Rejection::new(Reason::DatabaseRejected, e.to_string()) };
    match db.code().code() {
        "OC409" => Rejection::new(Reason::InvalidTransition, crate::db::message_with_hint(db)),
        "OC423" => Rejection::new(Reason::OrderLocked, crate::db::message_with_hint(db)),
        // Only the external_id's key means the order exists; another unique
        // index (a DBA's) is the database refusing the row.
        "23505" if db.constraint() == Some("orders_external_id_key") => {
            Rejection::new(Reason::OrderExists, format!("{} ({})", db.message(), db.detail().unwrap_or("")))
        }
        code => Rejection::new(
            Reason::DatabaseRejected,
            format!("{} (SQLSTATE {code}){}", db.message(), db.detail().map(|d| format!(": {d}")).unwrap_or_default()),
        ),
    }
}

const LOCK_SQL: &str = "\
WITH actor AS (SELECT set_config('ordercast.actor', $3, true))
INSERT INTO kafka_offsets (group_id, kafka_topic, kafka_partition)
SELECT $1, $2, p FROM unnest($4::int[]) AS p, actor ORDER BY p
ON CONFLICT (group_id, kafka_topic, kafka_partition) DO UPDATE SET updated_at = kafka_offsets.updated_at
RETURNING kafka_partition, next_offset, log_generation, updated_at";

// Sorted, the ids go into the index in order (about a quarter cheaper than
// random order); without RETURNING, the common case (no duplicate) costs no
// result rows: the row count says whether DUPLICATES_SQL must run.
const DEDUPE_SQL: &str = "\
INSERT INTO ingested_events (event_id, kafka_topic, kafka_partition, kafka_offset, occurred_at)
SELECT e::uuid, $1, p, o, t FROM unnest($2::text[], $3::int[], $4::bigint[], $5::timestamptz[]) AS v(e, p, o, t)
ORDER BY 1
ON CONFLICT (event_id) DO NOTHING";

// The ids this transaction did not insert were there before: duplicates.
// (Runs before any savepoint, so our rows carry the top-level xid.)
const DUPLICATES_SQL: &str = "\
SELECT event_id::text FROM ingested_events
WHERE event_id = ANY($1::text[]::uuid[]) AND xmin <> pg_current_xact_id()::xid";

// Only the rows this transaction recorded (top-level, as above): a message
// dead-lettered without its id being recorded here (its own transaction
// failed, see `Mode::DeadLetter`) must not forget a record another
// transaction made meanwhile, or a later copy would apply twice.
const UNDEDUPE_SQL: &str = "\
DELETE FROM ingested_events WHERE event_id = ANY($1::text[]::uuid[]) AND xmin = pg_current_xact_id()::xid";

// An event applied by a later copy in its batch than the one recorded (the
// earlier copy was dead-lettered): the row names the copy that applied.
const RELOCATE_SQL: &str = "\
UPDATE ingested_events i SET kafka_partition = v.p, kafka_offset = v.o, occurred_at = v.t
FROM unnest($1::text[], $2::int[], $3::bigint[], $4::timestamptz[]) AS v(e, p, o, t)
WHERE i.event_id = v.e::uuid";

const CREATE_SQL: &str = "\
INSERT INTO orders (external_id, customer_name, customer_email, product, quantity, unit_price, status)
SELECT x, n, e, p, q, u, COALESCE(s, 'pending')
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::numeric[], $7::text[]) AS v(x, n, e, p, q, u, s)
ON CONFLICT (external_id) DO NOTHING
RETURNING external_id";

// The transition check and the line-item lock mirror the orders_guard
// trigger, so a forbidden change leaves its row out of RETURNING instead of
// aborting the statement.
const UPDATE_SQL: &str = "\
UPDATE orders o SET
    customer_name = COALESCE(v.n, o.customer_name),
    customer_email = CASE WHEN v.es THEN v.e ELSE o.customer_email END,
    product = COALESCE(v.p, o.product),
    quantity = COALESCE(v.q, o.quantity),
    unit_price = COALESCE(v.u, o.unit_price),
    status = COALESCE(v.s, o.status),
    error_message = CASE WHEN v.ms THEN v.m ELSE o.error_message END
FROM unnest($1::text[], $2::text[], $3::bool[], $4::text[], $5::text[], $6::int[], $7::numeric[], $8::text[],
            $9::bool[], $10::text[]) AS v(x, n, es, e, p, q, u, s, ms, m)
WHERE o.external_id = v.x
  AND (v.s IS NULL OR v.s = o.status
       OR EXISTS (SELECT 1 FROM order_transitions t WHERE t.from_status = o.status AND t.to_status = v.s))
  AND (o.status = 'pending'
       OR ((v.p IS NULL OR v.p = o.product) AND (v.q IS NULL OR v.q = o.quantity) AND (v.u IS NULL OR v.u = o.unit_price)))
RETURNING o.external_id";

const CLASSIFY_SQL: &str = "\
SELECT o.external_id, o.status,
       COALESCE((SELECT string_agg(to_status, ', ' ORDER BY to_status) FROM order_transitions
                 WHERE from_status = o.status), 'none (final status)'),
       o.product, o.quantity, o.unit_price
FROM orders o WHERE o.external_id = ANY($1::text[])";

// A message is one group's dead letter once per log generation (V11): the
// key holds the group, as another group reading the same topic records its
// own, and the generation, as a recreated topic's offsets repeat the old ones;
// and the message's digest (V17), as a position deleted to recover from a
// recreated topic starts the generation over at 0.
const DEAD_LETTER_SQL: &str = "\
INSERT INTO dead_letters (group_id, kafka_topic, kafka_partition, kafka_offset, log_generation, message_key, payload,
                          headers, message_timestamp, event_id, reason, detail)
SELECT $1, $2, p, o, g, k, b, h, ts, e::uuid, r, d
FROM unnest($3::int[], $4::bigint[], $5::int[], $6::bytea[], $7::bytea[], $8::jsonb[], $9::timestamptz[],
            $10::text[], $11::text[], $12::text[]) AS v(p, o, g, k, b, h, ts, e, r, d)
ON CONFLICT (group_id, kafka_topic, kafka_partition, kafka_offset, log_generation, message_digest) DO NOTHING";

// `updated_at` is when the position last moved (a batch of redeliveries
// leaves it): `find_log_resets` compares messages' timestamps with it.
const ADVANCE_SQL: &str = "\
UPDATE kafka_offsets k SET next_offset = v.n, log_generation = v.g,
    updated_at = CASE WHEN (k.next_offset, k.log_generation) IS DISTINCT FROM (v.n, v.g) THEN now() ELSE k.updated_at END
FROM unnest($3::int[], $4::bigint[], $5::int[]) AS v(p, n, g)
WHERE k.group_id = $1 AND k.kafka_topic = $2 AND k.kafka_partition = v.p";

/// How `apply` applies the messages still to apply.
#[derive(Debug, Clone, Copy)]
enum Mode<'a> {
    /// Multi-row statements, in rounds: the common path.
    Batch,
    /// One message at a time, each under a savepoint, every constraint that
    /// can be checked per statement checked so.
    Careful,
    /// Applies nothing: records them as dead letters with this rejection
    /// (their own transaction failed with it, see `Writer::one_by_one`).
    DeadLetter(&'a Rejection),
}

/// Careful mode checks every constraint after each statement, except the
/// change log's sequencer, which must run at commit.
const CAREFUL_CONSTRAINTS_SQL: &str = "SET CONSTRAINTS ALL IMMEDIATE; SET CONSTRAINTS change_tx_sequence DEFERRED";

/// Rows one pruning DELETE removes at most: each round is a short
/// transaction; rounds repeat until one removes fewer.
pub const PRUNE_ROUND: i64 = 50_000;

const PRUNE_EVENTS_SQL: &str = "\
DELETE FROM ingested_events WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM ingested_events WHERE ingested_at < now() - make_interval(secs => $1) LIMIT $2))";

const PRUNE_DEAD_LETTERS_SQL: &str = "\
DELETE FROM dead_letters WHERE id = ANY(ARRAY(
    SELECT id FROM dead_letters
    WHERE published_at IS NOT NULL AND received_at < now() - make_interval(secs => $1) LIMIT $2))";

struct Statements {
    lock: Statement,
    dedupe: Statement,
    duplicates: Statement,
    undedupe: Statement,
    relocate: Statement,
    create: Statement,
    update: Statement,
    classify: Statement,
    dead_letter: Statement,
    advance: Statement,
}

struct Connection {
    client: Client,
    st: Statements,
    /// What it was opened with, for cancelling its queries.
    tls: crate::db::Tls,
}

/// What a writer writes for: its group and topic, and how it asks where a
/// partition's log ends.
#[derive(Clone)]
struct Scope {
    group_id: String,
    topic: String,
    actor: String,
    /// None: messages below the stored position are always redeliveries.
    log_ends: Option<LogEnds>,
}

/// The ingest's own database connection (not the REST pool, so neither can
/// starve the other) and what it needs to write batches.
pub struct Writer {
    url: String,
    scope: Scope,
    conn: Option<Connection>,
    attempt_timeout: Duration,
    /// Per partition, the position this writer last committed, and its log
    /// generation: a stored position found below it went back in time.
    committed: Committed,
    /// Per partition, where the consumer was last put (its start at an
    /// assignment, or where a position gone back sent it back to), and its
    /// log generation, until a write of the partition commits without
    /// going back: a stored position found below it went back again, and a
    /// run read from there is read again from the stored position.
    positioned: Committed,
    /// Partitions read again since a position that went back (see
    /// `GoingBack`).
    going_back: HashMap<i32, GoingBack>,
    go_back_limit: Duration,
    starts: Option<Starts>,
}

/// A partition read again since its position went back.
struct GoingBack {
    /// Where from.
    to: i64,
    since: std::time::Instant,
    /// How many writes sent messages of it back since.
    writes: u32,
}

/// How long a partition whose position went back may wait for the messages
/// from there before the ingest goes on without them (see `Writer::attempt`).
const GO_BACK_LIMIT: Duration = Duration::from_secs(30);
/// ...and how many writes must have sent its messages back meanwhile. What
/// was read before the seek back reaches the writer first: the reader's
/// batch, the one waiting for a writer, the writer's own, a few at most. A
/// write that takes long (a database that fails over again, a batch
/// applied one transaction per message) is no sign that the seek did not
/// take, so time alone does not decide.
const GO_BACK_WRITES: u32 = 8;

/// partition -> (log generation, position committed).
type Committed = HashMap<i32, (i32, i64)>;

/// The positions assigned partitions started from, noted by the consumer at
/// each assignment and taken by the writer that writes the partition. They
/// are what the database held then: one found below it before this
/// writer's first commit went back in time as surely as one found below
/// what it committed (a failover that lost the previous owner's last
/// commits while this instance was taking over).
#[derive(Debug, Default, Clone)]
pub struct Starts(Arc<Mutex<HashMap<i32, (i32, i64)>>>);

impl Starts {
    /// Partition `p` starts at `next` of log generation `generation`.
    pub fn note(&self, p: i32, generation: i32, next: i64) {
        self.0.lock().unwrap().insert(p, (generation, next)); // unwrap: never held across a panic
    }

    /// Takes the starts of `partitions` noted since the last take.
    fn take(&self, partitions: impl Iterator<Item = i32>) -> Vec<(i32, (i32, i64))> {
        let mut starts = self.0.lock().unwrap(); // unwrap: never held across a panic
        if starts.is_empty() {
            return Vec::new();
        }
        partitions.filter_map(|p| starts.remove(&p).map(|s| (p, s))).collect()
    }
}

/// Far enough behind the stored position to be worth a seek.
const SEEK_AHEAD_MIN: i64 = 1000;

impl Writer {
    pub fn new(url: &str, group_id: &str, topic: &str) -> Writer {
        Writer {
            url: url.to_string(),
            scope: Scope {
                group_id: group_id.to_string(),
                topic: topic.to_string(),
                actor: format!("kafka:{topic}"),
                log_ends: None,
            },
            conn: None,
            attempt_timeout: ATTEMPT_TIMEOUT,
            committed: Committed::new(),
            positioned: Committed::new(),
            going_back: HashMap::new(),
            go_back_limit: GO_BACK_LIMIT,
            starts: None,
        }
    }

    /// Where the consumer started the partitions it was assigned (see
    /// `Starts`).
    pub fn with_starts(mut self, starts: Starts) -> Writer {
        self.starts = Some(starts);
        self
    }

    /// Another wait than `GO_BACK_LIMIT` for the messages from a position
    /// that went back.
    pub fn with_go_back_limit(mut self, limit: Duration) -> Writer {
        self.go_back_limit = limit;
        self
    }

    /// Another limit for an attempt than `ATTEMPT_TIMEOUT` (a careful one
    /// gets `CAREFUL_PER_MESSAGE` more per message).
    pub fn with_attempt_timeout(mut self, limit: Duration) -> Writer {
        self.attempt_timeout = limit;
        self
    }

    /// Checks, when a batch holds messages below the stored position, that
    /// the partition's log still reaches that position (see `apply`).
    pub fn with_log_ends(mut self, log_ends: LogEnds) -> Writer {
        self.scope.log_ends = Some(log_ends);
        self
    }

    async fn connect(&mut self) -> Result<&mut Connection, WriteError> {
        if self.conn.as_ref().is_some_and(|c| c.client.is_closed()) {
            self.conn = None;
        }
        if self.conn.is_none() {
            // With the backend's keepalives: the transaction's row locks
            // (partitions' positions) are let go within seconds of this
            // host's death, not hours.
            let client =
                crate::db::connect_as(&self.url, Some("ordercast-ingest")).await.map_err(WriteError::Transient)?;
            // Its attempts have their own limit (`ATTEMPT_TIMEOUT`, and one
            // transaction per message past it): a database or role's
            // statement or transaction timeout cut the same batch short at
            // every try, and the instance stalled. The statements are
            // written for READ COMMITTED.
            client
                .batch_execute(&format!(
                    "SET default_transaction_isolation = 'read committed'; {}",
                    crate::db::HELD_SESSION
                ))
                .await
                .map_err(|e| classify(e, "Failed to set up the session"))?;
            let tls = crate::db::tls(&self.url).map_err(WriteError::Transient)?;
            let prepare = |sql: &'static str| {
                let client = &client;
                async move { client.prepare(sql).await.map_err(|e| classify(e, "Failed to prepare a statement")) }
            };
            let st = Statements {
                lock: prepare(LOCK_SQL).await?,
                dedupe: prepare(DEDUPE_SQL).await?,
                duplicates: prepare(DUPLICATES_SQL).await?,
                undedupe: prepare(UNDEDUPE_SQL).await?,
                relocate: prepare(RELOCATE_SQL).await?,
                create: prepare(CREATE_SQL).await?,
                update: prepare(UPDATE_SQL).await?,
                classify: prepare(CLASSIFY_SQL).await?,
                dead_letter: prepare(DEAD_LETTER_SQL).await?,
                advance: prepare(ADVANCE_SQL).await?,
            };
            self.conn = Some(Connection { client, st, tls });
        }
        Ok(self.conn.as_mut().expect("connected just above"))
    }

    /// Writes the batch; on a data error redoes it message by message. A
    /// transient error leaves nothing behind (the transaction rolls back) and
    /// is returned for the caller to retry the same batch.
    ///
    /// Should the careful redo fail as a whole with a data error too (at
    /// COMMIT, say), or the batch or its careful redo take longer than its
    /// limit, the batch is applied one transaction per message
    /// (`one_by_one`), each with a limit of its own.
    pub async fn write(&mut self, batch: &Batch) -> Result<Outcome, WriteError> {
        let msgs = &batch.messages;
        // Log ends asked once serve every attempt while the position they
        // were asked at holds.
        let mut ends = LogEndAnswers::new();
        let result = match self.attempt(msgs, Mode::Batch, &mut ends).await {
            Err(WriteError::Data { error, .. }) => {
                log::warn!("a batch statement was rejected ({error:#}); applying the batch one message at a time");
                match self.attempt(msgs, Mode::Careful, &mut ends).await {
                    Err(WriteError::Data { error, .. }) => {
                        log::warn!(
                            "the batch applied one message at a time was rejected as a whole ({error:#}); applying \
                             it one transaction per message"
                        );
                        self.one_by_one(msgs, &mut ends).await
                    }
                    // Too slow as one transaction (a database far away):
                    // one transaction per message, each with its own limit,
                    // makes progress where starting over would not.
                    Err(WriteError::Transient(e)) if e.is::<TimedOut>() => {
                        log::warn!(
                            "applying the batch one message at a time took too long ({e:#}): applying it one \
                             transaction per message"
                        );
                        self.conn = None;
                        self.one_by_one(msgs, &mut ends).await
                    }
                    other => other,
                }
            }
            // The same for the batch itself: an order with many events in
            // it takes one round (one or two statements) per event, so the
            // whole can outlast the limit where each message fits in it.
            Err(WriteError::Transient(e)) if e.is::<TimedOut>() && msgs.len() > 1 => {
                log::warn!("applying the batch took too long ({e:#}): applying it one transaction per message");
                self.conn = None;
                self.one_by_one(msgs, &mut ends).await
            }
            other => other,
        };
        match &result {
            Ok(outcome) => self.went_back(outcome),
            // The connection may be broken; a fresh one costs little next time.
            Err(WriteError::Transient(_)) => self.conn = None,
            Err(_) => {}
        }
        result
    }

    /// Notes the partitions a write sent back (its outcome's `went_back`,
    /// which the consumer seeks back to): where the consumer now reads
    /// them from, and how long and through how many writes they have been
    /// waited for. Only a write that returns counts: one that failed
    /// (after some of its transactions sent messages back) is written
    /// again, and its seek was never made.
    ///
    /// Batches read before the seek back come first, for a moment; still
    /// nothing from before the position this writer committed after
    /// `go_back_limit` and `GO_BACK_WRITES` writes, the log no longer holds
    /// it (retention, compaction) or the seek does not take: go on from
    /// what it holds.
    fn went_back(&mut self, outcome: &Outcome) {
        let now = std::time::Instant::now();
        for r in &outcome.went_back {
            let p = r.partition;
            let Some(&(_, generation, next)) = outcome.positions.iter().find(|(q, ..)| *q == p) else { continue };
            self.positioned.insert(p, (generation, r.to));
            // Waited for from now when it is new, or gone back again, further.
            let entry = self.going_back.entry(p).or_insert(GoingBack { to: r.to, since: now, writes: 0 });
            if entry.to != r.to {
                *entry = GoingBack { to: r.to, since: now, writes: 0 };
            }
            // Once per write: a batch applied one transaction per message
            // sends its messages back in as many.
            entry.writes += 1;
            let GoingBack { to, since, writes } = *entry;
            let wait = self.go_back_limit;
            if now.duration_since(since) > wait && writes > GO_BACK_WRITES {
                log::error!(
                    "Kafka partition {}/{p}: its stored position went back to {to}, but the messages from there \
                     were not read again within {wait:?} and {writes} writes: going on from what the log holds; the \
                     messages between are not applied",
                    self.scope.topic
                );
                self.committed.insert(p, (generation, next));
                self.going_back.remove(&p);
                self.positioned.remove(&p);
            }
        }
    }

    /// Applies the messages one transaction each, in order, each moving its
    /// partition's position past its message. A message whose transaction
    /// fails with a data error (at COMMIT, or in a statement outside its
    /// savepoint) is dead-lettered with that error in a transaction of its
    /// own, which touches no order. Any other error stops here and is
    /// returned: the messages committed so far are redeliveries when the
    /// batch is written again.
    async fn one_by_one(&mut self, msgs: &[Message], ends: &mut LogEndAnswers) -> Result<Outcome, WriteError> {
        let mut all = Outcome::default();
        let mut next: HashMap<i32, i64> = HashMap::new();
        let mut seek: HashMap<i32, i64> = HashMap::new();
        let mut rewind: HashMap<i32, Rewind> = HashMap::new();
        let mut went_back: HashMap<i32, Rewind> = HashMap::new();
        let mut positions: HashMap<i32, (i32, i64)> = HashMap::new();
        for m in msgs {
            let one = std::slice::from_ref(m);
            let outcome = match self.attempt(one, Mode::Careful, ends).await {
                Err(WriteError::Data { error, rejection }) => {
                    log::warn!(
                        "partition {} offset {}: its own transaction was rejected ({error:#}): dead-lettering it",
                        m.partition,
                        m.offset
                    );
                    self.attempt(one, Mode::DeadLetter(&rejection), ends).await?
                }
                other => other?,
            };
            all.fates.extend(outcome.fates);
            all.written += outcome.written;
            all.resets.extend(outcome.resets);
            // Each transaction's positions are the latest (a log reset may
            // have moved one back).
            next.extend(outcome.next_offsets);
            seek.extend(outcome.seek);
            rewind.extend(outcome.rewind.into_iter().map(|r| (r.partition, r)));
            went_back.extend(outcome.went_back.into_iter().map(|r| (r.partition, r)));
            positions.extend(outcome.positions.into_iter().map(|(p, g, n)| (p, (g, n))));
        }
        all.next_offsets = next.into_iter().collect();
        all.next_offsets.sort_unstable();
        // A seek ahead only for a partition whose messages were all redeliveries.
        all.seek = seek
            .into_iter()
            .filter(|(p, _)| msgs.iter().zip(&all.fates).all(|(m, f)| m.partition != *p || *f == Fate::Redelivered))
            .collect();
        all.seek.sort_unstable();
        all.rewind = rewind.into_values().collect();
        all.went_back = went_back.into_values().collect();
        all.positions = positions.into_iter().map(|(p, (g, n))| (p, g, n)).collect();
        all.rewind.sort_unstable_by_key(|r| r.partition);
        Ok(all)
    }

    async fn attempt(
        &mut self,
        msgs: &[Message],
        mode: Mode<'_>,
        ends: &mut LogEndAnswers,
    ) -> Result<Outcome, WriteError> {
        let scope = self.scope.clone();
        let limit = match mode {
            Mode::Careful => self.attempt_timeout + CAREFUL_PER_MESSAGE * msgs.len().min(u32::MAX as usize) as u32,
            _ => self.attempt_timeout,
        };
        // Where the partitions started at their last assignment counts as
        // committed by this writer, unless it committed further since (or
        // in a later log). Taken once: a writer that gave up waiting for a
        // position gone back goes on from it.
        if let Some(starts) = &self.starts {
            for (p, start) in starts.take(msgs.iter().map(|m| m.partition)) {
                let known = self.committed.entry(p).or_insert(start);
                *known = (*known).max(start);
                self.positioned.insert(p, start);
            }
        }
        // `ends`: where the logs of partitions with messages below their
        // stored positions end, asked of the broker between transactions.
        for _ in 0..ASK_BROKER_ROUNDS {
            let (committed, positioned) = (self.committed.clone(), self.positioned.clone());
            let conn = self.connect().await?;
            let run = async {
                let mut tx = conn.client.transaction().await.map_err(|e| classify(e, "BEGIN failed"))?;
                if let Mode::Careful = mode {
                    // A savepoint does not check deferred constraints (a
                    // DBA's DEFERRABLE INITIALLY DEFERRED foreign key, say):
                    // checked at COMMIT, the culprit would fail the batch
                    // again and again. Checked at the end of each statement,
                    // its message's savepoint sees it. The change log's
                    // sequencer stays deferred: it must run at commit (V9).
                    tx.batch_execute(CAREFUL_CONSTRAINTS_SQL)
                        .await
                        .map_err(|e| classify(e, "Failed to make the constraints immediate"))?;
                }
                let step = apply(&mut tx, &conn.st, msgs, &scope, mode, ends, (&committed, &positioned)).await?;
                match step {
                    Step::Done(_) => tx.commit().await.map_err(|e| classify(e, "COMMIT failed"))?,
                    Step::AskBroker(_) => tx.rollback().await.map_err(|e| classify(e, "ROLLBACK failed"))?,
                }
                Ok(step)
            };
            match tokio::time::timeout(limit, run).await {
                Ok(Ok(Step::Done(outcome))) => {
                    // What the database now holds, but where it was found
                    // gone back: that is caught up with by reading again
                    // (see `went_back`, once the write is done).
                    for &(p, generation, next) in &outcome.positions {
                        if !outcome.went_back.iter().any(|r| r.partition == p) {
                            self.committed.insert(p, (generation, next));
                            self.going_back.remove(&p);
                            self.positioned.remove(&p);
                        }
                    }
                    return Ok(outcome);
                }
                Ok(Ok(Step::AskBroker(partitions))) => ends.extend(ask_log_ends(&scope, &partitions).await?),
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    // Its backend may still be at work, or waiting for a
                    // lock (a DBA's transaction on an order): cancelled, its
                    // transaction ends and lets the partitions' positions
                    // go. Dropped only, it would hold them until its wait
                    // ended, and every retry would queue up behind it.
                    let cancel = conn.client.cancel_token();
                    if let Ok(Err(e)) =
                        tokio::time::timeout(CANCEL_TIMEOUT, cancel.cancel_query(conn.tls.clone())).await
                    {
                        log::debug!("could not cancel the timed-out attempt's query: {e}");
                    }
                    return Err(WriteError::Transient(TimedOut(limit).into()));
                }
            }
        }
        Err(WriteError::Transient(anyhow!(
            "the partitions' positions kept moving while the broker was asked where their logs end"
        )))
    }

    /// Forgets old event ids and published dead letters: `PRUNE_ROUND` rows
    /// at a time until a round removes fewer (or `stop` says so), yielding
    /// between rounds, so pruning keeps up with any ingest rate.
    pub async fn prune(
        &mut self,
        dedupe_secs: u64,
        dead_letter_secs: u64,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<(u64, u64), WriteError> {
        let mut removed = [0u64; 2];
        for (total, (sql, secs, what)) in removed.iter_mut().zip([
            (PRUNE_EVENTS_SQL, dedupe_secs, "Failed to prune ingested_events"),
            (PRUNE_DEAD_LETTERS_SQL, dead_letter_secs, "Failed to prune dead_letters"),
        ]) {
            loop {
                let conn = self.connect().await?;
                let n =
                    conn.client.execute(sql, &[&(secs as f64), &PRUNE_ROUND]).await.map_err(|e| classify(e, what))?;
                *total += n;
                if n < PRUNE_ROUND as u64 || *stop.borrow() {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        Ok((removed[0], removed[1]))
    }
}

fn event_of(m: &Message) -> Option<&super::event::OrderEvent> {
    m.decoded.as_ref().ok()
}

/// Where a partition's log starts and ends, from the broker, asked after
/// the partition's position (`asked`) was read. It is used only while the
/// position is still that one: then the answer is younger than whatever the
/// position was stored from.
#[derive(Debug, Clone, Copy)]
struct LogEndAnswer {
    asked: Ask,
    start: i64,
    end: i64,
}

type LogEndAnswers = HashMap<i32, LogEndAnswer>;

/// A partition whose log end must be asked, at its stored position.
#[derive(Debug, Clone, Copy)]
struct Ask {
    partition: i32,
    next: i64,
    generation: i32,
}

/// How many times one attempt may roll back to ask the broker: once, and
/// again only if another writer moved a position in between.
const ASK_BROKER_ROUNDS: usize = 3;

/// What `apply` did in its transaction.
enum Step {
    /// Applied: commit.
    Done(Outcome),
    /// Nothing done: roll back, ask the broker where these partitions' logs
    /// end, and begin again with the answers.
    AskBroker(Vec<Ask>),
}

/// Asks the broker where the partitions' logs end, all at once.
async fn ask_log_ends(scope: &Scope, asks: &[Ask]) -> Result<LogEndAnswers, WriteError> {
    let Some(ends) = &scope.log_ends else { return Ok(LogEndAnswers::new()) };
    let answers = futures_util::future::join_all(asks.iter().map(|a| ends.query(a.partition))).await;
    asks.iter()
        .zip(answers)
        .map(|(ask, a)| {
            let (start, end) = a.map_err(WriteError::Broker)?;
            // librdkafka reports a failed half of its two-part question as an
            // empty log (start = end). The start matters only for a log that
            // ends below the position, which messages were just read from:
            // such a log is not empty. (A log emptied since, ending at or
            // past the position, holds only redeliveries: no question.)
            if start >= end && end < ask.next {
                return Err(WriteError::Broker(anyhow!(
                    "Kafka says partition {} of {} is empty (its log starts and ends at {end}), but messages \
                     below the stored position were just read from it: asking again",
                    ask.partition,
                    scope.topic
                )));
            }
            Ok((ask.partition, LogEndAnswer { asked: *ask, start, end }))
        })
        .collect()
}

async fn apply(
    tx: &mut Transaction<'_>,
    st: &Statements,
    msgs: &[Message],
    scope: &Scope,
    mode: Mode<'_>,
    ends: &LogEndAnswers,
    (committed, positioned): (&Committed, &Committed),
) -> Result<Step, WriteError> {
    let (group, topic, actor) = (scope.group_id.as_str(), scope.topic.as_str(), scope.actor.as_str());
    let mut fates = vec![Fate::Pending; msgs.len()];

    // 1. Lock the partitions' positions, in a fixed order (no deadlocks).
    let mut partitions: Vec<i32> = msgs.iter().map(|m| m.partition).collect();
    partitions.sort_unstable();
    partitions.dedup();
    let stored: HashMap<i32, Stored> = tx
        .query(&st.lock, &[&group, &topic, &actor, &partitions])
        .await
        .map_err(|e| classify(e, "Failed to lock the partition positions"))?
        .iter()
        .map(|r| (r.get(0), Stored { next: r.get(1), generation: r.get(2), updated_at: r.get(3) }))
        .collect();
    // Each message's log generation, and whether it is compared with the
    // stored position (not when that position belongs to an older log).
    let mut generation: Vec<i32> = msgs.iter().map(|m| stored.get(&m.partition).map_or(0, |s| s.generation)).collect();
    let mut new_log = vec![false; msgs.len()];
    let (resets, rewind) = match find_log_resets(msgs, &stored, scope, ends) {
        Ok(found) => found,
        Err(ask) => return Ok(Step::AskBroker(ask)),
    };
    for r in &resets {
        for i in new_log_messages(msgs, r.partition, r.log_end) {
            new_log[i] = true;
            generation[i] = r.generation;
        }
    }
    for r in &rewind {
        for i in new_log_messages(msgs, r.partition, i64::MAX) {
            fates[i] = Fate::Reread;
        }
    }
    // A stored position below the one this writer committed in the same
    // log went back in time, and the messages between were lost with it:
    // read again from it. Not if a message of the partition in the batch
    // comes before what was committed: then the batch was read since the
    // partition was sent back, and is applied as usual (from the stored
    // position, a gap of transaction markers or compacted messages at most).
    let mut went_back = Vec::new();
    for (&p, s) in &stored {
        let (Some(next), Some(&(generation, was))) = (s.next, committed.get(&p)) else { continue };
        let touched = resets.iter().any(|r| r.partition == p) || rewind.iter().any(|r| r.partition == p);
        if generation != s.generation || next >= was || touched {
            continue;
        }
        // What the batch holds of the partition after its last step back
        // in offsets; before it, messages read before a seek back (or a
        // reassignment) that come again after it.
        let run: Vec<usize> = new_log_messages(msgs, p, i64::MAX).collect();
        let run_start = run.first().copied().unwrap_or(msgs.len());
        for (i, m) in msgs.iter().enumerate().take(run_start) {
            if m.partition == p {
                fates[i] = Fate::Reread;
            }
        }
        // Where the consumer was put last (an assignment, a position gone
        // back) is what the database held then: a stored position below
        // it went back since, and a run read from there is read again too.
        let from = match positioned.get(&p) {
            Some(&(g, at)) if g == s.generation && next < at => at.min(was),
            _ => was,
        };
        if run.first().is_some_and(|&i| msgs[i].offset >= from) {
            went_back.push(Rewind { partition: p, to: next });
            for &i in &run {
                fates[i] = Fate::Reread;
            }
        }
    }
    // The highest offset before each message in the batch, per partition
    // and log: a message at or below it was read again within the batch (a
    // seek back, a rebalance that fetched again what the batch already
    // held), a copy of one before it. Linked only by event id, a copy of a
    // dead-lettered event would be applied on its own merits, after the
    // events that followed it.
    let mut top: HashMap<(i32, bool), i64> = HashMap::new();
    for (i, m) in msgs.iter().enumerate() {
        if fates[i] == Fate::Reread {
            continue;
        }
        let next = stored.get(&m.partition).and_then(|s| s.next);
        let seen = top.entry((m.partition, new_log[i])).or_insert(i64::MIN);
        let again = m.offset <= *seen;
        *seen = (*seen).max(m.offset);
        fates[i] = if again || !new_log[i] && next.is_some_and(|n| m.offset < n) {
            Fate::Redelivered
        } else {
            match (&m.decoded, mode) {
                (Err(r), _) => Fate::Dead(r.clone()),
                (Ok(_), Mode::DeadLetter(r)) => Fate::Dead(r.clone()),
                (Ok(_), _) => Fate::Pending,
            }
        };
    }

    // 2. Deduplicate event ids. In the batch, a copy of an event id waits
    //    for the copy before it (`earlier`): it is a duplicate if that one is
    //    applied, and is processed on its own merits if that one is
    //    dead-lettered, like a dead-lettered event sent again later. The
    //    first copies are checked against the table.
    let mut earlier: Vec<Option<usize>> = vec![None; msgs.len()];
    let mut last_copy: HashMap<Uuid, usize> = HashMap::new();
    for (i, m) in msgs.iter().enumerate() {
        if let (Fate::Pending, Some(e)) = (&fates[i], event_of(m)) {
            earlier[i] = last_copy.insert(e.event_id, i);
        }
    }
    let firsts: Vec<usize> = (0..msgs.len()).filter(|&i| fates[i] == Fate::Pending && earlier[i].is_none()).collect();
    if !firsts.is_empty() {
        let ids: Vec<String> =
            firsts.iter().map(|&i| event_of(&msgs[i]).map(|e| e.event_id.to_string()).unwrap_or_default()).collect();
        let parts: Vec<i32> = firsts.iter().map(|&i| msgs[i].partition).collect();
        let offsets: Vec<i64> = firsts.iter().map(|&i| msgs[i].offset).collect();
        let times: Vec<DateTime<Utc>> =
            firsts.iter().map(|&i| event_of(&msgs[i]).map(|e| e.occurred_at).unwrap_or_default()).collect();
        let inserted = tx
            .execute(&st.dedupe, &[&topic, &ids, &parts, &offsets, &times])
            .await
            .map_err(|e| classify(e, "Failed to record the event ids"))?;
        if inserted < firsts.len() as u64 {
            let seen_before: HashSet<Uuid> = tx
                .query(&st.duplicates, &[&ids])
                .await
                .map_err(|e| classify(e, "Failed to find duplicate event ids"))?
                .iter()
                .filter_map(|r| r.get::<_, &str>(0).parse().ok())
                .collect();
            for i in 0..msgs.len() {
                if fates[i] == Fate::Pending && event_of(&msgs[i]).is_some_and(|e| seen_before.contains(&e.event_id)) {
                    fates[i] = Fate::Duplicate;
                }
            }
        }
    }

    // 3. Apply.
    let mut written = 0u64;
    if let Mode::Careful = mode {
        for i in 0..msgs.len() {
            settle_copy(i, &earlier, &mut fates);
            // An id the sequence draws for a new order may be taken by a row
            // a DBA wrote with an id of its own: the message is applied
            // again, drawing the next (as REST's create does). Before, it
            // was dead-lettered as refused by the database, one good event
            // per taken id.
            let mut taken = 0;
            while fates[i] == Fate::Pending {
                let savepoint = tx.savepoint("ingest_message").await.map_err(|e| classify(e, "SAVEPOINT failed"))?;
                match apply_round(&savepoint, st, msgs, &[i], &mut fates).await {
                    Ok(n) => {
                        written += n;
                        savepoint.commit().await.map_err(|e| classify(e, "RELEASE SAVEPOINT failed"))?;
                        break;
                    }
                    Err(ApplyError::Data(e)) if crate::db::order_id_taken(&e) => {
                        savepoint.rollback().await.map_err(|e| classify(e, "ROLLBACK TO SAVEPOINT failed"))?;
                        taken += 1;
                        if taken == crate::db::ORDER_ID_ATTEMPTS {
                            return Err(WriteError::Transient(crate::db::order_id_sequence_behind()));
                        }
                    }
                    Err(ApplyError::Data(e)) => {
                        fates[i] = Fate::Dead(rejection_from_db(&e));
                        savepoint.rollback().await.map_err(|e| classify(e, "ROLLBACK TO SAVEPOINT failed"))?;
                    }
                    Err(ApplyError::Other(e)) => return Err(classify(e, "Failed to apply an event")),
                }
            }
            crate::db::warn_order_ids_taken("Kafka ingest", taken);
        }
    } else {
        for round in rounds(msgs, &fates, &earlier) {
            let round: Vec<usize> = round
                .into_iter()
                .filter(|&i| {
                    settle_copy(i, &earlier, &mut fates);
                    fates[i] == Fate::Pending
                })
                .collect();
            if round.is_empty() {
                continue;
            }
            written += apply_round(&*tx, st, msgs, &round, &mut fates).await.map_err(|e| match e {
                ApplyError::Data(e) | ApplyError::Other(e) => classify(e, "Failed to apply a round of events"),
            })?;
        }
    }

    // 4. Dead letters: forget the event ids that no copy applied (sending
    //    one again retries it), name the copy that applied where it was not
    //    the one recorded, record the dead letters, and move every
    //    partition's position past the batch.
    let dead_ids: HashSet<Uuid> = (0..msgs.len())
        .filter(|&i| matches!(fates[i], Fate::Dead(_)))
        .filter_map(|i| event_of(&msgs[i]).map(|e| e.event_id))
        .collect();
    // Only when something was dead-lettered: which of those ids a copy applied.
    let applied_ids: HashSet<Uuid> = if dead_ids.is_empty() {
        HashSet::new()
    } else {
        (0..msgs.len())
            .filter(|&i| fates[i] == Fate::Applied)
            .filter_map(|i| event_of(&msgs[i]))
            .map(|e| e.event_id)
            .filter(|id| dead_ids.contains(id))
            .collect()
    };
    let undo: Vec<String> = dead_ids.iter().filter(|id| !applied_ids.contains(id)).map(|id| id.to_string()).collect();
    if !undo.is_empty() {
        tx.execute(&st.undedupe, &[&undo]).await.map_err(|e| classify(e, "Failed to forget dead event ids"))?;
    }
    let moved: Vec<usize> = (0..msgs.len()).filter(|&i| fates[i] == Fate::Applied && earlier[i].is_some()).collect();
    if !moved.is_empty() {
        let ids: Vec<String> =
            moved.iter().filter_map(|&i| event_of(&msgs[i])).map(|e| e.event_id.to_string()).collect();
        let parts: Vec<i32> = moved.iter().map(|&i| msgs[i].partition).collect();
        let offsets: Vec<i64> = moved.iter().map(|&i| msgs[i].offset).collect();
        let times: Vec<DateTime<Utc>> =
            moved.iter().filter_map(|&i| event_of(&msgs[i])).map(|e| e.occurred_at).collect();
        tx.execute(&st.relocate, &[&ids, &parts, &offsets, &times])
            .await
            .map_err(|e| classify(e, "Failed to record where event ids applied"))?;
    }
    let dead: Vec<usize> = (0..msgs.len()).filter(|&i| matches!(fates[i], Fate::Dead(_))).collect();
    if !dead.is_empty() {
        let parts: Vec<i32> = dead.iter().map(|&i| msgs[i].partition).collect();
        let offsets: Vec<i64> = dead.iter().map(|&i| msgs[i].offset).collect();
        let generations: Vec<i32> = dead.iter().map(|&i| generation[i]).collect();
        let keys: Vec<Option<&[u8]>> = dead.iter().map(|&i| msgs[i].key.as_deref()).collect();
        let payloads: Vec<Option<&[u8]>> = dead.iter().map(|&i| msgs[i].payload.as_deref()).collect();
        let headers: Vec<serde_json::Value> = dead.iter().map(|&i| super::headers_json(&msgs[i].headers)).collect();
        let stamps: Vec<Option<DateTime<Utc>>> = dead.iter().map(|&i| message_time(msgs[i].timestamp_ms)).collect();
        let ids: Vec<Option<String>> = dead
            .iter()
            .map(|&i| match &msgs[i].decoded {
                Ok(e) => Some(e.event_id.to_string()),
                Err(r) => r.event_id.map(|id| id.to_string()),
            })
            .collect();
        // A detail may quote the message (a decoder's error): text columns
        // cannot hold NUL, and a failing insert here would block the partition.
        let (reasons, details): (Vec<&str>, Vec<String>) = dead
            .iter()
            .map(|&i| match &fates[i] {
                Fate::Dead(r) => (r.reason.as_str(), r.detail.replace('\0', "\\0")),
                _ => unreachable!("filtered to dead letters"),
            })
            .unzip();
        tx.execute(
            &st.dead_letter,
            &[
                &group,
                &topic,
                &parts,
                &offsets,
                &generations,
                &keys,
                &payloads,
                &headers,
                &stamps,
                &ids,
                &reasons,
                &details,
            ],
        )
        .await
        .map_err(|e| classify(e, "Failed to record dead letters"))?;
    }
    // The new positions: past the batch's messages and never back, except
    // where the log was found reset (past the new log's messages only).
    let mut next: HashMap<i32, i64> = HashMap::new();
    for (i, m) in msgs.iter().enumerate() {
        let reset = resets.iter().any(|r| r.partition == m.partition);
        if fates[i] == Fate::Reread || (reset && !new_log[i]) {
            continue;
        }
        let n = next.entry(m.partition).or_insert(0);
        *n = (*n).max(m.offset + 1);
    }
    let mut seek = Vec::new();
    for (&p, stored) in &stored {
        if resets.iter().any(|r| r.partition == p) {
            continue;
        }
        let Some(s) = stored.next else { continue };
        let n = next.entry(p).or_insert(s);
        if s - *n >= SEEK_AHEAD_MIN && msgs.iter().zip(&fates).all(|(m, f)| m.partition != p || *f == Fate::Redelivered)
        {
            seek.push((p, s));
        }
        *n = (*n).max(s);
    }
    let mut next_offsets: Vec<(i32, i64)> = next.into_iter().collect();
    next_offsets.sort_unstable();
    let (ps, ns): (Vec<i32>, Vec<i64>) = next_offsets.iter().copied().unzip();
    let gs: Vec<i32> = ps
        .iter()
        .map(|p| match resets.iter().find(|r| r.partition == *p) {
            Some(r) => r.generation,
            None => stored.get(p).map_or(0, |s| s.generation),
        })
        .collect();
    tx.execute(&st.advance, &[&group, &topic, &ps, &ns, &gs])
        .await
        .map_err(|e| classify(e, "Failed to store the positions"))?;
    let positions = ps.iter().zip(&gs).zip(&ns).map(|((&p, &g), &n)| (p, g, n)).collect();
    Ok(Step::Done(Outcome { fates, written, next_offsets, seek, resets, rewind, went_back, positions }))
}

/// A copy of an event id whose earlier copy in the batch was applied (or was
/// a duplicate itself) is a duplicate; one whose earlier copy was
/// dead-lettered stays pending, to be applied on its own merits.
fn settle_copy(i: usize, earlier: &[Option<usize>], fates: &mut [Fate]) {
    if let (Fate::Pending, Some(j)) = (&fates[i], earlier[i]) {
        if matches!(fates[j], Fate::Applied | Fate::Duplicate) {
            fates[i] = Fate::Duplicate;
        }
    }
}

/// Finds the partitions whose stored position belongs to a log that no
/// longer exists, among those with messages below that position.
///
/// Such messages are normally redeliveries (after a crash, a rebalance). But
/// a topic deleted and recreated (or a log otherwise reset) starts its
/// offsets over, and its new messages come below the stored position too.
/// The broker tells them apart: a log never ends below a position stored
/// from it (the position follows messages read from the log, and a log's end
/// never moves back), so a log ending below the stored position is another
/// log. It is asked after the position was read, between two transactions
/// (never while holding the position's lock), and its answer is used only if
/// the next transaction finds the same position: then the answer is younger
/// than whatever the position was stored from. Only batches with messages
/// below the position pay this round trip and the extra transaction.
///
/// The new log's messages in the batch are those after the partition's last
/// step back in offsets (before it: the old log, still queued), all below the
/// log's end. Two more conditions:
/// - Their newest Kafka timestamp is not older than the stored position's
///   last move (`Stored::updated_at`). Redeliveries were in the log before
///   that move; a recreated topic's messages are produced after it. This
///   keeps a log end reported too low (an isolation level other than the one
///   the position was stored under, a broker whose end moved back) from
///   replaying a partition.
/// - They start at the log's start. Otherwise (the consumer began inside the
///   new log: Kafka kept the group's committed offset, or
///   `auto.offset.reset=latest`) none of them is applied and the partition
///   is read again from the log's start (`Rewind`); batches still queued
///   from before that seek ask for it again, and it converges.
///
/// `Err` lists the partitions whose log ends must be asked first (no answer
/// in `ends` for their current position).
fn find_log_resets(
    msgs: &[Message],
    stored: &HashMap<i32, Stored>,
    scope: &Scope,
    ends: &LogEndAnswers,
) -> Result<(Vec<LogReset>, Vec<Rewind>), Vec<Ask>> {
    if scope.log_ends.is_none() {
        return Ok((Vec::new(), Vec::new()));
    }
    let mut suspects: Vec<(i32, i64, Stored)> = stored
        .iter()
        .filter_map(|(&p, s)| {
            let stale = s.next?;
            msgs.iter().any(|m| m.partition == p && m.offset < stale).then_some((p, stale, *s))
        })
        .collect();
    suspects.sort_unstable_by_key(|s| s.0);
    if suspects.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    // An answer serves at the position it was asked at. It serves a later
    // position of the same generation too when it found the log reaching
    // the position it was asked at: the position has only moved on along
    // that log since (a reset starts a new generation), so what lies below it
    // was read from that log. Without this, a partition whose position
    // another instance keeps moving (it took the partition over while this
    // one still held a batch of it) was asked about again and again and the
    // batch never written.
    let answer = |p: i32, stale: i64, s: &Stored| {
        ends.get(&p)
            .filter(|a| {
                a.asked.generation == s.generation
                    && (a.asked.next == stale || (a.asked.next < stale && a.end >= a.asked.next))
            })
            .copied()
    };
    let unasked: Vec<Ask> = suspects
        .iter()
        .filter(|(p, stale, s)| answer(*p, *stale, s).is_none())
        .map(|&(partition, next, s)| Ask { partition, next, generation: s.generation })
        .collect();
    if !unasked.is_empty() {
        return Err(unasked);
    }
    let (mut resets, mut rewinds) = (Vec::new(), Vec::new());
    for &(p, stale, s) in &suspects {
        let LogEndAnswer { asked, start: log_start, end: log_end } = answer(p, stale, &s).expect("asked above");
        if log_end >= asked.next {
            continue; // the position is in this log: redeliveries
        }
        // (Asked at `stale` itself, as only such an answer gets here.)
        let of_p: Vec<&Message> = msgs.iter().filter(|m| m.partition == p).collect();
        let offsets: Vec<i64> = of_p.iter().map(|m| m.offset).collect();
        let Some(k) = new_log_run(&offsets, log_end) else { continue };
        let newest = of_p[k..].iter().filter_map(|m| m.timestamp_ms).max();
        if newest.is_none_or(|t| t < s.updated_at.timestamp_millis()) {
            log::warn!(
                "Kafka partition {}/{p}: the broker says its log ends at {log_end}, below the stored position \
                 {stale}, but its messages are not newer than that position (stored at {}): taken for \
                 redeliveries, not for a new log",
                scope.topic,
                s.updated_at
            );
            continue;
        }
        let (first, last) = (offsets[k], offsets[offsets.len() - 1]);
        if first > log_start {
            rewinds.push(Rewind { partition: p, to: log_start });
            continue;
        }
        resets.push(LogReset {
            partition: p,
            stale,
            log_end,
            first,
            next: last + 1,
            generation: s.generation.saturating_add(1),
        });
    }
    Ok((resets, rewinds))
}

/// Where a partition's new log begins among its messages in a batch (their
/// offsets, in batch order): after the last step back in offsets, provided
/// every message from there is below the log's `end`. None: the batch holds
/// none of the new log's messages.
fn new_log_run(offsets: &[i64], end: i64) -> Option<usize> {
    let k = (1..offsets.len()).rev().find(|&k| offsets[k] < offsets[k - 1]).unwrap_or(0);
    (*offsets.last()? < end).then_some(k)
}

/// The indices of partition `p`'s messages that belong to its new log (see
/// `new_log_run`); `end`: the log's end (i64::MAX when already checked).
fn new_log_messages(msgs: &[Message], p: i32, end: i64) -> impl Iterator<Item = usize> {
    let of_p: Vec<usize> = (0..msgs.len()).filter(|&i| msgs[i].partition == p).collect();
    let offsets: Vec<i64> = of_p.iter().map(|&i| msgs[i].offset).collect();
    let from = new_log_run(&offsets, end).unwrap_or(of_p.len());
    of_p.into_iter().skip(from)
}

/// A message's Kafka timestamp as `dead_letters.message_timestamp`, or NULL
/// when it is outside years 1 to 9999. A producer may set any timestamp, and
/// one PostgreSQL cannot store (before 4713 BC, after 294276 AD) would fail
/// the dead-letter insert and, retried forever, stall the partition.
fn message_time(ms: Option<i64>) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms?).filter(|t| (1..=9999).contains(&t.year()))
}

/// An order as `CLASSIFY_SQL` reads it, to say why an update left it alone.
struct Current {
    status: String,
    /// The statuses it may move to, as the trigger's hint lists them.
    allowed: String,
    product: String,
    quantity: i32,
    unit_price: Decimal,
}

impl Current {
    /// Why `UPDATE_SQL` skipped this patch: the checks of `orders_guard`, in
    /// its order (the transition first, then the line-item lock).
    fn refusal(&self, p: &OrderPatch) -> Rejection {
        let from = self.status.as_str();
        let to = p.status.map(Status::as_str);
        let transition_ok = to.is_none_or(|to| to == from || self.allowed.split(", ").any(|a| a == to));
        let changes_line_item = p.product.as_ref().is_some_and(|v| *v != self.product)
            || p.quantity.is_some_and(|v| v != self.quantity)
            || p.unit_price.is_some_and(|v| v != self.unit_price);
        if transition_ok && from != "pending" && changes_line_item {
            return Rejection::new(
                Reason::OrderLocked,
                format!("the order is {from}: its product, quantity and unit price can no longer change"),
            );
        }
        Rejection::new(
            Reason::InvalidTransition,
            format!("invalid status transition from {from} to {} (allowed: {})", to.unwrap_or("?"), self.allowed),
        )
    }
}

/// Groups pending events so that each round holds at most one event per
/// order, an order's events are in rounds in offset order (its k-th event of
/// the batch in round k or later), and a copy of an event id (`earlier`: the
/// copy before it) is in a later round than that copy, so its fate is known.
fn rounds(msgs: &[Message], fates: &[Fate], earlier: &[Option<usize>]) -> Vec<Vec<usize>> {
    let mut next_round: HashMap<&str, usize> = HashMap::new();
    let mut round_of = vec![0usize; msgs.len()];
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        let (Fate::Pending, Some(e)) = (&fates[i], event_of(m)) else { continue };
        let order_next = next_round.entry(e.external_id.as_str()).or_insert(0);
        let r = (*order_next).max(earlier[i].map_or(0, |j| round_of[j] + 1));
        round_of[i] = r;
        *order_next = r + 1;
        if rounds.len() <= r {
            rounds.resize_with(r + 1, Vec::new);
        }
        rounds[r].push(i);
    }
    rounds
}

enum ApplyError {
    Data(tokio_postgres::Error),
    Other(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for ApplyError {
    fn from(e: tokio_postgres::Error) -> Self {
        if is_data_error(&e) {
            ApplyError::Data(e)
        } else {
            ApplyError::Other(e)
        }
    }
}

/// Applies one round (at most one event per order) with one INSERT for the
/// creates and one UPDATE for the rest; marks each message Applied or Dead.
async fn apply_round(
    db: &impl GenericClient,
    st: &Statements,
    msgs: &[Message],
    round: &[usize],
    fates: &mut [Fate],
) -> Result<u64, ApplyError> {
    let mut written = 0;
    let (creates, updates): (Vec<usize>, Vec<usize>) =
        round.iter().partition(|&&i| matches!(event_of(&msgs[i]).map(|e| &e.change), Some(Change::Create(_))));

    if !creates.is_empty() {
        let mut cols = CreateColumns::default();
        for &i in &creates {
            if let Some(Change::Create(o)) = event_of(&msgs[i]).map(|e| &e.change) {
                cols.push(&event_of(&msgs[i]).expect("matched above").external_id, o);
            }
        }
        let inserted: HashSet<String> = db
            .query(
                &st.create,
                &[&cols.external_id, &cols.name, &cols.email, &cols.product, &cols.quantity, &cols.price, &cols.status],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for &i in &creates {
            let key = &event_of(&msgs[i]).expect("creates are decoded").external_id;
            fates[i] = if inserted.contains(key) {
                written += 1;
                Fate::Applied
            } else {
                Fate::Dead(Rejection::new(
                    Reason::OrderExists,
                    format!("an order with external_id {key:?} already exists"),
                ))
            };
        }
    }

    if !updates.is_empty() {
        let mut cols = UpdateColumns::default();
        for &i in &updates {
            if let Some(e) = event_of(&msgs[i]) {
                if let Change::Update(p) = &e.change {
                    cols.push(&e.external_id, p);
                }
            }
        }
        let updated: HashSet<String> = db
            .query(
                &st.update,
                &[
                    &cols.external_id,
                    &cols.name,
                    &cols.email_set,
                    &cols.email,
                    &cols.product,
                    &cols.quantity,
                    &cols.price,
                    &cols.status,
                    &cols.error_set,
                    &cols.error,
                ],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let missed: Vec<String> = updates
            .iter()
            .filter_map(|&i| event_of(&msgs[i]))
            .filter(|e| !updated.contains(&e.external_id))
            .map(|e| e.external_id.clone())
            .collect();
        // Only when something failed: why (no such order, the transition, or
        // the line-item lock).
        let current: HashMap<String, Current> = if missed.is_empty() {
            HashMap::new()
        } else {
            db.query(&st.classify, &[&missed])
                .await?
                .iter()
                .map(|r| {
                    let c = Current {
                        status: r.get(1),
                        allowed: r.get(2),
                        product: r.get(3),
                        quantity: r.get(4),
                        unit_price: r.get(5),
                    };
                    (r.get(0), c)
                })
                .collect()
        };
        for &i in &updates {
            let Some(e) = event_of(&msgs[i]) else { continue };
            fates[i] = if updated.contains(&e.external_id) {
                written += 1;
                Fate::Applied
            } else {
                Fate::Dead(match (current.get(&e.external_id), &e.change) {
                    (Some(c), Change::Update(p)) => c.refusal(p),
                    _ => Rejection::new(Reason::UnknownOrder, format!("no order with external_id {:?}", e.external_id)),
                })
            };
        }
    }
    Ok(written)
}

#[derive(Default)]
struct CreateColumns<'a> {
    external_id: Vec<&'a str>,
    name: Vec<&'a str>,
    email: Vec<Option<&'a str>>,
    product: Vec<&'a str>,
    quantity: Vec<i32>,
    price: Vec<Decimal>,
    status: Vec<Option<&'static str>>,
}

impl<'a> CreateColumns<'a> {
    fn push(&mut self, external_id: &'a str, o: &'a crate::domain::NewOrder) {
        self.external_id.push(external_id);
        self.name.push(&o.customer_name);
        self.email.push(o.customer_email.as_deref());
        self.product.push(&o.product);
        self.quantity.push(o.quantity);
        self.price.push(o.unit_price);
        self.status.push(o.status.map(Status::as_str));
    }
}

#[derive(Default)]
struct UpdateColumns<'a> {
    external_id: Vec<&'a str>,
    name: Vec<Option<&'a str>>,
    email_set: Vec<bool>,
    email: Vec<Option<&'a str>>,
    product: Vec<Option<&'a str>>,
    quantity: Vec<Option<i32>>,
    price: Vec<Option<Decimal>>,
    status: Vec<Option<&'static str>>,
    error_set: Vec<bool>,
    error: Vec<Option<&'a str>>,
}

impl<'a> UpdateColumns<'a> {
    fn push(&mut self, external_id: &'a str, p: &'a crate::domain::OrderPatch) {
        self.external_id.push(external_id);
        self.name.push(p.customer_name.as_deref());
        self.email_set.push(p.customer_email.is_some());
        self.email.push(p.customer_email.as_ref().and_then(|e| e.as_deref()));
        self.product.push(p.product.as_deref());
        self.quantity.push(p.quantity);
        self.price.push(p.unit_price);
        self.status.push(p.status.map(Status::as_str));
        self.error_set.push(p.error_message.is_some());
        self.error.push(p.error_message.as_ref().and_then(|e| e.as_deref()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::event::parse_event;
    use serde_json::json;

    fn msg(offset: i64, key: &str, kind: &str) -> Message {
        let order = if kind == "order_created" {
            json!({"external_id": key, "customer_name": "A", "product": "P", "quantity": 1, "unit_price": 1})
        } else {
            json!({"external_id": key, "status": "processing"})
        };
        let v =
            json!({"event_id": Uuid::new_v4(), "type": kind, "order": order, "occurred_at": "2025-01-01T00:00:00Z"});
        Message {
            partition: 0,
            offset,
            key: Some(key.as_bytes().to_vec()),
            payload: None,
            headers: Vec::new(),
            timestamp_ms: None,
            decoded: parse_event(&v, Some(key)),
        }
    }

    #[test]
    fn message_times_postgresql_cannot_store_become_null() {
        assert_eq!(message_time(Some(1_738_324_800_000)).map(|t| t.timestamp()), Some(1_738_324_800));
        assert_eq!(message_time(Some(-1_000_000_000_000_000)), None, "about 29,700 BC");
        assert_eq!(message_time(Some(9_000_000_000_000_000)), None, "about 287,000 AD");
        assert_eq!(message_time(Some(i64::MIN)), None);
        assert_eq!(message_time(None), None);
    }

    #[test]
    fn rounds_keep_each_orders_events_in_offset_order_and_apart() {
        let msgs = vec![
            msg(0, "a", "order_created"),
            msg(1, "b", "order_created"),
            msg(2, "a", "status_changed"),
            msg(3, "c", "order_created"),
            msg(4, "a", "status_changed"),
            msg(5, "b", "status_changed"),
        ];
        let mut fates = vec![Fate::Pending; msgs.len()];
        fates[3] = Fate::Duplicate;
        assert_eq!(rounds(&msgs, &fates, &[None; 6]), vec![vec![0, 1], vec![2, 5], vec![4]]);
    }

    /// A copy of an event id comes in a round after the copy before it, and
    /// its order's later events after it, so it can be settled in turn.
    #[test]
    fn a_copy_of_an_event_id_waits_for_the_copy_before_it() {
        let msgs = vec![
            msg(0, "a", "order_created"),
            msg(1, "b", "status_changed"),
            msg(2, "c", "order_created"),
            msg(3, "c", "status_changed"),
            msg(4, "d", "status_changed"), // the same event id as 3, say
            msg(5, "d", "status_changed"),
            msg(6, "a", "status_changed"),
        ];
        let fates = vec![Fate::Pending; msgs.len()];
        let mut earlier = vec![None; msgs.len()];
        earlier[4] = Some(3);
        earlier[6] = Some(1);
        assert_eq!(rounds(&msgs, &fates, &earlier), vec![vec![0, 1, 2], vec![3, 6], vec![4], vec![5]]);

        let mut fates = vec![Fate::Applied, Fate::Dead(Rejection::new(Reason::UnknownOrder, "x")), Fate::Pending];
        settle_copy(2, &[None, None, Some(1)], &mut fates);
        assert_eq!(fates[2], Fate::Pending, "its earlier copy was dead-lettered: processed on its own merits");
        settle_copy(2, &[None, None, Some(0)], &mut fates);
        assert_eq!(fates[2], Fate::Duplicate, "its earlier copy was applied");
    }

    #[test]
    fn a_reset_logs_messages_are_those_after_the_last_step_back_below_its_end() {
        assert_eq!(new_log_run(&[0, 1, 2], 3), Some(0));
        assert_eq!(new_log_run(&[998, 999, 0, 1, 2], 3), Some(2), "the old log's queued messages come first");
        assert_eq!(new_log_run(&[0, 1, 0, 1, 2], 3), Some(2), "read twice (a rebalance): the last reading");
        assert_eq!(new_log_run(&[998, 999], 3), None, "only the old log's messages");
        assert_eq!(new_log_run(&[1, 2, 5], 3), None, "not all below the end: not the log the broker has now");
        assert_eq!(new_log_run(&[], 3), None);
    }

    #[test]
    fn a_log_end_asked_at_an_earlier_position_of_the_same_log_still_tells_redeliveries() {
        let scope = Scope {
            group_id: "g".into(),
            topic: "t".into(),
            actor: "kafka:t".into(),
            log_ends: Some(crate::ingest::consumer::LogEnds::detached("t")),
        };
        let msgs: Vec<Message> = (5..8).map(|o| msg(o, "k", "status_changed")).collect();
        let stored = HashMap::from([(0, Stored { next: Some(20), generation: 1, updated_at: Utc::now() })]);
        let asked = |next: i64, generation: i32, end: i64| {
            HashMap::from([(0, LogEndAnswer { asked: Ask { partition: 0, next, generation }, start: 0, end })])
        };
        let found = |ends: &LogEndAnswers| {
            find_log_resets(&msgs, &stored, &scope, ends).map(|(r, w)| (r.len(), w.len())).map_err(|a| a.len())
        };
        // Asked at 10, the log reached 15: the position moved on to 20 along it.
        assert_eq!(found(&asked(10, 1, 15)), Ok((0, 0)));
        assert_eq!(found(&asked(20, 1, 25)), Ok((0, 0)), "asked at the position itself");
        // Asked again: the log ended below where it was asked (a reset, judged only at
        // the position itself), another generation, or a position that went back.
        for ends in [asked(10, 1, 5), asked(10, 0, 15), asked(30, 1, 40)] {
            assert!(
                matches!(find_log_resets(&msgs, &stored, &scope, &ends), Err(ref a) if a.len() == 1 && a[0].next == 20)
            );
        }
    }

    #[test]
    fn a_skipped_update_is_explained_as_the_trigger_would() {
        let current = |status: &str, allowed: &str| Current {
            status: status.into(),
            allowed: allowed.into(),
            product: "Gear".into(),
            quantity: 2,
            unit_price: Decimal::new(950, 2),
        };
        let patch =
            |status: Option<Status>, quantity: Option<i32>| OrderPatch { status, quantity, ..Default::default() };
        let processing = current("processing", "cancelled, failed, processed");
        let reason = |c: &Current, p: OrderPatch| c.refusal(&p).reason;
        assert_eq!(reason(&processing, patch(None, Some(3))), Reason::OrderLocked);
        assert_eq!(reason(&processing, patch(Some(Status::Processed), Some(3))), Reason::OrderLocked);
        let price = OrderPatch { unit_price: Some(Decimal::new(951, 2)), ..Default::default() };
        assert_eq!(reason(&processing, price), Reason::OrderLocked);
        // The transition is checked first, as in orders_guard.
        assert_eq!(reason(&processing, patch(Some(Status::Delivered), Some(3))), Reason::InvalidTransition);
        let delivered = current("delivered", "none (final status)");
        assert_eq!(reason(&delivered, patch(Some(Status::Pending), None)), Reason::InvalidTransition);
        // Pending, or the same line item again: not the lock (another writer
        // changed the order meanwhile; reported as the transition it was).
        let pending = current("pending", "cancelled, failed, processed, processing");
        assert_eq!(reason(&pending, patch(None, Some(3))), Reason::InvalidTransition);
        let same = OrderPatch { quantity: Some(2), unit_price: Some(Decimal::new(9500, 3)), ..Default::default() };
        assert_eq!(reason(&processing, same), Reason::InvalidTransition);
    }
}
