//! The scenarios against rdkafka's mock cluster: a real Kafka-protocol broker
//! inside the test process, listening on 127.0.0.1.

use std::time::Duration;

use rdkafka::message::Message;
use serde_json::Value;

use crate::kafka::Mock;

scenario_tests!(
    Some(Mock::start());
    events_become_rows_and_websocket_pushes,
    duplicate_events_change_nothing,
    a_dead_lettered_event_sent_again_in_its_batch_is_retried,
    poison_messages_are_dead_lettered_while_the_partition_flows,
    a_row_the_database_rejects_is_dead_lettered_alone,
    avro_events_are_applied_like_json,
    a_database_outage_mid_stream_loses_nothing,
    a_killed_process_restarts_without_loss_or_double,
    two_instances_share_partitions_through_rebalances,
    a_partition_whose_stored_position_is_unreadable_at_assignment_waits_for_it,
    a_paused_partition_given_back_after_a_rebalance_is_read,
);

/// An order_updated event that changes the line item of an order that has
/// left `pending` is dead-lettered as `order_locked`, in the batch with the
/// events that do apply; while pending, the same change applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_item_change_after_pending_is_dead_lettered_as_order_locked() {
    use crate::kafka::*;
    use serde_json::json;

    let broker = Mock::start();
    let n = names(&broker, 1);
    let app = spawn_ingest(&broker, &n, |s| s.kafka.batch_wait_ms = 300).await;
    let producer = producer(&broker);
    let update = |x: &str, order: Value| {
        let mut order = order;
        order["external_id"] = json!(x);
        event("order_updated", order)
    };
    send_event(&producer, &n.topic, &created("lock-1")).await; // 0
    send_event(&producer, &n.topic, &update("lock-1", json!({"quantity": 5}))).await; // 1 applies: pending
    send_event(&producer, &n.topic, &status_changed("lock-1", "processing")).await; // 2
    send_event(&producer, &n.topic, &update("lock-1", json!({"quantity": 6}))).await; // 3 order_locked
    send_event(&producer, &n.topic, &update("lock-1", json!({"unit_price": 1.25}))).await; // 4 order_locked
    send_event(&producer, &n.topic, &update("lock-1", json!({"quantity": 5, "customer_name": "Ada L."}))).await; // 5 applies
    send_event(&producer, &n.topic, &update("lock-1", json!({"status": "delivered", "quantity": 7}))).await; // 6 invalid_transition first
    send_event(&producer, &n.topic, &created("lock-2")).await; // 7

    wait_count(&app.db_url, "SELECT count(*) FROM orders WHERE external_id = 'lock-2'", 1, WAIT).await;
    let db = app.sql().await;
    let dead = dead_letters(&db).await;
    let got: Vec<(i64, &str)> = dead.iter().map(|(o, r, _)| (*o, r.as_str())).collect();
    assert_eq!(got, [(3, "order_locked"), (4, "order_locked"), (6, "invalid_transition")], "{dead:?}");
    assert!(dead[0].2.contains("is processing"), "{dead:?}");
    let row = db
        .query_one("SELECT quantity, customer_name, status, version FROM orders WHERE external_id = 'lock-1'", &[])
        .await
        .unwrap();
    let order: (i32, String, String, i32) = (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(order, (5, "Ada L.".to_string(), "processing".to_string(), 4));
}

/// A unique index a DBA added refuses a new order: that is the database
/// rejecting the row (`database_rejected`), not an existing order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dbas_unique_index_refusing_a_create_is_database_rejected_not_order_exists() {
    use crate::kafka::*;
    use serde_json::json;

    let broker = Mock::start();
    let n = names(&broker, 1);
    let app = spawn_ingest(&broker, &n, |s| s.kafka.batch_wait_ms = 300).await;
    app.sql().await.batch_execute("CREATE UNIQUE INDEX one_order_per_email ON orders (customer_email)").await.unwrap();
    let producer = producer(&broker);
    for x in ["uniq-1", "uniq-2", "uniq-3"] {
        let mut e = created(x);
        e["order"]["customer_email"] = json!(if x == "uniq-3" { "c@example.com" } else { "same@example.com" });
        send_event(&producer, &n.topic, &e).await;
    }
    send_event(&producer, &n.topic, &created("uniq-1")).await; // 3: this one does exist
    wait_count(&app.db_url, "SELECT count(*) FROM dead_letters", 2, WAIT).await;
    let db = app.sql().await;
    let dead = dead_letters(&db).await;
    let got: Vec<(i64, &str)> = dead.iter().map(|(o, r, _)| (*o, r.as_str())).collect();
    assert_eq!(got, [(1, "database_rejected"), (3, "order_exists")], "{dead:?}");
    assert!(dead[0].2.contains("one_order_per_email"), "{dead:?}");
    assert_eq!(count(&db, "SELECT count(*) FROM orders WHERE external_id IN ('uniq-1', 'uniq-3')").await, 2);
}

/// Ids a DBA wrote by hand ahead of the orders' id sequence: new orders
/// from Kafka skip them, as REST's do, and none is dead-lettered. Before,
/// each event whose drawn id was taken was dead-lettered as
/// `database_rejected`, one good event per taken id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_orders_skip_ids_written_by_hand_ahead_of_the_sequence() {
    use crate::kafka::*;

    let (_broker, n, app) = created_after_dba_sql(
        "INSERT INTO orders (id, customer_name, product, quantity, unit_price) \
         SELECT (SELECT COALESCE(max(id), 0) FROM orders) + g, 'By hand', 'Bolt', 1, 1 \
         FROM generate_series(1, 20) g",
        "after-hand",
        10,
    )
    .await;
    let db = app.sql().await;
    assert_eq!(count(&db, "SELECT count(*) FROM dead_letters").await, 0, "{:?}", dead_letters(&db).await);
    assert_eq!(stored(&db, &n).await, [(0, Some(10))]);
}

/// A database whose default `statement_timeout` is shorter than a batch
/// takes: the ingest's writes have their own limit and are not cut short.
/// Before, the same batch was cancelled at every try and the instance
/// stalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_statement_timeout_does_not_stall_the_ingest() {
    created_after_dba_sql(
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET statement_timeout = %L', current_database(), '5ms'); END $$",
        "timed",
        500,
    )
    .await;
}

/// The broker goes away for a while mid-stream: ingest pauses (health says
/// so) and resumes by itself; every event is applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_outage_pauses_ingest_and_loses_nothing() {
    use crate::kafka::*;

    let broker = Mock::start();
    let n = names(&broker, 2);
    let app = spawn_ingest(&broker, &n, |_| {}).await;
    let total = 150;
    // The stream waits after 50 orders until the broker is down: the outage
    // is mid-stream however fast the ingest catches up.
    let (down_tx, down_rx) = tokio::sync::oneshot::channel::<()>();
    let stream = {
        let producer = producer(&broker);
        let topic = n.topic.clone();
        let mut down = Some(down_rx);
        tokio::spawn(async move {
            for i in 0..total {
                if i == 50 {
                    let _ = down.take().unwrap().await;
                }
                // Sends wait for the broker's ack, so they pause with it.
                send_event(&producer, &topic, &created(&format!("brk-{i}"))).await;
                send_event(&producer, &topic, &status_changed(&format!("brk-{i}"), "processing")).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    wait_count(&app.db_url, "SELECT least(count(*), 20) FROM orders", 20, WAIT).await;
    broker.broker_down();
    down_tx.send(()).unwrap();
    let degraded = crate::helpers::eventually(Duration::from_secs(30), || async {
        let (status, h) = app.get_json("/api/health").await;
        (status == 503 && h["kafka"]["state"] == "degraded").then_some(h)
    })
    .await;
    assert!(degraded["kafka"]["last_kafka_error"].is_string(), "{degraded}");
    let during: i64 = app.sql().await.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get(0);
    assert!(during < total, "the outage happened mid-stream ({during} of {total} already in)");
    broker.broker_up();
    stream.await.unwrap();
    wait_count(&app.db_url, "SELECT count(*) FROM orders WHERE status = 'processing'", total, WAIT).await;
    assert_exactly_once(&app.sql().await, "brk", total, 2).await;
}

/// The consumer is refused on every fetch (its rights on the topic taken
/// away): health says degraded, with the broker's error, while that lasts,
/// and running again once messages flow; nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_refused_on_every_fetch_is_degraded_until_messages_flow_again() {
    use crate::kafka::*;

    let broker = Mock::start();
    let n = names(&broker, 1);
    let app = spawn_ingest(&broker, &n, |_| {}).await;
    let producer = producer(&broker);
    send_event(&producer, &n.topic, &created("refused-0")).await;
    wait_count(&app.db_url, "SELECT count(*) FROM orders", 1, WAIT).await;
    // Refused fetches are tried again about every 5 s: two make a stretch of
    // errors that lasts until the order below has been sent.
    broker.refuse_fetches(2);
    let degraded = crate::helpers::eventually(Duration::from_secs(20), || async {
        let (status, h) = app.get_json("/api/health").await;
        (status == 503 && h["kafka"]["state"] == "degraded").then_some(h)
    })
    .await;
    let error = degraded["kafka"]["last_kafka_error"].as_str().unwrap_or_default().to_lowercase();
    assert!(error.contains("authoriz"), "{degraded}");
    assert_eq!(degraded["kafka"]["consumer_failing"], true, "{degraded}");
    send_event(&producer, &n.topic, &created("refused-1")).await;
    wait_count(&app.db_url, "SELECT count(*) FROM orders", 2, WAIT).await;
    let h = crate::helpers::eventually(WAIT, || async {
        let (status, h) = app.get_json("/api/health").await;
        (status == 200).then_some(h)
    })
    .await;
    assert_eq!(
        (h["kafka"]["state"].as_str(), &h["kafka"]["consumer_failing"]),
        (Some("running"), &Value::Bool(false)),
        "{h}"
    );
}

/// A header key that is not UTF-8 (any client can send one) neither kills
/// the reader nor stops the ingest: the event it carries is applied, the
/// next one too, and health stays running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_key_that_is_not_utf8_does_not_stop_the_ingest() {
    use crate::kafka::*;

    let broker = Mock::start();
    let n = names(&broker, 1);
    let app = spawn_ingest(&broker, &n, |_| {}).await;
    let odd = created("odd-key-1").to_string();
    let headers: &[(&[u8], &[u8])] = &[(b"\xff", b"odd"), (b"Content-Type", b"application/json")];
    send_raw(&broker, &n.topic, b"odd-key-1", odd.as_bytes(), headers).await;
    send_event(&producer(&broker), &n.topic, &created("odd-key-2")).await;

    wait_count(&app.db_url, "SELECT count(*) FROM orders WHERE external_id LIKE 'odd-key-%'", 2, WAIT).await;
    let db = app.sql().await;
    assert_eq!(count(&db, "SELECT count(*) FROM dead_letters").await, 0);
    let (status, health) = app.get_json("/api/health").await;
    let k = &health["kafka"];
    assert_eq!((status, k["state"].as_str(), k["healthy"].as_bool()), (200, Some("running"), Some(true)), "{k}");
    assert_eq!((k["consumed"].as_i64(), &k["task_failure"]), (Some(2), &Value::Null), "{k}");
}

/// A message timestamp PostgreSQL cannot store (producers may set any) is
/// dead-lettered with a NULL message_timestamp instead of failing the insert
/// and stalling the partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_timestamp_postgresql_cannot_store_does_not_stall_the_partition() {
    use crate::kafka::*;
    use rdkafka::producer::FutureRecord;

    let broker = Mock::start();
    let n = names(&broker, 1);
    let app = spawn_ingest(&broker, &n, |_| {}).await;
    let producer = producer(&broker);
    let record =
        FutureRecord::<str, [u8]>::to(&n.topic).key("ts-bad").payload(b"not json").timestamp(-1_000_000_000_000_000);
    producer.send(record, Duration::from_secs(20)).await.map_err(|(e, _)| e).unwrap();
    send_event(&producer, &n.topic, &created("ts-good")).await;

    wait_count(&app.db_url, "SELECT count(*) FROM orders WHERE external_id = 'ts-good'", 1, WAIT).await;
    let db = app.sql().await;
    let row =
        db.query_one("SELECT reason, kafka_offset, message_timestamp IS NULL FROM dead_letters", &[]).await.unwrap();
    assert_eq!(
        (row.get::<_, String>(0).as_str(), row.get::<_, i64>(1), row.get::<_, bool>(2)),
        ("invalid_json", 0, true)
    );
    let dlq = read_topic(&broker, &n.dlq, 1).await;
    assert_eq!(header(&dlq[0], "dlq-original-timestamp").as_deref(), Some(""), "unknown");
}

