//! The outbox relay: every committed change reaches `order-changes`, keyed by
//! order, in commit order per order, at least once, from a stored position.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::message::{Headers, Message, OwnedMessage};
use serde_json::json;

use crate::helpers::{eventually, spawn_app_on, spawn_app_with};
use crate::{header, key, payload, scalar, Kafka, WAIT};

fn position(m: &OwnedMessage) -> i64 {
    header(m, "ordercast-position").expect("an ordercast-position header").parse().expect("a numeric position")
}

/// The messages of one order, in the order a consumer reads them.
fn of_order(msgs: &[OwnedMessage], id: i64) -> Vec<&OwnedMessage> {
    msgs.iter().filter(|m| key(m) == id.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rest_created_order_appears_on_order_changes() {
    // Arrange
    let kafka = Kafka::start();
    let app = spawn_app_with(|s| kafka.configure(s)).await;
    let reader = kafka.reader(&kafka.changes);

    // Act
    let order = app.create_order("Ada").await;
    let id = order["id"].as_i64().unwrap();
    assert_eq!(app.patch(id, &json!({"status": "processing"})).await.status(), 200);

    // Assert: both changes, keyed by the order, in commit order, with the headers.
    let mut msgs = reader.read_until(WAIT, move |m| of_order(m, id).len() >= 2).await;
    // And nothing after them: a relay that sent a change again would stop
    // the reading above at two all the same.
    msgs.extend(reader.drain(Duration::from_secs(1)).await);
    let mine = of_order(&msgs, id);
    assert_eq!(mine.len(), 2, "each change exactly once here (no crash happened)");
    assert_eq!(mine[0].partition(), mine[1].partition(), "one partition per order");
    let ops: Vec<String> = mine.iter().map(|m| header(m, "ordercast-op").unwrap()).collect();
    assert_eq!(ops, ["insert", "update"]);
    assert!(position(mine[0]) < position(mine[1]));
    assert!(header(mine[0], "ordercast-actor").unwrap().starts_with("api"), "{:?}", header(mine[0], "ordercast-actor"));
    let first = payload(mine[0]);
    assert_eq!(first["type"], "change");
    assert_eq!(first["seq"], position(mine[0]));
    assert_eq!(first["order"]["id"], id);
    assert_eq!(first["order"]["customer_name"], "Ada");
    assert_eq!(payload(mine[1])["order"]["status"], "processing");
    assert_eq!(payload(mine[1])["old"]["status"], "pending");
    let committed: i64 = header(mine[0], "ordercast-committed-at").expect("the commit time").parse().unwrap();
    let sent = mine[0].timestamp().to_millis().unwrap();
    assert!(sent >= committed.div_euclid(1000), "stamped when sent, after the commit: {sent} < {committed} us");

    // ... and the relay stored how far it got.
    let db = app.sql().await;
    let last = position(mine[1]);
    let name = kafka.changes.clone();
    eventually(WAIT, || {
        let (db, name) = (&db, &name);
        async move {
            let p: i64 =
                db.query_one("SELECT position FROM outbox_positions WHERE name = $1", &[name]).await.ok()?.get(0);
            (p >= last).then_some(())
        }
    })
    .await;
    let (_, health) = app.get_json("/api/health").await;
    assert_eq!(health["workflow"]["outbox"]["state"], "running", "{health}");
    assert!(health["workflow"]["outbox"]["published"].as_u64().unwrap() >= 2);
    // The same in /metrics, with the lag to alert on.
    assert_eq!(crate::metric(&app, "ordercast_outbox_active").await, Some(1.0));
    let position = crate::metric(&app, "ordercast_outbox_position").await.expect("the relay's position");
    assert!(position >= last as f64, "{position} < {last}");
    assert!(crate::metric(&app, "ordercast_outbox_published_total").await >= Some(2.0));
    assert!(crate::metric(&app, "ordercast_outbox_lag").await.is_some());
    assert_eq!(crate::metric(&app, "ordercast_processor_processed_total").await, None, "no processor runs here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_from_every_write_path_are_published_in_commit_order_per_order() {
    // Arrange: the Kafka ingest reads this test's topic too.
    let kafka = Kafka::start();
    let app = spawn_app_with(|s| kafka.configure(s)).await;
    let reader = kafka.reader(&kafka.changes);
    let producer = kafka.producer();

    // Act: REST, a DBA in psql, and a Kafka event, interleaved on two orders.
    let a = app.create_order("Rest Customer").await["id"].as_i64().unwrap();
    let db = app.sql().await;
    let b: i64 = scalar(
        &db,
        "INSERT INTO orders (customer_name, product, quantity, unit_price) VALUES ('Dba', 'Bolt', 5, 0.40) RETURNING id",
    )
    .await;
    db.batch_execute(&format!("UPDATE orders SET quantity = quantity + 1 WHERE id IN ({a}, {b})")).await.unwrap();
    assert_eq!(app.patch(a, &json!({"status": "cancelled"})).await.status(), 200);
    let event = json!({
        "event_id": uuid::Uuid::new_v4(), "type": "order_created", "occurred_at": chrono::Utc::now().to_rfc3339(),
        "order": {"external_id": "via-kafka", "customer_name": "Kafka", "product": "Gear", "quantity": 1, "unit_price": 3}
    });
    let event = event.to_string();
    let record = rdkafka::producer::FutureRecord::to(&kafka.orders).key("via-kafka").payload(&event);
    producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    let c: i64 = eventually(WAIT, || {
        let db = &db;
        async move {
            db.query_opt("SELECT id FROM orders WHERE external_id = 'via-kafka'", &[]).await.ok()?.map(|r| r.get(0))
        }
    })
    .await;

    // Assert: a: insert, update, update; b: insert, update; c: insert; each
    // order's positions increase in the order the consumer reads them.
    let want = HashMap::from([(a, 3), (b, 2), (c, 1)]);
    let msgs = reader.read_until(WAIT, move |m| want.iter().all(|(id, n)| of_order(m, *id).len() >= *n)).await;
    for id in [a, b, c] {
        let positions: Vec<i64> = of_order(&msgs, id).iter().map(|m| position(m)).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "order {id}: {positions:?}");
    }
    let actor = |id: i64| header(of_order(&msgs, id)[0], "ordercast-actor").unwrap();
    assert!(actor(a).starts_with("api"), "{}", actor(a));
    assert!(actor(b).starts_with("sql:"), "{}", actor(b));
    assert!(actor(c).starts_with("kafka"), "{}", actor(c));
    let ops: Vec<String> = of_order(&msgs, a).iter().map(|m| header(m, "ordercast-op").unwrap()).collect();
    assert_eq!(ops, ["insert", "update", "update"]);
    assert_eq!(payload(of_order(&msgs, a)[2])["order"]["status"], "cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_resumes_from_its_stored_position_after_a_restart() {
    // Arrange: one change published, then the relay stops.
    let kafka = Kafka::start();
    let (first, reader, db, a, _) = one_published_then_stopped(&kafka, "Before").await;

    // Act: changes committed while no relay runs, then a new instance.
    let b: i64 = scalar(
        &db,
        "INSERT INTO orders (customer_name, product, quantity, unit_price) VALUES ('While down', 'Nut', 1, 1) RETURNING id",
    )
    .await;
    db.batch_execute(&format!("UPDATE orders SET status = 'processing' WHERE id = {b}")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let restarted = chrono::Utc::now().timestamp_millis();
    let _second = spawn_app_on(&first.db_url, |s| kafka.configure(s)).await;

    // Assert: the missed changes arrive; the one already acknowledged and
    // stored is not published again.
    let msgs = reader.read_until(WAIT, move |m| of_order(m, b).len() >= 2).await;
    let later = reader.drain(Duration::from_millis(500)).await;
    let all: Vec<OwnedMessage> = msgs.into_iter().chain(later).collect();
    assert_eq!(of_order(&all, a).len(), 0, "order {a}'s insert was read before the restart and not sent again");
    assert_eq!(of_order(&all, b).len(), 2);
    // Stamped when sent, not when committed (a topic's retention goes by
    // the timestamps); the commit time is in the header.
    for m in of_order(&all, b) {
        let committed_ms = header(m, "ordercast-committed-at").unwrap().parse::<i64>().unwrap() / 1000;
        let sent = m.timestamp().to_millis().unwrap();
        assert!(committed_ms < restarted && restarted <= sent, "committed {committed_ms}, sent {sent}");
    }
}

/// An instance that published one REST-created order (for `customer`) and
/// stored its position, then stopped: it (its database stays), a reader of
/// the topic, a database connection, the order's id and its partition.
async fn one_published_then_stopped(
    kafka: &Kafka,
    customer: &str,
) -> (crate::helpers::TestApp, crate::Reader, tokio_postgres::Client, i64, i32) {
    let mut app = spawn_app_with(|s| kafka.configure(s)).await;
    let reader = kafka.reader(&kafka.changes);
    let id = app.create_order(customer).await["id"].as_i64().unwrap();
    let msgs = reader.read_until(WAIT, move |m| !of_order(m, id).is_empty()).await;
    let partition = of_order(&msgs, id)[0].partition();
    let db = app.sql().await;
    published_something(&db).await;
    app.stop().await;
    (app, reader, db, id, partition)
}

/// Waits until the relay has stored a position past the start.
async fn published_something(db: &tokio_postgres::Client) {
    eventually(WAIT, || async move {
        let stored: i64 = db.query_one("SELECT position FROM outbox_positions", &[]).await.ok()?.get(0);
        (stored > 0).then_some(())
    })
    .await;
}

/// Changes pruned from the log, through its head, while no relay ran (a
/// quiet system idle past the retention) are reported as skipped at once,
/// with the position moved past them. Before, the read found no row to
/// carry the horizon, and nothing was said until a later commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_pruned_through_the_head_before_they_were_published_are_reported() {
    let kafka = Kafka::start();
    let mut first = spawn_app_with(|s| kafka.configure(s)).await;
    let db = first.sql().await;
    first.create_order("Before").await;
    published_something(&db).await;
    first.stop().await;
    let stored: i64 = scalar(&db, "SELECT position FROM outbox_positions").await;
    db.batch_execute(
        "INSERT INTO orders (customer_name, product, quantity, unit_price) \
         SELECT 'Pruned ' || i, 'Nut', 1, 1 FROM generate_series(1, 3) i",
    )
    .await
    .unwrap();
    let head: i64 = scalar(&db, "SELECT change_head()").await;
    db.batch_execute("SELECT change_prune(change_head())").await.unwrap();
    let second = spawn_app_on(&first.db_url, |s| kafka.configure(s)).await;
    let outbox = eventually(WAIT, || async {
        let (_, health) = second.get_json("/api/health").await;
        let outbox = health["workflow"]["outbox"].clone();
        (outbox["position"].as_i64() == Some(head)).then_some(outbox)
    })
    .await;
    assert_eq!(outbox["skipped"].as_i64(), Some(head - stored), "{outbox}");
    assert_eq!(crate::metric(&second, "ordercast_outbox_skipped_total").await, Some((head - stored) as f64));
}

/// Deleting the relay's row starts it over from the oldest retained change,
/// also while it runs. Before, a running relay went on from its position in
/// memory without a row, and started over at some later reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_relays_row_while_it_runs_starts_it_over() {
    let kafka = Kafka::start();
    let app = spawn_app_with(|s| kafka.configure(s)).await;
    let reader = kafka.reader(&kafka.changes);
    let a = app.create_order("First").await["id"].as_i64().unwrap();
    reader.read_until(WAIT, move |m| !of_order(m, a).is_empty()).await;
    let db = app.sql().await;
    let stored = || {
        let db = &db;
        async move { db.query_opt("SELECT position FROM outbox_positions", &[]).await.unwrap().map(|r| r.get::<_, i64>(0)) }
    };
    eventually(WAIT, || async { stored().await.filter(|p| *p > 0) }).await;
    db.batch_execute("DELETE FROM outbox_positions").await.unwrap();
    let b = app.create_order("Second").await["id"].as_i64().unwrap();
    // Order a's insert again (the start over), and b's.
    let msgs = reader.read_until(WAIT, move |m| !of_order(m, a).is_empty() && !of_order(m, b).is_empty()).await;
    assert!(!of_order(&msgs, a).is_empty(), "the relay started over");
    let head: i64 = scalar(&db, "SELECT change_head()").await;
    eventually(WAIT, || async { stored().await.filter(|p| *p >= head) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_relay_publishes_while_another_stands_by_and_takes_over() {
    // Arrange: two instances on one database.
    let kafka = Kafka::start();
    let mut first = spawn_app_with(|s| kafka.configure(s)).await;
    let second = spawn_app_on(&first.db_url, |s| kafka.configure(s)).await;
    let reader = kafka.reader(&kafka.changes);
    let states = || async {
        let mut s = Vec::new();
        for app in [&first, &second] {
            s.push(app.get_json("/api/health").await.1["workflow"]["outbox"]["state"].as_str().unwrap().to_string());
        }
        s.sort();
        s
    };
    eventually(WAIT, || {
        let states = &states;
        async move { (states().await == ["running", "standby"]).then_some(()) }
    })
    .await;
    let a = first.create_order("One").await["id"].as_i64().unwrap();
    reader.read_until(WAIT, move |m| !of_order(m, a).is_empty()).await;

    // Act: the first stops; the second must take over.
    first.stop().await;
    let b = second.create_order("Two").await["id"].as_i64().unwrap();

    // Assert
    let msgs = reader.read_until(WAIT, move |m| !of_order(m, b).is_empty()).await;
    assert!(of_order(&msgs, a).len() <= 1);
    let (_, health) = second.get_json("/api/health").await;
    assert_eq!(health["workflow"]["outbox"]["state"], "running", "{health}");
}

/// A relay with this delivery timeout (`message.timeout.ms`) that has
/// published a first change, and a reader of its topic.
async fn publishing_with_timeout(ms: &str) -> (Kafka, crate::helpers::TestApp, crate::Reader) {
    let kafka = Kafka::start();
    let app = spawn_app_with(|s| {
        kafka.configure(s);
        s.kafka.properties = Some(format!("message.timeout.ms={ms}"));
    })
    .await;
    let reader = kafka.reader(&kafka.changes);
    let warm = app.create_order("Warm").await["id"].as_i64().unwrap();
    reader.read_until(WAIT, move |m| !of_order(m, warm).is_empty()).await;
    (kafka, app, reader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_delays_changes_but_loses_none() {
    // Arrange: deliveries time out after a second, so the outage below
    // makes whole batches fail and the relay has to send them again.
    let (kafka, app, reader) = publishing_with_timeout("1000").await;

    // Act: the broker goes away while orders are written, then comes back.
    kafka.cluster.broker_down(1).unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(app.create_order(&format!("During outage {i}")).await["id"].as_i64().unwrap());
    }
    eventually(WAIT, || async {
        let (_, health) = app.get_json("/api/health").await;
        (health["workflow"]["outbox"]["retries"].as_u64()? > 0).then_some(())
    })
    .await;
    kafka.cluster.broker_up(1).unwrap();

    // Assert: REST never waited for Kafka (the orders exist) and every change arrives.
    let want = ids.clone();
    let msgs = reader.read_until(WAIT, move |m| want.iter().all(|id| !of_order(m, *id).is_empty())).await;
    for id in ids {
        assert!(!of_order(&msgs, id).is_empty(), "order {id}");
    }
    let (_, health) = app.get_json("/api/health").await;
    assert_eq!(health["workflow"]["outbox"]["state"], "running", "{health}");
}

/// With no delivery timeout (`message.timeout.ms=0`), a broker away holds
/// a batch's acknowledgements for as long as it is away: `/api/health` says
/// so while the relay waits, and the batch is published when the broker is
/// back. Before, health said "running", with nothing in `last_error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_waiting_for_acknowledgements_without_a_timeout_is_said_in_health() {
    let (kafka, app, reader) = publishing_with_timeout("0").await;
    kafka.cluster.broker_down(1).unwrap();
    let id = app.create_order("Held").await["id"].as_i64().unwrap();
    let outbox = eventually(WAIT, || async {
        let (_, health) = app.get_json("/api/health").await;
        let outbox = health["workflow"]["outbox"].clone();
        (outbox["state"] == "retrying").then_some(outbox)
    })
    .await;
    let said = outbox["last_error"].as_str().unwrap_or_default();
    assert!(said.contains("changes sent to Kafka (1) are not acknowledged after 10 s"), "{outbox}");
    kafka.cluster.broker_up(1).unwrap();
    reader.read_until(WAIT, move |m| !of_order(m, id).is_empty()).await;
    eventually(WAIT, || async {
        let (_, health) = app.get_json("/api/health").await;
        (health["workflow"]["outbox"]["state"] == "running").then_some(())
    })
    .await;
}

/// A delivery timeout drops a message while the next one of its partition
/// still lands (one message in the producer's queue at a time, the broker
/// down past the first's timeout and up before the second's): the relay
/// sends a rewind to that partition before the batch goes again, so a
/// consumer that skips positions at or below what it applied takes the
/// older change when it comes again. Before, it came after the newer one
/// and was skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_overtook_an_older_one_of_its_batch_is_followed_by_a_rewind() {
    let (kafka, app, reader) = publishing_with_timeout(
        "4000,queue.buffering.max.messages=1,reconnect.backoff.ms=50,reconnect.backoff.max.ms=200",
    )
    .await;
    let id = app.create_order("Overtaken").await["id"].as_i64().unwrap();
    reader.read_until(WAIT, move |m| !of_order(m, id).is_empty()).await;
    let db = app.sql().await;
    // Every rewind the relay records as owed, as it records it.
    db.batch_execute(
        "CREATE TABLE rewinds_owed (due jsonb); \
         CREATE FUNCTION note_rewind_due() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN INSERT INTO rewinds_owed VALUES (NEW.rewind_due); RETURN NEW; END $$; \
         CREATE TRIGGER note_rewind_due AFTER UPDATE OF rewind_due ON outbox_positions FOR EACH ROW \
           WHEN (NEW.rewind_due IS NOT NULL) EXECUTE FUNCTION note_rewind_due()",
    )
    .await
    .unwrap();
    let position = |m: &OwnedMessage| header(m, "ordercast-position").and_then(|p| p.parse::<i64>().ok());
    // Tried again while the timing misses (the first change not timed out
    // yet when the broker came back): nothing overtook anything then.
    for attempt in 1..=3 {
        kafka.cluster.broker_down(1).unwrap();
        // Two changes of one order (one partition), in one batch.
        db.batch_execute(&format!(
            "BEGIN; UPDATE orders SET quantity = quantity + 1 WHERE id = {id}; \
             UPDATE orders SET quantity = quantity + 1 WHERE id = {id}; COMMIT"
        ))
        .await
        .unwrap();
        let head: i64 = db.query_one("SELECT change_head()", &[]).await.unwrap().get(0);
        // The first times out at 4-5 s (librdkafka looks once a second),
        // the second is queued then, to time out 4 s later.
        tokio::time::sleep(Duration::from_millis(6000)).await;
        kafka.cluster.broker_up(1).unwrap();
        let msgs =
            reader.read_until(WAIT, move |m| m.iter().filter(|m| position(m) == Some(head - 1)).count() >= 1).await;
        let on_partition: Vec<&OwnedMessage> = {
            let partition = of_order(&msgs, id)[0].partition();
            msgs.iter().filter(|m| m.partition() == partition).collect()
        };
        let first = |p: i64| on_partition.iter().position(|m| position(m) == Some(p));
        let (older, newer) = (first(head - 1).unwrap(), first(head));
        if newer.is_none_or(|newer| older < newer) {
            assert!(attempt < 3, "the older change never timed out before the newer landed");
            continue;
        }
        let rewind = on_partition.iter().position(|m| header(m, "ordercast-op").as_deref() == Some("rewind"));
        assert!(
            rewind.is_some_and(|r| newer.unwrap() < r && r < older),
            "no rewind between the newer change and the older"
        );
        // Recorded before it was sent (for an instance publishing after a
        // stop), and cleared once sent.
        let partition = on_partition[0].partition().to_string();
        let owed: Vec<serde_json::Value> =
            db.query("SELECT due FROM rewinds_owed", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
        assert!(owed.iter().any(|d| d[&partition] == json!(head)), "{owed:?}");
        let due: Option<serde_json::Value> =
            db.query_one("SELECT rewind_due FROM outbox_positions", &[]).await.unwrap().get(0);
        assert_eq!(due, None);
        return;
    }
}

/// A rewind owed when the relay stopped (a change of the failed batch had
/// overtaken an older one; recorded in `outbox_positions.rewind_due`) is sent
/// by the next instance before the batch goes again. Before, it was kept in
/// the process's memory only, and lost with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewind_owed_when_the_relay_stopped_is_sent_by_the_next_instance() {
    // Arrange: one change published; the relay stops owing a rewind for the
    // next change of that order's partition.
    let kafka = Kafka::start();
    let (first, reader, db, id, partition) = one_published_then_stopped(&kafka, "Owed").await;
    db.batch_execute(&format!("UPDATE orders SET quantity = quantity + 1 WHERE id = {id}")).await.unwrap();
    let (stored, head): (i64, i64) = {
        let row = db.query_one("SELECT (SELECT position FROM outbox_positions), change_head()", &[]).await.unwrap();
        (row.get(0), row.get(1))
    };
    db.execute("UPDATE outbox_positions SET rewind_due = $1", &[&json!({ partition.to_string(): head })])
        .await
        .unwrap();

    // Act
    let _second = spawn_app_on(&first.db_url, |s| kafka.configure(s)).await;

    // Assert: the rewind, then the change it covers; the record cleared.
    let msgs = reader.read_until(WAIT, move |m| !of_order(m, id).is_empty()).await;
    assert_eq!(rewinds(&msgs).get(&partition), Some(&json!({"type": "rewind", "after": stored, "through": head})));
    let again = of_order(&msgs, id)[0];
    assert!(rewind_offset(&msgs, partition) < Some(again.offset()), "the rewind comes first");
    let due: Option<serde_json::Value> =
        db.query_one("SELECT rewind_due FROM outbox_positions", &[]).await.unwrap().get(0);
    assert_eq!(due, None);
}

/// A relay that cannot reach PostgreSQL says `disconnected` in health, and
/// publishes again once it can. Before, it said `standby`, as a healthy
/// standby does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_cannot_reach_the_database_says_disconnected() {
    let kafka = Kafka::start();
    let app = spawn_app_with(|s| kafka.configure(s)).await;
    let state = |want: &'static str| {
        let app = &app;
        eventually(WAIT, move || async move {
            let (_, health) = app.get_json("/api/health").await;
            (health["workflow"]["outbox"]["state"] == want).then_some(())
        })
    };
    state("running").await;
    let admin = ordercast::db::connect(&crate::helpers::admin_url()).await.unwrap();
    let name = &app.db_name;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'ordercast-outbox' AND datname = '{name}'"
        ))
        .await
        .unwrap();
    state("disconnected").await;
    admin.batch_execute(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true")).await.unwrap();
    state("running").await;
    let id = app.create_order("Reconnected").await["id"].as_i64().unwrap();
    kafka.reader(&kafka.changes).read_until(WAIT, move |m| !of_order(m, id).is_empty()).await;
}

/// A change too large for the topic (a DBA's 2 MB error message: the old and
/// new rows both carry it) goes as a stub that says so, and the changes after
/// it follow. Before, Kafka's refusal was retried forever and nothing after
/// it was published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_too_large_for_the_topic_goes_as_a_stub_and_holds_nothing_up() {
    let kafka = Kafka::start();
    let app = spawn_app_with(|s| kafka.configure(s)).await;
    let reader = kafka.reader(&kafka.changes);
    let id = app.create_order("Ada").await["id"].as_i64().unwrap();
    let db = app.sql().await;
    db.execute("UPDATE orders SET error_message = repeat('x', 2000000) WHERE id = $1", &[&id]).await.unwrap();
    // Cleared again (its old row still carries it), then a plain change.
    assert_eq!(app.patch(id, &json!({"error_message": null})).await.status(), 200);
    assert_eq!(app.patch(id, &json!({"status": "processing"})).await.status(), 200);

    let mut msgs = reader.read_until(WAIT, move |m| of_order(m, id).len() >= 4).await;
    msgs.extend(reader.drain(Duration::from_secs(1)).await);
    let mine = of_order(&msgs, id);
    assert_eq!(mine.len(), 4, "each change once");
    for m in &mine[1..3] {
        let stub = payload(m);
        assert_eq!(header(m, "ordercast-truncated").as_deref(), Some("true"));
        assert_eq!(
            (stub["truncated"].as_bool(), &stub["order"], &stub["old"]),
            (Some(true), &json!({"id": id}), &json!(null))
        );
        assert_eq!((stub["seq"].as_i64(), stub["op"].as_str()), (Some(position(m)), Some("update")));
    }
    assert_eq!(header(mine[3], "ordercast-truncated"), None);
    assert_eq!(payload(mine[3])["order"]["status"], "processing");
    assert!(mine.windows(2).all(|w| position(w[0]) < position(w[1])));
}

