use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{dba_insert_many, eventually, forget_after, spawn_app, spawn_app_on, spawn_app_with, WsEvent};

const WAIT: Duration = Duration::from_secs(15);

/// 400 changes of about 50 KB each (20 statements of 20 orders whose
/// customer's name is `letter` 50 KiB times): enough to fill a stalled
/// client's buffers.
async fn large_changes(db: &tokio_postgres::Client, letter: &str) {
    let big = letter.repeat(50 * 1024);
    for _ in 0..20 {
        db.execute(
            "INSERT INTO orders (customer_name, product, quantity, unit_price) SELECT $1, 'Bulk', 1, 1 FROM generate_series(1, 20)",
            &[&big],
        )
        .await
        .unwrap();
    }
}

/// Where retention's horizon stands.
async fn horizon(db: &tokio_postgres::Client) -> i64 {
    db.query_one("SELECT pruned_through FROM change_retention", &[]).await.unwrap().get(0)
}

async fn dba_insert(db: &tokio_postgres::Client, customer: &str) -> i64 {
    db.query_one(
        "INSERT INTO orders (customer_name, product, quantity, unit_price) VALUES ($1, 'Bolt', 1, 2) RETURNING id",
        &[&customer],
    )
    .await
    .unwrap()
    .get(0)
}

/// A WebSocket client resuming with `since` and an SSE client with
/// `Last-Event-ID` from `position` each get `ready`, then first the change to
/// the order of `customer`.
async fn resuming_from_gets(app: &crate::helpers::TestApp, position: i64, customer: &str) {
    let mut resumed = app.ws(&format!("?since={position}")).await;
    resumed.ready().await;
    assert_eq!(resumed.changes(1, WAIT).await[0]["order"]["customer_name"], customer);
    let mut sse = app.sse("/api/events", Some(&position.to_string())).await;
    assert_eq!(sse.changes(1, WAIT).await[0].data["order"]["customer_name"], customer);
}

fn seq(v: &Value) -> i64 {
    v["seq"].as_i64().unwrap_or_else(|| panic!("no seq in {v}"))
}

