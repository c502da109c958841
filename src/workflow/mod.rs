//! The event-driven workflow around the change log: what ordercast does with
//! orders besides showing them.
//!
//! - `outbox`: publishes every committed change (REST, Kafka, psql alike) to a
//!   Kafka topic, in commit order, at least once, from its own stored position
//!   in the change log — a transactional outbox whose table is the change log.
//! - `processor`: drives `pending` orders through payment and inventory
//!   (`steps`), compensating the steps already done when one fails; every step
//!   is recorded, so redelivery and restarts neither repeat nor lose one.
//! - `simulator`: realistic random order events to the ingest topic
//!   (`ordercast produce`).
//! - `demo`: everything on one machine (`ordercast demo`): an embedded
//!   Kafka-protocol broker, the simulator, the ingest, the processor, the relay.

pub mod demo;
pub mod outbox;
pub mod processor;
pub mod settings;
pub mod simulator;
pub mod steps;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_postgres::AsyncMessage;

pub use settings::WorkflowSettings;

use crate::config::Settings;

/// What `/api/health` shows about the workflow.
#[derive(Debug, Default)]
pub struct WorkflowState {
    pub outbox: Arc<outbox::OutboxState>,
    pub processor: Arc<processor::ProcessorState>,
}

impl WorkflowState {
    /// The `workflow` object of `/api/health`. `head` is the newest change-log
    /// position the server knows, for the relay's lag.
    pub fn health(&self, head: i64) -> Value {
        json!({"outbox": self.outbox.health(head), "processor": self.processor.health()})
    }

    /// The relay's and the processor's series for `/metrics`, each part
    /// while it runs in this process. `head` as for `health`. A relay that
    /// falls behind shows as `ordercast_outbox_lag` growing while
    /// `ordercast_outbox_position` stands still, before retention prunes
    /// what it has not published (counted in `ordercast_outbox_skipped_total`).
    pub fn metrics(&self, out: &mut String, head: i64) {
        use crate::metrics::sample;
        use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
        let counters = |out: &mut String, part: &str, list: &[(&str, &str, &AtomicU64)]| {
            for (name, help, v) in list {
                sample(out, &format!("ordercast_{part}_{name}_total"), "counter", help, v.load(Relaxed));
            }
        };
        let o = &self.outbox;
        if o.enabled.load(Relaxed) {
            let active = o.active.load(Relaxed);
            let position = o.position.load(Relaxed);
            sample(
                out,
                "ordercast_outbox_active",
                "gauge",
                "1 while this instance holds the outbox relay lock.",
                active as u8,
            );
            sample(out, "ordercast_outbox_position", "gauge", "Change-log position acknowledged by Kafka.", position);
            if active {
                let lag = (head - position).max(0);
                sample(
                    out,
                    "ordercast_outbox_lag",
                    "gauge",
                    "Positions committed but not yet acknowledged by Kafka.",
                    lag,
                );
            }
            counters(
                out,
                "outbox",
                &[
                    ("published", "Changes published to Kafka.", &o.published),
                    ("batches", "Batches acknowledged by Kafka.", &o.batches),
                    ("retries", "Batches retried after a failure.", &o.retries),
                    ("skipped", "Changes pruned from the log before they were published.", &o.skipped),
                    ("rewinds", "Rewind messages sent.", &o.rewinds),
                ],
            );
        }
        let p = &self.processor;
        if p.enabled.load(Relaxed) {
            sample(
                out,
                "ordercast_processor_connected",
                "gauge",
                "1 while the processor has its connection.",
                p.connected.load(Relaxed) as u8,
            );
            sample(
                out,
                "ordercast_processor_in_flight",
                "gauge",
                "Orders being processed now.",
                p.in_flight.load(Relaxed),
            );
            counters(
                out,
                "processor",
                &[
                    ("claimed", "New orders taken.", &p.claimed),
                    ("resumed", "Orders taken over (their processor gone) or taken up again.", &p.resumed),
                    ("processed", "Orders processed.", &p.processed),
                    ("failed", "Orders failed (a step refused or given up).", &p.failed),
                    ("cancelled", "Orders found cancelled and undone.", &p.cancelled),
                    ("compensations", "Steps undone.", &p.compensations),
                    (
                        "compensations_failed",
                        "Compensations refused for good (left for a person).",
                        &p.compensations_failed,
                    ),
                    ("retries", "Orders sent back to retry (a step unavailable).", &p.retries),
                ],
            );
        }
    }
}

