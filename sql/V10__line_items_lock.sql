-- An order's line item (product, quantity, unit price, and so its amount) is
-- what the processor charges and reserves stock for once it takes the order
-- out of `pending`. Until now any write path could change it afterwards: a
-- REST PATCH, a Kafka order_updated event or a DBA's UPDATE while the payment
-- was being taken, or after the order shipped. The processor had charged one
-- amount and the order then showed another; a compensation (refund, release)
-- after a resume used the new one.
--
-- The line item is now locked once an order has left `pending`: an update
-- that changes it raises SQLSTATE OC423, whatever wrote it. A change made in
-- the same statement that moves the order out of `pending` is still allowed
-- (the rule looks at the status before the update). A DBA who must correct a
-- locked order says so for the transaction:
--     SET LOCAL ordercast.unlock_line_items = 'on';
-- The change is then recorded like any other (version, change log, history).

CREATE OR REPLACE FUNCTION orders_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.version := 1;
        NEW.created_at := COALESCE(NEW.created_at, now());
        NEW.updated_at := NEW.created_at;
        RETURN orders_stamp_status(NEW);
    END IF;

    IF NEW.id <> OLD.id THEN
        RAISE EXCEPTION 'order id cannot change' USING ERRCODE = 'OC400';
    END IF;
    IF NEW.status <> OLD.status AND NOT EXISTS (
        SELECT 1 FROM order_transitions WHERE from_status = OLD.status AND to_status = NEW.status
    ) THEN
        RAISE EXCEPTION 'invalid status transition from % to %', OLD.status, NEW.status
            USING ERRCODE = 'OC409',
                  DETAIL = json_build_object('from', OLD.status, 'to', NEW.status)::text,
                  HINT = 'allowed: ' || COALESCE((SELECT string_agg(to_status, ', ' ORDER BY to_status)
                                                  FROM order_transitions WHERE from_status = OLD.status), 'none (final status)');
    END IF;
    IF OLD.status <> 'pending'
       AND (NEW.product, NEW.quantity, NEW.unit_price) IS DISTINCT FROM (OLD.product, OLD.quantity, OLD.unit_price)
       AND current_setting('ordercast.unlock_line_items', true) IS DISTINCT FROM 'on' THEN
        RAISE EXCEPTION 'order % is %: its product, quantity and unit price can no longer change', OLD.id, OLD.status
            USING ERRCODE = 'OC423',
                  DETAIL = json_build_object('status', OLD.status)::text,
                  HINT = 'only a pending order''s line item can be edited';
    END IF;
    NEW.created_at := OLD.created_at;
    NEW.version := OLD.version + 1;
    NEW.updated_at := now();
    RETURN orders_stamp_status(NEW);
END
$$;
