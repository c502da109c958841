//! Ingest throughput with the exactly-once path on (issue 5 asks for at
//! least 30,000 orders/s into PostgreSQL). Ignored by default: it measures,
//! it does not check behaviour. Run with
//! `cargo test --release --test ingest -- --ignored --nocapture throughput`
//! (ORDERCAST_THROUGHPUT_ORDERS sets the number of orders, default 200,000;
//! the ingest settings come from the environment as usual, e.g.
//! ORDERCAST_INGEST_WRITERS).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::kafka::{count, created, names, spawn_ingest, status_changed, Broker, Mock};

/// Produces every event without waiting for each delivery.
async fn produce_all(broker: &dyn Broker, topic: &str, events: impl Iterator<Item = serde_json::Value>) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("queue.buffering.max.messages", "2000000")
        .set("linger.ms", "20")
        .create()
        .unwrap();
    let mut pending = Vec::new();
    for e in events {
        let key = e["order"]["external_id"].as_str().unwrap().to_string();
        let payload = e.to_string();
        let record = FutureRecord::to(topic).key(&key).payload(&payload);
        pending.push(producer.send_result(record).map_err(|(e, _)| e).expect("enqueue"));
        if pending.len() >= 50_000 {
            for d in join_all(pending.drain(..)).await {
                d.unwrap().map_err(|(e, _)| e).expect("delivered");
            }
        }
    }
    for d in join_all(pending).await {
        d.unwrap().map_err(|(e, _)| e).expect("delivered");
    }
}

async fn measure(label: &str, orders: usize, events_per_order: usize) {
    let broker = Mock::start();
    // The mock cluster keeps about 5 MB per partition and drops older
    // segments: enough partitions that nothing produced is dropped unread.
    let n = names(&broker, 32);
    let total_events = orders * events_per_order;
    let events = (0..orders).flat_map(|i| {
        let id = format!("tp-{i}");
        let mut v = vec![created(&id)];
        if events_per_order > 1 {
            v.push(status_changed(&id, "processing"));
        }
        v
    });
    produce_all(&broker, &n.topic, events).await;

    // The outbox relay (workflow) would publish every change back to Kafka
    // on the same two cores: this measures the ingest alone.
    let app = spawn_ingest(&broker, &n, |s| s.workflow.outbox_topic.clear()).await;
    let ingest = app.state.ingest.clone();
    let deadline = Instant::now() + Duration::from_secs(600);
    // The clock starts at the first write: group join time is not throughput.
    while ingest.written.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    let first = ingest.written.load(Ordering::Relaxed) as usize;
    while (ingest.written.load(Ordering::Relaxed) as usize) < total_events {
        assert!(Instant::now() < deadline, "only {} of {total_events} written", ingest.written.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let measured = (total_events - first) as f64;
    let db = app.sql().await;
    assert_eq!(count(&db, "SELECT count(*) FROM orders").await, orders as i64);
    assert_eq!(count(&db, "SELECT count(*) FROM dead_letters").await, 0);
    println!(
        "{label}: {total_events} events ({orders} orders) in {secs:.2} s after the first batch: \
         {:.0} events/s, {:.0} orders/s; batches {}",
        measured / secs,
        measured / secs / events_per_order as f64,
        ingest.batches.load(Ordering::Relaxed),
    );
}

fn orders() -> usize {
    std::env::var("ORDERCAST_THROUGHPUT_ORDERS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run with --ignored --nocapture"]
async fn throughput_of_created_events() {
    measure("order_created", orders(), 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run with --ignored --nocapture"]
async fn throughput_of_created_then_status_changed_events() {
    measure("order_created + status_changed", orders() / 2, 2).await;
}
