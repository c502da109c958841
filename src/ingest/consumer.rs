//! The Kafka side: the consumer (a group member reading `KAFKA_TOPIC`), the
//! reader loop that turns messages into bounded batches, and the courtesy
//! commits of the stored position back to Kafka.
//!
//! An assigned partition starts at the position PostgreSQL stored for it,
//! not at Kafka's committed offset: that one is only a courtesy copy, and may
//! be missing (never committed before a crash, expired after a long stop:
//! `auto.offset.reset` would then decide) or ahead (a database restored from
//! a backup). Only partitions PostgreSQL has never seen start where Kafka says.
//! A partition whose stored position cannot be read at assignment (the
//! database down) is paused until it can (`settle`), so it never starts
//! where Kafka says instead, past messages PostgreSQL does not have.
//!
//! Memory stays bounded: a batch holds at most `batch_max` messages and
//! `batch_max_bytes` payload bytes, at most one more batch waits in the
//! channel, and librdkafka's prefetch queue is capped. When the database is
//! slow the writer takes longer, the channel stays full, the reader stops
//! polling and librdkafka stops fetching: the database sets the pace.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::Message as _;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use tokio::sync::{mpsc, watch};

use super::event;
use super::settings::KafkaSettings;
use super::{Batch, IngestState, Message};

/// librdkafka's prefetch queue (one queue for the whole consumer); its default (64 MiB) would
/// let a stalled database pin a lot of memory.
const QUEUED_MAX_KBYTES: &str = "16384";

pub type IngestConsumer = StreamConsumer<IngestContext>;

/// The consumer, shared by the reader and the writer. Closing a consumer
/// (leaving the group) blocks until the broker answers, or for a long time
/// when it does not; so the last owner never closes it on a runtime thread:
/// `close` does it on a thread of its own with a time limit, and a plain drop
/// hands it to a detached thread.
pub struct SharedConsumer(Option<IngestConsumer>);

impl SharedConsumer {
    pub fn new(consumer: IngestConsumer) -> Arc<SharedConsumer> {
        Arc::new(SharedConsumer(Some(consumer)))
    }

    /// Leaves the group (so its partitions move on at once), waiting at most `limit`.
    pub async fn close(mut self, limit: Duration) {
        if let Some(c) = self.0.take() {
            off_runtime("closing the Kafka consumer", limit, move || drop(c)).await;
        }
    }
}

impl std::ops::Deref for SharedConsumer {
    type Target = IngestConsumer;
    fn deref(&self) -> &IngestConsumer {
        self.0.as_ref().expect("only close() takes the consumer, and it consumes self")
    }
}

impl Drop for SharedConsumer {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            let _ = std::thread::Builder::new().name("kafka-close".into()).spawn(move || drop(c));
        }
    }
}

/// How long asking the broker where a partition's log starts and ends may take.
const LOG_ENDS_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks the broker where a partition's log starts and ends, through the
/// ingest's consumer (so with its isolation level: under the default
/// `read_committed` the end is the last stable offset, the most the consumer
/// can have read). One ListOffsets round trip to the partition's leader; the
/// writer asks only when a batch holds messages below the stored position.
#[derive(Clone)]
pub struct LogEnds {
    consumer: std::sync::Weak<SharedConsumer>,
    topic: String,
}

impl LogEnds {
    pub fn new(consumer: &Arc<SharedConsumer>, topic: &str) -> LogEnds {
        LogEnds { consumer: Arc::downgrade(consumer), topic: topic.to_string() }
    }

    /// One whose consumer is gone (its queries fail), for tests of what is
    /// decided from answers already given.
    #[cfg(test)]
    pub fn detached(topic: &str) -> LogEnds {
        LogEnds { consumer: std::sync::Weak::new(), topic: topic.to_string() }
    }

