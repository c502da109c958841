//! Publishes dead letters to the dead-letter topic.
//!
//! The `dead_letters` table is the outbox: the writer records a rejected
//! message in the batch's transaction, and this task produces every row not
//! yet `published_at` to `KAFKA_DLQ_TOPIC` after the commit, then marks it.
//! A crash between producing and marking produces the row again once its
//! lease ran out (see `lease`), so the topic gets every dead letter at least
//! once (a consumer of the DLQ can deduplicate on the original
//! topic/partition/offset headers). A round
//! claims its rows with a lease (`claimed_until`, see `lease`) in a statement of
//! its own, so two instances do not publish the same row at the same time,
//! and no transaction stays open while the broker is waited for (that would
//! hold back vacuum in the whole database). Only rows of this ingest's own group and topic
//! are claimed: another deployment sharing the database (another group or
//! topic, another dead-letter topic) publishes its own.
//!
//! Each message carries the original key, value and headers, plus:
//! `dlq-reason` (a stable code, see `event::Reason`), `dlq-detail`,
//! `dlq-original-topic`, `dlq-original-partition`, `dlq-original-offset`,
//! `dlq-original-timestamp` (milliseconds since the epoch, when known),
//! `dlq-original-log-generation` (0, or how many times the partition's log
//! was found reset before: a recreated topic's offsets repeat the old ones),
//! `dlq-time` (RFC 3339) and `dlq-group`.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::stream::{FuturesUnordered, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer, PurgeConfig};
use tokio::sync::{watch, Notify};

use super::event::cap_detail;
use super::settings::KafkaSettings;
use super::IngestState;

/// Rows claimed per round, at most...
const CLAIM: i64 = 200;
/// ...and bytes of their messages (key, value, headers; the first row is
/// claimed whatever its size): a round holds its rows, its records and
/// librdkafka's copies at once, so 200 rows of 1 MB messages would hold
/// 600 MB.
const CLAIM_BYTES: i64 = 8 << 20;
/// How long a produce may wait for the broker before the round gives up: the
/// producer's default `message.timeout.ms` too.
const DELIVERY_TIMEOUT: Duration = crate::workflow::MESSAGE_TIMEOUT;
/// How long a round's claim on its rows lasts: three times the producer's
/// delivery timeout (`message.timeout.ms` or its other name
/// `delivery.timeout.ms`, 30 s unless the Kafka settings say otherwise) and
/// at least 90 s, past every produce the round makes (the original, then, if
/// that is refused for good, the bare one). A round that is not done by
/// `round_limit` stops waiting, drops what it still has queued and lets
/// those rows go. The rows of a publisher that died mid-round are claimed
/// again once its lease ran out.
pub fn lease(settings: &KafkaSettings) -> Duration {
    // 0 is librdkafka's "no limit": the round's own limit bounds it.
    let delivery = crate::workflow::message_timeout_ms(settings);
    delivery.map(Duration::from_millis).unwrap_or(DELIVERY_TIMEOUT).max(DELIVERY_TIMEOUT) * 3
}

/// How long a round waits for its produces: well inside its lease.
fn round_limit(lease: Duration) -> Duration {
    lease * 2 / 3
}
/// Rows left behind (a crash, another instance's failure) are found by this poll.
const POLL: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// ordercast's producer defaults and the pass-through properties, nothing forced.
pub fn producer_config(settings: &KafkaSettings, brokers: &str) -> anyhow::Result<ClientConfig> {
    crate::workflow::producer_config(settings, brokers, "ordercast-dlq", &[])
}

pub fn create_producer(settings: &KafkaSettings, brokers: &str) -> anyhow::Result<FutureProducer> {
    producer_config(settings, brokers)?
        .create()
        .map_err(|e| anyhow::anyhow!("invalid Kafka configuration for the dead-letter producer: {e}"))
}

