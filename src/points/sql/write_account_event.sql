-- WRITE_ACCOUNT (write_account.sql) with the change's event: the same account update, and
-- the event (the outbox, `events`) inserted in the same statement with the account as the
-- change left it, so a movement's event costs no round trip and exists exactly when the
-- change does.
--
-- $1 merchant_id, $2 customer_id, $3 change of available, $4 change of pending, $5 change of
-- lifetime_earned, $6 change of lifetime_redeemed, $7 versions (one per ledger entry), $8 debit,
-- $9 the event's kind, $10 its details (a JSON object).
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
), event AS (
    INSERT INTO events (merchant_id, customer_id, kind, available, pending, lifetime_earned,
                        lifetime_redeemed, version, details)
    SELECT merchant_id, customer_id, $9, available, pending, lifetime_earned,
           lifetime_redeemed, version, $10::jsonb
      FROM account
     WHERE outbox_on()
)
SELECT a.available, a.pending, a.lifetime_earned, a.lifetime_redeemed, a.purchase_count,
       a.version, n.points AS next_expiry_points, n.expires_at AS next_expiry_at, a.standing
  FROM account a
  LEFT JOIN LATERAL next_expiry(a.merchant_id, a.customer_id) n ON true
