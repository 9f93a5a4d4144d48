-- Customers whose cached state may be stale: a cache write failed after its Postgres commit.
-- Written by the replica that saw the failure, repaired by whichever replica claims the row
-- first (FOR UPDATE SKIP LOCKED), so a repair survives the crash of the replica that noted it.
CREATE TABLE cache_repairs (
    merchant_id bigint      NOT NULL,
    external_id text        NOT NULL,
    noted_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant_id, external_id)
);
