//! The ingest scenarios, run against each broker by `mock` and `tansu`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ordercast::ingest::avro;
use rdkafka::message::Message;
use serde_json::{json, Value};

use crate::helpers::{eventually, TestApp};
use crate::kafka::*;

fn order_sql(external_id: &str) -> String {
    format!("SELECT count(*) FROM orders WHERE external_id = '{external_id}'")
}

async fn order(app: &TestApp, external_id: &str) -> Option<Value> {
    app.sql()
        .await
        .query_opt("SELECT to_jsonb(o) FROM orders o WHERE external_id = $1", &[&external_id])
        .await
        .unwrap()
        .map(|r| r.get(0))
}

/// Created, updated, status and cancel events become rows, WebSocket pushes
/// naming `kafka:<topic>`, history, health and stats; events produced before
/// the first start are not skipped; the position reaches Kafka afterwards.
pub async fn events_become_rows_and_websocket_pushes(broker: &dyn Broker) {
    let n = names(broker, 3);
    let producer = producer(broker);
    send_event(&producer, &n.topic, &created("early-1")).await;

    let app = spawn_ingest(broker, &n, |_| {}).await;
    let mut ws = app.ws("").await;
    ws.ready().await;
    wait_count(&app.db_url, &order_sql("early-1"), 1, WAIT).await;

    send_event(
        &producer,
        &n.topic,
        &event("order_updated", json!({"external_id": "early-1", "quantity": 5, "customer_email": "k@example.com"})),
    )
    .await;
    send_event(&producer, &n.topic, &status_changed("early-1", "processing")).await;
    send_event(&producer, &n.topic, &event("order_cancelled", json!({"external_id": "early-1"}))).await;
    send_event(&producer, &n.topic, &created("later-2")).await;

    let changes = ws.changes(5, WAIT).await;
    let actor = format!("kafka:{}", n.topic);
    assert!(changes.iter().all(|c| c["actor"] == actor.as_str()), "{changes:?}");
    let early: Vec<&Value> = changes.iter().filter(|c| c["order"]["external_id"] == "early-1").collect();
    let ops: Vec<(&str, &str)> =
        early.iter().map(|c| (c["op"].as_str().unwrap(), c["order"]["status"].as_str().unwrap())).collect();
    assert_eq!(
        ops,
        [("insert", "pending"), ("update", "pending"), ("update", "processing"), ("update", "cancelled")],
        "one order's events apply in order"
    );
    assert_eq!(early[1]["order"]["quantity"], 5);
    assert!(changes.iter().any(|c| c["op"] == "insert" && c["order"]["external_id"] == "later-2"));

    let o = order(&app, "early-1").await.unwrap();
    assert_eq!(
        (o["status"].as_str(), o["version"].as_i64(), o["customer_email"].as_str()),
        (Some("cancelled"), Some(4), Some("k@example.com"))
    );
    let (status, history) = app.get_json(&format!("/api/orders/{}/history", o["id"])).await;
    assert_eq!(status, 200);
    assert!(history.as_array().unwrap().iter().all(|h| h["by"] == actor.as_str()), "{history}");

    let (status, health) = app.get_json("/api/health").await;
    assert_eq!(status, 200, "{health}");
    let k = &health["kafka"];
    assert_eq!((k["enabled"].as_bool(), k["state"].as_str()), (Some(true), Some("running")), "{k}");
    assert_eq!(k["written"], 5);
    assert_eq!(k["consumed"], 5);
    let (_, stats) = app.get_json("/api/stats").await;
    assert_eq!(stats["ingest"]["written"], 5, "{stats}");
    // Lag per partition, from librdkafka's statistics once they arrive.
    let lag = eventually(WAIT, || async {
        let (_, h) = app.get_json("/api/health").await;
        let lag = h["kafka"]["lag"].as_object().cloned()?;
        (lag.len() == 3 && lag.values().all(|v| v == 0)).then_some(lag)
    })
    .await;
    assert_eq!(lag.len(), 3);

    // The stored position reaches Kafka as a courtesy commit.
    let db = app.sql().await;
    let want: Vec<Option<i64>> = {
        let s = stored(&db, &n).await;
        (0..3).map(|p| s.iter().find(|(q, _)| *q == p).and_then(|(_, o)| *o)).collect()
    };
    assert_eq!(want.iter().flatten().sum::<i64>(), 5, "PostgreSQL holds the position of all 5 messages");
    eventually(WAIT, || async {
        let got = committed(broker, &n, 3).await;
        (got == want).then_some(())
    })
    .await;
}

