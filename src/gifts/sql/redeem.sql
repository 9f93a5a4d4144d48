-- Redeems a grant at most once: only an issued grant of this merchant, inside its window
-- [valid_from, valid_until). Concurrent redemptions of one code queue on its row; the first
-- commits, the others re-check `status = 'issued'` and match nothing.
--
-- The redemption's gift_redeemed event (the outbox, `events`) is written by this statement
-- too, with the customer's account as it stands (a gift moves no points). Never the code.
--
-- $1 merchant_id, $2 code, $3 now, $4 redemption_key, $5 redemption_hash, $6 store_id
WITH redeemed AS (
    UPDATE gift_grants
       SET status = 'redeemed', redeemed_at = $3, redemption_key = $4, redemption_hash = $5,
           redeemed_store_id = $6
     WHERE merchant_id = $1 AND code = $2 AND status = 'issued'
       AND valid_from <= $3 AND valid_until > $3
 RETURNING *
), event AS (
    INSERT INTO events (merchant_id, customer_id, kind, available, pending, lifetime_earned,
                        lifetime_redeemed, version, details)
    SELECT r.merchant_id, r.customer_id, 'gift_redeemed', a.available, a.pending,
           a.lifetime_earned, a.lifetime_redeemed, a.version,
           jsonb_build_object('gift_id', r.gift_id, 'grant_id', r.id::text,
                              'redemption_key', r.redemption_key,
                              'store_id', r.redeemed_store_id)
      FROM redeemed r
      LEFT JOIN accounts a ON a.merchant_id = r.merchant_id AND a.customer_id = r.customer_id
     WHERE outbox_on()
)
SELECT r.customer_id, r.code, r.gift_id, f.name AS gift_name, f.kind AS gift_kind, c.external_id,
       r.status, r.source, r.purchase_id, r.valid_from, r.valid_until,
       r.redeemed_at, r.redemption_hash, r.redeemed_store_id, r.created_at
  FROM redeemed r
  JOIN gifts f ON f.merchant_id = r.merchant_id AND f.gift_id = r.gift_id
  JOIN customers c ON c.merchant_id = r.merchant_id AND c.id = r.customer_id