    /// (log start, log end) of `partition`, fresh from the broker.
    pub async fn query(&self, partition: i32) -> anyhow::Result<(i64, i64)> {
        let consumer = self.consumer.upgrade().ok_or_else(|| anyhow::anyhow!("the Kafka consumer is closed"))?;
        let topic = self.topic.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        // Not spawn_blocking: see off_runtime. The call ends by its own timeout.
        std::thread::Builder::new().name("kafka-watermarks".into()).spawn(move || {
            let _ = tx.send(consumer.fetch_watermarks(&topic, partition, LOG_ENDS_TIMEOUT));
        })?;
        let ends = tokio::time::timeout(LOG_ENDS_TIMEOUT + Duration::from_secs(1), rx)
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {LOG_ENDS_TIMEOUT:?}"))?
            .map_err(|_| anyhow::anyhow!("the query was dropped"))?;
        ends.map_err(|e| anyhow::anyhow!("{e}"))
            .map_err(|e| e.context(format!("Failed to ask Kafka where partition {partition} of {} ends", self.topic)))
    }
}

/// Runs blocking librdkafka work on a thread of its own and waits at most
/// `limit` (spawn_blocking would make the runtime's shutdown wait for it).
pub async fn off_runtime(what: &str, limit: Duration, f: impl FnOnce() + Send + 'static) {
    let (done, finished) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name("kafka-blocking".into()).spawn(move || {
        f();
        let _ = done.send(());
    });
    if spawned.is_ok() && tokio::time::timeout(limit, finished).await.is_err() {
        log::warn!("{what} did not finish within {limit:?}; leaving it behind");
    }
}

/// Callbacks from librdkafka: statistics (high watermarks for lag), errors
/// (broker reachability for health), rebalances (hand partitions over with
/// their position committed), commit results.
pub struct IngestContext {
    pub state: Arc<IngestState>,
    pub topic: String,
    pub group_id: String,
    /// Where the positions are (`kafka_offsets`).
    pub database_url: String,
    /// Partitions whose stored positions could not be read at assignment,
    /// from `pre_rebalance` (where they are found) to `post_rebalance`
    /// (where they are paused once assigned).
    to_pause: std::sync::Mutex<Vec<i32>>,
    /// Held while partitions are paused at assignment and by `settle` while
    /// it starts paused ones (see `IngestContext::pause`).
    rebalance: std::sync::Mutex<()>,
    /// Partitions this consumer paused and has not resumed since: librdkafka
    /// keeps a pause across a revoke and a new assignment, and a resume of a
    /// partition that is not paused is not harmless (see `post_rebalance`).
    paused: std::sync::Mutex<std::collections::HashSet<i32>>,
}

/// A partition's stored position, as read at its assignment.
#[derive(Debug, Clone, Copy)]
pub struct StoredStart {
    pub next: i64,
    pub generation: i32,
}

/// How long an assignment may wait for the stored positions.
const POSITIONS_TIMEOUT: Duration = Duration::from_secs(10);

/// The positions PostgreSQL holds for `partitions` of the group's topic.
/// Blocking (the rebalance callback is synchronous): the query runs on a
/// thread of its own, with its own connection, and is waited for at most
/// `POSITIONS_TIMEOUT`.
fn stored_positions(ctx: &IngestContext, partitions: &[i32]) -> anyhow::Result<HashMap<i32, StoredStart>> {
    stored_positions_at(&ctx.database_url, &ctx.group_id, &ctx.topic, partitions)
}

