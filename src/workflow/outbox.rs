//! The outbox relay: every committed change to an order, published to Kafka.
//!
//! The change log is the outbox. Every write path (REST, the Kafka ingest, a
//! DBA's psql) already appends to it in the writing transaction, so nothing
//! that commits can be missed, and no writer ever waits for Kafka. The relay
//! reads the log after its own position, stored in `outbox_positions`,
//! produces the batch and waits for the broker to acknowledge all of it, and
//! only then stores the new position:
//!
//! - at least once: a crash between the acks and the store publishes that
//!   batch again. Each message carries its change-log position in the
//!   `ordercast-position` header: that is the idempotency key (a consumer that
//!   has applied position P for an order ignores any message for that order at
//!   or below P);
//! - in commit order per order: positions are commit order, the key is the
//!   order id (one partition per order), and the producer is idempotent, so
//!   librdkafka's retries never reorder a partition;
//! - one relay at a time per topic: the relay holds a session advisory lock;
//!   other instances stand by and take over when its session ends.
//!
//! A database that lost changes already published (a failover, a restored
//! backup) numbers the next commits with their positions: before it
//! publishes anything, a relay that takes over checks the last changes of
//! each partition against the log, and on a mismatch sends a `rewind`
//! message to every partition first (`rewind_if_lost`). Once the delivery
//! and request timeouts have passed, it checks what landed since the
//! takeover the same way, for another instance's late produce of a lost
//! change (`late_check`; where the takeover found the partitions ending is
//! stored, so the check survives a restart).
//!
//! A relay left stopped for longer than the change log's retention cannot
//! publish what was pruned meanwhile: it says so loudly (`skipped` in
//! `/api/health`) and continues after the gap.
//!
//! Message: key = order id (decimal text), value = the same JSON as the
//! WebSocket `change` message (`{"type":"change","seq":N,"op":...,"order":{...},
//! "old":{...},"actor":"...","at":"..."}`), headers `ordercast-position`,
//! `ordercast-op`, `ordercast-actor`, `ordercast-committed-at` (the commit
//! time in microseconds), `content-type: application/json`, timestamp = when
//! the relay sent it. A change larger than the producer's message
//! size limit (`message.max.bytes`: a DBA's long text, say) is published as a
//! stub, in its place, so it never holds up the changes after it:
//! `{"type":"change","seq":N,"op":...,"order":{"id":ID},"old":null,"actor":...,
//! "at":...,"truncated":true}` with the header `ordercast-truncated: true`; the
//! order itself is read through the REST API. The broker judges a whole
//! record batch (some 100 bytes of framing more than its messages): a topic
//! limit not above the producer's makes it refuse the batch, and the relay
//! retries it, with the error in `/api/health`, until the producer's limit is
//! set clearly below the topic's (by 1 KB or more; `KAFKA_PROPERTIES`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::future::join_all;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use tokio::sync::watch;

use super::Dedicated;
use crate::changes::{envelope_json, Envelope};
use crate::ingest::KafkaSettings;

/// Session advisory lock class 'ocob'; the key is the relay's name.
const LOCK_CLASS: i32 = 0x6f63_6f62;
/// How often a relay on standby checks whether the active one is gone.
const STANDBY_POLL: Duration = Duration::from_secs(2);
/// A missed doorbell costs at most this long.
const IDLE_POLL: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// What `/api/health` reports about the relay.
#[derive(Debug, Default)]
pub struct OutboxState {
    pub enabled: AtomicBool,
    pub topic: Mutex<String>,
    /// True while this instance holds the relay lock (others stand by).
    pub active: AtomicBool,
    /// True while this instance is connected and found the lock held by
    /// another (`standby`); false while it has no session (`disconnected`).
    pub standing_by: AtomicBool,
    /// Every change at or below this position has been acknowledged by Kafka.
    pub position: AtomicI64,
    pub published: AtomicU64,
    pub batches: AtomicU64,
    /// Batches that failed (no ack) and were retried.
    pub retries: AtomicU64,
    /// Changes pruned from the log before the relay could publish them.
    pub skipped: AtomicU64,
    /// Rewind messages sent: the database had lost changes already published.
    pub rewinds: AtomicU64,
    /// The newest position the topic held when the relay last took over
    /// (0: none), which it checked against the log (`rewind_if_lost`).
    pub checked: AtomicI64,
    /// True while the relay waits out the delivery timeout before a rewind
    /// (`rewind_if_lost`): nothing is published meanwhile.
    pub rewinding: AtomicBool,
    /// The changes the late check read, once it has run after the last
    /// takeover (-1: not yet; see `late_check`).
    pub late_checked: AtomicI64,
    /// True while batches (or the rewind owed before one) are not
    /// acknowledged, until one is.
    publishing_fails: AtomicBool,
    /// True while the takeover's check or the late check fails, until one
    /// succeeds.
    checking_fails: AtomicBool,
    pub last_error: Mutex<Option<String>>,
}

/// Which of the relay's jobs failed: each clears only its own flag, so a
/// late check that succeeds while batches fail leaves health `retrying`.
#[derive(Clone, Copy, Debug)]
enum Job {
    Publishing,
    Checking,
}

impl OutboxState {
    pub fn start(&self, topic: &str) {
        self.enabled.store(true, Ordering::Relaxed);
        self.late_checked.store(-1, Ordering::Relaxed);
        *self.topic.lock().unwrap() = topic.to_string(); // unwrap: never held across a panic
    }

    fn flag(&self, job: Job) -> &AtomicBool {
        match job {
            Job::Publishing => &self.publishing_fails,
            Job::Checking => &self.checking_fails,
        }
    }

    /// `job` failed with `e`.
    fn error(&self, job: Job, e: &anyhow::Error) {
        self.flag(job).store(true, Ordering::Relaxed);
        self.note(e);
    }

    /// Keeps `e` for `last_error` (a database error: the state then says
    /// `disconnected`).
    fn note(&self, e: &anyhow::Error) {
        *self.last_error.lock().unwrap() = Some(format!("{e:#}")); // unwrap: never held across a panic
    }

    fn failing(&self, job: Job) -> bool {
        self.flag(job).load(Ordering::Relaxed)
    }

    /// `job` succeeded: answers whether it had been failing.
    fn recovered(&self, job: Job) -> bool {
        self.flag(job).swap(false, Ordering::Relaxed)
    }

