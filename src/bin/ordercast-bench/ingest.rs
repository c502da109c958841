//! The Kafka ingest, measured through a Kafka-protocol broker: librdkafka's
//! mock cluster, started in this process (its brokers listen on 127.0.0.1),
//! so the scenario needs nothing installed.
//!
//! 1. Throughput: `ORDERS` `order_created` events are produced before the
//!    server starts; orders per second = orders written / (last - first
//!    write seen), from the server's `ordercast_kafka_written_total`, with
//!    the exactly-once path on (positions and event ids committed with the
//!    rows).
//! 2. End to end: one WebSocket client subscribes; `RATE` events per second
//!    are produced for `--duration`, each carrying its produce time in the
//!    customer name; produce -> WebSocket receive per order.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::clients::now_us;
use crate::scenarios::{percentiles, Figures};
use crate::server::Server;

const TOPIC: &str = "orders";
const PARTITIONS: i32 = 32;

pub struct Broker {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl Broker {
    pub fn start() -> anyhow::Result<Broker> {
        let cluster = MockCluster::new(1).context("start librdkafka's mock cluster")?;
        cluster.create_topic(TOPIC, PARTITIONS, 1).context("create the orders topic")?;
        cluster.create_topic("orders-dlq", 1, 1).context("create the dead-letter topic")?;
        Ok(Broker { cluster })
    }