/// Two deployments sharing one database: each publishes only the dead
/// letters of its own group and topic, to its own dead-letter topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_of_another_group_or_topic_are_left_to_their_owner() {
    use crate::kafka::*;

    let broker = Mock::start();
    let n = names(&broker, 1);
    let app = spawn_ingest(&broker, &n, |_| {}).await;
    let db = app.sql().await;
    db.batch_execute(
        "INSERT INTO dead_letters (group_id, kafka_topic, kafka_partition, kafka_offset, payload, reason, detail) \
         VALUES ('another-group', 'another-topic', 0, 0, 'theirs', 'invalid_json', 'not ours')",
    )
    .await
    .unwrap();
    send(&producer(&broker), &n.topic, Some("poison"), Some(b"ours"), &[]).await;

    let own =
        format!("SELECT count(*) FROM dead_letters WHERE kafka_topic = '{}' AND published_at IS NOT NULL", n.topic);
    wait_count(&app.db_url, &own, 1, WAIT).await;
    let dlq = read_topic(&broker, &n.dlq, 1).await;
    assert_eq!(dlq[0].payload(), Some(&b"ours"[..]));
    assert_eq!(header(&dlq[0], "dlq-group").as_deref(), Some(n.group.as_str()));
    assert_eq!(high_watermark(&broker, &n.dlq).await, 1, "only our dead letter reached our dead-letter topic");
    let theirs = "SELECT count(*) FROM dead_letters WHERE group_id = 'another-group' AND published_at IS NULL";
    assert_eq!(count(&db, theirs).await, 1, "their row stays for their publisher");
    crate::helpers::eventually(WAIT, || async {
        let (_, h) = app.get_json("/api/health").await;
        (h["kafka"]["dlq_pending"] == 0 && h["kafka"]["dlq_published"] == 1).then_some(())
    })
    .await;
}

/// Two consumer groups ingesting the same topic into one database (two
/// deployments sharing it, or a blue/green switch to a new group) both
/// reject the same poison message: each records its own dead letter and
/// publishes it to its own dead-letter topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_reading_one_topic_each_record_and_publish_their_dead_letter() {
    use crate::kafka::*;

    let broker = Mock::start();
    let blue = names(&broker, 1);
    let green = another_group(&broker, &blue);
    send(&producer(&broker), &blue.topic, Some("poison"), Some(b"not json"), &[]).await;

    let mut first = spawn_ingest(&broker, &blue, |_| {}).await;
    let published = |group: &str| {
        format!("SELECT count(*) FROM dead_letters WHERE group_id = '{group}' AND published_at IS NOT NULL")
    };
    wait_count(&first.db_url, &published(&blue.group), 1, WAIT).await;
    let second = spawn_ingest_on(&first.db_url, &broker, &green).await;
    wait_count(&second.db_url, &published(&green.group), 1, WAIT).await;

    let db = second.sql().await;
    let rows = db
        .query("SELECT group_id, kafka_offset, reason FROM dead_letters ORDER BY group_id = $1 DESC", &[&blue.group])
        .await
        .unwrap();
    let got: Vec<(String, i64, String)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(
        got,
        [(blue.group.clone(), 0, "invalid_json".to_string()), (green.group.clone(), 0, "invalid_json".to_string())]
    );
    for n in [&blue, &green] {
        let dlq = read_topic(&broker, &n.dlq, 1).await;
        assert_eq!(dlq[0].payload(), Some(&b"not json"[..]));
        assert_eq!(header(&dlq[0], "dlq-group").as_deref(), Some(n.group.as_str()));
        assert_eq!(header(&dlq[0], "dlq-original-offset").as_deref(), Some("0"));
        assert_eq!(high_watermark(&broker, &n.dlq).await, 1, "one dead letter on {}", n.dlq);
    }
    assert_eq!(first.state.ingest.dead_lettered.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(second.state.ingest.dead_lettered.load(std::sync::atomic::Ordering::Relaxed), 1);
    first.stop().await;
}

/// Five created events (`{prefix}-0` ..), applied by an ingest that is then
/// stopped; its producer and (stopped) app are handed back.
pub async fn five_applied_then_stopped(
    broker: &dyn crate::kafka::Broker,
    n: &crate::kafka::Names,
    prefix: &str,
) -> (rdkafka::producer::FutureProducer, crate::helpers::TestApp) {
    use crate::kafka::*;

    let producer = producer(broker);
    for i in 0..5 {
        send_event(&producer, &n.topic, &created(&format!("{prefix}-{i}"))).await;
    }
    let mut app = spawn_ingest(broker, n, |_| {}).await;
    let sql = format!("SELECT count(*) FROM orders WHERE external_id LIKE '{prefix}-%'");
    wait_count(&app.db_url, &sql, 5, WAIT).await;
    app.stop().await;
    (producer, app)
}

/// The outcome of a reset after `five_applied_then_stopped` and three new
/// events: the log read again from its start (the 5 events applied before
/// are duplicates, the 3 new ones written), the position at 8 in generation
/// 1. Returns the ingest's counters from `/api/health`.
async fn read_again_from_the_start(
    db: &tokio_postgres::Client,
    n: &crate::kafka::Names,
    app: &crate::helpers::TestApp,
) -> Value {
    use crate::kafka::*;

    assert_eq!(position_and_generation(db, n).await, (Some(8), 1));
    let k = counters_at(app, 8).await;
    assert_eq!(
        (k["log_resets"].as_u64(), k["written"].as_u64(), k["duplicates"].as_u64()),
        (Some(1), Some(3), Some(5)),
        "read again from the start: the 5 events applied before are duplicates: {k}"
    );
    k
}

/// A log end below the stored position is not enough to start over: when
/// the messages below the position are not newer than the position's last
/// move, they are redeliveries (a log end reported too low: another
/// isolation level, a broker whose end moved back), never a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_end_below_the_position_with_only_older_messages_is_no_reset() {
    use crate::kafka::*;

    let broker = Mock::start();
    let n = names(&broker, 1);
    let (producer, first) = five_applied_then_stopped(&broker, &n, "old").await;
    for i in 0..3 {
        send_event(&producer, &n.topic, &created(&format!("later-{i}"))).await;
    }
    // As if the position had been stored past these messages after they
    // were produced, and the broker now reported an end below it.
    let db = first.sql().await;
    db.execute(
        "UPDATE kafka_offsets SET next_offset = 1000, updated_at = now() + interval '1 hour' WHERE group_id = $1",
        &[&n.group],
    )
    .await
    .unwrap();

    let second = spawn_ingest_on(&first.db_url, &broker, &n).await;
    let k = crate::helpers::eventually(WAIT, || async {
        let (_, health) = second.get_json("/api/health").await;
        (health["kafka"]["redelivered"].as_u64() == Some(3)).then(|| health["kafka"].clone())
    })
    .await;
    assert_eq!((k["log_resets"].as_u64(), k["written"].as_u64()), (Some(0), Some(0)), "{k}");
    assert_eq!(count(&db, "SELECT count(*) FROM orders WHERE external_id LIKE 'later-%'").await, 0);
    assert_eq!(stored(&db, &n).await, [(0, Some(1000))]);
}

