SELECT a.available, a.pending, a.lifetime_earned, a.lifetime_redeemed, a.purchase_count, a.version
  FROM customers c
  JOIN accounts a ON a.merchant_id = c.merchant_id AND a.customer_id = c.id
 WHERE c.merchant_id = $1
   AND c.external_id = $2
