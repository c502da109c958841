-- Orders cancelled while a processor worked on them, until their steps are
-- undone. The processor that owns such an order undoes its steps itself; but
-- when that processor died first, no compensation had begun, the order was
-- no longer in `processing`, and the takeover scan never saw it: its payment
-- stayed charged. The takeover scan now also reads this table (few rows: the
-- processor deletes a row once nothing is left to undo).
--
-- Only `processing -> cancelled` is noted: a `processed` order that is
-- cancelled later keeps its steps, as before (a person decides on a refund).
-- Orders cancelled before this migration are not noted.
CREATE TABLE order_undo (
    order_id     bigint PRIMARY KEY,
    cancelled_at timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION orders_note_undo() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO order_undo (order_id) VALUES (NEW.id) ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;

-- Whatever wrote the cancellation (REST, Kafka, a DBA's UPDATE), in the same
-- transaction. The WHEN test keeps every other update from calling PL/pgSQL.
CREATE TRIGGER orders_cancelled_in_processing
    AFTER UPDATE OF status ON orders
    FOR EACH ROW
    WHEN (OLD.status = 'processing' AND NEW.status = 'cancelled')
    EXECUTE FUNCTION orders_note_undo();
