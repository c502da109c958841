//! Test harness for the ingest: brokers, producers, a dead-letter reader,
//! event builders, ordercast instances (in-process or as a child process)
//! and the exactly-once check.

use std::io::Read;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use ordercast::config::Settings;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{spawn_app_on, spawn_app_with, TestApp};

pub const WAIT: Duration = Duration::from_secs(60);

/// A Kafka-protocol broker the test talks to over TCP on 127.0.0.1.
pub trait Broker {
    fn bootstrap(&self) -> String;
    fn create_topic(&self, topic: &str, partitions: i32);
    /// Producer properties this broker needs.
    fn producer_properties(&self) -> Vec<(&'static str, &'static str)>;
    /// How long a member killed without leaving its group must be gone before
    /// a new member joins (zero: the broker's coordinator handles a join while
    /// the dead member's session runs out, as Kafka's does).
    fn dead_member_wait(&self) -> Duration {
        Duration::ZERO
    }
}

pub struct Mock {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl Mock {
    pub fn start() -> Mock {
        Mock { cluster: MockCluster::new(1).expect("start the rdkafka mock cluster") }
    }

    /// Takes the (only) broker down: connections are closed and refused.
    pub fn broker_down(&self) {
        self.cluster.broker_down(1).expect("take the mock broker down");
    }

    pub fn broker_up(&self) {
        self.cluster.broker_up(1).expect("bring the mock broker back");
    }

    /// Delays every answer of the broker by `rtt`.
    pub fn round_trip_time(&self, rtt: Duration) {
        self.cluster.broker_round_trip_time(1, rtt).expect("set the mock broker's round-trip time");
    }

    /// The next `n` ListOffsets requests (where a partition's log starts and
    /// ends) fail.
    pub fn fail_list_offsets(&self, n: usize) {
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
        self.cluster.request_errors(RDKafkaApiKey::ListOffsets, &vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN; n]);
    }

    /// The next `n` Fetch requests are refused as not authorized for the
    /// topic, as when the consumer's rights are taken away.
    pub fn refuse_fetches(&self, n: usize) {
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
        let refused = RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED;
        self.cluster.request_errors(RDKafkaApiKey::Fetch, &vec![refused; n]);
    }
}

impl Broker for Mock {
    fn bootstrap(&self) -> String {
        self.cluster.bootstrap_servers()
    }
    fn create_topic(&self, topic: &str, partitions: i32) {
        self.cluster.create_topic(topic, partitions, 1).expect("create a mock topic");
    }
    fn producer_properties(&self) -> Vec<(&'static str, &'static str)> {
        Vec::new()
    }
}

/// A free port on 127.0.0.1 (bound, then released for the child to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The tansu broker as a child process, killed on drop.
pub struct Tansu {
    child: std::process::Child,
    binary: PathBuf,
    port: u16,
}

/// The tansu binary; None (with a loud message) only when it is missing and
/// CI is unset. Under CI a missing broker fails the test.
pub fn tansu_binary() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("tansu")).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin/tansu"));
    }
    if let Some(found) = candidates.into_iter().find(|p| p.is_file()) {
        return Some(found);
    }
    if std::env::var_os("CI").is_some() {
        panic!("the tansu broker is not installed (cargo install tansu --features dynostore --locked; scripts/test does it)");
    }
    eprintln!(
        "\n!!!!!!!!\n!!! SKIPPED: the tansu broker is not installed, so this end-to-end Kafka test did not run.\n\
         !!! Install it with `cargo install tansu --features dynostore --locked` (scripts/test does).\n!!!!!!!!\n"
    );
    None
}

