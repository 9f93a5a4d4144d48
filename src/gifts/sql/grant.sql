-- Grants a gift in one statement: takes one from a limited stock with a conditional update
-- (never below zero, so never oversold: a concurrent grant waits for the row and re-checks
-- `stock > 0`), leaves an unlimited gift's row alone (no lock: grants of a come-back gift at
-- many tills do not queue behind each other) and inserts the grant. Nothing is written when
-- the gift is missing, inactive or sold out. A taken source key or code fails the statement,
-- stock and all (the caller runs it under a savepoint).
--
-- The grant's gift_issued event (the outbox, `events`) is written by this statement too, with
-- the customer's account as the caller's transaction has it (after a claim's price, after the
-- purchase that fired a rule). Its details never hold the code (a bearer secret).
--
-- $1 merchant_id, $2 customer_id, $3 gift_id, $4 code, $5 source, $6 source_reference,
-- $7 purchase_id, $8 now, $9 delay_hours
WITH gift AS (
    SELECT validity_days, stock IS NULL AS unlimited
      FROM gifts
     WHERE merchant_id = $1 AND gift_id = $3 AND active
), taken AS (
    UPDATE gifts
       SET stock = stock - 1
     WHERE merchant_id = $1 AND gift_id = $3 AND active AND stock > 0
 RETURNING validity_days
), granted AS (
    SELECT validity_days FROM gift WHERE unlimited
    UNION ALL
    SELECT validity_days FROM taken
), inserted AS (
    INSERT INTO gift_grants (merchant_id, customer_id, gift_id, code, source, source_reference,
                             purchase_id, valid_from, valid_until, created_at)
    SELECT $1, $2, $3, $4, $5, $6, $7,
           $8 + make_interval(hours => $9),
           $8 + make_interval(hours => $9) + make_interval(days => granted.validity_days),
           $8
      FROM granted
    RETURNING *
), event AS (
    INSERT INTO events (merchant_id, customer_id, kind, available, pending, lifetime_earned,
                        lifetime_redeemed, version, details)
    SELECT i.merchant_id, i.customer_id, 'gift_issued', a.available, a.pending,
           a.lifetime_earned, a.lifetime_redeemed, a.version,
           jsonb_build_object('gift_id', i.gift_id, 'grant_id', i.id::text,
                              'source', i.source, 'purchase_id', i.purchase_id,
                              'valid_from', i.valid_from, 'valid_until', i.valid_until)
      FROM inserted i
      LEFT JOIN accounts a ON a.merchant_id = i.merchant_id AND a.customer_id = i.customer_id
     WHERE outbox_on()
)
SELECT i.customer_id, i.code, i.gift_id, f.name AS gift_name, f.kind AS gift_kind, c.external_id,
       i.status, i.source, i.purchase_id, i.valid_from, i.valid_until,
       i.redeemed_at, i.redemption_hash, i.redeemed_store_id, i.created_at
  FROM inserted i
  JOIN gifts f ON f.merchant_id = i.merchant_id AND f.gift_id = i.gift_id
  JOIN customers c ON c.merchant_id = i.merchant_id AND c.id = i.customer_id