/// `stored_positions` for a group and topic of the database at `url`.
///
/// PostgreSQL gives the read up itself past `POSITIONS_TIMEOUT` (its lock
/// and statement timeouts): a read stuck behind a lock on `kafka_offsets`
/// (a `VACUUM FULL`, an `ALTER TABLE`) would otherwise keep its backend
/// waiting after ordercast stopped waiting for it, and the retries of
/// paused partitions (every 5-8 s) would pile up one such connection each
/// until `max_connections` ran out, for the REST API and the writers too.
pub fn stored_positions_at(
    url: &str,
    group: &str,
    topic: &str,
    partitions: &[i32],
) -> anyhow::Result<HashMap<i32, StoredStart>> {
    let (url, group, topic, partitions) = (url.to_string(), group.to_string(), topic.to_string(), partitions.to_vec());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new().name("kafka-positions".into()).spawn(move || {
        let query = async {
            let mut config = crate::db::pg_config(&url)?;
            config.application_name("ordercast-ingest").connect_timeout(POSITIONS_TIMEOUT);
            let (client, connection) = config.connect(crate::db::tls(&url)?).await.map_err(crate::db::describe)?;
            tokio::spawn(connection);
            let ms = POSITIONS_TIMEOUT.as_millis();
            client
                .batch_execute(&format!("SET lock_timeout = {ms}; SET statement_timeout = {ms}"))
                .await
                .map_err(crate::db::describe)?;
            let rows = client
                .query(
                    "SELECT kafka_partition, next_offset, log_generation FROM kafka_offsets \
                     WHERE group_id = $1 AND kafka_topic = $2 AND kafka_partition = ANY($3) AND next_offset IS NOT NULL",
                    &[&group, &topic, &partitions],
                )
                .await
                .map_err(crate::db::describe)?;
            anyhow::Ok(rows.iter().map(|r| (r.get(0), StoredStart { next: r.get(1), generation: r.get(2) })).collect())
        };
        let answer = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("a runtime for the query")
            .and_then(|rt| rt.block_on(query));
        let _ = tx.send(answer);
    })?;
    rx.recv_timeout(POSITIONS_TIMEOUT + Duration::from_secs(1)).context("no answer from PostgreSQL")?
}

impl ClientContext for IngestContext {
    fn stats(&self, stats: Statistics) {
        if stats.brokers.values().any(|b| b.state == "UP") {
            self.state.set_brokers_up(true);
        }
        if let Some(t) = stats.topics.get(&self.topic) {
            let mut parts = self.state.partitions.lock().unwrap(); // unwrap: never held across a panic
            for (id, p) in &t.partitions {
                if *id < 0 {
                    continue; // librdkafka's internal "unassigned" partition
                }
                if let Some(entry) = parts.get_mut(id) {
                    if p.hi_offset >= 0 {
                        entry.high_watermark = Some(p.hi_offset);
                    }
                    // Before this instance applies anything, lag counts from
                    // where the group is (or from the oldest message).
                    entry.group_position = [p.committed_offset, p.lo_offset].into_iter().find(|o| *o >= 0);
                }
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::AllBrokersDown)) {
            self.state.set_brokers_up(false);
        }
        log::warn!("Kafka: {error}: {reason}");
        self.state.set_kafka_error(format!("{error}: {reason}"));
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                log::error!("librdkafka {fac}: {message}")
            }
            RDKafkaLogLevel::Warning => log::warn!("librdkafka {fac}: {message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => log::info!("librdkafka {fac}: {message}"),
            RDKafkaLogLevel::Debug => log::debug!("librdkafka {fac}: {message}"),
        }
    }
}

impl IngestContext {
    /// Sets the assigned partitions' start offsets to the positions stored
    /// in PostgreSQL, within `POSITIONS_TIMEOUT` for the stored positions and
    /// as much again for all the log ends; a partition not settled in time
    /// is paused once assigned (`to_pause`), and started by `settle`.
    fn start_at_stored_positions(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let mut elements = tpl.elements_for_topic(&self.topic);
        let partitions: Vec<i32> = elements.iter().map(|e| e.partition()).collect();
        let stored = match stored_positions(self, &partitions) {
            Ok(stored) => stored,
            Err(e) => {
                log::warn!(
                    "Kafka partitions {} {partitions:?} are paused until the positions stored in PostgreSQL can \
                     be read: {e:#}",
                    self.topic
                );
                self.state.set_kafka_error(format!("stored positions not read at assignment: {e:#}"));
                self.to_pause.lock().unwrap().extend(partitions); // unwrap: never held across a panic
                return;
            }
        };
        let deadline = std::time::Instant::now() + POSITIONS_TIMEOUT;
        for e in &mut elements {
            let p = e.partition();
            let Some(&StoredStart { next, generation }) = stored.get(&p) else { continue };
            // A position beyond the log's end belongs to an older log (a
            // recreated topic): Kafka's offset or `auto.offset.reset` decides,
            // and the writer finds the reset (some brokers would otherwise
            // wait at the position instead of answering "out of range").
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let at = match consumer.fetch_watermarks(&self.topic, p, left) {
                Ok((_, end)) if next > end => continue,
                Ok((start, end)) => log_start_past(&self.topic, p, next, (start, end)),
                Err(err) => {
                    log::warn!(
                        "Kafka partition {}/{p} is paused until its log's end can be read to check the stored \
                         position {next}: {err}",
                        self.topic
                    );
                    self.state.set_kafka_error(format!("partition {p}'s log end not read at assignment: {err}"));
                    self.to_pause.lock().unwrap().push(p); // unwrap: never held across a panic
                    continue;
                }
            };
            match e.set_offset(Offset::Offset(at)) {
                Ok(()) => self.state.starts.note(p, generation, next),
                Err(err) => log::warn!("Kafka partition {}/{p}: cannot start at {at}: {err}", self.topic),
            }
        }
    }

