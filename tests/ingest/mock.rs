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
