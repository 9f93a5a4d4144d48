-- Deletes one batch of events past the retention, oldest first, and moves the horizons over
-- them in the same statement. Only a prefix of positions is deleted: the batch stops before
-- the first event that is still young enough, so "at or below the horizon: gone, above it:
-- kept" holds at every commit, for the stream and for each merchant's events. Replicas take
-- turns on the horizon row (SKIP LOCKED: a replica that finds it taken does nothing now).
--
-- $1 delete events that occurred before this instant, $2 batch size, $3 now.
-- Returns the events deleted and the horizon after (no row: another replica is pruning).
WITH h AS (
    SELECT pruned_through FROM event_horizon FOR UPDATE SKIP LOCKED
), batch AS (
    SELECT e.position, e.occurred_at
      FROM events e, h
     WHERE e.position > h.pruned_through
     ORDER BY e.position
     LIMIT $2
), upto AS (
    SELECT coalesce((SELECT min(position) - 1 FROM batch WHERE occurred_at >= $1),
                    (SELECT max(position) FROM batch)) AS position
), deleted AS (
    DELETE FROM events e
     USING h, upto
     WHERE e.position > h.pruned_through AND e.position <= upto.position
    RETURNING e.merchant_id, e.position
), merchants AS (
    INSERT INTO event_merchant_horizons (merchant_id, pruned_through)
    SELECT merchant_id, max(position) FROM deleted GROUP BY merchant_id
    ON CONFLICT (merchant_id) DO UPDATE
       SET pruned_through = greatest(event_merchant_horizons.pruned_through,
                                     excluded.pruned_through)
), moved AS (
    UPDATE event_horizon
       SET pruned_through = upto.position, pruned_at = $3
      FROM h, upto
     WHERE upto.position > h.pruned_through
    RETURNING event_horizon.pruned_through
)
SELECT (SELECT count(*) FROM deleted) AS deleted,
       coalesce((SELECT pruned_through FROM moved), h.pruned_through) AS pruned_through
  FROM h
