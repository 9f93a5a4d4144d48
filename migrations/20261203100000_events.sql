-- The outbox: every change worth reacting to, written in the same transaction (usually the
-- same statement) as the change, and streamed by EngagementService.WatchEvents.
--
-- `id` is insertion order only: transactions commit out of order, so a reader that followed
-- ids would skip an event whose transaction committed after a higher id was read. `position`
-- is commit order: a sequencer (one at a time across replicas, under an advisory lock) numbers
-- the committed rows that have none yet, in one transaction per batch. Since batches are
-- numbered one after another, every reader sees positions as a gapless-in-order prefix: once
-- position p is visible, every smaller position is too. Readers follow positions only.
CREATE TABLE events (
    id                bigint      GENERATED ALWAYS AS IDENTITY,
    position          bigint,
    -- No foreign key: every event is written by a merchant's own write, and a key check
    -- would lock the merchant's row in every checkout (one row shared by all its tills).
    merchant_id       bigint      NOT NULL,
    -- NULL for an event about no single customer.
    customer_id       bigint,
    -- purchase_recorded, points_redeemed, points_returned, points_expiring, status_changed,
    -- tier_changed, gift_issued, gift_redeemed, greeting_due.
    kind              text        NOT NULL CHECK (kind IN (
                          'purchase_recorded', 'points_redeemed', 'points_returned',
                          'points_expiring', 'status_changed', 'tier_changed', 'gift_issued',
                          'gift_redeemed', 'greeting_due')),
    occurred_at       timestamptz NOT NULL DEFAULT now(),
    -- The customer's balance right after the change (NULL without a customer).
    available         bigint,
    pending           bigint,
    lifetime_earned   bigint,
    lifetime_redeemed bigint,
    version           bigint,
    -- Type-specific facts; never contact data.
    details           jsonb       NOT NULL DEFAULT '{}',
    CONSTRAINT events_position_key UNIQUE (position)
);
-- The sequencer's work list: committed rows not numbered yet, oldest insertion first.
CREATE INDEX events_unsequenced_idx ON events (id) WHERE position IS NULL;
CREATE SEQUENCE event_positions AS bigint;
