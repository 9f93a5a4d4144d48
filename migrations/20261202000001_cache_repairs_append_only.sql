-- Noting a repair must never wait on another transaction. With one row per customer, a note
-- (INSERT ... ON CONFLICT DO UPDATE) waited on the repair pass holding that row, and notes of
-- a hot customer waited on each other, until the pool ran dry while Redis was down. Notes are
-- now appended, one row per failed publication, and never updated: no two of them touch the
-- same row. The repair pass claims rows in id order (the primary key is its index), repairs
-- each customer once per batch and deletes the rows it claimed.
ALTER TABLE cache_repairs DROP CONSTRAINT cache_repairs_pkey;
ALTER TABLE cache_repairs ADD COLUMN id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY;