    pub fn health(&self, head: i64) -> Value {
        if !self.enabled.load(Ordering::Relaxed) {
            return json!({"enabled": false});
        }
        let active = self.active.load(Ordering::Relaxed);
        let position = self.position.load(Ordering::Relaxed);
        json!({
            "enabled": true,
            "state": if !active {
                // Not "standby" while the relay cannot reach PostgreSQL: it
                // looked like a healthy standby, with `lag` null.
                if self.standing_by.load(Ordering::Relaxed) {
                    "standby"
                } else {
                    "disconnected"
                }
            } else if self.rewinding.load(Ordering::Relaxed) {
                "rewinding"
            } else if self.failing(Job::Publishing) || self.failing(Job::Checking) {
                "retrying"
            } else {
                "running"
            },
            "topic": *self.topic.lock().unwrap(), // unwrap: never held across a panic
            "position": position,
            "lag": if active { Value::from((head - position).max(0)) } else { Value::Null },
            "published": self.published.load(Ordering::Relaxed),
            "batches": self.batches.load(Ordering::Relaxed),
            "retries": self.retries.load(Ordering::Relaxed),
            "skipped": self.skipped.load(Ordering::Relaxed),
            "rewinds": self.rewinds.load(Ordering::Relaxed),
            "checked": self.checked.load(Ordering::Relaxed),
            "late_checked": Some(self.late_checked.load(Ordering::Relaxed)).filter(|&n| n >= 0),
            "last_error": *self.last_error.lock().unwrap(), // unwrap: never held across a panic
        })
    }
}

/// The relay's producer: idempotent, so retries keep each partition in order.
pub fn producer(kafka: &KafkaSettings, brokers: &str) -> anyhow::Result<FutureProducer> {
    producer_settings(kafka, brokers)?
        .create()
        .map_err(|e| anyhow::anyhow!("invalid Kafka configuration for the outbox relay: {e}"))
}

/// Checks the relay's producer's configuration without creating it.
pub(crate) fn check_producer(kafka: &KafkaSettings, brokers: &str) -> anyhow::Result<()> {
    producer_settings(kafka, brokers)?
        .create_native_config()
        .map_err(|e| anyhow::anyhow!("invalid Kafka configuration for the outbox relay: {e}"))?;
    Ok(())
}

/// The relay's producer's configuration. It lingers 5 ms for a batch to
/// fill unless `KAFKA_PROPERTIES` says otherwise (`linger.ms`, or its other
/// name `queue.buffering.max.ms`): before, the 5 ms replaced what was set.
fn producer_settings(kafka: &KafkaSettings, brokers: &str) -> anyhow::Result<rdkafka::ClientConfig> {
    let mut config = super::producer_config(kafka, brokers, "ordercast-outbox", &[("enable.idempotence", "true")])?;
    if config.get("linger.ms").is_none() && config.get("queue.buffering.max.ms").is_none() {
        config.set("linger.ms", "5");
    }
    Ok(config)
}

/// Runs until `shutdown` flips. `name` (the topic) keys the stored position.
/// `producer` is replaced by a new one from `kafka` and `brokers` when it
/// hits a fatal error (an idempotent producer can, after timeouts).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    url: String,
    kafka: KafkaSettings,
    brokers: String,
    mut producer: FutureProducer,
    topic: String,
    batch: u32,
    state: Arc<OutboxState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_MIN;
    // Partitions owed a rewind, each with the newest position it covers
    // (see `overtaken`): kept across sessions, so a database error or a
    // producer that must be replaced does not drop it.
    let mut rewind_due: BTreeMap<i32, i64> = BTreeMap::new();
    loop {
        // A panic in a session (a bug) ends it as an error does: the relay
        // starts a new one, and health says why, instead of stopping for
        // good while health said running.
        let session = crate::error::caught(session(
            &url,
            &mut producer,
            (&kafka, &brokers),
            &topic,
            batch.max(1),
            &state,
            &mut shutdown,
            (&mut backoff, &mut rewind_due),
        ));
        let result = session.await.unwrap_or_else(|panic| Err(anyhow::anyhow!("the outbox relay panicked: {panic}")));
        match result {
            Ok(()) => break,
            Err(e) => {
                log::warn!("outbox relay: {e:#}; reconnecting");
                state.note(&e);
            }
        }
        state.active.store(false, Ordering::Relaxed);
        state.standing_by.store(false, Ordering::Relaxed);
        if crate::backoff::sleep(&mut backoff, BACKOFF_MAX, &mut shutdown).await {
            break;
        }
    }
    state.active.store(false, Ordering::Relaxed);
}