/// Takes a feed's items until it has handed out position `through`: each
/// change must be the `expected` one (none is expected before a resync when
/// `expected` is None), and a resync (`position_expired`) moves the
/// expectation past its position. Returns the resync positions.
async fn in_order_through(
    feed: &mut ordercast::changes::feed::Feed,
    mut expected: Option<i64>,
    through: i64,
) -> Vec<i64> {
    use ordercast::changes::feed::Item;
    let mut resyncs = Vec::new();
    let check = |pos: i64, expected: &mut Option<i64>| {
        assert_eq!(Some(pos), *expected, "a change handed out after a gap, with no resync first");
        *expected = Some(pos + 1);
    };
    while expected.is_none_or(|e| e <= through) {
        match tokio::time::timeout(WAIT, feed.next()).await.expect("the feed answers") {
            Some(Item::Change(c)) => check(c.pos, &mut expected),
            Some(Item::Batch(b)) => b.changes.iter().for_each(|c| check(c.pos, &mut expected)),
            Some(Item::Redacted(c, _)) => check(c.pos, &mut expected),
            Some(Item::Resync { reason, position }) => {
                assert_eq!(reason, "position_expired");
                resyncs.push(position);
                expected = Some(position + 1);
            }
            None => panic!("the feed ended"),
        }
    }
    resyncs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dba_insert_update_delete_reach_websocket_and_sse_clients() {
    let app = spawn_app().await;
    let mut ws = app.ws("").await;
    let ready = ws.ready().await;
    assert!(ready["seq"].is_i64());
    let mut sse = app.sse("/api/events", None).await;
    assert_eq!(sse.next_event(WAIT).await.event, "ready");

    let db = app.sql().await;
    let id = dba_insert(&db, "Direct SQL").await;
    db.execute("UPDATE orders SET status = 'processing' WHERE id = $1", &[&id]).await.unwrap();
    db.execute("DELETE FROM orders WHERE id = $1", &[&id]).await.unwrap();

    let changes = ws.changes(3, WAIT).await;
    let ops: Vec<&str> = changes.iter().map(|c| c["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["insert", "update", "delete"]);
    assert_eq!(changes[0]["order"]["customer_name"], "Direct SQL");
    assert_eq!(changes[0]["old"], Value::Null);
    assert_eq!(changes[1]["order"]["status"], "processing");
    assert_eq!(changes[1]["old"]["status"], "pending");
    assert_eq!(changes[2]["order"]["id"], id);
    assert_eq!(changes[0]["actor"], "sql:postgres");
    assert!(seq(&changes[0]) < seq(&changes[1]) && seq(&changes[1]) < seq(&changes[2]));

    let events = sse.changes(3, WAIT).await;
    for (e, c) in events.iter().zip(&changes) {
        assert_eq!(e.data, *c, "SSE and WebSocket carry the same change");
        assert_eq!(e.id.as_deref(), Some(seq(c).to_string().as_str()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_transaction_of_5000_rows_reaches_every_client_in_order() {
    let app = spawn_app().await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut ws = app.ws("").await;
        ws.ready().await;
        clients.push(ws);
    }
    let mut sse = app.sse("/api/events", None).await;
    sse.next_event(WAIT).await;
    app.sql()
        .await
        .execute(
            "INSERT INTO orders (customer_name, product, quantity, unit_price) \
             SELECT 'bulk ' || g, 'Nut', 1, 1 FROM generate_series(1, 5000) g",
            &[],
        )
        .await
        .unwrap();
    for ws in &mut clients {
        let changes = ws.changes(5000, Duration::from_secs(60)).await;
        let seqs: Vec<i64> = changes.iter().map(seq).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "positions are consecutive within a transaction");
        let ids: Vec<i64> = changes.iter().map(|c| c["order"]["id"].as_i64().unwrap()).collect();
        assert!(ids.windows(2).all(|w| w[1] > w[0]));
        assert_eq!(changes[4999]["order"]["customer_name"], "bulk 5000");
    }
    let events = sse.changes(5000, Duration::from_secs(60)).await;
    let seqs: Vec<i64> = events.iter().map(|e| seq(&e.data)).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "SSE: positions are consecutive, in order");
    assert!(events.iter().all(|e| e.id == Some(seq(&e.data).to_string())), "SSE: each event's id is its position");
    assert_eq!(events[4999].data["order"]["customer_name"], "bulk 5000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_since_and_last_event_id_gets_exactly_the_missed_changes() {
    let app = spawn_app().await;
    let db = app.sql().await;
    let mut ws = app.ws("").await;
    ws.ready().await;
    dba_insert(&db, "before 1").await;
    dba_insert(&db, "before 2").await;
    let seen = ws.changes(2, WAIT).await;
    let last = seq(&seen[1]);
    drop(ws);

    for i in 0..5 {
        dba_insert(&db, &format!("missed {i}")).await;
    }
    // WebSocket: since in the URL.
    let mut ws = app.ws(&format!("?since={last}")).await;
    assert_eq!(ws.ready().await["seq"], last);
    let missed = ws.changes(5, WAIT).await;
    let names: Vec<&str> = missed.iter().map(|c| c["order"]["customer_name"].as_str().unwrap()).collect();
    assert_eq!(names, ["missed 0", "missed 1", "missed 2", "missed 3", "missed 4"]);
    ws.expect_silence(Duration::from_millis(500)).await;
    // Then live.
    dba_insert(&db, "live").await;
    assert_eq!(ws.changes(1, WAIT).await[0]["order"]["customer_name"], "live");

    // WebSocket: since in a subscribe message.
    let mut ws2 = app.ws("").await;
    ws2.ready().await;
    ws2.send_json(json!({"type": "subscribe", "since": last})).await;
    assert_eq!(ws2.ready().await["seq"], last);
    assert_eq!(ws2.changes(6, WAIT).await[5]["order"]["customer_name"], "live");

    // SSE: Last-Event-ID, as EventSource sends on reconnect.
    let mut sse = app.sse("/api/events", Some(&last.to_string())).await;
    let events = sse.changes(6, WAIT).await;
    assert_eq!(events[0].data["order"]["customer_name"], "missed 0");
    assert_eq!(events[5].data["order"]["customer_name"], "live");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_listen_backend_loses_and_doubles_nothing() {
    let app = spawn_app().await;
    let db = app.sql().await;
    let mut ws = app.ws("").await;
    ws.ready().await;
    let writer = {
        let db_url = app.db_url.clone();
        tokio::spawn(async move {
            let db = ordercast::db::connect(&db_url).await.unwrap();
            for i in 0..300 {
                dba_insert(&db, &format!("stream {i}")).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Each cut must hit a connected listener: on a loaded machine the
        // previous reconnect may still be under way.
        eventually(Duration::from_secs(10), || async {
            let cut = db
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE application_name = 'ordercast-listener' AND datname = current_database()",
                    &[],
                )
                .await
                .unwrap();
            (cut > 0).then_some(())
        })
        .await;
    }
    writer.await.unwrap();
    let changes = ws.changes(300, Duration::from_secs(60)).await;
    let names: Vec<String> =
        changes.iter().map(|c| c["order"]["customer_name"].as_str().unwrap().to_string()).collect();
    let expected: Vec<String> = (0..300).map(|i| format!("stream {i}")).collect();
    assert_eq!(names, expected);
    ws.expect_silence(Duration::from_millis(500)).await;
    eventually(Duration::from_secs(10), || async {
        (app.state.listener.reconnects.load(std::sync::atomic::Ordering::Relaxed) >= 3).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_resume_across_a_server_restart() {
    let mut app = spawn_app().await;
    let db = app.sql().await;
    let mut ws = app.ws("").await;
    ws.ready().await;
    dba_insert(&db, "one").await;
    let last = seq(&ws.changes(1, WAIT).await[0]);
    // Graceful stop: the close frame tells the client where to resume.
    app.stop().await;
    match ws.next_event(WAIT).await {
        WsEvent::Closed(Some((1001, reason))) => assert!(reason.contains(&format!("since={last}")), "{reason}"),
        other => panic!("expected a 1001 close, got {other:?}"),
    }
    dba_insert(&db, "while down 1").await;
    dba_insert(&db, "while down 2").await;
    let app2 = spawn_app_on(&app.db_url, |_| {}).await;
    let mut ws = app2.ws(&format!("?since={last}")).await;
    ws.ready().await;
    let names: Vec<String> =
        ws.changes(2, WAIT).await.iter().map(|c| c["order"]["customer_name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, ["while down 1", "while down 2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_out_of_order_commit_and_an_open_transaction_lose_nothing() {
    let app = spawn_app().await;
    let mut ws = app.ws("").await;
    ws.ready().await;
    // T1 takes its order id first, then sits in BEGIN like a DBA at lunch.
    let t1 = app.sql().await;
    t1.batch_execute(
        "BEGIN; INSERT INTO orders (customer_name, product, quantity, unit_price) VALUES ('early', 'Cog', 1, 1)",
    )
    .await
    .unwrap();
    // T2 starts later and commits first: delivered at once, not held back.
    let t2 = app.sql().await;
    dba_insert(&t2, "late").await;
    // (Held back, it would not come before T1 commits below.)
    let late = ws.changes(1, WAIT).await.remove(0);
    assert_eq!(late["order"]["customer_name"], "late");
    // A client that saw "late" disconnects.
    let p_late = seq(&late);
    t1.batch_execute("COMMIT").await.unwrap();
    let early = ws.changes(1, WAIT).await.remove(0);
    assert_eq!(early["order"]["customer_name"], "early");
    assert!(early["order"]["id"].as_i64() < late["order"]["id"].as_i64(), "ids were taken in the other order");
    assert!(seq(&early) > p_late, "positions follow commit order");
    // Resuming from the position of "late" still yields "early".
    resuming_from_gets(&app, p_late, "early").await;
}

/// Pruning through a position inside a transaction keeps that transaction
/// whole, and the horizon stops before it: a client that had the first of
/// its changes resumes with the rest, not with a resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_inside_a_transaction_keeps_it_whole_and_resumable() {
    let app = spawn_app().await;
    let db = app.sql().await;
    let head: i64 = db.query_one("SELECT change_head()", &[]).await.unwrap().get(0);
    dba_insert_many(&db, "Whole", 3).await;
    db.query_one("SELECT change_prune($1)", &[&(head + 2)]).await.unwrap();
    assert_eq!(horizon(&db).await, head, "the horizon stops before the transaction it keeps");
    let mut resumed = app.ws(&format!("?since={}", head + 1)).await;
    resumed.ready().await;
    let rest = resumed.changes(2, WAIT).await;
    assert_eq!(rest.iter().map(seq).collect::<Vec<_>>(), [head + 2, head + 3]);
    assert_eq!(rest[1]["order"]["customer_name"], "Whole 3");
    // Never past the head: the next transaction would straddle the horizon.
    db.query_one("SELECT change_prune($1)", &[&(head + 100)]).await.unwrap();
    assert_eq!(horizon(&db).await, head + 3);
}

mod migrations {
    refinery::embed_migrations!("sql");
}

/// A horizon that a prune before V22 left inside a transaction it kept is
/// lowered to that transaction's start when V22 is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrating_lowers_a_horizon_left_inside_a_kept_transaction() {
    let (url, _) = crate::helpers::create_database().await;
    let mut db = ordercast::db::connect(&url).await.unwrap();
    let before = migrations::migrations::runner().set_target(refinery::Target::Version(21));
    before.run_async(&mut db).await.unwrap();
    dba_insert_many(&db, "Kept", 3).await;
    // The prune of before V22: the transaction (0, 3] is kept, the horizon set inside it.
    db.query_one("SELECT change_prune(2)", &[]).await.unwrap();
    assert_eq!(horizon(&db).await, 2);
    ordercast::db::migrate(&url).await.unwrap();
    assert_eq!(horizon(&db).await, 0);
    let kept: i64 = db.query_one("SELECT count(*) FROM change_log", &[]).await.unwrap().get(0);
    assert_eq!(kept, 3);
}

/// A backlog to prune (retention lowered, or turned on for a long log) goes
/// in rounds of `PRUNE_ROUND` positions, each its own short transaction. In
/// one statement it could outlast the database's `statement_timeout`, fail
/// at every pass and never make progress, the log growing meanwhile. A
/// transaction larger than a round is pruned whole, in a round of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_backlog_is_pruned_in_rounds_each_its_own_transaction() {
    use ordercast::changes::maintenance::{run_once, PRUNE_ROUND};
    let app = spawn_app_with(|s| {
        s.retention_rows = 0;
        s.retention_secs = 0;
    })
    .await;
    let db = app.sql().await;
    // Transactions of one round each, but the second of two.
    for i in 0..5 {
        dba_insert_many(&db, &format!("backlog {i}"), if i == 1 { 2 * PRUNE_ROUND } else { PRUNE_ROUND }).await;
    }
    let head: i64 = db.query_one("SELECT change_head()", &[]).await.unwrap().get(0);
    assert_eq!(head, 6 * PRUNE_ROUND);
    // Each move of the horizon, and the transaction that made it.
    db.batch_execute(
        "CREATE TABLE horizon_moves (through bigint, txid bigint); \
         CREATE FUNCTION horizon_moved() RETURNS trigger LANGUAGE plpgsql AS \
           $$BEGIN INSERT INTO horizon_moves VALUES (NEW.pruned_through, txid_current()); RETURN NULL; END$$; \
         CREATE TRIGGER horizon_moved AFTER UPDATE ON change_retention FOR EACH ROW \
           WHEN (NEW.pruned_through <> OLD.pruned_through) EXECUTE FUNCTION horizon_moved()",
    )
    .await
    .unwrap();
    let mut settings = app.state.settings.clone();
    settings.retention_rows = 1_000;
    let pruned = run_once(&app.state.pool, &settings).await.unwrap();
    // The cutoff (head - 1,000) is inside the last transaction: kept whole.
    assert_eq!((pruned, horizon(&db).await), (5 * PRUNE_ROUND, 5 * PRUNE_ROUND));
    let moves: Vec<(i64, i64)> = db
        .query("SELECT through, txid FROM horizon_moves ORDER BY through", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let throughs: Vec<i64> = moves.iter().map(|m| m.0).collect();
    assert_eq!(throughs, [1, 3, 4, 5].map(|n| n * PRUNE_ROUND), "{moves:?}");
    let txids: HashSet<i64> = moves.iter().map(|m| m.1).collect();
    assert_eq!(txids.len(), 4, "each round its own transaction: {moves:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_beyond_retention_gets_an_explicit_resync() {
    let app = spawn_app_with(|s| {
        s.retention_rows = 3;
        s.retention_secs = 0;
    })
    .await;
    let db = app.sql().await;
    for i in 0..10 {
        dba_insert(&db, &format!("old {i}")).await;
    }
    // (The maintenance run at start may have pruned part of it already.)
    ordercast::changes::maintenance::run_once(&app.state.pool, &app.state.settings).await.unwrap();
    let pruned = horizon(&db).await;
    let head: i64 = db.query_one("SELECT change_head()", &[]).await.unwrap().get(0);
    assert_eq!(head - pruned, 3);
    // The hub's position (what `resync` reports) must have reached the head.
    app.settled().await;
    let mut ws = app.ws("?since=1").await;
    let resync = ws.next_json(WAIT).await;
    assert_eq!(resync["type"], "resync", "{resync}");
    assert_eq!(resync["reason"], "position_expired");
    let head = seq(&resync);
    assert_eq!(ws.ready().await["seq"], head);
    dba_insert(&db, "after resync").await;
    assert_eq!(ws.changes(1, WAIT).await[0]["order"]["customer_name"], "after resync");
    // Within the window, resume still works.
    let mut ws = app.ws(&format!("?since={}", head - 2)).await;
    ws.ready().await;
    assert_eq!(ws.changes(3, WAIT).await[2]["order"]["customer_name"], "after resync");
    // A position from the future (another database) is a resync too.
    let mut ws = app.ws("?since=999999").await;
    assert_eq!(ws.next_json(WAIT).await["reason"], "position_unknown");
    // SSE gets the same as an event whose id moves Last-Event-ID forward.
    let mut sse = app.sse("/api/events", Some("1")).await;
    let ev = sse.next_event(WAIT).await;
    assert_eq!(ev.event, "resync");
    assert!(ev.id.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_by_status_id_and_customer_are_applied_by_the_server() {
    let app = spawn_app().await;
    let db = app.sql().await;
    let a = dba_insert(&db, "Alice").await;
    let b = dba_insert(&db, "Bob").await;
    // Connect after those inserts have been fanned out: clients without
    // `since` start from the hub's position.
    app.settled().await;
    let mut by_status = app.ws("?status=processing,shipped").await;
    by_status.ready().await;
    let mut by_id = app.ws(&format!("?id={b}")).await;
    by_id.ready().await;
    let mut by_customer = app.ws("").await;
    by_customer.ready().await;
    by_customer.send_json(json!({"type": "subscribe", "filter": {"customer": "alice"}})).await;
    by_customer.ready().await;
    let mut sse = app.sse("/api/events?customer=Bob", None).await;
    sse.next_event(WAIT).await;

    db.execute("UPDATE orders SET status = 'processing' WHERE id = $1", &[&a]).await.unwrap();
    db.execute("UPDATE orders SET quantity = 3 WHERE id = $1", &[&b]).await.unwrap();
    db.execute("UPDATE orders SET status = 'processed' WHERE id = $1", &[&a]).await.unwrap();
    dba_insert(&db, "Carol").await;
    db.execute("UPDATE orders SET status = 'cancelled' WHERE id = $1", &[&b]).await.unwrap();

    // Status filter: entering processing, and leaving it.
    let c = by_status.changes(2, WAIT).await;
    assert_eq!((c[0]["order"]["id"].as_i64(), c[0]["order"]["status"].as_str()), (Some(a), Some("processing")));
    assert_eq!(c[1]["order"]["status"], "processed");
    by_status.expect_silence(Duration::from_millis(300)).await;
    let c = by_id.changes(2, WAIT).await;
    assert!(c.iter().all(|c| c["order"]["id"] == b));
    by_id.expect_silence(Duration::from_millis(300)).await;
    let c = by_customer.changes(2, WAIT).await;
    assert!(c.iter().all(|c| c["order"]["customer_name"] == "Alice"));
    by_customer.expect_silence(Duration::from_millis(300)).await;
    let e = sse.changes(2, WAIT).await;
    assert!(e.iter().all(|e| e.data["order"]["customer_name"] == "Bob"));
    // Both fields on one row, before or after: Alice's order moved to Dora
    // as it entered processing was neither row Alice's processing order;
    // Alice's own order entering processing is.
    let mut both = app.ws("?customer=alice&status=processing").await;
    both.ready().await;
    let moved = dba_insert(&db, "Alice").await;
    let stays = dba_insert(&db, "Alice").await;
    db.execute("UPDATE orders SET customer_name = 'Dora', status = 'processing' WHERE id = $1", &[&moved])
        .await
        .unwrap();
    db.execute("UPDATE orders SET status = 'processing' WHERE id = $1", &[&stays]).await.unwrap();
    let c = both.changes(1, WAIT).await;
    assert_eq!(c[0]["order"]["id"], stays);
    both.expect_silence(Duration::from_millis(300)).await;
    // A bad filter in a request that is not a handshake: 422.
    let r = app.http.get(app.url("/ws?status=bogus")).send().await.unwrap();
    assert_eq!(r.status(), 422);
    let r = app.http.get(app.url("/api/events?since=abc")).send().await.unwrap();
    assert_eq!(r.status(), 422);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_filter_folds_case_as_the_database_does() {
    // A word-final capital sigma: `str::to_lowercase` gives `ς`, PostgreSQL's
    // `lower()` and per-character folding give `σ`.
    let app = spawn_app().await;
    let db = app.sql().await;
    app.settled().await;
    let mut upper = app.ws("?customer=%CE%9F%CE%94%CE%A5%CE%A3%CE%A3%CE%95%CE%A5%CE%A3").await; // ΟΔΥΣΣΕΥΣ
    upper.ready().await;
    let mut lower = app.ws("?customer=%CE%BF%CE%B4%CF%85%CF%83%CF%83%CE%B5%CF%85%CF%83").await; // οδυσσευσ
    lower.ready().await;
    let id = dba_insert(&db, "ΟΔΥΣΣΕΥΣ").await;
    for ws in [&mut upper, &mut lower] {
        let c = ws.changes(1, WAIT).await;
        assert_eq!(c[0]["order"]["id"].as_i64(), Some(id));
    }
    let (_, page) = app.get_json("/api/orders?customer=%CE%9F%CE%94%CE%A5%CE%A3%CE%A3%CE%95%CE%A5%CE%A3").await;
    let ids: Vec<i64> = page["items"].as_array().unwrap().iter().map(|o| o["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_kb_customer_name_commits_and_is_pushed() {
    let app = spawn_app().await;
    let mut ws = app.ws("").await;
    ws.ready().await;
    let name = "N".repeat(100 * 1024);
    dba_insert(&app.sql().await, &name).await;
    let c = ws.changes(1, WAIT).await;
    assert_eq!(c[0]["order"]["customer_name"].as_str().unwrap().len(), name.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_client_frames_get_errors_and_the_connection_keeps_working() {
    let app = spawn_app().await;
    let mut ws = app.ws("").await;
    ws.ready().await;
    for (garbage, code) in [
        ("not json", "malformed_json"),
        ("[1,2]", "invalid_message"),
        (r#"{"type":"launch"}"#, "unknown_type"),
        (r#"{"type":"subscribe","filter":{"status":7}}"#, "validation_failed"),
        (r#"{"type":"subscribe","since":"yesterday"}"#, "invalid_position"),
    ] {
        ws.send_text(garbage).await;
        let e = ws.next_json(WAIT).await;
        assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some(code)), "{garbage}");
    }
    ws.send_json(json!({"type": "ping"})).await;
    assert_eq!(ws.next_json(WAIT).await["type"], "pong");
    dba_insert(&app.sql().await, "still here").await;
    assert_eq!(ws.changes(1, WAIT).await[0]["order"]["customer_name"], "still here");
    // An oversized frame closes with 1009.
    ws.send_text(&"x".repeat(200 * 1024)).await;
    match ws.next_event(WAIT).await {
        WsEvent::Closed(Some((code, _))) => assert_eq!(code, 1009),
        other => panic!("expected close 1009, got {other:?}"),
    }
}

/// A WebSocket whose stream cannot be opened (the database away; here the
/// streams' pool busy past its wait) is upgraded and closed with 4503 and
/// the error's code, which a browser can read, as a `subscribe` that cannot
/// open its stream. Before, the handshake was refused with an HTTP 503,
/// which a browser sees only as a failed WebSocket (and the dashboard took
/// for WebSocket blocked on the way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_whose_stream_cannot_be_opened_is_closed_with_4503() {
    let app = spawn_app_with(|s| {
        s.stream_pool_size = 1;
        s.db_timeout_secs = 1;
    })
    .await;
    app.create_order("Behind").await;
    let held = app.state.stream_pool.get().await.unwrap();
    let mut ws = app.ws("?since=0").await;
    match ws.next_event(WAIT).await {
        WsEvent::Closed(Some((code, reason))) => {
            assert_eq!((code, reason.as_str()), (4503, "cannot open the stream: database_unavailable"))
        }
        other => panic!("{other:?}"),
    }
    drop(held);
    let mut ws = app.ws("?since=0").await;
    ws.ready().await;
    assert_eq!(ws.changes(1, WAIT).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_cut_off_and_others_are_unaffected() {
    let app = spawn_app_with(|s| {
        s.client_buffer = 64;
        // Long enough for the healthy reader on a loaded 2-core machine.
        s.slow_client_secs = 6;
    })
    .await;
    // The stalled client: connects, then never reads a byte.
    let stalled = tokio::net::TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    let (mut stalled_ws, _) =
        tokio_tungstenite::client_async(format!("ws://127.0.0.1:{}/ws", app.port), stalled).await.unwrap();
    use futures_util::StreamExt;
    let _ = stalled_ws.next().await; // ready
    let mut healthy = app.ws("").await;
    healthy.ready().await;

    let db = app.sql().await;
    large_changes(&db, "B").await;
    // The healthy client receives all 400 large changes.
    let got = healthy.changes(400, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 400);
    // The stalled one fell behind the hub's bounded queue and was dropped from it.
    eventually(Duration::from_secs(20), || async {
        (app.state.hub.stats.lagged.load(std::sync::atomic::Ordering::Relaxed) >= 1).then_some(())
    })
    .await;
    // ...and is then disconnected as a slow consumer (4008) instead of
    // buffering without bound.
    eventually(Duration::from_secs(30), || async {
        (app.state.sessions.ws.load(std::sync::atomic::Ordering::Relaxed) == 1).then_some(())
    })
    .await;
    assert_eq!(app.state.hub.stats.subscriptions.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(
        app.state.hub.stats.slow_disconnects.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "closed as a slow consumer (4008), not for another reason"
    );
    // The connection is gone: reading what it was sent comes to an end. The
    // 4008 close frame is queued behind what the client did not read, and
    // the server waits a second for it to go out: a client that reads
    // nothing meanwhile gets the end of the connection without it.
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(10), stalled_ws.next()).await {
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Close(f)))) => break f.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_)) | None) => break None,
            Err(_) => panic!("the stalled client's connection is still open"),
        }
    };
    assert!(ended.is_none_or(|code| code == 4008), "{ended:?}");
}

/// An SSE client that stops reading is disconnected too: an event stream has
/// no close frame, and the HTTP layer stops asking it for more while its
/// buffer is full, so before, the connection, its slot and its queued
/// changes stayed for as long as the client kept its TCP connection open.
/// Now the kernel drops a connection whose data stays unacknowledged, or
/// unsent behind a closed window, for twice the slow-client limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_client_that_never_reads_is_disconnected() {
    use tokio::io::AsyncWriteExt;
    let app = spawn_app_with(|s| {
        s.client_buffer = 64;
        s.slow_client_secs = 2;
    })
    .await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(([127, 0, 0, 1], app.port).into()).await.unwrap();
    stalled.write_all(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.unwrap();
    let mut healthy = app.sse("/api/events", None).await;
    eventually(WAIT, || async {
        (app.state.sessions.sse.load(std::sync::atomic::Ordering::Relaxed) == 2).then_some(())
    })
    .await;
    let db = app.sql().await;
    large_changes(&db, "S").await;
    assert_eq!(healthy.changes(400, Duration::from_secs(60)).await.len(), 400);
    // The stalled one goes: its stream, its session and its slot.
    eventually(Duration::from_secs(60), || async {
        (app.state.sessions.sse.load(std::sync::atomic::Ordering::Relaxed) == 1).then_some(())
    })
    .await;
    // The healthy one goes on.
    let id = dba_insert(&db, "After").await;
    let after = healthy.changes(1, WAIT).await;
    assert_eq!(after[0].data["order"]["id"], id);
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_through_one_instance_reaches_the_clients_of_another() {
    let a = spawn_app().await;
    let b = spawn_app_on(&a.db_url, |_| {}).await;
    let mut on_b = b.ws("").await;
    on_b.ready().await;
    let mut on_a = a.sse("/api/events", None).await;
    on_a.next_event(WAIT).await;
    let created = a.create_order("Through A").await;
    let updated: Value = b.patch(created["id"].as_i64().unwrap(), &json!({"quantity": 9})).await.json().await.unwrap();
    let c = on_b.changes(2, WAIT).await;
    assert_eq!(c[0]["order"]["customer_name"], "Through A");
    assert_eq!(c[1]["order"]["version"], updated["version"]);
    assert_eq!(c[0]["actor"], "api:127.0.0.1");
    let e = on_a.changes(2, WAIT).await;
    assert_eq!(e[1].data, c[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_clients_leaving_mid_burst_do_not_disturb_the_rest() {
    let app = spawn_app().await;
    let mut clients = Vec::new();
    for _ in 0..300 {
        let mut ws = app.ws("").await;
        ws.ready().await;
        clients.push(ws);
    }
    let stayers: Vec<_> = clients.drain(..20).collect();
    let writer = {
        let url = app.db_url.clone();
        tokio::spawn(async move {
            let db = ordercast::db::connect(&url).await.unwrap();
            for i in 0..50 {
                db.execute(
                    "INSERT INTO orders (customer_name, product, quantity, unit_price) SELECT $1 || g, 'Pin', 1, 1 FROM generate_series(1, 20) g",
                    &[&format!("burst {i}/")],
                )
                .await
                .unwrap();
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(clients); // 280 clients leave in the middle of the burst
    writer.await.unwrap();
    for mut ws in stayers {
        let got = ws.changes(1000, Duration::from_secs(60)).await;
        let unique: HashSet<i64> = got.iter().map(seq).collect();
        assert_eq!(unique.len(), 1000);
    }
    let mut newcomer = app.ws("").await;
    newcomer.ready().await;
    dba_insert(&app.sql().await, "newcomer").await;
    assert_eq!(newcomer.changes(1, WAIT).await[0]["order"]["customer_name"], "newcomer");
    eventually(Duration::from_secs(10), || async {
        (app.state.hub.stats.subscriptions.load(std::sync::atomic::Ordering::Relaxed) == 1).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_then_changes_has_no_gap_under_concurrent_writes() {
    let app = spawn_app().await;
    let writer = {
        let url = app.db_url.clone();
        tokio::spawn(async move {
            let db = ordercast::db::connect(&url).await.unwrap();
            for i in 0..200 {
                dba_insert(&db, &format!("w{i}")).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut ws = app.ws("?snapshot=true&snapshot_limit=10000").await;
    let mut names = HashSet::new();
    loop {
        let m = ws.next_json(WAIT).await;
        match m["type"].as_str().unwrap() {
            "snapshot" => {
                for o in m["orders"].as_array().unwrap() {
                    names.insert(o["customer_name"].as_str().unwrap().to_string());
                }
            }
            "ready" => break,
            other => panic!("unexpected {other}"),
        }
    }
    writer.await.unwrap();
    while names.len() < 200 {
        let c = ws.changes(1, WAIT).await.remove(0);
        assert!(names.insert(c["order"]["customer_name"].as_str().unwrap().to_string()), "duplicate {c}");
    }
    ws.expect_silence(Duration::from_millis(500)).await;
}

/// A quiet SSE stream sends a heartbeat event every 15 s, which a page can
/// see (EventSource hides comments) and tell a quiet stream from a dead one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_sse_stream_sends_heartbeat_events() {
    let app = spawn_app().await;
    let mut sse = app.sse("/api/events", None).await;
    assert_eq!(sse.next_event(WAIT).await.event, "ready");
    let beat = sse.next_any_event(Duration::from_secs(20)).await;
    assert_eq!((beat.event.as_str(), &beat.data, &beat.id), ("heartbeat", &json!({"type": "heartbeat"}), &None));
}

/// `GET /api/changes`: the newest changes first, each exactly as the
/// streams send it, page by page back to the start of the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_changes_are_listed_newest_first_as_the_streams_send_them() {
    let app = spawn_app().await;
    let db = app.sql().await;
    let a = app.create_order("Recent A").await["id"].as_i64().unwrap();
    let b = dba_insert(&db, "Recent B").await;
    app.patch(a, &json!({"status": "processing"})).await;
    app.settled().await;
    let (status, page) = app.get_json("/api/changes?limit=2").await;
    assert_eq!(status, 200, "{page}");
    let got = page["changes"].as_array().unwrap();
    let head = page["position"].as_i64().unwrap();
    assert_eq!(
        got.iter()
            .map(|c| (c["seq"].as_i64().unwrap(), c["op"].as_str().unwrap(), c["order"]["id"].as_i64().unwrap()))
            .collect::<Vec<_>>(),
        vec![(head, "update", a), (head - 1, "insert", b)]
    );
    assert!(
        got[0]["actor"].as_str().unwrap().starts_with("api:") && got[1]["actor"].as_str().unwrap().starts_with("sql:")
    );
    assert_eq!(page["next_before"], head - 1);
    let (_, older) = app.get_json(&format!("/api/changes?before={}", head - 1)).await;
    assert_eq!(older["changes"].as_array().unwrap().len(), 1);
    assert_eq!((&older["changes"][0]["order"]["id"], &older["next_before"]), (&json!(a), &Value::Null));
    // The same messages a client resuming from the start gets, reversed.
    let mut ws = app.ws("?since=0").await;
    ws.ready().await;
    let mut streamed = ws.changes(3, WAIT).await;
    streamed.reverse();
    let (_, all) = app.get_json("/api/changes").await;
    assert_eq!(all["changes"].as_array().unwrap(), &streamed);
    // Paging two at a time lists every change once, back to the first.
    for i in 0..5 {
        dba_insert(&db, &format!("Recent more {i}")).await;
    }
    let (mut seen, mut next) = (Vec::new(), None::<i64>);
    loop {
        let q = match next {
            None => "/api/changes?limit=2".to_string(),
            Some(before) => format!("/api/changes?limit=2&before={before}"),
        };
        let (_, page) = app.get_json(&q).await;
        seen.extend(page["changes"].as_array().unwrap().iter().map(|c| c["seq"].as_i64().unwrap()));
        next = page["next_before"].as_i64();
        if next.is_none() {
            break;
        }
    }
    assert_eq!(seen, (1..=head + 5).rev().collect::<Vec<_>>());
    for (q, code) in
        [("?before=0", "invalid_cursor"), ("?limit=0", "validation_failed"), ("?since=1", "unknown_parameter")]
    {
        let (status, body) = app.get_json(&format!("/api/changes{q}")).await;
        assert_eq!((status, &body["code"]), (422, &json!(code)), "{q}: {body}");
    }
}

/// Rows `EXPLAIN ANALYZE` says the recent-changes query visited and threw
/// away, for a page before `before` of `limit` changes (`viewer`: a
/// confined token's customer).
async fn recent_rows_discarded(db: &tokio_postgres::Client, before: i64, limit: i64, viewer: Option<&str>) -> i64 {
    fn discarded(node: &Value) -> i64 {
        node["Rows Removed by Filter"].as_i64().unwrap_or(0)
            + node["Plans"].as_array().map_or(0, |plans| plans.iter().map(discarded).sum())
    }
    let (from, transactions) = if viewer.is_some() { ((before - 10_000).max(1), 10_000) } else { (1, limit) };
    let sql = format!("EXPLAIN (ANALYZE, FORMAT JSON) {}", ordercast::routes::changes::RECENT_SQL);
    let plan: Value =
        db.query_one(&sql, &[&before, &limit, &from, &viewer, &transactions]).await.unwrap().get::<_, Value>(0);
    discarded(&plan[0]["Plan"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_recent_changes_far_back_reads_only_its_own_transactions() {
    let app = spawn_app().await;
    let db = app.sql().await;
    // 3,000 transactions of one change each.
    db.batch_execute(
        "CREATE PROCEDURE one_by_one(n integer) LANGUAGE plpgsql AS $$
         BEGIN
             FOR i IN 1..n LOOP
                 INSERT INTO orders (customer_name, product, quantity, unit_price) VALUES ('Far ' || i, 'Bolt', 1, 2);
                 COMMIT;
             END LOOP;
         END $$",
    )
    .await
    .unwrap();
    // Alone: a procedure commits only outside a transaction block.
    db.batch_execute("CALL one_by_one(3000)").await.unwrap();
    // Planned with the log's statistics, as autovacuum would have them.
    db.batch_execute("ANALYZE change_tx; ANALYZE change_log").await.unwrap();
    let (_, page) = app.get_json("/api/changes?before=11&limit=5").await;
    let seqs: Vec<i64> = page["changes"].as_array().unwrap().iter().map(seq).collect();
    assert_eq!((seqs, &page["next_before"]), (vec![10, 9, 8, 7, 6], &json!(6)));
    // Before, the scan went down from the head: 2,990 transactions visited
    // and thrown away for this page.
    assert!(recent_rows_discarded(&db, 11, 5, None).await < 10);
    assert!(recent_rows_discarded(&db, 11, 5, Some("far 3")).await < 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_order_stream_sends_current_state_then_changes() {
    let app = spawn_app().await;
    let id = app.create_order("Single").await["id"].as_i64().unwrap();
    let other = app.create_order("Other").await["id"].as_i64().unwrap();
    let mut sse = app.sse(&format!("/api/orders/{id}/events"), None).await;
    let snap = sse.next_event(WAIT).await;
    assert_eq!(snap.event, "snapshot");
    assert_eq!(snap.data["orders"][0]["id"], id);
    assert_eq!(sse.next_event(WAIT).await.event, "ready");
    app.patch(other, &json!({"quantity": 2})).await;
    app.patch(id, &json!({"status": "processing"})).await;
    let e = sse.changes(1, WAIT).await;
    assert_eq!(e[0].data["order"]["status"], "processing");
    assert_eq!(e[0].data["order"]["id"], id);
    let r = app.http.get(app.url("/api/orders/999999/events")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // `since` resumes, as Last-Event-ID does: the order's changes after
    // it, no snapshot.
    let before: i64 = e[0].id.as_deref().unwrap().parse::<i64>().unwrap() - 1;
    let mut resumed = app.sse(&format!("/api/orders/{id}/events?since={before}"), None).await;
    assert_eq!(resumed.next_event(WAIT).await.event, "ready");
    let again = resumed.changes(1, WAIT).await;
    assert_eq!((&again[0].id, &again[0].data["order"]["status"]), (&e[0].id, &json!("processing")));
    // Anything else is refused, as on /api/events.
    for (q, code) in [("?snapshot=false", "unknown_parameter"), ("?since=soon", "invalid_position")] {
        let (status, body) = app.get_json(&format!("/api/orders/{id}/events{q}")).await;
        assert_eq!((status, &body["code"]), (422, &json!(code)), "{q}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_event_id_that_is_not_a_position_is_422_whether_text_or_not() {
    use reqwest::header::HeaderValue;
    let app = spawn_app().await;
    let id = app.create_order("Resumer").await["id"].as_i64().unwrap();
    let values = [
        HeaderValue::from_static("yesterday"),
        HeaderValue::from_static("-1"),
        // Not text: UTF-8 for "é", and a lone obs-text byte.
        HeaderValue::from_bytes(b"\xc3\xa9").unwrap(),
        HeaderValue::from_bytes(b"7\x80").unwrap(),
    ];
    for path in ["/api/events".to_string(), format!("/api/orders/{id}/events")] {
        for v in &values {
            let r = app.http.get(app.url(&path)).header("Last-Event-ID", v.clone()).send().await.unwrap();
            let status = r.status().as_u16();
            let content_type = r.headers()["content-type"].to_str().unwrap().to_string();
            let body: Value = r.json().await.unwrap();
            assert_eq!((status, body["code"].as_str()), (422, Some("invalid_position")), "{path} {v:?}: {body}");
            assert_eq!(content_type, "application/problem+json", "{path} {v:?}");
            assert_eq!((body["status"].as_u64(), body["field"].as_str()), (Some(422), Some("since")), "{body}");
            assert!(body["message"].as_str().is_some_and(|m| m.contains("not a position")), "{body}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_in_positions_does_not_stall_live_or_resuming_readers() {
    let app = spawn_app().await;
    let db = app.sql().await;
    let mut ws = app.ws("").await;
    ws.ready().await;
    dba_insert(&db, "before gap").await;
    let before = seq(&ws.changes(1, WAIT).await[0]);
    // A transaction that fails after the sequencer reserved its positions
    // leaves a gap; make a large one.
    db.execute("SELECT setval('change_position', (SELECT last_value FROM change_position) + 5000)", &[]).await.unwrap();
    dba_insert(&db, "after gap").await;
    let after = ws.changes(1, WAIT).await.remove(0);
    assert_eq!(after["order"]["customer_name"], "after gap");
    assert!(seq(&after) > before + 5000);
    let mut resumed = app.ws(&format!("?since={before}")).await;
    resumed.ready().await;
    assert_eq!(resumed.changes(1, WAIT).await[0]["order"]["customer_name"], "after gap");
}

/// A gap wider than one read, right after the listener's position, is read
/// past in the same drain: the commits after it go out together, not the
/// first now and the rest on the next idle tick (a second later) when no
/// doorbell follows, as after the listener's reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_after_a_wide_gap_go_out_in_one_drain() {
    let (first, second, apart) = across_a_wide_gap(&[], &["after gap 1", "after gap 2"]).await;
    assert_eq!((&first[..], &second[..]), ("after gap 1", "after gap 2"));
    assert!(apart < Duration::from_millis(500), "the second commit came {apart:?} after the first");
}

/// The same with the gap after a commit that is in the listener's read: the
/// commit past the gap goes out in the same drain, not at the idle tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_past_a_wide_gap_after_another_goes_out_in_the_same_drain() {
    let (first, second, apart) = across_a_wide_gap(&["before the gap"], &["past the gap"]).await;
    assert_eq!((&first[..], &second[..]), ("before the gap", "past the gap"));
    assert!(apart < Duration::from_millis(500), "the commit past the gap came {apart:?} after the one before it");
}

/// With the listener cut off: `before` committed, the positions moved 5,000
/// on (a gap wider than one read), `after` committed. Once the listener is
/// back: the customers of the first two changes a live client gets, and
/// how long after the first the second came.
async fn across_a_wide_gap(before: &[&str], after: &[&str]) -> (String, String, Duration) {
    let app = spawn_app().await;
    let db = app.sql().await;
    let mut ws = app.ws("").await;
    ws.ready().await;
    dba_insert(&db, "before gap").await;
    ws.changes(1, WAIT).await;
    let (admin, name) = cut_off_listener(&db).await;
    for customer in before {
        dba_insert(&db, customer).await;
    }
    db.execute("SELECT setval('change_position', (SELECT last_value FROM change_position) + 5000)", &[]).await.unwrap();
    for customer in after {
        dba_insert(&db, customer).await;
    }
    let_in(&admin, &name).await;
    let first = ws.changes(1, Duration::from_secs(20)).await.remove(0);
    let published = std::time::Instant::now();
    let second = ws.changes(1, WAIT).await.remove(0);
    let apart = published.elapsed();
    let customer = |c: &Value| c["order"]["customer_name"].as_str().unwrap().to_string();
    (customer(&first), customer(&second), apart)
}

/// A read too large to arrive within the listener's watchdog (2,000
/// changes of megabyte rows, here: any read of over 300 changes of one big
/// transaction, made to take 6 s) is not asked again as it was, forever:
/// the next reads ask for fewer changes, and live clients get them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_too_large_for_the_watchdog_goes_on_in_smaller_reads() {
    let app = spawn_app().await;
    let db = app.sql().await;
    let mut ws = app.ws("").await;
    ws.ready().await;
    let head: i64 = db.query_one("SELECT change_head()", &[]).await.unwrap().get(0);
    let end = head + 600;
    wrap_change_read(
        &db,
        &format!("(SELECT pg_sleep(CASE WHEN lim > 300 AND after < {end} THEN 6 ELSE 0 END)) IS NOT NULL"),
    )
    .await;
    db.batch_execute(KILL_LISTENER).await.unwrap();
    db.batch_execute(
        "INSERT INTO orders (customer_name, product, quantity, unit_price)
         SELECT 'Bulk ' || g, 'Bolt', 1, 2 FROM generate_series(1, 600) g",
    )
    .await
    .unwrap();
    let got = ws.changes(600, Duration::from_secs(60)).await;
    let positions: Vec<i64> = got.iter().map(|c| c["seq"].as_i64().unwrap()).collect();
    assert_eq!(positions, (head + 1..=end).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_requests_to_other_routes_get_their_ordinary_answer_streamed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app().await;
    let request = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
    };
    // A JSON route: its answer, then the connection closes.
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    tcp.write_all(request("/api/orders?limit=1").as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut raw)).await.expect("the connection closes").unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains(r#""items""#) && text.contains("connection: close"), "{text}");
    // An endless event stream is streamed, not collected before sending.
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    tcp.write_all(request("/api/events").as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, async {
        while !String::from_utf8_lossy(&raw).contains("event: ready") {
            let mut chunk = [0u8; 4096];
            let n = tcp.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&raw));
            raw.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("the ready event arrives while the stream is open");
    assert!(String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_feed_whose_position_is_pruned_meanwhile_is_told_to_resync() {
    use ordercast::changes::feed::{Feed, Item};
    let app = spawn_app().await;
    let db = app.sql().await;
    let pool = &app.state.pool;
    let head = ordercast::changes::log_bounds(&db).await.unwrap().0;
    async fn next(feed: &mut Feed) -> Option<Item> {
        tokio::time::timeout(WAIT, feed.next()).await.expect("the feed answers")
    }
    // A hub of its own (fed by hand, not by the listener) with a budget of
    // one queued change per client, so the second publish makes the feed lag.
    let hub = ordercast::hub::Hub::start(head, 1);
    let mut feed = Feed::open(&hub, pool, ordercast::domain::Filter::default(), None, None).await.unwrap();
    for name in ["lag 1", "lag 2", "lag 3"] {
        dba_insert(&db, name).await;
    }
    let client = pool.get().await.unwrap();
    let changes = ordercast::changes::read_after(&client, head, 10).await.unwrap().changes;
    assert_eq!(changes.len(), 3);
    hub.publish(vec![changes[0].clone()]).await.unwrap();
    hub.publish(vec![changes[1].clone()]).await.unwrap();
    // `publish` only queues to the hub's task: wait until it has handled
    // both, so the second finds the first still queued and the feed lags
    // (if the feed took the first before, the second would just be queued).
    let target = changes[1].pos;
    eventually(WAIT, || {
        let hub = hub.clone();
        async move { (hub.position() >= target).then_some(()) }
    })
    .await;
    match next(&mut feed).await {
        Some(Item::Change(c)) => assert_eq!(c.pos, changes[0].pos),
        Some(Item::Batch(b)) => assert_eq!(b.changes[0].pos, changes[0].pos),
        other => panic!("{other:?}"),
    }
    // While the feed is behind, retention drops what it would catch up from.
    db.query_one("SELECT change_prune($1)", &[&changes[1].pos]).await.unwrap();
    match next(&mut feed).await {
        Some(Item::Resync { reason, position }) => {
            assert_eq!(reason, "position_expired");
            assert_eq!(position, changes[1].pos);
        }
        other => panic!("expected a resync, got {other:?}"),
    }
    assert_eq!(feed.position(), changes[1].pos);
    // And it goes on live after the resync position.
    hub.publish(vec![changes[2].clone()]).await.unwrap();
    match next(&mut feed).await {
        Some(Item::Change(c)) => assert_eq!(c.pos, changes[2].pos),
        Some(Item::Batch(b)) => assert_eq!(b.changes[0].pos, changes[2].pos),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_that_races_a_catch_up_read_is_told_as_a_resync() {
    use ordercast::changes::feed::Feed;
    let app = spawn_app().await;
    let db = app.sql().await;
    let pool = &app.state.pool;
    let since = ordercast::changes::log_bounds(&db).await.unwrap().0;
    for i in 0..20 {
        dba_insert(&db, &format!("race {i}")).await;
    }
    let head = ordercast::changes::log_bounds(&db).await.unwrap().0;
    // A hub of its own, at the head: the feed catches up (since, head] from
    // the log.
    let hub = ordercast::hub::Hub::start(head, 100);
    let mut feed = Feed::open(&hub, pool, ordercast::domain::Filter::default(), Some(since), None).await.unwrap();
    // From now on, reading the log's bounds takes half a second after its
    // snapshot is taken; a prune commits meanwhile. Whatever the order of
    // the feed's statements, it must not hand out a change past the pruned
    // ones without a resync first.
    db.batch_execute(
        "CREATE OR REPLACE FUNCTION change_head() RETURNS bigint LANGUAGE sql STABLE AS $$
             SELECT COALESCE((SELECT end_pos FROM change_tx WHERE end_pos IS NOT NULL AND pg_sleep(0.5) IS NOT NULL
                              ORDER BY end_pos DESC LIMIT 1),
                             (SELECT pruned_through FROM change_retention))
         $$",
    )
    .await
    .unwrap();
    let pruner = {
        let db = app.sql().await;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(150)).await;
            db.query_one("SELECT change_prune($1)", &[&(since + 10)]).await.unwrap();
        })
    };
    in_order_through(&mut feed, Some(since + 1), head).await;
    pruner.await.unwrap();
}

/// A catch-up read that its session stops waiting for (the session has
/// something else to do: a client's frame, a slow write) finishes anyway
/// and gives its connection back to the pool; the session takes its answer
/// when it asks again. Before, the read moved only while polled, and held
/// the connection meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_read_left_waiting_gives_its_connection_back() {
    use ordercast::changes::feed::{Feed, Item};
    let app = spawn_app().await;
    let db = app.sql().await;
    let since = ordercast::changes::log_bounds(&db).await.unwrap().0;
    for i in 0..3 {
        dba_insert(&db, &format!("left {i}")).await;
    }
    let head = ordercast::changes::log_bounds(&db).await.unwrap().0;
    // Reads take half a second.
    wrap_change_read(&db, "pg_sleep(0.5) IS NOT NULL").await;
    let pool = ordercast::db::pool(&app.db_url, 1, Duration::from_secs(5)).unwrap();
    let hub = ordercast::hub::Hub::start(head, 100);
    let mut feed = Feed::open(&hub, &pool, ordercast::domain::Filter::default(), Some(since), None).await.unwrap();
    // The read starts, and the session turns to something else.
    assert!(tokio::time::timeout(Duration::from_millis(100), feed.next()).await.is_err());
    // The read goes on (it holds the connection: a read dropped with the
    // call it began in would have given it back at once, to be read again
    // at the next call) and then gives the connection back.
    eventually(WAIT, || async { (pool.status().available == 0).then_some(()) }).await;
    eventually(WAIT, || async { (pool.status().available == 1).then_some(()) }).await;
    match tokio::time::timeout(WAIT, feed.next()).await.expect("the feed answers") {
        Some(Item::Change(c)) => assert_eq!(c.pos, since + 1),
        _ => panic!("a change first"),
    }
}

/// A catch-up read whose feeds are all gone (their sessions ended while it
/// waited for a connection) is not run for nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_read_nobody_waits_for_is_not_run() {
    use ordercast::changes::feed::Feed;
    let app = spawn_app().await;
    let db = app.sql().await;
    let since = ordercast::changes::log_bounds(&db).await.unwrap().0;
    dba_insert(&db, "unread").await;
    let head = ordercast::changes::log_bounds(&db).await.unwrap().0;
    db.batch_execute("CREATE SEQUENCE reads_run").await.unwrap();
    // Counted: reads from before the head, which only the feed's catch-up
    // makes once the server's own listener is past it (it reads the log too).
    eventually(WAIT, || async { (app.state.hub.position() >= head).then_some(()) }).await;
    wrap_change_read(&db, &format!("(after >= {head} OR nextval('reads_run') IS NOT NULL)")).await;
    let pool = ordercast::db::pool(&app.db_url, 1, Duration::from_secs(5)).unwrap();
    let hub = ordercast::hub::Hub::start(head, 100);
    let mut feed = Feed::open(&hub, &pool, ordercast::domain::Filter::default(), Some(since), None).await.unwrap();
    let held = pool.get().await.unwrap();
    // Its read waits for the pool's one connection; then the session ends.
    assert!(tokio::time::timeout(Duration::from_millis(100), feed.next()).await.is_err());
    drop(feed);
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let runs: i64 = db.query_one("SELECT last_value FROM reads_run WHERE is_called", &[]).await.map_or(0, |r| r.get(0));
    assert_eq!(runs, 0, "a read nobody waited for ran");
}

/// Feeds catching up from the same position at once (clients reconnecting
/// together) share one read of the log, and hold its changes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feeds_catching_up_from_one_position_share_one_read() {
    use ordercast::changes::feed::{Feed, Item};
    let app = spawn_app().await;
    let db = app.sql().await;
    let pool = &app.state.pool;
    let since = ordercast::changes::log_bounds(&db).await.unwrap().0;
    for i in 0..30 {
        dba_insert(&db, &format!("shared {i}")).await;
    }
    let head = ordercast::changes::log_bounds(&db).await.unwrap().0;
    // Reads after `since` are counted, and take a fifth of a second.
    db.batch_execute("CREATE SEQUENCE reads_after_since").await.unwrap();
    wrap_change_read(
        &db,
        &format!(
            "(SELECT CASE WHEN after = {since} THEN nextval('reads_after_since') END
              FROM pg_sleep(CASE WHEN after = {since} THEN 0.2 ELSE 0 END)) IS NOT NULL
             OR after <> {since}"
        ),
    )
    .await;
    let hub = ordercast::hub::Hub::start(head, 100);
    let mut feeds = Vec::new();
    for _ in 0..40 {
        feeds.push(Feed::open(&hub, pool, ordercast::domain::Filter::default(), Some(since), None).await.unwrap());
    }
    let firsts = futures_util::future::join_all(feeds.iter_mut().map(|f| async move {
        let first = match tokio::time::timeout(WAIT, f.next()).await.expect("the feed answers") {
            Some(Item::Change(c)) => c,
            _ => panic!("a change first"),
        };
        assert_eq!(first.pos, since + 1);
        in_order_through(f, Some(since + 2), head).await;
        first
    }))
    .await;
    let reads: i64 = db.query_one("SELECT last_value FROM reads_after_since", &[]).await.unwrap().get(0);
    assert!(reads <= 2, "{reads} reads after {since} for 40 feeds");
    assert!(firsts.iter().all(|c| std::sync::Arc::ptr_eq(c, &firsts[0])), "one copy of each change");
}

/// A shared read that fails (the database refuses it once) is not handed
/// out again: each feed pauses, reads again, and every one catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feeds_sharing_a_read_that_fails_read_again_and_catch_up() {
    use ordercast::changes::feed::Feed;
    let app = spawn_app().await;
    let db = app.sql().await;
    let pool = &app.state.pool;
    let since = ordercast::changes::log_bounds(&db).await.unwrap().0;
    for i in 0..10 {
        dba_insert(&db, &format!("failed once {i}")).await;
    }
    let head = ordercast::changes::log_bounds(&db).await.unwrap().0;
    db.batch_execute("CREATE SEQUENCE reads_after_since").await.unwrap();
    wrap_change_read(
        &db,
        &format!(
            "(SELECT CASE WHEN after = {since} THEN 1 / (nextval('reads_after_since') - 1) ELSE 1 END
              FROM pg_sleep(CASE WHEN after = {since} THEN 0.2 ELSE 0 END)) IS NOT NULL"
        ),
    )
    .await;
    let hub = ordercast::hub::Hub::start(head, 100);
    let mut feeds = Vec::new();
    for _ in 0..5 {
        feeds.push(Feed::open(&hub, pool, ordercast::domain::Filter::default(), Some(since), None).await.unwrap());
    }
    futures_util::future::join_all(feeds.iter_mut().map(|f| in_order_through(f, Some(since + 1), head))).await;
    let reads: i64 = db.query_one("SELECT last_value FROM reads_after_since", &[]).await.unwrap().get(0);
    assert!(reads >= 2, "the failed read was read again ({reads} reads)");
}

/// A prune that commits after a catch-up read took its snapshot, through
/// positions the read returned, takes nothing from that read: the feed
/// hands out every change without a resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_committed_after_a_complete_catch_up_read_is_no_resync() {
    use ordercast::changes::feed::Feed;
    let app = spawn_app().await;
    let db = app.sql().await;
    let pool = &app.state.pool;
    let since = ordercast::changes::log_bounds(&db).await.unwrap().0;
    for i in 0..20 {
        dba_insert(&db, &format!("late prune {i}")).await;
    }
    let head = ordercast::changes::log_bounds(&db).await.unwrap().0;
    let hub = ordercast::hub::Hub::start(head, 100);
    let mut feed = Feed::open(&hub, pool, ordercast::domain::Filter::default(), Some(since), None).await.unwrap();
    // From now on the feed's log read says so once its snapshot is taken
    // (a sequence: seen at once, outside any transaction), then sleeps half
    // a second; the prune commits meanwhile.
    db.batch_execute("CREATE SEQUENCE read_started").await.unwrap();
    wrap_change_read(
        &db,
        &format!(
            "after <> {since}
             OR (SELECT pg_sleep(0.5) FROM (SELECT nextval('read_started')) started) IS NOT NULL"
        ),
    )
    .await;
    let pruner = {
        let db = app.sql().await;
        tokio::spawn(async move {
            let started =
                || async { db.query_one("SELECT is_called FROM read_started", &[]).await.unwrap().get::<_, bool>(0) };
            crate::helpers::eventually(Duration::from_secs(10), || async { started().await.then_some(()) }).await;
            db.query_one("SELECT change_prune($1)", &[&(since + 10)]).await.unwrap();
        })
    };
    let resyncs = in_order_through(&mut feed, Some(since + 1), head).await;
    assert_eq!(resyncs, Vec::<i64>::new(), "the read held every change it was asked for");
    pruner.await.unwrap();
}

/// A hub of its own whose listener is not running yet stands for a LISTEN
/// connection that was away while retention pruned the log: a live feed
/// opens, ten changes commit, the first `prune` of them are pruned, then the
/// listener starts. Returns the head before the changes, the horizon, the
/// feed's resyncs until it has handed out the last change, and where the
/// hub stands then. Nothing may come before a resync.
async fn listener_back_after_pruning(prune: i64) -> (i64, i64, Vec<i64>, i64) {
    use ordercast::changes::feed::Feed;
    let app = spawn_app().await;
    let db = app.sql().await;
    let pool = &app.state.pool;
    let head = ordercast::changes::log_bounds(&db).await.unwrap().0;
    let hub = ordercast::hub::Hub::start(head, 100);
    let mut feed = Feed::open(&hub, pool, ordercast::domain::Filter::default(), None, None).await.unwrap();
    for i in 0..10 {
        dba_insert(&db, &format!("gap {i}")).await;
    }
    db.query_one("SELECT change_prune($1)", &[&(head + prune)]).await.unwrap();
    let pruned = horizon(&db).await;
    let listener = tokio::spawn(ordercast::changes::listener::run(
        app.db_url.clone(),
        hub.clone(),
        std::sync::Arc::new(ordercast::changes::listener::ListenerState::default()),
    ));
    let resyncs = in_order_through(&mut feed, None, head + 10).await;
    let position = hub.position();
    listener.abort();
    (head, pruned, resyncs, position)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_pruned_while_the_listener_was_behind_reach_live_clients_as_a_resync() {
    let (head, pruned, resyncs, _) = listener_back_after_pruning(5).await;
    assert_eq!(pruned, head + 5);
    assert!(resyncs.iter().all(|&p| p >= pruned), "resyncs at {resyncs:?}, pruned through {pruned}");
}

/// The same with every change pruned: the log is empty when the listener
/// comes back, so no read carries the horizon. Live clients are told at
/// once, not at the next commit (none follows here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_all_pruned_while_the_listener_was_behind_reach_live_clients_as_a_resync() {
    let (head, pruned, resyncs, position) = listener_back_after_pruning(10).await;
    assert_eq!(pruned, head + 10);
    assert_eq!(resyncs, [pruned]);
    assert_eq!(position, pruned, "the live stream goes on after the pruned changes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_with_immediate_constraints_gets_positions_of_its_own() {
    let app = spawn_app().await;
    let db = app.sql().await;
    let head = ordercast::changes::log_bounds(&db).await.unwrap().0;
    let mut ws = app.ws("").await;
    // The sequencer then runs at the first statement's end, not at commit;
    // the statements after it must still get positions no one else gets.
    db.batch_execute(
        "BEGIN;
         SET CONSTRAINTS ALL IMMEDIATE;
         INSERT INTO orders (customer_name, product, quantity, unit_price) VALUES ('imm 1', 'Bolt', 1, 2);
         INSERT INTO orders (customer_name, product, quantity, unit_price) VALUES ('imm 2', 'Bolt', 1, 2), ('imm 3', 'Bolt', 1, 2);
         COMMIT",
    )
    .await
    .unwrap();
    dba_insert(&db, "imm 4").await;
    let pool = &app.state.pool;
    let client = pool.get().await.unwrap();
    let changes = ordercast::changes::read_after(&client, head, 100).await.unwrap().changes;
    let positions: Vec<i64> = changes.iter().map(|c| c.pos).collect();
    assert_eq!(positions, (head + 1..=head + 4).collect::<Vec<_>>());
    let customers: Vec<Option<&str>> = changes.iter().map(|c| c.customer.as_deref()).collect();
    assert_eq!(customers, [Some("imm 1"), Some("imm 2"), Some("imm 3"), Some("imm 4")]);
    // And live clients get each of them once, in order.
    let got: Vec<i64> = ws.changes(4, WAIT).await.iter().map(seq).collect();
    assert_eq!(got, (head + 1..=head + 4).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_far_behind_that_pings_constantly_still_catches_up_without_rereading_the_log() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let app = spawn_app().await;
    let db = app.sql().await;
    let since = ordercast::changes::log_bounds(&db).await.unwrap().0;
    db.execute(
        "INSERT INTO orders (customer_name, product, quantity, unit_price) \
         SELECT 'behind ' || g, 'Nut', 1, 1 FROM generate_series(1, 3000) g",
        &[],
    )
    .await
    .unwrap();
    app.settled().await;
    // From now on every read of the log is counted and takes a while, so a
    // client frame always arrives while one is in flight.
    db.batch_execute(
        "CREATE SEQUENCE change_reads;
         ALTER FUNCTION change_read(bigint, integer) RENAME TO change_read_counted;
         CREATE FUNCTION change_read(after bigint, lim integer)
         RETURNS TABLE (pos bigint, op text, order_id bigint, status text, old_status text,
                        customer text, old_customer text, after_row text, before_row text, actor text,
                        at timestamptz)
         LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM nextval('change_reads');
             PERFORM pg_sleep(0.05);
             RETURN QUERY SELECT * FROM change_read_counted(after, lim);
         END
         $$;",
    )
    .await
    .unwrap();
    let ws = app.ws(&format!("?since={since}")).await;
    let (mut tx, mut rx) = ws.ws.split();
    let pinger = tokio::spawn(async move {
        loop {
            if tx.send(Message::Text(r#"{"type":"ping"}"#.into())).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    let mut changes = 0;
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while changes < 3000 {
            match rx.next().await {
                Some(Ok(Message::Text(t))) if t.contains(r#""type":"change""#) => changes += 1,
                Some(Ok(_)) => {}
                _ => return,
            }
        }
    })
    .await;
    pinger.abort();
    let reads: i64 = db.query_one("SELECT last_value FROM change_reads", &[]).await.unwrap().get(0);
    assert_eq!(changes, 3000, "the client caught up ({reads} log reads meanwhile)");
    // Three batches of 1000 and the listener's idle ticks, not a read per ping.
    assert!(reads < 100, "{reads} log reads");
}

/// A `resync` that says the client's position is unknown to the log.
fn assert_position_unknown(v: &Value) {
    assert_eq!((v["type"].as_str(), v["reason"].as_str()), (Some("resync"), Some("position_unknown")), "{v}");
}

/// Ends the listener's connection (it reconnects, as after a failover).
/// Puts `condition` in front of every log read: `change_read` becomes the
/// original (kept as `change_read_at_once`) filtered by it, with `after` and
/// `lim` in scope, so that a test can slow, count or fail reads. Volatile:
/// the condition may call `nextval`.
async fn wrap_change_read(db: &tokio_postgres::Client, condition: &str) {
    db.batch_execute(&format!(
        "ALTER FUNCTION change_read(bigint, integer) RENAME TO change_read_at_once;
         CREATE FUNCTION change_read(after bigint, lim integer)
         RETURNS TABLE (pos bigint, op text, order_id bigint, status text, old_status text,
                        customer text, old_customer text, after_row text, before_row text, actor text,
                        at timestamptz)
         LANGUAGE sql VOLATILE AS $$
             SELECT * FROM change_read_at_once(after, lim) WHERE {condition}
         $$"
    ))
    .await
    .unwrap();
}

/// A filtered SSE stream that a server stopping ends has its position as
/// the `shutdown` event's `id:` (as `position` events have), so EventSource
/// resumes from there. Before, the event had no id, and the client resumed
/// from its last matching change, to scan again what it was past.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_sse_stream_ended_by_a_shutdown_resumes_from_its_position() {
    let app = spawn_app().await;
    let mut sse = app.sse("/api/events?status=cancelled", None).await;
    assert_eq!(sse.next_any_event(WAIT).await.event, "ready");
    let db = app.sql().await;
    dba_insert(&db, "not cancelled").await;
    app.settled().await;
    let head: i64 = db.query_one("SELECT change_head()", &[]).await.unwrap().get(0);
    let _ = app.state.shutdown.send(true);
    let shutdown = loop {
        let e = sse.next_any_event(WAIT).await;
        if e.event == "shutdown" {
            break e;
        }
    };
    assert_eq!((shutdown.id, &shutdown.data["seq"]), (Some(head.to_string()), &json!(head)));
}

/// The backend of the listener's session.
async fn listener_pid(db: &tokio_postgres::Client) -> i32 {
    let pid = "SELECT pid FROM pg_stat_activity WHERE application_name = 'ordercast-listener' AND datname = current_database()";
    eventually(WAIT, || async move { db.query_opt(pid, &[]).await.unwrap().map(|r| r.get::<_, i32>(0)) }).await
}

/// A database whose defaults cut slow statements short and end idle
/// sessions (common tuning) neither stalls the listener nor ends its
/// session while it waits, nor stalls a client catching up; the relay's and
/// processor's connection ignores them too. Before, a read of the change log
/// slower than the statement timeout failed again at every try: no change
/// reached any client, and a client catching up stalled. And an idle
/// listener was cut off every second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_timeouts_neither_stall_nor_end_the_held_sessions() {
    let app = spawn_app().await;
    let db = app.sql().await;
    db.batch_execute(&format!(
        "ALTER DATABASE \"{0}\" SET statement_timeout = '300ms'; \
         ALTER DATABASE \"{0}\" SET idle_session_timeout = '1s'",
        app.db_name
    ))
    .await
    .unwrap();
    // Each change read takes a fifth of a second: a read of two is cut short.
    wrap_change_read(&db, "pg_sleep(0.2) IS NOT NULL").await;
    let before = listener_pid(&db).await;
    db.batch_execute(KILL_LISTENER).await.unwrap();
    let pid = eventually(WAIT, || async { Some(listener_pid(&db).await).filter(|p| *p != before) }).await;
    let mut ws = app.ws("").await;
    let start = ws.ready().await["seq"].as_i64().unwrap();
    dba_insert_many(&db, "read slowly", 3).await;
    let names = |changes: Vec<Value>| changes.iter().map(|c| c["order"]["customer_name"].clone()).collect::<Vec<_>>();
    let want = ["read slowly 1", "read slowly 2", "read slowly 3"];
    assert_eq!(names(ws.changes(3, WAIT).await), want);
    // The streams' pool connects again, with the database's defaults.
    db.batch_execute(END_POOLED_SESSIONS).await.unwrap();
    let mut resumed = app.ws(&format!("?since={start}")).await;
    assert_eq!(names(resumed.changes(3, WAIT).await), want);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(listener_pid(&db).await, pid, "the listener's session was ended while it waited");
    let held = ordercast::workflow::Dedicated::open(&app.db_url, "test").await.unwrap();
    for setting in ["statement_timeout", "idle_session_timeout"] {
        let value: String = held.client.query_one(&format!("SHOW {setting}"), &[]).await.unwrap().get(0);
        assert_eq!(value, "0", "{setting} on the relay's and processor's connection");
    }
}

/// The stream pool's connections ended by the server (a restart of a
/// pooler, an admin cutting sessions) while they sat in the pool: a client
/// resuming right after is served on another, not refused with 4503
/// `database_unavailable` because the first one taken turned out dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_right_after_the_pools_connections_were_ended_is_served() {
    let app = spawn_app().await;
    let db = app.sql().await;
    let start: i64 = db.query_one("SELECT change_head()", &[]).await.unwrap().get(0);
    dba_insert_many(&db, "resumed", 2).await;
    for attempt in 0..20 {
        // A resume first, so that the pool holds a connection it used.
        let mut warm = app.ws(&format!("?since={start}")).await;
        warm.ready().await;
        drop(warm);
        db.batch_execute(END_POOLED_SESSIONS).await.unwrap();
        let mut resumed = app.ws(&format!("?since={start}")).await;
        match resumed.next_event(WAIT).await {
            WsEvent::Json(v) if v["type"] == "ready" || v["type"] == "change" => {}
            other => panic!("attempt {attempt}: {other:?}"),
        }
    }
}

/// Ends the server's pooled sessions (REST's and the streams'), as a
/// pooler restarting or an admin cutting sessions does.
const END_POOLED_SESSIONS: &str = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
     WHERE application_name = 'ordercast' AND datname = current_database() AND pid <> pg_backend_pid()";

const KILL_LISTENER: &str = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
     WHERE application_name = 'ordercast-listener' AND datname = current_database()";

/// The single-row insert the lost-commit tests write with.
const LOST_INSERT: &str = "INSERT INTO orders (customer_name, product, quantity, unit_price) VALUES ($1, 'Lost', 1, 1)";

/// A live client that has received `lost` changes after `start`, its
/// position (the changes are named lost-1, lost-2, ...).
async fn a_client_with_changes_to_lose(
    app: &crate::helpers::TestApp,
    db: &tokio_postgres::Client,
    lost: usize,
) -> (crate::helpers::WsClient, i64) {
    db.execute(LOST_INSERT, &[&"kept"]).await.unwrap(); // positions start at 1
    app.settled().await;
    let mut ws = app.ws("").await;
    let start = ws.ready().await["seq"].as_i64().unwrap();
    for i in 1..=lost {
        db.execute(LOST_INSERT, &[&format!("lost-{i}")]).await.unwrap();
    }
    assert_eq!(ws.changes(lost, WAIT).await[lost - 1]["seq"], start + lost as i64);
    (ws, start)
}

/// The database forgets every commit after `start` (the next commits take
/// their positions again), then the listener reconnects. Two statements: in
/// one, the listener could be back before the forgetting commits.
async fn lose_after(db: &tokio_postgres::Client, start: i64) {
    db.batch_execute(&forget_after(start, true)).await.unwrap();
    db.batch_execute(KILL_LISTENER).await.unwrap();
}

/// When the change log goes back (the database lost commits that were
/// pushed: a failover to a standby that missed them, a restored backup), the
/// next commits are numbered with positions clients already hold. A live
/// client is told to resync after the head the listener finds, then gets the
/// renumbered changes; without that it would skip them as already seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_log_goes_back_live_clients_resync_and_get_the_renumbered_changes() {
    let app = spawn_app().await;
    let db = app.sql().await;
    let (mut ws, start) = a_client_with_changes_to_lose(&app, &db, 3).await;
    // The database forgets those three commits' positions, and the listener
    // reconnects (as after a failover).
    lose_after(&db, start).await;
    let resync = ws.next_json(Duration::from_secs(20)).await;
    assert_position_unknown(&resync);
    // The log skips the lost positions (and one more, so that the head is
    // past them at once): no commit is numbered with them again.
    assert_eq!(resync["seq"], start + 4);
    db.execute(LOST_INSERT, &[&"next"]).await.unwrap();
    let change = ws.changes(1, Duration::from_secs(10)).await.remove(0);
    assert_eq!((change["seq"].as_i64(), change["order"]["customer_name"].as_str()), (Some(start + 5), Some("next")));
    // A client that reloads now is given a position past the lost ones, and
    // resumes from it without a resync.
    let (_, page) = app.get_json("/api/orders?limit=1").await;
    assert_eq!(page["position"], start + 5, "{page}");
    let mut reloaded = app.ws(&format!("?since={}", start + 5)).await;
    assert_eq!(reloaded.next_json(WAIT).await["type"], "ready");
    // A client resuming after a position the log no longer has is told so too.
    let mut late = app.ws(&format!("?since={}", start + 3)).await;
    let first = late.next_json(Duration::from_secs(10)).await;
    assert_position_unknown(&first);
}

/// The same when more commits than were lost happen before the listener is
/// back (the head is then past its position): the listener finds that the
/// transaction at its position is not the one it published, and live
/// clients resync after the head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_lost_commits_are_outnumbered_before_the_listener_is_back_clients_still_resync() {
    let app = spawn_app().await;
    let db = app.sql().await;
    let (mut ws, start) = a_client_with_changes_to_lose(&app, &db, 2).await;
    // The two commits are lost and the listener is cut off; while it cannot
    // connect, three new commits take positions start+1 ..= start+3.
    let (admin, name) = cut_off_listener(&db).await;
    db.batch_execute(&forget_after(start, true)).await.unwrap();
    for name in ["new-1", "new-2", "new-3"] {
        db.execute(LOST_INSERT, &[&name]).await.unwrap();
    }
    let_in(&admin, &name).await;
    let resync = ws.next_json(Duration::from_secs(20)).await;
    assert_position_unknown(&resync);
    // The lost start+1 and start+2 were numbered again before the listener
    // was back (new-1 and new-2); the live stream goes on after the head.
    assert_eq!(resync["seq"], start + 3);
    // The listener stands at new-3, a commit just past the recorded loss: a
    // reconnect now finds nothing lost.
    let reconnects = || app.state.listener.reconnects.load(std::sync::atomic::Ordering::Relaxed);
    let before = reconnects();
    db.batch_execute(KILL_LISTENER).await.unwrap();
    eventually(Duration::from_secs(20), || async {
        (reconnects() > before && app.state.listener.connected.load(std::sync::atomic::Ordering::Relaxed)).then_some(())
    })
    .await;
    db.execute(LOST_INSERT, &[&"after"]).await.unwrap();
    let change = ws.changes(1, Duration::from_secs(10)).await.remove(0);
    assert_eq!((change["seq"].as_i64(), change["order"]["customer_name"].as_str()), (Some(start + 4), Some("after")));

    // A client that was away holds the lost start+1 and start+2. Resuming
    // after start+2 (below the head now) would hand it start+3 onwards and
    // silently skip new-1 and new-2: it is told to resync, by WebSocket and
    // by SSE alike.
    for since in [start + 1, start + 2] {
        let mut away = app.ws(&format!("?since={since}")).await;
        let first = away.next_json(WAIT).await;
        assert_eq!(
            (first["type"].as_str(), first["reason"].as_str()),
            (Some("resync"), Some("position_unknown")),
            "since={since}: {first}"
        );
        let mut sse = app.sse("/api/events", Some(&since.to_string())).await;
        let ev = sse.next_event(WAIT).await;
        assert_eq!((ev.event.as_str(), ev.data["reason"].as_str()), ("resync", Some("position_unknown")), "{ev:?}");
    }
    // One that stopped at the last position the log kept resumes as usual.
    let mut kept = app.ws(&format!("?since={start}")).await;
    kept.ready().await;
    let names: Vec<String> =
        kept.changes(4, WAIT).await.iter().map(|c| c["order"]["customer_name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, ["new-1", "new-2", "new-3", "after"]);
}

/// A filtered client's position is not its last matching change: while it
/// has everything, the server tells it (`position`, the SSE event of that
/// name whose id moves Last-Event-ID) where it stands in the log, and a
/// shutdown's 1001 carries that position. So a quiet filter resumes after
/// retention has passed its last match without a resync, and without
/// rescanning the changes it skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_filter_learns_its_position_and_resumes_past_retention_without_a_resync() {
    let mut app = spawn_app_with(|s| {
        s.retention_rows = 5;
        s.retention_secs = 0;
    })
    .await;
    let db = app.sql().await;
    let mut ws = app.ws("?customer=Quiet").await;
    ws.ready().await;
    let mut sse = app.sse("/api/events?customer=Quiet", None).await;
    assert_eq!(sse.next_event(WAIT).await.event, "ready");
    dba_insert(&db, "Quiet").await;
    let matched = seq(&ws.changes(1, WAIT).await[0]);
    for i in 0..20 {
        dba_insert(&db, &format!("Noisy {i}")).await;
    }
    let head: i64 = db.query_one("SELECT change_head()", &[]).await.unwrap().get(0);
    app.settled().await;

    // The WebSocket learns it with the next heartbeat (every 10 s; one
    // during the inserts above told a position on the way).
    let position = loop {
        let v = ws.next_json(WAIT).await;
        if v["type"] != "position" || v["seq"].as_i64() >= Some(head) {
            break v;
        }
    };
    assert_eq!(position, json!({"type": "position", "seq": head}), "after the change at {matched}");
    // SSE with the next keep-alive (every 15 s): a `position` event whose id
    // is the position, so EventSource resumes from there.
    let ev = loop {
        let ev = sse.next_event(Duration::from_secs(20)).await;
        let on_the_way = ev.event == "position" && ev.data["seq"].as_i64() < Some(head);
        if ev.event != "change" && !on_the_way {
            break ev;
        }
    };
    assert_eq!((ev.event.as_str(), ev.id.as_deref()), ("position", Some(head.to_string().as_str())), "{ev:?}");
    assert_eq!(ev.data, json!({"type": "position", "seq": head}));

    // Retention passes the last match: resuming from it is a resync, from
    // the position the server gave is not.
    ordercast::changes::maintenance::run_once(&app.state.pool, &app.state.settings).await.unwrap();
    let mut stale = app.ws(&format!("?customer=Quiet&since={matched}")).await;
    assert_eq!(stale.next_json(WAIT).await["reason"], "position_expired");
    let mut resumed = app.ws(&format!("?customer=Quiet&since={head}")).await;
    assert_eq!(resumed.next_json(WAIT).await["type"], "ready");
    let mut resumed_sse = app.sse("/api/events?customer=Quiet", Some(&head.to_string())).await;
    assert_eq!(resumed_sse.next_event(WAIT).await.event, "ready");
    dba_insert(&db, "quiet").await;
    assert_eq!(resumed.changes(1, WAIT).await[0]["order"]["customer_name"], "quiet");
    assert_eq!(resumed_sse.changes(1, WAIT).await[0].data["order"]["customer_name"], "quiet");

    // More skipped changes, then a shutdown: the close says where to resume.
    for i in 0..3 {
        dba_insert(&db, &format!("Noisy again {i}")).await;
    }
    let head: i64 = db.query_one("SELECT change_head()", &[]).await.unwrap().get(0);
    app.settled().await;
    app.stop().await;
    loop {
        match resumed.next_event(WAIT).await {
            WsEvent::Json(v) => assert_eq!(v["type"], "position", "{v}"),
            WsEvent::Closed(Some((1001, reason))) => {
                assert!(reason.ends_with(&format!("since={head}")), "{reason}");
                break;
            }
            other => panic!("expected a 1001 close, got {other:?}"),
        }
    }
}

/// Cuts the listener off: new connections to the app's database are refused
/// and its LISTEN backend is ended. Returns the admin connection that lets
/// them in again (`let_in`).
async fn cut_off_listener(db: &tokio_postgres::Client) -> (tokio_postgres::Client, String) {
    let name: String = db.query_one("SELECT current_database()", &[]).await.unwrap().get(0);
    let (admin, connection) =
        tokio_postgres::connect(&crate::helpers::admin_url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    admin.batch_execute(&format!("ALTER DATABASE \"{name}\" WITH ALLOW_CONNECTIONS false")).await.unwrap();
    db.batch_execute(KILL_LISTENER).await.unwrap();
    (admin, name)
}

/// Commits `kept` (at the returned position, which the listener publishes),
/// cuts the listener off, and commits lost-1, lost-2 and lost-3 meanwhile.
async fn commits_while_the_listener_is_away(
    app: &crate::helpers::TestApp,
    db: &tokio_postgres::Client,
) -> (i64, tokio_postgres::Client, String) {
    db.execute(LOST_INSERT, &[&"kept"]).await.unwrap();
    app.settled().await;
    let start: i64 = db.query_one("SELECT change_head()", &[]).await.unwrap().get(0);
    let (admin, name) = cut_off_listener(db).await;
    for name in ["lost-1", "lost-2", "lost-3"] {
        db.execute(LOST_INSERT, &[&name]).await.unwrap();
    }
    (start, admin, name)
}

/// Waits until the listener is connected again and has moved on from `start`.
async fn listener_back_past(app: &crate::helpers::TestApp, start: i64) {
    eventually(Duration::from_secs(20), || async {
        (app.state.listener.connected.load(std::sync::atomic::Ordering::Relaxed) && app.state.hub.position() > start)
            .then_some(())
    })
    .await;
}

async fn let_in(admin: &tokio_postgres::Client, name: &str) {
    admin.batch_execute(&format!("ALTER DATABASE \"{name}\" WITH ALLOW_CONNECTIONS true")).await.unwrap();
}

/// Commits can be lost without their positions being numbered again (the
/// sequence is ahead of them after recovery): the position the listener
/// published then has no transaction at all, which is a loss, not pruning.
/// Live clients, which hold the lost changes, are told to reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_commits_whose_positions_are_skipped_are_still_recognised() {
    let app = spawn_app().await;
    let db = app.sql().await;
    let (mut ws, start) = a_client_with_changes_to_lose(&app, &db, 2).await;
    let (admin, name) = cut_off_listener(&db).await;
    db.batch_execute(&forget_after(start, false)).await.unwrap();
    db.execute(LOST_INSERT, &[&"new"]).await.unwrap(); // start+3: the head is past the listener again
    let_in(&admin, &name).await;
    let resync = ws.next_json(Duration::from_secs(20)).await;
    assert_position_unknown(&resync);
    let mut away = app.ws(&format!("?since={}", start + 2)).await;
    assert_eq!(away.next_json(WAIT).await["reason"], "position_unknown");
}

/// A position handed out ahead of the listener (a REST page's, read while
/// the listener was away) counts as pushed: when the database loses the
/// commits up to it, a client resuming from it is told to resync, also once
/// the log has grown past it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_position_handed_out_ahead_of_the_listener_is_recognised() {
    let app = spawn_app().await;
    let db = app.sql().await;
    let (start, admin, name) = commits_while_the_listener_is_away(&app, &db).await;
    // The dashboard loads its page (the pool's connections are open).
    let (_, page) = app.get_json("/api/orders?limit=1").await;
    assert_eq!(page["position"], start + 3);
    db.batch_execute(&forget_after(start, true)).await.unwrap();
    db.execute(LOST_INSERT, &[&"new-1"]).await.unwrap();
    let_in(&admin, &name).await;
    listener_back_past(&app, start).await;
    for name in ["new-2", "new-3", "new-4"] {
        db.execute(LOST_INSERT, &[&name]).await.unwrap();
    }
    let mut resumed = app.ws(&format!("?since={}", start + 3)).await;
    let first = resumed.next_json(WAIT).await;
    assert_position_unknown(&first);
}

/// The same when new commits take the lost positions, and one more, before
/// the listener is back: the head is past the position handed out, which
/// is then recognised by the commit it was handed out at. Whichever read
/// handed it out: a catch-up read (a client resuming from before `start`
/// meanwhile runs past the listener's position), a page of orders, the
/// recent changes, the statistics, a stream's snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_position_handed_out_ahead_of_the_listener_is_recognised_after_it_is_reused() {
    for source in ["catch-up", "/api/orders?limit=1", "/api/changes?limit=1", "/api/stats", "snapshot"] {
        let app = spawn_app().await;
        let db = app.sql().await;
        db.execute(LOST_INSERT, &[&"kept-1"]).await.unwrap();
        let (start, admin, name) = commits_while_the_listener_is_away(&app, &db).await;
        let position = match source {
            "catch-up" => {
                let mut early = app.ws(&format!("?since={}", start - 1)).await;
                early.ready().await;
                early.changes(4, WAIT).await[3]["seq"].clone()
            }
            "snapshot" => {
                let mut ws = app.ws("?snapshot=true").await;
                let snapshot = ws.next_json(WAIT).await;
                assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
                snapshot["seq"].clone()
            }
            path => app.get_json(path).await.1["position"].clone(),
        };
        assert_eq!(position, start + 3, "{source}");
        db.batch_execute(&forget_after(start, true)).await.unwrap();
        for name in ["new-1", "new-2", "new-3", "new-4"] {
            db.execute(LOST_INSERT, &[&name]).await.unwrap();
        }
        let_in(&admin, &name).await;
        listener_back_past(&app, start).await;
        let mut resumed = app.ws(&format!("?since={}", start + 3)).await;
        let first = resumed.next_json(WAIT).await;
        assert_eq!(first["reason"], "position_unknown", "handed out by {source}: {first}");
    }
}

/// When the database refuses to record a loss (read-only after a failover,
/// say), live clients are still told to resync at once, and the record is
/// retried until it is made; then resuming from a lost position resyncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loss_the_database_refuses_to_record_still_resyncs_live_clients_and_is_recorded_later() {
    let app = spawn_app().await;
    let db = app.sql().await;
    let (mut ws, start) = a_client_with_changes_to_lose(&app, &db, 3).await;
    db.batch_execute(
        "CREATE TABLE refuse_records (on_ boolean NOT NULL); INSERT INTO refuse_records VALUES (true); \
         CREATE FUNCTION refuse_record() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF (SELECT on_ FROM refuse_records) THEN RAISE EXCEPTION 'cannot execute INSERT in a read-only transaction' \
           USING ERRCODE = '25006'; END IF; RETURN NEW; END $$; \
         CREATE TRIGGER refuse_record BEFORE INSERT ON change_rewinds FOR EACH ROW EXECUTE FUNCTION refuse_record();",
    )
    .await
    .unwrap();
    lose_after(&db, start).await;
    let resync = ws.next_json(Duration::from_secs(20)).await;
    assert_position_unknown(&resync);
    let recorded = || async {
        let n: i64 = db.query_one("SELECT count(*) FROM change_rewinds", &[]).await.unwrap().get(0);
        n
    };
    assert_eq!(recorded().await, 0);
    db.execute("UPDATE refuse_records SET on_ = false", &[]).await.unwrap();
    eventually(Duration::from_secs(20), || async { (recorded().await == 1).then_some(()) }).await;
    let mut away = app.ws(&format!("?since={}", start + 2)).await;
    assert_eq!(away.next_json(WAIT).await["reason"], "position_unknown");
    // And the live stream goes on.
    db.execute(LOST_INSERT, &[&"after"]).await.unwrap();
    assert_eq!(ws.changes(1, WAIT).await[0]["order"]["customer_name"], "after");
}

/// A loss wider than one read of the log (a lost bulk insert of 2,500 rows):
/// the positions skipped after it leave no reader behind: a client resuming
/// from before the loss gets the changes after it, and the live stream goes
/// on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loss_wider_than_one_read_leaves_no_reader_behind() {
    let app = spawn_app().await;
    let db = app.sql().await;
    let (mut ws, start) = a_client_with_changes_to_lose(&app, &db, 1).await;
    db.execute(
        "INSERT INTO orders (customer_name, product, quantity, unit_price) \
         SELECT 'bulk ' || i, 'Lost', 1, 1 FROM generate_series(1, 2500) i",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(seq(ws.changes(2500, WAIT).await.last().unwrap()), start + 2501);
    lose_after(&db, start).await;
    assert_position_unknown(&ws.next_json(Duration::from_secs(20)).await);
    db.execute(LOST_INSERT, &[&"after"]).await.unwrap();
    let live = ws.changes(1, WAIT).await.remove(0);
    assert_eq!(live["order"]["customer_name"], "after");
    assert!(seq(&live) > start + 2501, "{live}");
    resuming_from_gets(&app, start, "after").await;
}

/// The listener can stand at the position just past a recorded loss, which
/// no transaction holds (a quiet log after the loss). When the database
/// then loses the record too, and new commits reach that position before
/// the listener is back, it still recognises the loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loss_right_after_a_recorded_one_is_recognised_in_a_quiet_log() {
    let app = spawn_app().await;
    let db = app.sql().await;
    let (mut ws, start) = a_client_with_changes_to_lose(&app, &db, 3).await;
    lose_after(&db, start).await;
    let first = ws.next_json(Duration::from_secs(20)).await;
    assert_position_unknown(&first);
    let floor = seq(&first);
    assert_eq!(floor, start + 4);
    // The record and the sequence's move are lost in turn; four new commits
    // take the positions up to the floor.
    db.batch_execute(&format!("DELETE FROM change_rewinds; {}", forget_after(start, true))).await.unwrap();
    for name in ["new-1", "new-2", "new-3", "new-4"] {
        db.execute(LOST_INSERT, &[&name]).await.unwrap();
    }
    assert_eq!(db.query_one("SELECT change_head()", &[]).await.unwrap().get::<_, i64>(0), floor);
    db.batch_execute(KILL_LISTENER).await.unwrap();
    assert_position_unknown(&ws.next_json(Duration::from_secs(20)).await);
    let mut resumed = app.ws(&format!("?since={floor}")).await;
    assert_position_unknown(&resumed.next_json(WAIT).await);
}

/// A read of the log visits the transactions of its window, not every one
/// after its position. With a window that holds fewer transactions than the
/// read's limit (multi-row transactions, a gap), the read walked the index
/// to the log's head: a client far behind paid for the whole backlog at
/// every read, and a listener back after retention passed its position
/// could time out on every read, again and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_read_visits_its_window_not_the_backlog() {
    let app = spawn_app().await;
    let db = app.sql().await;
    // Ten transactions of 100 rows (positions 1 to 1,000), then 3,000 of one.
    db.batch_execute(
        "DO $$ BEGIN
           FOR t IN 1..10 LOOP
             INSERT INTO orders (customer_name, product, quantity, unit_price)
             SELECT 'bulk ' || t || '-' || g, 'Read', 1, 1 FROM generate_series(1, 100) g;
             COMMIT;
           END LOOP;
           FOR t IN 1..3000 LOOP
             INSERT INTO orders (customer_name, product, quantity, unit_price) VALUES ('one ' || t, 'Read', 1, 1);
             COMMIT;
           END LOOP;
         END $$",
    )
    .await
    .unwrap();
    // Rows read, and transactions fetched by the read's index scans (the
    // counter also holds this connection's earlier work not yet reported,
    // so the difference; nothing is reported inside a transaction).
    let read = |after: i64| {
        let db = &db;
        async move {
            let counter = "SELECT idx_tup_fetch FROM pg_stat_xact_user_tables WHERE relname = 'change_tx'";
            db.batch_execute("BEGIN").await.unwrap();
            let before: i64 = db.query_one(counter, &[]).await.unwrap().get(0);
            let rows = db.query("SELECT pos FROM change_read($1, 1000)", &[&after]).await.unwrap().len();
            let fetched: i64 = db.query_one(counter, &[]).await.unwrap().get(0);
            db.batch_execute("COMMIT").await.unwrap();
            (rows, fetched - before)
        }
    };
    // The window (0, 1000] holds the ten bulk transactions.
    let (rows, fetched) = read(0).await;
    assert_eq!(rows, 1000);
    assert!(fetched < 100, "a read of 10 transactions fetched {fetched} of them");
    // A window of single-row transactions stops at the limit as before.
    let (rows, fetched) = read(1500).await;
    assert_eq!(rows, 1000);
    assert!(fetched < 1100, "a read of 1,000 transactions fetched {fetched} of them");
}

/// A change log carried into another cluster (a logical dump restored)
/// keeps the old cluster's transaction ids, which this cluster's
/// transactions reach in time: one whose id matched a kept entry added its
/// changes to it, at old positions, and the next commits collided with the
/// log. At start-up the server prunes the log through such entries; this
/// cluster's transactions then pass their ids and are numbered and pushed
/// as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_carried_from_another_cluster_is_pruned_through_its_transactions_at_start() {
    let mut first = spawn_app().await;
    let db = first.sql().await;
    db.execute(LOST_INSERT, &[&"before"]).await.unwrap();
    first.stop().await;
    // As a logical restore leaves it: an entry whose transaction id this
    // cluster reaches `AHEAD` transactions from now (the sequencer numbers
    // it after the head). Transaction ids are the cluster's: the tests
    // running beside this one use them up too (one makes 3,000 commits), and
    // with 300, then 3,000, they had passed the entry's before the server
    // started (CI rehearsals saw it).
    const AHEAD: i64 = 50_000;
    let entry: i64 = db
        .query_one(
            "INSERT INTO change_tx (txid, n) VALUES ((pg_current_xact_id()::text::bigint + $1)::text::xid8, 1) \
             RETURNING txid::text::bigint",
            &[&AHEAD],
        )
        .await
        .unwrap()
        .get(0);
    let end: i64 = db.query_one("SELECT max(end_pos) FROM change_tx", &[]).await.unwrap().get(0);
    let app = crate::helpers::spawn_app_on(&first.db_url, |_| {}).await;
    let pruned: i64 = db.query_one("SELECT pruned_through FROM change_retention", &[]).await.unwrap().get(0);
    assert_eq!(pruned, end);
    let mut ws = app.ws(&format!("?since={end}")).await;
    ws.ready().await;
    // Transaction ids used up to near the entry's, cheaply (a transaction
    // that takes an id and writes nothing).
    db.batch_execute(&format!(
        "DO $$ BEGIN LOOP EXIT WHEN pg_current_xact_id()::text::bigint >= {entry} - 100; COMMIT; END LOOP; END $$"
    ))
    .await
    .unwrap();
    // Past the entry's transaction id, each its own transaction.
    let n = 300;
    db.batch_execute(&format!(
        "DO $$ BEGIN FOR i IN 1..{n} LOOP
           INSERT INTO orders (customer_name, product, quantity, unit_price) VALUES ('after ' || i, 'Moved', 1, 1);
           COMMIT;
         END LOOP; END $$"
    ))
    .await
    .unwrap();
    let seqs: Vec<i64> = ws.changes(n as usize, WAIT).await.iter().map(seq).collect();
    assert_eq!(seqs, (end + 1..end + 1 + n).collect::<Vec<i64>>());
}

/// A change log carried into another cluster by logical replication comes
/// without its position sequence (logical replication does not carry
/// sequences): on the new cluster it starts over at 1. At start-up the
/// server moves it past the log's head. Before, the next commits were
/// numbered at or below the head, where neither the listener nor a client
/// resuming from the head looks: they reached nobody, and nobody was told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_sequence_behind_the_logs_head_is_moved_past_it_at_start() {
    let mut first = spawn_app().await;
    let db = first.sql().await;
    for name in ["one", "two", "three"] {
        db.execute(LOST_INSERT, &[&name]).await.unwrap();
    }
    first.stop().await;
    let head: i64 = db.query_one("SELECT change_head()", &[]).await.unwrap().get(0);
    assert!(head >= 3);
    db.batch_execute("SELECT setval('change_position', 1, false)").await.unwrap();
    let app = crate::helpers::spawn_app_on(&first.db_url, |_| {}).await;
    let mut ws = app.ws(&format!("?since={head}")).await;
    ws.ready().await;
    db.execute(LOST_INSERT, &[&"after the move"]).await.unwrap();
    let got = ws.changes(1, WAIT).await;
    assert_eq!(got[0]["order"]["customer_name"], "after the move");
    assert_eq!(seq(&got[0]), head + 1);
}

/// A writer's session with a table of its own named like the change log (a
/// temporary one, searched first) still has its changes captured in the
/// change log. Before, that table took them, and clients got nothing for
/// the positions taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writers_own_table_named_like_the_change_log_does_not_take_its_changes() {
    let app = spawn_app().await;
    let mut ws = app.ws("").await;
    ws.ready().await;
    let db = app.sql().await;
    db.batch_execute("CREATE TEMP TABLE change_log (LIKE public.change_log INCLUDING ALL)").await.unwrap();
    db.execute(LOST_INSERT, &[&"shadowed"]).await.unwrap();
    let got = ws.changes(1, WAIT).await;
    assert_eq!(got[0]["order"]["customer_name"], "shadowed");
    let kept: i64 = db.query_one("SELECT count(*) FROM pg_temp.change_log", &[]).await.unwrap().get(0);
    assert_eq!(kept, 0);
}

/// `change_read` as migrated, and a copy of it that gives no actor for the
/// changes of `customer`: a change its readers cannot take.
async fn change_read_without_actor_for(db: &tokio_postgres::Client, customer: &str) -> (String, String) {
    let def: String = db
        .query_one("SELECT pg_get_functiondef('change_read(bigint, integer)'::regprocedure)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(def.matches("c.actor,").count(), 1, "{def}");
    let broken = def.replace("c.actor,", &format!("CASE WHEN c.customer = '{customer}' THEN NULL ELSE c.actor END,"));
    (def, broken)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_the_listener_cannot_read_is_read_again_and_nothing_after_it_is_lost() {
    let app = spawn_app().await;
    let db = app.sql().await;
    let mut ws = app.ws("").await;
    ws.ready().await;
    dba_insert(&db, "readable").await;
    assert_eq!(ws.changes(1, WAIT).await[0]["order"]["customer_name"], "readable");
    let (def, broken) = change_read_without_actor_for(&db, "unreadable").await;
    db.batch_execute(&broken).await.unwrap();
    dba_insert(&db, "unreadable").await;
    dba_insert(&db, "behind it").await;
    // The listener says why it cannot go on (not ok once its last read is
    // older than its watchdog allows), and keeps trying.
    eventually(WAIT, || async {
        let (_, h) = app.get_json("/api/health").await;
        let why = h["listener"]["last_error"].as_str().is_some_and(|e| e.contains("reading the change log"));
        (why && h["listener"]["ok"] == false).then_some(())
    })
    .await;
    // A client resuming across it waits, as for a database away.
    let mut resumed = app.ws("?since=1").await;
    resumed.ready().await;
    for client in [&mut ws, &mut resumed] {
        client.expect_silence(Duration::from_millis(500)).await;
    }
    db.batch_execute(&def).await.unwrap();
    dba_insert(&db, "after").await;
    for client in [&mut ws, &mut resumed] {
        let names: Vec<Value> =
            client.changes(3, WAIT).await.iter().map(|c| c["order"]["customer_name"].clone()).collect();
        assert_eq!(names, ["unreadable", "behind it", "after"]);
        client.expect_silence(Duration::from_millis(500)).await;
    }
    eventually(WAIT, || async { (app.get_json("/api/health").await.0 == 200).then_some(()) }).await;
}

/// Six inserts of a 1 MiB product (an image each), then six updates of
/// them (two images each): 18 MiB of changes in two transactions.
async fn megabyte_orders(db: &tokio_postgres::Client) {
    db.batch_execute(
        "INSERT INTO orders (customer_name, product, quantity, unit_price) \
         SELECT 'Bulk', g || repeat('x', 1048576), 1, 1 FROM generate_series(1, 6) g;
         UPDATE orders SET quantity = 2 WHERE customer_name = 'Bulk'",
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_the_log_stop_at_its_byte_budget_and_every_change_still_arrives_in_order() {
    use ordercast::changes::{read_rows, LogRows, READ_BYTES, READ_SQL};
    let app = spawn_app().await;
    let db = app.sql().await;
    let mut ws = app.ws("").await;
    ws.ready().await;
    let head: i64 = db.query_one("SELECT change_head()", &[]).await.unwrap().get(0);
    megabyte_orders(&db).await;
    let reader = ordercast::db::connect(&app.db_url).await.unwrap();
    let read = reader.prepare(READ_SQL).await.unwrap();
    let (mut after, mut sizes) = (head, Vec::new());
    loop {
        let LogRows { rows, cut } = read_rows(&reader, &read, after, 100).await.unwrap();
        let Some(last) = rows.last() else { break };
        let image = |r: &tokio_postgres::Row, i| r.get::<_, Option<&str>>(i).map_or(0, str::len);
        let bytes: Vec<usize> = rows.iter().map(|r| image(r, 7) + image(r, 8)).collect();
        let total: usize = bytes.iter().sum();
        // Cut once the budget is reached, not before, not after.
        assert_eq!(cut, total >= READ_BYTES, "{bytes:?}");
        assert!(total - bytes.last().unwrap() < READ_BYTES, "{bytes:?}");
        sizes.push(rows.len());
        after = last.get(0);
    }
    assert_eq!(sizes, [4, 3, 2, 2, 1], "rows per read");
    assert_eq!(after, head + 12);
    // The listener's reads and a resuming client's are cut the same way.
    let mut resumed = app.ws(&format!("?since={head}")).await;
    for client in [&mut ws, &mut resumed] {
        let changes = client.changes(12, Duration::from_secs(60)).await;
        let seqs: Vec<i64> = changes.iter().map(seq).collect();
        assert_eq!(seqs, (head + 1..=head + 12).collect::<Vec<_>>());
        assert!(changes[6..].iter().all(|c| c["op"] == "update" && c["order"]["quantity"] == 2));
        client.expect_silence(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_retention_shows_in_health_and_metrics_and_recovers() {
    let app = spawn_app_with(|s| {
        s.retention_rows = 5;
        s.retention_secs = 0;
        s.maintenance_secs = 1;
    })
    .await;
    let db = app.sql().await;
    let maintenance = || async { app.get_json("/api/health").await.1["maintenance"].clone() };
    // One transaction each: retention prunes transactions whole.
    for i in 0..20 {
        dba_insert(&db, &format!("kept {i}")).await;
    }
    let m = eventually(WAIT, || async { Some(maintenance().await).filter(|m| m["pruned_rows"] == 15) }).await;
    assert_eq!((&m["ok"], &m["failures"], &m["last_error"]), (&json!(true), &json!(0), &Value::Null), "{m}");
    assert!(m["last_success"].is_string(), "{m}");
    // A change_prune replaced by hand with one that gives no count.
    let def: String =
        db.query_one("SELECT pg_get_functiondef('change_prune(bigint)'::regprocedure)", &[]).await.unwrap().get(0);
    db.batch_execute(
        "CREATE OR REPLACE FUNCTION change_prune(through bigint) RETURNS bigint LANGUAGE sql AS 'SELECT NULL::bigint'",
    )
    .await
    .unwrap();
    for i in 0..20 {
        dba_insert(&db, &format!("more {i}")).await;
    }
    let m = eventually(WAIT, || async { Some(maintenance().await).filter(|m| m["ok"] == false) }).await;
    assert!(m["last_error"].as_str().is_some_and(|e| e.contains("NULL")), "{m}");
    // Reported, not held against the server: streams are still served.
    assert_eq!(app.get_json("/api/health").await.0, 200);
    let metrics = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let failures = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ordercast_maintenance_failures_total "))
        .and_then(|n| n.parse::<u64>().ok());
    assert!(failures.is_some_and(|n| n >= 1), "{metrics}");
    assert!(metrics.contains("ordercast_change_log_pruned_rows_total 15\n"), "{metrics}");
    db.batch_execute(&def).await.unwrap();
    let m = eventually(WAIT, || async { Some(maintenance().await).filter(|m| m["ok"] == true) }).await;
    assert_eq!(m["pruned_rows"], 35, "{m}");
    let head: i64 = db.query_one("SELECT change_head()", &[]).await.unwrap().get(0);
    assert_eq!(horizon(&db).await, head - 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_snapshots_and_recent_changes_end_at_their_byte_budget_and_go_on_after() {
    let app = spawn_app().await;
    let db = app.sql().await;
    dba_insert_many(&db, "small", 3).await;
    megabyte_orders(&db).await;
    // Orders, newest first: six of 1 MiB, then three small ones. A page
    // ends with the order that reaches 4 MiB.
    let mut pages = Vec::new();
    let mut path = "/api/orders?limit=100".to_string();
    loop {
        let (status, page) = app.get_json(&path).await;
        assert_eq!(status, 200, "{page}");
        let ids: Vec<i64> = page["items"].as_array().unwrap().iter().map(|o| o["id"].as_i64().unwrap()).collect();
        pages.push(ids);
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/api/orders?limit=100&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(pages, [vec![9, 8, 7, 6], vec![5, 4, 3, 2, 1]]);
    // A snapshot ends the same way, and says it was cut.
    let mut ws = app.ws("?snapshot=true").await;
    let (mut snapshot, mut last_chunk) = (Vec::new(), None);
    loop {
        let m = ws.next_json(WAIT).await;
        match m["type"].as_str().unwrap() {
            "snapshot" => {
                snapshot.extend(m["orders"].as_array().unwrap().iter().map(|o| o["id"].as_i64().unwrap()));
                last_chunk = Some(m);
            }
            "ready" => break,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(snapshot, [9, 8, 7, 6]);
    let last_chunk = last_chunk.expect("snapshot chunks");
    assert_eq!((&last_chunk["last"], &last_chunk["truncated"]), (&json!(true), &json!(true)), "{last_chunk}");
    // Recent changes, newest first: six updates (2 MiB each), six inserts
    // (1 MiB each), three small inserts.
    let mut pages = Vec::new();
    let mut path = "/api/changes?limit=200".to_string();
    loop {
        let (status, page) = app.get_json(&path).await;
        assert_eq!(status, 200, "{page}");
        pages.push(page["changes"].as_array().unwrap().iter().map(seq).collect::<Vec<_>>());
        match page["next_before"].as_i64() {
            Some(b) => path = format!("/api/changes?limit=200&before={b}"),
            None => break,
        }
    }
    assert_eq!(pages, [vec![15, 14], vec![13, 12], vec![11, 10], vec![9, 8, 7, 6], vec![5, 4, 3, 2, 1]]);
}

/// Snapshot rows read and not yet sent are held up to
/// `ORDERCAST_SNAPSHOT_MEMORY_MIB` in all: past it, a stream asking for a
/// snapshot is refused for now (WebSocket 4503, SSE 503, `server_busy`), one
/// without a snapshot is not, and the memory is free again once the rows
/// are sent. Before, every stream could hold its snapshot (up to 4 MiB) for
/// as long as its client took to read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_not_yet_sent_share_a_bounded_memory() {
    let app = spawn_app_with(|s| s.snapshot_memory_mib = 1).await;
    megabyte_orders(&app.sql().await).await;
    let params = ordercast::routes::StreamParams { snapshot: true, snapshot_limit: 1000, ..Default::default() };
    // A snapshot of about 4 MiB, read and not sent: it holds all of the 1 MiB.
    let held = ordercast::routes::ws::open_stream(&app.state, &params).await.unwrap();
    assert_eq!(held.snapshot.as_ref().map(|p| p.items.len()), Some(4));
    let mut ws = app.ws("?snapshot=true").await;
    match ws.next_event(WAIT).await {
        WsEvent::Closed(Some((code, reason))) => {
            assert_eq!((code, reason.as_str()), (4503, "cannot open the stream: server_busy"))
        }
        other => panic!("{other:?}"),
    }
    let (status, body) = app.get_json("/api/events?snapshot=true").await;
    assert_eq!((status, body["code"].as_str()), (503, Some("server_busy")), "{body}");
    app.ws("").await.ready().await;
    drop(held);
    // Free again: a snapshot is sent, and once it is, the next one too,
    // while the first stream stays open.
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut ws = app.ws("?snapshot=true").await;
        let mut rows = 0;
        loop {
            let m = ws.next_json(WAIT).await;
            match m["type"].as_str().unwrap() {
                "snapshot" => rows += m["orders"].as_array().unwrap().len(),
                "ready" => break,
                other => panic!("unexpected {other}"),
            }
        }
        assert_eq!(rows, 4);
        open.push(ws);
    }
    // An SSE stream's share is free once its snapshot events are handed on.
    let mut sse = app.sse("/api/events?snapshot=true", None).await;
    while sse.next_any_event(WAIT).await.event != "ready" {}
    let r = app.http.get(app.url("/api/events?snapshot=true")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// The row that reaches a snapshot page's 4 MiB is in the page whatever its
/// size, and the page holds its whole weight of the snapshot memory: it
/// takes what it read past the share it took before the read, or, with no
/// room for that, is let go and the stream refused (`server_busy`). Before,
/// such a page held 4 MiB of the memory whatever it weighed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_page_past_its_share_holds_all_it_weighs_or_is_refused() {
    use ordercast::routes::ws::open_stream;
    let app = spawn_app_with(|s| s.snapshot_memory_mib = 8).await;
    app.sql()
        .await
        .batch_execute(
            "INSERT INTO orders (customer_name, product, quantity, unit_price) \
             SELECT 'Bulk', g || repeat('x', 3145728), 1, 1 FROM generate_series(1, 3) g",
        )
        .await
        .unwrap();
    let params = ordercast::routes::StreamParams { snapshot: true, snapshot_limit: 1000, ..Default::default() };
    let whole = 8 * 1024;
    let held = open_stream(&app.state, &params).await.unwrap();
    let page = held.snapshot.as_ref().unwrap();
    assert_eq!(page.items.len(), 2, "cut after the row that reaches 4 MiB");
    let kib = page.items.iter().map(String::len).sum::<usize>() / 1024 + 1;
    assert!(kib > 6 * 1024, "{kib}");
    assert_eq!(app.state.snapshots.available_permits(), whole - kib);
    drop(held);
    assert_eq!(app.state.snapshots.available_permits(), whole);
    // Room for the share taken before the read (4 MiB), not for the page.
    let taken = app.state.snapshots.clone().try_acquire_many_owned(3 * 1024).unwrap();
    match open_stream(&app.state, &params).await {
        Err(ordercast::error::ApiError::Busy(_)) => {}
        Err(other) => panic!("{other:?}"),
        Ok(opened) => panic!("opened with a page of {} rows", opened.snapshot.map_or(0, |p| p.items.len())),
    }
    assert_eq!(app.state.snapshots.available_permits(), whole - 3 * 1024, "the page's share is let go");
    drop(taken);
}

/// A stream the server fails to open for a reason of its own (here a
/// database function gone) is upgraded and closed with 1011 and the error's
/// code, which a browser can read; a 500 to the handshake reached it as
/// 1006 and nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_fails_to_open_for_the_servers_own_reason_is_closed_with_1011() {
    let app = spawn_app().await;
    let db = app.sql().await;
    let mut open = app.ws("").await;
    open.ready().await;
    db.batch_execute("ALTER FUNCTION change_head() RENAME TO change_head_away").await.unwrap();
    let mut ws = app.ws("?snapshot=true").await;
    match ws.next_event(WAIT).await {
        WsEvent::Closed(Some((code, reason))) => {
            assert_eq!((code, reason.as_str()), (1011, "cannot open the stream: internal_error"))
        }
        other => panic!("{other:?}"),
    }
    // The same for a `subscribe` on an open stream (it was 4503, as if the
    // database were away, and not logged).
    open.send_json(json!({"type": "subscribe", "snapshot": true})).await;
    loop {
        match open.next_event(WAIT).await {
            WsEvent::Closed(Some((code, reason))) => {
                assert_eq!((code, reason.as_str()), (1011, "cannot subscribe: internal_error"));
                break;
            }
            WsEvent::Json(m) if m["type"] == "heartbeat" => continue,
            other => panic!("{other:?}"),
        }
    }
    db.batch_execute("ALTER FUNCTION change_head_away() RENAME TO change_head").await.unwrap();
    app.ws("?snapshot=true").await.ready().await;
}
