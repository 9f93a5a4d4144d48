-- A locked customer's standing and their purchases within the program's look-back, the most
-- recent 1000 (status::standing::MAX_FACTS): the columns of points::store::StandingRow, as
-- checkout's context reads them. Read in the transaction that holds the account's lock, after
-- the transaction's own changes (a return's).
--
-- $1 merchant_id, $2 customer_id, $3 now (the clock's).
SELECT a.version AS account_version, a.status, a.status_since, a.regular_since, a.tier_id,
       a.tier_since, a.tier_below_since, a.tier_warned_for, a.standing,
       f.at AS fact_at, f.spend AS fact_spend, f.points AS fact_points,
       f.counted AS fact_counted, o.older_counted
  FROM accounts a
  JOIN programs p ON p.merchant_id = a.merchant_id
  LEFT JOIN LATERAL (
      SELECT array_agg(r.occurred_at) AS at,
             array_agg(r.total_minor - r.returned_minor) AS spend,
             array_agg(r.points_earned - r.points_clawed_back) AS points,
             array_agg(r.returned_minor < r.total_minor) AS counted
        FROM (SELECT occurred_at, total_minor, returned_minor, points_earned, points_clawed_back
                FROM purchases
               WHERE merchant_id = $1 AND customer_id = $2
                 AND occurred_at > $3::timestamptz - make_interval(days => p.look_back_days)
               ORDER BY occurred_at DESC
               LIMIT 1000) r
  ) f ON true
  LEFT JOIN LATERAL (
      SELECT count(*) AS older_counted
        FROM (SELECT 1 FROM purchases
               WHERE merchant_id = $1 AND customer_id = $2
                 AND occurred_at <= $3::timestamptz - make_interval(days => p.look_back_days)
                 AND returned_minor < total_minor
               LIMIT 2) x
  ) o ON true
 WHERE a.merchant_id = $1 AND a.customer_id = $2