    /// Pauses newly assigned partitions whose stored positions could not be
    /// read, for `settle` to start. At once: librdkafka drops what it may
    /// have fetched for them before (a pause bumps a partition's version).
    /// Under the rebalance lock, so that `settle`, while it starts a
    /// partition of an earlier assignment, never resumes one paused here
    /// after its check (it waits; a resume before this pause is undone by
    /// it, and the reader, polling in this callback, received nothing in
    /// between).
    fn pause(&self, consumer: &BaseConsumer<Self>, partitions: &[i32]) {
        let pause = || {
            let _settling = self.rebalance.lock().unwrap_or_else(|e| e.into_inner());
            let mut paused = TopicPartitionList::new();
            for p in partitions {
                paused.add_partition(&self.topic, *p);
            }
            match consumer.pause(&paused) {
                Ok(()) => {
                    self.paused.lock().unwrap().extend(partitions); // unwrap: never held across a panic
                    self.state.set_awaiting_position(partitions, true)
                }
                Err(e) => log::error!(
                    "Kafka partitions {} {partitions:?} could not be paused ({e}): they start at Kafka's committed \
                     offsets, and the messages between their stored positions and those are not applied",
                    self.topic
                ),
            }
        };
        // `settle` may hold the lock for a seek.
        blocking(pause)
    }

    /// Notes partitions resumed (no longer paused by this consumer).
    fn resumed(&self, partitions: &[i32]) {
        let mut paused = self.paused.lock().unwrap(); // unwrap: never held across a panic
        for p in partitions {
            paused.remove(p);
        }
    }
}

/// Runs blocking work from a rebalance callback, which runs inside the
/// consumer's poll on a runtime worker: on a multi-threaded runtime, that
/// worker's other tasks are handed to another meanwhile.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl ConsumerContext for IngestContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // Start each partition at its stored position (see the module's
            // comment): the list is assigned as set here. The callback runs
            // inside the consumer's poll, on a runtime worker: the blocking
            // questions below hand that worker's other tasks to another.
            // Partitions not settled here are paused in `post_rebalance`.
            self.to_pause.lock().unwrap().clear(); // unwrap: never held across a panic
            blocking(|| self.start_at_stored_positions(consumer, tpl));
        }
        if let Rebalance::Revoke(tpl) = rebalance {
            let revoked: Vec<i32> =
                tpl.elements().iter().filter(|e| e.topic() == self.topic).map(|e| e.partition()).collect();
            // The next owner starts from Kafka's committed offset: bring it
            // up to date so it re-reads (and skips) as little as possible.
            // Async: a sync commit here would stall the consumer for as long
            // as the coordinator does not answer.
            commit(consumer, &self.state, &self.topic, Some(&revoked), CommitMode::Async);
            self.state.set_assigned(&revoked, false);
            log::info!("Kafka partitions revoked: {} {:?}", self.topic, revoked);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let assigned: Vec<i32> =
                    tpl.elements().iter().filter(|e| e.topic() == self.topic).map(|e| e.partition()).collect();
                self.state.set_assigned(&assigned, true);
                log::info!("Kafka partitions assigned: {} {:?}", self.topic, assigned);
                let to_pause = std::mem::take(&mut *self.to_pause.lock().unwrap()); // unwrap: never held across a panic

                // librdkafka keeps a partition's pause across a revoke and a
                // new assignment: only a resume clears it. One paused at an
                // earlier assignment (its position unreadable then), taken
                // away before it was resumed and given back now, would never
                // be read again, while nothing waits for it any more.
                //
                // Only such partitions are resumed: a resume bumps the
                // partition's version in librdkafka even when it is not
                // paused, which drops the messages already fetched for it
                // without fetching them again. Resuming every assigned
                // partition lost the first fetch of one whose fetch had begun
                // before the resume was handled (a loaded machine), and the
                // messages after that fetch were applied past the gap.
                let mut resume = TopicPartitionList::new();
                let mut resumed = Vec::new();
                {
                    let paused = self.paused.lock().unwrap(); // unwrap: never held across a panic
                    for p in assigned.iter().filter(|p| paused.contains(p) && !to_pause.contains(p)) {
                        resume.add_partition(&self.topic, *p);
                        resumed.push(*p);
                    }
                }
                if resume.count() > 0 {
                    match consumer.resume(&resume) {
                        Ok(()) => self.resumed(&resumed),
                        Err(e) => {
                            log::error!("Kafka partitions {} {resumed:?} could not be resumed: {e}", self.topic);
                            self.state.set_kafka_error(format!("partitions could not be resumed at assignment: {e}"));
                        }
                    }
                }
                if !to_pause.is_empty() {
                    self.pause(consumer, &to_pause);
                }
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => {
                log::warn!("Kafka rebalance failed: {e}");
                self.state.set_kafka_error(format!("rebalance failed: {e}"));
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            // Harmless for correctness (PostgreSQL holds the position); the
            // next commit carries the same offsets again.
            log::debug!("Kafka offset commit failed: {e}");
            let failed: Vec<i32> = offsets.elements().iter().map(|e| e.partition()).collect();
            self.state.forget_committed(&failed);
        }
    }
}

