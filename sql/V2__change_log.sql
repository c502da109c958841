-- The change log: every committed change to `orders`, in commit order.
--
-- Why not just a bigserial? Sequence order is not commit order: T1 takes seq 10,
-- T2 takes seq 11 and commits first; a reader that saw 11 and resumes "after 11"
-- would silently skip 10 when T1 commits. Waiting for the snapshot xmin to pass
-- fixes that but lets one idle `BEGIN` in psql stall every stream.
--
-- Instead, positions are handed out AT COMMIT by a serialised sequencer:
--   * row triggers (per statement, via transition tables) append the changed
--     rows to `change_log` tagged with the writing transaction's id and an
--     ordinal within that transaction;
--   * the first statement of a transaction also inserts one `change_tx` row,
--     whose DEFERRED constraint trigger runs just before commit. It takes an
--     exclusive transaction-level advisory lock, reserves a block of positions
--     from `change_position` and NOTIFYs once (a doorbell carrying the last
--     position, never the row: no 8000-byte limit to hit).
-- The lock is released only after the commit is visible, so positions become
-- visible strictly in increasing order: the set of visible positions is always
-- a prefix. A reader that has seen position P can read `> P` later and never
-- miss anything, and an idle open transaction holds nothing (it has not reached
-- commit), so it delays nobody. A row's position is base_pos + ord.

CREATE SEQUENCE change_position AS bigint MINVALUE 1 START WITH 1;

-- One row per writing transaction.
CREATE TABLE change_tx (
    txid         xid8 PRIMARY KEY,
    n            integer NOT NULL,
    base_pos     bigint,          -- set at commit; NULL only while uncommitted
    end_pos      bigint,          -- base_pos + n: the transaction's last position
    committed_at timestamptz
);

CREATE UNIQUE INDEX change_tx_end_pos_idx ON change_tx (end_pos);
-- Retention by age finds its cut-off position through this.
CREATE INDEX change_tx_committed_at_idx ON change_tx (committed_at);

-- One row per changed order row. `after_row` is the row after the change (for
-- a delete, the row as it was); `before_row` the row before, for updates and
-- deletes.
CREATE TABLE change_log (
    txid     xid8 NOT NULL,
    ord      integer NOT NULL,
    op       text NOT NULL CHECK (op IN ('insert', 'update', 'delete')),
    order_id bigint NOT NULL,
    after_row  jsonb NOT NULL,
    before_row jsonb,
    actor    text NOT NULL,
    at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (txid, ord)
);

-- Retention bookkeeping: everything at or below `pruned_through` is gone, so a
-- client resuming from an older position must resync.
CREATE TABLE change_retention (
    only_row       boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    pruned_through bigint NOT NULL DEFAULT 0
);
INSERT INTO change_retention DEFAULT VALUES;

