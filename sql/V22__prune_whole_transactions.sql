-- A transaction's changes are pruned whole or not at all, and the horizon
-- says so. Before, pruning through a position inside a transaction kept that
-- transaction but set the horizon past its first positions: a client resuming
-- from one of them was told to resync though every change it missed was still
-- there, and a listener standing there let every live client go.
--
-- Now the horizon is lowered to the start of a transaction that holds
-- `through` and goes on past it (its positions are (base_pos, end_pos]), and
-- it never goes past the head (the next commit would straddle it).
CREATE OR REPLACE FUNCTION change_prune(through bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_rows bigint;
    v_base bigint;
BEGIN
    through := least(through, change_head());
    SELECT base_pos INTO v_base FROM change_tx
     WHERE end_pos IS NOT NULL AND end_pos > through
     ORDER BY end_pos LIMIT 1;
    IF v_base < through THEN
        through := v_base;
    END IF;
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

-- A horizon set inside a transaction before this migration is lowered to
-- that transaction's start: every one of its changes is still in the log.
UPDATE change_retention r SET pruned_through = t.base_pos
  FROM change_tx t
 WHERE t.end_pos IS NOT NULL AND t.base_pos < r.pruned_through AND t.end_pos > r.pruned_through;
