-- Repeat-purchase status and tiers (issue 10): the program's thresholds and tiers, each
-- customer's status and tier on their account row (written by the very statement that records
-- a purchase, conditional on the account version it read), their histories, the sweep's work
-- list and the downgrade warning as an event kind.

-- The program's status thresholds (src/status/rules.rs, `StatusThresholds`) and tiers
-- (src/tiers/rules.rs, `TierProgram`), validated in Rust. '{}' reads as the defaults (no tiers).
ALTER TABLE programs
    ADD COLUMN status jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN tiers  jsonb NOT NULL DEFAULT '{}';

-- A customer's standing, beside their balance so one row (and one cached copy) holds both:
--   status, status_since, regular_since: the repeat status, since when, and the start of the
--     current unbroken run of regularity (`Assessment::regular_since`);
--   tier_id, tier_since, tier_below_since: the tier held (NULL: none), since when, and since
--     when the customer no longer qualifies for it (the grace; NULL while they do);
--   tier_warned_for: the tier_below_since of the grace whose downgrade warning was sent, so a
--     warning goes out once per grace;
--   review_at: when the sweep must look at the customer again (the earliest of the status's
--     next time-driven change, the hint's deadline and the tier's warning, downgrade or end
--     of qualification); NULL: only a purchase or a return changes anything;
--   standing: what reads show (src/status/standing.rs, `Standing`), computed in Rust with the
--     row: the next-status hint's facts, the tier's name and perks, the progress to the next
--     tier. Instants only: sentences relative to now are made at read time.
ALTER TABLE accounts
    ADD COLUMN status           text NOT NULL DEFAULT 'new'
        CHECK (status IN ('new', 'returning', 'regular', 'loyal', 'at_risk', 'lapsed')),
    ADD COLUMN status_since     timestamptz,
    ADD COLUMN regular_since    timestamptz,
    ADD COLUMN tier_id          text,
    ADD COLUMN tier_since       timestamptz,
    ADD COLUMN tier_below_since timestamptz,
    ADD COLUMN tier_warned_for  timestamptz,
    ADD COLUMN review_at        timestamptz,
    ADD COLUMN standing         jsonb;

-- The sweep's work list: due accounts, soonest first.
CREATE INDEX accounts_review_idx ON accounts (review_at) WHERE review_at IS NOT NULL;

-- Customers who bought before statuses existed are assessed by the first sweep.
UPDATE accounts SET review_at = now() WHERE purchase_count > 0;

-- Every change of a customer's status, with its reason (`StatusReason` as JSON) and what
-- triggered it (purchase, return, sweep).
CREATE TABLE customer_status_history (
    merchant_id bigint      NOT NULL,
    customer_id bigint      NOT NULL,
    id          bigint GENERATED ALWAYS AS IDENTITY,
    from_status text        NOT NULL,
    to_status   text        NOT NULL,
    direction   text        NOT NULL CHECK (direction IN ('up', 'down')),
    trigger     text        NOT NULL CHECK (trigger IN ('purchase', 'return', 'sweep')),
    reason      jsonb       NOT NULL,
    at          timestamptz NOT NULL,
    PRIMARY KEY (merchant_id, customer_id, id),
    FOREIGN KEY (merchant_id, customer_id) REFERENCES customers (merchant_id, id)
);

-- Every change of a customer's tier (NULL: no tier), with its reason (the metric's value and
-- the thresholds, as JSON) and trigger.
CREATE TABLE customer_tier_history (
    merchant_id bigint      NOT NULL,
    customer_id bigint      NOT NULL,
    id          bigint GENERATED ALWAYS AS IDENTITY,
    from_tier   text,
    to_tier     text,
    change      text        NOT NULL CHECK (change IN ('upgraded', 'downgraded', 'replaced')),
    trigger     text        NOT NULL CHECK (trigger IN ('purchase', 'return', 'sweep')),
    reason      jsonb       NOT NULL,
    at          timestamptz NOT NULL,
    PRIMARY KEY (merchant_id, customer_id, id),
    FOREIGN KEY (merchant_id, customer_id) REFERENCES customers (merchant_id, id)
);

-- The warning before a downgrade is an event of its own (tier_changed is for changes only).
ALTER TABLE events DROP CONSTRAINT events_kind_check;
ALTER TABLE events ADD CONSTRAINT events_kind_check CHECK (kind IN (
    'purchase_recorded', 'points_redeemed', 'points_returned', 'points_expiring',
    'status_changed', 'tier_changed', 'tier_downgrade_warning', 'gift_issued', 'gift_redeemed',
    'greeting_due'));

-- How many days of a customer's purchases an assessment reads (`ProgramRules::look_back_days`,
-- written by Rust with the rules), so checkout's first read can bound its purchases before it
-- has the program's rules. 365 is what the defaults need.
ALTER TABLE programs ADD COLUMN look_back_days integer NOT NULL DEFAULT 365
    CHECK (look_back_days BETWEEN 1 AND 7300);