-- Appends `k` rows for this transaction and returns the ordinal offset to use.
CREATE FUNCTION change_reserve(k integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_offset integer;
BEGIN
    INSERT INTO change_tx (txid, n) VALUES (pg_current_xact_id(), k)
    ON CONFLICT (txid) DO UPDATE SET n = change_tx.n + EXCLUDED.n
    RETURNING n - k INTO v_offset;
    RETURN v_offset;
END
$$;

CREATE FUNCTION change_capture_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    k integer;
    v_offset integer;
BEGIN
    SELECT count(*) INTO k FROM new_rows;
    IF k = 0 THEN RETURN NULL; END IF;
    v_offset := change_reserve(k);
    INSERT INTO change_log (txid, ord, op, order_id, after_row, before_row, actor)
    SELECT pg_current_xact_id(), v_offset + row_number() OVER (ORDER BY n.id),
           'insert', n.id, to_jsonb(n), NULL, ordercast_actor()
    FROM new_rows n;
    RETURN NULL;
END
$$;

CREATE FUNCTION change_capture_update() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    k integer;
    v_offset integer;
BEGIN
    SELECT count(*) INTO k FROM new_rows;
    IF k = 0 THEN RETURN NULL; END IF;
    v_offset := change_reserve(k);
    INSERT INTO change_log (txid, ord, op, order_id, after_row, before_row, actor)
    SELECT pg_current_xact_id(), v_offset + row_number() OVER (ORDER BY n.id),
           'update', n.id, to_jsonb(n), to_jsonb(o), ordercast_actor()
    FROM new_rows n JOIN old_rows o ON o.id = n.id;
    RETURN NULL;
END
$$;

CREATE FUNCTION change_capture_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    k integer;
    v_offset integer;
BEGIN
    SELECT count(*) INTO k FROM old_rows;
    IF k = 0 THEN RETURN NULL; END IF;
    v_offset := change_reserve(k);
    INSERT INTO change_log (txid, ord, op, order_id, after_row, before_row, actor)
    SELECT pg_current_xact_id(), v_offset + row_number() OVER (ORDER BY o.id),
           'delete', o.id, to_jsonb(o), to_jsonb(o), ordercast_actor()
    FROM old_rows o;
    RETURN NULL;
END
$$;

CREATE TRIGGER orders_capture_insert
    AFTER INSERT ON orders REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION change_capture_insert();

CREATE TRIGGER orders_capture_update
    AFTER UPDATE ON orders REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION change_capture_update();

CREATE TRIGGER orders_capture_delete
    AFTER DELETE ON orders REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION change_capture_delete();

-- The sequencer, run once per writing transaction just before it commits.
-- The advisory lock serialises commits of writing transactions from here until
-- the commit is visible (PostgreSQL already serialises commits of notifying
-- transactions the same way, so this adds little). Keys: 0x6F726463 ('ordc'), 1.
CREATE FUNCTION change_sequence() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_n integer;
    v_base bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(1869767779, 1);
    SELECT n INTO v_n FROM change_tx WHERE txid = NEW.txid;
    -- Reserve the whole block: positions v_base+1 .. v_base+v_n. Only this
    -- function advances the sequence, and only under the lock.
    v_base := nextval('change_position') - 1;
    PERFORM setval('change_position', v_base + v_n);
    UPDATE change_tx
       SET base_pos = v_base, end_pos = v_base + v_n, committed_at = clock_timestamp()
     WHERE txid = NEW.txid;
    PERFORM pg_notify('ordercast_changes', (v_base + v_n)::text);
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER change_tx_sequence
    AFTER INSERT ON change_tx
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION change_sequence();

-- The newest committed position visible to the calling snapshot. Because
-- positions become visible as a prefix, rows read in the same snapshot reflect
-- exactly the changes up to this position: this is what makes "snapshot, then
-- changes after it" gapless.
CREATE FUNCTION change_head() RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT COALESCE((SELECT end_pos FROM change_tx WHERE end_pos IS NOT NULL ORDER BY end_pos DESC LIMIT 1),
                    (SELECT pruned_through FROM change_retention))
$$;

-- Reads up to `lim` changes after position `after`, in position order, with the
-- fields the server filters on pulled out of the row images.
CREATE FUNCTION change_read(after bigint, lim integer)
RETURNS TABLE (pos bigint, op text, order_id bigint, status text, old_status text,
               customer text, old_customer text, after_row text, before_row text, actor text,
               at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT t.base_pos + c.ord, c.op, c.order_id,
           c.after_row ->> 'status', c.before_row ->> 'status',
           c.after_row ->> 'customer_name', c.before_row ->> 'customer_name',
           c.after_row::text, c.before_row::text, c.actor, t.committed_at
    FROM (SELECT txid, base_pos, end_pos, committed_at FROM change_tx
          WHERE end_pos > after ORDER BY end_pos LIMIT lim) t
    JOIN change_log c ON c.txid = t.txid AND c.ord > after - t.base_pos
    ORDER BY t.base_pos, c.ord
    LIMIT lim
$$;

-- Drops committed changes at or below `through`; returns how many rows went.
CREATE FUNCTION change_prune(through bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_rows bigint;
BEGIN
    WITH gone AS (
        DELETE FROM change_tx WHERE end_pos IS NOT NULL AND end_pos <= through RETURNING txid
    ), rows AS (
        DELETE FROM change_log c USING gone WHERE c.txid = gone.txid RETURNING 1
    )
    SELECT count(*) INTO v_rows FROM rows;
    UPDATE change_retention SET pruned_through = greatest(pruned_through, through);
    RETURN v_rows;
END
$$;

-- TRUNCATE would bypass the change log and leave every client with rows that no
-- longer exist; DELETE goes through it.
CREATE FUNCTION orders_no_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'TRUNCATE orders is not allowed: use DELETE FROM orders so clients see the deletes'
        USING ERRCODE = 'OC400';
END
$$;

CREATE TRIGGER orders_no_truncate
    BEFORE TRUNCATE ON orders
    FOR EACH STATEMENT EXECUTE FUNCTION orders_no_truncate();
