//! The scenarios against rdkafka's mock cluster: a real Kafka-protocol broker
//! inside the test process, listening on 127.0.0.1.

use crate::kafka::Mock;

scenario_tests!(
    Some(Mock::start());
    events_become_rows_and_websocket_pushes,
    duplicate_events_change_nothing,
    poison_messages_are_dead_lettered_while_the_partition_flows,
    a_row_the_database_rejects_is_dead_lettered_alone,
    avro_events_are_applied_like_json,
    a_database_outage_mid_stream_loses_nothing,
    a_killed_process_restarts_without_loss_or_double,
    two_instances_share_partitions_through_rebalances,
);

/// The broker goes away for a while mid-stream: ingest pauses (health says
/// so) and resumes by itself; every event is applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_outage_pauses_ingest_and_loses_nothing() {
    use crate::kafka::*;
    use std::time::Duration;

    let broker = Mock::start();
    let n = names(&broker, 2);
    let app = spawn_ingest(&broker, &n, |_| {}).await;
    let total = 150;
    let stream = {
        let producer = producer(&broker);
        let topic = n.topic.clone();
        tokio::spawn(async move {
            for i in 0..total {
                // Sends wait for the broker's ack, so they pause with it.
                send_event(&producer, &topic, &created(&format!("brk-{i}"))).await;
                send_event(&producer, &topic, &status_changed(&format!("brk-{i}"), "processing")).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    wait_count(&app.db_url, "SELECT least(count(*), 20) FROM orders", 20, WAIT).await;
    broker.broker_down();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let during: i64 = app.sql().await.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get(0);
    assert!(during < total, "the outage happened mid-stream ({during} of {total} already in)");
    broker.broker_up();
    stream.await.unwrap();
    wait_count(&app.db_url, "SELECT count(*) FROM orders WHERE status = 'processing'", total, WAIT).await;
    assert_exactly_once(&app.sql().await, "brk", total, 2).await;
}
