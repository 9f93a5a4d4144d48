SELECT a.available, a.pending, a.lifetime_earned, a.lifetime_redeemed, a.purchase_count, a.version,
       n.points AS next_expiry_points, n.expires_at AS next_expiry_at
  FROM customers c
  JOIN accounts a ON a.merchant_id = c.merchant_id AND a.customer_id = c.id
  LEFT JOIN LATERAL (
        -- The soonest expiry of available points (the open-lots index, per customer).
        SELECT l.expires_at, sum(l.remaining)::bigint AS points
          FROM point_lots l
         WHERE l.merchant_id = a.merchant_id AND l.customer_id = a.customer_id
           AND l.remaining > 0 AND l.matured AND l.expires_at IS NOT NULL
         GROUP BY l.expires_at
         ORDER BY l.expires_at
         LIMIT 1) n ON true
 WHERE c.merchant_id = $1
   AND c.external_id = $2