/// `Kafka::configure`, with a delivery timeout of 2 s: a relay that finds a
/// loss waits that long before its rewind; and a produce request timeout of
/// 18 s: the late check reads 20 s after the takeover, when the tests'
/// late messages have landed (see `docs/workflow.md`).
fn relay_settings(kafka: &Kafka, s: &mut ordercast::config::Settings) {
    kafka.configure(s);
    s.kafka.properties = Some("message.timeout.ms=2000,request.timeout.ms=18000".into());
}

/// The rewind messages among `msgs`, by partition.
fn rewinds(msgs: &[OwnedMessage]) -> HashMap<i32, serde_json::Value> {
    msgs.iter()
        .filter(|m| header(m, "ordercast-op").as_deref() == Some("rewind"))
        .map(|m| (m.partition(), payload(m)))
        .collect()
}

/// The offset of the first rewind message on `partition` among `msgs`.
fn rewind_offset(msgs: &[OwnedMessage], partition: i32) -> Option<i64> {
    msgs.iter()
        .find(|m| m.partition() == partition && header(m, "ordercast-op").as_deref() == Some("rewind"))
        .map(|m| m.offset())
}

/// Orders `Kept` then `Lost`, each published and the relay's position stored
/// past it; answers their ids and positions.
async fn publish_kept_and_lost(app: &crate::helpers::TestApp, reader: &crate::Reader) -> [(i64, i64); 2] {
    let db = app.sql().await;
    let mut out = [(0, 0); 2];
    for (i, name) in ["Kept", "Lost"].into_iter().enumerate() {
        let id = app.create_order(name).await["id"].as_i64().unwrap();
        let msgs = reader.read_until(WAIT, move |m| !of_order(m, id).is_empty()).await;
        let pos = position(of_order(&msgs, id)[0]);
        crate::until(&db, "SELECT max(position) FROM outbox_positions", |p| p >= pos).await;
        out[i] = (id, pos);
    }
    out
}

