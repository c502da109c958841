-- Deleting an order whose steps still hold effects lost them: `order_steps`
-- goes with the order (ON DELETE CASCADE), so a charged payment or held
-- stock of an order deleted while `processing` or `processed`, or cancelled
-- and not yet undone, was never refunded or released: the processor finds
-- nothing left to undo, and the takeover scan drops the cancellation's note.
--
-- Such a delete is now refused, whatever wrote it (REST, a DBA's DELETE):
-- SQLSTATE OC424, 409 `order_not_settled` from the API. An order with an
-- executed step (done, or called and not answered) that has no finished
-- compensation (done, or failed and left to an operator) is not settled;
-- cancelling it has the processor undo its steps, after which it can go.
-- A shipped or delivered order's steps are final and never undone, so it can
-- be deleted as before, like any order that never reached the processor.
CREATE FUNCTION orders_delete_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM order_steps e
         WHERE e.order_id = OLD.id AND e.action = 'execute' AND e.outcome IN ('done', 'started')
           AND NOT EXISTS (SELECT 1 FROM order_steps c
                            WHERE c.order_id = e.order_id AND c.step = e.step
                              AND c.action = 'compensate' AND c.outcome IN ('done', 'failed'))
    ) THEN
        RAISE EXCEPTION 'order % is %: its steps (payment, stock) are not undone, so it cannot be deleted', OLD.id, OLD.status
            USING ERRCODE = 'OC424',
                  DETAIL = json_build_object('status', OLD.status)::text,
                  HINT = CASE WHEN OLD.status = 'cancelled'
                              THEN 'its steps are being undone: delete it once that is done'
                              ELSE 'cancel it first: its steps are undone, then it can be deleted' END;
    END IF;
    RETURN OLD;
END
$$;

CREATE TRIGGER orders_delete_guard
    BEFORE DELETE ON orders
    FOR EACH ROW
    WHEN (OLD.status NOT IN ('shipped', 'delivered'))
    EXECUTE FUNCTION orders_delete_guard();