/// The client configuration: ordercast's defaults, then the pass-through
/// properties (which win), then the two settings exactly-once relies on.
pub fn consumer_config(settings: &KafkaSettings, brokers: &str) -> Result<ClientConfig, String> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", &settings.group_id)
        .set("client.id", "ordercast")
        // A partition with no committed offset starts at the oldest retained
        // message, so events produced before the first start are not skipped.
        .set("auto.offset.reset", "earliest")
        .set("queued.max.messages.kbytes", QUEUED_MAX_KBYTES)
        .set("statistics.interval.ms", "1000");
    for (k, v) in settings.librdkafka_properties()? {
        config.set(k, v);
    }
    for (k, forced) in [("enable.auto.commit", "false"), ("enable.auto.offset.store", "false")] {
        if config.get(k).is_some_and(|v| v != forced) {
            log::warn!("ignoring Kafka property {k}: the ingest commits its own positions");
        }
        config.set(k, forced);
    }
    Ok(config)
}

/// Builds the consumer and subscribes it.
pub fn create(
    settings: &KafkaSettings,
    brokers: &str,
    database_url: &str,
    state: Arc<IngestState>,
) -> anyhow::Result<IngestConsumer> {
    let config = consumer_config(settings, brokers).map_err(|e| anyhow::anyhow!(e))?;
    let context = IngestContext {
        state,
        topic: settings.topic.clone(),
        group_id: settings.group_id.clone(),
        database_url: database_url.to_string(),
        to_pause: Default::default(),
        rebalance: Default::default(),
        paused: Default::default(),
    };
    let consumer: IngestConsumer =
        config.create_with_context(context).map_err(|e| anyhow::anyhow!("invalid Kafka configuration: {e}"))?;
    consumer
        .subscribe(&[&settings.topic])
        .map_err(|e| anyhow::anyhow!("Failed to subscribe to {}: {e}", settings.topic))?;
    Ok(consumer)
}

/// Where a partition whose stored position is `next` starts, its log
/// starting at `start` and ending at `end`: there, or at the log's start
/// when the broker has deleted the messages from `next` on (retention ran
/// while the ingest was stopped), said as an error: they cannot be applied.
/// Explicitly, not by `auto.offset.reset`: with `latest` it skipped the
/// messages the log still holds too. The partition is noted as started at
/// `next` (its stored position), so the writer takes the gap as the log's,
/// not as a database that went back. A log said to be empty is not taken
/// at its word (the answer to one of librdkafka's two queries can stand for
/// both, see the writer's `ask_log_ends`): Kafka's reset decides then, as
/// before.
fn log_start_past(topic: &str, p: i32, next: i64, (start, end): (i64, i64)) -> i64 {
    if next >= start || start >= end {
        return next;
    }
    log::error!(
        "Kafka partition {topic}/{p}: the messages from the stored position {next} to {start} were deleted by the \
         broker (its retention) before they were applied; they are lost: the partition starts at its log's start \
         {start}"
    );
    start
}