/// `publish_kept_and_lost` on an instance that is then stopped; answers it
/// (its database stays), a reader of the topic and a database connection.
async fn published_then_stopped(
    kafka: &Kafka,
) -> (crate::helpers::TestApp, crate::Reader, tokio_postgres::Client, [(i64, i64); 2]) {
    let mut app = spawn_app_with(|s| relay_settings(kafka, s)).await;
    let reader = kafka.reader(&kafka.changes);
    let published = publish_kept_and_lost(&app, &reader).await;
    app.stop().await;
    let db = app.sql().await;
    (app, reader, db, published)
}

/// SQL that makes the database forget every commit after `kept`, the relay's
/// stored position with them, as a failover to a standby that missed them or
/// a restored backup does: the next commit takes the first lost position.
fn lose_after(kept: i64) -> String {
    format!("{} UPDATE outbox_positions SET position = {kept}", crate::helpers::forget_after(kept, true))
}

const DBA_INSERT: &str = "INSERT INTO orders (customer_name, product, quantity, unit_price) \
                          VALUES ('After the loss', 'Nut', 1, 1) RETURNING id";

/// The rewind on every partition, then the change that reuses the lost
/// position, after the rewind on its partition.
async fn assert_rewound_before_reuse(reader: &crate::Reader, kept: i64, lost: i64, after_loss: i64) {
    let msgs = reader
        .read_until(WAIT, move |m| {
            rewinds(m).len() == crate::PARTITIONS as usize && !of_order(m, after_loss).is_empty()
        })
        .await;
    for (partition, rewind) in rewinds(&msgs) {
        assert_eq!(rewind, json!({"type": "rewind", "after": kept, "through": lost}), "partition {partition}");
    }
    let reused = of_order(&msgs, after_loss)[0];
    assert_eq!(position(reused), lost, "the commit after the loss took the lost position");
    let rewind_at = rewind_offset(&msgs, reused.partition());
    assert!(rewind_at < Some(reused.offset()), "the rewind comes first on partition {}", reused.partition());
}

