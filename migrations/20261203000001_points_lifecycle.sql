-- The points lifecycle: lots with a pending period and an expiry, spending (redemptions and
-- reservations), returns that take back what a purchase earned, and admin adjustments.
--
-- Every change of an account still happens under its row lock (the first statement of each
-- write locks `accounts`), then lots, then the operation's own row: one lock order
-- everywhere, so the sweeps and the tills never deadlock.

-- How points flow through the merchant's program (src/programs/rules.rs, `Lifecycle`):
-- pending period, expiry policy, redemption rule and return policy. Validated in Rust.
ALTER TABLE programs ADD COLUMN lifecycle jsonb NOT NULL DEFAULT '{}';

-- What a return's clawback took that the customer no longer had (the "debt" return policy).
-- Spending never touches it and needs `available >= points`, so `available` can only go
-- below zero through a clawback: the CHECK below refuses any other way to an overdraft.
ALTER TABLE accounts
    ADD COLUMN debt bigint NOT NULL DEFAULT 0 CHECK (debt >= 0),
    ADD CONSTRAINT accounts_no_overdraft CHECK (available + debt >= 0);

-- REDEEM entries come from three kinds of client key (redemption_id, a committed hold's
-- reservation_id, a gift claim's claim_key), which share no namespace: one key of each kind
-- may be equal. Their uniqueness is kept by the rows of those operations (each writes its
-- entry once under the account lock); the ledger's own guard stays for every other kind.
ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_operation_key;
CREATE UNIQUE INDEX ledger_entries_operation_key ON ledger_entries (merchant_id, kind, reference)
    WHERE kind <> 'redeem';

ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_kind_check;
ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_kind_check
    CHECK (kind IN ('earn', 'redeem', 'reserve', 'release', 'return_clawback', 'expire',
                    'adjust', 'bonus', 'redeem_refund'));

-- Points from one credit (an earn, a positive adjustment, a refund of spent points).
-- `remaining` is what is left to spend; while `matured` is false it counts in the account's
-- pending points, afterwards in available. Invariant per customer, at every commit:
--   sum(remaining of matured lots)   = greatest(available, 0)
--   sum(remaining of unmatured lots) = pending
CREATE TABLE point_lots (
    merchant_id      bigint      NOT NULL,
    customer_id      bigint      NOT NULL,
    id               bigint GENERATED ALWAYS AS IDENTITY,
    -- The ledger entry that created the lot (kind and reference are unique together).
    source_kind      text        NOT NULL,
    source_reference text        NOT NULL,
    points           bigint      NOT NULL CHECK (points > 0),
    remaining        bigint      NOT NULL CHECK (remaining >= 0),
    earned_at        timestamptz NOT NULL,
    available_at     timestamptz NOT NULL,
    matured          boolean     NOT NULL,
    -- NULL: never expires.
    expires_at       timestamptz,
    -- How often the lot expired (points given back to an expired lot by a released
    -- reservation expire again): makes each EXPIRE entry's reference unique.
    expirations      integer     NOT NULL DEFAULT 0,
    PRIMARY KEY (merchant_id, customer_id, id),
    FOREIGN KEY (merchant_id, customer_id) REFERENCES customers (merchant_id, id),
    CONSTRAINT point_lots_source_key UNIQUE (merchant_id, source_kind, source_reference),
    CHECK (remaining <= points)
);

-- Spending order: soonest-expiring first (never-expiring last), oldest first on a tie.
CREATE INDEX point_lots_open_idx ON point_lots (merchant_id, customer_id, expires_at, id)
    WHERE remaining > 0;
-- The sweep's work lists.
CREATE INDEX point_lots_maturing_idx ON point_lots (available_at) WHERE NOT matured;
CREATE INDEX point_lots_expiring_idx ON point_lots (expires_at)
    WHERE matured AND remaining > 0 AND expires_at IS NOT NULL;

-- The soonest expiry of a customer's available points, and how many expire then (no row when
-- none expire). A plain SQL function, so the planner inlines it into the statements that
-- read an account (LEFT JOIN LATERAL next_expiry(...)); it reads the open-lots index.
CREATE FUNCTION next_expiry(merchant bigint, customer bigint)
RETURNS TABLE (expires_at timestamptz, points bigint)
LANGUAGE sql STABLE
AS $$
    SELECT l.expires_at, sum(l.remaining)::bigint
      FROM point_lots l
     WHERE l.merchant_id = merchant AND l.customer_id = customer
       AND l.remaining > 0 AND l.matured AND l.expires_at IS NOT NULL
     GROUP BY l.expires_at
     ORDER BY l.expires_at
     LIMIT 1
$$;

-- Which lots each movement took points from (positive) or gave them back to (negative), so
-- expiry and clawbacks never count a point twice and a release restores the very lots held.
CREATE TABLE lot_movements (
    merchant_id bigint      NOT NULL,
    customer_id bigint      NOT NULL,
    id          bigint GENERATED ALWAYS AS IDENTITY,
    lot_id      bigint      NOT NULL,
    -- The ledger entry (per-customer seq) of the movement; NULL when a maturing lot repaid
    -- a return's debt (that moves no points of the ledger).
    entry_seq   bigint,
    points      bigint      NOT NULL CHECK (points <> 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant_id, customer_id, id),
    FOREIGN KEY (merchant_id, customer_id, lot_id) REFERENCES point_lots (merchant_id, customer_id, id)
);
CREATE INDEX lot_movements_entry_idx ON lot_movements (merchant_id, customer_id, entry_seq);

