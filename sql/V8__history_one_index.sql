-- order_status_history had two B-tree indexes: the identity primary key and
-- (order_id, id), which every read uses (an order's history, in order). The
-- primary key becomes (order_id, id): one index insert per status change
-- instead of two (about 11,500 fewer instructions per ingested order,
-- scripts/callgrind-write-cost). `id` still comes from the identity, so it
-- stays unique and ordered.
ALTER TABLE order_status_history DROP CONSTRAINT order_status_history_pkey;
DROP INDEX order_status_history_order_idx;
ALTER TABLE order_status_history ADD PRIMARY KEY (order_id, id);
