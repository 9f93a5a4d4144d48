-- The tier-up gift rule (issue 10): trigger 'tier_up' names a tier (tier_id) and is granted,
-- in the transaction of the purchase that brings a customer up to that tier, once per rule,
-- customer and tier (source reference "<rule_id>:tier:<customer_id>:<tier_id>").
ALTER TABLE gift_rules ADD COLUMN tier_id text
    CHECK (tier_id IS NULL OR length(tier_id) BETWEEN 1 AND 64);
ALTER TABLE gift_rules DROP CONSTRAINT gift_rules_trigger_check;
ALTER TABLE gift_rules ADD CONSTRAINT gift_rules_trigger_check
    CHECK (trigger IN ('first_purchase', 'every_nth_purchase', 'tier_up'));
ALTER TABLE gift_rules ADD CONSTRAINT gift_rules_tier_check
    CHECK ((trigger = 'tier_up') = (tier_id IS NOT NULL));

-- Checkout's question "may a purchase fire a gift rule?" now counts tier-up rules too.
DROP INDEX gift_rules_purchase_idx;
CREATE INDEX gift_rules_purchase_idx
    ON gift_rules (merchant_id)
    WHERE active AND trigger IN ('first_purchase', 'every_nth_purchase', 'tier_up');
