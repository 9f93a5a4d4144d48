SELECT a.available, a.pending, a.lifetime_earned, a.lifetime_redeemed, a.purchase_count, a.version,
       n.points AS next_expiry_points, n.expires_at AS next_expiry_at, a.standing
  FROM customers c
  JOIN accounts a ON a.merchant_id = c.merchant_id AND a.customer_id = c.id
  LEFT JOIN LATERAL next_expiry(a.merchant_id, a.customer_id) n ON true
 WHERE c.merchant_id = $1
   AND c.external_id = $2
