-- change_read visits the transactions of its window and the first one that
-- ends at or past its end, and no more. Before, its filter on `base_pos`
-- (not in the index) let the scan stop only once `lim` transactions had
-- matched: a window holding fewer (multi-row transactions, a gap) walked
-- the index to the log's head, so a reader far behind paid for the whole
-- backlog at every read. Transactions never overlap, so the bounded range
-- selects the same ones: every transaction ending inside the window starts
-- inside it, and the first one ending at or past `after + lim` is the last
-- that can start inside it.

CREATE OR REPLACE FUNCTION change_read(after bigint, lim integer)
RETURNS TABLE (pos bigint, op text, order_id bigint, status text, old_status text,
               customer text, old_customer text, after_row text, before_row text, actor text,
               at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT t.base_pos + c.ord, c.op, c.order_id,
           c.status, c.old_status, c.customer, c.old_customer,
           c.after_row::text, c.before_row::text, c.actor, t.committed_at
    FROM (SELECT txid, base_pos, end_pos, committed_at FROM change_tx
          WHERE end_pos > after
            AND end_pos <= COALESCE((SELECT min(end_pos) FROM change_tx WHERE end_pos >= after + lim),
                                    9223372036854775807)
          ORDER BY end_pos LIMIT lim) t
    CROSS JOIN LATERAL (
        SELECT * FROM change_log c
        WHERE c.txid = t.txid AND c.ord > after - t.base_pos
        ORDER BY c.ord LIMIT lim) c
    ORDER BY t.end_pos, c.ord
    LIMIT lim
$$;
