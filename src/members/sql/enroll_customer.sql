-- Creates the customer or replaces their profile. $1 merchant_id, $2 external_id,
-- $3 display_name, $4 birth_month, $5 birth_day, $6 birth_year, $7 time_zone, $8 email,
-- $9 phone, $10 marketing_consent.
-- `created` relies on xmax being 0 for a freshly inserted row version (and not for a row
-- version written by ON CONFLICT DO UPDATE), the usual upsert idiom.
WITH customer AS (
    INSERT INTO customers (merchant_id, external_id, display_name, birth_month, birth_day,
                           birth_year, time_zone, email, phone, marketing_consent)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
    ON CONFLICT (merchant_id, external_id) DO UPDATE
       SET display_name      = EXCLUDED.display_name,
           birth_month       = EXCLUDED.birth_month,
           birth_day         = EXCLUDED.birth_day,
           birth_year        = EXCLUDED.birth_year,
           time_zone         = EXCLUDED.time_zone,
           email             = EXCLUDED.email,
           phone             = EXCLUDED.phone,
           marketing_consent = EXCLUDED.marketing_consent,
           updated_at        = now()
 RETURNING id, external_id, display_name, birth_month, birth_day, birth_year, time_zone, email,
           phone, marketing_consent, enrolled_at, updated_at, (xmax = 0) AS created
), account AS (
    INSERT INTO accounts (merchant_id, customer_id)
    SELECT $1, id FROM customer WHERE created
)
SELECT * FROM customer