/// The database loses a commit the relay published (a failover to a standby
/// that missed it, a restored backup), and the next commit is numbered with
/// its position. Consumers skip positions at or below what they applied, so
/// before that commit goes out, every partition gets a rewind message naming
/// the positions to forget. Before, the new change went out unannounced with
/// a position consumers had seen, and was dropped by them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_lost_published_changes_gets_a_rewind_before_their_positions_return() {
    // Arrange
    let kafka = Kafka::start();
    let app = spawn_app_with(|s| relay_settings(&kafka, s)).await;
    let reader = kafka.reader(&kafka.changes);
    let [(_, kept), (_, lost)] = publish_kept_and_lost(&app, &reader).await;
    let db = app.sql().await;

    // Act: the loss, a commit after it, and the relay's connection drops (as
    // at a failover; the live session reads only after its own position).
    db.batch_execute(&lose_after(kept)).await.unwrap();
    let after_loss: i64 = scalar(&db, DBA_INSERT).await;
    db.batch_execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'ordercast-outbox' AND datname = current_database()",
    )
    .await
    .unwrap();

    // Assert
    assert_rewound_before_reuse(&reader, kept, lost, after_loss).await;
    let (_, health) = app.get_json("/api/health").await;
    assert_eq!(health["workflow"]["outbox"]["rewinds"], 1, "{health}");

    // The next takeover finds the reused position as the log holds it.
    db.batch_execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'ordercast-outbox' AND datname = current_database()",
    )
    .await
    .unwrap();
    let next: i64 = scalar(&db, DBA_INSERT).await;
    let msgs = reader.read_until(WAIT, move |m| !of_order(m, next).is_empty()).await;
    assert_eq!(rewinds(&msgs).len(), 0, "no second rewind");
    let (_, health) = app.get_json("/api/health").await;
    assert_eq!(health["workflow"]["outbox"]["rewinds"], 1, "{health}");
    assert_eq!(health["workflow"]["outbox"]["checked"], lost, "the reused position was checked: {health}");

    // The late check (from the first takeover, still pending) reads the lost
    // change too, before the rewind that covers it: no rewind of its own.
    let health = late_checked(&app).await;
    assert_eq!(health["rewinds"], 1, "{health}");
}

