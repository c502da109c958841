-- change_read also joins the first transaction that ends at or past the
-- window's end (after + lim). A reader takes a read that ends there as
-- "more may wait" and reads again; before, a gap in positions wider than
-- the window right after a transaction in it (a transaction that failed after
-- the sequencer numbered it) left the next commit out of the read, and a
-- reader that had been woken once for both (the listener) sent it out only
-- at its idle tick, a second later. One more index probe per read; the rows
-- joined stay bounded by about 4 x lim.

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
            AND (base_pos < after + lim
                 OR end_pos = (SELECT min(end_pos) FROM change_tx WHERE end_pos > after)
                 OR end_pos = (SELECT min(end_pos) FROM change_tx WHERE end_pos >= after + lim))
          ORDER BY end_pos LIMIT lim) t
    CROSS JOIN LATERAL (
        SELECT * FROM change_log c
        WHERE c.txid = t.txid AND c.ord > after - t.base_pos
        ORDER BY c.ord LIMIT lim) c
    ORDER BY t.end_pos, c.ord
    LIMIT lim
$$;
