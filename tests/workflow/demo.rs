//! The simulator feeding the ingest, and `ordercast demo` end to end.

use std::io::Read;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::helpers::{eventually, spawn_app_with, WsClient};
use crate::{scalar, Kafka, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_produce_command_feeds_the_ingest_orders_and_dead_letters() {
    // Arrange: an instance ingesting this test's topic.
    let kafka = Kafka::start();
    let app = spawn_app_with(|s| kafka.configure(s)).await;

    // Act: `ordercast produce`, Avro, a quarter of it broken on purpose.
    let out = tokio::task::spawn_blocking({
        let (brokers, topic) = (kafka.bootstrap(), kafka.orders.clone());
        move || {
            Command::new(env!("CARGO_BIN_EXE_ordercast"))
                .args(["produce", "--count", "80", "--rate", "400", "--invalid-ratio", "0.25", "--avro", "--seed", "5"])
                .args(["--kafka-brokers", &brokers, "--kafka-topic", &topic])
                .env_remove("DATABASE_URL")
                .env("RUST_LOG", "warn")
                .output()
                .expect("run ordercast produce")
        }
    })
    .await
    .unwrap();

    // Assert: every message acknowledged; valid ones became orders, the
    // rest dead letters.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let summary = stderr.lines().find(|l| l.starts_with("done: ")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(summary.starts_with("done: 80 sent, 80 acknowledged, 0 failed, "), "{summary}");
    let invalid: i64 = summary.rsplit(", ").next().unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!((5..=40).contains(&invalid), "{summary}");
    let db = app.sql().await;
    eventually(WAIT, || {
        let db = &db;
        async move {
            let orders: i64 = scalar(db, "SELECT count(*) FROM orders WHERE external_id LIKE 'sim-%'").await;
            let dead: i64 = scalar(db, "SELECT count(*) FROM dead_letters").await;
            (orders + dead == 80).then_some((orders, dead))
        }
    })
    .await;
    let dead: i64 = scalar(&db, "SELECT count(*) FROM dead_letters").await;
    assert_eq!(dead, invalid);
    let customers: i64 = scalar(&db, "SELECT count(DISTINCT customer_name) FROM orders").await;
    assert!(customers > 5, "{customers} customers");
}

/// `ordercast demo` as a child process; killed (and its data removed) on drop.
struct DemoChild {
    child: std::process::Child,
    data_dir: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl DemoChild {
    fn log(&self) -> String {
        let mut s = String::new();
        let _ = std::fs::File::open(&self.log).and_then(|mut f| f.read_to_string(&mut s));
        s
    }
}

impl Drop for DemoChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
        let _ = std::fs::remove_file(&self.log);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_starts_and_orders_reach_a_websocket_client() {
    // Arrange: a free port and a fresh data directory under /tmp.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let data_dir = std::env::temp_dir().join(format!("ordercast-demo-{id}"));
    let log = std::env::temp_dir().join(format!("ordercast-demo-{id}.log"));

    // Act
    let child = Command::new(env!("CARGO_BIN_EXE_ordercast"))
        .arg("demo")
        .args(["--bind", &format!("127.0.0.1:{port}"), "--data-dir", data_dir.to_str().unwrap()])
        .args(["--demo-rate", "20"])
        .env_remove("DATABASE_URL")
        .env_remove("KAFKA_BROKERS")
        .env("ORDERCAST_STEP_LATENCY_MS", "20")
        // The embedded PostgreSQL gets a UTF-8 character type whatever the
        // environment's locale (lower() would fold only ASCII under C).
        .env("LANG", "C")
        .env("LC_ALL", "C")
        .env("RUST_LOG", "info,librdkafka=warn,actix_web=warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start ordercast demo");
    let mut demo = DemoChild { child, data_dir, log };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(demo.child.try_wait().unwrap().is_none(), "the demo exited:\n{}", demo.log());
        assert!(std::time::Instant::now() < deadline, "the demo did not listen:\n{}", demo.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Assert: orders from the simulator arrive over Kafka, and the processor moves them.
    let mut ws = WsClient::connect(&format!("ws://127.0.0.1:{port}/ws")).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let (mut from_kafka, mut from_processor) = (0, 0);
    while from_kafka == 0 || from_processor == 0 {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        assert!(!left.is_zero(), "no orders flowed within {WAIT:?}:\n{}", demo.log());
        let msg = ws.next_json(left).await;
        if msg["type"] == "change" {
            let actor = msg["actor"].as_str().unwrap_or_default();
            from_kafka += actor.starts_with("kafka") as u32;
            from_processor += (actor == "processor") as u32;
        }
    }
    let log = demo.log();
    assert!(log.contains("embedded Kafka-protocol broker"), "the broker's address is logged:\n{log}");
    assert!(!log.contains("folds only ASCII"), "the embedded database folds all letters:\n{log}");
    let health: serde_json::Value =
        reqwest::get(format!("http://127.0.0.1:{port}/api/health")).await.unwrap().json().await.unwrap();
    assert_eq!(health["workflow"]["processor"]["enabled"], true, "{health}");
    eventually(WAIT, || async move {
        let h: serde_json::Value =
            reqwest::get(format!("http://127.0.0.1:{port}/api/health")).await.ok()?.json().await.ok()?;
        (h["workflow"]["outbox"]["published"].as_u64()? > 0).then_some(())
    })
    .await;

    // And SIGTERM stops everything, the embedded PostgreSQL included.
    let pg_pid = demo.data_dir.join("pg/postmaster.pid");
    assert!(pg_pid.exists(), "the embedded PostgreSQL runs in the data directory");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(demo.child.id() as i32), nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(status) = demo.child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "the demo did not stop on SIGTERM:\n{}", demo.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status:?}:\n{}", demo.log());
    assert!(!pg_pid.exists(), "the embedded PostgreSQL was stopped:\n{}", demo.log());
}
