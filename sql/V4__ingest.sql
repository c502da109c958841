-- The Kafka ingest's bookkeeping (src/ingest).
--
-- Exactly-once effect: every batch of Kafka messages is applied in ONE
-- transaction together with the consumer's position in `kafka_offsets`, the
-- event ids in `ingested_events` and the rejected messages in `dead_letters`.
-- Either all of it commits or none of it does, so a crash at any point, a
-- redelivery after a rebalance, or Kafka forgetting its committed offsets can
-- neither lose nor double an order. Kafka's own committed offset is only a
-- courtesy that saves re-reading.

-- Where each consumer group is in each partition: the offset of the next
-- message to apply. A redelivered message with a smaller offset has already
-- been applied and is skipped. The ingest locks a partition's row (FOR UPDATE
-- through ON CONFLICT DO UPDATE) for the length of its batch, so two instances
-- briefly owning the same partition during a rebalance apply it one after the
-- other, never both. NULL: the row exists but nothing has been applied yet.
CREATE TABLE kafka_offsets (
    group_id        text NOT NULL,
    kafka_topic     text NOT NULL,
    kafka_partition integer NOT NULL CHECK (kafka_partition >= 0),
    next_offset     bigint CHECK (next_offset >= 0),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, kafka_topic, kafka_partition)
);

-- Every event applied, by the producer's event_id: a producer that sends the
-- same event twice (a retry, a replay) changes nothing the second time. Kept
-- for a configurable window (ORDERCAST_INGEST_DEDUPE_RETENTION_SECS) and
-- pruned by age, which the BRIN index makes cheap without slowing inserts.
-- A dead-lettered event is not recorded here: sending it again retries it.
CREATE TABLE ingested_events (
    event_id        uuid PRIMARY KEY,
    kafka_topic     text NOT NULL,
    kafka_partition integer NOT NULL,
    kafka_offset    bigint NOT NULL,
    occurred_at     timestamptz NOT NULL,
    ingested_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX ingested_events_ingested_at_idx ON ingested_events USING brin (ingested_at);

-- Messages that can never be applied (undecodable bytes, invalid JSON or Avro,
-- failed validation, a forbidden status transition, an unknown order), with
-- the original bytes and the reason. Written in the batch's transaction, so a
-- poison message is recorded exactly once and never blocks its partition.
-- `published_at` makes this table the outbox of the dead-letter topic: rows
-- are produced to it after commit and marked; rows still NULL after a crash
-- are produced again (at least once).
CREATE TABLE dead_letters (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    group_id          text NOT NULL,
    kafka_topic       text NOT NULL,
    kafka_partition   integer NOT NULL,
    kafka_offset      bigint NOT NULL,
    message_key       bytea,
    payload           bytea,
    -- The original headers: [{"key": k, "value": text} | {"key": k, "value_base64": b64} | {"key": k, "value": null}]
    headers           jsonb NOT NULL DEFAULT '[]',
    message_timestamp timestamptz,
    event_id          uuid,
    reason            text NOT NULL,
    detail            text NOT NULL,
    received_at       timestamptz NOT NULL DEFAULT now(),
    published_at      timestamptz,
    UNIQUE (kafka_topic, kafka_partition, kafka_offset)
);

CREATE INDEX dead_letters_unpublished_idx ON dead_letters (id) WHERE published_at IS NULL;
CREATE INDEX dead_letters_reason_idx ON dead_letters (reason, id);
CREATE INDEX dead_letters_received_at_idx ON dead_letters USING brin (received_at);