/// A stored position beyond the end of its partition's log cannot belong to
/// that log (here: as if the topic had been recreated while Kafka kept the
/// group's committed offset): the messages below it are not skipped as
/// redeliveries. The consumer started inside the log, so the partition is
/// read again from the log's start first; events applied before are
/// duplicates, the others are applied, and the reset is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_position_beyond_the_logs_end_is_reset_and_the_log_read_from_its_start() {
    use crate::kafka::*;

    let broker = Mock::start();
    let n = names(&broker, 1);
    let (producer, first) = five_applied_then_stopped(&broker, &n, "before").await; // commits 5 to Kafka
    assert_eq!(committed(&broker, &n, 1).await, [Some(5)]);
    let db = first.sql().await;
    db.execute("UPDATE kafka_offsets SET next_offset = 1000 WHERE group_id = $1", &[&n.group]).await.unwrap();
    for i in 0..3 {
        send_event(&producer, &n.topic, &created(&format!("after-{i}"))).await;
    }

    let second = spawn_ingest_on(&first.db_url, &broker, &n).await;
    wait_count(&second.db_url, "SELECT count(*) FROM orders WHERE external_id LIKE 'after-%'", 3, WAIT).await;
    // `redelivered` is not asserted: a batch queued before the seek back
    // may come after the reset, and its messages are then below the new
    // position (nothing of them is applied twice: `written` says so).
    read_again_from_the_start(&db, &n, &second).await;
    assert_eq!(count(&db, "SELECT count(*) FROM dead_letters").await, 0);
    let metrics = second.http.get(second.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("ordercast_kafka_log_resets_total 1"), "{metrics}");
}

/// Asking the broker where a log ends happens between transactions: a slow
/// broker does not hold the partition's position locked (another instance,
/// or a DBA, can take the lock meanwhile), and a broker that fails to answer
/// (librdkafka may turn a failed ListOffsets into an "empty log") is asked
/// again, after which the reset is applied as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_is_asked_where_a_log_ends_outside_the_positions_lock_and_again_after_an_error() {
    use crate::kafka::*;

    let broker = Mock::start();
    let n = names(&broker, 1);
    let (producer, first) = five_applied_then_stopped(&broker, &n, "before").await;
    let db = first.sql().await;
    assert_eq!(committed(&broker, &n, 1).await, [Some(5)]);
    // As if the log had been recreated after the position last moved: every
    // message in it is newer than that move, however the slowed broker cuts
    // the batches.
    db.execute(
        "UPDATE kafka_offsets SET next_offset = 1000, updated_at = now() - interval '1 hour' WHERE group_id = $1",
        &[&n.group],
    )
    .await
    .unwrap();
    broker.round_trip_time(Duration::from_millis(1500));
    // The outbox relay asks where logs end too, when it takes over: off, so
    // that the failed answers below are the ingest's.
    let second = spawn_ingest_on_with(&first.db_url, &broker, &n, |s| s.workflow.outbox_topic.clear()).await;
    // The assignment's own check of the stored position asks first, and
    // pauses the partition should it fail; once the partition is started
    // (at the committed offset: the position is beyond the log's end), the
    // next failures meet the writer's question about the new messages.
    crate::helpers::eventually(WAIT, || async {
        let (_, h) = second.get_json("/api/health").await;
        (h["kafka"]["partitions"][0]["awaiting_position"] == false).then_some(())
    })
    .await;
    broker.fail_list_offsets(2);
    for i in 0..3 {
        send_event(&producer, &n.topic, &created(&format!("after-{i}"))).await;
    }
    // Until the reset is applied, the position's row can be locked within
    // a second at any time (a loaded machine may hold a short transaction
    // a while): the writer holds it only while its short transactions run,
    // never across the broker's 1.5 s answers.
    let probe = first.sql().await;
    probe.batch_execute("SET lock_timeout = '1s'").await.unwrap();
    let (mut probes, deadline) = (0, tokio::time::Instant::now() + WAIT);
    while count(&db, "SELECT count(*) FROM orders WHERE external_id LIKE 'after-%'").await < 3 {
        assert!(tokio::time::Instant::now() < deadline, "the new log was not applied");
        let locked = probe
            .batch_execute(&format!(
                "BEGIN; SELECT 1 FROM kafka_offsets WHERE group_id = '{}' FOR UPDATE; ROLLBACK",
                n.group
            ))
            .await;
        if let Err(e) = locked {
            panic!("the position's row stayed locked for 500 ms: {e:?}");
        }
        probes += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(probes >= 5, "too few probes ({probes}) to have covered a broker answer");
    // (A failed answer taken for an empty log would have reset the partition
    // from offset 5 on and skipped 0-4.)
    let k = read_again_from_the_start(&db, &n, &second).await;
    assert!(k["retries"].as_u64() >= Some(1), "the failed question was asked again: {k}");
}

/// An assigned partition starts at the position PostgreSQL stored, not at
/// Kafka's committed offset, which is only a courtesy copy: here a group
/// Kafka has no offset for (never committed before a crash, or expired
/// after a long stop) with `auto.offset.reset=latest` would otherwise start
/// at the log's end and never apply the messages after the stored position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_starts_at_the_position_postgresql_stored_not_where_kafka_says() {
    use crate::kafka::*;

    let broker = Mock::start();
    let n = names(&broker, 1);
    let (producer, first) = five_applied_then_stopped(&broker, &n, "before").await;
    // Another group on the same topic that PostgreSQL knows at offset 3 and
    // Kafka not at all.
    let other = another_group(&broker, &n);
    let db = first.sql().await;
    db.execute(
        "INSERT INTO kafka_offsets (group_id, kafka_topic, kafka_partition, next_offset) \
         SELECT $2, kafka_topic, kafka_partition, 3 FROM kafka_offsets WHERE group_id = $1",
        &[&n.group, &other.group],
    )
    .await
    .unwrap();
    assert_eq!(committed(&broker, &other, 1).await, [None]);
    for i in 0..3 {
        send_event(&producer, &n.topic, &created(&format!("after-{i}"))).await;
    }

    let second = spawn_ingest_on_with(&first.db_url, &broker, &other, |s| {
        s.kafka.properties = Some("auto.offset.reset=latest".into())
    })
    .await;
    wait_count(&second.db_url, "SELECT count(*) FROM orders WHERE external_id LIKE 'after-%'", 3, WAIT).await;
    let k = &counters_at(&second, 8).await;
    // 3 and 4 were applied by the first group: duplicates by event id.
    assert_eq!((k["written"].as_u64(), k["duplicates"].as_u64()), (Some(3), Some(2)), "{k}");
    assert_eq!(position_and_generation(&db, &other).await, (Some(8), 0));
}

/// The same when the stored position is read but the partition's log end,
/// which it is checked against, cannot be (the broker fails the question):
/// the partition is paused until the check can be made, then starts at its
/// stored position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_whose_log_end_is_unknown_at_assignment_waits_for_it() {
    use crate::kafka::*;

    let broker = Mock::start();
    let (first, other) = crate::scenarios::known_at_3_to_postgresql_only_and_3_events_after(&broker).await;
    // Both halves of the assignment's question (log start and end) fail.
    broker.fail_list_offsets(2);
    // The outbox relay, which asks where logs end when it takes over, is
    // off: the failed answers are the ingest's.
    let second = spawn_ingest_on_with(&first.db_url, &broker, &other, |s| {
        s.kafka.properties = Some("auto.offset.reset=latest".into());
        s.workflow.outbox_topic.clear();
    })
    .await;
    let k = crate::scenarios::applied_from_the_stored_position(&second, &other).await;
    let error = k["last_kafka_error"].as_str().unwrap_or_default();
    assert!(error.contains("log end not read at assignment"), "{k}");
}

/// A deferred constraint a DBA added (here a DEFERRABLE INITIALLY DEFERRED
/// foreign key to a products table) refuses one event's row only at COMMIT:
/// the batch is redone one message at a time with constraints checked per
/// statement, so only that event is dead-lettered, the others apply and the
/// partition moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_constraint_refusing_one_event_dead_letters_it_alone() {
    use crate::kafka::*;
    use serde_json::json;

    let broker = Mock::start();
    let n = names(&broker, 1);
    let app = ingest_after_dba_sql(
        &broker,
        &n,
        "CREATE TABLE products (name text PRIMARY KEY); \
         INSERT INTO products VALUES ('Widget'); \
         ALTER TABLE orders ADD CONSTRAINT orders_product_fk FOREIGN KEY (product) REFERENCES products (name) \
             DEFERRABLE INITIALLY DEFERRED",
    )
    .await;
    let producer = producer(&broker);
    let mut bad = created("fk-bad");
    bad["order"]["product"] = json!("Unlisted");
    let good = |x: &str| {
        let mut e = created(x);
        e["order"]["product"] = json!("Widget");
        e
    };
    for e in [good("fk-good-1"), bad, good("fk-good-2"), status_changed("fk-good-1", "processing")] {
        send_event(&producer, &n.topic, &e).await;
    }
    wait_count(&app.db_url, "SELECT count(*) FROM dead_letters", 1, WAIT).await;
    wait_count(&app.db_url, "SELECT count(*) FROM orders WHERE external_id LIKE 'fk-good-%'", 2, WAIT).await;
    wait_count(&app.db_url, "SELECT count(*) FROM orders WHERE status = 'processing'", 1, WAIT).await;
    only_the_culprit_was_dead_lettered(&app, &producer, &n, "fk-bad", &["orders_product_fk"], &good("fk-good-3")).await;
}

/// An ingest server (batches of up to 500 ms) on a database where a DBA ran
/// `sql` first.
async fn ingest_after_dba_sql(broker: &Mock, n: &crate::kafka::Names, sql: &str) -> crate::helpers::TestApp {
    let app = crate::kafka::spawn_ingest(broker, n, |s| s.kafka.batch_wait_ms = 500).await;
    app.sql().await.batch_execute(sql).await.unwrap();
    app
}

/// An ingest server on a database where a DBA ran `sql` first, once the
/// `orders` new orders sent to it (external ids `{prefix}-0`, ...) are all
/// in the database.
async fn created_after_dba_sql(
    sql: &str,
    prefix: &str,
    orders: usize,
) -> (crate::kafka::Mock, crate::kafka::Names, crate::helpers::TestApp) {
    use crate::kafka::*;
    let broker = Mock::start();
    let n = names(&broker, 1);
    let app = ingest_after_dba_sql(&broker, &n, sql).await;
    let producer = producer(&broker);
    for i in 0..orders {
        send_event(&producer, &n.topic, &created(&format!("{prefix}-{i}"))).await;
    }
    let applied = format!("SELECT count(*) FROM orders WHERE external_id LIKE '{prefix}-%'");
    wait_count(&app.db_url, &applied, orders as i64, WAIT).await;
    (broker, n, app)
}

