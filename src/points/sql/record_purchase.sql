-- Records one purchase: account, purchase, lines and ledger entry in a single statement, so it
-- is atomic without an explicit transaction and costs one round trip.
--
-- $1 merchant_id, $2 customer_id, $3 purchase_id, $4 store_id, $5 occurred_at, $6 currency,
-- $7 total_minor, $8 request_hash, $9 points, $10..$14 the lines as parallel arrays
-- (line_no, sku, category, quantity, amount_minor), $15 each line's share of the points,
-- $16 spendable_now (no pending period left: the points go to available, else pending),
-- $17 available_at, $18 expires_at of the purchase's lot, $19 expires ($18 applies; false:
-- never), $20 extends (the program counts months without a purchase: every open lot now
-- expires no sooner than $18).
--
-- The customer's standing (issue 10, computed in Rust from the checkout context:
-- status::standing::evaluate): $21 the account version the context read (the statement
-- writes only if it is still that one, so the standing was computed from the account as it
-- is), $22 status, $23 status_since, $24 regular_since, $25 tier_id, $26 tier_since,
-- $27 tier_below_since, $28 review_at (only ever moved earlier here, see below), $29 standing
-- (what reads show), $30 the status change (a JSON object of from, to, direction, trigger,
-- reason; NULL or JSON null: none), $31 the tier change (the same with from, to, change,
-- trigger, reason), $32 the instant of the changes (the clock's now). The history rows and
-- events of a change are the CTEs status_history, status_event, tier_history and tier_event,
-- written only with a change.
--
-- The sweep's next look (review_at) is only moved earlier by a purchase, never later: it is
-- the accounts' only indexed column that a purchase would change, and an update that changes
-- no indexed column can be HOT (no new index entries, a fraction of the WAL). A look that
-- comes too early is harmless: the sweep evaluates, finds nothing shown changed and sets the
-- exact next look (status::use_cases::sweep_standing); a look never comes too late, since the
-- stored one is at or before the one this purchase computed.
--
-- The purchase's points become a lot. Points that go straight to available repay a return's
-- debt first: the lot keeps only what is left after it (greatest(0, least(points,
-- available after))). The statement also returns what the account's next expiry after it is
-- made of, since all its reads see the lots as they were before it: the soonest expiry of
-- those (next_expiry(), in index order), the purchase's own lot (lot_*) and, when $20 moved
-- open lots, the points of the matured ones now expiring at $18 (moved_points). The store
-- puts them together (points::rules::lots::next_expiry_after_purchase); a union of the lots
-- and the new one, grouped and sorted here, cost about 6 % of checkout's database ceiling in
-- the statement before the standing (0-4 % in today's, BENCHMARKS.md).
--
-- Its purchase_recorded event (the outbox, `events`) is one more insert of this statement, with
-- the account as the purchase left it: written exactly when the purchase is.
--
-- Returns the account after the purchase, or no row when the purchase_id is already taken,
-- the account's version is no longer $21 (a concurrent write to this customer: the caller
-- reads again) or the program's currency is no longer the purchase's.
-- Two concurrent first attempts both pass the NOT EXISTS; the second then fails on the
-- purchases primary key (SQLSTATE 23505) and the whole statement, account update included,
-- is rolled back. The unique key, not the check, is what guarantees "earns at most once": the
-- earn entry and the lot have no unique key of their own (one index entry less each), since
-- nothing but this statement, with its purchase row, writes them. The purchase row names its
-- lot (lot_id), which is how a return finds it.
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
       SET available        = available + CASE WHEN $16 THEN $9 ELSE 0 END,
           pending          = pending + CASE WHEN $16 THEN 0 ELSE $9 END,
           debt             = CASE WHEN $16 THEN greatest(0, -(available + $9)) ELSE debt END,
           lifetime_earned  = lifetime_earned + $9,
           purchase_count   = purchase_count + 1,
           last_purchase_at = GREATEST(last_purchase_at, $5),
           version          = version + 1,
           updated_at       = now(),
           status           = $22,
           status_since     = $23,
           regular_since    = $24,
           tier_id          = $25,
           tier_since       = $26,
           tier_below_since = $27,
           review_at        = CASE WHEN review_at IS NULL OR $28 < review_at THEN $28
                                   ELSE review_at END,
           standing         = $29
     WHERE merchant_id = $1
       AND customer_id = $2
       AND version = $21
       AND NOT EXISTS (SELECT 1 FROM purchases WHERE merchant_id = $1 AND purchase_id = $3)
       AND (EXISTS (SELECT 1 FROM program WHERE currency = $6)
            OR EXISTS (SELECT 1 FROM purchases WHERE merchant_id = $1))
 RETURNING available, pending, lifetime_earned, lifetime_redeemed, purchase_count, version,
           standing
), lot AS (
    INSERT INTO point_lots (merchant_id, customer_id, source_kind, source_reference, points,
                            remaining, earned_at, available_at, matured, expires_at)
    SELECT $1, $2, 'earn', $3, $9,
           CASE WHEN $16 THEN greatest(0, least($9, available)) ELSE $9 END,
           $5, $17, $16, CASE WHEN $19 THEN $18::timestamptz END
      FROM account
     WHERE $9 > 0
 RETURNING id, remaining, matured, expires_at
), purchase AS (
    INSERT INTO purchases (merchant_id, purchase_id, customer_id, store_id, occurred_at, currency,
                           total_minor, request_hash, points_earned, available_after,
                           pending_after, lifetime_earned_after, lifetime_redeemed_after,
                           purchase_count_after, version_after, lot_id)
    SELECT $1, $3, $2, $4, $5, $6, $7, $8, $9, available, pending, lifetime_earned,
           lifetime_redeemed, purchase_count, version, (SELECT id FROM lot)
      FROM account
 RETURNING purchase_id
), lines AS (
    INSERT INTO purchase_lines (merchant_id, purchase_id, line_no, sku, category, quantity, amount_minor, points)
    SELECT $1, purchase.purchase_id, l.line_no, l.sku, l.category, l.quantity, l.amount_minor, l.points
      FROM purchase,
           unnest($10::int[], $11::text[], $12::text[], $13::int[], $14::bigint[], $15::bigint[])
               AS l (line_no, sku, category, quantity, amount_minor, points)
), entry AS (
    INSERT INTO ledger_entries (merchant_id, customer_id, seq, kind, points, reference, occurred_at)
    SELECT $1, $2, version, 'earn', $9, $3, $5
      FROM account
), event AS (
    INSERT INTO events (merchant_id, customer_id, kind, available, pending, lifetime_earned,
                        lifetime_redeemed, version, details)
    SELECT $1, $2, 'purchase_recorded', available, pending, lifetime_earned, lifetime_redeemed,
           version,
           jsonb_build_object('purchase_id', $3::text, 'points', $9::bigint,
                              'total_minor', $7::bigint, 'currency', $6::text,
                              'store_id', $4::text)
      FROM account
     WHERE outbox_on()
), extended AS (
    UPDATE point_lots
       SET expires_at = greatest(expires_at, $18)
     WHERE $20 AND merchant_id = $1 AND customer_id = $2 AND remaining > 0
       AND expires_at IS NOT NULL
       AND EXISTS (SELECT 1 FROM account)
 RETURNING remaining, matured, expires_at
), status_history AS (
    -- A change of the repeat status is kept with its reason ...
    INSERT INTO customer_status_history (merchant_id, customer_id, from_status, to_status,
                                         direction, trigger, reason, at)
    SELECT $1, $2, $30::jsonb ->> 'from', $30::jsonb ->> 'to', $30::jsonb ->> 'direction',
           $30::jsonb ->> 'trigger', $30::jsonb -> 'reason', $32
      FROM account
     WHERE jsonb_typeof($30::jsonb) = 'object'
), status_event AS (
    -- ... and told with the balance after it.
    INSERT INTO events (merchant_id, customer_id, kind, occurred_at, available, pending,
                        lifetime_earned, lifetime_redeemed, version, details)
    SELECT $1, $2, 'status_changed', $32, available, pending, lifetime_earned,
           lifetime_redeemed, version, $30::jsonb
      FROM account
     WHERE jsonb_typeof($30::jsonb) = 'object' AND outbox_on()
), tier_history AS (
    -- The same for a change of tier (a purchase only ever upgrades).
    INSERT INTO customer_tier_history (merchant_id, customer_id, from_tier, to_tier, change,
                                       trigger, reason, at)
    SELECT $1, $2, $31::jsonb ->> 'from', $31::jsonb ->> 'to', $31::jsonb ->> 'change',
           $31::jsonb ->> 'trigger', $31::jsonb -> 'reason', $32
      FROM account
     WHERE jsonb_typeof($31::jsonb) = 'object'
), tier_event AS (
    INSERT INTO events (merchant_id, customer_id, kind, occurred_at, available, pending,
                        lifetime_earned, lifetime_redeemed, version, details)
    SELECT $1, $2, 'tier_changed', $32, available, pending, lifetime_earned,
           lifetime_redeemed, version, $31::jsonb
      FROM account
     WHERE jsonb_typeof($31::jsonb) = 'object' AND outbox_on()
)
SELECT a.available, a.pending, a.lifetime_earned, a.lifetime_redeemed, a.purchase_count,
       a.version, n.points AS next_expiry_points, n.expires_at AS next_expiry_at, a.standing,
       lot.remaining AS lot_remaining, lot.matured AS lot_matured,
       lot.expires_at AS lot_expires_at, m.points AS moved_points, m.expires_at AS moved_to
  FROM account a
  LEFT JOIN lot ON true
  LEFT JOIN LATERAL next_expiry($1, $2) n ON true
  -- $18 as PostgreSQL keeps it (microseconds), so that it compares equal to the lot's.
  LEFT JOIN LATERAL (SELECT sum(x.remaining)::bigint AS points, $18::timestamptz AS expires_at
                       FROM extended x
                      WHERE x.matured AND x.expires_at = $18) m ON true
