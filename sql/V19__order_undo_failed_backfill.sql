-- Completes V18 (an order another writer marks failed while it is processed
-- has its steps undone):
--
-- 1. Whether an order has steps left to undo is one function, for the
--    delete guard, this backfill and the processor's takeover scan: a step
--    executed (done, or called and never answered) with no finished
--    compensation (done, or failed and left to an operator). It is called
--    for a few orders at a time: each deleted row, each order the scan has
--    locked (a free slot's worth every 5 s).
-- 2. Orders failed that way before V18, whose steps are not undone, are
--    noted, as V15 noted the cancellations V14 knew of. The processor fails
--    an order itself only once its steps are undone, so the failed orders
--    with steps left are the ones another writer failed.
-- 3. The delete guard (V16) told the caller of any such order to cancel it
--    first, but `failed -> cancelled` is not allowed: for a failed order, as
--    for a cancelled one, a running order processor undoes its steps.
CREATE FUNCTION order_steps_left(p_order_id bigint) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (
        SELECT 1 FROM order_steps e
         WHERE e.order_id = p_order_id AND e.action = 'execute' AND e.outcome IN ('done', 'started')
           AND NOT EXISTS (SELECT 1 FROM order_steps c
                            WHERE c.order_id = e.order_id AND c.step = e.step
                              AND c.action = 'compensate' AND c.outcome IN ('done', 'failed')))
$$;

INSERT INTO order_undo (order_id)
SELECT id FROM orders WHERE status = 'failed' AND order_steps_left(id)
ON CONFLICT DO NOTHING;

CREATE OR REPLACE FUNCTION orders_delete_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF order_steps_left(OLD.id) THEN
        RAISE EXCEPTION 'order % is %: its steps (payment, stock) are not undone, so it cannot be deleted', OLD.id, OLD.status
            USING ERRCODE = 'OC424',
                  DETAIL = json_build_object('status', OLD.status)::text,
                  HINT = CASE WHEN OLD.status IN ('cancelled', 'failed')
                              THEN 'a running order processor undoes its steps: delete it once that is done'
                              ELSE 'cancel it first: its steps are undone, then it can be deleted' END;
    END IF;
    RETURN OLD;
END
$$;
