-- The outbox relay's late check still to be done (docs/workflow.md): where
-- each partition of the topic ended when a relay took over, as
-- {"partition": offset, ...}. Whichever instance takes over next does the
-- check from there, so a restart or a move of the relay lock before it was
-- done does not skip it. NULL: none pending.
ALTER TABLE outbox_positions ADD COLUMN late_since jsonb;