/// The same event twice (in one batch and in a later one) changes nothing.
pub async fn duplicate_events_change_nothing(broker: &dyn Broker) {
    let n = names(broker, 1);
    let producer = producer(broker);
    let app = spawn_ingest(broker, &n, |_| {}).await;
    let create = created("dup-1");
    let status = status_changed("dup-1", "processing");
    for e in [&create, &create, &status, &status] {
        send_event(&producer, &n.topic, e).await;
    }
    wait_count(
        &app.db_url,
        "SELECT count(*) FROM orders WHERE external_id = 'dup-1' AND status = 'processing'",
        1,
        WAIT,
    )
    .await;
    eventually(WAIT, || async {
        (app.state.ingest.consumed.load(std::sync::atomic::Ordering::Relaxed) == 4).then_some(())
    })
    .await;
    // A producer retrying much later: both already applied.
    send_event(&producer, &n.topic, &status).await;
    send_event(&producer, &n.topic, &create).await;
    send_event(&producer, &n.topic, &created("dup-2")).await;
    wait_count(&app.db_url, &order_sql("dup-2"), 1, WAIT).await;

    let db = app.sql().await;
    let o = order(&app, "dup-1").await.unwrap();
    assert_eq!(o["version"], 2, "one create and one status change: {o}");
    assert_eq!(count(&db, "SELECT count(*) FROM order_status_history").await, 3);
    assert_eq!(count(&db, "SELECT count(*) FROM dead_letters").await, 0);
    let k = counters_at(&app, 7).await;
    assert_eq!(k["duplicates"], 4, "{k}");
    assert_eq!(k["written"], 3);
}

