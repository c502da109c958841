//! `ordercast produce`: realistic random order events to the ingest topic.
//!
//! Customers come back (a few order often, most rarely), products have their
//! own price range and typical quantities, and a chosen share of messages is
//! deliberately broken in the ways real producers break them, so the ingest's
//! dead-letter path is exercised too. Events are the ingest's format
//! (`schemas/`), JSON or Avro, keyed by external_id.

use std::time::Duration;

use anyhow::Context;
use chrono::{SecondsFormat, Utc};
use clap::Args;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::ingest::KafkaSettings;

#[derive(Debug, Clone, Args)]
pub struct ProduceArgs {
    /// Messages per second.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,

    /// Messages to send; 0 sends until interrupted.
    #[arg(long, default_value_t = 10_000)]
    pub count: u64,

    /// Share of messages that are deliberately invalid (0 to 1): they end up
    /// as dead letters.
    #[arg(long, default_value_t = 0.0)]
    pub invalid_ratio: f64,

    /// Encode events in Avro (single-object encoding, schemas/order-event.avsc)
    /// instead of JSON.
    #[arg(long)]
    pub avro: bool,

    /// Seed for the random orders, to replay the same traffic.
    #[arg(long)]
    pub seed: Option<u64>,
}

/// What a run sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub sent: u64,
    pub acked: u64,
    pub failed: u64,
    pub invalid: u64,
}

/// Where progress goes.
#[derive(Debug, Clone, Copy)]
pub enum Progress {
    /// A line on stderr every second (the `produce` command).
    Stderr,
    /// An info log line this often (inside the demo).
    Log(Duration),
}

/// Deliveries in flight at most; beyond, sending waits for acks.
const MAX_IN_FLIGHT: usize = 10_000;

/// The `ordercast produce` command: brokers and topic from the Kafka settings.
pub async fn produce(kafka: &KafkaSettings, args: &ProduceArgs) -> anyhow::Result<()> {
    let brokers = kafka
        .brokers
        .as_deref()
        .filter(|_| kafka.enabled())
        .context("ordercast produce needs KAFKA_BROKERS (or --kafka-brokers)")?;
    let (stop, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        let _ = stop.send(true);
    });
    let producer = producer(kafka, brokers)?;
    eprintln!(
        "producing {} {} order events to {} at {brokers}, {}/s",
        if args.count == 0 { "unlimited".to_string() } else { args.count.to_string() },
        if args.avro { "Avro" } else { "JSON" },
        kafka.topic,
        args.rate
    );
    let report = run(&producer, &kafka.topic, args, Progress::Stderr, shutdown).await?;
    eprintln!(
        "done: {} sent, {} acknowledged, {} failed, {} deliberately invalid",
        report.sent, report.acked, report.failed, report.invalid
    );
    anyhow::ensure!(report.failed == 0, "{} messages were not acknowledged by Kafka", report.failed);
    Ok(())
}

pub fn producer(kafka: &KafkaSettings, brokers: &str) -> anyhow::Result<FutureProducer> {
    super::producer_config(kafka, brokers, "ordercast-simulator", &[])?
        .set("linger.ms", "10")
        .create()
        .map_err(|e| anyhow::anyhow!("invalid Kafka configuration for the simulator: {e}"))
}

