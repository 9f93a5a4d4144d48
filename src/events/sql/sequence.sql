-- Numbers the committed events that have no position yet, oldest insertion first, from the
-- event_positions sequence. Run only under the sequencer's advisory lock, in its own
-- transaction, as a statement of its own after the lock was taken (its snapshot then sees
-- every batch committed before the lock was free: see `events::store::sequence`).
--
-- $1 batch size. Returns the positions given (empty: nothing to do).
WITH batch AS (
    SELECT id FROM events
     WHERE position IS NULL
     ORDER BY id
     LIMIT $1
), numbered AS (
    -- nextval per row in id order (the subquery's order; within a batch the order is a
    -- nicety only: the whole batch becomes visible at once).
    SELECT b.id, nextval('event_positions') AS position
      FROM (SELECT id FROM batch ORDER BY id OFFSET 0) b
)
UPDATE events e
   SET position = n.position
  FROM numbered n
 WHERE e.id = n.id AND e.position IS NULL
RETURNING e.position