/// After four events, one of them `bad`: `bad` alone was dead-lettered
/// (`database_rejected`, its detail naming each of `detail`), and the
/// partition moves on: `next` applies, and the stored position is after it;
/// the change log's sequencer still ran at commit (positions are unique).
async fn only_the_culprit_was_dead_lettered(
    app: &crate::helpers::TestApp,
    producer: &rdkafka::producer::FutureProducer,
    n: &crate::kafka::Names,
    bad: &str,
    detail: &[&str],
    next: &Value,
) {
    use crate::kafka::{count, dead_letters, send_event, stored, wait_count, WAIT};
    let db = app.sql().await;
    let dead = dead_letters(&db).await;
    assert_eq!((dead[0].0, dead[0].1.as_str()), (1, "database_rejected"), "{dead:?}");
    assert!(detail.iter().all(|d| dead[0].2.contains(d)), "{dead:?}");
    assert_eq!(count(&db, &format!("SELECT count(*) FROM orders WHERE external_id = '{bad}'")).await, 0);
    send_event(producer, &n.topic, next).await;
    let next_id = next["order"]["external_id"].as_str().unwrap();
    wait_count(&app.db_url, &format!("SELECT count(*) FROM orders WHERE external_id = '{next_id}'"), 1, WAIT).await;
    assert_eq!(stored(&db, n).await, [(0, Some(5))]);
    assert_eq!(count(&db, "SELECT count(*) - count(DISTINCT end_pos) FROM change_tx").await, 0);
}

/// A row refused only at COMMIT, even with every constraint made immediate:
/// a DBA's trigger on `change_tx` runs when the change log's sequencer gives
/// the transaction its positions, which is at commit (here it copies the
/// committed changes into an audit table whose CHECK refuses one order's
/// quantity). The batch fails at COMMIT, and so does its careful redo; the
/// batch is then applied one transaction per message: the culprit's own
/// COMMIT fails, it is dead-lettered with the reason, the others apply
/// exactly once and the partition moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_refused_only_at_commit_dead_letters_its_message_alone() {
    use crate::kafka::*;
    use serde_json::json;

    let broker = Mock::start();
    let n = names(&broker, 1);
    let app = ingest_after_dba_sql(
        &broker,
        &n,
        "CREATE TABLE order_audit (pos bigint PRIMARY KEY, order_id bigint NOT NULL, \
                                   quantity int NOT NULL CHECK (quantity <= 100)); \
         CREATE FUNCTION order_audit_committed() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN \
             IF OLD.end_pos IS NULL AND NEW.end_pos IS NOT NULL THEN \
                 INSERT INTO order_audit \
                 SELECT NEW.base_pos + ord, order_id, (after_row ->> 'quantity')::int \
                 FROM change_log WHERE txid = NEW.txid; \
             END IF; \
             RETURN NULL; \
         END $$; \
         CREATE TRIGGER order_audit_committed AFTER UPDATE ON change_tx \
             FOR EACH ROW EXECUTE FUNCTION order_audit_committed()",
    )
    .await;
    let producer = producer(&broker);
    let mut bad = created("ac-bad");
    bad["order"]["quantity"] = json!(1000);
    for e in [created("ac-good-1"), bad, created("ac-good-2"), status_changed("ac-good-1", "processing")] {
        send_event(&producer, &n.topic, &e).await;
    }
    wait_count(&app.db_url, "SELECT count(*) FROM dead_letters", 1, WAIT).await;
    wait_count(&app.db_url, "SELECT count(*) FROM orders WHERE status = 'processing'", 1, WAIT).await;
    let db = app.sql().await;
    // Exactly once: two creates and one status change, each audited once.
    assert_eq!(count(&db, "SELECT count(*) FROM orders WHERE external_id LIKE 'ac-good-%'").await, 2);
    assert_eq!(count(&db, "SELECT version::bigint FROM orders WHERE external_id = 'ac-good-1'").await, 2);
    assert_eq!(count(&db, "SELECT count(*) FROM order_audit").await, 3);
    only_the_culprit_was_dead_lettered(
        &app,
        &producer,
        &n,
        "ac-bad",
        &["order_audit_quantity_check", "COMMIT"],
        &created("ac-good-3"),
    )
    .await;
    let (_, health) = app.get_json("/api/health").await;
    assert_eq!(health["kafka"]["dead_lettered"], 1, "{health}");
}

/// Old event ids and published dead letters are pruned all at once, however
/// many are due: more than one pruning round's worth of each is gone after
/// the start's pruning, while recent ones stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_removes_every_expired_event_id_and_dead_letter_not_just_one_round() {
    use crate::kafka::*;
    use ordercast::ingest::writer::PRUNE_ROUND;

    let broker = Mock::start();
    let n = names(&broker, 1);
    let db = Db::create().await;
    let sql = db.sql().await;
    let expired = PRUNE_ROUND * 2 + 10;
    sql.execute(
        "INSERT INTO ingested_events (event_id, kafka_topic, kafka_partition, kafka_offset, occurred_at, ingested_at) \
         SELECT gen_random_uuid(), 'old', 0, i, now(), now() - interval '8 days' FROM generate_series(1, $1::bigint) AS i",
        &[&expired],
    )
    .await
    .unwrap();
    sql.execute(
        "INSERT INTO dead_letters (group_id, kafka_topic, kafka_partition, kafka_offset, reason, detail, received_at, \
                                   published_at) \
         SELECT 'old', 'old', 0, i, 'invalid_json', 'x', now() - interval '31 days', now() - interval '31 days' \
         FROM generate_series(1, $1::bigint) AS i",
        &[&(PRUNE_ROUND + 10)],
    )
    .await
    .unwrap();
    sql.batch_execute(
        "INSERT INTO ingested_events (event_id, kafka_topic, kafka_partition, kafka_offset, occurred_at) \
         VALUES (gen_random_uuid(), 'recent', 0, 0, now())",
    )
    .await
    .unwrap();

    let _app = spawn_ingest_on(&db.url, &broker, &n).await;
    wait_count(&db.url, "SELECT (count(*) = 0)::int::bigint FROM dead_letters", 1, WAIT).await;
    wait_count(&db.url, "SELECT (count(*) = 1)::int::bigint FROM ingested_events", 1, WAIT).await;
    let recent = count(&sql, "SELECT count(*) FROM ingested_events WHERE kafka_topic = 'recent'").await;
    assert_eq!(recent, 1, "ids within the dedupe window stay");
}

/// Pruning that fails (here a trigger refuses its DELETE, as a revoked
/// permission would) is tried again soon, with backoff, not after its
/// 5-minute period: once the cause is gone, the expired event ids go within
/// seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_pruning_is_retried_with_backoff_not_after_its_period() {
    use crate::kafka::*;

    let broker = Mock::start();
    let n = names(&broker, 1);
    let db = Db::create().await;
    let sql = db.sql().await;
    // Each refused pruning counts itself in a sequence (not rolled back with it).
    sql.batch_execute(
        "INSERT INTO ingested_events (event_id, kafka_topic, kafka_partition, kafka_offset, occurred_at, ingested_at) \
         SELECT gen_random_uuid(), 'old', 0, i, now(), now() - interval '8 days' FROM generate_series(1, 10) AS i; \
         CREATE SEQUENCE prunes_refused; \
         CREATE FUNCTION refuse_pruning() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN \
             PERFORM nextval('prunes_refused'); \
             RAISE EXCEPTION 'permission denied for table ingested_events' USING ERRCODE = '42501'; \
         END $$; \
         CREATE TRIGGER refuse_pruning BEFORE DELETE ON ingested_events \
             FOR EACH STATEMENT EXECUTE FUNCTION refuse_pruning()",
    )
    .await
    .unwrap();
    let refused = "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM prunes_refused";

    let _app = spawn_ingest_on(&db.url, &broker, &n).await;
    // Tried again and again while it fails (0.1 s, 0.2 s, 0.4 s, ...).
    let bound = Duration::from_secs(20);
    let start = std::time::Instant::now();
    while count(&sql, refused).await < 3 {
        assert!(start.elapsed() < bound, "{} refused prunings after {bound:?}", count(&sql, refused).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(count(&sql, "SELECT count(*) FROM ingested_events").await, 10);
    // The cause is gone: pruning succeeds at the next try, well before 5 minutes.
    sql.batch_execute("DROP TRIGGER refuse_pruning ON ingested_events").await.unwrap();
    wait_count(&db.url, "SELECT (count(*) = 0)::int::bigint FROM ingested_events", 1, bound).await;
}

/// Shutdown does not wait for a pruning that cannot finish (here it waits
/// for a lock an open transaction holds): the ingest stops at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_a_stuck_pruning() {
    use crate::kafka::*;

    let broker = Mock::start();
    let n = names(&broker, 1);
    let db = Db::create().await;
    let mut locker = db.sql().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE ingested_events IN ACCESS EXCLUSIVE MODE").await.unwrap();

    let mut app = spawn_ingest_on(&db.url, &broker, &n).await;
    // This database's alone: other tests' ingests wait for locks too.
    let waiting = "SELECT count(*) FROM pg_stat_activity \
                   WHERE application_name = 'ordercast-ingest' AND wait_event_type = 'Lock' \
                     AND datname = current_database()";
    wait_count(&db.url, waiting, 1, WAIT).await;
    let start = std::time::Instant::now();
    app.stop().await;
    // Without waiting for the pruner, a stop takes about a second (leaving
    // the group); the application gives up on the ingest after 10 s.
    assert!(start.elapsed() < Duration::from_secs(5), "stopping took {:?}", start.elapsed());
    lock.rollback().await.unwrap();
}

