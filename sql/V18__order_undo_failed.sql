-- An order in `processing` that another writer marks `failed` (a REST PATCH,
-- a Kafka status event, a DBA's UPDATE: `processing -> failed` is allowed)
-- kept what its steps had done: the processor saw it leave `processing` and
-- stopped, and nothing refunded its payment or released its stock. A failed
-- order must hold neither, as when the processor fails it itself (it undoes
-- the steps first). Such a failure is now noted like a cancellation
-- (`order_undo`, V15), and the processor undoes the steps. The processor's
-- own failures (actor `processor`) are not noted: their steps are undone
-- before the status is set.
DROP TRIGGER orders_cancelled_with_steps ON orders;

CREATE TRIGGER orders_cancelled_with_steps
    AFTER UPDATE OF status ON orders
    FOR EACH ROW
    WHEN ((OLD.status IN ('processing', 'processed') AND NEW.status = 'cancelled')
          OR (OLD.status = 'processing' AND NEW.status = 'failed'
              AND current_setting('ordercast.actor', true) IS DISTINCT FROM 'processor'))
    EXECUTE FUNCTION orders_note_undo();
