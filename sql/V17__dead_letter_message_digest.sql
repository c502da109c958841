-- A dead letter was identified by its group, topic, partition, offset and log
-- generation. A partition's generation starts at 0 with its `kafka_offsets`
-- row, and the documented recovery from a recreated topic deletes those rows
-- (docs/kafka.md): the new log's poison message at an offset the old log had
-- dead-lettered then hit the old record's key, the insert's ON CONFLICT DO
-- NOTHING dropped it, and its position moved past it: never recorded, never
-- published, never applied.
--
-- The key now holds a digest of the message too (its key and value, length-
-- prefixed so that no two splits of the same bytes agree). The same message
-- read again (its position deleted on the same log) still finds its record;
-- another message at that offset is recorded beside it. dead_letters is
-- small (published rows are pruned after ORDERCAST_INGEST_DLQ_RETENTION_SECS),
-- so rewriting it and building the index under the table lock is brief.
ALTER TABLE dead_letters ADD COLUMN message_digest bytea GENERATED ALWAYS AS (
    sha256(int4send(COALESCE(length(message_key), -1)) || COALESCE(message_key, '\x'::bytea)
           || COALESCE(payload, '\x'::bytea))
) STORED;

ALTER TABLE dead_letters DROP CONSTRAINT dead_letters_message_key;
ALTER TABLE dead_letters ADD CONSTRAINT dead_letters_message_key
    UNIQUE (group_id, kafka_topic, kafka_partition, kafka_offset, log_generation, message_digest);
