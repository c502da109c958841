//! Kafka ingest: order events from a Kafka topic become rows in `orders`,
//! from where the change log pushes them to browsers like any other write.
//!
//! The flow: `consumer` (a member of the consumer group `KAFKA_GROUP_ID`)
//! reads the topic and decodes each message once (`event`, `avro`), filling
//! bounded batches; one batch at a time waits in a channel; the `writer`
//! applies a batch and the consumer's position in ONE PostgreSQL transaction,
//! retrying transient failures with backoff and jitter without moving the
//! position; after the commit the position goes to Kafka as a courtesy, and
//! rejected messages, already recorded in `dead_letters`, are published to the
//! dead-letter topic by `dlq`. `IngestState` is what `/api/health`,
//! `/api/stats` and `/metrics` report.
//!
//! Why this gives an exactly-once effect: the position that counts is the one
//! in `kafka_offsets`, written with the rows it produced. A crash before the
//! commit loses the transaction and the messages are read again; a crash after
//! it but before Kafka hears of it makes Kafka redeliver messages whose
//! offsets are below the stored position, and they are skipped. A producer's
//! duplicate (same event_id) is skipped by `ingested_events`. A stored
//! position beyond the end of its partition's log belongs to a log that no
//! longer exists (a recreated topic): the writer notices, says so loudly
//! (`log_resets`) and starts over on the new log.

pub mod avro;
pub mod consumer;
pub mod dlq;
pub mod event;
pub mod settings;
pub mod writer;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use rdkafka::consumer::{CommitMode, Consumer};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

pub use settings::KafkaSettings;

use self::consumer::SharedConsumer;
use self::event::{OrderEvent, Rejection};
use self::writer::{Fate, WriteError, Writer};

/// One Kafka message, copied out of librdkafka and decoded.
#[derive(Debug)]
pub struct Message {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub timestamp_ms: Option<i64>,
    pub decoded: Result<OrderEvent, Rejection>,
}

impl Message {
    /// What the message weighs against `ORDERCAST_INGEST_BATCH_MAX_BYTES`:
    /// its key, value, and header keys and values (headers are copied and
    /// kept as well, and a producer may send large ones).
    pub fn size(&self) -> usize {
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len)).sum();
        self.payload.as_ref().map_or(0, Vec::len) + self.key.as_ref().map_or(0, Vec::len) + headers
    }
}

/// Messages applied together in one transaction.
#[derive(Debug, Default)]
pub struct Batch {
    pub messages: Vec<Message>,
}

/// Headers as stored in `dead_letters.headers`: text when it is UTF-8 that
/// jsonb can hold (no NUL), else base64.
pub fn headers_json(headers: &[(String, Option<Vec<u8>>)]) -> Value {
    Value::Array(
        headers
            .iter()
            .map(|(k, v)| match v {
                None => json!({"key": k, "value": null}),
                Some(bytes) => match std::str::from_utf8(bytes) {
                    Ok(s) if !s.contains('\0') => json!({"key": k, "value": s}),
                    _ => {
                        json!({"key": k, "value_base64": base64::engine::general_purpose::STANDARD.encode(bytes)})
                    }
                },
            })
            .collect(),
    )
}

/// One partition as the ingest sees it.
#[derive(Debug, Clone, Default)]
pub struct PartitionState {
    pub assigned: bool,
    /// The next offset to apply, as this instance last stored it in PostgreSQL.
    pub applied: Option<i64>,
    /// The last offset this instance committed to Kafka.
    pub committed: Option<i64>,
    /// From librdkafka's statistics: the partition's end.
    pub high_watermark: Option<i64>,
    /// From librdkafka's statistics: the group's committed offset, or the
    /// oldest retained message; where lag counts from before `applied` is known.
    pub group_position: Option<i64>,
    /// Paused since its assignment: where it must start (its stored
    /// position) could not be read then. See `consumer::settle`.
    pub awaiting_position: bool,
}

impl PartitionState {
    pub fn lag(&self) -> Option<i64> {
        Some((self.high_watermark? - self.applied.or(self.group_position)?).max(0))
    }
}

