-- Positions are handed out at commit and pushed to clients as soon as the
-- commit is visible. A transaction committed with `synchronous_commit = off`
-- returns (and becomes visible) before its WAL is on disk, so a database crash
-- can forget it after clients saw it: its positions, and the sequence's, go
-- back, and the next commits are numbered with positions clients already
-- hold. A client resuming after such a position would silently skip the
-- changes numbered again.
--
-- So a transaction that takes positions commits durably at least locally:
-- the sequencer raises `synchronous_commit` from `off` to `local` for the rest
-- of the transaction (it is read at commit). Stronger settings (`on`,
-- `remote_write`, `remote_apply`) are left as they are. Transactions that do
-- not change orders (such as the processor's step records) keep `off`.
CREATE OR REPLACE FUNCTION change_sequence() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_n integer;
    v_base bigint;
BEGIN
    IF current_setting('synchronous_commit') = 'off' THEN
        PERFORM set_config('synchronous_commit', 'local', true);
    END IF;
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