/// How long a seek to a stored position may wait for librdkafka.
const SEEK_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts the partitions paused at assignment because their stored positions
/// could not be read then (`IngestContext::start_at_stored_positions`): reads
/// them again, with backoff, until it can, then seeks each partition to its
/// stored position (checked against the log's end, as at assignment) and
/// resumes it. Nothing of a paused partition is read meanwhile, so no
/// message between its stored position and Kafka's committed offset (ahead
/// of the database after a restore from a backup, or missing, with
/// `auto.offset.reset=latest`) is skipped. The database is unreachable
/// meanwhile in the common case, so nothing could have been written anyway.
pub async fn settle(consumer: std::sync::Weak<SharedConsumer>, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = super::BACKOFF_MIN;
    loop {
        let Some(c) = consumer.upgrade() else { return }; // closed at shutdown
        let waiting = c.context().state.awaiting_positions();
        if waiting.is_empty() {
            drop(c);
            backoff = super::BACKOFF_MIN;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                _ = shutdown.changed() => return,
            }
        }
        let started = tokio::select! {
            started = start_waiting(c, waiting) => started,
            _ = shutdown.changed() => return,
        };
        if let Err(e) = started {
            log::warn!("Kafka partitions waiting for their stored positions: {e:#} (retrying with backoff)");
        }
        if crate::backoff::sleep(&mut backoff, super::BACKOFF_MAX, &mut shutdown).await {
            return;
        }
    }
}

/// One round of `settle`, blocking, on a thread of its own (not
/// spawn_blocking: see `off_runtime`).
async fn start_waiting(consumer: Arc<SharedConsumer>, waiting: Vec<i32>) -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name("kafka-settle".into()).spawn(move || {
        let started = stored_positions(consumer.context(), &waiting)
            .and_then(|stored| seek_and_resume(&consumer, &waiting, &stored));
        let _ = tx.send(started);
    })?;
    rx.await.map_err(|_| anyhow::anyhow!("the settling was dropped"))?
}

/// Seeks each partition that still waits to its stored position (none for a
/// partition PostgreSQL has never seen, or whose position is beyond its
/// log's end: Kafka's offset decides, as at assignment) and resumes it.
/// Blocking; under the rebalance lock.
fn seek_and_resume(
    consumer: &SharedConsumer,
    waiting: &[i32],
    stored: &HashMap<i32, StoredStart>,
) -> anyhow::Result<()> {
    let ctx = consumer.context();
    let _settling = ctx.rebalance.lock().unwrap_or_else(|e| e.into_inner());
    let still = ctx.state.awaiting_positions();
    let mut failed = Vec::new();
    for &p in waiting.iter().filter(|p| still.contains(p)) {
        let at = match stored.get(&p) {
            None => "Kafka's committed offset (PostgreSQL has no position for it)".to_string(),
            Some(&StoredStart { next, generation }) => match consumer.fetch_watermarks(&ctx.topic, p, LOG_ENDS_TIMEOUT)
            {
                Ok((_, end)) if next > end => {
                    format!("Kafka's committed offset (the stored position {next} is beyond the log's end {end})")
                }
                Ok((start, end)) => {
                    let at = log_start_past(&ctx.topic, p, next, (start, end));
                    match consumer.seek(&ctx.topic, p, Offset::Offset(at), SEEK_TIMEOUT) {
                        Ok(()) => {
                            ctx.state.starts.note(p, generation, next);
                            format!("{} {at}", if at == next { "its stored position" } else { "its log's start" })
                        }
                        Err(e) => {
                            failed.push(format!("partition {p}: cannot seek to {at}: {e}"));
                            continue;
                        }
                    }
                }
                Err(e) => {
                    failed.push(format!("partition {p}: its log's end could not be read: {e}"));
                    continue;
                }
            },
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&ctx.topic, p);
        if let Err(e) = consumer.resume(&tpl) {
            failed.push(format!("partition {p}: cannot resume: {e}"));
            continue;
        }
        ctx.resumed(&[p]);
        ctx.state.set_awaiting_position(&[p], false);
        log::info!("Kafka partition {}/{p} resumed at {at}", ctx.topic);
    }
    anyhow::ensure!(failed.is_empty(), "{}", failed.join("; "));
    Ok(())
}