/// Counters and health of the ingest. Counters only grow; they are per process.
#[derive(Debug, Default)]
pub struct IngestState {
    pub enabled: bool,
    pub topic: String,
    pub dlq_topic: String,
    pub group_id: String,
    /// Messages received from Kafka.
    pub consumed: AtomicU64,
    /// Orders created or updated.
    pub written: AtomicU64,
    /// Events skipped because their event_id was applied before.
    pub duplicates: AtomicU64,
    /// Messages skipped because their offset was applied before (after a
    /// crash or a rebalance).
    pub redelivered: AtomicU64,
    /// Partitions whose stored position was found beyond the end of their
    /// log (the topic was deleted and recreated): the position was reset.
    pub log_resets: AtomicU64,
    /// Messages recorded as dead letters.
    pub dead_lettered: AtomicU64,
    /// Dead letters produced to the dead-letter topic.
    pub dlq_published: AtomicU64,
    /// Dead letters waiting to be produced (as of the publisher's last round).
    pub dlq_pending: AtomicI64,
    pub batches: AtomicU64,
    /// Batch attempts that failed transiently and were retried.
    pub retries: AtomicU64,
    /// Writers whose current batch cannot be written right now.
    pub failing_writers: AtomicUsize,
    /// False after librdkafka reported every broker down, until statistics
    /// show one up again.
    pub brokers_up: AtomicBool,
    /// The error of the writes failing now (None once every writer writes
    /// again).
    pub last_error: Mutex<Option<String>>,
    /// True from an error the consumer got instead of a message (its rights
    /// on the topic taken away, the topic gone) until a message arrives.
    consumer_failing: AtomicBool,
    /// When the consumer got its latest such error.
    consumer_error_at: Mutex<Option<Instant>>,
    pub last_kafka_error: Mutex<Option<String>>,
    pub dlq_error: Mutex<Option<String>>,
    /// Set when one of the ingest's tasks ended or panicked before shutdown:
    /// the ingest no longer runs (or no longer publishes dead letters) until
    /// the process restarts.
    pub task_failure: Mutex<Option<String>>,
    pub partitions: Mutex<BTreeMap<i32, PartitionState>>,
    /// Where assigned partitions started: their stored positions, for the
    /// writers to check the database against before their first commit.
    pub starts: writer::Starts,
}

impl IngestState {
    pub fn disabled() -> IngestState {
        IngestState::default()
    }

    fn running(settings: &KafkaSettings) -> IngestState {
        IngestState {
            enabled: true,
            topic: settings.topic.clone(),
            dlq_topic: settings.dlq_topic.clone(),
            group_id: settings.group_id.clone(),
            brokers_up: AtomicBool::new(true),
            ..IngestState::default()
        }
    }

    pub fn healthy(&self) -> bool {
        !self.enabled
            || (self.failing_writers.load(Ordering::Relaxed) == 0
                && self.brokers_up.load(Ordering::Relaxed)
                && self.dlq_error.lock().unwrap().is_none() // unwrap: never held across a panic
                && self.task_failure.lock().unwrap().is_none() // unwrap: never held across a panic
                && self.awaiting_positions().is_empty()
                && !self.consumer_failing())
    }

    /// Whether the consumer keeps getting errors instead of messages: one
    /// came within `CONSUMER_ERROR_HOLD` and no message since. An error
    /// librdkafka repeats (an authorization refused is, at every fetch)
    /// keeps the ingest degraded; one that stopped without a message to
    /// show it, say on an idle topic, no longer counts after the hold.
    pub fn consumer_failing(&self) -> bool {
        self.consumer_failing.load(Ordering::Relaxed)
            && self.consumer_error_at.lock().unwrap().is_some_and(|at| at.elapsed() < CONSUMER_ERROR_HOLD)
        // unwrap: never held across a panic
    }

    /// The consumer got an error instead of a message.
    pub fn consumer_error(&self, e: String) {
        *self.consumer_error_at.lock().unwrap() = Some(Instant::now()); // unwrap: never held across a panic
        self.consumer_failing.store(true, Ordering::Relaxed);
        self.set_kafka_error(e);
    }

    /// Called for every message received: writes the shared flag only when
    /// it changes.
    pub fn consumer_reads(&self) {
        if self.consumer_failing.load(Ordering::Relaxed) {
            self.consumer_failing.store(false, Ordering::Relaxed);
            log::info!("Kafka consumer receives messages again");
        }
    }

    /// A writer writes again: the error it had is no longer shown once no
    /// writer fails (checked under the lock a failing writer sets it under,
    /// after counting itself, so a newer failure's error is never lost).
    fn writers_recovered(&self) {
        let mut last = self.last_error.lock().unwrap(); // unwrap: never held across a panic
        if self.failing_writers.load(Ordering::Relaxed) == 0 {
            *last = None;
        }
    }

    /// Assigned partitions paused until their stored positions can be read.
    pub fn awaiting_positions(&self) -> Vec<i32> {
        let parts = self.partitions.lock().unwrap(); // unwrap: never held across a panic
        parts.iter().filter(|(_, s)| s.assigned && s.awaiting_position).map(|(p, _)| *p).collect()
    }