/// The running workflow: its state and its tasks (which stop when `shutdown` flips).
pub struct Workflow {
    pub state: Arc<WorkflowState>,
    pub tasks: Vec<JoinHandle<()>>,
}

/// Checks the workflow's settings, and the outbox relay's librdkafka
/// settings without connecting, so a wrong one stops the start before
/// anything runs.
pub fn check_config(settings: &Settings) -> anyhow::Result<()> {
    let wf = &settings.workflow;
    wf.validate()?;
    if let Some(brokers) = settings.kafka.brokers.as_deref().filter(|_| settings.kafka.enabled()) {
        if wf.outbox_enabled() {
            outbox::check_producer(&settings.kafka, brokers)?;
        }
    }
    Ok(())
}

/// Starts what the settings ask for: the outbox relay when Kafka is
/// configured and the topic is not empty, the processor with `--process`.
pub fn start(settings: &Settings, database_url: &str, shutdown: watch::Receiver<bool>) -> anyhow::Result<Workflow> {
    // Its settings were checked before the migrations (`check_config`).
    let wf = &settings.workflow;
    let state = Arc::new(WorkflowState::default());
    let mut tasks = Vec::new();
    match settings.kafka.brokers.as_deref().filter(|_| settings.kafka.enabled()) {
        Some(brokers) if wf.outbox_enabled() => {
            let producer = outbox::producer(&settings.kafka, brokers)?;
            state.outbox.start(&wf.outbox_topic);
            log::info!("outbox relay: every change to orders goes to Kafka topic {} at {brokers}", wf.outbox_topic);
            tasks.push(tokio::spawn(outbox::run(
                database_url.to_string(),
                settings.kafka.clone(),
                brokers.to_string(),
                producer,
                wf.outbox_topic.clone(),
                wf.outbox_batch,
                state.outbox.clone(),
                shutdown.clone(),
            )));
        }
        Some(_) => log::info!("outbox relay is off: ORDERCAST_OUTBOX_TOPIC is empty"),
        None => log::info!("outbox relay is off: KAFKA_BROKERS is not set"),
    }
    if wf.process {
        let processor =
            processor::Processor::new(database_url, steps::simulated(wf), wf.concurrency, state.processor.clone())?;
        tasks.push(tokio::spawn(processor.run(shutdown)));
    }
    Ok(Workflow { state, tasks })
}

/// A connection of its own (not pooled), listening to the change log's
/// doorbell: the relay and the processor wake when something commits, and
/// the processor's advisory locks live exactly as long as this session.
pub struct Dedicated {
    pub client: tokio_postgres::Client,
    doorbell: Arc<Notify>,
    /// Set (and notified) when the connection ends, with the reason.
    closed: Arc<(Notify, std::sync::Mutex<Option<String>>)>,
}

