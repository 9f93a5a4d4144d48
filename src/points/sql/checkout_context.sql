SELECT p.version AS program_version, c.id AS customer_id
  FROM programs p
  LEFT JOIN customers c ON c.merchant_id = p.merchant_id AND c.external_id = $2
 WHERE p.merchant_id = $1