    /// Marks partitions as waiting for their stored positions (or no longer).
    pub fn set_awaiting_position(&self, partitions: &[i32], awaiting: bool) {
        let mut parts = self.partitions.lock().unwrap(); // unwrap: never held across a panic
        for p in partitions {
            if let Some(entry) = parts.get_mut(p) {
                entry.awaiting_position = awaiting;
            }
        }
    }

    /// A task stopped before shutdown: logged, and kept (the first one, the
    /// likely cause) for `health()`.
    fn task_failed(&self, reason: String) {
        log::error!("Kafka ingest stopped working: {reason}");
        self.task_failure.lock().unwrap().get_or_insert(reason); // unwrap: never held across a panic
    }

    /// Called for every message received: writes the shared flag only
    /// when it changes.
    pub fn set_brokers_up(&self, up: bool) {
        if self.brokers_up.load(Ordering::Relaxed) != up {
            self.brokers_up.store(up, Ordering::Relaxed);
        }
    }

    pub fn set_kafka_error(&self, e: String) {
        *self.last_kafka_error.lock().unwrap() = Some(e); // unwrap: never held across a panic
    }

    pub fn set_assigned(&self, partitions: &[i32], assigned: bool) {
        let mut parts = self.partitions.lock().unwrap(); // unwrap: never held across a panic
        for p in partitions {
            let entry = parts.entry(*p).or_default();
            entry.assigned = assigned;
            if !assigned {
                // Another member may move it on; what we knew is stale.
                *entry = PartitionState::default();
            }
        }
        parts.retain(|_, s| s.assigned);
    }

    fn applied(&self, offsets: &[(i32, i64)]) {
        let mut parts = self.partitions.lock().unwrap(); // unwrap: never held across a panic
        for (p, next) in offsets {
            // A batch may still hold messages of a partition revoked meanwhile.
            if let Some(entry) = parts.get_mut(p) {
                entry.applied = Some(entry.applied.map_or(*next, |a| a.max(*next)));
            }
        }
    }

    /// Positions applied but not yet committed to Kafka, for owned partitions.
    pub fn commit_due(&self, only: Option<&[i32]>) -> Vec<(i32, i64)> {
        let parts = self.partitions.lock().unwrap(); // unwrap: never held across a panic
        parts
            .iter()
            .filter(|(p, s)| s.assigned && only.is_none_or(|o| o.contains(p)))
            .filter_map(|(p, s)| {
                let a = s.applied?;
                (s.committed.is_none_or(|c| c < a)).then_some((*p, a))
            })
            .collect()
    }

    pub fn mark_committed(&self, offsets: &[(i32, i64)]) {
        let mut parts = self.partitions.lock().unwrap(); // unwrap: never held across a panic
        for (p, o) in offsets {
            if let Some(entry) = parts.get_mut(p) {
                entry.committed = Some(*o);
            }
        }
    }

    /// A partition's log was found reset: its position moved back.
    fn reset_position(&self, partition: i32, next: i64) {
        let mut parts = self.partitions.lock().unwrap(); // unwrap: never held across a panic
        if let Some(entry) = parts.get_mut(&partition) {
            entry.applied = Some(next);
            entry.committed = None;
        }
    }

    pub fn forget_committed(&self, partitions: &[i32]) {
        let mut parts = self.partitions.lock().unwrap(); // unwrap: never held across a panic
        for p in partitions {
            if let Some(entry) = parts.get_mut(p) {
                entry.committed = None;
            }
        }
    }

    fn counters(&self) -> serde_json::Map<String, Value> {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let parts = self.partitions.lock().unwrap(); // unwrap: never held across a panic
        let lag: serde_json::Map<String, Value> =
            parts.iter().map(|(p, s)| (p.to_string(), s.lag().map_or(Value::Null, Value::from))).collect();
        let partitions: Vec<Value> = parts
            .iter()
            .map(|(p, s)| {
                json!({"partition": p, "next_offset": s.applied, "high_watermark": s.high_watermark, "lag": s.lag(),
                       "awaiting_position": s.awaiting_position})
            })
            .collect();
        let mut m = serde_json::Map::new();
        m.insert("consumed".into(), n(&self.consumed).into());
        m.insert("written".into(), n(&self.written).into());
        m.insert("duplicates".into(), n(&self.duplicates).into());
        m.insert("redelivered".into(), n(&self.redelivered).into());
        m.insert("log_resets".into(), n(&self.log_resets).into());
        m.insert("dead_lettered".into(), n(&self.dead_lettered).into());
        m.insert("dlq_published".into(), n(&self.dlq_published).into());
        m.insert("dlq_pending".into(), self.dlq_pending.load(Ordering::Relaxed).into());
        m.insert("batches".into(), n(&self.batches).into());
        m.insert("retries".into(), n(&self.retries).into());
        m.insert("lag".into(), Value::Object(lag));
        m.insert("lag_total".into(), parts.values().filter_map(PartitionState::lag).sum::<i64>().into());
        m.insert("partitions".into(), Value::Array(partitions));
        m
    }