impl Dedicated {
    pub async fn open(url: &str, application_name: &str) -> anyhow::Result<Dedicated> {
        let mut config = crate::db::pg_config(url)?;
        config.application_name(application_name);
        let (client, mut connection) = config
            .connect(crate::db::tls(url)?)
            .await
            .map_err(crate::db::describe)
            .context("Failed to connect to PostgreSQL")?;
        let doorbell = Arc::new(Notify::new());
        let closed = Arc::new((Notify::new(), std::sync::Mutex::new(None)));
        let (ring, close) = (doorbell.clone(), closed.clone());
        // Ends by itself when the client is dropped.
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            let reason = loop {
                match messages.next().await {
                    Some(Ok(AsyncMessage::Notification(_))) => ring.notify_one(),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break e.to_string(),
                    None => break "connection closed".to_string(),
                }
            };
            *close.1.lock().unwrap() = Some(reason); // unwrap: never held across a panic
            close.0.notify_one();
        });
        // The session's own statements (the processor's claims and scans,
        // the relay's reads) are written for READ COMMITTED, and one that
        // fails ends the session and everything it holds: the processor's
        // orders in flight are dropped and called again. So a database or
        // role default of REPEATABLE READ (a claim's SKIP LOCKED then fails
        // with a serialization error) or of a lock or statement timeout
        // (a scan behind a DBA's lock), see `HELD_SESSION`, does not apply
        // here: such a statement waits, as the orders' own work goes on in
        // the pool.
        client
            .batch_execute(&format!(
                "SET default_transaction_isolation = 'read committed'; {}; {}; LISTEN {}",
                crate::db::SESSION_KEEPALIVES,
                crate::db::HELD_SESSION,
                crate::changes::listener::CHANNEL
            ))
            .await
            .map_err(crate::db::describe)
            .context("LISTEN failed")?;
        Ok(Dedicated { client, doorbell, closed })
    }

    /// Returns when a change commits or after `idle` (a missed doorbell costs
    /// at most that long); fails when the connection is gone.
    pub async fn wait(&self, idle: Duration) -> anyhow::Result<()> {
        let gone = || self.closed.1.lock().unwrap().clone(); // unwrap: never held across a panic
        if let Some(reason) = gone() {
            anyhow::bail!("the database connection closed: {reason}");
        }
        tokio::select! {
            _ = self.doorbell.notified() => Ok(()),
            _ = tokio::time::sleep(idle) => Ok(()),
            _ = self.closed.0.notified() => {
                anyhow::bail!("the database connection closed: {}", gone().unwrap_or_default())
            }
        }
    }
}

/// How long librdkafka tries to deliver a message (`message.timeout.ms`)
/// unless the Kafka settings say otherwise.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// The delivery timeout (`message.timeout.ms`, or its other name
/// `delivery.timeout.ms`) the Kafka settings give producers, in ms; 0 is
/// librdkafka's "no limit". `None`: not set, `MESSAGE_TIMEOUT` applies.
pub fn message_timeout_ms(kafka: &crate::ingest::KafkaSettings) -> Option<u64> {
    producer_ms(kafka, "message.timeout.ms")
}

/// A time in ms (`key`) the Kafka settings give producers; `None`: not set.
pub fn producer_ms(kafka: &crate::ingest::KafkaSettings, key: &str) -> Option<u64> {
    producer_config(kafka, "", "", &[]).ok()?.get(key)?.parse().ok()
}

/// A producer with ordercast's defaults, then the pass-through properties of
/// the Kafka settings (TLS, SASL, ...), then `forced`, which the caller's
/// guarantees depend on.
pub fn producer_config(
    kafka: &crate::ingest::KafkaSettings,
    brokers: &str,
    client_id: &str,
    forced: &[(&str, &str)],
) -> anyhow::Result<ClientConfig> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("client.id", client_id)
        .set("message.timeout.ms", MESSAGE_TIMEOUT.as_millis().to_string());
    for (k, v) in kafka.librdkafka_properties().map_err(|e| anyhow::anyhow!(e))? {
        // One name for the delivery timeout: librdkafka takes both, and
        // with both in the (unordered) map which one it applied last would
        // depend on the process. Set later wins, as for every property.
        let k = if k == "delivery.timeout.ms" { "message.timeout.ms".to_string() } else { k };
        config.set(k, v);
    }
    for (k, v) in forced {
        if config.get(k).is_some_and(|set| set != *v) {
            log::warn!("ignoring Kafka property {k} for {client_id}: it must be {v}");
        }
        config.set(*k, *v);
    }
    Ok(config)
}

/// Hands a record to librdkafka, waiting while its queue is full (that is the
/// back-pressure: the broker sets the pace). The future resolves on the ack.
pub async fn enqueue(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, str, [u8]>,
) -> Result<DeliveryFuture, KafkaError> {
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}
