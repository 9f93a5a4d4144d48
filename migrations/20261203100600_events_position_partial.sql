-- Every event is inserted without a position and numbered later by the sequencer, so the
-- unique constraint on `position` gave every insert an index entry for its NULL: one index
-- write (and WAL record) per event that no reader ever looks up. A unique index on the
-- numbered rows only keeps the same guarantee (no position given twice) and the shared
-- readers' order, and costs nothing at insert. The planner uses it for `position > $1`
-- (that predicate implies `position IS NOT NULL`).
CREATE UNIQUE INDEX events_position_idx ON events (position) WHERE position IS NOT NULL;
ALTER TABLE events DROP CONSTRAINT events_position_key;