impl Tansu {
    pub fn start(binary: PathBuf) -> Tansu {
        // The port found free may be taken before tansu binds it (another
        // test's connection or listener): tansu then exits, and starts again
        // elsewhere. It counts as started once it listens itself.
        for _ in 0..3 {
            let port = free_port();
            let url = format!("tcp://127.0.0.1:{port}");
            let mut child = Command::new(&binary)
                .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
                .args(["--storage-engine", "memory://tansu/"])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start tansu");
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                if listens(child.id(), port) {
                    return Tansu { child, binary, port };
                }
                if let Some(status) = child.try_wait().expect("tansu's state") {
                    eprintln!("tansu exited ({status}) on port {port}; starting it on another");
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "tansu did not listen on {port}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("tansu did not start on three ports");
    }
}

/// Whether process `pid` holds the socket listening on 127.0.0.1:`port`
/// (`/proc/net/tcp`'s inode of it among the process's descriptors).
fn listens(pid: u32, port: u16) -> bool {
    const LISTEN: u8 = 0x0A;
    let inodes: Vec<String> = crate::helpers::tcp_sockets()
        .iter()
        .filter(|s| s.local_port == port && s.state == LISTEN)
        .map(|s| format!("socket:[{}]", s.inode))
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| inodes.iter().any(|i| l.as_os_str() == i.as_str())))
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Broker for Tansu {
    fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
    fn create_topic(&self, topic: &str, partitions: i32) {
        let out = Command::new(&self.binary)
            .args(["topic", "create", topic, "--broker", &format!("tcp://127.0.0.1:{}", self.port)])
            .args(["--partitions", &partitions.to_string()])
            .output()
            .expect("run tansu topic create");
        assert!(out.status.success(), "tansu topic create {topic}: {}", String::from_utf8_lossy(&out.stderr));
    }
    fn producer_properties(&self) -> Vec<(&'static str, &'static str)> {
        // tansu 0.6 answers a fetch inside a record batch with the NEXT batch:
        // one record per batch keeps every offset a batch start.
        vec![("batch.num.messages", "1"), ("linger.ms", "0")]
    }
    fn dead_member_wait(&self) -> Duration {
        // tansu 0.6's coordinator ends a dead leader's session lazily, at the
        // next request it handles. When that request is a follower's
        // SyncGroup (the follower joined while the leader still counted), it
        // takes the follower's empty assignment as the group's: the new
        // member owns no partition and, heartbeating in a stable group, is
        // never given one. Past the session timeout the new member's first
        // JoinGroup ends the dead session, and it joins as the leader.
        Duration::from_millis(CHILD_SESSION_TIMEOUT_MS + 1000)
    }
}

/// Topic, dead-letter topic and group names for one test.
#[derive(Clone)]
pub struct Names {
    pub topic: String,
    pub dlq: String,
    pub group: String,
}

pub fn names(broker: &dyn Broker, partitions: i32) -> Names {
    let id = Uuid::new_v4().simple().to_string();
    let n = Names { topic: format!("orders-{id}"), dlq: format!("orders-dlq-{id}"), group: format!("ordercast-{id}") };
    broker.create_topic(&n.topic, partitions);
    broker.create_topic(&n.dlq, 1);
    n
}

/// Another deployment reading the same topic: its own group and dead-letter topic.
pub fn another_group(broker: &dyn Broker, n: &Names) -> Names {
    let id = Uuid::new_v4().simple().to_string();
    let other = Names { topic: n.topic.clone(), dlq: format!("orders-dlq-{id}"), group: format!("ordercast-{id}") };
    broker.create_topic(&other.dlq, 1);
    other
}

/// Deletes a topic and creates it again, empty, through the admin API.
pub async fn recreate_topic(broker: &dyn Broker, topic: &str, partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;

    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", broker.bootstrap()).create().expect("create an admin client");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    for result in admin.delete_topics(&[topic], &options).await.expect("delete the topic") {
        result.unwrap_or_else(|(t, e)| panic!("delete topic {t}: {e}"));
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        // The broker may still be deleting it.
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        match &admin.create_topics(&[new], &options).await.expect("create the topic")[0] {
            Ok(_) => return,
            Err((t, e)) => {
                assert!(tokio::time::Instant::now() < deadline, "create topic {t} again: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

pub fn producer(broker: &dyn Broker) -> FutureProducer {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", broker.bootstrap()).set("message.timeout.ms", "20000");
    for (k, v) in broker.producer_properties() {
        config.set(k, v);
    }
    config.create().expect("create a test producer")
}

pub async fn send(
    producer: &FutureProducer,
    topic: &str,
    key: Option<&str>,
    payload: Option<&[u8]>,
    headers: &[(&str, &[u8])],
) {
    let mut h = OwnedHeaders::new();
    for (k, v) in headers {
        h = h.insert(Header { key: k, value: Some(*v) });
    }
    let mut record = FutureRecord::<str, [u8]>::to(topic).headers(h);
    if let Some(k) = key {
        record = record.key(k);
    }
    if let Some(p) = payload {
        record = record.payload(p);
    }
    producer.send(record, Duration::from_secs(20)).await.map_err(|(e, _)| e).expect("produce a test message");
}

/// Produces one message through librdkafka's C API, with header keys given
/// as raw bytes: rdkafka's `OwnedHeaders` only takes `&str` keys, but other
/// clients can send any bytes (a key that is not UTF-8, say).
pub async fn send_raw(broker: &dyn Broker, topic: &str, key: &[u8], payload: &[u8], headers: &[(&[u8], &[u8])]) {
    use rdkafka::bindings as rd;
    use rdkafka::bindings::rd_kafka_vtype_t::*;
    use rdkafka::producer::{BaseProducer, Producer};
    use std::ffi::{c_void, CStr, CString};

    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", broker.bootstrap()).set("message.timeout.ms", "20000");
    for (k, v) in broker.producer_properties() {
        config.set(k, v);
    }
    // A BaseProducer: its delivery reports carry no opaque (a FutureProducer
    // expects one for every message).
    let producer: BaseProducer = config.create().expect("create a raw test producer");
    let (topic, key, payload) = (CString::new(topic).unwrap(), key.to_vec(), payload.to_vec());
    let headers: Vec<(Vec<u8>, Vec<u8>)> = headers.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
    tokio::task::spawn_blocking(move || {
        let mem = |b: &[u8]| rd::rd_kafka_vu_s__bindgen_ty_1 {
            mem: rd::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 { ptr: b.as_ptr() as *mut c_void, size: b.len() },
        };
        // SAFETY: every pointer outlives the call (the message is copied:
        // RD_KAFKA_MSG_F_COPY); librdkafka owns the headers once produceva
        // succeeds, and they are destroyed here when it fails.
        unsafe {
            let hdrs = rd::rd_kafka_headers_new(headers.len());
            for (k, v) in &headers {
                let err = rd::rd_kafka_header_add(
                    hdrs,
                    k.as_ptr().cast(),
                    k.len() as isize,
                    v.as_ptr().cast(),
                    v.len() as isize,
                );
                assert_eq!(err, rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR, "add a header");
            }
            let vus = [
                rd::rd_kafka_vu_t {
                    vtype: RD_KAFKA_VTYPE_TOPIC,
                    u: rd::rd_kafka_vu_s__bindgen_ty_1 { cstr: topic.as_ptr() },
                },
                rd::rd_kafka_vu_t {
                    vtype: RD_KAFKA_VTYPE_MSGFLAGS,
                    u: rd::rd_kafka_vu_s__bindgen_ty_1 { i: rd::RD_KAFKA_MSG_F_COPY },
                },
                rd::rd_kafka_vu_t { vtype: RD_KAFKA_VTYPE_VALUE, u: mem(&payload) },
                rd::rd_kafka_vu_t { vtype: RD_KAFKA_VTYPE_KEY, u: mem(&key) },
                rd::rd_kafka_vu_t {
                    vtype: RD_KAFKA_VTYPE_HEADERS,
                    u: rd::rd_kafka_vu_s__bindgen_ty_1 { headers: hdrs },
                },
            ];
            let error = rd::rd_kafka_produceva(producer.client().native_ptr(), vus.as_ptr(), vus.len());
            if !error.is_null() {
                let text = CStr::from_ptr(rd::rd_kafka_error_string(error)).to_string_lossy().into_owned();
                rd::rd_kafka_error_destroy(error);
                rd::rd_kafka_headers_destroy(hdrs);
                panic!("produceva: {text}");
            }
        }
        producer.flush(Duration::from_secs(20)).expect("deliver the raw test message");
    })
    .await
    .unwrap();
}

/// The end of a topic's partition 0: how many messages it got.
pub async fn high_watermark(broker: &dyn Broker, topic: &str) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("group.id", format!("reader-{}", Uuid::new_v4()))
        .create()
        .unwrap();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || consumer.fetch_watermarks(&topic, 0, Duration::from_secs(10)).unwrap().1)
        .await
        .unwrap()
}

/// Sends a JSON event keyed by its order's external_id.
pub async fn send_event(producer: &FutureProducer, topic: &str, event: &Value) {
    let key = event["order"]["external_id"].as_str().unwrap().to_string();
    send(producer, topic, Some(&key), Some(event.to_string().as_bytes()), &[("content-type", b"application/json")])
        .await;
}

pub fn now() -> String {
    chrono::Utc::now().to_rfc3339()
}

pub fn created(external_id: &str) -> Value {
    json!({
        "event_id": Uuid::new_v4(),
        "type": "order_created",
        "order": {"external_id": external_id, "customer_name": "Kafka Customer", "product": "Widget", "quantity": 2, "unit_price": 9.5},
        "occurred_at": now(),
    })
}

pub fn event(kind: &str, order: Value) -> Value {
    json!({"event_id": Uuid::new_v4(), "type": kind, "order": order, "occurred_at": now()})
}

pub fn status_changed(external_id: &str, status: &str) -> Value {
    event("status_changed", json!({"external_id": external_id, "status": status}))
}

/// Spawns ordercast with the ingest pointed at `names`.
pub async fn spawn_ingest(broker: &dyn Broker, n: &Names, configure: impl FnOnce(&mut Settings)) -> TestApp {
    let bootstrap = broker.bootstrap();
    let n = n.clone();
    spawn_app_with(move |s| {
        kafka_settings(s, &bootstrap, &n);
        configure(s);
    })
    .await
}

/// Another instance on the same database and group.
pub async fn spawn_ingest_on(db_url: &str, broker: &dyn Broker, n: &Names) -> TestApp {
    spawn_ingest_on_with(db_url, broker, n, |_| {}).await
}

/// Another instance on the same database, with settings of its own.
pub async fn spawn_ingest_on_with(
    db_url: &str,
    broker: &dyn Broker,
    n: &Names,
    configure: impl FnOnce(&mut Settings),
) -> TestApp {
    let bootstrap = broker.bootstrap();
    let n = n.clone();
    spawn_app_on(db_url, move |s| {
        kafka_settings(s, &bootstrap, &n);
        configure(s);
    })
    .await
}

fn kafka_settings(s: &mut Settings, bootstrap: &str, n: &Names) {
    s.kafka.brokers = Some(bootstrap.to_string());
    s.kafka.topic = n.topic.clone();
    s.kafka.dlq_topic = n.dlq.clone();
    s.kafka.group_id = n.group.clone();
    // A killed or stopped member is noticed in seconds, not librdkafka's 45.
    s.kafka.properties = Some("session.timeout.ms=6000,heartbeat.interval.ms=500".into());
}

/// Reads `n` messages from the start of a topic's partition 0.
pub async fn read_topic(broker: &dyn Broker, topic: &str, n: usize) -> Vec<OwnedMessage> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("group.id", format!("reader-{}", Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning).unwrap();
    consumer.assign(&tpl).unwrap();
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + WAIT;
        let mut out = Vec::new();
        while out.len() < n {
            assert!(std::time::Instant::now() < deadline, "read {} of {n} messages from the topic", out.len());
            if let Some(m) = consumer.poll(Duration::from_millis(200)) {
                out.push(m.expect("read a message").detach());
            }
        }
        out
    })
    .await
    .unwrap()
}

pub fn header(m: &OwnedMessage, key: &str) -> Option<String> {
    m.headers()?.iter().find(|h| h.key == key).and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Offsets the group committed to Kafka, per partition (None: nothing).
pub async fn committed(broker: &dyn Broker, n: &Names, partitions: i32) -> Vec<Option<i64>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("group.id", &n.group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(&n.topic, p);
    }
    tokio::task::spawn_blocking(move || {
        let got = consumer.committed_offsets(tpl, Duration::from_secs(10)).expect("fetch committed offsets");
        got.elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            })
            .collect()
    })
    .await
    .unwrap()
}