/// A dead-lettered event sent again in the same batch is retried, as it is in
/// a later batch: the copy is applied (or dead-lettered with its own reason)
/// on its own merits, never counted as a duplicate of an event that was not
/// applied. A copy of an applied event in the same batch stays a duplicate.
pub async fn a_dead_lettered_event_sent_again_in_its_batch_is_retried(broker: &dyn Broker) {
    let n = names(broker, 1);
    let producer = producer(broker);
    let early = status_changed("again-1", "processing"); // before its order exists
    let never = status_changed("again-2", "processing"); // an order that never exists
    let create = created("again-3");
    let mut invalid = created("again-4");
    invalid["order"]["quantity"] = json!("two");
    let mut valid = created("again-4");
    valid["event_id"] = invalid["event_id"].clone(); // the same event, corrected
    for e in [&early, &created("again-1"), &early, &never, &never, &create, &create, &invalid, &valid] {
        send_event(&producer, &n.topic, e).await;
    }
    // Everything is in the topic before the ingest starts: one batch.
    // (The mock broker returns one produced batch per fetch: nine fetches.)
    let app = spawn_ingest(broker, &n, |s| s.kafka.batch_wait_ms = 5000).await;
    wait_count(&app.db_url, "SELECT count(*) FROM orders WHERE external_id = 'again-4'", 1, WAIT).await;

    let k = &counters_at(&app, 9).await;
    assert_eq!(k["batches"], 1, "the test needs all of it in one batch: {k}");
    assert_eq!(
        (k["written"].as_u64(), k["duplicates"].as_u64(), k["dead_lettered"].as_u64()),
        (Some(4), Some(1), Some(4)),
        "only the copy of the applied create is a duplicate: {k}"
    );
    let o = order(&app, "again-1").await.unwrap();
    assert_eq!((o["status"].as_str(), o["version"].as_i64()), (Some("processing"), Some(2)), "{o}");
    assert_eq!(order(&app, "again-4").await.unwrap()["quantity"], 2);
    assert!(order(&app, "again-2").await.is_none());
    let db = app.sql().await;
    let dead: Vec<(i64, String)> = dead_letters(&db).await.into_iter().map(|(o, r, _)| (o, r)).collect();
    let want = [(0, "unknown_order"), (3, "unknown_order"), (4, "unknown_order"), (7, "validation_failed")];
    assert_eq!(dead, want.map(|(o, r)| (o, r.to_string())));
    // The event ids that applied are remembered where they applied; the
    // one that never did is not (sending it again retries it).
    let ids = |e: &Value| e["event_id"].as_str().unwrap().to_string();
    let remembered: BTreeMap<String, i64> = db
        .query("SELECT event_id::text, kafka_offset FROM ingested_events", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(remembered.get(&ids(&early)), Some(&2), "the copy that applied");
    assert_eq!(remembered.get(&ids(&never)), None);
    assert_eq!(remembered.get(&ids(&create)), Some(&5));
    assert_eq!(remembered.get(&ids(&valid)), Some(&8));
}

/// Garbage, wrong types, forbidden transitions and the like go to the
/// dead-letter topic and table with their reason, while the good messages
/// around them on the same partition are applied.
pub async fn poison_messages_are_dead_lettered_while_the_partition_flows(broker: &dyn Broker) {
    let n = names(broker, 1);
    let producer = producer(broker);
    let app = spawn_ingest(broker, &n, |_| {}).await;
    let json_ct: &[(&str, &[u8])] = &[("content-type", b"application/json")];

    send_event(&producer, &n.topic, &created("good-1")).await; // 0
    let nul: &[(&str, &[u8])] = &[("trace", b"a\0b")]; // jsonb cannot hold NUL: stored as base64
    send(&producer, &n.topic, Some("x"), Some(b"\x00\x9f garbage \xff"), nul).await; // 1 invalid_json
    let mut wrong = created("bad-types");
    wrong["order"]["quantity"] = json!("two");
    send_event(&producer, &n.topic, &wrong).await; // 2 validation_failed
    send_event(&producer, &n.topic, &event("order_teleported", json!({"external_id": "good-1"}))).await; // 3 invalid_event
    send_event(&producer, &n.topic, &status_changed("nobody", "processing")).await; // 4 unknown_order
    send_event(&producer, &n.topic, &created("good-1")).await; // 5 order_exists
    send_event(&producer, &n.topic, &status_changed("good-1", "delivered")).await; // 6 invalid_transition
    let mismatch = created("key-a").to_string();
    send(&producer, &n.topic, Some("key-b"), Some(mismatch.as_bytes()), json_ct).await; // 7 key_mismatch
    send(&producer, &n.topic, Some("a"), Some(b"\x02\x04"), &[("content-type", b"application/avro")]).await; // 8 invalid_avro
    send(&producer, &n.topic, Some("a"), Some(b"<order/>"), &[("content-type", b"text/xml")]).await; // 9 unsupported_content_type
    send(&producer, &n.topic, Some("a"), None, &[]).await; // 10 empty_payload
    send_event(&producer, &n.topic, &created("good-2")).await; // 11
    send_event(&producer, &n.topic, &status_changed("good-1", "processing")).await; // 12

    wait_count(
        &app.db_url,
        "SELECT count(*) FROM orders WHERE external_id = 'good-1' AND status = 'processing'",
        1,
        WAIT,
    )
    .await;
    wait_count(&app.db_url, &order_sql("good-2"), 1, WAIT).await;

    let expected: BTreeMap<i64, &str> = [
        (1, "invalid_json"),
        (2, "validation_failed"),
        (3, "invalid_event"),
        (4, "unknown_order"),
        (5, "order_exists"),
        (6, "invalid_transition"),
        (7, "key_mismatch"),
        (8, "invalid_avro"),
        (9, "unsupported_content_type"),
        (10, "empty_payload"),
    ]
    .into_iter()
    .collect();

    // The table, through the API.
    let (status, page) = app.get_json("/api/dlq?limit=100").await;
    assert_eq!(status, 200, "{page}");
    let items = page["items"].as_array().unwrap();
    let got: BTreeMap<i64, &str> =
        items.iter().map(|i| (i["offset"].as_i64().unwrap(), i["reason"].as_str().unwrap())).collect();
    assert_eq!(got, expected);
    let by_offset = |o: i64| items.iter().find(|i| i["offset"] == o).unwrap();
    assert_eq!(by_offset(2)["payload"], wrong.to_string(), "the original bytes are kept");
    assert!(by_offset(2)["detail"].as_str().unwrap().contains("quantity"), "{}", by_offset(2));
    assert!(by_offset(6)["detail"].as_str().unwrap().contains("pending to delivered"), "{}", by_offset(6));
    assert_eq!(by_offset(1)["payload_encoding"], "base64");
    assert_eq!(by_offset(7)["headers"], json!([{"key": "content-type", "value": "application/json"}]));
    assert_eq!(by_offset(2)["event_id"], wrong["event_id"]);
    assert!(items.windows(2).all(|w| w[0]["id"].as_i64() > w[1]["id"].as_i64()), "newest first");
    let (_, only) = app.get_json("/api/dlq?reason=invalid_json").await;
    assert_eq!(only["items"].as_array().unwrap().len(), 1);
    let (_, first) = app.get_json("/api/dlq?limit=4").await;
    assert_eq!(first["items"].as_array().unwrap().len(), 4);
    let cursor = first["next_cursor"].as_str().unwrap();
    let (_, rest) = app.get_json(&format!("/api/dlq?limit=100&before={cursor}")).await;
    assert_eq!(rest["items"].as_array().unwrap().len(), 6);
    let (status, bad) = app.get_json("/api/dlq?limit=zero").await;
    assert_eq!((status, bad["code"].as_str()), (422, Some("validation_failed")));

    // The topic: the original message with headers naming the reason and origin.
    let dlq = read_topic(broker, &n.dlq, expected.len()).await;
    let mut seen = BTreeMap::new();
    for m in &dlq {
        let offset: i64 = header(m, "dlq-original-offset").unwrap().parse().unwrap();
        assert_eq!(header(m, "dlq-original-topic").as_deref(), Some(n.topic.as_str()));
        assert_eq!(header(m, "dlq-original-partition").as_deref(), Some("0"));
        assert!(chrono::DateTime::parse_from_rfc3339(&header(m, "dlq-time").unwrap()).is_ok());
        assert!(header(m, "dlq-detail").is_some_and(|d| !d.is_empty()));
        seen.insert(offset, header(m, "dlq-reason").unwrap());
        if offset == 1 {
            assert_eq!(
                header(m, "trace").map(String::into_bytes),
                Some(b"a\0b".to_vec()),
                "headers kept byte for byte"
            );
        }
        if offset == 2 {
            assert_eq!(m.payload(), Some(wrong.to_string().as_bytes()));
            assert_eq!(m.key(), Some(&b"bad-types"[..]));
            assert_eq!(header(m, "content-type").as_deref(), Some("application/json"));
        }
    }
    assert_eq!(seen, expected.iter().map(|(o, r)| (*o, r.to_string())).collect::<BTreeMap<_, _>>());
    eventually(WAIT, || async {
        let (_, h) = app.get_json("/api/health").await;
        (h["kafka"]["dlq_published"] == expected.len() && h["kafka"]["dlq_pending"] == 0).then_some(())
    })
    .await;

    let (_, stats) = app.get_json("/api/stats").await;
    assert_eq!(stats["ingest"]["dead_lettered"], expected.len(), "{stats}");
    assert_eq!(stats["ingest"]["written"], 3);
    // The same in /metrics, for alerts.
    let metrics = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for line in [
        format!("ordercast_kafka_dead_lettered_total {}", expected.len()),
        format!("ordercast_kafka_dlq_published_total {}", expected.len()),
        "ordercast_kafka_dlq_pending 0".to_string(),
        "ordercast_kafka_lag_total 0".to_string(),
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} not in {metrics}");
    }
    let db = app.sql().await;
    assert_eq!(stored(&db, &n).await, [(0, Some(13))], "the position moved past the poison");
}

