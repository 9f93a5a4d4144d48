-- The shared reader's step: every merchant's events after the last position it delivered,
-- in stream order. Positions appear as an in-order prefix (see sequence.sql), so reading on
-- from the last one seen never skips one.
--
-- $1 after this position, $2 batch size.
SELECT e.position, e.merchant_id, e.kind, c.external_id, e.occurred_at, e.available,
       e.pending, e.lifetime_earned, e.lifetime_redeemed, e.version, e.details::text AS details
  FROM events e
  LEFT JOIN customers c ON c.merchant_id = e.merchant_id AND c.id = e.customer_id
 WHERE e.position > $1
 ORDER BY e.position
 LIMIT $2
