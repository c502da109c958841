-- The Kafka ingest's bookkeeping (src/ingest), two corrections to V4.
--
-- 1. A dead letter is one group's: two consumer groups ingesting the same
-- topic into one database (two deployments sharing it, a blue/green switch to
-- a new group) each reject the same poison message, and each must record it
-- and publish it (a publisher claims only its own group's rows). Keyed
-- without the group, the second group's row hit the first group's and was
-- dropped by the insert's ON CONFLICT DO NOTHING: never recorded, never
-- published.
--
-- 2. A partition's log can start over: a topic deleted and recreated (or a
-- log otherwise reset) hands out offsets from 0 again, below the stored
-- `kafka_offsets.next_offset`. When the ingest finds the partition's log
-- ending below the stored position, that position cannot belong to this log:
-- it starts over on the new log and counts one more `log_generation`
-- (0: the log the partition's first position was stored for). The new log's
-- offsets repeat the old one's, so a dead letter is identified by its
-- generation too; a DLQ consumer sees it in the `dlq-original-log-generation`
-- header.
ALTER TABLE kafka_offsets ADD COLUMN log_generation integer NOT NULL DEFAULT 0 CHECK (log_generation >= 0);

ALTER TABLE dead_letters ADD COLUMN log_generation integer NOT NULL DEFAULT 0;

-- Widening the key: existing rows cannot conflict under it. dead_letters is
-- small (published rows are pruned after ORDERCAST_INGEST_DLQ_RETENTION_SECS),
-- so building the index under the table lock is brief.
ALTER TABLE dead_letters DROP CONSTRAINT dead_letters_kafka_topic_kafka_partition_kafka_offset_key;
ALTER TABLE dead_letters ADD CONSTRAINT dead_letters_message_key
    UNIQUE (group_id, kafka_topic, kafka_partition, kafka_offset, log_generation);
