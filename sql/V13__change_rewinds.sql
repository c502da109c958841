-- Positions that were pushed to clients and then lost by the database (a
-- crash under synchronous_commit = off, a failover to a standby that missed
-- commits, a restored backup): the next commits are numbered with them
-- again. The listener finds this when it reconnects and records the range
-- here: positions in (after_pos, through_pos] may now name other changes
-- than the ones clients received. A client resuming from a position in that
-- range is told to resync (position_unknown) instead of being served the
-- renumbered changes after it, which would silently skip the ones before.
-- `after_pos` is the newest published position the listener found intact
-- (0 when it could not find one); `through_pos` the highest position handed
-- to any client. In the same transaction the listener makes the log skip
-- the range (an empty transaction takes the positions through
-- `through_pos + 1` at least), so no later commit is numbered with a lost
-- position and a client that reloads is given one past the range. Rows go
-- once retention has passed `through_pos` (resuming there is
-- position_expired anyway).
CREATE TABLE change_rewinds (
    after_pos   bigint      NOT NULL,
    through_pos bigint      NOT NULL,
    detected_at timestamptz NOT NULL DEFAULT now(),
    CHECK (after_pos < through_pos)
);
