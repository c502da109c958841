-- The dead-letter publisher claims the rows of a round with a lease instead
-- of row locks held in an open transaction. A produce may wait for the broker
-- for up to message.timeout.ms (30 s by default), again and again while the
-- broker is away: a transaction open that long holds back vacuum in the whole
-- database and runs into a DBA's idle_in_transaction_session_timeout.
-- NULL: not claimed. A new column without a default only changes the catalog.
ALTER TABLE dead_letters ADD COLUMN claimed_until timestamptz;
