-- The rewinds the outbox relay owes after a batch was acknowledged only in
-- part (docs/workflow.md): per partition, the newest position a rewind must
-- cover, as {"partition": position, ...}. Whichever instance publishes next
-- sends them before the batch goes again, so a stop of the process or a
-- move of the relay lock does not drop them. NULL: none owed.
ALTER TABLE outbox_positions ADD COLUMN rewind_due jsonb;