/// One database session: wait for the relay lock, then publish until
/// shutdown. Kafka failures are retried here; database failures end the session.
#[allow(clippy::too_many_arguments)]
async fn session(
    url: &str,
    producer: &mut FutureProducer,
    (kafka, brokers): (&KafkaSettings, &str),
    topic: &str,
    batch: u32,
    state: &OutboxState,
    shutdown: &mut watch::Receiver<bool>,
    (backoff, rewind_due): (&mut Duration, &mut BTreeMap<i32, i64>),
) -> anyhow::Result<()> {
    let conn = Dedicated::open(url, "ordercast-outbox").await?;
    let db = &conn.client;
    let mut announced = false;
    loop {
        let locked: bool = db
            .query_one("SELECT pg_try_advisory_lock($1, hashtext($2))", &[&LOCK_CLASS, &topic])
            .await
            .map_err(crate::db::describe)?
            .get(0);
        state.standing_by.store(!locked, Ordering::Relaxed);
        if locked {
            break;
        }
        if !announced {
            log::info!("outbox relay for {topic}: another instance is publishing; standing by");
            announced = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(STANDBY_POLL) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
    // A new relay starts at the oldest retained change: it publishes the
    // history it can still see, then everything after.
    db.execute(
        "INSERT INTO outbox_positions (name, position) \
         SELECT $1, pruned_through FROM change_retention ON CONFLICT (name) DO NOTHING",
        &[&topic],
    )
    .await
    .map_err(crate::db::describe)?;
    let took_over = Instant::now();
    let row = db
        .query_one("SELECT position, late_since, rewind_due FROM outbox_positions WHERE name = $1", &[&topic])
        .await
        .map_err(crate::db::describe)?;
    let mut position: i64 = row.get(0);
    let pending: Option<Value> = row.get(1);
    // Rewinds owed by the instance that published before, or by this one
    // before its session ended.
    owe(rewind_due, row.get::<_, Option<Value>>(2).as_ref().and_then(offsets).unwrap_or_default());
    state.position.store(position, Ordering::Relaxed);
    state.late_checked.store(-1, Ordering::Relaxed);
    state.active.store(true, Ordering::Relaxed);
    log::info!("outbox relay for {topic}: publishing changes after position {position}");
    // Before anything new goes out: did the database lose changes that were
    // published (see `rewind_if_lost`)? Kafka answers what was published,
    // so this holds for any instance, also one started after the loss.
    let takeover = rewind_if_lost(db, producer, (kafka, brokers), topic, position, state, shutdown, backoff).await;
    state.rewinding.store(false, Ordering::Relaxed);
    let Some(ends) = takeover? else { return Ok(()) };
    // Then the late check (`late_check`), from where the partitions ended
    // at this takeover, or at an earlier one whose check is still pending.
    let since = match pending.as_ref().and_then(offsets) {
        Some(since) => Some(since),
        None => {
            if let Some(ends) = &ends {
                db.execute(
                    "UPDATE outbox_positions SET late_since = $2 WHERE name = $1",
                    &[&topic, &json!(ends.iter().map(|(p, o)| (p.to_string(), o)).collect::<HashMap<_, _>>())],
                )
                .await
                .map_err(crate::db::describe)?;
            }
            ends
        }
    };
    let mut late = since.map(|since| Late { at: took_over + fence(kafka) + late_margin(kafka), since, read: None });
    let read = db.prepare(crate::changes::READ_SQL).await.map_err(crate::db::describe)?;
    let most = batch.min(i32::MAX as u32) as i32;
    // Rows asked for: as many as fitted after a read `READ_BYTES` cut (the
    // database sends every row asked for, whether read or not), doubled
    // back to `most` by full reads.
    let mut limit = most;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        if let Some(check) = late.as_mut() {
            if late_check(db, producer, (kafka, brokers), topic, check, state, shutdown).await? {
                db.execute("UPDATE outbox_positions SET late_since = NULL WHERE name = $1", &[&topic])
                    .await
                    .map_err(crate::db::describe)?;
                late = None;
            }
        }
        // A batch is also cut at `READ_BYTES` of changes: the rest is read next.
        let crate::changes::LogRows { rows, cut } =
            crate::changes::read_rows(db, &read, position, limit).await.map_err(crate::db::describe)?;
        limit = crate::changes::next_limit(limit, most, rows.len(), cut);
        // The horizon comes with the rows, from the same snapshot: a prune
        // committed just before the read shows here, never after it. With
        // no rows it is read alone: a log pruned through its head (a quiet
        // system idle past the retention) holds no row to carry it.
        let pruned: i64 = match rows.first() {
            Some(row) => row.try_get("pruned").map_err(crate::db::describe)?,
            None => crate::changes::log_bounds(db).await.map_err(crate::db::describe)?.1,
        };
        if pruned > position {
            log::error!(
                "outbox relay for {topic}: changes {}..={pruned} were pruned from the change log before they \
                 were published (the relay was stopped longer than the retention); continuing after them",
                position + 1
            );
            state.skipped.fetch_add((pruned - position) as u64, Ordering::Relaxed);
            position = pruned;
            store(db, topic, position).await?;
            state.position.store(position, Ordering::Relaxed);
            // `rows` were read from before the gap: read again from after it.
            continue;
        }
        let Some(last) = rows.last().map(|r| r.try_get::<_, i64>(0)).transpose().map_err(crate::db::describe)? else {
            tokio::select! {
                r = conn.wait(IDLE_POLL) => r?,
                // A dropped sender (the server never started) also means stop.
                r = shutdown.changed() => if r.is_err() { return Ok(()) },
            }
            continue;
        };
        // Before the batch goes again: a rewind for the partitions where a
        // change of the failed try overtook an older one (see `overtaken`).
        let through = rewind_due.values().copied().max().unwrap_or(position);
        if through <= position {
            // Nothing owed, or the changes it covered were pruned unpublished.
            if !rewind_due.is_empty() {
                rewind_due.clear();
                store_rewind_due(db, topic, rewind_due).await?;
            }
        } else {
            let owed = rewind_due.keys().copied();
            if let Err(e) = send_rewind(producer, topic, owed, position, through, state, Job::Publishing).await {
                if !state.failing(Job::Publishing) {
                    log::warn!("outbox relay for {topic}: {e:#}; retrying the rewind before the batch");
                }
                state.error(Job::Publishing, &e);
                state.retries.fetch_add(1, Ordering::Relaxed);
                if crate::backoff::sleep(backoff, BACKOFF_MAX, shutdown).await {
                    return Ok(());
                }
                continue;
            }
            state.rewinds.fetch_add(1, Ordering::Relaxed);
            // Sent: a failure to record that ends the session, and the
            // next one sends it again (a repeat rewind costs repeats only).
            rewind_due.clear();
            store_rewind_due(db, topic, rewind_due).await?;
        }
        match publish(producer, topic, &rows, state).await {
            Ok(()) => {
                position = last;
                store(db, topic, position).await?;
                state.position.store(position, Ordering::Relaxed);
                state.published.fetch_add(rows.len() as u64, Ordering::Relaxed);
                state.batches.fetch_add(1, Ordering::Relaxed);
                if state.recovered(Job::Publishing) {
                    log::info!("outbox relay for {topic}: publishing again");
                }
                *backoff = BACKOFF_MIN;
            }
            Err(Unacknowledged { error: e, overtaken }) => {
                // Nothing is stored: the whole batch goes again (at least once).
                if !overtaken.is_empty() {
                    log::error!(
                        "outbox relay for {topic}: a change was acknowledged after an older one failed (a delivery \
                         timeout) on partitions {:?}; a rewind message goes to them before the batch goes again",
                        overtaken.keys().collect::<Vec<_>>()
                    );
                }
                if !overtaken.is_empty() {
                    owe(rewind_due, overtaken);
                    // Recorded, for whichever instance publishes next.
                    store_rewind_due(db, topic, rewind_due).await?;
                }
                if !state.failing(Job::Publishing) {
                    log::warn!("outbox relay for {topic}: {e:#}; retrying the batch after position {position}");
                }
                state.error(Job::Publishing, &e);
                state.retries.fetch_add(1, Ordering::Relaxed);
                if let Some((code, reason)) = producer.client().fatal_error() {
                    log::error!(
                        "outbox relay for {topic}: the producer failed for good ({code:?}: {reason}); replacing it"
                    );
                    *producer = self::producer(kafka, brokers)?;
                }
                if crate::backoff::sleep(backoff, BACKOFF_MAX, shutdown).await {
                    return Ok(());
                }
            }
        }
    }
}

/// A change a topic holds: its position, and its commit time as the message
/// carries it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Published {
    position: i64,
    committed: Committed,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Committed {
    /// The `ordercast-committed-at` header (microseconds).
    Micros(i64),
    /// The message's timestamp (milliseconds), for messages published
    /// before that header was.
    Millis(i64),
    /// Neither: the topic stamps messages itself (`LogAppendTime`).
    Unknown,
}

impl Published {
    /// The change a message carries: none for a rewind message.
    fn of(message: &impl Message) -> Option<Published> {
        let position = header_number(message, "ordercast-position")?;
        let committed = match (header_number(message, "ordercast-committed-at"), message.timestamp()) {
            (Some(micros), _) => Committed::Micros(micros),
            (None, rdkafka::Timestamp::CreateTime(ms)) => Committed::Millis(ms),
            (None, _) => Committed::Unknown,
        };
        Some(Published { position, committed })
    }
}

impl Committed {
    fn matches(self, micros: i64) -> bool {
        match self {
            Committed::Micros(m) => m == micros,
            Committed::Millis(ms) => micros.div_euclid(1000) == ms,
            Committed::Unknown => true,
        }
    }
}

/// How long reading what the topic holds waits for the broker, in all
/// (plus `PER_PARTITION` for each partition).
const PUBLISHED_TIMEOUT: Duration = Duration::from_secs(10);
const PER_PARTITION: Duration = Duration::from_millis(200);
/// The longest a relay waits for another instance's last produces to land
/// or expire before it sends a rewind (see `rewind_if_lost`).
const FENCE_MAX: Duration = Duration::from_secs(120);
/// How many of each partition's last offsets the takeover's check reads:
/// the last change may be followed by messages that are none (a rewind, a
/// transaction's marker).
const LAST_MESSAGES: i64 = 16;
/// How long the late check's read may go without a message or a
/// partition's end before it is given up and tried again.
const LATE_STALL: Duration = Duration::from_secs(30);
/// How long after a failed late check it is tried again.
const LATE_RETRY: Duration = Duration::from_secs(5);

/// Where each partition of the topic ended, by partition; `None`: the
/// topic could not be described (its metadata named an error).
type Ends = Option<HashMap<i32, i64>>;

/// The late check (`late_check`) of a session: when it is due, from where
/// it reads, and its read once under way.
struct Late {
    at: Instant,
    since: HashMap<i32, i64>,
    read: Option<tokio::sync::oneshot::Receiver<anyhow::Result<Read>>>,
}

/// Sends a rewind message to every partition of `topic` when the database
/// no longer holds a change among the last of a partition of the topic (a
/// failover to a standby that missed commits, a restored backup): the next
/// commits are numbered with positions already published, and a consumer
/// that skips positions at or below what it applied for an order would drop
/// them. The message, `{"type":"rewind","after":A,"through":T}` (key
/// `rewind`, headers `ordercast-op: rewind`, `ordercast-rewind-after`,
/// `ordercast-rewind-through`), tells consumers to forget the positions
/// after A that they applied, up to T, and to reload those orders: the
/// changes at them are gone from the database. A is the relay's stored
/// position, which the database kept with the changes before it.
///
/// Sent before any change of this session, and acknowledged on every
/// partition, so on each partition it comes before the changes that reuse
/// positions. Before it is sent the relay waits out the producer's delivery
/// timeout (at most `FENCE_MAX`) and reads the topic again: another
/// instance that was publishing when the database went may still have
/// messages in flight, and they must land before the rewind. Those that
/// land later are `late_check`'s. Kafka errors are retried with backoff; a
/// database error ends the session. Answers where the partitions ended at
/// the last read, or `None` when shutdown came first.
#[allow(clippy::too_many_arguments)]
async fn rewind_if_lost(
    db: &tokio_postgres::Client,
    producer: &FutureProducer,
    (kafka, brokers): (&KafkaSettings, &str),
    topic: &str,
    position: i64,
    state: &OutboxState,
    shutdown: &mut watch::Receiver<bool>,
    backoff: &mut Duration,
) -> anyhow::Result<Option<Ends>> {
    let mut fenced = false;
    loop {
        let read = async {
            spawn_read(reader_config(kafka, brokers), topic, None)?.await.context("reading the topic panicked")?
        };
        let kafka_step = tokio::select! {
            r = read => match r {
                Ok(Read { partitions, published, ends }) => {
                    let newest = published.iter().map(|p| p.position).max();
                    state.checked.store(newest.unwrap_or(0), Ordering::Relaxed);
                    let after: Vec<Published> = published.into_iter().filter(|p| p.position > position).collect();
                    // Database errors end the session.
                    let lost = crate::changes::listener::not_held(db, &after, |p| p.position, |p, m| p.committed.matches(m))
                        .await?
                        .iter()
                        .map(|p| p.position)
                        .max();
                    match (lost, newest) {
                        (Some(lost), Some(newest)) if !fenced => {
                            log::error!(
                                "outbox relay for {topic}: the database no longer holds the change published at \
                                 position {lost} (it lost commits: a failover, a restored backup); positions {}..={newest} \
                                 may be numbered again. A rewind message goes to every partition before the next changes",
                                position + 1,
                            );
                            let wait = fence(kafka);
                            log::info!(
                                "outbox relay for {topic}: waiting {} s for produces still in flight (the delivery \
                                 timeout) before the rewind",
                                wait.as_secs()
                            );
                            state.rewinding.store(true, Ordering::Relaxed);
                            tokio::select! {
                                _ = tokio::time::sleep(wait) => {}
                                _ = shutdown.changed() => return Ok(None),
                            }
                            fenced = true;
                            continue;
                        }
                        (Some(_), Some(newest)) => tokio::select! {
                            r = send_rewind(producer, topic, 0..partitions, position, newest, state, Job::Checking) => r.map(|()| (true, ends)),
                            _ = shutdown.changed() => return Ok(None),
                        },
                        _ => Ok((false, ends)),
                    }
                }
                Err(e) => Err(e),
            },
            _ = shutdown.changed() => return Ok(None),
        };
        match kafka_step {
            Ok((rewound, ends)) => {
                if rewound {
                    state.rewinds.fetch_add(1, Ordering::Relaxed);
                }
                // A check that failed before is behind: health says so.
                state.recovered(Job::Checking);
                return Ok(Some(ends));
            }
            Err(e) => {
                log::warn!("outbox relay for {topic}: {e:#}; trying again");
                state.error(Job::Checking, &e);
                if crate::backoff::sleep(backoff, BACKOFF_MAX, shutdown).await {
                    return Ok(None);
                }
            }
        }
    }
}

/// The late check. Another instance's produce of a change the database
/// lost, still being retried when this relay took over, was not in the
/// topic for `rewind_if_lost` to see, and may land later, among this
/// relay's changes. So once that produce has landed or expired (the
/// delivery timeout and `late_margin` after the takeover), every change
/// that landed after where the partitions ended at the takeover (`since`)
/// is read and checked against the log (this relay's own pass), and if one
/// is not held as published, a rewind goes to every partition: after the
/// position before the lowest such change, through the newest position
/// read. A change that a rewind after it on its partition covers is not
/// counted. The read runs on a thread of its own while the relay publishes;
/// each call looks in on it and answers whether the check is done. Kafka
/// errors retry the check after `LATE_RETRY`; a database error ends the
/// session (the next takeover does the check: `since` is stored).
#[allow(clippy::too_many_arguments)]
async fn late_check(
    db: &tokio_postgres::Client,
    producer: &FutureProducer,
    (kafka, brokers): (&KafkaSettings, &str),
    topic: &str,
    check: &mut Late,
    state: &OutboxState,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<bool> {
    let retry = |check: &mut Late, e: anyhow::Error| {
        log::warn!("outbox relay for {topic}: the late check: {e:#}; trying again in {} s", LATE_RETRY.as_secs());
        state.error(Job::Checking, &e);
        check.at = Instant::now() + LATE_RETRY;
        Ok(false)
    };
    let Some(under_way) = check.read.as_mut() else {
        if Instant::now() >= check.at {
            // An offset gone before the fetch (retention): from the oldest
            // there is, never past what is left.
            let config = reader_config(kafka, brokers).map(|mut c| {
                c.set("auto.offset.reset", "earliest");
                c
            });
            match spawn_read(config, topic, Some(check.since.clone())) {
                Ok(read) => check.read = Some(read),
                Err(e) => return retry(check, e),
            }
        }
        return Ok(false);
    };
    let read = match under_way.try_recv() {
        Err(tokio::sync::oneshot::error::TryRecvError::Empty) => return Ok(false),
        Err(tokio::sync::oneshot::error::TryRecvError::Closed) => Err(anyhow::anyhow!("reading the topic panicked")),
        Ok(read) => read,
    };
    check.read = None;
    let Read { partitions, published, .. } = match read {
        Ok(read) => read,
        Err(e) => return retry(check, e),
    };
    let lost = crate::changes::listener::not_held(db, &published, |p| p.position, |p, m| p.committed.matches(m))
        .await?
        .iter()
        .map(|p| p.position)
        .min();
    if let (Some(lost), Some(newest)) = (lost, published.iter().map(|p| p.position).max()) {
        log::error!(
            "outbox relay for {topic}: a change published at position {lost} after this relay took over is not in \
             the database (another instance's produce, still in flight when the database lost it); a rewind message \
             goes to every partition"
        );
        let sent = tokio::select! {
            r = send_rewind(producer, topic, 0..partitions, lost - 1, newest, state, Job::Checking) => r,
            _ = shutdown.changed() => return Ok(false),
        };
        if let Err(e) = sent {
            return retry(check, e);
        }
        state.rewinds.fetch_add(1, Ordering::Relaxed);
    }
    state.late_checked.store(published.len() as i64, Ordering::Relaxed);
    // A try that failed before is behind: health says so.
    state.recovered(Job::Checking);
    Ok(true)
}

/// How long after the delivery timeout the late check reads: a produce
/// request on its way when its message timed out can still be appended
/// while the broker waits for its replicas, as long as the producer's
/// `request.timeout.ms` (30 s by default; at most `FENCE_MAX`).
fn late_margin(kafka: &KafkaSettings) -> Duration {
    let ms = super::producer_ms(kafka, "request.timeout.ms").unwrap_or(30_000);
    Duration::from_millis(ms).min(FENCE_MAX)
}

/// Adds rewinds owed (partition, the newest position to cover) to `due`.
fn owe(due: &mut BTreeMap<i32, i64>, more: impl IntoIterator<Item = (i32, i64)>) {
    for (partition, newest) in more {
        let owed = due.entry(partition).or_insert(newest);
        *owed = (*owed).max(newest);
    }
}

/// Records the rewinds owed (`outbox_positions.rewind_due`, NULL for none),
/// so that a stop of the process or a move of the relay lock does not drop
/// them: whichever instance publishes next sends them first.
async fn store_rewind_due(db: &tokio_postgres::Client, topic: &str, due: &BTreeMap<i32, i64>) -> anyhow::Result<()> {
    let value =
        (!due.is_empty()).then(|| json!(due.iter().map(|(p, n)| (p.to_string(), n)).collect::<HashMap<_, _>>()));
    db.execute("UPDATE outbox_positions SET rewind_due = $2 WHERE name = $1", &[&topic, &value])
        .await
        .map_err(crate::db::describe)?;
    Ok(())
}

/// The late check's stored `since` (`{"partition": offset, ...}`), or the
/// rewinds owed (`{"partition": position, ...}`).
fn offsets(stored: &Value) -> Option<HashMap<i32, i64>> {
    stored.as_object()?.iter().map(|(p, o)| Some((p.parse().ok()?, o.as_i64()?))).collect()
}

/// The producer's delivery timeout (`message.timeout.ms`; 0, no limit, and
/// anything above counts as `FENCE_MAX`).
fn fence(kafka: &KafkaSettings) -> Duration {
    match super::message_timeout_ms(kafka) {
        Some(0) => FENCE_MAX,
        Some(ms) => Duration::from_millis(ms).min(FENCE_MAX),
        None => super::MESSAGE_TIMEOUT.min(FENCE_MAX),
    }
}

/// Produces the rewind message to each of `partitions` and waits for every
/// ack.
async fn send_rewind(
    producer: &FutureProducer,
    topic: &str,
    partitions: impl IntoIterator<Item = i32>,
    after: i64,
    through: i64,
    state: &OutboxState,
    job: Job,
) -> anyhow::Result<()> {
    let payload = json!({"type": "rewind", "after": after, "through": through}).to_string();
    let (after, through) = (after.to_string(), through.to_string());
    let mut deliveries = Vec::new();
    for partition in partitions {
        let headers = OwnedHeaders::new_with_capacity(4)
            .insert(Header { key: "ordercast-op", value: Some("rewind") })
            .insert(Header { key: "ordercast-rewind-after", value: Some(after.as_str()) })
            .insert(Header { key: "ordercast-rewind-through", value: Some(through.as_str()) })
            .insert(Header { key: "content-type", value: Some("application/json") });
        // A key, so that a compacted topic takes it too.
        let record =
            FutureRecord::to(topic).key("rewind").partition(partition).payload(payload.as_bytes()).headers(headers);
        deliveries.push(super::enqueue(producer, record).await.context("Kafka refused the rewind message")?);
    }
    for delivery in acknowledged(deliveries, "rewind messages", state, job).await {
        match delivery {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => anyhow::bail!("Kafka did not acknowledge the rewind message: {e}"),
            Err(_) => anyhow::bail!("the Kafka producer went away before acknowledging the rewind message"),
        }
    }
    Ok(())
}

/// The ingest's consumer configuration (the pass-through properties: TLS,
/// SASL, ...; nothing committed), for a consumer that reads by assignment.
/// It joins no group, but needs a `group.id` for rdkafka to hand it the
/// messages (an error about that group, such as a missing ACL, only passes
/// by).
fn reader_config(kafka: &KafkaSettings, brokers: &str) -> anyhow::Result<ClientConfig> {
    let mut config = crate::ingest::consumer::consumer_config(kafka, brokers).map_err(|e| anyhow::anyhow!(e))?;
    config
        .set("client.id", "ordercast-outbox-check")
        .set("group.id", "ordercast-outbox-check")
        .set("statistics.interval.ms", "0")
        // Tells where a partition's read is done, also when no message ends it.
        .set("enable.partition.eof", "true")
        // An offset gone before the fetch: no message, never an older one.
        .set("auto.offset.reset", "latest");
    Ok(config)
}

/// Whether a Kafka error says this client may not read what it asked for.
fn not_allowed(e: &rdkafka::error::KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(e.rdkafka_error_code(), Some(TopicAuthorizationFailed | ClusterAuthorizationFailed))
}

/// What a read of the topic found.
struct Read {
    partitions: i32,
    /// The changes read, in no particular order (rewind messages are not
    /// changes).
    published: Vec<Published>,
    /// Where each partition this client may read ended (its high watermark)
    /// when the read began.
    ends: Ends,
}

/// Starts `read_topic` with a consumer made from `config`, on a thread of
/// its own: librdkafka's calls block, and the runtime's shutdown would wait
/// for a blocking task.
fn spawn_read(
    config: anyhow::Result<ClientConfig>,
    topic: &str,
    since: Option<HashMap<i32, i64>>,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<anyhow::Result<Read>>> {
    let config = config?;
    let topic = topic.to_string();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("outbox-check".into())
        .spawn(move || {
            let consumer = config.create().context("invalid Kafka configuration for the outbox relay");
            let _ = tx.send(consumer.and_then(|c| read_topic(c, &topic, since.as_ref())));
        })
        .context("starting the topic's read")?;
    Ok(rx)
}

/// Reads what `topic` holds. Without `since`, the last `LAST_MESSAGES`
/// offsets of each partition, within `PUBLISHED_TIMEOUT` plus `PER_PARTITION` for each
/// partition: a partition that could not be read in time without an error
/// from the broker is passed over with a warning; after errors the read
/// fails, to be tried again. With `since`, every message after those
/// offsets (all of a partition not in it) up to where each partition ends
/// now; a change before a rewind message on its partition, past that
/// rewind's `after`, is left out (the rewind announced it). That read fails
/// when it goes `LATE_STALL` without progress on a partition it has not
/// read to its end. A partition that this client may not read
/// (the relay's credentials allow writes only) is passed over with a
/// warning. A topic that does not exist yet holds nothing.
fn read_topic(consumer: BaseConsumer, topic: &str, since: Option<&HashMap<i32, i64>>) -> anyhow::Result<Read> {
    let mut deadline = Instant::now() + PUBLISHED_TIMEOUT;
    let metadata = consumer
        .fetch_metadata(Some(topic), deadline.saturating_duration_since(Instant::now()))
        .context("reading the topic's metadata")?;
    let nothing = |partitions, ends| Read { partitions, published: Vec::new(), ends };
    let Some(meta) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(nothing(0, Some(HashMap::new())));
    };
    match meta.error().map(RDKafkaErrorCode::from) {
        None => {}
        Some(RDKafkaErrorCode::UnknownTopicOrPartition) => return Ok(nothing(0, Some(HashMap::new()))),
        Some(code @ (RDKafkaErrorCode::TopicAuthorizationFailed | RDKafkaErrorCode::ClusterAuthorizationFailed)) => {
            log::warn!(
                "outbox relay for {topic}: the topic may not be described ({code}); what it holds is not checked"
            );
            return Ok(nothing(0, None));
        }
        // Asked again (a leader being elected, a broker catching up after
        // a restart): the takeover's check and the late check must read
        // what the topic holds, not go on without it.
        Some(code) => anyhow::bail!("the metadata of {topic} says {code}"),
    }
    let partitions = meta.partitions().len() as i32;
    // Where each partition ends is asked one partition at a time.
    deadline += PER_PARTITION * partitions as u32;
    let left = |deadline: Instant| deadline.saturating_duration_since(Instant::now());
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    // The partitions still to read, each with its end.
    let mut pending = HashMap::new();
    for p in 0..partitions {
        match consumer.fetch_watermarks(topic, p, left(deadline)) {
            Ok((low, high)) => {
                ends.insert(p, high);
                let from = match since {
                    None => high - LAST_MESSAGES,
                    Some(since) => since.get(&p).copied().unwrap_or(low),
                };
                if from.max(low) < high {
                    tpl.add_partition_offset(topic, p, Offset::Offset(from.max(low)))?;
                    pending.insert(p, high);
                }
            }
            Err(e) if not_allowed(&e) => {
                log::warn!("outbox relay for {topic}: partition {p} may not be read ({e}); not checked")
            }
            Err(e) => return Err(e).with_context(|| format!("reading where partition {p} of {topic} ends")),
        }
    }
    let mut read = Read { partitions, published: Vec::new(), ends: Some(ends) };
    if pending.is_empty() {
        return Ok(read);
    }
    consumer.assign(&tpl).context("reading the topic")?;
    // The changes read so far, by partition.
    let mut changes: HashMap<i32, Vec<Published>> = HashMap::new();
    let mut failed: Option<KafkaError> = None;
    if since.is_some() {
        deadline = Instant::now() + LATE_STALL;
    }
    while !pending.is_empty() {
        let unread = || pending.keys().collect::<Vec<_>>();
        if left(deadline).is_zero() {
            // After errors, the broker is the trouble: asked again. The late
            // check must read everything.
            if let Some(e) = failed {
                return Err(e).with_context(|| format!("reading partitions {:?} of {topic}", unread()));
            }
            if since.is_some() {
                anyhow::bail!("partitions {:?} of {topic} could not be read in time", unread());
            }
            log::warn!("outbox relay for {topic}: partitions {:?} could not be read in time; not checked", unread());
            break;
        }
        let message = match consumer.poll(left(deadline)) {
            None => continue,
            // The end (`enable.partition.eof`), also when what ends the
            // partition is no message (a transaction's marker).
            Some(Err(KafkaError::PartitionEOF(p))) => {
                if pending.remove(&p).is_some() {
                    done(&consumer, topic, p);
                }
                continue;
            }
            Some(Err(e)) if not_allowed(&e) => {
                log::warn!(
                    "outbox relay for {topic}: the topic may not be read ({e}); partitions {:?} not checked",
                    unread()
                );
                break;
            }
            // Passing errors (a broker's connection) are retried by
            // librdkafka until the time is up.
            Some(Err(e)) => {
                log::debug!("outbox relay for {topic}: reading the topic: {e}");
                failed = Some(e);
                continue;
            }
            Some(Ok(m)) => m,
        };
        let partition = message.partition();
        let Some(&end) = pending.get(&partition) else { continue };
        if message.offset() >= end {
            continue;
        }
        // Progress on a partition still to read.
        if since.is_some() {
            deadline = Instant::now() + LATE_STALL;
        }
        if message.offset() + 1 >= end {
            pending.remove(&partition);
            done(&consumer, topic, partition);
        }
        let mine = changes.entry(partition).or_default();
        match (Published::of(&message), Rewind::of(&message)) {
            (Some(change), _) => mine.push(change),
            // Consumers reset every order applied past its `after`: what
            // came before it there is no longer the check's.
            (None, Some(rewind)) => mine.retain(|c| c.position <= rewind.after),
            (None, None) => {}
        }
    }
    read.published = changes.into_values().flatten().collect();
    Ok(read)
}

/// Stops fetching a partition read to its end (the relay goes on
/// publishing to it).
fn done(consumer: &BaseConsumer, topic: &str, partition: i32) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    // Not stopped: its messages are passed over.
    let _ = consumer.pause(&tpl);
}

/// A rewind message's position: consumers reset every order applied past it.
struct Rewind {
    after: i64,
}

impl Rewind {
    fn of(message: &impl Message) -> Option<Rewind> {
        Some(Rewind { after: header_number(message, "ordercast-rewind-after")? })
    }
}

/// The header `key` of `message`, as a number.
fn header_number(message: &impl Message, key: &str) -> Option<i64> {
    message.headers()?.iter().find(|h| h.key == key).and_then(|h| std::str::from_utf8(h.value?).ok()?.parse().ok())
}

/// Stores the relay's position. Its row deleted meanwhile (to start the
/// relay over, docs/workflow.md) ends the session: the next one starts over
/// from the oldest retained change, as a relay started afresh does.
async fn store(db: &tokio_postgres::Client, name: &str, position: i64) -> anyhow::Result<()> {
    let stored = db
        .execute(
            "UPDATE outbox_positions SET position = $2, updated_at = now() WHERE name = $1 AND position < $2",
            &[&name, &position],
        )
        .await
        .map_err(crate::db::describe)
        .context("Failed to store the outbox position")?;
    if stored == 0
        && db
            .query_opt("SELECT 1 FROM outbox_positions WHERE name = $1", &[&name])
            .await
            .map_err(crate::db::describe)
            .context("Failed to read the outbox position")?
            .is_none()
    {
        anyhow::bail!("the relay's row in outbox_positions was deleted: starting over from the oldest retained change");
    }
    Ok(())
}

/// How long messages may wait for their acknowledgements before the relay
/// says so in `/api/health` (and again each time as long after).
const UNACKNOWLEDGED_REPORT: Duration = Duration::from_secs(10);

/// The acknowledgements of `deliveries`, waited for as long as they take:
/// with `message.timeout.ms=0` (no limit) a broker away holds them, and
/// sending them again would only add copies. A long wait is said in
/// `/api/health`; before, the relay looked "running", with no `last_error`.
async fn acknowledged(
    deliveries: Vec<DeliveryFuture>,
    what: &str,
    state: &OutboxState,
    job: Job,
) -> Vec<<DeliveryFuture as std::future::Future>::Output> {
    let (count, started) = (deliveries.len(), tokio::time::Instant::now());
    let acks = join_all(deliveries);
    tokio::pin!(acks);
    loop {
        match tokio::time::timeout(UNACKNOWLEDGED_REPORT, &mut acks).await {
            Ok(acks) => return acks,
            Err(_) => {
                let e = anyhow::anyhow!(
                    "{what} sent to Kafka ({count}) are not acknowledged after {} s; still waiting for them",
                    started.elapsed().as_secs()
                );
                // Logged once, as a batch that fails is: a failure that
                // follows is then not logged again.
                if !state.failing(job) {
                    log::warn!("outbox relay: {e}");
                }
                state.error(job, &e);
            }
        }
    }
}

/// A batch not acknowledged whole.
struct Unacknowledged {
    error: anyhow::Error,
    /// By partition, the newest change acknowledged there after an older one
    /// failed (see `overtaken`).
    overtaken: BTreeMap<i32, i64>,
}

impl From<anyhow::Error> for Unacknowledged {
    fn from(error: anyhow::Error) -> Self {
        Unacknowledged { error, overtaken: BTreeMap::new() }
    }
}

/// The partitions on which a change was acknowledged after an older one
/// failed, each with the newest such change's position. The idempotent
/// producer keeps a partition in order across retries, but not across a
/// delivery timeout: a message that times out is dropped while the next
/// ones can still land (librdkafka's "message timeout considerations"). A
/// consumer that skips positions at or below what it applied would then
/// drop the older change when the batch comes again. `outcomes`: each
/// change's position, the partition it went to (None: not known) and
/// whether it was acknowledged.
fn overtaken(outcomes: &[(i64, Option<i32>, bool)]) -> BTreeMap<i32, i64> {
    let mut out = BTreeMap::new();
    for &(position, partition, _) in outcomes.iter().filter(|o| o.2) {
        let Some(partition) = partition else { continue };
        let overtook = outcomes
            .iter()
            .any(|&(p, part, acked)| !acked && p < position && part.is_none_or(|part| part == partition));
        if overtook {
            let newest = out.entry(partition).or_insert(position);
            *newest = (*newest).max(position);
        }
    }
    out
}

/// Produces one batch and waits for every acknowledgement.
async fn publish(
    producer: &FutureProducer,
    topic: &str,
    rows: &[tokio_postgres::Row],
    state: &OutboxState,
) -> Result<(), Unacknowledged> {
    // Every row read before any is produced: one that cannot be read (a
    // `change_read` replaced by hand) fails the batch before the rows ahead
    // of it go out, not after, to go out again at every retry.
    let envelopes = rows
        .iter()
        .map(Envelope::from_row)
        .collect::<Result<Vec<_>, _>>()
        .map_err(crate::db::describe)
        .context("reading a change")
        .map_err(Unacknowledged::from)?;
    let positions: Vec<i64> = envelopes.iter().map(|e| e.pos).collect();
    let mut deliveries = Vec::with_capacity(rows.len());
    for (row, envelope) in rows.iter().zip(envelopes) {
        // The same envelope as the WebSocket `change` message, so one parser serves both.
        let delivery = match Outgoing::of(envelope, false).send(producer, topic).await {
            // Refused whole (rarely): the envelope is assembled again for the
            // stub (read above: it reads again).
            Err(KafkaError::MessageProduction(code)) if crate::ingest::dlq::permanent(code) => {
                let envelope = Envelope::from_row(row).map_err(crate::db::describe).context("reading a change");
                Outgoing::of(envelope.map_err(Unacknowledged::from)?, true).send(producer, topic).await
            }
            other => other,
        };
        match delivery {
            Ok(delivery) => deliveries.push(delivery),
            // Not queued (the topic gone, the producer failed): those queued
            // before it still fly, and one of them failing while a later one
            // lands owes a rewind, as when all were queued.
            Err(e) => {
                let queued = deliveries.len();
                let acks = acknowledged(deliveries, "changes", state, Job::Publishing).await;
                let (_, outcomes) = outcomes(&positions[..queued], acks);
                let error = anyhow::Error::from(e).context("Kafka refused a message");
                return Err(Unacknowledged { error, overtaken: overtaken(&outcomes) });
            }
        }
    }
    // A refusal by the broker (a topic limit below the producer's) is not
    // stubbed: the broker judges a whole record batch, small changes with
    // it, and a stub sent now would come after the changes enqueued behind
    // the refused one. The batch is tried again, and the error is in
    // `/api/health` (see the module's comment).
    let (error, outcomes) = outcomes(&positions, acknowledged(deliveries, "changes", state, Job::Publishing).await);
    match error {
        None => Ok(()),
        Some(error) => Err(Unacknowledged { error, overtaken: overtaken(&outcomes) }),
    }
}

/// Each change's position, partition (None: not known) and whether it was
/// acknowledged, from its delivery's outcome; with the first failure's error.
#[allow(clippy::type_complexity)]
fn outcomes(
    positions: &[i64],
    acks: Vec<<DeliveryFuture as std::future::Future>::Output>,
) -> (Option<anyhow::Error>, Vec<(i64, Option<i32>, bool)>) {
    let mut error = None;
    let mut outcomes = Vec::with_capacity(positions.len());
    for (&position, delivery) in positions.iter().zip(acks) {
        let (partition, acked) = match delivery {
            Ok(Ok(delivered)) => (Some(delivered.partition), true),
            Ok(Err((e, message))) => {
                error.get_or_insert_with(|| anyhow::anyhow!("Kafka did not acknowledge a change: {e}"));
                (Some(message.partition()).filter(|p| *p >= 0), false)
            }
            Err(_) => {
                error.get_or_insert_with(|| anyhow::anyhow!("the Kafka producer went away before acknowledging"));
                (None, false)
            }
        };
        outcomes.push((position, partition, acked));
    }
    (error, outcomes)
}

/// The message of one change, or the stub that stands for a change the
/// topic cannot take whole (see the module's comment).
struct Outgoing {
    key: String,
    payload: String,
    headers: OwnedHeaders,
}

impl Outgoing {
    fn of(change: Envelope<'_>, stub: bool) -> Outgoing {
        let position = change.pos.to_string();
        let mut headers = OwnedHeaders::new_with_capacity(6)
            .insert(Header { key: "ordercast-position", value: Some(position.as_str()) })
            .insert(Header { key: "ordercast-op", value: Some(change.op) })
            .insert(Header { key: "ordercast-actor", value: Some(change.actor) })
            .insert(Header { key: "content-type", value: Some("application/json") });
        let committed = change.at.map(|at| at.timestamp_micros().to_string());
        if let Some(micros) = committed.as_deref() {
            headers = headers.insert(Header { key: "ordercast-committed-at", value: Some(micros) });
        }
        let payload = if stub {
            headers = headers.insert(Header { key: "ordercast-truncated", value: Some("true") });
            let order = format!(r#"{{"id":{}}}"#, change.order_id);
            let stub = envelope_json(change.pos, change.op, &order, None, change.actor, change.at);
            // The envelope ends with `at`: the flag goes after it.
            format!(r#"{},"truncated":true}}"#, &stub[..stub.len() - 1])
        } else {
            change.json
        };
        // No timestamp: the producer stamps the message when it is sent.
        // Stamped with the commit time, changes a relay published after a
        // stop longer than the topic's `retention.ms` would be deleted by
        // the broker's next retention pass (the time retention goes by is
        // the messages' timestamps). The commit time is in the header.
        Outgoing { key: change.order_id.to_string(), payload, headers }
    }

    async fn send(self, producer: &FutureProducer, topic: &str) -> Result<DeliveryFuture, KafkaError> {
        let record =
            FutureRecord::to(topic).key(self.key.as_str()).payload(self.payload.as_bytes()).headers(self.headers);
        super::enqueue(producer, record).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each job clears only its own failure: a check that succeeds while
    /// batches fail leaves the state `retrying`.
    #[test]
    fn a_check_that_succeeds_does_not_clear_failing_batches() {
        let state = OutboxState::default();
        state.start("changes");
        state.active.store(true, Ordering::Relaxed);
        state.error(Job::Publishing, &anyhow::anyhow!("refused"));
        state.recovered(Job::Checking);
        assert_eq!(state.health(0)["state"], "retrying");
        state.error(Job::Checking, &anyhow::anyhow!("unreadable"));
        assert!(state.recovered(Job::Publishing), "it was failing");
        assert_eq!(state.health(0)["state"], "retrying", "the check still fails");
        state.recovered(Job::Checking);
        assert_eq!(state.health(0)["state"], "running");
    }

    #[test]
    fn a_published_commit_time_matches_the_logs_to_its_precision() {
        let micros = 1_763_000_000_123_456;
        assert!(Committed::Micros(micros).matches(micros));
        assert!(!Committed::Micros(micros).matches(micros + 1), "the header is exact");
        assert!(Committed::Millis(micros / 1000).matches(micros), "a timestamp is to the millisecond");
        assert!(!Committed::Millis(micros / 1000).matches(micros + 1000));
        // Before 1970 (a restored clock?): chrono rounds down, so must this.
        assert!(Committed::Millis(-2).matches(-1_500));
        assert!(Committed::Unknown.matches(0), "a topic that stamps messages itself cannot tell");
    }

    /// A change acknowledged after an older one of its partition failed
    /// (a delivery timeout drops a message while the next ones land) is
    /// owed a rewind on that partition; a failure after the acknowledged
    /// ones, or on another partition, is a plain repeat.
    #[test]
    fn a_change_acknowledged_past_one_that_failed_on_its_partition_is_overtaken() {
        assert!(overtaken(&[(10, Some(0), true), (12, Some(0), true)]).is_empty());
        assert_eq!(overtaken(&[(10, Some(0), false), (12, Some(0), true)]), BTreeMap::from([(0, 12)]));
        assert!(overtaken(&[(10, Some(0), true), (12, Some(0), false)]).is_empty(), "a repeat");
        assert!(overtaken(&[(10, Some(1), false), (12, Some(0), true)]).is_empty(), "another partition");
        let unknown =
            [(10, None, false), (12, Some(2), true), (13, Some(0), true), (14, Some(2), true), (9, Some(1), true)];
        assert_eq!(overtaken(&unknown), BTreeMap::from([(0, 13), (2, 14)]), "a failure whose partition is unknown");
    }

    /// The relay lingers 5 ms for a batch unless told otherwise; before,
    /// the 5 ms replaced a `linger.ms` in `KAFKA_PROPERTIES`.
    #[test]
    fn the_relays_linger_is_a_default_the_properties_replace() {
        let linger = |properties: Option<&str>| {
            let mut kafka = crate::config::Settings::for_database("postgres://localhost/x").kafka;
            kafka.properties = properties.map(str::to_string);
            let config = producer_settings(&kafka, "127.0.0.1:9").unwrap();
            ["linger.ms", "queue.buffering.max.ms"].map(|k| config.get(k).map(str::to_string))
        };
        assert_eq!(linger(None), [Some("5".into()), None]);
        assert_eq!(linger(Some("linger.ms=50")), [Some("50".into()), None]);
        assert_eq!(linger(Some("queue.buffering.max.ms=0")), [None, Some("0".into())], "its other name");
    }

    #[test]
    fn the_wait_before_a_rewind_is_the_delivery_timeout_within_bounds() {
        let with = |properties: Option<&str>| {
            let mut kafka = crate::config::Settings::for_database("postgres://localhost/x").kafka;
            kafka.properties = properties.map(str::to_string);
            fence(&kafka)
        };
        assert_eq!(with(None), crate::workflow::MESSAGE_TIMEOUT);
        assert_eq!(with(Some("message.timeout.ms=2000")), Duration::from_secs(2));
        assert_eq!(with(Some("delivery.timeout.ms=5000")), Duration::from_secs(5), "its other name");
        assert_eq!(with(Some("message.timeout.ms=0")), FENCE_MAX, "no limit");
        assert_eq!(with(Some("message.timeout.ms=900000")), FENCE_MAX);
    }
}