-- RedeemPoints, idempotent on redemption_id. `answer` is the response a retry gets back.
CREATE TABLE redemptions (
    merchant_id    bigint      NOT NULL,
    redemption_id  text        NOT NULL,
    customer_id    bigint      NOT NULL,
    points         bigint      NOT NULL CHECK (points > 0),
    discount_minor bigint      NOT NULL CHECK (discount_minor >= 0),
    -- The purchase the points paid for: a return of it gives them back pro rata.
    purchase_id    text,
    request_hash   bytea       NOT NULL,
    answer         jsonb       NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant_id, redemption_id),
    FOREIGN KEY (merchant_id, customer_id) REFERENCES customers (merchant_id, id)
);
CREATE INDEX redemptions_purchase_idx ON redemptions (merchant_id, purchase_id)
    WHERE purchase_id IS NOT NULL;

-- ReservePoints: points held while the till takes payment, then committed or released once.
CREATE TABLE reservations (
    merchant_id    bigint      NOT NULL,
    reservation_id text        NOT NULL,
    customer_id    bigint      NOT NULL,
    points         bigint      NOT NULL CHECK (points > 0),
    discount_minor bigint      NOT NULL CHECK (discount_minor >= 0),
    purchase_id    text,
    request_hash   bytea       NOT NULL,
    expires_at     timestamptz NOT NULL,
    status         text        NOT NULL DEFAULT 'held'
                               CHECK (status IN ('held', 'committed', 'released', 'expired')),
    -- The ledger entry of the hold, whose lot movements a release gives back.
    hold_seq       bigint      NOT NULL,
    answer         jsonb       NOT NULL,
    -- The answer of the commit or release that settled it (a replay gets it back).
    settled_answer jsonb,
    settled_at     timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant_id, reservation_id),
    FOREIGN KEY (merchant_id, customer_id) REFERENCES customers (merchant_id, id),
    CHECK ((status = 'held') = (settled_at IS NULL))
);
CREATE INDEX reservations_due_idx ON reservations (expires_at) WHERE status = 'held';
CREATE INDEX reservations_purchase_idx ON reservations (merchant_id, purchase_id)
    WHERE purchase_id IS NOT NULL AND status = 'committed';

-- What each line earned (its share of the purchase's points, stored when it was recorded, so
-- a return takes back exactly that) and how much of it was returned.
ALTER TABLE purchase_lines
    ADD COLUMN points bigint CHECK (points >= 0),
    ADD COLUMN returned_minor bigint NOT NULL DEFAULT 0,
    ADD CONSTRAINT purchase_lines_returned_check CHECK (returned_minor BETWEEN 0 AND amount_minor);
ALTER TABLE purchases
    ADD COLUMN returned_minor bigint NOT NULL DEFAULT 0,
    ADD COLUMN points_clawed_back bigint NOT NULL DEFAULT 0 CHECK (points_clawed_back >= 0),
    ADD COLUMN redeemed_refunded bigint NOT NULL DEFAULT 0 CHECK (redeemed_refunded >= 0),
    ADD CONSTRAINT purchases_returned_check CHECK (returned_minor BETWEEN 0 AND total_minor);

-- ReturnPurchase, idempotent on return_id.
CREATE TABLE purchase_returns (
    merchant_id    bigint      NOT NULL,
    return_id      text        NOT NULL,
    purchase_id    text        NOT NULL,
    customer_id    bigint      NOT NULL,
    returned_minor bigint      NOT NULL CHECK (returned_minor > 0),
    request_hash   bytea       NOT NULL,
    answer         jsonb       NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant_id, return_id),
    FOREIGN KEY (merchant_id, purchase_id) REFERENCES purchases (merchant_id, purchase_id)
);

-- AdjustPoints, idempotent on adjustment_key; the reason and actor are in the audit log too.
CREATE TABLE adjustments (
    merchant_id    bigint      NOT NULL,
    adjustment_key text        NOT NULL,
    customer_id    bigint      NOT NULL,
    points         bigint      NOT NULL CHECK (points <> 0),
    reason         text        NOT NULL CHECK (length(reason) BETWEEN 1 AND 500),
    actor          text        NOT NULL,
    request_hash   bytea       NOT NULL,
    answer         jsonb       NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant_id, adjustment_key),
    FOREIGN KEY (merchant_id, customer_id) REFERENCES customers (merchant_id, id)
);

-- Lots for the points earned before lots existed: every EARN so far is spendable and never
-- expires (no program had an expiry policy), so each account's available points become one
-- lot. (Only EARN entries existed before this migration.)
INSERT INTO point_lots (merchant_id, customer_id, source_kind, source_reference, points,
                        remaining, earned_at, available_at, matured, expires_at)
SELECT a.merchant_id, a.customer_id, 'migrated', c.external_id, a.available,
       a.available, a.updated_at, a.updated_at, true, NULL
  FROM accounts a
  JOIN customers c ON c.merchant_id = a.merchant_id AND c.id = a.customer_id
 WHERE a.available > 0;
