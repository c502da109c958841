//! The scenarios end to end against the tansu broker, a separate process
//! speaking the Kafka protocol on 127.0.0.1. Skipped (loudly) only when tansu
//! is not installed and CI is unset.

use crate::kafka::{tansu_binary, Tansu};

scenario_tests!(
    tansu_binary().map(Tansu::start);
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

/// A topic deleted and recreated starts its offsets over, below the stored
/// position. The partition's log then ends below that position, so it cannot
/// be the log it was stored for: the new messages are applied, not skipped as
/// redeliveries, the reset is counted, and a poison message at an offset the
/// old log had dead-lettered too is recorded and published under the new log
/// generation.
///
/// ordercast is stopped while the topic is recreated: with a consumer
/// fetching the topic as it is deleted, librdkafka 2.12 crashes against tansu
/// 0.6 (a fetch answer's leader-change tags name the topic by a zero topic id,
/// and librdkafka looks up its NULL name in its metadata cache), whatever the
/// application does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_topics_messages_are_applied_not_skipped_as_redelivered() {
    use crate::kafka::*;
    use rdkafka::message::Message;

    let Some(binary) = tansu_binary() else { return };
    let broker = Tansu::start(binary);
    let n = names(&broker, 1);
    let mut before = spawn_ingest(&broker, &n, |_| {}).await;
    {
        let old = producer(&broker);
        send(&old, &n.topic, Some("poison"), Some(b"old garbage"), &[]).await; // 0
        for i in 0..5 {
            send_event(&old, &n.topic, &created(&format!("old-{i}"))).await; // 1..=5
        }
    }
    wait_count(&before.db_url, "SELECT count(*) FROM orders WHERE external_id LIKE 'old-%'", 5, WAIT).await;
    let published = "SELECT count(*) FROM dead_letters WHERE published_at IS NOT NULL";
    wait_count(&before.db_url, published, 1, WAIT).await;
    let db = before.sql().await;
    assert_eq!(stored(&db, &n).await, [(0, Some(6))]);
    before.stop().await;

    recreate_topic(&broker, &n.topic, 1).await;
    let new = producer(&broker);
    send(&new, &n.topic, Some("poison"), Some(b"new garbage"), &[]).await; // 0
    send_event(&new, &n.topic, &created("new-0")).await; // 1
    send_event(&new, &n.topic, &created("new-1")).await; // 2

    let after = spawn_ingest_on(&before.db_url, &broker, &n).await;
    wait_count(&after.db_url, "SELECT count(*) FROM orders WHERE external_id LIKE 'new-%'", 2, WAIT).await;
    assert_eq!(position_and_generation(&db, &n).await, (Some(3), 1));
    let dead: Vec<(i64, i32, Vec<u8>)> = db
        .query("SELECT kafka_offset, log_generation, payload FROM dead_letters ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(dead, [(0, 0, b"old garbage".to_vec()), (0, 1, b"new garbage".to_vec())]);
    wait_count(&after.db_url, published, 2, WAIT).await;
    let dlq = read_topic(&broker, &n.dlq, 2).await;
    let headers: Vec<[String; 3]> = dlq
        .iter()
        .map(|m| {
            [
                String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
                header(m, "dlq-original-offset").unwrap_or_default(),
                header(m, "dlq-original-log-generation").unwrap_or_default(),
            ]
        })
        .collect();
    assert_eq!(headers, [["old garbage", "0", "0"], ["new garbage", "0", "1"]].map(|r| r.map(String::from)));
    let (status, health) = after.get_json("/api/health").await;
    let k = &health["kafka"];
    assert_eq!(
        (status, k["log_resets"].as_u64(), k["written"].as_u64(), k["redelivered"].as_u64()),
        (200, Some(1), Some(2), Some(0)),
        "{k}"
    );
}
