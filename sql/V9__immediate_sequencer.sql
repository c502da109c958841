-- A writing transaction that runs `SET CONSTRAINTS ALL IMMEDIATE` (or sets
-- the sequencer's trigger immediate) makes the sequencer run at the end of
-- its first statement on `orders` instead of at commit. Its later statements
-- add rows through `change_reserve`'s ON CONFLICT path, which fires no insert
-- trigger, so until now their changes took positions past the transaction's
-- block: the next transaction was given the same positions, and readers saw
-- two different changes under one position.
--
-- The sequencer's advisory lock is held until that transaction ends, so no
-- other transaction can take positions meanwhile: the ones right after the
-- block are still this transaction's. `change_reserve` now extends the block
-- over them (and rings the doorbell again) when the sequencer already ran.
-- Deferred constraints (the default) take the same path as before.
CREATE OR REPLACE FUNCTION change_reserve(k integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_offset integer;
    v_end bigint;
BEGIN
    INSERT INTO change_tx (txid, n) VALUES (pg_current_xact_id(), k)
    ON CONFLICT (txid) DO UPDATE SET n = change_tx.n + EXCLUDED.n
    RETURNING n - k, end_pos INTO v_offset, v_end;
    IF v_end IS NOT NULL THEN
        PERFORM setval('change_position', v_end + k);
        UPDATE change_tx SET end_pos = v_end + k, committed_at = clock_timestamp()
         WHERE txid = pg_current_xact_id();
        PERFORM pg_notify('ordercast_changes', (v_end + k)::text);
    END IF;
    RETURN v_offset;
END
$$;