/// Runs until shutdown; `wake` is notified after a batch with dead letters commits.
pub async fn run(
    url: String,
    producer: FutureProducer,
    settings: KafkaSettings,
    state: Arc<IngestState>,
    wake: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut backoff = Duration::from_millis(200);
    let topic = &settings.dlq_topic;
    let lease = lease(&settings);
    loop {
        match publish_pending(&url, &mut client, &producer, &settings, &state, lease, &mut shutdown).await {
            Ok(()) => {
                backoff = Duration::from_millis(200);
                *state.dlq_error.lock().unwrap() = None; // unwrap: never held across a panic
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(POLL) => {}
                    _ = shutdown.changed() => return,
                }
            }
            Err(e) => {
                if *shutdown.borrow() {
                    log::info!("publishing dead letters to {topic} stopped at shutdown: {e:#}");
                    return;
                }
                log::warn!("publishing dead letters to {topic} failed, will retry: {e:#}");
                *state.dlq_error.lock().unwrap() = Some(format!("{e:#}")); // unwrap: see above
                client = None;
                if crate::backoff::sleep(&mut backoff, BACKOFF_MAX, &mut shutdown).await {
                    return;
                }
            }
        }
    }
}

async fn publish_pending(
    url: &str,
    client: &mut Option<tokio_postgres::Client>,
    producer: &FutureProducer,
    settings: &KafkaSettings,
    state: &IngestState,
    lease: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (topic, group, source) = (settings.dlq_topic.as_str(), &settings.group_id, &settings.topic);
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        *client = Some(crate::db::connect_as(url, Some("ordercast-dlq")).await?);
    }
    let client = client.as_mut().expect("connected just above");
    loop {
        let mut rows = client
            .query(
                "UPDATE dead_letters d SET claimed_until = now() + make_interval(secs => $4) \
                 FROM (SELECT id FROM \
                         (SELECT id, size, sum(size) OVER (ORDER BY id) AS upto FROM \
                            (SELECT id, coalesce(octet_length(message_key), 0) + coalesce(octet_length(payload), 0) \
                                        + octet_length(headers::text) AS size \
                             FROM dead_letters \
                             WHERE published_at IS NULL AND group_id = $2 AND kafka_topic = $3 \
                               AND (claimed_until IS NULL OR claimed_until < now()) \
                             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) l) w \
                       WHERE upto - size < $5) c \
                 WHERE d.id = c.id \
                 RETURNING d.id, d.message_key, d.payload, d.headers, d.kafka_topic, d.kafka_partition, \
                           d.kafka_offset, d.message_timestamp, d.received_at, d.reason, d.detail, d.group_id, \
                           d.log_generation, d.claimed_until",
                &[&CLAIM, group, source, &lease.as_secs_f64(), &CLAIM_BYTES],
            )
            .await
            .map_err(crate::db::describe)
            .context("Failed to claim unpublished dead letters")?;
        if rows.is_empty() {
            refresh_pending(client, settings, state).await?;
            return Ok(());
        }
        rows.sort_by_key(|r| r.get::<_, i64>(0));
        let claim: DateTime<Utc> = rows[0].get(13);
        let sends = rows.iter().map(|r| async move {
            let letter = Letter::from_row(r);
            match producer.send(letter.record(topic, true), DELIVERY_TIMEOUT).await {
                Err((KafkaError::MessageProduction(code), _)) if permanent(code) => {
                    // The dead letter with its original key, value and
                    // headers can never be produced (too large for the
                    // dead-letter topic, say): it goes without them, saying
                    // so; the original stays in the dead_letters table.
                    log::warn!(
                        "dead letter {} (partition {}, offset {}) cannot be produced with its original message \
                         ({code}): producing it without its key, value and headers",
                        letter.id,
                        letter.meta[3].1,
                        letter.meta[4].1
                    );
                    let record = letter.record(topic, false);
                    producer.send(record, DELIVERY_TIMEOUT).await.map(|_| ()).map_err(|(e, _)| e)
                }
                other => other.map(|_| ()).map_err(|(e, _)| e),
            }
        });
        let (results, stopped) = await_round(producer, sends, round_limit(lease), shutdown).await;
        let claimed: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        let ids: Vec<i64> =
            rows.iter().zip(&results).filter(|(_, r)| matches!(r, Some(Ok(())))).map(|(row, _)| row.get(0)).collect();
        // The rows produced are published; the others are let go for the
        // next round. Not a row whose lease ran out and another instance
        // claimed meanwhile (its lease is not this one).
        let marked = client
            .query(
                "UPDATE dead_letters SET published_at = CASE WHEN id = ANY($1) THEN now() END, claimed_until = NULL \
                 WHERE id = ANY($2) AND claimed_until = $3 AND published_at IS NULL \
                 RETURNING published_at IS NOT NULL",
                &[&ids, &claimed, &claim],
            )
            .await
            .map_err(crate::db::describe)?;
        let published = marked.iter().filter(|r| r.get::<_, bool>(0)).count();
        state.dlq_published.fetch_add(published as u64, Ordering::Relaxed);
        refresh_pending(client, settings, state).await?;
        if let Some(why) = stopped {
            anyhow::bail!("a round of {} dead letters stopped ({} delivered): {why}", rows.len(), ids.len());
        }
        if let Some(Some(Err(e))) = results.iter().find(|r| matches!(r, Some(Err(_)))) {
            anyhow::bail!("{} of {} dead letters not delivered: {e}", rows.len() - ids.len(), rows.len());
        }
    }
}