/// A row the database itself rejects (a constraint a DBA added) is
/// dead-lettered alone; the rest of its batch commits.
pub async fn a_row_the_database_rejects_is_dead_lettered_alone(broker: &dyn Broker) {
    let n = names(broker, 1);
    let producer = producer(broker);
    let app = spawn_ingest(broker, &n, |s| s.kafka.batch_wait_ms = 500).await;
    app.sql()
        .await
        .batch_execute("ALTER TABLE orders ADD CONSTRAINT no_contraband CHECK (product <> 'Contraband')")
        .await
        .unwrap();
    let mut bad = created("db-bad");
    bad["order"]["product"] = json!("Contraband");
    for e in [created("db-good-1"), bad, created("db-good-2"), status_changed("db-good-1", "processing")] {
        send_event(&producer, &n.topic, &e).await;
    }
    wait_count(&app.db_url, "SELECT count(*) FROM orders WHERE external_id LIKE 'db-good-%'", 2, WAIT).await;
    wait_count(&app.db_url, "SELECT count(*) FROM orders WHERE status = 'processing'", 1, WAIT).await;
    let db = app.sql().await;
    let row = db.query_one("SELECT reason, detail, kafka_offset FROM dead_letters", &[]).await.unwrap();
    assert_eq!((row.get::<_, String>(0).as_str(), row.get::<_, i64>(2)), ("database_rejected", 1));
    assert!(row.get::<_, String>(1).contains("no_contraband"), "{}", row.get::<_, String>(1));
    assert_eq!(count(&db, &order_sql("db-bad")).await, 0);
}

