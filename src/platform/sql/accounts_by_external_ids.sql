SELECT k.merchant_id, k.external_id,
       a.available, a.pending, a.lifetime_earned, a.lifetime_redeemed, a.purchase_count, a.version,
       n.points AS next_expiry_points, n.expires_at AS next_expiry_at, a.standing
  FROM unnest($1::bigint[], $2::text[]) AS k(merchant_id, external_id)
  JOIN customers c ON c.merchant_id = k.merchant_id AND c.external_id = k.external_id
  JOIN accounts a ON a.merchant_id = c.merchant_id AND a.customer_id = c.id
  LEFT JOIN LATERAL next_expiry(a.merchant_id, a.customer_id) n ON true
