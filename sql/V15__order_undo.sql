-- Cancelled orders whose steps (payment, inventory) may need undoing, until
-- the processor has undone them. The processor that owns an order cancelled
-- in `processing` undoes its steps itself; but when that processor had died,
-- no compensation had begun, the order was no longer in `processing`, and the
-- takeover scan never saw it: its payment stayed charged. Nor did anything
-- refund a `processed` order that was cancelled later. The takeover scan now
-- also reads this table: one row per such cancellation, until a processor
-- has undone its steps (or found nothing left to undo automatically) and
-- deleted it; so few rows while a processor runs.
--
-- The notes also cover what V14's index was for (a cancelled order whose
-- compensation was begun and not finished keeps its note), so those orders
-- are noted here now and the index goes: the scan has one way to find a
-- cancelled order. Orders cancelled before this migration with no
-- compensation begun are not noted.
CREATE TABLE order_undo (
    order_id     bigint PRIMARY KEY,
    cancelled_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO order_undo (order_id)
SELECT DISTINCT s.order_id FROM order_steps s JOIN orders o ON o.id = s.order_id
 WHERE s.action = 'compensate' AND s.outcome = 'started' AND o.status = 'cancelled';

DROP INDEX order_steps_compensating;

CREATE FUNCTION orders_note_undo() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO order_undo (order_id) VALUES (NEW.id) ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;

-- Whatever wrote the cancellation (REST, Kafka, a DBA's UPDATE), in the same
-- transaction. Only orders that can have steps are noted (`pending` ones have
-- none). The WHEN test keeps every other update from calling PL/pgSQL.
CREATE TRIGGER orders_cancelled_with_steps
    AFTER UPDATE OF status ON orders
    FOR EACH ROW
    WHEN (OLD.status IN ('processing', 'processed') AND NEW.status = 'cancelled')
    EXECUTE FUNCTION orders_note_undo();