/// The same loss while no ordercast runs: the instance started afterwards
/// has published nothing itself, and finds the loss from what the topic
/// holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_started_after_the_database_lost_published_changes_sends_the_rewind() {
    // Arrange
    let kafka = Kafka::start();
    let (first, reader, db, [(_, kept), (_, lost)]) = published_then_stopped(&kafka).await;
    db.batch_execute(&lose_after(kept)).await.unwrap();
    let after_loss: i64 = scalar(&db, DBA_INSERT).await;

    // Act
    let _second = spawn_app_on(&first.db_url, |s| relay_settings(&kafka, s)).await;

    // Assert
    assert_rewound_before_reuse(&reader, kept, lost, after_loss).await;
}

/// The same, with the topic's metadata answering an error for a while when
/// the relay takes over (a leader being elected after a broker restart, as
/// in an outage that also failed the database over): the check is asked
/// again until the topic answers. Before, any topic error but "unknown" or
/// "not authorized" meant "not checked": no rewind, and the change reusing
/// the lost position went out unannounced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_error_at_the_takeover_delays_the_check_and_the_rewind_still_comes() {
    use rdkafka::types::RDKafkaRespErr;

    let kafka = Kafka::start();
    let (first, reader, db, [(_, kept), (_, lost)]) = published_then_stopped(&kafka).await;
    db.batch_execute(&lose_after(kept)).await.unwrap();
    let after_loss: i64 = scalar(&db, DBA_INSERT).await;
    kafka.cluster.topic_error(&kafka.changes, RDKafkaRespErr::RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE).unwrap();

    let _second = spawn_app_on(&first.db_url, |s| relay_settings(&kafka, s)).await;
    // The relay takes over at once, and its check meets the error.
    tokio::time::sleep(Duration::from_secs(3)).await;
    kafka.cluster.topic_error(&kafka.changes, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR).unwrap();

    assert_rewound_before_reuse(&reader, kept, lost, after_loss).await;
}

