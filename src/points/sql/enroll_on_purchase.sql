-- $1 merchant_id, $2 external_id. Returns the new customer's id, or no row when another
-- request enrolled the same external id first (the caller then reads it).
WITH customer AS (
    INSERT INTO customers (merchant_id, external_id)
    VALUES ($1, $2)
    ON CONFLICT (merchant_id, external_id) DO NOTHING
 RETURNING id
), account AS (
    INSERT INTO accounts (merchant_id, customer_id)
    SELECT $1, id FROM customer
)
SELECT id FROM customer
