-- The functions that capture changes and number them named the change log's
-- tables, sequence and functions without their schema, so the writing
-- session's search_path chose them: a table of the session's own named
-- like the change log (a temporary one, which is searched first, or one in
-- a schema of the user's ahead of this one) took the changes, while
-- positions were still taken for them in `change_tx`: clients got empty
-- positions in their place, and no resync. They now name them in the schema
-- they were made in (the migrations'), `@.` below. Qualified names, not a
-- `SET search_path` on the functions: that costs every call a setting saved
-- and restored (3 % of a single-row commit's instructions).
DO $do$
DECLARE
    s text := quote_ident(current_schema());
BEGIN
    EXECUTE replace($f$
CREATE OR REPLACE FUNCTION change_reserve(k integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_offset integer;
    v_end bigint;
BEGIN
    INSERT INTO @.change_tx AS t (txid, n) VALUES (pg_current_xact_id(), k)
    ON CONFLICT (txid) DO UPDATE SET n = t.n + EXCLUDED.n
    RETURNING n - k, end_pos INTO v_offset, v_end;
    IF v_end IS NOT NULL THEN
        PERFORM setval('@.change_position', v_end + k);
        UPDATE @.change_tx SET end_pos = v_end + k, committed_at = clock_timestamp()
         WHERE txid = pg_current_xact_id();
        PERFORM pg_notify('ordercast_changes', (v_end + k)::text);
    END IF;
    RETURN v_offset;
END
$$;

CREATE OR REPLACE FUNCTION change_capture_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    k integer;
    v_offset integer;
BEGIN
    SELECT count(*) INTO k FROM new_rows;
    IF k = 0 THEN RETURN NULL; END IF;
    v_offset := @.change_reserve(k);
    INSERT INTO @.change_log (txid, ord, op, order_id, after_row, before_row, actor, status, customer)
    SELECT pg_current_xact_id(), v_offset + row_number() OVER (ORDER BY n.id),
           'insert', n.id, to_json(n), NULL, @.ordercast_actor(), n.status, n.customer_name
    FROM new_rows n;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION change_capture_update() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    k integer;
    v_offset integer;
BEGIN
    SELECT count(*) INTO k FROM new_rows;
    IF k = 0 THEN RETURN NULL; END IF;
    v_offset := @.change_reserve(k);
    INSERT INTO @.change_log (txid, ord, op, order_id, after_row, before_row, actor,
                              status, old_status, customer, old_customer)
    SELECT pg_current_xact_id(), v_offset + row_number() OVER (ORDER BY n.id),
           'update', n.id, to_json(n), to_json(o), @.ordercast_actor(),
           n.status, o.status, n.customer_name, o.customer_name
    FROM new_rows n JOIN old_rows o ON o.id = n.id;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION change_capture_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    k integer;
    v_offset integer;
BEGIN
    SELECT count(*) INTO k FROM old_rows;
    IF k = 0 THEN RETURN NULL; END IF;
    v_offset := @.change_reserve(k);
    INSERT INTO @.change_log (txid, ord, op, order_id, after_row, before_row, actor,
                              status, old_status, customer, old_customer)
    SELECT pg_current_xact_id(), v_offset + row_number() OVER (ORDER BY o.id),
           'delete', o.id, to_json(o), to_json(o), @.ordercast_actor(),
           o.status, o.status, o.customer_name, o.customer_name
    FROM old_rows o;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION change_sequence() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_n integer;
    v_base bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(1869767779, 1);
    SELECT n INTO v_n FROM @.change_tx WHERE txid = NEW.txid;
    -- Reserve the whole block: positions v_base+1 .. v_base+v_n. Only this
    -- function advances the sequence, and only under the lock.
    v_base := nextval('@.change_position') - 1;
    PERFORM setval('@.change_position', v_base + v_n);
    UPDATE @.change_tx
       SET base_pos = v_base, end_pos = v_base + v_n, committed_at = clock_timestamp()
     WHERE txid = NEW.txid;
    PERFORM pg_notify('ordercast_changes', (v_base + v_n)::text);
    RETURN NULL;
END
$$;
$f$, '@.', s || '.');
END
$do$;