    /// Environment for the server: the ingest on this broker, the outbox
    /// relay off (it would publish every change back to Kafka on the same
    /// two cores; this measures the ingest).
    pub fn server_env(&self) -> Vec<(String, String)> {
        [
            ("KAFKA_BROKERS", self.cluster.bootstrap_servers()),
            ("KAFKA_TOPIC", TOPIC.to_string()),
            ("KAFKA_DLQ_TOPIC", "orders-dlq".to_string()),
            ("KAFKA_GROUP_ID", "ordercast-bench".to_string()),
            ("ORDERCAST_OUTBOX_TOPIC", String::new()),
            // The mock broker answers a fetch only when `fetch.wait.max.ms`
            // (librdkafka's default: 500 ms) has passed, even with data
            // waiting, where Kafka answers once `fetch.min.bytes` (1) is
            // there: without this the end-to-end figure would be the mock's
            // timer, not ordercast.
            ("KAFKA_PROPERTIES", "fetch.wait.max.ms=10".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn producer(&self) -> anyhow::Result<FutureProducer> {
        ClientConfig::new()
            .set("bootstrap.servers", self.cluster.bootstrap_servers())
            .set("queue.buffering.max.messages", "2000000")
            .set("linger.ms", "5")
            .create()
            .context("create a producer")
    }

    /// Produces `n` `order_created` events (ids `prefix-0..n`) as fast as
    /// the producer takes them and waits until all are acknowledged.
    pub async fn produce_created(&self, prefix: &str, n: usize) -> anyhow::Result<()> {
        let producer = self.producer()?;
        let mut pending = Vec::new();
        for i in 0..n {
            let id = format!("{prefix}-{i}");
            let payload = created(&id, "Bench Customer").to_string();
            let record = FutureRecord::to(TOPIC).key(&id).payload(&payload);
            pending.push(producer.send_result(record).map_err(|(e, _)| e).context("enqueue")?);
            if pending.len() >= 50_000 {
                acknowledged(std::mem::take(&mut pending)).await?;
            }
        }
        acknowledged(pending).await
    }
}

async fn acknowledged(pending: Vec<rdkafka::producer::DeliveryFuture>) -> anyhow::Result<()> {
    for d in futures_util::future::join_all(pending).await {
        d.context("producer dropped")?.map_err(|(e, _)| e).context("delivery failed")?;
    }
    Ok(())
}

fn created(external_id: &str, customer: &str) -> Value {
    json!({
        "event_id": uuid::Uuid::new_v4(),
        "type": "order_created",
        "order": {"external_id": external_id, "customer_name": customer, "product": "Widget", "quantity": 2, "unit_price": 9.5},
        "occurred_at": chrono::Utc::now().to_rfc3339(),
    })
}

async fn count_orders(db: &tokio_postgres::Client) -> anyhow::Result<i64> {
    Ok(db.query_one("SELECT count(*) FROM orders", &[]).await.map_err(ordercast::db::describe)?.get(0))
}

/// `ordercast_kafka_written_total` from the server's `/metrics`.
async fn written(server: &Server) -> anyhow::Result<i64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect((server.host.as_str(), server.port)).await?;
    // The server's own address as Host: without tokens it answers only
    // requests addressed to a loopback name or address.
    let request =
        format!("GET /metrics HTTP/1.1\r\nHost: {}:{}\r\nConnection: close\r\n\r\n", server.host, server.port);
    tcp.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    text.lines()
        .find_map(|l| l.strip_prefix("ordercast_kafka_written_total "))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no ordercast_kafka_written_total in /metrics: {}", text.lines().next().unwrap_or("")))
}

/// Runs both measurements; `orders` were produced before the server started.
pub async fn ingest(
    server: &Server,
    db_url: &str,
    broker: &Broker,
    orders: usize,
    rate: f64,
    duration: Duration,
) -> anyhow::Result<Figures> {
    let db = ordercast::db::connect(db_url).await?;
    let mut f = Figures::new();

    // 1. Throughput of the backlog, from the server's own counter (polling
    // `count(*)` would compete with the writes it measures).
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut first: Option<(Instant, i64)> = None;
    let mut last = (Instant::now(), 0);
    loop {
        let n = written(server).await?;
        let now = Instant::now();
        if n > 0 && first.is_none() {
            first = Some((now, n));
        }
        if n > last.1 {
            last = (now, n);
        }
        if n as usize >= orders {
            break;
        }
        if now > deadline {
            bail!("only {n} of {orders} orders written after 300 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::ensure!(count_orders(&db).await? as usize == orders, "the orders table does not hold every order");
    let (t0, n0) = first.context("no order written")?;
    let secs = last.0.duration_since(t0).as_secs_f64();
    f.insert("orders".into(), json!(orders));
    // A backlog small enough to land between two polls has no rate.
    let rate_written = (secs > 0.0).then(|| ((last.1 - n0) as f64 / secs).round());
    f.insert("ingest_orders_per_s".into(), json!(rate_written));
    let dead: i64 =
        db.query_one("SELECT count(*) FROM dead_letters", &[]).await.map_err(ordercast::db::describe)?.get(0);
    f.insert("dead_letters".into(), json!(dead));

    // 2. Produce -> WebSocket push, one client, `rate` events/s.
    let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url("/ws")).await.context("WebSocket handshake")?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) if t.contains(r#""type":"ready""#) => break,
            Ok(Some(Ok(_))) => {}
            other => bail!("no ready message: {other:?}"),
        }
    }
    let total = ((rate * duration.as_secs_f64()).ceil() as usize).max(1);
    let producer = broker.producer()?;
    // Each event is checked off by its external id: one seen twice is a
    // duplicate, one never seen is lost (a count alone would let one make
    // up for the other).
    let reader = tokio::spawn(async move {
        let mut latencies: Vec<u32> = Vec::with_capacity(total);
        let (mut seen, mut duplicates) = (vec![false; total], 0u64);
        let deadline = tokio::time::Instant::now() + duration + Duration::from_secs(30);
        while latencies.len() < total {
            let msg = match tokio::time::timeout_at(deadline, ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => t,
                Ok(Some(Ok(Message::Close(c)))) => bail!("closed by the server: {c:?}"),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(e))) => bail!("WebSocket: {e}"),
                Ok(None) => bail!("the WebSocket closed"),
                Err(_) => break,
            };
            let received = now_us();
            let v: Value = serde_json::from_str(&msg)?;
            if v["type"] != "change" || v["op"] != "insert" {
                continue;
            }
            let event = v["order"]["external_id"].as_str().and_then(|x| x.strip_prefix("e2e-")?.parse::<usize>().ok());
            let produced =
                v["order"]["customer_name"].as_str().and_then(|c| c.strip_prefix("e2e ")?.parse::<i64>().ok());
            let (Some(i), Some(produced)) = (event.filter(|i| *i < total), produced) else { continue };
            if std::mem::replace(&mut seen[i], true) {
                duplicates += 1;
                continue;
            }
            latencies.push((received - produced).clamp(0, u32::MAX as i64) as u32);
        }
        let _ = ws.close(None).await;
        anyhow::Ok((latencies, duplicates))
    });
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let started = tokio::time::Instant::now();
    let mut pending = Vec::with_capacity(total);
    for i in 0..total {
        tokio::time::sleep_until(started + interval.mul_f64(i as f64)).await;
        let id = format!("e2e-{i}");
        let payload = created(&id, &format!("e2e {}", now_us())).to_string();
        let record = FutureRecord::to(TOPIC).key(&id).payload(&payload);
        pending.push(producer.send_result(record).map_err(|(e, _)| e).context("enqueue")?);
    }
    acknowledged(pending).await?;
    let (mut latencies, duplicates) = reader.await??;
    f.insert("e2e_rate_per_s".into(), json!(rate));
    f.insert("e2e_events".into(), json!(total));
    f.insert("lost".into(), json!(total - latencies.len()));
    f.insert("duplicates".into(), json!(duplicates));
    percentiles(&mut f, &mut latencies);
    Ok(f)
}
