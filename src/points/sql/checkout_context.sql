SELECT p.version AS program_version, c.id AS customer_id,
       EXISTS (SELECT 1 FROM gift_rules
                WHERE merchant_id = $1 AND active
                  AND trigger IN ('first_purchase', 'every_nth_purchase')) AS has_gift_rules
  FROM programs p
  LEFT JOIN customers c ON c.merchant_id = p.merchant_id AND c.external_id = $2
 WHERE p.merchant_id = $1
