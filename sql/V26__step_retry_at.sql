-- When a step's call that was unavailable may be made again: set with the
-- step's last error (the processor's `note`), 5 s after the first call,
-- doubling with each call up to 5 minutes. Every processor's scan for
-- orders to take over skips an order with a step not due yet, so the pause
-- holds across instances (before, it was kept in the memory of the one that
-- released the order, and another instance's scan took it at once: ten
-- calls in under a minute failed the order during a short outage).
ALTER TABLE order_steps ADD COLUMN retry_at timestamptz;