/// Dead letters the dead-letter topic cannot take as they are do not hold
/// up the others: a message just under the size limit, which its dead-letter
/// headers push over it, is published without its key, value and headers
/// (a `dlq-omitted` header says so); a key mismatch with a huge key is
/// published whole, its detail cut; the dead letters after them are
/// published too, and the ingest stays healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_too_large_for_the_dead_letter_topic_does_not_block_the_others() {
    use crate::kafka::*;
    use rdkafka::message::Message;

    let broker = Mock::start();
    let n = names(&broker, 1);
    let producer = producer(&broker);
    // librdkafka's message.max.bytes is 1,000,000 (key + value + headers).
    let near_limit = vec![b'x'; 999_800];
    send(&producer, &n.topic, Some("big-1"), Some(&near_limit), &[]).await; // 0 invalid_json
    let key = "k".repeat(400_000);
    let mut padded = created("kb").to_string();
    padded.push_str(&" ".repeat(400_000));
    send(&producer, &n.topic, Some(&key), Some(padded.as_bytes()), &[]).await; // 1 key_mismatch
    send(&producer, &n.topic, Some("small"), Some(b"not json"), &[]).await; // 2 invalid_json
    let app = spawn_ingest(&broker, &n, |_| {}).await;

    let dlq = read_topic(&broker, &n.dlq, 3).await;
    let by_offset = |o: &str| dlq.iter().find(|m| header(m, "dlq-original-offset").as_deref() == Some(o)).unwrap();
    let big = by_offset("0");
    assert_eq!((big.payload(), big.key()), (None, Some(&b"big-1"[..])));
    assert_eq!(header(big, "dlq-reason").as_deref(), Some("invalid_json"));
    assert!(header(big, "dlq-omitted").unwrap().contains("999800 of value"), "{:?}", header(big, "dlq-omitted"));
    let mismatch = by_offset("1");
    assert_eq!(mismatch.payload(), Some(padded.as_bytes()), "published whole");
    assert_eq!(mismatch.key(), Some(key.as_bytes()));
    assert!(header(mismatch, "dlq-detail").unwrap().len() < 1200, "the detail is cut");
    assert_eq!(by_offset("2").payload(), Some(&b"not json"[..]));
    let k = crate::helpers::eventually(WAIT, || async {
        let (_, h) = app.get_json("/api/health").await;
        (h["kafka"]["dlq_published"] == 3 && h["kafka"]["dlq_pending"] == 0).then(|| h["kafka"].clone())
    })
    .await;
    assert_eq!((k["state"].as_str(), &k["dlq_error"]), (Some("running"), &Value::Null), "{k}");
    let db = app.sql().await;
    assert_eq!(count(&db, "SELECT count(*) FROM dead_letters WHERE published_at IS NULL").await, 0);
    let original: Vec<u8> =
        db.query_one("SELECT payload FROM dead_letters WHERE kafka_offset = 0", &[]).await.unwrap().get(0);
    assert_eq!(original.len(), 999_800, "the original is kept in the table");
}

/// Messages read twice within one batch (a seek back, or a rebalance that
/// fetched again what the batch already held) are redeliveries of the copies
/// before them. Before, a copy was linked to the first only by event id, so
/// the copy of a dead-lettered event was applied on its own merits, after
/// the event that followed it: here the order ended `shipped` (processed,
/// then the dead-lettered `shipped` again) instead of `processed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_read_twice_in_one_batch_counts_once() {
    use ordercast::ingest::writer::{Fate, Writer};
    use ordercast::ingest::Batch;

    let app = crate::helpers::spawn_app().await;
    let id = "twice-1";
    let events = [
        (9, crate::kafka::created(id)),
        (10, crate::kafka::status_changed(id, "shipped")),
        (11, crate::kafka::status_changed(id, "processed")),
    ];
    let message = |offset: i64, e: &Value| message(offset, id.as_bytes(), &serde_json::to_vec(e).unwrap());
    let order = [0, 1, 2, 1, 2];
    let batch = Batch { messages: order.iter().map(|&k| message(events[k].0, &events[k].1)).collect() };
    let mut writer = Writer::new(&app.db_url, "twice-group", "twice-topic");
    let outcome = writer.write(&batch).await.expect("written");
    let fates: Vec<&'static str> = outcome
        .fates
        .iter()
        .map(|f| match f {
            Fate::Applied => "applied",
            Fate::Dead(_) => "dead",
            Fate::Redelivered => "redelivered",
            Fate::Duplicate => "duplicate",
            Fate::Pending => "pending",
            Fate::Reread => "reread",
        })
        .collect();
    assert_eq!(fates, ["applied", "dead", "applied", "redelivered", "redelivered"]);
    assert_eq!(outcome.next_offsets, [(0, 12)]);
    let db = app.sql().await;
    let status: String = db.query_one("SELECT status FROM orders WHERE external_id = $1", &[&id]).await.unwrap().get(0);
    assert_eq!(status, "processed");
    let dead: Vec<i64> =
        db.query("SELECT kafka_offset FROM dead_letters", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(dead, [10]);
}

/// The documented recovery from a recreated topic deletes the group's
/// `kafka_offsets` rows, which starts its log generation over at 0. The new
/// log's poison message at an offset the old log had dead-lettered is
/// recorded (before, it hit the old record's key and was dropped: never
/// recorded, published or applied), while the same message read again is
/// recorded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_at_an_offset_dead_lettered_before_a_reset_position_is_recorded() {
    use ordercast::ingest::writer::{Fate, Writer};
    use ordercast::ingest::Batch;

    let app = crate::helpers::spawn_app().await;
    let db = app.sql().await;
    let poison = |payload: &[u8]| Batch { messages: vec![message(0, b"k", payload)] };
    let mut writer = Writer::new(&app.db_url, "reset-group", "reset-topic");
    let recorded = || async {
        db.query("SELECT convert_from(payload, 'UTF8') FROM dead_letters ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
    };
    for (payload, expected) in [
        (&b"old log"[..], &["old log"][..]),
        // The operator deletes the position; the recreated topic's offset 0.
        (b"new log", &["old log", "new log"]),
        // The same message read again from a deleted position: once.
        (b"new log", &["old log", "new log"]),
    ] {
        db.execute("DELETE FROM kafka_offsets", &[]).await.unwrap();
        let outcome = writer.write(&poison(payload)).await.expect("written");
        assert!(matches!(outcome.fates[0], Fate::Dead(_)));
        assert_eq!(recorded().await, expected);
    }
}

/// The one-message-at-a-time redo of a batch the database rejected (a DBA's
/// rule) costs three round trips per message, so it gets time in proportion
/// to the batch. Before, it had the limit of a whole batch attempt: a large
/// batch on a slow link timed out, counted as transient, and started again
/// from its batch statement, forever. Here a single-row insert takes 10 ms
/// and an attempt 1 s: 200 messages take 2 s to redo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_careful_redo_of_a_large_batch_gets_time_in_proportion() {
    slow_redo(200, "0.01").await;
}

/// A redo slower still than its limit (here 40 messages at 100 ms each,
/// against 1 s and 20 ms per message) goes on one transaction per message,
/// each within the limit: before, it timed out and began again, forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_careful_redo_that_times_out_goes_on_one_transaction_per_message() {
    slow_redo(40, "0.1").await;
}

/// `n` messages, the middle one rejected by a DBA's rule, each single-row
/// insert taking `sleep` seconds, written with a 1 s attempt limit.
async fn slow_redo(n: i64, sleep: &str) {
    use ordercast::ingest::writer::{Fate, Writer};
    use ordercast::ingest::Batch;

    let app = crate::helpers::spawn_app().await;
    let db = app.sql().await;
    db.batch_execute(
        "ALTER TABLE orders ADD CONSTRAINT no_rejected CHECK (customer_name <> 'Rejected'); \
         CREATE FUNCTION slow_single() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF (SELECT count(*) FROM new_rows) = 1 THEN PERFORM pg_sleep(current_setting('slow.sleep')::float8); \
         END IF; RETURN NULL; END $$; \
         CREATE TRIGGER slow_single AFTER INSERT ON orders REFERENCING NEW TABLE AS new_rows \
           FOR EACH STATEMENT EXECUTE FUNCTION slow_single()",
    )
    .await
    .unwrap();
    db.batch_execute(&format!("ALTER DATABASE {} SET slow.sleep = '{sleep}'", app.db_url.rsplit('/').next().unwrap()))
        .await
        .unwrap();
    let messages = (0..n)
        .map(|i| {
            let id = format!("slow-{i}");
            let mut e = crate::kafka::created(&id);
            if i == n / 2 {
                e["order"]["customer_name"] = "Rejected".into();
            }
            message(i, id.as_bytes(), &serde_json::to_vec(&e).unwrap())
        })
        .collect();
    let mut writer = Writer::new(&app.db_url, "slow-group", "slow-topic").with_attempt_timeout(Duration::from_secs(1));
    let outcome = writer.write(&Batch { messages }).await.expect("written, not timed out");
    assert_eq!(outcome.written, n as u64 - 1);
    assert_eq!(outcome.fates.iter().filter(|f| matches!(f, Fate::Dead(_))).count(), 1);
    assert!(matches!(outcome.fates[n as usize / 2], Fate::Dead(_)));
}