/// A restart with nothing lost sends no rewind, also when the last change
/// published went out but its position was not stored (a crash between the
/// two).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_without_a_loss_sends_no_rewind() {
    // Arrange
    let kafka = Kafka::start();
    let (first, reader, db, [(_, kept), (lost_id, lost)]) = published_then_stopped(&kafka).await;
    db.batch_execute(&format!("UPDATE outbox_positions SET position = {kept}")).await.unwrap();

    // Act: the new instance takes over, and then the first one's late copy
    // of `Lost` lands (its produce was still being retried).
    let second = spawn_app_on(&first.db_url, |s| relay_settings(&kafka, s)).await;
    let after: i64 = scalar(&db, DBA_INSERT).await;
    let msgs = reader.read_until(WAIT, move |m| !of_order(m, after).is_empty()).await;
    produce_late_copy(&kafka, of_order(&msgs, lost_id)[0], None).await;

    // Assert: `Lost` again (at least once), then the new change; no rewind,
    // also once the late check has read the late copy.
    assert_eq!(rewinds(&msgs).len(), 0, "no rewind");
    assert_eq!(of_order(&msgs, lost_id).len(), 1, "published again from the stored position");
    let health = late_checked(&second).await;
    assert_eq!(health["rewinds"], 0, "{health}");
    assert_eq!(health["checked"], lost, "the newest change was checked: {health}");
    assert!(health["late_checked"].as_i64() >= Some(3), "Lost again, the new change, the late copy: {health}");
    assert_eq!(rewinds(&reader.drain(Duration::from_secs(1)).await).len(), 0, "no rewind");
}