/// Commits the positions applied to PostgreSQL that Kafka does not have yet,
/// for the partitions this member owns (all of them, or `only`).
pub fn commit<C: Consumer<X>, X: ConsumerContext>(
    consumer: &C,
    state: &IngestState,
    topic: &str,
    only: Option<&[i32]>,
    mode: CommitMode,
) {
    let due = state.commit_due(only);
    if due.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (p, offset) in &due {
        if tpl.add_partition_offset(topic, *p, Offset::Offset(*offset)).is_err() {
            return;
        }
    }
    match consumer.commit(&tpl, mode) {
        Ok(()) => state.mark_committed(&due),
        Err(e) => log::debug!("Kafka offset commit not sent: {e}"),
    }
}

/// Reads messages into batches and hands them to the writer, until shutdown.
pub async fn read(
    consumer: Arc<SharedConsumer>,
    settings: KafkaSettings,
    state: Arc<IngestState>,
    batches: mpsc::Sender<Batch>,
    mut shutdown: watch::Receiver<bool>,
) {
    let max = settings.batch_max.max(1);
    let max_bytes = settings.batch_max_bytes.max(1);
    let mut batch: Vec<Message> = Vec::with_capacity(max.min(10_000));
    let mut bytes = 0usize;
    let mut linger_until: Option<tokio::time::Instant> = None;
    let mut lingered = false;
    loop {
        let full = batch.len() >= max || bytes >= max_bytes;
        let ready = !batch.is_empty() && (full || lingered);
        tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            permit = batches.reserve(), if ready => {
                let Ok(permit) = permit else { return }; // the writer stopped
                permit.send(Batch { messages: std::mem::take(&mut batch) });
                bytes = 0;
                linger_until = None;
                lingered = false;
            }
            received = consumer.recv(), if !full => match received {
                Ok(m) => {
                    state.consumed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    state.set_brokers_up(true);
                    state.consumer_reads();
                    let msg = to_message(&m, &settings);
                    bytes += msg.size();
                    batch.push(msg);
                    if linger_until.is_none() {
                        linger_until = Some(tokio::time::Instant::now() + settings.batch_wait());
                    }
                }
                Err(e) => {
                    // Partition EOFs are off; what arrives here is worth a
                    // line (unknown topic, authorization) but never fatal.
                    log::warn!("Kafka consumer: {e}");
                    state.consumer_error(e.to_string());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = tokio::time::sleep_until(linger_until.unwrap_or_else(tokio::time::Instant::now)), if linger_until.is_some() && !lingered => {
                lingered = true;
            }
        }
    }
}

/// Copies what the writer needs out of librdkafka's buffer and decodes it.
fn to_message(m: &rdkafka::message::BorrowedMessage<'_>, settings: &KafkaSettings) -> Message {
    let headers = headers_of(m);
    let content_type =
        headers.iter().rev().find(|(k, _)| k.eq_ignore_ascii_case("content-type")).and_then(|(_, v)| v.as_deref());
    let payload = m.payload().map(<[u8]>::to_vec);
    let key = m.key().map(<[u8]>::to_vec);
    let decoded = event::format_of(content_type, settings.default_format)
        .and_then(|format| event::decode(payload.as_deref(), key.as_deref(), format));
    Message {
        partition: m.partition(),
        offset: m.offset(),
        key,
        payload,
        headers,
        timestamp_ms: m.timestamp().to_millis(),
        decoded,
    }
}

/// The message's headers, in order. Not through rdkafka's `Headers`: it
/// panics on a key that is not UTF-8 (`to_str().unwrap()`), which a producer
/// can send and which would kill the reader. A key is converted lossily
/// (U+FFFD for invalid bytes); values stay bytes.
fn headers_of(m: &rdkafka::message::BorrowedMessage<'_>) -> Vec<(String, Option<Vec<u8>>)> {
    use rdkafka::bindings as rd;
    use rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR as NO_ERROR;
    let mut hdrs: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `m.ptr()` is a valid message while `m` lives; the headers
    // object it returns belongs to the message and is only read here.
    if unsafe { rd::rd_kafka_message_headers(m.ptr(), &mut hdrs) } != NO_ERROR || hdrs.is_null() {
        return Vec::new(); // none (NOENT), or none that can be parsed
    }
    let count = unsafe { rd::rd_kafka_header_cnt(hdrs) };
    let mut headers = Vec::with_capacity(count);
    for i in 0..count {
        let (mut name, mut value, mut size) = (std::ptr::null(), std::ptr::null(), 0usize);
        // SAFETY: `i` < the count; the pointers stay valid while the message does.
        if unsafe { rd::rd_kafka_header_get_all(hdrs, i, &mut name, &mut value, &mut size) } != NO_ERROR
            || name.is_null()
        {
            continue;
        }
        // SAFETY: librdkafka NUL-terminates names; `value` holds `size` bytes (or is NULL).
        let key = String::from_utf8_lossy(unsafe { std::ffi::CStr::from_ptr(name) }.to_bytes()).into_owned();
        let value =
            (!value.is_null()).then(|| unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) }.to_vec());
        headers.push((key, value));
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::settings::env_properties;

    #[test]
    fn a_stored_position_the_broker_deleted_starts_at_the_logs_start() {
        assert_eq!(log_start_past("orders", 0, 500, (1_000, 2_000)), 1_000, "deleted by retention");
        assert_eq!(log_start_past("orders", 0, 1_000, (1_000, 2_000)), 1_000);
        assert_eq!(log_start_past("orders", 0, 1_500, (1_000, 2_000)), 1_500, "still in the log");
        assert_eq!(log_start_past("orders", 0, 500, (2_000, 2_000)), 500, "an empty log is not trusted");
    }

    fn settings() -> KafkaSettings {
        crate::config::Settings::for_database("postgres://localhost/x").kafka
    }

    #[test]
    fn pass_through_properties_win_except_the_commit_settings() {
        let mut s = settings();
        s.env_properties = env_properties([
            ("ORDERCAST_KAFKA_AUTO_OFFSET_RESET".to_string(), "latest".to_string()),
            ("ORDERCAST_KAFKA_ENABLE_AUTO_COMMIT".to_string(), "true".to_string()),
        ]);
        s.properties = Some("session.timeout.ms=7000,auto.offset.reset=smallest".into());
        let c = consumer_config(&s, "127.0.0.1:9").unwrap();
        assert_eq!(c.get("auto.offset.reset"), Some("smallest"), "KAFKA_PROPERTIES comes last");
        assert_eq!(c.get("session.timeout.ms"), Some("7000"));
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        assert_eq!(c.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(c.get("group.id"), Some("ordercast"));
    }

    /// TLS and SCRAM need librdkafka built with OpenSSL; without it creating
    /// the client fails with "OpenSSL not available at build time".
    #[test]
    fn this_librdkafka_build_accepts_tls_and_sasl_scram() {
        let mut s = settings();
        s.properties =
            Some("security.protocol=sasl_ssl,sasl.mechanisms=SCRAM-SHA-512,sasl.username=u,sasl.password=p".into());
        let features = ClientConfig::new().create_native_config().unwrap().get("builtin.features").unwrap();
        for f in ["ssl", "sasl_plain", "sasl_scram"] {
            assert!(features.split(',').any(|x| x == f), "librdkafka lacks {f}: {features}");
        }
        let consumer: BaseConsumer =
            consumer_config(&s, "127.0.0.1:9").unwrap().create().expect("TLS + SCRAM consumer");
        drop(consumer);
        let producer: rdkafka::producer::BaseProducer =
            super::super::dlq::producer_config(&s, "127.0.0.1:9").unwrap().create().expect("TLS + SCRAM producer");
        drop(producer);
    }
}