/// Sends `args.count` events (0: until `shutdown`) at `args.rate` per second
/// and waits for their acknowledgements.
pub async fn run(
    producer: &FutureProducer,
    topic: &str,
    args: &ProduceArgs,
    progress: Progress,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<Report> {
    anyhow::ensure!(args.rate > 0.0 && args.rate.is_finite(), "--rate must be a positive number");
    anyhow::ensure!((0.0..=1.0).contains(&args.invalid_ratio), "--invalid-ratio must be between 0 and 1");
    let mut gen = Generator::new(args.seed.unwrap_or_else(rand::random), args.invalid_ratio);
    let mut report = Report::default();
    let mut in_flight = FuturesUnordered::new();
    let start = Instant::now();
    let (every, mut last) = match progress {
        Progress::Stderr => (Duration::from_secs(1), start),
        Progress::Log(every) => (every, start),
    };
    let mut stopping = false;
    loop {
        let done = stopping || (args.count > 0 && report.sent >= args.count);
        if !done {
            // Everything due by now, so the rate holds whatever the timer's grain.
            let due = ((start.elapsed().as_secs_f64() * args.rate) as u64 + 1).min(match args.count {
                0 => u64::MAX,
                n => n,
            });
            while report.sent < due && in_flight.len() < MAX_IN_FLIGHT {
                let msg = gen.next(args.avro);
                report.invalid += msg.invalid as u64;
                let content_type = if args.avro { "application/avro" } else { "application/json" };
                let record = FutureRecord::to(topic)
                    .key(msg.key.as_str())
                    .payload(msg.payload.as_slice())
                    .headers(OwnedHeaders::new().insert(Header { key: "content-type", value: Some(content_type) }));
                in_flight.push(super::enqueue(producer, record).await.context("Kafka refused a message")?);
                report.sent += 1;
            }
        } else if in_flight.is_empty() {
            break;
        }
        let next_due = start + Duration::from_secs_f64((report.sent as f64) / args.rate);
        tokio::select! {
            Some(delivery) = in_flight.next() => match delivery {
                Ok(Ok(_)) => report.acked += 1,
                Ok(Err((e, _))) => {
                    report.failed += 1;
                    log::warn!("a simulated order was not delivered: {e}");
                }
                Err(_) => report.failed += 1,
            },
            _ = tokio::time::sleep_until(next_due), if !done && in_flight.len() < MAX_IN_FLIGHT => {}
            _ = shutdown.changed(), if !stopping => stopping = true,
        }
        if last.elapsed() >= every {
            last = Instant::now();
            let rate = report.sent as f64 / start.elapsed().as_secs_f64().max(0.001);
            let line = format!(
                "sent {}{} ({rate:.0}/s), acknowledged {}, failed {}, invalid {}",
                report.sent,
                if args.count > 0 { format!("/{}", args.count) } else { String::new() },
                report.acked,
                report.failed,
                report.invalid
            );
            match progress {
                Progress::Stderr => eprintln!("{line}"),
                Progress::Log(_) => log::info!("simulator: {line}"),
            }
        }
    }
    Ok(report)
}

/// One message ready to send.
pub struct Generated {
    pub key: String,
    pub payload: Vec<u8>,
    pub invalid: bool,
}

const FIRST: [&str; 24] = [
    "Ada",
    "Grace",
    "Alan",
    "Edsger",
    "Barbara",
    "Donald",
    "Margaret",
    "Ken",
    "Frances",
    "Dennis",
    "Radia",
    "Linus",
    "Hedy",
    "John",
    "Katherine",
    "Tim",
    "Sophie",
    "Niklaus",
    "Joan",
    "Leslie",
    "Anita",
    "Guido",
    "Karen",
    "Bjarne",
];
const LAST: [&str; 20] = [
    "Lovelace",
    "Hopper",
    "Turing",
    "Dijkstra",
    "Liskov",
    "Knuth",
    "Hamilton",
    "Thompson",
    "Allen",
    "Ritchie",
    "Perlman",
    "Torvalds",
    "Lamarr",
    "Backus",
    "Johnson",
    "Berners-Lee",
    "Wilson",
    "Wirth",
    "Clarke",
    "Lamport",
];

/// Product, lowest and highest unit price in cents, typical largest quantity.
const CATALOG: [(&str, i64, i64, i32); 14] = [
    ("Widget", 850, 1050, 5),
    ("Gear", 2200, 2600, 4),
    ("Bolt", 30, 45, 200),
    ("Nut", 10, 20, 200),
    ("Sprocket", 350, 420, 20),
    ("Bearing", 1200, 1500, 8),
    ("Spring", 90, 140, 50),
    ("Gasket", 250, 310, 30),
    ("Servo motor", 4900, 5900, 3),
    ("Stepper driver", 1890, 2290, 4),
    ("Oscilloscope", 39900, 44900, 1),
    ("Soldering iron", 5490, 6490, 2),
    ("Cable harness", 1500, 2100, 10),
    ("Flux capacitor", 128900, 129900, 1),
];

/// Ways real producers get it wrong.
const BROKEN: [&str; 6] =
    ["not_json", "negative_quantity", "missing_customer", "unknown_status", "key_mismatch", "price_precision"];

pub struct Generator {
    rng: StdRng,
    invalid_ratio: f64,
    /// Customers with a weight: a few regulars, a long tail.
    customers: Vec<(String, String, u32)>,
    total_weight: u32,
}

impl Generator {
    pub fn new(seed: u64, invalid_ratio: f64) -> Generator {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut customers = Vec::new();
        for (i, first) in FIRST.iter().enumerate() {
            for (j, last) in LAST.iter().enumerate() {
                let email = format!("{}.{}@example.com", first.to_lowercase(), last.to_lowercase().replace(' ', ""));
                // Zipf-like: the weight falls with the customer's rank.
                let rank = (i * LAST.len() + j) as u32 + 1;
                customers.push((format!("{first} {last}"), email, 10_000 / (rank + 10) + 1));
            }
        }
        // Shuffle which names are the regulars, per seed.
        for k in (1..customers.len()).rev() {
            let m = rng.gen_range(0..=k);
            let (a, b) = (customers[k].2, customers[m].2);
            customers[k].2 = b;
            customers[m].2 = a;
        }
        let total_weight = customers.iter().map(|c| c.2).sum();
        Generator { rng, invalid_ratio, customers, total_weight }
    }

    fn customer(&mut self) -> (String, String) {
        let mut pick = self.rng.gen_range(0..self.total_weight);
        for (name, email, weight) in &self.customers {
            if pick < *weight {
                return (name.clone(), email.clone());
            }
            pick -= weight;
        }
        let (name, email, _) = &self.customers[0];
        (name.clone(), email.clone())
    }

    /// A valid `order_created` event, as JSON.
    pub fn order_created(&mut self) -> Value {
        let (customer, email) = self.customer();
        let (product, low, high, max_qty) = CATALOG[self.rng.gen_range(0..CATALOG.len())];
        // Most orders are for one or a few; bulk items come by the handful.
        let quantity = match self.rng.gen_range(0..100) {
            0..=54 => 1,
            55..=79 => 2.min(max_qty),
            80..=94 => self.rng.gen_range(1..=max_qty.min(5)),
            _ => self.rng.gen_range(1..=max_qty),
        };
        let cents = self.rng.gen_range(low..=high);
        let external_id = format!("sim-{}", uuid::Uuid::from_u128(self.rng.gen()).simple());
        let mut order = json!({
            "external_id": external_id,
            "customer_name": customer,
            "product": product,
            "quantity": quantity,
            // Shortest round-trip form of a whole number of cents is exact.
            "unit_price": cents as f64 / 100.0,
            "status": "pending",
        });
        if self.rng.gen_bool(0.7) {
            order["customer_email"] = json!(email);
        }
        json!({
            "event_id": uuid::Uuid::from_u128(self.rng.gen()).to_string(),
            "type": "order_created",
            "order": order,
            "occurred_at": Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
        })
    }

    /// The next message: usually a valid order, sometimes a broken one.
    pub fn next(&mut self, avro: bool) -> Generated {
        let mut event = self.order_created();
        let key = event["order"]["external_id"].as_str().unwrap_or_default().to_string(); // set just above
        if self.invalid_ratio <= 0.0 || !self.rng.gen_bool(self.invalid_ratio) {
            return Generated { key, payload: encode(&event, avro), invalid: false };
        }
        let kind = BROKEN[self.rng.gen_range(0..BROKEN.len())];
        let mut key = key;
        match kind {
            "not_json" => {
                let mut payload = serde_json::to_vec(&event).unwrap_or_default(); // a Value always serializes
                payload.truncate(payload.len() / 2);
                return Generated { key, payload, invalid: true };
            }
            "negative_quantity" => event["order"]["quantity"] = json!(-1),
            "missing_customer" => {
                event["order"].as_object_mut().map(|o| o.remove("customer_name"));
            }
            "unknown_status" => event["order"]["status"] = json!("teleported"),
            "key_mismatch" => key.push_str("-other"),
            // Avro's decimal has a fixed scale, so there it is a negative price.
            _ if avro => event["order"]["unit_price"] = json!("-1.50"),
            _ => event["order"]["unit_price"] = json!(9.999),
        }
        let payload = match (avro, kind) {
            // Avro cannot even express a status outside its enum.
            (true, "unknown_status") => b"\xc3\x01not an avro datum".to_vec(),
            _ => encode(&event, avro),
        };
        Generated { key, payload, invalid: true }
    }
}

fn encode(event: &Value, avro: bool) -> Vec<u8> {
    if avro {
        // The Avro encoder checks types, not the business rules, so the
        // invalid events above still encode.
        crate::ingest::avro::encode_single_object(event).unwrap_or_else(|e| format!("unencodable: {e}").into_bytes())
    } else {
        serde_json::to_vec(event).unwrap_or_default() // a Value always serializes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::event::{decode, Reason};
    use crate::ingest::settings::Format;

    #[test]
    fn generated_orders_pass_the_ingest_validation_in_both_formats() {
        let mut gen = Generator::new(7, 0.0);
        for avro in [false, true] {
            for _ in 0..500 {
                let m = gen.next(avro);
                let format = if avro { Format::Avro } else { Format::Json };
                let event = decode(Some(&m.payload), Some(m.key.as_bytes()), format);
                assert!(event.is_ok(), "{:?}: {}", event, String::from_utf8_lossy(&m.payload));
            }
        }
    }

    #[test]
    fn broken_messages_are_rejected_by_the_ingest() {
        let mut gen = Generator::new(11, 1.0);
        let mut reasons = std::collections::HashSet::new();
        for avro in [false, true] {
            for _ in 0..300 {
                let m = gen.next(avro);
                assert!(m.invalid);
                let format = if avro { Format::Avro } else { Format::Json };
                let rejection = decode(Some(&m.payload), Some(m.key.as_bytes()), format)
                    .expect_err(&String::from_utf8_lossy(&m.payload));
                reasons.insert(rejection.reason);
            }
        }
        for r in [Reason::InvalidJson, Reason::ValidationFailed, Reason::KeyMismatch, Reason::InvalidAvro] {
            assert!(reasons.contains(&r), "{r:?} never produced: {reasons:?}");
        }
    }

    #[test]
    fn customers_repeat_and_the_same_seed_gives_the_same_orders() {
        let mut a = Generator::new(3, 0.0);
        let mut b = Generator::new(3, 0.0);
        let mut seen = std::collections::HashMap::<String, u32>::new();
        for _ in 0..1000 {
            let (x, y) = (a.order_created(), b.order_created());
            assert_eq!(x["order"], y["order"]);
            *seen.entry(x["order"]["customer_name"].as_str().unwrap().to_string()).or_default() += 1;
        }
        let most = seen.values().max().copied().unwrap();
        assert!(most >= 10, "some customers order often (max {most})");
        assert!(seen.len() >= 100, "and many order rarely ({} customers)", seen.len());
    }
}
