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
//! publishes anything, a relay that takes over checks the newest change the
//! topic holds against the log, and on a mismatch sends a `rewind` message to
//! every partition first (`rewind_if_lost`).
//!
//! A relay left stopped for longer than the change log's retention cannot
//! publish what was pruned meanwhile: it says so loudly (`skipped` in
//! `/api/health`) and continues after the gap.
//!
//! Message: key = order id (decimal text), value = the same JSON as the
//! WebSocket `change` message (`{"type":"change","seq":N,"op":...,"order":{...},
//! "old":{...},"actor":"...","at":"..."}`), headers `ordercast-position`,
//! `ordercast-op`, `ordercast-actor`, `ordercast-committed-at` (the commit
//! time in microseconds), `content-type: application/json`, timestamp = the
//! commit time. A change larger than the producer's message
//! size limit (`message.max.bytes`: a DBA's long text, say) is published as a
//! stub, in its place, so it never holds up the changes after it:
//! `{"type":"change","seq":N,"op":...,"order":{"id":ID},"old":null,"actor":...,
//! "at":...,"truncated":true}` with the header `ordercast-truncated: true`; the
//! order itself is read through the REST API. The broker judges a whole
//! record batch (some 100 bytes of framing more than its messages): a topic
//! limit not above the producer's makes it refuse the batch, and the relay
//! retries it, with the error in `/api/health`, until the producer's limit is
//! set clearly below the topic's (by 1 KB or more; `KAFKA_PROPERTIES`).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures_util::future::join_all;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_postgres::types::ToSql;

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
    pub failing: AtomicBool,
    pub last_error: Mutex<Option<String>>,
}

impl OutboxState {
    pub fn start(&self, topic: &str) {
        self.enabled.store(true, Ordering::Relaxed);
        *self.topic.lock().unwrap() = topic.to_string(); // unwrap: never held across a panic
    }

    fn error(&self, e: &anyhow::Error) {
        self.failing.store(true, Ordering::Relaxed);
        *self.last_error.lock().unwrap() = Some(format!("{e:#}")); // unwrap: never held across a panic
    }

    pub fn health(&self, head: i64) -> Value {
        if !self.enabled.load(Ordering::Relaxed) {
            return json!({"enabled": false});
        }
        let active = self.active.load(Ordering::Relaxed);
        let position = self.position.load(Ordering::Relaxed);
        json!({
            "enabled": true,
            "state": if !active { "standby" } else if self.failing.load(Ordering::Relaxed) { "retrying" } else { "running" },
            "topic": *self.topic.lock().unwrap(), // unwrap: never held across a panic
            "position": position,
            "lag": if active { Value::from((head - position).max(0)) } else { Value::Null },
            "published": self.published.load(Ordering::Relaxed),
            "batches": self.batches.load(Ordering::Relaxed),
            "retries": self.retries.load(Ordering::Relaxed),
            "skipped": self.skipped.load(Ordering::Relaxed),
            "rewinds": self.rewinds.load(Ordering::Relaxed),
            "checked": self.checked.load(Ordering::Relaxed),
            "last_error": *self.last_error.lock().unwrap(), // unwrap: never held across a panic
        })
    }
}

