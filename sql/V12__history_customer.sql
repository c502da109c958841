-- A token confined to one customer (API key `customer=`, JWT `customer` claim)
-- read an order's whole status history, also the entries from before the
-- order was moved to its customer: another customer's statuses, and who made
-- them (`api:<that customer's token>`, `sql:<role>`, `kafka:<topic>`).
--
-- Each history entry now records the customer the order belonged to when the
-- entry was made, and a confined token sees only the entries of its own
-- customer (compared with lower(), as every REST read compares customers).
-- Unconfined tokens still see every entry.
--
-- `customer` is the order's customer_name, copied by the history triggers
-- from the row they record:
--   - a new order: its customer;
--   - a status change: the customer, when the statement left it unchanged
--     (or changed only its case, which is no move: lower() is equal);
--   - NULL for a status change made by the same statement that moved the
--     order to another customer. Before it the order was the old customer's,
--     after it the new one's: the entry (the old status, the actor) belongs
--     to neither alone, so only unconfined tokens see it, as only they get
--     that change in full on the streams (the others get `leave`/`enter`).
-- A move without a status change writes no history entry, as before.
--
-- Entries written before this migration get NULL too, and stay hidden from
-- confined tokens. Nothing recorded tells which customer an order belonged
-- to at the time: a move needs no history entry, and the change log keeps
-- only its retention window. Filling them in from the order's current
-- customer would hand a moved order's earlier entries to the customer it
-- moved to, which is the leak this closes. (The column is added without a
-- default or a backfill, so the migration rewrites nothing and is instant on
-- a large history.) An operator who knows that no order was ever moved
-- between customers may fill them in after the upgrade; bound it by the
-- upgrade time so it cannot touch entries of moves made since:
--     UPDATE order_status_history h SET customer = o.customer_name
--       FROM orders o
--      WHERE o.id = h.order_id AND h.customer IS NULL
--        AND h.changed_at < '<when V12 was applied>';
--
-- Cost on the write path: one more text column per history row; for a status
-- change, one comparison of the two customer names (lower() only runs when
-- they differ).

ALTER TABLE order_status_history ADD COLUMN customer text;

CREATE OR REPLACE FUNCTION orders_history_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO order_status_history (order_id, from_status, to_status, changed_by, customer)
    SELECT n.id, NULL, n.status, ordercast_actor(), n.customer_name FROM new_rows n;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION orders_history_update() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO order_status_history (order_id, from_status, to_status, changed_by, customer)
    SELECT n.id, o.status, n.status, ordercast_actor(),
           CASE WHEN n.customer_name = o.customer_name THEN n.customer_name
                WHEN lower(n.customer_name) = lower(o.customer_name) THEN n.customer_name END
    FROM new_rows n JOIN old_rows o ON o.id = n.id
    WHERE n.status <> o.status;
    RETURN NULL;
END
$$;