    /// The `kafka` object of `/api/health`.
    pub fn health(&self) -> Value {
        if !self.enabled {
            return json!({"enabled": false, "healthy": true, "state": "disabled",
                          "reason": "KAFKA_BROKERS is not set"});
        }
        let healthy = self.healthy();
        let mut m = self.counters();
        m.insert("enabled".into(), true.into());
        m.insert("healthy".into(), healthy.into());
        m.insert("state".into(), (if healthy { "running" } else { "degraded" }).into());
        m.insert("topic".into(), self.topic.clone().into());
        m.insert("dlq_topic".into(), self.dlq_topic.clone().into());
        m.insert("group_id".into(), self.group_id.clone().into());
        m.insert("brokers_up".into(), self.brokers_up.load(Ordering::Relaxed).into());
        m.insert("consumer_failing".into(), self.consumer_failing().into());
        m.insert("last_error".into(), self.last_error.lock().unwrap().clone().into()); // unwrap: never poisoned
        m.insert("last_kafka_error".into(), self.last_kafka_error.lock().unwrap().clone().into()); // unwrap: see above
        m.insert("dlq_error".into(), self.dlq_error.lock().unwrap().clone().into()); // unwrap: see above
        let failure = self.task_failure.lock().unwrap().clone(); // unwrap: see above
        if failure.is_some() {
            m.insert("state".into(), "failed".into());
        }
        m.insert("task_failure".into(), failure.into());
        Value::Object(m)
    }

    /// The `ingest` object of `/api/stats`.
    pub fn stats(&self) -> Value {
        let mut m = if self.enabled { self.counters() } else { serde_json::Map::new() };
        m.insert("enabled".into(), self.enabled.into());
        Value::Object(m)
    }
}

/// Running ingest: its state and its tasks (which stop when `shutdown` flips).
pub struct Ingest {
    pub state: Arc<IngestState>,
    pub tasks: Vec<JoinHandle<()>>,
}

/// Checks the consumer's and the dead-letter producer's librdkafka settings
/// (`KAFKA_PROPERTIES`, `ORDERCAST_KAFKA_*`) without connecting, so a
/// mistyped one stops the start before anything runs.
pub fn check_config(settings: &KafkaSettings) -> anyhow::Result<()> {
    let Some(brokers) = settings.brokers.as_deref().filter(|_| settings.enabled()) else { return Ok(()) };
    let consumer = consumer::consumer_config(settings, brokers).map_err(|e| anyhow::anyhow!(e))?;
    consumer.create_native_config().map_err(|e| anyhow::anyhow!("invalid Kafka configuration for the ingest: {e}"))?;
    dlq::producer_config(settings, brokers)?
        .create_native_config()
        .map_err(|e| anyhow::anyhow!("invalid Kafka configuration for the dead-letter producer: {e}"))?;
    Ok(())
}

/// Starts the ingest when brokers are configured; otherwise says so once.
pub fn start(settings: &KafkaSettings, database_url: &str, shutdown: watch::Receiver<bool>) -> anyhow::Result<Ingest> {
    let Some(brokers) = settings.brokers.as_deref().filter(|_| settings.enabled()) else {
        log::info!("Kafka ingest is off: KAFKA_BROKERS is not set");
        return Ok(Ingest { state: Arc::new(IngestState::disabled()), tasks: Vec::new() });
    };
    let state = Arc::new(IngestState::running(settings));
    let consumer = SharedConsumer::new(consumer::create(settings, brokers, database_url, state.clone())?);
    let producer = dlq::create_producer(settings, brokers)?;
    log::info!(
        "Kafka ingest: reading {} as group {} from {brokers}; dead letters to {}",
        settings.topic,
        settings.group_id,
        settings.dlq_topic
    );
    // One batch waits while the writer writes another: reading and decoding
    // overlap the database work, and memory stays bounded.
    let (tx, rx) = mpsc::channel::<Batch>(1);
    let wake = Arc::new(Notify::new());
    let writers = (0..settings.writers.max(1))
        .map(|_| {
            Writer::new(database_url, &settings.group_id, &settings.topic)
                .with_log_ends(consumer::LogEnds::new(&consumer, &settings.topic))
                .with_starts(state.starts.clone())
        })
        .collect();
    let settler = consumer::settle(Arc::downgrade(&consumer), shutdown.clone());
    let tasks = vec![
        supervise(
            "the Kafka reader",
            consumer::read(consumer.clone(), settings.clone(), state.clone(), tx, shutdown.clone()),
            &state,
            &shutdown,
        ),
        supervise(
            "the ingest write loop",
            write_loop(rx, consumer, writers, settings.clone(), state.clone(), wake.clone(), shutdown.clone()),
            &state,
            &shutdown,
        ),
        supervise("the Kafka position settler", settler, &state, &shutdown),
        supervise(
            "the ingest pruner",
            prune_loop(
                Writer::new(database_url, &settings.group_id, &settings.topic),
                settings.clone(),
                shutdown.clone(),
            ),
            &state,
            &shutdown,
        ),
        supervise(
            "the dead-letter publisher",
            dlq::run(database_url.to_string(), producer, settings.clone(), state.clone(), wake, shutdown.clone()),
            &state,
            &shutdown,
        ),
    ];
    Ok(Ingest { state, tasks })
}

