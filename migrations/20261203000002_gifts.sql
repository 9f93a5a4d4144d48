-- Gifts: the merchant's catalog, the grants (one gift given to one customer, with a code and a
-- window) and the rules that grant gifts on purchases.
--
-- Every table leads with merchant_id and every unique key includes it, like the spine.

-- The catalog. `gift_id` is chosen by the merchant (like promotion ids) and is the key that
-- makes CreateGift safe to retry.
CREATE TABLE gifts (
    merchant_id     bigint      NOT NULL REFERENCES merchants (id),
    gift_id         text        NOT NULL CHECK (length(gift_id) BETWEEN 1 AND 64),
    name            text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    description     text        NOT NULL DEFAULT '' CHECK (length(description) <= 2000),
    kind            text        NOT NULL CHECK (kind IN ('item', 'service', 'discount')),
    -- NULL: the gift cannot be claimed with points.
    points_price    bigint      CHECK (points_price IS NULL OR points_price > 0),
    -- NULL: unlimited. Taken by a conditional `UPDATE ... WHERE stock > 0`, so it never
    -- goes below zero (and the CHECK says so again).
    stock           bigint      CHECK (stock IS NULL OR stock >= 0),
    -- A grant is valid for this many days from its start.
    validity_days   integer     NOT NULL CHECK (validity_days BETWEEN 1 AND 3650),
    active          boolean     NOT NULL DEFAULT true,
    -- Grows on every admin update (not on stock taken by grants); UpdateGift's
    -- expected_version is checked against it.
    version         bigint      NOT NULL DEFAULT 1,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT gifts_pkey PRIMARY KEY (merchant_id, gift_id)
);

-- One gift given to one customer. `id` is internal (never shown): callers name a grant by
-- its code.
CREATE TABLE gift_grants (
    merchant_id         bigint      NOT NULL,
    id                  bigint GENERATED ALWAYS AS IDENTITY,
    customer_id         bigint      NOT NULL,
    gift_id             text        NOT NULL,
    -- The normalized code (16 data characters and the check character of Crockford's base32,
    -- upper case, without dashes). A bearer secret: never logged.
    code                text        NOT NULL CHECK (code ~ '^[0-9A-HJKMNP-TV-Z]{17}$'),
    -- 'issued' until redeemed or revoked. An issued grant past valid_until reads as expired
    -- (computed at read time); the stored status needs no sweep to be right.
    status              text        NOT NULL DEFAULT 'issued'
                                    CHECK (status IN ('issued', 'redeemed', 'expired', 'revoked')),
    -- What made the grant, and its key: the claim key ('points'), "<rule_id>:<purchase_id>"
    -- ('rule'), the issue key ('manual'). One key makes one grant, so a replay grants once,
    -- and the same key for another customer or gift is refused.
    source              text        NOT NULL CHECK (source IN ('points', 'rule', 'manual')),
    source_reference    text        NOT NULL CHECK (length(source_reference) BETWEEN 1 AND 200),
    -- The purchase that triggered the grant, so a return can revoke it.
    purchase_id         text,
    valid_from          timestamptz NOT NULL,
    valid_until         timestamptz NOT NULL,
    -- RedeemGift: when, with which client key (its idempotency key) and the SHA-256 of the
    -- request's content (a replay matches it; the same key with other content does not).
    redeemed_at         timestamptz,
    redemption_key      text,
    redemption_hash     bytea,
    redeemed_store_id   text,
    revoked_at          timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT gift_grants_pkey PRIMARY KEY (merchant_id, id),
    CONSTRAINT gift_grants_code_key UNIQUE (merchant_id, code),
    -- Stricter than (source, source_reference, gift_id): a key names one grant.
    CONSTRAINT gift_grants_source_key UNIQUE (merchant_id, source, source_reference),
    CONSTRAINT gift_grants_redemption_key UNIQUE (merchant_id, redemption_key),
    FOREIGN KEY (merchant_id, customer_id) REFERENCES customers (merchant_id, id),
    FOREIGN KEY (merchant_id, gift_id) REFERENCES gifts (merchant_id, gift_id),
    CHECK (valid_until > valid_from),
    CHECK ((status = 'redeemed') = (redeemed_at IS NOT NULL)),
    CHECK ((redeemed_at IS NULL) = (redemption_key IS NULL)),
    CHECK ((redeemed_at IS NULL) = (redemption_hash IS NULL)),
    CHECK ((status = 'revoked') = (revoked_at IS NOT NULL))
);

-- ListCustomerGifts: newest first.
CREATE INDEX gift_grants_customer_idx
    ON gift_grants (merchant_id, customer_id, created_at DESC, code DESC);
-- ReturnPurchase revokes what its purchase triggered.
CREATE INDEX gift_grants_purchase_idx
    ON gift_grants (merchant_id, purchase_id) WHERE purchase_id IS NOT NULL;

-- Rules that grant gifts. `trigger` names the occasion; each trigger keeps its parameters in
-- columns of its own, NULL for the others, tied to it by a CHECK:
--   'first_purchase'      the come-back gift: granted by the customer's first purchase, for the
--                         second visit (delay_hours keeps it from being redeemed at once);
--   'every_nth_purchase'  granted when the purchase count reaches a multiple of every_n.
-- Triggers to come slot in the same way: 'birthday' (granted with the birthday greeting),
-- 'tier_up' (a tier_id column: granted on reaching that tier), 'complaint' (granted when a
-- complaint is resolved): add the value to the trigger CHECK, their parameter columns with
-- their CHECKs, and an evaluator that calls gifts::store::grant with source 'rule' and the
-- reference "<rule_id>:<occasion key>" (e.g. the greeting's year), so each fires once.
CREATE TABLE gift_rules (
    merchant_id     bigint      NOT NULL REFERENCES merchants (id),
    rule_id         text        NOT NULL CHECK (length(rule_id) BETWEEN 1 AND 64 AND strpos(rule_id, ':') = 0),
    trigger         text        NOT NULL CHECK (trigger IN ('first_purchase', 'every_nth_purchase')),
    every_n         integer     CHECK (every_n IS NULL OR every_n BETWEEN 1 AND 10000),
    gift_id         text        NOT NULL,
    -- Hours between the triggering event and the start of the grant's window.
    delay_hours     integer     NOT NULL DEFAULT 0 CHECK (delay_hours BETWEEN 0 AND 8760),
    active          boolean     NOT NULL DEFAULT true,
    version         bigint      NOT NULL DEFAULT 1,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT gift_rules_pkey PRIMARY KEY (merchant_id, rule_id),
    FOREIGN KEY (merchant_id, gift_id) REFERENCES gifts (merchant_id, gift_id),
    CHECK ((trigger = 'every_nth_purchase') = (every_n IS NOT NULL))
);

-- Checkout asks whether a merchant has any active purchase rule before it evaluates them.
CREATE INDEX gift_rules_purchase_idx
    ON gift_rules (merchant_id)
    WHERE active AND trigger IN ('first_purchase', 'every_nth_purchase');
