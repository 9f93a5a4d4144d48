-- ClaimGreetings: hands out up to $3 greetings that can be offered now (never handed out,
-- lease ended, or retry time reached: `offer_at <= now`), oldest offer first, under a fresh
-- lease of $4 seconds with a new random token. SKIP LOCKED: two workers claiming at once
-- never take the same row; the row lock holds until this statement's transaction commits,
-- and from then on the lease (offer_at in the future) keeps it from being offered again.
--
-- $1 merchant_id, $2 now, $3 limit, $4 lease seconds
WITH picked AS (
    SELECT id
      FROM greetings
     WHERE merchant_id = $1 AND offer_at IS NOT NULL AND offer_at <= $2
     ORDER BY offer_at, id
     LIMIT $3
       FOR UPDATE SKIP LOCKED
), leased AS (
    UPDATE greetings g
       SET status = 'leased',
           lease_token = replace(gen_random_uuid()::text, '-', ''),
           lease_expires_at = $2 + make_interval(secs => $4),
           offer_at = $2 + make_interval(secs => $4),
           next_attempt_at = NULL,
           attempts = g.attempts + 1,
           updated_at = $2
      FROM picked
     WHERE g.merchant_id = $1 AND g.id = picked.id
 RETURNING g.*
)
SELECT l.id, l.greeting_id, l.kind, l.occasion, l.occasion_name, l.local_date, l.attempts,
       l.lease_token, l.lease_expires_at, l.bonus_points,
       c.external_id, c.display_name, c.email, c.phone, c.marketing_consent,
       gg.code AS gift_code
  FROM leased l
  JOIN customers c ON c.merchant_id = l.merchant_id AND c.id = l.customer_id
  LEFT JOIN gift_grants gg
    ON gg.merchant_id = l.merchant_id AND gg.source = 'birthday'
   AND gg.source_reference = l.gift_reference
 ORDER BY l.local_date, l.id
