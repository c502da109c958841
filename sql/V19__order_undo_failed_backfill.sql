-- Completes V18 (an order another writer marks failed while it is processed
-- has its steps undone):
--
-- 1. Orders failed that way before V18, whose steps are not undone, are
--    noted, as V15 noted the cancellations V14 knew of. The processor fails
--    an order itself only once its steps are undone, so the failed orders
--    with steps left are the ones another writer failed.
-- 2. The delete guard (V16) told the caller of any such order to cancel it
--    first, but `failed -> cancelled` is not allowed: for a failed order, as
--    for a cancelled one, a running order processor undoes its steps.
INSERT INTO order_undo (order_id)
SELECT o.id FROM orders o
 WHERE o.status = 'failed'
   AND EXISTS (SELECT 1 FROM order_steps e
                WHERE e.order_id = o.id AND e.action = 'execute' AND e.outcome IN ('done', 'started')
                  AND NOT EXISTS (SELECT 1 FROM order_steps c
                                   WHERE c.order_id = e.order_id AND c.step = e.step
                                     AND c.action = 'compensate' AND c.outcome IN ('done', 'failed')))
ON CONFLICT DO NOTHING;

CREATE OR REPLACE FUNCTION orders_delete_guard() RETURNS trigger
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
                  HINT = CASE WHEN OLD.status IN ('cancelled', 'failed')
                              THEN 'a running order processor undoes its steps: delete it once that is done'
                              ELSE 'cancel it first: its steps are undone, then it can be deleted' END;
    END IF;
    RETURN OLD;
END
$$;