/// Produces a copy of `m`, as another instance would have: with the
/// commit time `committed_at` (microseconds) instead of the copy's when
/// given.
async fn produce_late_copy(kafka: &Kafka, m: &OwnedMessage, committed_at: Option<i64>) {
    use rdkafka::message::{Header, OwnedHeaders};
    let producer = kafka.producer();
    let mut headers = OwnedHeaders::new();
    for h in m.headers().expect("headers").iter() {
        let value = match (h.key, committed_at) {
            ("ordercast-committed-at", Some(micros)) => micros.to_string().into_bytes(),
            _ => h.value.unwrap_or_default().to_vec(),
        };
        headers = headers.insert(Header { key: h.key, value: Some(&value) });
    }
    let record = rdkafka::producer::FutureRecord::to(m.topic())
        .key(m.key().unwrap())
        .partition(m.partition())
        .payload(m.payload().unwrap())
        .headers(headers);
    producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
}

/// The relay's health once its late check has run (20 s after it took
/// over, with `relay_settings`).
async fn late_checked(app: &crate::helpers::TestApp) -> serde_json::Value {
    eventually(WAIT, || async {
        let (_, health) = app.get_json("/api/health").await;
        let outbox = &health["workflow"]["outbox"];
        outbox["late_checked"].is_i64().then(|| outbox.clone())
    })
    .await
}

/// Another instance was publishing a change when the database lost it (a
/// failover), and its produce was still being retried when this relay took
/// over: the takeover's check found nothing lost, the next commit took the
/// lost position, and then the late message landed with that position.
/// Consumers could apply it though the change is gone, and drop the new
/// commit at the position for its order. Once the delivery timeout is
/// over, the late check finds it and sends a rewind, after it on its
/// partition. Before, the late message went unannounced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_change_landing_after_the_takeover_gets_a_rewind() {
    // Arrange: a relay that took over (it published a change), and the
    // commit that takes the position the lost change had.
    let kafka = Kafka::start();
    let app = spawn_app_with(|s| relay_settings(&kafka, s)).await;
    let reader = kafka.reader(&kafka.changes);
    let db = app.sql().await;
    let reused: i64 = scalar(&db, DBA_INSERT).await;
    let msgs = reader.read_until(WAIT, move |m| !of_order(m, reused).is_empty()).await;
    let new = of_order(&msgs, reused)[0];
    let pos = position(new);
    let committed: i64 = header(new, "ordercast-committed-at").unwrap().parse().unwrap();

    // Act: the lost change lands late, with that position and the lost
    // commit's time.
    produce_late_copy(&kafka, new, Some(committed - 1_000_000)).await;

    // Assert
    let msgs = reader.read_until(WAIT, |m| rewinds(m).len() == crate::PARTITIONS as usize).await;
    for (partition, rewind) in rewinds(&msgs) {
        assert_eq!(rewind, json!({"type": "rewind", "after": pos - 1, "through": pos}), "partition {partition}");
    }
    // (The reader goes on after the new change.)
    let late = of_order(&msgs, reused)[0];
    assert_eq!(header(late, "ordercast-committed-at"), Some((committed - 1_000_000).to_string()));
    let rewind_at = rewind_offset(&msgs, late.partition());
    assert!(rewind_at > Some(late.offset()), "the rewind comes after the late message");
    let health = late_checked(&app).await;
    assert_eq!(health["rewinds"], 1, "{health}");
    assert_eq!(health["late_checked"], 2, "the new change and the late one: {health}");
}

/// While a relay that found a loss waits out the delivery timeout before its
/// rewind (for another instance's produces still in flight), it publishes
/// nothing, says so in `/api/health`, and a shutdown does not wait for the
/// end of the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wait_before_a_rewind_publishes_nothing_and_gives_way_to_shutdown() {
    // Arrange: a loss, a commit after it, and a delivery timeout of 60 s.
    let kafka = Kafka::start();
    let (first, reader, db, [(_, kept), _]) = published_then_stopped(&kafka).await;
    db.batch_execute(&lose_after(kept)).await.unwrap();
    scalar::<i64>(&db, DBA_INSERT).await;
    let mut second = spawn_app_on(&first.db_url, |s| {
        kafka.configure(s);
        s.kafka.properties = Some("message.timeout.ms=60000".into());
    })
    .await;
    let health = eventually(WAIT, || async {
        let (_, health) = second.get_json("/api/health").await;
        (health["workflow"]["outbox"]["state"] == "rewinding").then_some(health)
    })
    .await;

    // Assert: nothing published while it waits.
    assert_eq!(health["workflow"]["outbox"]["rewinds"], 0, "{health}");
    let published = reader.drain(Duration::from_secs(2)).await;
    assert!(published.is_empty(), "{} messages published during the wait", published.len());

    // Act
    let stopping = std::time::Instant::now();
    second.stop().await;

    // Assert: the server gives the relay 10 s to stop before it aborts it
    // (and the ingest first, as long: here some 3 s). A relay that waited
    // on would take 10 s or more.
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(9), "the stop took {took:?}");
}

