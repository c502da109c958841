-- The event-driven workflow's bookkeeping (src/workflow): where the outbox
-- relay stands in the change log, and what the processor did to each order.

-- How far each outbox relay has published the change log: every change at or
-- below `position` has been acknowledged by Kafka. The relay moves it only
-- after the broker acknowledged the whole batch, so a crash re-publishes at
-- most one batch (at least once) and never skips one. One row per relay name
-- (the topic by default); delete the row to make a relay start over from the
-- oldest retained change.
CREATE TABLE outbox_positions (
    name       text PRIMARY KEY,
    position   bigint NOT NULL CHECK (position >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Every step the processor took for an order, and every compensation: one row
-- per (order, step, action), so the row is the idempotency record. A step is
-- recorded as `started` before it is called and `done` or `failed` after; a
-- processor that finds `started` after a crash calls the step again with the
-- same idempotency key (the order id), and one that finds `done` or `failed`
-- does not call it at all. `attempts` counts the calls.
CREATE TABLE order_steps (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id    bigint NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    step        text NOT NULL CHECK (length(step) > 0),
    action      text NOT NULL CHECK (action IN ('execute', 'compensate')),
    outcome     text NOT NULL CHECK (outcome IN ('started', 'done', 'failed')),
    detail      text,
    attempts    integer NOT NULL DEFAULT 1 CHECK (attempts > 0),
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    UNIQUE (order_id, step, action)
);

-- The processor owns an order it works on through a session-level advisory
-- lock (class 'ocpr', the order id folded to 32 bits), held on its dedicated
-- connection. When that session ends — a crash, a kill, a lost network — the
-- lock goes with it, and another processor may resume the order. Two ids that
-- fold to the same key only make one of them wait its turn.
CREATE FUNCTION workflow_lock_key(order_id bigint) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT order_id::bit(32)::integer
$$;
