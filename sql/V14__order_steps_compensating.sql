-- Compensations begun and not finished (the step was unavailable, or its
-- processor went away mid-way): the processor's takeover scan finds the
-- cancelled orders they belong to through this index, without reading every
-- order's steps. Few rows: a compensation leaves it once done or failed.
CREATE INDEX order_steps_compensating ON order_steps (order_id)
    WHERE action = 'compensate' AND outcome = 'started';
