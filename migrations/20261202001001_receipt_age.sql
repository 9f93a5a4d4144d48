-- How far back a receipt may be dated, and what an older one gets: refused, or points under
-- the rules of the day it is recorded (its promotions matched against now). Without a bound a
-- till could date a receipt into the best promotion of any past day.
ALTER TABLE programs
    ADD COLUMN max_receipt_age_days integer NOT NULL DEFAULT 30
        CHECK (max_receipt_age_days BETWEEN 1 AND 3650),
    ADD COLUMN old_receipts text NOT NULL DEFAULT 'refuse'
        CHECK (old_receipts IN ('refuse', 'earn_at_today'));
