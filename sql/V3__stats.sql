-- Running statistics for GET /api/stats without scanning orders.
--
-- Writers append per-statement deltas to `order_stats_delta` (an append-only
-- table, so concurrent writers never contend on a hot counter row). The server
-- folds the deltas into `order_stats` every few seconds with
-- `order_stats_rollup()`; readers sum both, so the figures are always exact.

-- Per (status, product): number of orders, total amount, sum of unit prices.
CREATE TABLE order_stats (
    status    text NOT NULL,
    product   text NOT NULL,
    n         bigint NOT NULL,
    amount    numeric NOT NULL,
    price_sum numeric NOT NULL,
    PRIMARY KEY (status, product)
);

CREATE TABLE order_stats_delta (
    status    text NOT NULL,
    product   text NOT NULL,
    n         bigint NOT NULL,
    amount    numeric NOT NULL,
    price_sum numeric NOT NULL
);

CREATE FUNCTION order_stats_capture() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO order_stats_delta
        SELECT status, product, count(*), sum(amount), sum(unit_price) FROM new_rows GROUP BY status, product;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO order_stats_delta
        SELECT status, product, -count(*), -sum(amount), -sum(unit_price) FROM old_rows GROUP BY status, product;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER orders_stats_insert
    AFTER INSERT ON orders REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION order_stats_capture();

CREATE TRIGGER orders_stats_update
    AFTER UPDATE ON orders REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION order_stats_capture();

CREATE TRIGGER orders_stats_delete
    AFTER DELETE ON orders REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION order_stats_capture();

-- Folds pending deltas into order_stats; safe to run concurrently.
CREATE FUNCTION order_stats_rollup() RETURNS void
LANGUAGE sql AS $$
    WITH d AS (DELETE FROM order_stats_delta RETURNING *)
    INSERT INTO order_stats (status, product, n, amount, price_sum)
    SELECT status, product, sum(n), sum(amount), sum(price_sum) FROM d GROUP BY status, product
    ON CONFLICT (status, product) DO UPDATE
       SET n = order_stats.n + EXCLUDED.n,
           amount = order_stats.amount + EXCLUDED.amount,
           price_sum = order_stats.price_sum + EXCLUDED.price_sum;
    DELETE FROM order_stats WHERE n = 0;
$$;

-- Current totals per (status, product).
CREATE VIEW order_stats_current AS
SELECT status, product, sum(n)::bigint AS n, sum(amount) AS amount, sum(price_sum) AS price_sum
FROM (SELECT status, product, n, amount, price_sum FROM order_stats
      UNION ALL
      SELECT status, product, n, amount, price_sum FROM order_stats_delta) s
GROUP BY status, product
HAVING sum(n) <> 0;
