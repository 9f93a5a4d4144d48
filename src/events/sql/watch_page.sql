-- One page of a merchant's events after a cursor, in stream order, with the merchant's
-- retention horizon read in the same snapshot: if the horizon is at or below the cursor,
-- every event after the cursor that is committed and numbered is in the page (the pruner
-- deletes events and moves the horizons in one transaction). One row with NULL event columns
-- when the page is empty (the horizon still comes back).
--
-- $1 merchant_id, $2 after this position (NULL: after the horizon, the oldest retained),
-- $3 the kinds wanted (NULL: all), $4 page size.
WITH h AS (
    SELECT coalesce((SELECT pruned_through FROM event_merchant_horizons
                      WHERE merchant_id = $1), 0)::bigint AS pruned_through
)
SELECT h.pruned_through, e.position, e.kind, e.external_id, e.occurred_at, e.available,
       e.pending, e.lifetime_earned, e.lifetime_redeemed, e.version, e.details
  FROM h
  LEFT JOIN LATERAL (
        SELECT e.position, e.kind, c.external_id, e.occurred_at, e.available, e.pending,
               e.lifetime_earned, e.lifetime_redeemed, e.version, e.details::text AS details
          FROM events e
          LEFT JOIN customers c ON c.merchant_id = e.merchant_id AND c.id = e.customer_id
         WHERE e.merchant_id = $1
           AND e.position > greatest(coalesce($2::bigint, 0), h.pruned_through)
           AND ($3::text[] IS NULL OR e.kind = ANY ($3::text[]))
         ORDER BY e.position
         LIMIT $4
       ) e ON true
 ORDER BY e.position
