//! `ordercast demo`: the whole flow on one machine, with no external services.
//!
//! An embedded Kafka-protocol broker (librdkafka's mock cluster: real Kafka
//! wire protocol on 127.0.0.1, data in memory) carries the simulator's order
//! events to the ingest and the outbox relay's changes out; the processor
//! moves the orders along; the embedded PostgreSQL (started by `main` when
//! DATABASE_URL is unset) holds them; the dashboard shows it all.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::simulator::{self, ProduceArgs, Progress};
use crate::config::Settings;

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Orders per second the built-in simulator sends.
    #[arg(long = "demo-rate", default_value_t = 10.0)]
    pub rate: f64,

    /// Share of the simulator's messages that are deliberately invalid (they
    /// show up as dead letters).
    #[arg(long = "demo-invalid-ratio", default_value_t = 0.02)]
    pub invalid_ratio: f64,
}

/// Partitions of the demo's order and change topics.
const PARTITIONS: i32 = 3;

/// The demo's broker and simulator; the server itself runs as `serve` does.
pub struct Demo {
    /// Kept alive for as long as the demo runs: dropping it stops the broker.
    _cluster: MockCluster<'static, DefaultProducerContext>,
    simulator: JoinHandle<()>,
    stop: watch::Sender<bool>,
}

impl Demo {
    /// Starts the broker and the simulator, and points `settings` at them:
    /// Kafka ingest, outbox relay and processor on.
    pub fn start(args: &DemoArgs, settings: &mut Settings) -> anyhow::Result<Demo> {
        let cluster = MockCluster::new(1).context("Failed to start the embedded Kafka broker")?;
        let brokers = cluster.bootstrap_servers();
        let kafka = &mut settings.kafka;
        for (topic, partitions) in [
            (kafka.topic.as_str(), PARTITIONS),
            (kafka.dlq_topic.as_str(), 1),
            (settings.workflow.outbox_topic.as_str(), PARTITIONS),
        ] {
            if !topic.trim().is_empty() {
                cluster
                    .create_topic(topic, partitions, 1)
                    .with_context(|| format!("Failed to create topic {topic}"))?;
            }
        }
        if kafka.brokers.as_deref().is_some_and(|b| b != brokers) {
            log::info!("demo: using its own embedded Kafka broker instead of KAFKA_BROKERS");
        }
        kafka.brokers = Some(brokers.clone());
        settings.workflow.process = true;
        log::info!(
            "demo: embedded Kafka-protocol broker (rdkafka mock cluster, in memory) at {brokers}; topics {} (orders in), \
             {} (dead letters), {} (every change out)",
            kafka.topic,
            kafka.dlq_topic,
            settings.workflow.outbox_topic
        );
        log::info!(
            "demo: send an order yourself: echo '{{\"event_id\":\"'$(cat /proc/sys/kernel/random/uuid)'\",\"type\":\"order_created\",\
             \"order\":{{\"external_id\":\"kcat-1\",\"customer_name\":\"Ada\",\"product\":\"Gear\",\"quantity\":2,\"unit_price\":9.5}},\
             \"occurred_at\":\"'$(date -u +%FT%TZ)'\"}}' | kcat -P -b {brokers} -t {} -k kcat-1",
            kafka.topic
        );
        log::info!(
            "demo: watch the changes: kcat -C -b {brokers} -t {} -f '%k %h %s\\n'",
            settings.workflow.outbox_topic
        );
        let producer = simulator::producer(&settings.kafka, &brokers)?;
        let produce =
            ProduceArgs { rate: args.rate, count: 0, invalid_ratio: args.invalid_ratio, avro: false, seed: None };
        let topic = settings.kafka.topic.clone();
        let (stop, shutdown) = watch::channel(false);
        let simulator = tokio::spawn(async move {
            let progress = Progress::Log(Duration::from_secs(30));
            match simulator::run(&producer, &topic, &produce, progress, shutdown).await {
                Ok(r) => log::info!("demo: the simulator sent {} orders ({} invalid)", r.sent, r.invalid),
                Err(e) => log::error!("demo: the simulator stopped: {e:#}"),
            }
        });
        Ok(Demo { _cluster: cluster, simulator, stop })
    }

    /// Stops the simulator (letting its last messages be acknowledged), then
    /// the broker.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let mut simulator = self.simulator;
        if tokio::time::timeout(Duration::from_secs(5), &mut simulator).await.is_err() {
            simulator.abort();
        }
    }
}
