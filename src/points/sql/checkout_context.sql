SELECT p.version AS program_version, c.id AS customer_id,
       EXISTS (SELECT 1 FROM gift_rules
                WHERE merchant_id = $1 AND active
                  AND trigger IN ('first_purchase', 'every_nth_purchase', 'tier_up')) AS has_gift_rules,
       -- The customer's standing as this purchase will see it (status::standing::Facts): the
       -- account's version (the record statement writes only if it is still this one), the
       -- stored status and tier, and their purchases within the program's look-back from $3
       -- (the clock's now), the most recent 1000 (status::standing::MAX_FACTS).
       a.version AS account_version, a.status, a.status_since, a.regular_since, a.tier_id,
       a.tier_since, a.tier_below_since, a.tier_warned_for, a.standing,
       f.at AS fact_at, f.spend AS fact_spend, f.points AS fact_points,
       f.counted AS fact_counted, o.older_counted
  FROM programs p
  LEFT JOIN customers c ON c.merchant_id = p.merchant_id AND c.external_id = $2
  LEFT JOIN accounts a ON a.merchant_id = c.merchant_id AND a.customer_id = c.id
  LEFT JOIN LATERAL (
      SELECT array_agg(r.occurred_at) AS at,
             array_agg(r.total_minor - r.returned_minor) AS spend,
             array_agg(r.points_earned - r.points_clawed_back) AS points,
             array_agg(r.returned_minor < r.total_minor) AS counted
        FROM (SELECT occurred_at, total_minor, returned_minor, points_earned, points_clawed_back
                FROM purchases
               WHERE merchant_id = $1 AND customer_id = c.id
                 AND occurred_at > $3::timestamptz - make_interval(days => p.look_back_days)
               ORDER BY occurred_at DESC
               LIMIT 1000) r
  ) f ON c.id IS NOT NULL
  LEFT JOIN LATERAL (
      SELECT count(*) AS older_counted
        FROM (SELECT 1 FROM purchases
               WHERE merchant_id = $1 AND customer_id = c.id
                 AND occurred_at <= $3::timestamptz - make_interval(days => p.look_back_days)
                 AND returned_minor < total_minor
               LIMIT 2) x
  ) o ON c.id IS NOT NULL
 WHERE p.merchant_id = $1
