-- Records one purchase: account, purchase, lines and ledger entry in a single statement, so it
-- is atomic without an explicit transaction and costs one round trip.
--
-- $1 merchant_id, $2 customer_id, $3 purchase_id, $4 store_id, $5 occurred_at, $6 currency,
-- $7 total_minor, $8 request_hash, $9 points, $10..$14 the lines as parallel arrays
-- (line_no, sku, category, quantity, amount_minor).
--
-- Returns the account after the purchase, or no row when the purchase_id is already taken
-- (or the program's currency is no longer the purchase's).
-- Two concurrent first attempts both pass the NOT EXISTS; the second then fails on the
-- purchases primary key (SQLSTATE 23505) and the whole statement, account update included,
-- is rolled back. The unique key, not the check, is what guarantees "earns at most once".
--
-- A merchant's currency can change only while it has no purchase. Until its first purchase
-- commits, a purchase reads the program row FOR KEY SHARE (the lock a foreign key takes) and
-- is only written in the program's current currency: a currency change holds that row FOR
-- UPDATE between its "no purchase yet" check and its commit, so the purchase either waits for
-- it and then sees the new currency (no row is written), or commits first and the change's
-- check sees it. Once a purchase is committed the currency is fixed, and the row is not
-- locked any more (on the hot path, a lock per purchase on one row costs multixacts).
WITH program AS (
    SELECT currency FROM programs
     WHERE merchant_id = $1
       AND NOT EXISTS (SELECT 1 FROM purchases WHERE merchant_id = $1)
       FOR KEY SHARE
), account AS (
    UPDATE accounts
       SET available        = available + $9,
           lifetime_earned  = lifetime_earned + $9,
           purchase_count   = purchase_count + 1,
           last_purchase_at = GREATEST(last_purchase_at, $5),
           version          = version + 1,
           updated_at       = now()
     WHERE merchant_id = $1
       AND customer_id = $2
       AND NOT EXISTS (SELECT 1 FROM purchases WHERE merchant_id = $1 AND purchase_id = $3)
       AND (EXISTS (SELECT 1 FROM program WHERE currency = $6)
            OR EXISTS (SELECT 1 FROM purchases WHERE merchant_id = $1))
 RETURNING available, pending, lifetime_earned, lifetime_redeemed, purchase_count, version
), purchase AS (
    INSERT INTO purchases (merchant_id, purchase_id, customer_id, store_id, occurred_at, currency,
                           total_minor, request_hash, points_earned, available_after,
                           pending_after, lifetime_earned_after, lifetime_redeemed_after,
                           purchase_count_after, version_after)
    SELECT $1, $3, $2, $4, $5, $6, $7, $8, $9, available, pending, lifetime_earned,
           lifetime_redeemed, purchase_count, version
      FROM account
 RETURNING purchase_id
), lines AS (
    INSERT INTO purchase_lines (merchant_id, purchase_id, line_no, sku, category, quantity, amount_minor)
    SELECT $1, purchase.purchase_id, l.line_no, l.sku, l.category, l.quantity, l.amount_minor
      FROM purchase,
           unnest($10::int[], $11::text[], $12::text[], $13::int[], $14::bigint[])
               AS l (line_no, sku, category, quantity, amount_minor)
), entry AS (
    INSERT INTO ledger_entries (merchant_id, customer_id, seq, kind, points, reference, occurred_at)
    SELECT $1, $2, version, 'earn', $9, $3, $5
      FROM account
)
SELECT available, pending, lifetime_earned, lifetime_redeemed, purchase_count, version
  FROM account