/// Many events for one order in a batch take one round each (a round holds
/// at most one event per order), so the batch's statements together can
/// outlast the attempt's limit while each message alone fits in it: the
/// batch goes on one transaction per message. Before, it timed out and
/// began again the same way, forever, holding its partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_many_rounds_that_times_out_goes_on_one_transaction_per_message() {
    use ordercast::ingest::writer::{Fate, Writer};
    use ordercast::ingest::Batch;

    let app = crate::helpers::spawn_app().await;
    let db = app.sql().await;
    db.batch_execute(
        "CREATE FUNCTION slow_update() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN PERFORM pg_sleep(0.1); RETURN NULL; END $$; \
         CREATE TRIGGER slow_update AFTER UPDATE ON orders FOR EACH STATEMENT EXECUTE FUNCTION slow_update()",
    )
    .await
    .unwrap();
    let json = |e: &Value| serde_json::to_vec(e).unwrap();
    let mut events = vec![crate::kafka::created("rounds-1")];
    for i in 0..15 {
        let email = format!("r{i}@mail.example");
        events.push(crate::kafka::event(
            "order_updated",
            serde_json::json!({"external_id": "rounds-1", "customer_email": email}),
        ));
    }
    let messages = events.iter().enumerate().map(|(i, e)| message(i as i64, b"rounds-1", &json(e))).collect();
    // 15 rounds of updates, 0.1 s each: past the 1 s limit together.
    let mut writer =
        Writer::new(&app.db_url, "rounds-group", "rounds-topic").with_attempt_timeout(Duration::from_secs(1));
    let outcome = writer.write(&Batch { messages }).await.expect("written, not timed out");
    assert_eq!(outcome.written, 16);
    assert!(outcome.fates.iter().all(|f| *f == Fate::Applied), "{:?}", outcome.fates);
    let email: String =
        db.query_one("SELECT customer_email FROM orders WHERE external_id = 'rounds-1'", &[]).await.unwrap().get(0);
    assert_eq!(email, "r14@mail.example");
}

/// A message of partition 0 as the consumer hands it to the writer: `key`
/// and `payload` (JSON) decoded as the ingest decodes them.
fn message(offset: i64, key: &[u8], payload: &[u8]) -> ordercast::ingest::Message {
    use ordercast::ingest::{event, settings::Format};
    ordercast::ingest::Message {
        partition: 0,
        offset,
        key: Some(key.to_vec()),
        decoded: event::decode(Some(payload), Some(key), Format::Json),
        payload: Some(payload.to_vec()),
        headers: Vec::new(),
        timestamp_ms: None,
    }
}

/// An attempt that times out while its statement waits for a lock (a DBA's
/// transaction holding an order) has its query cancelled, so its transaction
/// ends and lets the partition's position go. Before, the connection was
/// only dropped: its backend went on waiting, holding the position's row
/// lock, and every retry queued up behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_attempt_waiting_for_a_lock_is_cancelled() {
    use ordercast::ingest::writer::Writer;
    use ordercast::ingest::Batch;

    let app = crate::helpers::spawn_app().await;
    let json = |e: &Value| serde_json::to_vec(e).unwrap();
    let mut writer = Writer::new(&app.db_url, "lock-group", "lock-topic").with_attempt_timeout(Duration::from_secs(1));
    let created = crate::kafka::created("locked-1");
    writer.write(&Batch { messages: vec![message(0, b"locked-1", &json(&created))] }).await.expect("created");
    let dba = app.sql().await;
    dba.batch_execute("BEGIN; SELECT 1 FROM orders WHERE external_id = 'locked-1' FOR UPDATE").await.unwrap();
    let change = crate::kafka::status_changed("locked-1", "processing");
    let batch = Batch { messages: vec![message(1, b"locked-1", &json(&change))] };
    assert!(writer.write(&batch).await.is_err(), "timed out behind the DBA's lock");
    // No backend of the writer is left waiting.
    let watcher = app.sql().await;
    let busy = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'ordercast-ingest' \
                AND datname = current_database() AND state <> 'idle'";
    crate::helpers::until_count(&watcher, busy, Duration::from_secs(5), |n| n == 0).await;
    dba.batch_execute("COMMIT").await.unwrap();
    let outcome = writer.write(&batch).await.expect("written once the lock is gone");
    assert_eq!(outcome.written, 1);
}

/// PostgreSQL restored from a backup while ordercast runs, with no
/// rebalance: the stored position goes back below what the writer
/// committed, and the messages after it, lost with the restore, are read
/// again and applied, not jumped over as a gap (before, the next event moved
/// the position past them: three orders lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_gone_back_in_time_is_caught_up_from_its_stored_position() {
    use crate::kafka::*;

    let broker = Mock::start();
    let n = names(&broker, 1);
    let app = spawn_ingest(&broker, &n, |_| {}).await;
    let producer = producer(&broker);
    for i in 0..5 {
        send_event(&producer, &n.topic, &created(&format!("restore-{i}"))).await;
    }
    let orders = "SELECT count(*) FROM orders WHERE external_id LIKE 'restore-%'";
    wait_count(&app.db_url, orders, 5, WAIT).await;
    let db = app.sql().await;
    crate::helpers::eventually(WAIT, || async { (stored(&db, &n).await == [(0, Some(5))]).then_some(()) }).await;
    // The backup was taken after the first two events.
    lost_2_to_4_then_5_and_6_bring_all_seven(&app, &db, &producer, &n, "restore").await;
    assert_eq!(count(&db, "SELECT count(*) FROM dead_letters").await, 0);
}

/// The database goes back from position 5 to 2 (the orders `{prefix}-2` to
/// `{prefix}-4` and their event ids lost with it); events 5 and 6 come: all
/// seven orders are there in the end, each event recorded as applied from
/// its own offset, the lost ones too, and the position is 7.
async fn lost_2_to_4_then_5_and_6_bring_all_seven(
    app: &crate::helpers::TestApp,
    db: &tokio_postgres::Client,
    kafka: &rdkafka::producer::FutureProducer,
    n: &crate::kafka::Names,
    prefix: &str,
) {
    use crate::kafka::*;

    db.execute("DELETE FROM ingested_events WHERE kafka_topic = $1 AND kafka_offset >= 2", &[&n.topic]).await.unwrap();
    let lost: Vec<String> = (2..5).map(|i| format!("{prefix}-{i}")).collect();
    db.execute("DELETE FROM orders WHERE external_id = ANY($1)", &[&lost]).await.unwrap();
    db.execute("UPDATE kafka_offsets SET next_offset = 2 WHERE group_id = $1", &[&n.group]).await.unwrap();
    for i in 5..7 {
        send_event(kafka, &n.topic, &created(&format!("{prefix}-{i}"))).await;
    }
    let orders = format!("SELECT count(*) FROM orders WHERE external_id LIKE '{prefix}-%'");
    wait_count(&app.db_url, &orders, 7, WAIT).await;
    crate::helpers::eventually(WAIT, || async { (stored(db, n).await == [(0, Some(7))]).then_some(()) }).await;
    let offsets: Vec<i64> = db
        .query("SELECT kafka_offset FROM ingested_events WHERE kafka_topic = $1 ORDER BY 1", &[&n.topic])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(offsets, (0..7).collect::<Vec<i64>>());
}

/// The database of `restore_test` after it went back from position 5 to 2:
/// the orders and event ids recorded after offset 2 are gone with it.
async fn go_back_to_2(db: &tokio_postgres::Client, prefix: &str) {
    let (group, topic) = (format!("{prefix}-group"), format!("{prefix}-topic"));
    db.execute("DELETE FROM ingested_events WHERE kafka_topic = $1 AND kafka_offset >= 2", &[&topic]).await.unwrap();
    db.execute(
        "DELETE FROM orders WHERE external_id LIKE $1 || '-%' AND external_id NOT IN ($1 || '-0', $1 || '-1')",
        &[&prefix],
    )
    .await
    .unwrap();
    db.execute("UPDATE kafka_offsets SET next_offset = 2 WHERE group_id = $1", &[&group]).await.unwrap();
}

/// A writer that committed offsets 0 to 4 of partition 0 (orders
/// `{prefix}-0` to `{prefix}-4`), and the messages of offsets 0 to 6, each
/// creating `{prefix}-{offset}`.
async fn restore_test(
    app: &crate::helpers::TestApp,
    prefix: &str,
    limit: Duration,
) -> (ordercast::ingest::writer::Writer, impl Fn(&[i64]) -> ordercast::ingest::Batch) {
    use ordercast::ingest::writer::Writer;
    use ordercast::ingest::Batch;

    let ids: Vec<String> = (0..7).map(|i| format!("{prefix}-{i}")).collect();
    let events: Vec<Vec<u8>> = ids.iter().map(|x| serde_json::to_vec(&crate::kafka::created(x)).unwrap()).collect();
    let batch = move |offsets: &[i64]| Batch {
        messages: offsets.iter().map(|&o| message(o, ids[o as usize].as_bytes(), &events[o as usize])).collect(),
    };
    let mut writer =
        Writer::new(&app.db_url, &format!("{prefix}-group"), &format!("{prefix}-topic")).with_go_back_limit(limit);
    let outcome = writer.write(&batch(&[0, 1, 2, 3, 4])).await.expect("written");
    assert_eq!(outcome.written, 5, "{:?}", outcome.fates);
    (writer, batch)
}

/// Offsets 2 to 6 read again after being sent back are all applied: the
/// seven orders, and the position at 7.
async fn all_seven_once_read_again(
    writer: &mut ordercast::ingest::writer::Writer,
    batch: &impl Fn(&[i64]) -> ordercast::ingest::Batch,
    db: &tokio_postgres::Client,
    prefix: &str,
) {
    use ordercast::ingest::writer::Fate;

    let outcome = writer.write(&batch(&[2, 3, 4, 5, 6])).await.expect("written");
    assert!(outcome.fates.iter().all(|f| *f == Fate::Applied), "{:?}", outcome.fates);
    let (orders, next) = orders_and_position(db, prefix).await;
    let all: Vec<String> = (0..7).map(|i| format!("{prefix}-{i}")).collect();
    assert_eq!((orders, next), (all, Some(7)));
}

/// Offset 5 comes again and again, the log no longer holding what the
/// position went back `to`: sent back (a writer whose limit in time is
/// 500 ms), until the writes are past their limit too (the eighth after
/// the first); then 5 and 6 are applied.
async fn five_sent_back_to_until_the_limits(
    writer: &mut ordercast::ingest::writer::Writer,
    batch: &impl Fn(&[i64]) -> ordercast::ingest::Batch,
    to: i64,
) {
    use ordercast::ingest::writer::{Fate, Rewind};

    let sent_back = Rewind { partition: 0, to };
    let outcome = writer.write(&batch(&[5])).await.expect("written");
    assert_eq!((outcome.fates, outcome.went_back), (vec![Fate::Reread], vec![sent_back.clone()]));
    tokio::time::sleep(Duration::from_millis(700)).await;
    for _ in 0..8 {
        let outcome = writer.write(&batch(&[5])).await.expect("written");
        assert_eq!((outcome.fates, outcome.went_back), (vec![Fate::Reread], vec![sent_back.clone()]));
    }
    let outcome = writer.write(&batch(&[5, 6])).await.expect("written");
    assert_eq!((outcome.fates, outcome.went_back), (vec![Fate::Applied, Fate::Applied], vec![]));
}