/// Positions stored in PostgreSQL, per partition.
pub async fn stored(db: &tokio_postgres::Client, n: &Names) -> Vec<(i32, Option<i64>)> {
    db.query(
        "SELECT kafka_partition, next_offset FROM kafka_offsets WHERE group_id = $1 AND kafka_topic = $2 ORDER BY 1",
        &[&n.group, &n.topic],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

pub async fn count(db: &tokio_postgres::Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e:?}")).get(0)
}

/// The position and log generation of a one-partition test's group.
pub async fn position_and_generation(db: &tokio_postgres::Client, n: &Names) -> (Option<i64>, i32) {
    let row = db
        .query_one("SELECT next_offset, log_generation FROM kafka_offsets WHERE group_id = $1", &[&n.group])
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// The dead letters, by offset: (offset, reason, detail).
pub async fn dead_letters(db: &tokio_postgres::Client) -> Vec<(i64, String, String)> {
    let rows =
        db.query("SELECT kafka_offset, reason, detail FROM dead_letters ORDER BY kafka_offset", &[]).await.unwrap();
    rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect()
}

/// The ingest's counters (the `kafka` object of `/api/health`) once it has
/// applied partition 0 up to `next_offset`: its rows are visible to other
/// connections before the writer has counted its batch.
pub async fn counters_at(app: &TestApp, next_offset: i64) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, health) = app.get_json("/api/health").await;
        let k = health["kafka"].clone();
        let at = k["partitions"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["partition"] == 0).and_then(|p| p["next_offset"].as_i64()));
        if at >= Some(next_offset) {
            return k;
        }
        assert!(tokio::time::Instant::now() < deadline, "partition 0 not applied up to {next_offset}: {k}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `sql` (a count) reaches `want`.
pub async fn wait_count(db_url: &str, sql: &str, want: i64, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    let mut last = -1;
    loop {
        if let Ok(db) = ordercast::db::connect(db_url).await {
            if let Ok(row) = db.query_one(sql, &[]).await {
                last = row.get(0);
                if last >= want {
                    assert_eq!(last, want, "{sql} overshot");
                    return;
                }
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "{sql}: {last} of {want} after {wait:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every order `<prefix>-<i>` exists exactly once, with exactly the effect
/// of its `events` events (one create, then status changes: version and
/// history count equal `events`), and nothing was dead-lettered.
pub async fn assert_exactly_once(db: &tokio_postgres::Client, prefix: &str, orders: i64, events: i64) {
    let pattern = format!("{prefix}-%");
    let row = db
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE version = $2), \
                    (SELECT count(*) FROM order_status_history h JOIN orders o ON o.id = h.order_id WHERE o.external_id LIKE $1), \
                    (SELECT count(*) FROM change_log WHERE op = 'insert' AND after_row->>'external_id' LIKE $1) \
             FROM orders WHERE external_id LIKE $1",
            &[&pattern, &(events as i32)],
        )
        .await
        .unwrap();
    let (n, exact, history, inserts): (i64, i64, i64, i64) = (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(n, orders, "orders present");
    assert_eq!(exact, orders, "orders whose version shows each event applied exactly once");
    assert_eq!(history, orders * events, "status history rows");
    assert_eq!(inserts, orders, "inserts in the change log");
    let dead = count(db, "SELECT count(*) FROM dead_letters").await;
    assert_eq!(dead, 0, "dead letters (a doubled create would be order_exists)");
}

/// The Kafka session timeout of a `Child`: a killed one leaves its group
/// after this long.
pub const CHILD_SESSION_TIMEOUT_MS: u64 = 6000;

/// ordercast as a real child process, so it can be killed with SIGKILL.
pub struct Child {
    child: std::process::Child,
    pub port: u16,
    log: PathBuf,
}

impl Child {
    pub fn start(db_url: &str, broker: &dyn Broker, n: &Names, extra: &[(&str, &str)]) -> Child {
        let port = free_port();
        let log = std::env::temp_dir().join(format!("ordercast-child-{}.log", Uuid::new_v4().simple()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ordercast"));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATABASE_URL", db_url)
            .env("ORDERCAST_BIND", format!("127.0.0.1:{port}"))
            .env("KAFKA_BROKERS", broker.bootstrap())
            .env("KAFKA_TOPIC", &n.topic)
            .env("KAFKA_DLQ_TOPIC", &n.dlq)
            .env("KAFKA_GROUP_ID", &n.group)
            .env("ORDERCAST_KAFKA_SESSION_TIMEOUT_MS", CHILD_SESSION_TIMEOUT_MS.to_string())
            .env("ORDERCAST_KAFKA_HEARTBEAT_INTERVAL_MS", "500")
            .env("RUST_LOG", "info,librdkafka=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start ordercast");
        Child { child, port, log }
    }

    pub async fn health(&self) -> Option<Value> {
        let r = reqwest::get(format!("http://127.0.0.1:{}/api/health", self.port)).await.ok()?;
        r.json().await.ok()
    }

    /// SIGKILL: no graceful anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_tail(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- ordercast child log ({}) ---\n{}", self.log.display(), self.log_tail());
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// A database dropped at the end of the test (for child-process tests,
/// where no TestApp owns it).
pub struct Db {
    pub url: String,
    name: String,
}

impl Db {
    pub async fn create() -> Db {
        let (url, name) = crate::helpers::create_database().await;
        // The child migrates on start; the test may look first.
        ordercast::db::migrate(&url).await.unwrap();
        Db { url, name }
    }

    pub async fn sql(&self) -> tokio_postgres::Client {
        ordercast::db::connect(&self.url).await.unwrap()
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                if let Ok(admin) = ordercast::db::connect(&crate::helpers::admin_url()).await {
                    let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
                }
            });
        })
        .join();
    }
}