/// Spawns one of the ingest's tasks. Each runs until shutdown; one that ends
/// or panics before (a bug) would otherwise stop the ingest silently while
/// `/api/health` still said running: it makes the ingest unhealthy instead.
fn supervise(
    name: &'static str,
    task: impl std::future::Future<Output = ()> + Send + 'static,
    state: &Arc<IngestState>,
    shutdown: &watch::Receiver<bool>,
) -> JoinHandle<()> {
    let (state, shutdown) = (state.clone(), shutdown.clone());
    tokio::spawn(async move {
        let result = crate::error::caught(task).await;
        // A dropped sender is a shutdown too (the application went away).
        if *shutdown.borrow() || shutdown.has_changed().is_err() {
            return;
        }
        state.task_failed(match result {
            Ok(()) => format!("{name} ended unexpectedly"),
            Err(panic) => format!("{name} panicked: {panic}"),
        });
    })
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long an error the consumer got keeps the ingest degraded without
/// another (see `IngestState::consumer_failing`).
const CONSUMER_ERROR_HOLD: Duration = Duration::from_secs(60);
const PRUNE_EVERY: Duration = Duration::from_secs(300);
/// The longest wait before pruning again after a failed pruning.
const PRUNE_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Each step of a graceful stop (last commit, leaving the group) waits this long at most.
const SHUTDOWN_STEP: Duration = Duration::from_secs(4);

/// Splits a batch by partition among `n` writers. One order's events share a
/// partition, so they stay in one transaction and in order; each part moves
/// only its own partitions' positions, so each commits on its own.
fn split(batch: Batch, n: usize) -> Vec<Batch> {
    let mut parts: Vec<Batch> = (0..n).map(|_| Batch::default()).collect();
    for m in batch.messages {
        parts[m.partition.unsigned_abs() as usize % n].messages.push(m);
    }
    parts
}

/// Writes one part until it commits (None: shutdown came first).
async fn write_until_committed(
    writer: &mut Writer,
    part: &Batch,
    state: &IngestState,
    mut shutdown: watch::Receiver<bool>,
) -> Option<writer::Outcome> {
    let mut backoff = BACKOFF_MIN;
    let mut failing = false;
    let outcome = loop {
        match writer.write(part).await {
            Ok(o) => break Some(o),
            Err(e) => {
                if !failing {
                    failing = true;
                    if state.failing_writers.fetch_add(1, Ordering::Relaxed) == 0 {
                        let what = match e {
                            WriteError::Broker(_) => "ask Kafka where a partition's log ends",
                            WriteError::Transient(_) | WriteError::Data { .. } => "write to PostgreSQL",
                        };
                        log::warn!("ingest cannot {what}, retrying with backoff: {e}");
                    }
                }
                *state.last_error.lock().unwrap() = Some(format!("{e:#}")); // unwrap: never poisoned
                state.retries.fetch_add(1, Ordering::Relaxed);
                if crate::backoff::sleep(&mut backoff, BACKOFF_MAX, &mut shutdown).await {
                    break None;
                }
            }
        }
    };
    if failing {
        if state.failing_writers.fetch_sub(1, Ordering::Relaxed) == 1 && outcome.is_some() {
            log::info!("ingest writes to PostgreSQL again");
        }
        if outcome.is_some() {
            state.writers_recovered();
        }
    }
    outcome
}

/// Forgets event ids older than the dedupe window and published dead letters
/// older than their retention, at start and every `PRUNE_EVERY`, on its own
/// connection: it runs on schedule however busy the writers are, and removes
/// everything due each time (in rounds, see `Writer::prune`). A failed
/// pruning (the database down, say) is tried again with backoff, from
/// `BACKOFF_MIN` doubling up to `PRUNE_BACKOFF_MAX`, and after a success the
/// period is `PRUNE_EVERY` again. Shutdown stops it at once, during a
/// pruning too (each round is its own statement: nothing is left half done).
async fn prune_loop(mut writer: Writer, settings: KafkaSettings, mut shutdown: watch::Receiver<bool>) {
    let stop = shutdown.clone();
    let mut backoff = BACKOFF_MIN;
    let mut failing = false;
    loop {
        let pruned = tokio::select! {
            pruned = writer.prune(settings.dedupe_retention_secs, settings.dead_letter_retention_secs, &stop) => pruned,
            _ = shutdown.changed() => return,
        };
        match pruned {
            Ok((e, d)) => {
                if failing {
                    log::info!("pruning the ingest's old event ids and dead letters works again");
                    (failing, backoff) = (false, BACKOFF_MIN);
                }
                if e + d > 0 {
                    log::info!("pruned {e} old event ids and {d} published dead letters");
                }
            }
            Err(e) => {
                if failing {
                    log::debug!("pruning the ingest's old event ids and dead letters failed again: {e}");
                } else {
                    log::warn!(
                        "pruning the ingest's old event ids and dead letters failed (retrying with backoff): {e}"
                    );
                    failing = true;
                }
                if crate::backoff::sleep(&mut backoff, PRUNE_BACKOFF_MAX, &mut shutdown).await {
                    return;
                }
                continue;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Writes batches as they come; commits positions to Kafka now and then; stops
/// at shutdown after a last commit to Kafka.
///
/// Each writer owns a fixed share of the partitions (`split`) and works
/// through its own parts, one transaction each: a writer that finishes early
/// starts on its share of the next batch instead of waiting for the others
/// (one writer waiting at the sequencer's commit lock no longer idles the
/// other). Per partition, parts are still applied in order by one writer.
async fn write_loop(
    mut batches: mpsc::Receiver<Batch>,
    consumer: Arc<SharedConsumer>,
    writers: Vec<Writer>,
    settings: KafkaSettings,
    state: Arc<IngestState>,
    dlq_wake: Arc<Notify>,
    shutdown: watch::Receiver<bool>,
) {
    let n = writers.len();
    // One part may wait per writer while it writes another: memory stays
    // bounded, and the batches channel pushes back on the reader.
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..n).map(|_| mpsc::channel::<Batch>(1)).unzip();
    let dispatch = async {
        let senders = senders;
        let mut shutdown = shutdown.clone();
        let mut last_commit = Instant::now();
        'batches: loop {
            let commit_at = tokio::time::Instant::from_std(last_commit + settings.commit_interval());
            let batch = tokio::select! {
                b = batches.recv() => match b {
                    Some(b) => b,
                    None => break,
                },
                _ = tokio::time::sleep_until(commit_at) => {
                    consumer::commit(&**consumer, &state, &settings.topic, None, CommitMode::Async);
                    last_commit = Instant::now();
                    continue;
                }
                _ = shutdown.changed() => break,
            };
            for (part, to) in split(batch, n).into_iter().zip(&senders) {
                if part.messages.is_empty() {
                    continue;
                }
                tokio::select! {
                    sent = to.send(part) => if sent.is_err() {
                        break 'batches; // that writer stopped
                    },
                    _ = shutdown.changed() => break 'batches,
                }
            }
            if last_commit.elapsed() >= settings.commit_interval() {
                consumer::commit(&**consumer, &state, &settings.topic, None, CommitMode::Async);
                last_commit = Instant::now();
            }
        }
        // Dropping the senders lets each writer finish what it has and stop.
    };
    let write = |(mut writer, mut parts): (Writer, mpsc::Receiver<Batch>)| {
        let (consumer, settings, state, dlq_wake) = (&consumer, &settings, &state, &dlq_wake);
        let mut shutdown = shutdown.clone();
        async move {
            loop {
                let part = tokio::select! {
                    biased;
                    _ = shutdown.changed() => break,
                    part = parts.recv() => match part {
                        Some(p) => p,
                        None => break,
                    },
                };
                let Some(outcome) = write_until_committed(&mut writer, &part, state, shutdown.clone()).await else {
                    break; // shutdown while retrying
                };
                record(state, &outcome);
                for (p, offset) in &outcome.seek {
                    log::info!("partition {p}: skipping ahead to the stored position {offset}");
                    if let Err(e) = consumer.seek(&settings.topic, *p, rdkafka::Offset::Offset(*offset), Duration::ZERO)
                    {
                        log::debug!("seek failed (the messages will be read and skipped): {e}");
                    }
                }
                let rewinds = outcome.rewind.iter().map(|r| {
                    (
                        r,
                        "its log was reset (the stored position is beyond its \
                     end) and the consumer did not start at the new log's start",
                    )
                });
                let went_back = outcome.went_back.iter().map(|r| {
                    (
                        r,
                        "the stored position went back below what this \
                     instance had stored (a restored database, a failover, an operator's rewind)",
                    )
                });
                for r in &outcome.went_back {
                    // Health shows the position read again from, not the one lost.
                    state.reset_position(r.partition, r.to);
                }
                for (r, why) in rewinds.chain(went_back) {
                    log::warn!(
                        "Kafka partition {}/{}: {why}: reading it again from offset {}",
                        settings.topic,
                        r.partition,
                        r.to
                    );
                    // Nothing of the partition was applied: should the seek
                    // fail, its next batch asks for it again.
                    if let Err(e) =
                        consumer.seek(&settings.topic, r.partition, rdkafka::Offset::Offset(r.to), Duration::ZERO)
                    {
                        log::warn!("seek failed (asked again with the partition's next batch): {e}");
                    }
                }
                if outcome.fates.iter().any(|f| matches!(f, Fate::Dead(_))) {
                    dlq_wake.notify_one();
                }
            }
        }
    };
    let writing = futures_util::future::join_all(writers.into_iter().zip(receivers).map(write));
    tokio::join!(dispatch, writing);
    // Leave Kafka as current as PostgreSQL, so the next owner re-reads
    // little, then leave the group so it need not wait for a session timeout.
    let (c, s, topic) = (consumer.clone(), state.clone(), settings.topic.clone());
    consumer::off_runtime("the last Kafka commit", SHUTDOWN_STEP, move || {
        consumer::commit(&**c, &s, &topic, None, CommitMode::Sync);
    })
    .await;
    let deadline = Instant::now() + SHUTDOWN_STEP;
    let mut consumer = consumer;
    loop {
        // The reader stops on the same signal; it holds the other reference.
        match Arc::try_unwrap(consumer) {
            Ok(only) => return only.close(SHUTDOWN_STEP).await,
            Err(shared) if Instant::now() < deadline => {
                consumer = shared;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(_) => return, // dropped: SharedConsumer closes it off the runtime
        }
    }
}

fn record(state: &IngestState, outcome: &writer::Outcome) {
    state.batches.fetch_add(1, Ordering::Relaxed);
    state.written.fetch_add(outcome.written, Ordering::Relaxed);
    state.duplicates.fetch_add(outcome.count(|f| *f == Fate::Duplicate), Ordering::Relaxed);
    state.redelivered.fetch_add(outcome.count(|f| *f == Fate::Redelivered), Ordering::Relaxed);
    state.log_resets.fetch_add(outcome.resets.len() as u64, Ordering::Relaxed);
    let dead = outcome.count(|f| matches!(f, Fate::Dead(_)));
    state.dead_lettered.fetch_add(dead, Ordering::Relaxed);
    for f in &outcome.fates {
        if let Fate::Dead(r) = f {
            log::info!("dead letter ({}): {}", r.reason, r.detail);
        }
    }
    state.applied(&outcome.next_offsets);
    for r in &outcome.resets {
        log::error!(
            "Kafka partition {}/{}: the stored position {} is beyond the end of the partition's log ({}): the topic was \
             deleted and recreated, or its log was reset. Messages below the stored position are no longer taken for \
             redeliveries: the new log is applied from offset {} (log generation {}), and events whose event_id was \
             applied before are still skipped as duplicates",
            state.topic,
            r.partition,
            r.stale,
            r.log_end,
            r.first,
            r.generation
        );
        state.reset_position(r.partition, r.next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_keep_text_as_text_and_bytes_as_base64() {
        let v = headers_json(&[
            ("content-type".into(), Some(b"application/json".to_vec())),
            ("bin".into(), Some(vec![0xff, 0x00])),
            ("none".into(), None),
            ("nul".into(), Some(b"a\0b".to_vec())),
        ]);
        assert_eq!(v[3], json!({"key": "nul", "value_base64": "YQBi"}), "jsonb cannot hold NUL");
        assert_eq!(v[0], json!({"key": "content-type", "value": "application/json"}));
        assert_eq!(v[1], json!({"key": "bin", "value_base64": "/wA="}));
        assert_eq!(dlq::headers_from_json(&v)[1], ("bin".to_string(), Some(vec![0xff, 0x00])));
        assert_eq!(dlq::headers_from_json(&v)[2], ("none".to_string(), None));
    }

    #[test]
    fn a_messages_size_counts_its_key_value_and_headers() {
        let m = Message {
            partition: 0,
            offset: 0,
            key: Some(b"key".to_vec()),
            payload: Some(vec![0; 10]),
            headers: vec![("content-type".into(), Some(b"application/json".to_vec())), ("none".into(), None)],
            timestamp_ms: None,
            decoded: Err(event::Rejection::new(event::Reason::EmptyPayload, "")),
        };
        assert_eq!(m.size(), 3 + 10 + "content-type".len() + "application/json".len() + "none".len());
        let bare = Message { key: None, payload: None, headers: Vec::new(), ..m };
        assert_eq!(bare.size(), 0);
    }

    #[test]
    fn lag_counts_from_the_applied_position_once_known() {
        let mut p = PartitionState { high_watermark: Some(100), group_position: Some(10), ..Default::default() };
        assert_eq!(p.lag(), Some(90));
        p.applied = Some(95);
        assert_eq!(p.lag(), Some(5));
        p.high_watermark = None;
        assert_eq!(p.lag(), None);
    }

    #[tokio::test]
    async fn a_task_that_stops_before_shutdown_makes_the_ingest_unhealthy() {
        let settings = crate::config::Settings::for_database("postgres://localhost/x").kafka;
        let state = Arc::new(IngestState::running(&settings));
        let (stop, shutdown) = watch::channel(false);
        supervise("the reader", async { panic!("boom") }, &state, &shutdown).await.unwrap();
        let h = state.health();
        assert_eq!((h["state"].as_str(), h["healthy"].as_bool()), (Some("failed"), Some(false)), "{h}");
        assert_eq!(h["task_failure"], "the reader panicked: boom");
        supervise("the writer", async {}, &state, &shutdown).await.unwrap();
        assert_eq!(state.health()["task_failure"], "the reader panicked: boom", "the first one is kept");

        let calm = Arc::new(IngestState::running(&settings));
        stop.send(true).unwrap();
        supervise("the writer", async {}, &calm, &shutdown).await.unwrap();
        assert_eq!((calm.healthy(), &calm.health()["task_failure"]), (true, &Value::Null), "stopping is no failure");
    }

    #[test]
    fn health_is_disabled_without_brokers_and_degraded_while_writes_fail() {
        let off = IngestState::disabled();
        assert_eq!(off.health()["state"], "disabled");
        assert!(off.healthy());
        let settings = crate::config::Settings::for_database("postgres://localhost/x").kafka;
        let on = IngestState::running(&settings);
        assert_eq!(on.health()["state"], "running");
        on.failing_writers.store(1, Ordering::Relaxed);
        assert_eq!(on.health()["state"], "degraded");
        assert_eq!(on.health()["healthy"], false);
        let publishing = IngestState::running(&settings);
        *publishing.dlq_error.lock().unwrap() = Some("dead letters not delivered".into());
        assert_eq!(publishing.health()["state"], "degraded", "dead letters that cannot be published");
    }

    #[test]
    fn a_consumer_error_degrades_until_a_message_or_for_its_hold() {
        let settings = crate::config::Settings::for_database("postgres://localhost/x").kafka;
        let state = IngestState::running(&settings);
        state.consumer_error("TopicAuthorizationFailed".into());
        let h = state.health();
        assert_eq!((h["state"].as_str(), &h["consumer_failing"]), (Some("degraded"), &Value::Bool(true)), "{h}");
        state.consumer_reads();
        assert_eq!(state.health()["state"], "running", "a message arrived");
        state.consumer_error("TopicAuthorizationFailed".into());
        *state.consumer_error_at.lock().unwrap() = Instant::now().checked_sub(CONSUMER_ERROR_HOLD);
        assert_eq!(state.health()["state"], "running", "no error repeated within the hold");
    }

    #[test]
    fn the_writers_error_is_cleared_once_none_fails() {
        let settings = crate::config::Settings::for_database("postgres://localhost/x").kafka;
        let state = IngestState::running(&settings);
        state.failing_writers.store(1, Ordering::Relaxed);
        *state.last_error.lock().unwrap() = Some("connection refused".into());
        state.writers_recovered();
        assert_eq!(state.health()["last_error"], "connection refused", "a writer still fails");
        state.failing_writers.store(0, Ordering::Relaxed);
        state.writers_recovered();
        assert_eq!(state.health()["last_error"], Value::Null);
    }
}
