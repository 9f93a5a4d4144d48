-- The event stream's reads, its retention horizon and the expiry warnings.

-- A watcher's replay: one merchant's events after a position, in position order (the
-- replicas' shared readers follow events_position_key, all merchants at once).
CREATE INDEX events_merchant_position_idx ON events (merchant_id, position)
    WHERE position IS NOT NULL;

-- Retention. The pruner deletes a prefix of positions (every event at or below
-- `pruned_through` is gone, every one above it is kept) and moves this horizon in the same
-- transaction. One row; replicas take turns on it.
CREATE TABLE event_horizon (
    singleton      boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    pruned_through bigint      NOT NULL DEFAULT 0,
    pruned_at      timestamptz
);
INSERT INTO event_horizon DEFAULT VALUES;

-- Per merchant, the highest position of its events pruned so far. A watcher whose cursor is
-- below it would miss events of its merchant: it is told so (OUT_OF_RANGE), never skipped
-- ahead. Per merchant, so that a quiet merchant's last cursor stays good while other
-- merchants' events are pruned past it.
CREATE TABLE event_merchant_horizons (
    merchant_id    bigint PRIMARY KEY,
    pruned_through bigint NOT NULL
);

-- The lots already warned about, once per lot and expiry instant (a purchase that pushes an
-- open lot's expiry back, under MONTHS_WITHOUT_PURCHASE, makes it due for a warning again,
-- for its new date). The primary key makes the warning exactly-once across replicas.
CREATE TABLE lot_expiry_warnings (
    merchant_id bigint      NOT NULL,
    lot_id      bigint      NOT NULL,
    expires_at  timestamptz NOT NULL,
    warned_at   timestamptz NOT NULL,
    CONSTRAINT lot_expiry_warnings_pkey PRIMARY KEY (merchant_id, lot_id, expires_at)
);
-- (The job finds the lots due for a warning by point_lots_expiring_idx, the expiry sweep's.)