/// The relay's producer: idempotent, so retries keep each partition in order.
pub fn producer(kafka: &KafkaSettings, brokers: &str) -> anyhow::Result<FutureProducer> {
    super::producer_config(kafka, brokers, "ordercast-outbox", &[("enable.idempotence", "true")])?
        .set("linger.ms", "5")
        .create()
        .map_err(|e| anyhow::anyhow!("invalid Kafka configuration for the outbox relay: {e}"))
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
    loop {
        match session(
            &url,
            &mut producer,
            (&kafka, &brokers),
            &topic,
            batch.max(1),
            &state,
            &mut shutdown,
            &mut backoff,
        )
        .await
        {
            Ok(()) => break,
            Err(e) => {
                log::warn!("outbox relay: {e:#}; reconnecting");
                state.error(&e);
            }
        }
        state.active.store(false, Ordering::Relaxed);
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
    backoff: &mut Duration,
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
    let mut position: i64 = db
        .query_one("SELECT position FROM outbox_positions WHERE name = $1", &[&topic])
        .await
        .map_err(crate::db::describe)?
        .get(0);
    state.position.store(position, Ordering::Relaxed);
    state.active.store(true, Ordering::Relaxed);
    log::info!("outbox relay for {topic}: publishing changes after position {position}");
    // Before anything new goes out: did the database lose changes that were
    // published (see `rewind_if_lost`)? Kafka answers what was published,
    // so this holds for any instance, also one started after the loss.
    if rewind_if_lost(db, producer, (kafka, brokers), topic, position, state, shutdown, backoff).await? {
        return Ok(());
    }
    let read = db.prepare(crate::changes::READ_SQL).await.map_err(crate::db::describe)?;
    let limit = batch.min(i32::MAX as u32) as i32;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let after: [&(dyn ToSql + Sync); 2] = [&position, &limit];
        let rows = db.query(&read, &after).await.map_err(crate::db::describe)?;
        // The horizon comes with the rows, from the same snapshot: a prune
        // committed just before the read shows here, never after it.
        let pruned: i64 = rows.first().map_or(position, |r| r.get("pruned"));
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
        let Some(last) = rows.last().map(|r| r.get::<_, i64>(0)) else {
            tokio::select! {
                r = conn.wait(IDLE_POLL) => r?,
                // A dropped sender (the server never started) also means stop.
                r = shutdown.changed() => if r.is_err() { return Ok(()) },
            }
            continue;
        };
        match publish(producer, topic, &rows).await {
            Ok(()) => {
                position = last;
                store(db, topic, position).await?;
                state.position.store(position, Ordering::Relaxed);
                state.published.fetch_add(rows.len() as u64, Ordering::Relaxed);
                state.batches.fetch_add(1, Ordering::Relaxed);
                if state.failing.swap(false, Ordering::Relaxed) {
                    log::info!("outbox relay for {topic}: publishing again");
                }
                *backoff = BACKOFF_MIN;
            }
            Err(e) => {
                // Nothing is stored: the whole batch goes again (at least once).
                if !state.failing.load(Ordering::Relaxed) {
                    log::warn!("outbox relay for {topic}: {e:#}; retrying the batch after position {position}");
                }
                state.error(&e);
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

/// The newest change a topic holds: its position, and its commit time as
/// the message carries it.
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

/// Sends a rewind message to every partition of `topic` when the database
/// no longer holds the newest change the topic does (a failover to a
/// standby that missed commits, a restored backup): the next commits are
/// numbered with positions already published, and a consumer that skips
/// positions at or below what it applied for an order would drop them. The
/// message, `{"type":"rewind","after":A,"through":T}` (key `rewind`, headers
/// `ordercast-op: rewind`, `ordercast-rewind-after`,
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
/// messages in flight, and they must land before the rewind. Kafka errors
/// are retried with backoff; a database error ends the session. Answers
/// whether shutdown came first.
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
) -> anyhow::Result<bool> {
    let mut fenced = false;
    loop {
        let read = async {
            let config = reader_config(kafka, brokers)?;
            let owned = topic.to_string();
            // Not spawn_blocking: the runtime's shutdown would wait for it.
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::Builder::new()
                .name("outbox-check".into())
                .spawn(move || {
                    let _ = tx.send(newest_published(config, &owned));
                })
                .context("starting the topic's read")?;
            rx.await.context("reading the topic's last messages panicked")?
        };
        let kafka_step = tokio::select! {
            r = read => match r {
                Ok((partitions, newest)) => {
                    state.checked.store(newest.map_or(0, |n| n.position), Ordering::Relaxed);
                    let lost = match newest.filter(|n| n.position > position) {
                        // Database errors end the session.
                        Some(n) => crate::changes::listener::holds_commit(db, n.position, |m| n.committed.matches(m))
                            .await?
                            == Some(false),
                        None => false,
                    };
                    match newest.filter(|_| lost) {
                        None => break,
                        Some(n) if !fenced => {
                            log::error!(
                                "outbox relay for {topic}: the database no longer holds the change published at \
                                 position {} (it lost commits: a failover, a restored backup); positions {}..={} may \
                                 be numbered again. A rewind message goes to every partition before the next changes",
                                n.position,
                                position + 1,
                                n.position
                            );
                            let wait = fence(kafka);
                            log::info!(
                                "outbox relay for {topic}: waiting {} s for produces still in flight (the delivery \
                                 timeout) before the rewind",
                                wait.as_secs()
                            );
                            tokio::select! {
                                _ = tokio::time::sleep(wait) => {}
                                _ = shutdown.changed() => return Ok(true),
                            }
                            fenced = true;
                            continue;
                        }
                        Some(n) => tokio::select! {
                            r = send_rewind(producer, topic, partitions, position, n.position) => r,
                            _ = shutdown.changed() => return Ok(true),
                        },
                    }
                }
                Err(e) => Err(e),
            },
            _ = shutdown.changed() => return Ok(true),
        };
        match kafka_step {
            Ok(()) => {
                state.rewinds.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Err(e) => {
                log::warn!("outbox relay for {topic}: {e:#}; trying again");
                state.error(&e);
                if crate::backoff::sleep(backoff, BACKOFF_MAX, shutdown).await {
                    return Ok(true);
                }
            }
        }
    }
    // A check that failed before is behind: health says so.
    state.failing.store(false, Ordering::Relaxed);
    Ok(false)
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

/// Produces the rewind message to each partition and waits for every ack.
async fn send_rewind(
    producer: &FutureProducer,
    topic: &str,
    partitions: i32,
    after: i64,
    through: i64,
) -> anyhow::Result<()> {
    let payload = json!({"type": "rewind", "after": after, "through": through}).to_string();
    let (after, through) = (after.to_string(), through.to_string());
    let mut deliveries = Vec::with_capacity(partitions as usize);
    for partition in 0..partitions {
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
    for delivery in join_all(deliveries).await {
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
        // An offset gone before the fetch: no message, never an older one.
        .set("auto.offset.reset", "latest");
    Ok(config)
}

/// Whether a Kafka error says this client may not read what it asked for.
fn not_allowed(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode::*;
    matches!(e.rdkafka_error_code(), Some(TopicAuthorizationFailed | ClusterAuthorizationFailed))
}

/// The number of partitions of `topic`, and the newest change published to
/// it: the highest `ordercast-position` among the partitions' last messages.
/// A partition whose last message is not a change (a rewind message) is
/// passed over; so, with a warning, is one that cannot be read in time (the
/// last offset a transaction marker) or that this client may not read (the
/// relay's credentials allow writes only). A topic that does not exist yet
/// holds nothing.
fn newest_published(config: ClientConfig, topic: &str) -> anyhow::Result<(i32, Option<Published>)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Message, Offset, TopicPartitionList};
    use std::collections::HashSet;

    let deadline = std::time::Instant::now() + PUBLISHED_TIMEOUT;
    let left = || deadline.saturating_duration_since(std::time::Instant::now());
    let consumer: BaseConsumer = config.create().context("invalid Kafka configuration for the outbox relay")?;
    let metadata = consumer.fetch_metadata(Some(topic), left()).context("reading the topic's metadata")?;
    let Some(meta) = metadata.topics().iter().find(|t| t.name() == topic) else { return Ok((0, None)) };
    match meta.error().map(rdkafka::types::RDKafkaErrorCode::from) {
        None => {}
        Some(rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition) => return Ok((0, None)),
        Some(code) => {
            log::warn!("outbox relay for {topic}: the topic's metadata says {code}; what it holds is not checked");
            return Ok((0, None));
        }
    }
    let partitions = meta.partitions().len() as i32;
    // Where each partition ends is asked one partition at a time.
    let deadline = deadline + PER_PARTITION * partitions as u32;
    let left = || deadline.saturating_duration_since(std::time::Instant::now());
    let mut tpl = TopicPartitionList::new();
    let mut pending = HashSet::new();
    for p in 0..partitions {
        match consumer.fetch_watermarks(topic, p, left()) {
            Ok((low, high)) if high > low => {
                tpl.add_partition_offset(topic, p, Offset::Offset(high - 1))?;
                pending.insert(p);
            }
            Ok(_) => {}
            Err(e) if not_allowed(&e) => {
                log::warn!("outbox relay for {topic}: partition {p} may not be read ({e}); not checked")
            }
            Err(e) => return Err(e).with_context(|| format!("reading where partition {p} of {topic} ends")),
        }
    }
    if pending.is_empty() {
        return Ok((partitions, None));
    }
    consumer.assign(&tpl).context("reading the topic's last messages")?;
    let mut newest: Option<Published> = None;
    let mut failed: Option<rdkafka::error::KafkaError> = None;
    while !pending.is_empty() {
        if left().is_zero() {
            // After errors, the broker is the trouble: asked again. Without
            // any, what ends the partitions is no message (a transaction's
            // marker): no change to check there.
            if let Some(e) = failed {
                return Err(e).with_context(|| format!("reading the last message of partitions {pending:?}"));
            }
            log::warn!(
                "outbox relay for {topic}: the last message of partitions {pending:?} could not be read; not checked"
            );
            break;
        }
        let message = match consumer.poll(left()) {
            None => continue,
            Some(Err(e)) if not_allowed(&e) => {
                log::warn!(
                    "outbox relay for {topic}: the topic may not be read ({e}); partitions {pending:?} not checked"
                );
                break;
            }
            // Passing errors (a broker's connection) are retried by
            // librdkafka until the time is up.
            Some(Err(e)) => {
                log::debug!("outbox relay for {topic}: reading the last messages: {e}");
                failed = Some(e);
                continue;
            }
            Some(Ok(m)) => m,
        };
        if !pending.remove(&message.partition()) {
            continue;
        }
        let header = |key: &str| {
            message.headers().and_then(|h| {
                h.iter().find(|h| h.key == key).and_then(|h| std::str::from_utf8(h.value?).ok()?.parse::<i64>().ok())
            })
        };
        let Some(position) = header("ordercast-position") else { continue };
        let committed = match (header("ordercast-committed-at"), message.timestamp()) {
            (Some(micros), _) => Committed::Micros(micros),
            (None, rdkafka::Timestamp::CreateTime(ms)) => Committed::Millis(ms),
            (None, _) => Committed::Unknown,
        };
        if newest.is_none_or(|n| n.position < position) {
            newest = Some(Published { position, committed });
        }
    }
    Ok((partitions, newest))
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

/// Produces one batch and waits for every acknowledgement.
async fn publish(producer: &FutureProducer, topic: &str, rows: &[tokio_postgres::Row]) -> anyhow::Result<()> {
    let mut deliveries = Vec::with_capacity(rows.len());
    for row in rows {
        // The same envelope as the WebSocket `change` message, so one parser serves both.
        let delivery = match Outgoing::of(Envelope::from_row(row), false).send(producer, topic).await {
            // Refused whole (rarely): the envelope is assembled again for the stub.
            Err(KafkaError::MessageProduction(code)) if crate::ingest::dlq::permanent(code) => {
                Outgoing::of(Envelope::from_row(row), true).send(producer, topic).await
            }
            other => other,
        };
        deliveries.push(delivery.context("Kafka refused a message")?);
    }
    // A refusal by the broker (a topic limit below the producer's) is not
    // stubbed: the broker judges a whole record batch, small changes with
    // it, and a stub sent now would come after the changes enqueued behind
    // the refused one. The batch is tried again, and the error is in
    // `/api/health` (see the module's comment).
    for delivery in join_all(deliveries).await {
        match delivery {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(anyhow::anyhow!("Kafka did not acknowledge a change: {e}")),
            Err(_) => anyhow::bail!("the Kafka producer went away before acknowledging"),
        }
    }
    Ok(())
}

/// The message of one change, or the stub that stands for a change the
/// topic cannot take whole (see the module's comment).
struct Outgoing {
    key: String,
    payload: String,
    headers: OwnedHeaders,
    timestamp: Option<i64>,
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
        let timestamp = change.at.map(|at| at.timestamp_millis());
        Outgoing { key: change.order_id.to_string(), payload, headers, timestamp }
    }

    async fn send(self, producer: &FutureProducer, topic: &str) -> Result<DeliveryFuture, KafkaError> {
        let mut record =
            FutureRecord::to(topic).key(self.key.as_str()).payload(self.payload.as_bytes()).headers(self.headers);
        if let Some(t) = self.timestamp {
            record = record.timestamp(t);
        }
        super::enqueue(producer, record).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