/// Avro events — bare datum and single-object encoding, chosen by header or
/// by configuration — are applied like JSON; broken Avro is dead-lettered.
pub async fn avro_events_are_applied_like_json(broker: &dyn Broker) {
    let n = names(broker, 1);
    let producer = producer(broker);
    let app = spawn_ingest(broker, &n, |s| s.kafka.default_format = ordercast::ingest::settings::Format::Avro).await;
    let avro_ct: &[(&str, &[u8])] = &[("content-type", b"application/avro")];
    let mut create = created("avro-1");
    create["order"]["unit_price"] = json!("12.34");
    send(&producer, &n.topic, Some("avro-1"), Some(&avro::encode(&create).unwrap()), avro_ct).await;
    let framed = avro::encode_single_object(&status_changed("avro-1", "processing")).unwrap();
    send(&producer, &n.topic, Some("avro-1"), Some(&framed), &[]).await; // no header: configured default
    send_event(&producer, &n.topic, &status_changed("avro-1", "processed")).await; // JSON by header
    send(&producer, &n.topic, Some("avro-1"), Some(b"\xc3\x01 not this schema"), avro_ct).await;
    wait_count(
        &app.db_url,
        "SELECT count(*) FROM orders WHERE external_id = 'avro-1' AND status = 'processed'",
        1,
        WAIT,
    )
    .await;
    let o = order(&app, "avro-1").await.unwrap();
    assert_eq!((o["unit_price"].as_f64(), o["version"].as_i64()), (Some(12.34), Some(3)), "{o}");
    wait_count(
        &app.db_url,
        "SELECT count(*) FROM dead_letters WHERE reason = 'invalid_avro' AND kafka_offset = 3",
        1,
        WAIT,
    )
    .await;
}

