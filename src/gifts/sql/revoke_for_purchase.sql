-- Revokes the still-issued grants a purchase triggered and puts their gifts back in stock
-- (limited stock only). Returns how many were revoked.
--
-- $1 merchant_id, $2 purchase_id, $3 now
WITH revoked AS (
    UPDATE gift_grants
       SET status = 'revoked', revoked_at = $3
     WHERE merchant_id = $1 AND purchase_id = $2 AND status = 'issued'
 RETURNING gift_id
), restocked AS (
    UPDATE gifts g
       SET stock = g.stock + r.n
      FROM (SELECT gift_id, count(*) AS n FROM revoked GROUP BY gift_id) r
     WHERE g.merchant_id = $1 AND g.gift_id = r.gift_id AND g.stock IS NOT NULL
)
SELECT count(*) FROM revoked
