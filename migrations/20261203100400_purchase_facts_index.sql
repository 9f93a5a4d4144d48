-- Checkout's context reads the customer's purchases within the program's look-back (the facts
-- of their standing: status::standing::Facts), newest first. With the plain index on
-- (merchant_id, customer_id, occurred_at) every one of them was a heap page visit of its own
-- (a customer's purchases lie on as many pages as they have purchases): 80 purchases, 80
-- pages per checkout. The columns the facts need ride along in the index, so the read is an
-- index-only scan of a page or two for the purchases on all-visible pages (vacuumed).
--
-- returned_minor and points_clawed_back are changed by returns only; such an update is no
-- longer HOT, which returns can afford.
--
-- This builds the index inside the migration's transaction, which blocks writes to purchases
-- while it runs. On a large installation, create it beforehand without blocking:
--   CREATE INDEX CONCURRENTLY purchases_customer_facts_idx ON purchases
--       (merchant_id, customer_id, occurred_at DESC)
--       INCLUDE (total_minor, returned_minor, points_earned, points_clawed_back);
-- and this migration only drops the old index.
CREATE INDEX IF NOT EXISTS purchases_customer_facts_idx ON purchases
    (merchant_id, customer_id, occurred_at DESC)
    INCLUDE (total_minor, returned_minor, points_earned, points_clawed_back);
DROP INDEX IF EXISTS purchases_customer_idx;