/// The database goes away for a few seconds mid-stream: /api/health says
/// degraded, ingest retries without moving its position, and resumes by
/// itself; nothing is lost or doubled.
pub async fn a_database_outage_mid_stream_loses_nothing(broker: &dyn Broker) {
    let n = names(broker, 2);
    let app = spawn_ingest(broker, &n, |_| {}).await;
    let total = 400;
    let stream = {
        let producer = producer(broker);
        let topic = n.topic.clone();
        tokio::spawn(async move {
            for i in 0..total {
                send_event(&producer, &topic, &created(&format!("outage-{i}"))).await;
                send_event(&producer, &topic, &status_changed(&format!("outage-{i}"), "processing")).await;
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        })
    };
    wait_count(&app.db_url, "SELECT least(count(*), 20) FROM orders", 20, WAIT).await;

    // Refuse new connections to this database and cut the existing ones.
    let admin = ordercast::db::connect(&crate::helpers::admin_url()).await.unwrap();
    admin.batch_execute(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS false", app.db_name)).await.unwrap();
    admin
        .execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", &[&app.db_name])
        .await
        .unwrap();
    let degraded = eventually(Duration::from_secs(20), || async {
        let (status, h) = app.get_json("/api/health").await;
        (status == 503 && h["kafka"]["state"] == "degraded").then_some(h)
    })
    .await;
    assert!(degraded["kafka"]["last_error"].is_string(), "{degraded}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    admin.batch_execute(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS true", app.db_name)).await.unwrap();

    stream.await.unwrap();
    wait_count(&app.db_url, "SELECT count(*) FROM orders WHERE status = 'processing'", total, WAIT).await;
    assert_exactly_once(&app.sql().await, "outage", total, 2).await;
    let (status, h) = eventually(WAIT, || async {
        let (status, h) = app.get_json("/api/health").await;
        (status == 200).then_some((status, h))
    })
    .await;
    assert_eq!(status, 200);
    assert_eq!(h["kafka"]["state"], "running");
    assert_eq!(h["kafka"]["last_error"], Value::Null, "the error is gone with the outage: {h}");
    assert!(h["kafka"]["retries"].as_u64().unwrap() > 0, "{h}");
    assert_eq!(h["kafka"]["written"], 2 * total);
}

async fn produce_orders(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    prefix: &str,
    range: std::ops::Range<i64>,
) {
    for i in range {
        let id = format!("{prefix}-{i}");
        send_event(producer, topic, &created(&id)).await;
        send_event(producer, topic, &status_changed(&id, "processing")).await;
    }
}

/// ordercast is killed (SIGKILL) mid-stream after writing batches whose
/// positions never reached Kafka; restarted, it re-reads them from Kafka and
/// skips them: no order lost, none doubled.
pub async fn a_killed_process_restarts_without_loss_or_double(broker: &dyn Broker) {
    let partitions = 3;
    let n = names(broker, partitions);
    let db = Db::create().await;
    let producer = producer(broker);
    // Far more than the child can write between seeing 300 orders and the
    // kill, so the kill always lands mid-stream.
    let total = 3000;
    produce_orders(&producer, &n.topic, "crash", 0..total / 2).await;

    // Never commit to Kafka: every batch written is "between the write and
    // the Kafka commit" when the process dies.
    let mut first = Child::start(
        &db.url,
        broker,
        &n,
        &[("ORDERCAST_INGEST_COMMIT_INTERVAL_MS", "3600000"), ("ORDERCAST_INGEST_BATCH_MAX", "100")],
    );
    let more = {
        let producer = crate::kafka::producer(broker);
        let topic = n.topic.clone();
        tokio::spawn(async move { produce_orders(&producer, &topic, "crash", total / 2..total).await })
    };
    wait_count(&db.url, "SELECT least(count(*), 300) FROM orders", 300, WAIT).await;
    first.kill();
    let killed = tokio::time::Instant::now();
    let sql = db.sql().await;
    let written_before: i64 = count(&sql, "SELECT count(*) FROM orders").await;
    assert!(written_before < total, "killed mid-stream ({written_before} of {total} orders written)");
    let in_pg: i64 = stored(&sql, &n).await.iter().filter_map(|(_, o)| *o).sum();
    assert!(in_pg > 0, "positions were stored with the rows");
    // Kafka commits are off, but a rebalance (a slow join on a loaded machine)
    // still commits on revoke: what matters is that some written batches'
    // positions never reached Kafka.
    let in_kafka: i64 = committed(broker, &n, partitions).await.iter().map(|o| o.unwrap_or(0)).sum();
    assert!(in_pg > in_kafka, "some positions are only in PostgreSQL (PostgreSQL {in_pg}, Kafka {in_kafka})");

    more.await.unwrap();
    tokio::time::sleep_until(killed + broker.dead_member_wait()).await;
    let second = Child::start(&db.url, broker, &n, &[]);
    wait_count(&db.url, "SELECT count(*) FROM orders WHERE status = 'processing'", total, WAIT * 2).await;
    assert_exactly_once(&sql, "crash", total, 2).await;
    let health = eventually(WAIT, || async { second.health().await }).await;
    // The restart starts each partition at PostgreSQL's position, ahead of
    // Kafka's: nothing applied is read again.
    assert_eq!(health["kafka"]["redelivered"], 0, "the restart re-read applied messages: {health}");
    assert_eq!(health["kafka"]["duplicates"], 0);
}

/// Two instances in one group: a second joins mid-stream (rebalance), then
/// the first stops (rebalance again). Each message is applied by exactly one
/// of them.
pub async fn two_instances_share_partitions_through_rebalances(broker: &dyn Broker) {
    let n = names(broker, 4);
    let a = spawn_ingest(broker, &n, |s| s.kafka.batch_max = 50).await;
    let total = 1200;
    let stream = {
        let producer = producer(broker);
        let topic = n.topic.clone();
        tokio::spawn(async move {
            for chunk in 0..(total / 20) {
                produce_orders(&producer, &topic, "pair", chunk * 20..chunk * 20 + 20).await;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };
    wait_count(&a.db_url, "SELECT least(count(*), 100) FROM orders", 100, WAIT).await;
    let mut b = spawn_ingest_on(&a.db_url, broker, &n).await;
    eventually(WAIT, || async {
        (b.state.ingest.written.load(std::sync::atomic::Ordering::Relaxed) > 0).then_some(())
    })
    .await;
    let mut a = a;
    let a_partitions: BTreeSet<i32> = a.state.ingest.partitions.lock().unwrap().keys().copied().collect();
    assert!(a_partitions.len() < 4, "the first instance gave partitions away: {a_partitions:?}");
    a.stop().await;
    let a_written = a.state.ingest.written.load(std::sync::atomic::Ordering::Relaxed);

    stream.await.unwrap();
    wait_count(&b.db_url, "SELECT count(*) FROM orders WHERE status = 'processing'", total, WAIT * 2).await;
    assert_exactly_once(&b.sql().await, "pair", total, 2).await;
    let b_written = b.state.ingest.written.load(std::sync::atomic::Ordering::Relaxed);
    assert!(a_written > 0 && b_written > 0, "both wrote: {a_written} + {b_written}");
    assert_eq!(a_written + b_written, 2 * total as u64, "each event applied by exactly one instance");
    b.stop().await;
}

/// A partition paused because its stored position could not be read, taken
/// away by a rebalance (a second member joins) and given back once it can be
/// read (that member stops), is read again. librdkafka keeps a partition's
/// pause across a revoke and a new assignment; before, nothing resumed it,
/// and it was never read again while health said `running`.
pub async fn a_paused_partition_given_back_after_a_rebalance_is_read(broker: &dyn Broker) {
    use std::sync::atomic::Ordering::Relaxed;
    let n = names(broker, 2);
    let db_app = crate::helpers::spawn_app().await;
    let db = db_app.sql().await;
    db.batch_execute("ALTER TABLE kafka_offsets RENAME TO kafka_offsets_away").await.unwrap();
    // (assigned, awaiting) partitions of a member.
    let parts = |app: &TestApp| {
        let p = app.state.ingest.partitions.lock().unwrap();
        let assigned: BTreeSet<i32> = p.iter().filter(|(_, s)| s.assigned).map(|(p, _)| *p).collect();
        let awaiting: BTreeSet<i32> = p.iter().filter(|(_, s)| s.awaiting_position).map(|(p, _)| *p).collect();
        (assigned, awaiting)
    };
    let a = spawn_ingest_on_with(&db_app.db_url, broker, &n, |_| {}).await;
    eventually(WAIT, || async { (parts(&a).1.len() == 2).then_some(()) }).await;
    let mut b = spawn_ingest_on_with(&db_app.db_url, broker, &n, |_| {}).await;
    eventually(WAIT, || async { (parts(&a).0.len() == 1 && parts(&b).1.len() == 1).then_some(()) }).await;
    db.batch_execute("ALTER TABLE kafka_offsets_away RENAME TO kafka_offsets").await.unwrap();
    // Each member resumes the partition it waits for.
    eventually(WAIT, || async { (parts(&a).1.is_empty() && parts(&b).1.is_empty()).then_some(()) }).await;
    b.stop().await;
    eventually(WAIT, || async { (parts(&a).0.len() == 2).then_some(()) }).await;
    let producer = producer(broker);
    for i in 0..20 {
        send_event(&producer, &n.topic, &created(&format!("back-{i}"))).await;
    }
    wait_count(&db_app.db_url, "SELECT count(*) FROM orders WHERE external_id LIKE 'back-%'", 20, WAIT).await;
    let positions = stored(&db, &n).await;
    assert!(positions.iter().all(|(_, next)| next.is_some_and(|o| o > 0)), "both partitions read: {positions:?}");
    assert_eq!(a.state.ingest.written.load(Relaxed), 20);
}

/// Another group on a topic with five events applied and three more after
/// them: PostgreSQL knows it at offset 3, Kafka not at all (so with
/// `auto.offset.reset=latest` it would start at the log's end, 8). Returns the
/// first (stopped) app and the other group.
pub async fn known_at_3_to_postgresql_only_and_3_events_after(broker: &dyn Broker) -> (TestApp, crate::kafka::Names) {
    let n = names(broker, 1);
    let (producer, first) = crate::mock::five_applied_then_stopped(broker, &n, "before").await;
    let other = another_group(broker, &n);
    first
        .sql()
        .await
        .execute(
            "INSERT INTO kafka_offsets (group_id, kafka_topic, kafka_partition, next_offset) \
             SELECT $2, kafka_topic, kafka_partition, 3 FROM kafka_offsets WHERE group_id = $1",
            &[&n.group, &other.group],
        )
        .await
        .unwrap();
    assert_eq!(committed(broker, &other, 1).await, [None]);
    for i in 0..3 {
        send_event(&producer, &n.topic, &created(&format!("after-{i}"))).await;
    }
    (first, other)
}

/// The other group of `known_at_3_to_postgresql_only_and_3_events_after`
/// applied the events from its stored position on: 3 and 4 were applied by
/// the first group (duplicates by event id), 5 to 7 are written.
pub async fn applied_from_the_stored_position(app: &TestApp, other: &crate::kafka::Names) -> Value {
    wait_count(&app.db_url, "SELECT count(*) FROM orders WHERE external_id LIKE 'after-%'", 3, WAIT).await;
    let k = crate::kafka::counters_at(app, 8).await;
    assert_eq!((k["written"].as_u64(), k["duplicates"].as_u64()), (Some(3), Some(2)), "{k}");
    assert_eq!(position_and_generation(&app.sql().await, other).await, (Some(8), 0));
    k
}

/// A partition whose stored position cannot be read at assignment (here
/// `kafka_offsets` is briefly missing, as with a database that is down) is
/// paused until it can, then starts there: not where Kafka says, which for a
/// group Kafka has no offset for and `auto.offset.reset=latest` is the log's
/// end, past messages PostgreSQL never applied.
pub async fn a_partition_whose_stored_position_is_unreadable_at_assignment_waits_for_it(broker: &dyn Broker) {
    let (first, other) = known_at_3_to_postgresql_only_and_3_events_after(broker).await;
    let db = first.sql().await;
    db.batch_execute("ALTER TABLE kafka_offsets RENAME TO kafka_offsets_away").await.unwrap();

    let second = spawn_ingest_on_with(&first.db_url, broker, &other, |s| {
        s.kafka.properties = Some("auto.offset.reset=latest".into())
    })
    .await;
    eventually(WAIT, || async {
        let (_, h) = second.get_json("/api/health").await;
        let error = h["kafka"]["last_kafka_error"].as_str().unwrap_or_default().to_string();
        error.contains("stored positions not read at assignment").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, waiting) = second.get_json("/api/health").await;
    db.batch_execute("ALTER TABLE kafka_offsets_away RENAME TO kafka_offsets").await.unwrap();

    let k = applied_from_the_stored_position(&second, &other).await;
    let w = &waiting["kafka"];
    assert_eq!((w["state"].as_str(), &w["partitions"][0]["awaiting_position"]), (Some("degraded"), &Value::Bool(true)));
    assert_eq!(w["written"], 0, "{w}");
    assert_eq!((k["state"].as_str(), &k["partitions"][0]["awaiting_position"]), (Some("running"), &Value::Bool(false)));
}
