-- The sweep's work list: accounts whose standing is due for a look, soonest first.
-- $1 now (the clock's), $2 batch size.
SELECT a.merchant_id, a.customer_id, c.external_id
  FROM accounts a
  JOIN customers c ON c.merchant_id = a.merchant_id AND c.id = a.customer_id
 WHERE a.review_at <= $1
 ORDER BY a.review_at
 LIMIT $2