/// Waits for a round's produces: each one's result (None: not known when
/// the round stopped), and why the round stopped before all were known.
/// Past `limit` (a delivery timeout of 0 waits forever), or at shutdown, the
/// round keeps what was delivered so far and the producer drops what it
/// still holds, so a row let go is not delivered late by this round as well
/// as by the next one.
async fn await_round<F: Future<Output = Result<(), KafkaError>>>(
    producer: &FutureProducer,
    sends: impl IntoIterator<Item = F>,
    limit: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> (Vec<Option<Result<(), KafkaError>>>, Option<&'static str>) {
    let mut pending: FuturesUnordered<_> =
        sends.into_iter().enumerate().map(|(i, send)| async move { (i, send.await) }).collect();
    let mut results: Vec<Option<Result<(), KafkaError>>> = (0..pending.len()).map(|_| None).collect();
    let limit = tokio::time::sleep(limit);
    tokio::pin!(limit);
    let stopped = loop {
        tokio::select! {
            biased;
            sent = pending.next() => match sent {
                Some((i, result)) => results[i] = Some(result),
                None => break None,
            },
            _ = &mut limit => break Some("its time ran out"),
            _ = shutdown.changed() => break Some("shutting down"),
        }
    };
    if stopped.is_some() {
        drop(pending);
        producer.purge(PurgeConfig::default().queue().inflight());
    }
    (results, stopped)
}

/// `dlq_pending`, counted after every round (not only once all is published).
async fn refresh_pending(
    client: &tokio_postgres::Client,
    settings: &KafkaSettings,
    state: &IngestState,
) -> anyhow::Result<()> {
    let pending: i64 = client
        .query_one(
            "SELECT count(*) FROM dead_letters WHERE published_at IS NULL AND group_id = $1 AND kafka_topic = $2",
            &[&settings.group_id, &settings.topic],
        )
        .await
        .map_err(crate::db::describe)?
        .get(0);
    state.dlq_pending.store(pending, Ordering::Relaxed);
    Ok(())
}

/// Produce errors that trying again cannot cure: the message itself is refused.
pub(crate) fn permanent(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidRecord
    )
}

/// A key longer than this is left out of a dead letter produced without its
/// original message.
const MAX_BARE_KEY: usize = 1024;