/// The late check is stored with the relay's position: an instance
/// restarted before its late check was done leaves it to the next one,
/// which reads from where the partitions ended at the earlier takeover.
/// Here the late message has a position the relay had stored, so the next
/// takeover's own check passes it by. Before, the check was lost with the
/// process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_check_left_by_a_stopped_instance_is_done_by_the_next() {
    // Arrange: an instance whose late check is a minute away publishes a
    // change, the lost change with its position lands late, and the instance
    // stops.
    let kafka = Kafka::start();
    let mut first = spawn_app_with(|s| {
        relay_settings(&kafka, s);
        s.kafka.properties = Some("message.timeout.ms=2000,request.timeout.ms=60000".into());
    })
    .await;
    let reader = kafka.reader(&kafka.changes);
    let db = first.sql().await;
    let reused: i64 = scalar(&db, DBA_INSERT).await;
    let msgs = reader.read_until(WAIT, move |m| !of_order(m, reused).is_empty()).await;
    let new = of_order(&msgs, reused)[0];
    let pos = position(new);
    crate::until(&db, "SELECT max(position) FROM outbox_positions", |p| p >= pos).await;
    let committed: i64 = header(new, "ordercast-committed-at").unwrap().parse().unwrap();
    produce_late_copy(&kafka, new, Some(committed - 1_000_000)).await;
    first.stop().await;

    // Act
    let second = spawn_app_on(&first.db_url, |s| relay_settings(&kafka, s)).await;

    // Assert
    let health = late_checked(&second).await;
    assert_eq!(health["rewinds"], 1, "{health}");
    assert_eq!(health["late_checked"], 2, "the change and the late one: {health}");
    let msgs = reader.read_until(WAIT, |m| rewinds(m).len() == crate::PARTITIONS as usize).await;
    for (partition, rewind) in rewinds(&msgs) {
        assert_eq!(rewind, json!({"type": "rewind", "after": pos - 1, "through": pos}), "partition {partition}");
    }
    let pending: Option<serde_json::Value> = scalar(&db, "SELECT late_since FROM outbox_positions").await;
    assert_eq!(pending, None, "done");
}

/// The late check reads what landed after the takeover, not the topic's
/// history: a change from before it, which the takeover's check did not
/// see (more than its 16 last offsets from the end of its partition), is
/// not read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_late_check_reads_only_what_landed_after_the_takeover() {
    // Arrange
    let kafka = Kafka::start();
    old_change_behind_16_others(&kafka).await;

    // Act
    let app = spawn_app_with(|s| relay_settings(&kafka, s)).await;

    // Assert
    let health = late_checked(&app).await;
    assert_eq!(health["late_checked"], 0, "{health}");
    assert_eq!(health["rewinds"], 0, "{health}");
}

/// On one partition: an old change the log does not hold, then 16 messages
/// that are no change. The takeover's check (the last 16 offsets) finds no
/// change and arms the late check from there.
async fn old_change_behind_16_others(kafka: &Kafka) {
    use rdkafka::message::{Header, OwnedHeaders};
    let producer = kafka.producer();
    let old = OwnedHeaders::new()
        .insert(Header { key: "ordercast-position", value: Some("1") })
        .insert(Header { key: "ordercast-committed-at", value: Some("1000000") });
    let record = rdkafka::producer::FutureRecord::to(&kafka.changes).key("1").partition(0).payload("{}").headers(old);
    producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    for _ in 0..16 {
        let record = rdkafka::producer::FutureRecord::to(&kafka.changes).key("other").partition(0).payload("{}");
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    }
}

/// The broker refuses every batch (the relay's rights on the topic taken away)
/// while the late check, which only reads, succeeds: health still says
/// retrying, with the batch's error. Before, the late check's success
/// cleared the flag the batches had set, and health said running until the
/// next try failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_check_that_succeeds_while_batches_fail_leaves_health_retrying() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    // Arrange: messages on the topic, so the takeover arms a late check.
    let kafka = Kafka::start();
    old_change_behind_16_others(&kafka).await;
    let app = spawn_app_with(|s| relay_settings(&kafka, s)).await;
    let refused = RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED;
    kafka.cluster.request_errors(RDKafkaApiKey::Produce, &[refused; 1000]);
    // Each refusal takes a second to come: the batch tried right after the
    // late check is still on its way when health is read. (Answered at
    // once, it set the flag again within milliseconds, and the old shared
    // flag showed `running` only in that window.)
    kafka.cluster.broker_round_trip_time(1, Duration::from_millis(1000)).unwrap();

    // Act
    app.create_order("Refused").await;

    // Assert: the late check is looked in on between tries of the batch,
    // which back off to 5 s: it is seen done later than with `late_checked`.
    let health = eventually(2 * WAIT, || async {
        let (_, health) = app.get_json("/api/health").await;
        let outbox = &health["workflow"]["outbox"];
        outbox["late_checked"].is_i64().then(|| outbox.clone())
    })
    .await;
    assert_eq!(health["state"], "retrying", "{health}");
    assert!(health["last_error"].as_str().unwrap_or_default().contains("change"), "{health}");
}

/// The last change published to a partition may be followed by messages
/// that are none: here an aborted transaction's message and its marker.
/// The takeover's check reads the last offsets of each partition, not only
/// the last one, and finds the lost change behind them. Before, it read
/// the last offset alone, found no change there, and saw no loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_change_behind_a_transactions_marker_is_found() {
    // Arrange: `Lost`'s partition ends with an aborted transaction.
    use rdkafka::producer::Producer;
    let kafka = Kafka::start();
    let (first, reader, db, [(_, kept), (lost_id, lost)]) = published_then_stopped(&kafka).await;
    let msgs = kafka.reader(&kafka.changes).read_until(WAIT, move |m| !of_order(m, lost_id).is_empty()).await;
    let partition = of_order(&msgs, lost_id)[0].partition();
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("transactional.id", format!("other-{}", uuid::Uuid::new_v4()))
        .create()
        .unwrap();
    producer.init_transactions(WAIT).unwrap();
    producer.begin_transaction().unwrap();
    let record = rdkafka::producer::FutureRecord::to(&kafka.changes).key("other").partition(partition).payload("{}");
    producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    producer.abort_transaction(WAIT).unwrap();
    db.batch_execute(&lose_after(kept)).await.unwrap();
    let after_loss: i64 = scalar(&db, DBA_INSERT).await;

    // Act
    let _second = spawn_app_on(&first.db_url, |s| relay_settings(&kafka, s)).await;

    // Assert
    assert_rewound_before_reuse(&reader, kept, lost, after_loss).await;
}