async fn orders_and_position(db: &tokio_postgres::Client, prefix: &str) -> (Vec<String>, Option<i64>) {
    let orders = db
        .query("SELECT external_id FROM orders WHERE external_id LIKE $1 || '-%' ORDER BY 1", &[&prefix])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let group = format!("{prefix}-group");
    let next = db.query_one("SELECT next_offset FROM kafka_offsets WHERE group_id = $1", &[&group]).await.unwrap();
    (orders, next.get(0))
}

/// The database went back from position 5 to 2 while the consumer had read
/// on: the batch after the seek back holds offsets 5 and 6, read before it,
/// then 2, 3 and 4 from the stored position. The run from the stored
/// position is applied and 5 and 6 are read again after it. Judged on its
/// first message, the batch was taken for one read before the seek, and its
/// run from the stored position was sent back too; judged on any message
/// below what was committed, 5 and 6 moved the position past 2 to 4, lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_read_across_the_seek_back_of_a_position_gone_back_loses_nothing() {
    use ordercast::ingest::writer::Fate;

    let app = crate::helpers::spawn_app().await;
    let db = app.sql().await;
    let (mut writer, batch) = restore_test(&app, "mixed", Duration::from_secs(30)).await;
    go_back_to_2(&db, "mixed").await;
    let outcome = writer.write(&batch(&[5, 6, 2, 3, 4])).await.expect("written");
    assert_eq!(outcome.fates, [Fate::Reread, Fate::Reread, Fate::Applied, Fate::Applied, Fate::Applied]);
    assert_eq!(outcome.went_back, []);
    let (orders, next) = orders_and_position(&db, "mixed").await;
    assert_eq!((orders.len(), next), (5, Some(5)), "{orders:?}");
    let outcome = writer.write(&batch(&[5, 6])).await.expect("written");
    assert_eq!(outcome.fates, [Fate::Applied, Fate::Applied]);
    let (orders, next) = orders_and_position(&db, "mixed").await;
    let all: Vec<String> = (0..7).map(|i| format!("mixed-{i}")).collect();
    assert_eq!((orders, next), (all, Some(7)));
}

/// The database went back from position 5 to 2, and the log no longer holds
/// offsets 2 to 4 (retention): what comes is 5, again and again. The writer
/// sends it back while it waits for the messages from 2, then, past its
/// limit in time and in writes, goes on from what the log holds. Before, it
/// sent 5 back forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_gone_back_to_messages_the_log_no_longer_holds_goes_on_after_its_limit() {
    let app = crate::helpers::spawn_app().await;
    let db = app.sql().await;
    let (mut writer, batch) = restore_test(&app, "expired", Duration::from_millis(500)).await;
    go_back_to_2(&db, "expired").await;
    five_sent_back_to_until_the_limits(&mut writer, &batch, 2).await;
    let (orders, next) = orders_and_position(&db, "expired").await;
    assert_eq!(
        (orders, next),
        (vec!["expired-0".into(), "expired-1".into(), "expired-5".into(), "expired-6".into()], Some(7))
    );
}

/// The database went back from position 5 to 2, and the batches read
/// before the seek back take long to reach the writer (the database failed
/// over again meanwhile, say): past the time limit, they are still sent
/// back, and the messages from 2 are applied when they come. Before, the
/// time limit alone let the next batch of 5 and 6 through, and 2 to 4,
/// read again after it, were skipped as redeliveries: lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_read_before_a_seek_back_that_come_late_are_still_sent_back() {
    use ordercast::ingest::writer::Fate;

    let app = crate::helpers::spawn_app().await;
    let db = app.sql().await;
    let (mut writer, batch) = restore_test(&app, "late", Duration::from_millis(500)).await;
    go_back_to_2(&db, "late").await;
    let outcome = writer.write(&batch(&[5])).await.expect("written");
    assert_eq!(outcome.fates, [Fate::Reread]);
    tokio::time::sleep(Duration::from_millis(700)).await;
    for offsets in [&[5, 6][..], &[6]] {
        let outcome = writer.write(&batch(offsets)).await.expect("written");
        assert!(outcome.fates.iter().all(|f| *f == Fate::Reread), "{offsets:?}: {:?}", outcome.fates);
    }
    all_seven_once_read_again(&mut writer, &batch, &db, "late").await;
}

/// The database went back from position 5 to 2, and, before the messages
/// from 2 were read again, back to 1 (a second failover): the batch read
/// from 2 after the seek back is sent back to 1 as well, and 1 to 6 are
/// applied when they come. Before, the run from 2 was compared with what
/// the writer had committed (5) only, and applied on top of 1: order 1
/// lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_gone_back_again_before_it_was_caught_up_loses_nothing() {
    use ordercast::ingest::writer::{Fate, Rewind};

    let app = crate::helpers::spawn_app().await;
    let db = app.sql().await;
    let (mut writer, batch) = restore_test(&app, "again", Duration::from_secs(30)).await;
    go_back_to_2(&db, "again").await;
    let outcome = writer.write(&batch(&[5])).await.expect("written");
    assert_eq!((outcome.fates, outcome.went_back), (vec![Fate::Reread], vec![Rewind { partition: 0, to: 2 }]));
    // Back again, to 1.
    db.execute("DELETE FROM ingested_events WHERE kafka_topic = 'again-topic' AND kafka_offset >= 1", &[])
        .await
        .unwrap();
    db.execute("DELETE FROM orders WHERE external_id = 'again-1'", &[]).await.unwrap();
    db.execute("UPDATE kafka_offsets SET next_offset = 1 WHERE group_id = 'again-group'", &[]).await.unwrap();
    let outcome = writer.write(&batch(&[2, 3, 4, 5, 6])).await.expect("written");
    assert!(outcome.fates.iter().all(|f| *f == Fate::Reread), "{:?}", outcome.fates);
    assert_eq!(outcome.went_back, [Rewind { partition: 0, to: 1 }]);
    let outcome = writer.write(&batch(&[1, 2, 3, 4, 5, 6])).await.expect("written");
    assert!(outcome.fates.iter().all(|f| *f == Fate::Applied), "{:?}", outcome.fates);
    let (orders, next) = orders_and_position(&db, "again").await;
    let all: Vec<String> = (0..7).map(|i| format!("again-{i}")).collect();
    assert_eq!((orders, next), (all, Some(7)));
}

/// The database went back from position 5 to 2, then to 1, and the log no
/// longer holds offsets 1 to 4: what comes is 5, again and again. The writer
/// waits for the messages from 1 as long as for any position gone back,
/// then goes on from what the log holds. Before, it waited for the first
/// position (2) to be sent back to again, which never happened: 5 was sent
/// back forever, while health said the ingest was running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_gone_back_further_goes_on_after_its_limit_too() {
    use ordercast::ingest::writer::Rewind;

    let app = crate::helpers::spawn_app().await;
    let db = app.sql().await;
    let (mut writer, batch) = restore_test(&app, "further", Duration::from_millis(500)).await;
    go_back_to_2(&db, "further").await;
    let outcome = writer.write(&batch(&[5])).await.expect("written");
    assert_eq!(outcome.went_back, [Rewind { partition: 0, to: 2 }]);
    db.execute("DELETE FROM orders WHERE external_id = 'further-1'", &[]).await.unwrap();
    db.execute("UPDATE kafka_offsets SET next_offset = 1 WHERE group_id = 'further-group'", &[]).await.unwrap();
    five_sent_back_to_until_the_limits(&mut writer, &batch, 1).await;
}

/// The database went back from position 5 to 2, and a batch read before
/// the seek back (offsets 5 to 14) comes past the time limit, with a
/// message of another partition that waits for a DBA's lock: the batch
/// times out and is applied one transaction per message, and fails on the
/// locked one, nine times over. Its messages of the partition gone back are
/// all sent back each time, and a failed write counts nothing towards
/// giving up (its seek back was never made). Before, the ninth transaction
/// gave up, and 13 and 14 moved the position past 2 to 12: lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_applied_one_transaction_per_message_counts_once_towards_giving_up() {
    use ordercast::ingest::writer::{Fate, Writer};
    use ordercast::ingest::Batch;

    let app = crate::helpers::spawn_app().await;
    let db = app.sql().await;
    let json = |e: &Value| serde_json::to_vec(e).unwrap();
    let ids: Vec<String> = (0..15).map(|i| format!("each-{i}")).collect();
    let events: Vec<Vec<u8>> = ids.iter().map(|x| json(&crate::kafka::created(x))).collect();
    let on_0 = |o: i64| message(o, ids[o as usize].as_bytes(), &events[o as usize]);
    let on_1 =
        |o: i64, event: &Value| ordercast::ingest::Message { partition: 1, ..message(o, b"held-1", &json(event)) };
    let mut writer = Writer::new(&app.db_url, "each-group", "each-topic")
        .with_go_back_limit(Duration::from_millis(500))
        .with_attempt_timeout(Duration::from_secs(1));
    let first = Batch { messages: (0..5).map(on_0).chain([on_1(0, &crate::kafka::created("held-1"))]).collect() };
    assert_eq!(writer.write(&first).await.expect("written").written, 6);
    // Partition 0 goes back from 5 to 2.
    db.execute(
        "DELETE FROM ingested_events WHERE kafka_topic = 'each-topic' AND kafka_partition = 0 AND kafka_offset >= 2",
        &[],
    )
    .await
    .unwrap();
    db.execute("DELETE FROM orders WHERE external_id = ANY($1)", &[&ids[2..5].to_vec()]).await.unwrap();
    db.execute("UPDATE kafka_offsets SET next_offset = 2 WHERE group_id = 'each-group' AND kafka_partition = 0", &[])
        .await
        .unwrap();
    let outcome = writer.write(&Batch { messages: vec![on_0(5)] }).await.expect("written");
    assert_eq!(outcome.fates, [Fate::Reread]);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let dba = app.sql().await;
    dba.batch_execute("BEGIN; SELECT 1 FROM orders WHERE external_id = 'held-1' FOR UPDATE").await.unwrap();
    let change = crate::kafka::status_changed("held-1", "processing");
    let stale = Batch { messages: (5..15).map(on_0).chain([on_1(1, &change)]).collect() };
    // Written again and again while the lock is held (as the ingest retries
    // a batch that failed): a write that failed counts for nothing, as its
    // seek back was never made.
    for _ in 0..9 {
        assert!(writer.write(&stale).await.is_err(), "timed out behind the DBA's lock");
    }
    let next: Option<i64> = db
        .query_one("SELECT next_offset FROM kafka_offsets WHERE group_id = 'each-group' AND kafka_partition = 0", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(next, Some(2), "partition 0 stays where it went back to");
    dba.batch_execute("COMMIT").await.unwrap();
    let again = Batch { messages: (2..15).map(on_0).chain([on_1(1, &change)]).collect() };
    let outcome = writer.write(&again).await.expect("written");
    assert!(outcome.fates.iter().all(|f| *f == Fate::Applied), "{:?}", outcome.fates);
    let orders: i64 =
        db.query_one("SELECT count(*) FROM orders WHERE external_id LIKE 'each-%'", &[]).await.unwrap().get(0);
    assert_eq!(orders, 15);
}