/// One row of `dead_letters`, ready to produce.
struct Letter {
    id: i64,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    original: Vec<(String, Option<Vec<u8>>)>,
    meta: [(&'static str, String); 9],
}

impl Letter {
    fn from_row(r: &tokio_postgres::Row) -> Letter {
        let stamp: Option<DateTime<Utc>> = r.get(7);
        let received: DateTime<Utc> = r.get(8);
        Letter {
            id: r.get(0),
            key: r.get(1),
            payload: r.get(2),
            original: headers_from_json(&r.get::<_, serde_json::Value>(3)),
            meta: [
                ("dlq-reason", r.get::<_, String>(9)),
                // Rows recorded before details were capped may be long.
                ("dlq-detail", cap_detail(r.get::<_, String>(10))),
                ("dlq-original-topic", r.get::<_, String>(4)),
                ("dlq-original-partition", r.get::<_, i32>(5).to_string()),
                ("dlq-original-offset", r.get::<_, i64>(6).to_string()),
                ("dlq-original-timestamp", stamp.map(|t| t.timestamp_millis().to_string()).unwrap_or_default()),
                ("dlq-original-log-generation", r.get::<_, i32>(12).to_string()),
                ("dlq-time", received.to_rfc3339_opts(SecondsFormat::Millis, true)),
                ("dlq-group", r.get::<_, String>(11)),
            ],
        }
    }

    /// The record to produce: with the original key, value and headers, or
    /// (`whole` false) without them and with a `dlq-omitted` header saying so
    /// (the key is kept when it is short).
    fn record<'a>(&'a self, topic: &'a str, whole: bool) -> FutureRecord<'a, Vec<u8>, Vec<u8>> {
        let mut headers = OwnedHeaders::new();
        if whole {
            for (k, v) in &self.original {
                headers = headers.insert(Header { key: k, value: v.as_deref() });
            }
        }
        for (k, v) in &self.meta {
            headers = headers.insert(Header { key: k, value: Some(v.as_bytes()) });
        }
        let key = self.key.as_ref().filter(|k| whole || k.len() <= MAX_BARE_KEY);
        if !whole {
            let omitted = format!(
                "the original message ({} bytes of key, {} of value, {} headers) could not be produced to the \
                 dead-letter topic; it is kept in the dead_letters table (id {}){}",
                self.key.as_ref().map_or(0, Vec::len),
                self.payload.as_ref().map_or(0, Vec::len),
                self.original.len(),
                self.id,
                if key.is_some() { ", key included" } else { "" }
            );
            headers = headers.insert(Header { key: "dlq-omitted", value: Some(omitted.as_bytes()) });
        }
        let mut record = FutureRecord::<Vec<u8>, Vec<u8>>::to(topic).headers(headers);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let (true, Some(p)) = (whole, &self.payload) {
            record = record.payload(p);
        }
        record
    }
}

/// The stored form of the original headers back into key/value pairs.
pub fn headers_from_json(v: &serde_json::Value) -> Vec<(String, Option<Vec<u8>>)> {
    let b64 = base64::engine::general_purpose::STANDARD;
    v.as_array()
        .map(|hs| {
            hs.iter()
                .filter_map(|h| {
                    let key = h["key"].as_str()?.to_string();
                    let value = match (&h["value"], h["value_base64"].as_str()) {
                        (serde_json::Value::String(s), _) => Some(s.clone().into_bytes()),
                        (_, Some(b)) => Some(b64.decode(b).ok()?),
                        _ => None,
                    };
                    Some((key, value))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    use rdkafka::mocking::MockCluster;

    const TOPIC: &str = "dead-letters";

    /// A producer that waits for the broker for ever (delivery timeout 0).
    fn patient_producer(cluster: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("message.timeout.ms", "0")
            .create()
            .unwrap()
    }

    async fn send(producer: &FutureProducer, partition: i32, payload: String) -> Result<(), KafkaError> {
        let record = FutureRecord::<str, str>::to(TOPIC).partition(partition).payload(&payload);
        producer.send(record, DELIVERY_TIMEOUT).await.map(|_| ()).map_err(|(e, _)| e)
    }

    /// With a delivery timeout of 0 and the broker away, a round's produces
    /// never end; once it stops waiting, what the producer still holds must
    /// not be delivered when the broker is back (the rows are let go and
    /// the next round produces them again).
    #[tokio::test]
    async fn a_round_that_stops_waiting_drops_what_the_producer_still_holds() {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::Message;
        use rdkafka::{Offset, TopicPartitionList};

        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic(TOPIC, 1, 1).unwrap();
        let producer = patient_producer(&cluster);
        cluster.broker_down(1).unwrap();
        let (_stop, mut shutdown) = watch::channel(false);
        let sends = (0..3).map(|i| send(&producer, 0, format!("letter {i}")));
        let (results, stopped) = await_round(&producer, sends, Duration::from_millis(500), &mut shutdown).await;
        assert_eq!(stopped, Some("its time ran out"));
        assert!(results.iter().all(Option::is_none), "nothing delivered while the broker is away");
        cluster.broker_up(1).unwrap();
        // Anything the round left queued would reach the partition before this.
        send(&producer, 0, "after".into()).await.unwrap();
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "dlq-round-test")
            .create()
            .unwrap();
        let mut partitions = TopicPartitionList::new();
        partitions.add_partition_offset(TOPIC, 0, Offset::Beginning).unwrap();
        consumer.assign(&partitions).unwrap();
        let read = tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            let mut read = Vec::new();
            while read.last().is_none_or(|last| last != "after") && std::time::Instant::now() < deadline {
                // (An error event, such as a connection being set up, is not a message.)
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                    read.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned());
                }
            }
            read
        })
        .await
        .unwrap();
        assert_eq!(read, ["after"], "the stopped round's messages were dropped");
    }

    /// A round stopped (here at shutdown) while some of its produces wait
    /// keeps the results of those delivered: their rows are marked
    /// published, not let go to be produced again.
    #[tokio::test]
    async fn a_round_that_stops_waiting_keeps_what_was_delivered() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic(TOPIC, 2, 1).unwrap();
        // Produces to partition 1 wait for a leader for ever.
        cluster.partition_leader(TOPIC, 1, None).unwrap();
        let producer = patient_producer(&cluster);
        let (stop, mut shutdown) = watch::channel(false);
        // Shutdown comes once both produces to partition 0 are delivered.
        let (delivered, mut deliveries) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            for _ in 0..2 {
                deliveries.recv().await;
            }
            let _ = stop.send(true);
        });
        let sends = [0, 1, 0].map(|partition| {
            let (producer, delivered) = (&producer, delivered.clone());
            async move {
                let sent = send(producer, partition, format!("to {partition}")).await;
                let _ = delivered.send(());
                sent
            }
        });
        let (results, stopped) = await_round(&producer, sends, Duration::from_secs(60), &mut shutdown).await;
        assert_eq!(stopped, Some("shutting down"));
        assert!(matches!(results[..], [Some(Ok(())), None, Some(Ok(()))]), "{results:?}");
    }

    #[test]
    fn a_rounds_lease_outlasts_the_producers_delivery_timeout_three_times() {
        let mut s = crate::config::Settings::for_database("postgres://localhost/x").kafka;
        assert_eq!(lease(&s), Duration::from_secs(90));
        s.properties = Some("message.timeout.ms=120000".into());
        assert_eq!(lease(&s), Duration::from_secs(360));
        s.properties = Some("delivery.timeout.ms=200000".into());
        assert_eq!(lease(&s), Duration::from_secs(600), "its other name");
        // Both names: one property for librdkafka, the one set later.
        s.properties = Some("delivery.timeout.ms=200000,message.timeout.ms=100000".into());
        assert_eq!(lease(&s), Duration::from_secs(300));
        s.properties = Some("message.timeout.ms=100000,delivery.timeout.ms=200000".into());
        let config = producer_config(&s, "").unwrap();
        assert_eq!(config.get("message.timeout.ms"), Some("200000"));
        assert_eq!(config.get("delivery.timeout.ms"), None);
        assert_eq!(lease(&s), Duration::from_secs(600));
        // Shorter, or 0 (librdkafka's "no limit"): never below the default's.
        s.properties = Some("message.timeout.ms=0".into());
        assert_eq!(lease(&s), Duration::from_secs(90));
    }
}
