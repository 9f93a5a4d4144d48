-- Writes one points_expiring event per lot due for a warning: spendable points left, expiring
-- within the program's expiry_warning_days from now (in its lifecycle JSON; 7 when a program
-- stored before the setting existed has none) and not warned about yet for that expiry.
-- The warning's row and its event are written in this one statement. Replicas split the work
-- (SKIP LOCKED on the lots); the primary key of lot_expiry_warnings makes a warning
-- exactly-once even so (ON CONFLICT: a lot another replica warned about writes nothing).
--
-- $1 now, $2 batch size. Returns the warnings written.
WITH due AS (
    SELECT l.merchant_id, l.customer_id, l.id, l.remaining, l.expires_at
      FROM point_lots l
      JOIN programs p ON p.merchant_id = l.merchant_id
     WHERE l.matured AND l.remaining > 0 AND l.expires_at IS NOT NULL
       AND l.expires_at > $1
       AND l.expires_at <= $1 + make_interval(days => coalesce((p.lifecycle ->> 'expiry_warning_days')::int, 7))
       AND NOT EXISTS (SELECT 1 FROM lot_expiry_warnings w
                        WHERE w.merchant_id = l.merchant_id AND w.lot_id = l.id
                          AND w.expires_at = l.expires_at)
     ORDER BY l.expires_at
     LIMIT $2
       FOR UPDATE OF l SKIP LOCKED
), marked AS (
    INSERT INTO lot_expiry_warnings (merchant_id, lot_id, expires_at, warned_at)
    SELECT merchant_id, id, expires_at, $1 FROM due
    ON CONFLICT DO NOTHING
    RETURNING merchant_id, lot_id, expires_at
), event AS (
    INSERT INTO events (merchant_id, customer_id, kind, available, pending, lifetime_earned,
                        lifetime_redeemed, version, details)
    SELECT d.merchant_id, d.customer_id, 'points_expiring', a.available, a.pending,
           a.lifetime_earned, a.lifetime_redeemed, a.version,
           jsonb_build_object('points', d.remaining, 'expires_at', d.expires_at,
                              'lot_id', d.id::text)
      FROM due d
      JOIN marked m ON m.merchant_id = d.merchant_id AND m.lot_id = d.id
                   AND m.expires_at = d.expires_at
      JOIN accounts a ON a.merchant_id = d.merchant_id AND a.customer_id = d.customer_id
     WHERE outbox_on()
)
SELECT count(*) FROM marked
