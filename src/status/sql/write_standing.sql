-- Writes a locked customer's standing after a return or a sweep, with the history rows and
-- events of a change, in one statement. Returns the account with its next expiry.
--
-- $1 merchant_id, $2 customer_id, $3 versions to add (1 for the sweep's change, 0 after a
-- return, which counted its own), $4 status, $5 status_since, $6 regular_since, $7 tier_id,
-- $8 tier_since, $9 tier_below_since, $10 review_at, $11 standing, $12 the status change,
-- $13 the tier change (JSON objects as in points/sql/record_purchase.sql; NULL: none),
-- $14 the downgrade warning (NULL: none; its below_since is kept in tier_warned_for so it is
-- sent once per grace), $15 the instant (the clock's now).
WITH account AS (
    UPDATE accounts
       SET status           = $4,
           status_since     = $5,
           regular_since    = $6,
           tier_id          = $7,
           tier_since       = $8,
           tier_below_since = $9,
           tier_warned_for  = CASE WHEN jsonb_typeof($14::jsonb) = 'object'
                                   THEN ($14::jsonb ->> 'below_since')::timestamptz
                                   ELSE tier_warned_for END,
           review_at        = $10,
           standing         = $11,
           version          = version + $3,
           updated_at       = now()
     WHERE merchant_id = $1 AND customer_id = $2
 RETURNING merchant_id, customer_id, available, pending, lifetime_earned, lifetime_redeemed,
           purchase_count, version, standing
), status_history AS (
    INSERT INTO customer_status_history (merchant_id, customer_id, from_status, to_status,
                                         direction, trigger, reason, at)
    SELECT $1, $2, $12::jsonb ->> 'from', $12::jsonb ->> 'to', $12::jsonb ->> 'direction',
           $12::jsonb ->> 'trigger', $12::jsonb -> 'reason', $15
      FROM account
     WHERE jsonb_typeof($12::jsonb) = 'object'
), tier_history AS (
    INSERT INTO customer_tier_history (merchant_id, customer_id, from_tier, to_tier, change,
                                       trigger, reason, at)
    SELECT $1, $2, $13::jsonb ->> 'from', $13::jsonb ->> 'to', $13::jsonb ->> 'change',
           $13::jsonb ->> 'trigger', $13::jsonb -> 'reason', $15
      FROM account
     WHERE jsonb_typeof($13::jsonb) = 'object'
), changes AS (
    INSERT INTO events (merchant_id, customer_id, kind, occurred_at, available, pending,
                        lifetime_earned, lifetime_redeemed, version, details)
    SELECT $1, $2, e.kind, $15, a.available, a.pending, a.lifetime_earned,
           a.lifetime_redeemed, a.version, e.details
      FROM account a,
           (VALUES ('status_changed', $12::jsonb), ('tier_changed', $13::jsonb),
                   ('tier_downgrade_warning', $14::jsonb)) AS e (kind, details)
     WHERE jsonb_typeof(e.details) = 'object' AND outbox_on()
)
SELECT a.available, a.pending, a.lifetime_earned, a.lifetime_redeemed, a.purchase_count,
       a.version, n.points AS next_expiry_points, n.expires_at AS next_expiry_at, a.standing
  FROM account a
  LEFT JOIN LATERAL next_expiry(a.merchant_id, a.customer_id) n ON true