/// The database went back from position 5 to 2 after a new owner of the
/// partition started it at 5, and before that owner's first commit (a
/// failover that lost the previous owner's last commits while this instance
/// took over): what comes is 5 and 6. They are sent back, and 2 to 4 are
/// applied when they are read again. Before, the writer had committed
/// nothing to compare with: 5 and 6 were applied, moving the position past
/// 2 to 4, lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_gone_back_before_a_new_owners_first_commit_loses_nothing() {
    use ordercast::ingest::writer::{Fate, Rewind, Starts, Writer};

    let app = crate::helpers::spawn_app().await;
    let db = app.sql().await;
    let (_previous_owner, batch) = restore_test(&app, "early", Duration::from_secs(30)).await;
    let starts = Starts::default();
    starts.note(0, 0, 5);
    let mut writer = Writer::new(&app.db_url, "early-group", "early-topic").with_starts(starts);
    go_back_to_2(&db, "early").await;
    let outcome = writer.write(&batch(&[5, 6])).await.expect("written");
    assert_eq!(outcome.fates, [Fate::Reread, Fate::Reread]);
    assert_eq!(outcome.went_back, [Rewind { partition: 0, to: 2 }]);
    all_seven_once_read_again(&mut writer, &batch, &db, "early").await;
}

/// The same through the consumer: an instance takes over a partition stored
/// at 5, the database goes back to 2 before anything new arrives, and the
/// next events (5 and 6) find it there. The consumer noted where it started
/// the partition, so the writer reads it again from 2: all seven orders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_taking_over_catches_up_a_database_gone_back_before_its_first_write() {
    use crate::kafka::*;

    let broker = Mock::start();
    let n = names(&broker, 1);
    let (producer, first) = five_applied_then_stopped(&broker, &n, "takeover").await;
    let db = first.sql().await;
    assert_eq!(stored(&db, &n).await, [(0, Some(5))]);
    let second = spawn_ingest_on(&first.db_url, &broker, &n).await;
    crate::helpers::eventually(WAIT, || async {
        let (_, health) = second.get_json("/api/health").await;
        (health["kafka"]["partitions"].as_array().is_some_and(|p| p.len() == 1)).then_some(())
    })
    .await;
    lost_2_to_4_then_5_and_6_bring_all_seven(&second, &db, &producer, &n, "takeover").await;
}

/// While the broker is away, each round of the dead-letter publisher waits
/// for it up to `message.timeout.ms` (30 s), again and again. Its rows are
/// claimed with a lease, so no transaction of it stays open meanwhile (one
/// open that long holds back vacuum in the whole database), and the dead
/// letter is published once the broker is back. Before, the round held its
/// rows' locks in a transaction left open for the whole wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letter_publisher_keeps_no_transaction_open_while_the_broker_is_away() {
    use crate::kafka::*;

    let broker = Mock::start();
    let n = names(&broker, 1);
    let (app, db) = dead_letter_while_the_broker_is_away(&broker, &n).await;
    let open = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'ordercast-dlq' \
                AND datname = current_database() AND state LIKE 'idle in transaction%'";
    let claimed = "SELECT count(*) FROM dead_letters WHERE claimed_until > now() AND published_at IS NULL";
    // The publisher finds the row within its 5 s poll, and waits for the
    // broker for the rest of the watch.
    let deadline = std::time::Instant::now() + Duration::from_secs(9);
    let mut seen_claimed = false;
    while std::time::Instant::now() < deadline {
        assert_eq!(count(&db, open).await, 0, "a transaction left open while the broker is waited for");
        seen_claimed |= count(&db, claimed).await == 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen_claimed, "the publisher claimed the dead letter during the outage");
    assert_eq!(count(&db, "SELECT count(*) FROM dead_letters WHERE published_at IS NOT NULL").await, 0);
    broker.broker_up();
    let letters = read_topic(&broker, &n.dlq, 1).await;
    assert_eq!(header(&letters[0], "dlq-detail").as_deref(), Some("recorded by the test"));
    let done = "SELECT count(*) FROM dead_letters WHERE published_at IS NOT NULL AND claimed_until IS NULL";
    wait_count(&app.db_url, done, 1, WAIT).await;
}

/// A round of the dead-letter publisher claims dead letters up to 8 MiB of
/// messages, not 200 whatever their size: it holds its rows, its records
/// and librdkafka's copies at once (200 rows of 1 MB messages, 600 MB).
/// With 500 kB messages, 17 of 40; the rest in the next rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_round_claims_a_bounded_number_of_bytes() {
    use crate::kafka::*;

    let broker = Mock::start();
    let n = names(&broker, 1);
    let app = spawn_ingest(&broker, &n, |_| {}).await;
    let db = app.sql().await;
    broker.broker_down();
    db.execute(
        "INSERT INTO dead_letters (group_id, kafka_topic, kafka_partition, kafka_offset, payload, reason, detail) \
         SELECT $1, $2, 0, g, convert_to(repeat('x', 500000), 'UTF8'), 'invalid_json', 'large' \
         FROM generate_series(1, 40) g",
        &[&n.group, &n.topic],
    )
    .await
    .unwrap();
    let claimed = "SELECT count(*) FROM dead_letters WHERE claimed_until > now() AND published_at IS NULL";
    crate::helpers::until_count(&db, claimed, Duration::from_secs(10), |c| c > 0).await;
    assert_eq!(count(&db, claimed).await, 17, "one round's claim");
    broker.broker_up();
    let done = "SELECT count(*) FROM dead_letters WHERE published_at IS NOT NULL";
    wait_count(&app.db_url, done, 40, Duration::from_secs(60)).await;
}

/// Stopped while a round waits for a broker that is away, the publisher lets
/// its rows go at once: the next start (or another instance) publishes them
/// without waiting for the lease (90 s) to run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_round_stopped_at_shutdown_lets_its_rows_go() {
    use crate::kafka::*;

    let broker = Mock::start();
    let n = names(&broker, 1);
    let (mut app, db) = dead_letter_while_the_broker_is_away(&broker, &n).await;
    let claimed = "SELECT count(*) FROM dead_letters WHERE claimed_until > now() AND published_at IS NULL";
    crate::helpers::until_count(&db, claimed, Duration::from_secs(10), |c| c == 1).await;
    app.stop().await;
    let free = "SELECT count(*) FROM dead_letters WHERE claimed_until IS NULL AND published_at IS NULL";
    assert_eq!(count(&db, free).await, 1, "the stopped round let its row go");
}

/// Starts the ingest, takes the broker away and records a dead letter, as
/// the writer records a rejected message.
async fn dead_letter_while_the_broker_is_away(
    broker: &crate::kafka::Mock,
    n: &crate::kafka::Names,
) -> (crate::helpers::TestApp, tokio_postgres::Client) {
    let app = crate::kafka::spawn_ingest(broker, n, |_| {}).await;
    let db = app.sql().await;
    broker.broker_down();
    db.execute(
        "INSERT INTO dead_letters (group_id, kafka_topic, kafka_partition, kafka_offset, payload, reason, detail) \
         VALUES ($1, $2, 0, 7, 'not json', 'invalid_json', 'recorded by the test')",
        &[&n.group, &n.topic],
    )
    .await
    .unwrap();
    (app, db)
}

/// A read of the stored positions stuck behind a lock on `kafka_offsets` (a
/// `VACUUM FULL`, an `ALTER TABLE`) is given up by PostgreSQL once ordercast
/// stops waiting for it: its backend does not stay, holding a connection,
/// while the retries of paused partitions pile up more. Before, it waited
/// for the lock for as long as the lock was held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_read_stuck_behind_a_lock_gives_its_connection_up() {
    let app = crate::helpers::spawn_app().await;
    let locker = app.sql().await;
    locker.batch_execute("BEGIN; LOCK TABLE kafka_offsets IN ACCESS EXCLUSIVE MODE").await.unwrap();
    let url = app.db_url.clone();
    let read = tokio::task::spawn_blocking(move || {
        ordercast::ingest::consumer::stored_positions_at(&url, "g", "orders", &[0])
    });
    let error = read.await.unwrap().expect_err("no position can be read while the table is locked");
    let waiting = "SELECT count(*) FROM pg_stat_activity \
                   WHERE datname = current_database() AND application_name = 'ordercast-ingest'";
    crate::helpers::eventually(Duration::from_secs(5), || async {
        let n: i64 = app.sql().await.query_one(waiting, &[]).await.unwrap().get(0);
        (n == 0).then_some(())
    })
    .await;
    assert!(format!("{error:#}").contains("timeout"), "{error:#}");
    locker.batch_execute("ROLLBACK").await.unwrap();
}
