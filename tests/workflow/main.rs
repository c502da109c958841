//! Workflow tests: the outbox relay, the processor, the simulator and the
//! one-command demo, against a fresh database each and rdkafka's mock cluster
//! (a real Kafka-protocol broker inside the test process, on 127.0.0.1).

#[allow(dead_code)]
#[path = "../api/helpers.rs"]
mod helpers;

mod demo;
mod outbox;
mod processor;

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use uuid::Uuid;

pub const WAIT: Duration = Duration::from_secs(30);

/// A broker with this test's own topics.
pub struct Kafka {
    pub cluster: MockCluster<'static, DefaultProducerContext>,
    /// The ingest topic, its dead-letter topic and the outbox topic.
    pub orders: String,
    pub dlq: String,
    pub changes: String,
    pub group: String,
}

pub const PARTITIONS: i32 = 3;

impl Kafka {
    pub fn start() -> Kafka {
        let cluster = MockCluster::new(1).expect("start the rdkafka mock cluster");
        let id = Uuid::new_v4().simple().to_string();
        let k = Kafka {
            cluster,
            orders: format!("orders-{id}"),
            dlq: format!("orders-dlq-{id}"),
            changes: format!("order-changes-{id}"),
            group: format!("ordercast-{id}"),
        };
        for (topic, partitions) in [(&k.orders, PARTITIONS), (&k.dlq, 1), (&k.changes, PARTITIONS)] {
            k.cluster.create_topic(topic, partitions, 1).expect("create a mock topic");
        }
        k
    }

    pub fn bootstrap(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// Points an ordercast instance at this broker.
    pub fn configure(&self, s: &mut ordercast::config::Settings) {
        s.kafka.brokers = Some(self.bootstrap());
        s.kafka.topic = self.orders.clone();
        s.kafka.dlq_topic = self.dlq.clone();
        s.kafka.group_id = self.group.clone();
        s.workflow.outbox_topic = self.changes.clone();
    }

    /// A plain producer to this broker.
    pub fn producer(&self) -> rdkafka::producer::FutureProducer {
        ClientConfig::new().set("bootstrap.servers", self.bootstrap()).create().expect("create a test producer")
    }

    /// A reader of every partition of `topic` from its beginning.
    pub fn reader(&self, topic: &str) -> Reader {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("group.id", format!("reader-{}", Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .create()
            .expect("create a test consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
        }
        consumer.assign(&tpl).unwrap();
        Reader { consumer: std::sync::Arc::new(consumer) }
    }
}

pub struct Reader {
    consumer: std::sync::Arc<BaseConsumer>,
}

impl Reader {
    /// Reads until `done` says the messages so far are enough; panics after `wait`.
    pub async fn read_until(
        &self,
        wait: Duration,
        done: impl Fn(&[OwnedMessage]) -> bool + Send + 'static,
    ) -> Vec<OwnedMessage> {
        let consumer = self.consumer.clone();
        tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + wait;
            let mut out = Vec::new();
            while !done(&out) {
                assert!(std::time::Instant::now() < deadline, "only {} messages after {wait:?}", out.len());
                // Errors (a broker down) are passing: the consumer retries.
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                    out.push(m.detach());
                }
            }
            out
        })
        .await
        .unwrap()
    }

    /// Everything that arrives within `wait`.
    pub async fn drain(&self, wait: Duration) -> Vec<OwnedMessage> {
        let consumer = self.consumer.clone();
        tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + wait;
            let mut out = Vec::new();
            while std::time::Instant::now() < deadline {
                // Errors (a broker down) are passing: the consumer retries.
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                    out.push(m.detach());
                }
            }
            out
        })
        .await
        .unwrap()
    }
}

pub fn header(m: &OwnedMessage, key: &str) -> Option<String> {
    m.headers()?.iter().find(|h| h.key == key).and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).into_owned())
}

pub fn key(m: &OwnedMessage) -> String {
    String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned()
}

pub fn payload(m: &OwnedMessage) -> serde_json::Value {
    serde_json::from_slice(m.payload().expect("a payload")).expect("a JSON payload")
}

/// The value of a one-value query.
pub async fn scalar<T: for<'a> tokio_postgres::types::FromSql<'a>>(db: &tokio_postgres::Client, sql: &str) -> T {
    db.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e:?}")).get(0)
}

/// The value of the series `name` (no labels) in the app's `/metrics`.
pub async fn metric(app: &helpers::TestApp, name: &str) -> Option<f64> {
    let text = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Waits until the count `sql` returns satisfies `done`.
pub async fn until(db: &tokio_postgres::Client, sql: &str, done: impl Fn(i64) -> bool) {
    helpers::until_count(db, sql, WAIT, done).await
}
