-- Customers with lots due for the sweep, as of $1: pending lots whose pending period is over,
-- and spendable lots past their expiry. At most $2 of each kind, so a pass stays bounded
-- however much work an outage left; each partial index serves one half.
SELECT d.merchant_id, d.customer_id, c.external_id
  FROM ((SELECT merchant_id, customer_id FROM point_lots
          WHERE NOT matured AND available_at <= $1
          LIMIT $2)
        UNION
        (SELECT merchant_id, customer_id FROM point_lots
          WHERE matured AND remaining > 0 AND expires_at IS NOT NULL AND expires_at <= $1
          LIMIT $2)) d
  JOIN customers c ON c.merchant_id = d.merchant_id AND c.id = d.customer_id
