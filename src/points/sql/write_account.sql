-- Applies one change to a locked account and returns it with its next expiry.
--
-- $1 merchant_id, $2 customer_id, $3 change of available, $4 change of pending, $5 change of
-- lifetime_earned, $6 change of lifetime_redeemed, $7 versions (one per ledger entry), $8 debit.
--
-- A debit must find the points (the conditional update: no row when it would overdraw) and
-- leaves the debt alone, so the accounts_no_overdraft CHECK holds whatever the caller did.
-- Credits and clawbacks set the debt to what available is below zero. The next expiry reads
-- the lots as this transaction left them (earlier statements are visible to this one).
WITH account AS (
    UPDATE accounts
       SET available         = available + $3,
           pending           = pending + $4,
           debt              = CASE WHEN $8 THEN debt ELSE greatest(0, -(available + $3)) END,
           lifetime_earned   = lifetime_earned + $5,
           lifetime_redeemed = lifetime_redeemed + $6,
           version           = version + $7,
           updated_at        = now()
     WHERE merchant_id = $1
       AND customer_id = $2
       AND (NOT $8 OR available + $3 >= 0)
 RETURNING merchant_id, customer_id, available, pending, lifetime_earned, lifetime_redeemed,
           purchase_count, version, standing
)
SELECT a.available, a.pending, a.lifetime_earned, a.lifetime_redeemed, a.purchase_count,
       a.version, n.points AS next_expiry_points, n.expires_at AS next_expiry_at, a.standing
  FROM account a
  LEFT JOIN LATERAL next_expiry(a.merchant_id, a.customer_id) n ON true
