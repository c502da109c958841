-- Positions that were pushed to clients and then lost by the database (a
-- crash under synchronous_commit = off, a failover to a standby that missed
-- commits, a restored backup): the next commits would be numbered with them
-- again. The listener finds this when it reconnects and records the range
-- here: positions in (after_pos, through_pos] may name other changes than
-- the ones clients received. A client resuming from a position in that
-- range is told to resync (position_unknown) instead of being served the
-- changes after it, which would silently skip the ones before.
-- `after_pos` is the newest published position the listener found intact
-- (0 when it could not find one); `through_pos` the highest position handed
-- to any client. In the same transaction, under the sequencer's lock, the
-- listener moves the position sequence past `through_pos + 1`, so no later
-- commit is numbered with a lost position (a gap, as a transaction that
-- failed after taking positions leaves), and `change_head()` below answers
-- at least `through_pos + 1`: a client that reloads is given a position
-- past the range at once, before any new commit. Rows go once retention
-- has passed `through_pos` (resuming there is position_expired anyway).
CREATE TABLE change_rewinds (
    after_pos   bigint      NOT NULL,
    through_pos bigint      NOT NULL,
    detected_at timestamptz NOT NULL DEFAULT now(),
    CHECK (after_pos < through_pos)
);

CREATE OR REPLACE FUNCTION change_head() RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT greatest(
        COALESCE((SELECT end_pos FROM change_tx WHERE end_pos IS NOT NULL ORDER BY end_pos DESC LIMIT 1),
                 (SELECT pruned_through FROM change_retention)),
        (SELECT max(through_pos) + 1 FROM change_rewinds))
$$;
