-- Spends points from the customer's spendable lots in one statement: soonest-expiring first,
-- never-expiring last, the oldest lot first on a tie (the order of
-- rules::lots::take_soonest_expiring). Writes ledger entry $4 of kind $5 for $3 points (negative:
-- a debit), takes what each lot gives and records it in lot_movements, so expiry and clawback never count a
-- point twice. Returns the points the lots gave: fewer than -$3 only if the lots hold less than
-- the account says, which the caller refuses (and rolls back).
--
-- The caller holds the account's row lock, which every change of these lots takes first, and
-- this statement's snapshot is taken after it: no other transaction can move these lots now.
--
-- $1 merchant_id, $2 customer_id, $3 points (< 0), $4 seq, $5 kind, $6 reference, $7 occurred_at.
WITH lot AS (
    SELECT id, remaining,
           (sum(remaining) OVER (ORDER BY expires_at NULLS LAST, id))::bigint - remaining
               AS before
      FROM point_lots
     WHERE merchant_id = $1 AND customer_id = $2 AND remaining > 0 AND matured
), take AS (
    SELECT id, before, least(remaining, -$3::bigint - before) AS points FROM lot WHERE before < -$3::bigint
), entry AS (
    INSERT INTO ledger_entries (merchant_id, customer_id, seq, kind, points, reference,
                                occurred_at)
    VALUES ($1, $2, $4, $5, $3, $6, $7)
), taken AS (
    UPDATE point_lots l
       SET remaining = l.remaining - t.points
      FROM take t
     WHERE l.merchant_id = $1 AND l.customer_id = $2 AND l.id = t.id
), moved AS (
    INSERT INTO lot_movements (merchant_id, customer_id, lot_id, entry_seq, points)
    SELECT $1, $2, id, $4, points FROM take ORDER BY before
)
SELECT COALESCE(sum(points), 0)::bigint AS taken FROM take
