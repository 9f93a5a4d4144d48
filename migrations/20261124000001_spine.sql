-- The spine: merchants and their keys, programs, customers, accounts, purchases and the ledger.
--
-- Every table leads with merchant_id, every unique key includes it (api_keys.key_hash aside: a
-- key must be found before its merchant is known; on Citus that small table is a reference
-- table), so the data can be distributed by merchant_id.

CREATE TABLE merchants (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    merchant_id bigint      NOT NULL REFERENCES merchants (id),
    id          bigint GENERATED ALWAYS AS IDENTITY,
    scope       text        NOT NULL CHECK (scope IN ('pos', 'app', 'scheduler', 'admin')),
    -- SHA-256 of the key; the key itself is shown once and never stored.
    key_hash    bytea       NOT NULL CHECK (length(key_hash) = 32),
    key_prefix  text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    PRIMARY KEY (merchant_id, id),
    CONSTRAINT api_keys_key_hash_key UNIQUE (key_hash),
    CONSTRAINT api_keys_id_key UNIQUE (id)
);

CREATE TABLE programs (
    merchant_id             bigint      PRIMARY KEY REFERENCES merchants (id),
    currency                text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    earn_points             integer     NOT NULL CHECK (earn_points >= 0),
    earn_currency_units     integer     NOT NULL CHECK (earn_currency_units > 0),
    minimum_purchase_minor  bigint      NOT NULL DEFAULT 0 CHECK (minimum_purchase_minor >= 0),
    -- {"coffee": 15000, ...}: multiplier in basis points per category.
    category_multipliers    jsonb       NOT NULL DEFAULT '{}',
    -- [{"id", "multiplier_bp", "starts_at", "ends_at", "categories"}, ...]
    promotions              jsonb       NOT NULL DEFAULT '[]',
    version                 bigint      NOT NULL DEFAULT 1,
    updated_at              timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE customers (
    merchant_id         bigint      NOT NULL REFERENCES merchants (id),
    id                  bigint GENERATED ALWAYS AS IDENTITY,
    external_id         text        NOT NULL,
    display_name        text        NOT NULL DEFAULT '',
    birth_month         smallint    CHECK (birth_month BETWEEN 1 AND 12),
    birth_day           smallint    CHECK (birth_day BETWEEN 1 AND 31),
    birth_year          smallint,
    time_zone           text        NOT NULL DEFAULT 'UTC',
    email               text,
    phone               text,
    marketing_consent   boolean     NOT NULL DEFAULT false,
    enrolled_at         timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant_id, id),
    CONSTRAINT customers_external_id_key UNIQUE (merchant_id, external_id),
    CHECK ((birth_month IS NULL) = (birth_day IS NULL))
);

-- The projection of each customer's ledger. Invariant, at every commit:
--   available + pending = sum(ledger_entries.points) of the customer.
CREATE TABLE accounts (
    merchant_id         bigint      NOT NULL,
    customer_id         bigint      NOT NULL,
    -- Only a return's clawback may push it below zero; redemptions are conditional updates.
    available           bigint      NOT NULL DEFAULT 0,
    pending             bigint      NOT NULL DEFAULT 0 CHECK (pending >= 0),
    lifetime_earned     bigint      NOT NULL DEFAULT 0 CHECK (lifetime_earned >= 0),
    lifetime_redeemed   bigint      NOT NULL DEFAULT 0 CHECK (lifetime_redeemed >= 0),
    purchase_count      bigint      NOT NULL DEFAULT 0 CHECK (purchase_count >= 0),
    last_purchase_at    timestamptz,
    -- Grows on every change; orders cached copies (see storage/cache.rs).
    version             bigint      NOT NULL DEFAULT 0,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant_id, customer_id),
    FOREIGN KEY (merchant_id, customer_id) REFERENCES customers (merchant_id, id)
);

CREATE TABLE purchases (
    merchant_id             bigint      NOT NULL,
    -- The merchant's receipt id: the idempotency key of RecordPurchase.
    purchase_id             text        NOT NULL,
    customer_id             bigint      NOT NULL,
    store_id                text        NOT NULL,
    occurred_at             timestamptz NOT NULL,
    currency                text        NOT NULL,
    total_minor             bigint      NOT NULL CHECK (total_minor >= 0),
    -- SHA-256 of the request content: a retry matches it, a different receipt does not.
    request_hash            bytea       NOT NULL,
    points_earned           bigint      NOT NULL,
    -- The account right after this purchase: a retry returns exactly this.
    available_after         bigint      NOT NULL,
    pending_after           bigint      NOT NULL,
    lifetime_earned_after   bigint      NOT NULL,
    lifetime_redeemed_after bigint      NOT NULL,
    purchase_count_after    bigint      NOT NULL,
    version_after           bigint      NOT NULL,
    created_at              timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT purchases_pkey PRIMARY KEY (merchant_id, purchase_id),
    FOREIGN KEY (merchant_id, customer_id) REFERENCES customers (merchant_id, id)
);

CREATE INDEX purchases_customer_idx ON purchases (merchant_id, customer_id, occurred_at DESC);

CREATE TABLE purchase_lines (
    merchant_id     bigint  NOT NULL,
    purchase_id     text    NOT NULL,
    line_no         integer NOT NULL,
    sku             text    NOT NULL,
    category        text    NOT NULL DEFAULT '',
    quantity        integer NOT NULL CHECK (quantity > 0),
    amount_minor    bigint  NOT NULL CHECK (amount_minor >= 0),
    PRIMARY KEY (merchant_id, purchase_id, line_no),
    FOREIGN KEY (merchant_id, purchase_id) REFERENCES purchases (merchant_id, purchase_id)
);

-- Immutable movements of points. Nothing here is ever updated or deleted.
CREATE TABLE ledger_entries (
    merchant_id bigint      NOT NULL,
    customer_id bigint      NOT NULL,
    id          bigint GENERATED ALWAYS AS IDENTITY,
    kind        text        NOT NULL CHECK (kind IN ('earn', 'redeem', 'reserve', 'release',
                                                     'return_clawback', 'expire', 'adjust', 'bonus')),
    points      bigint      NOT NULL,
    -- The client key of the operation that wrote the entry (purchase_id for 'earn').
    reference   text        NOT NULL,
    occurred_at timestamptz NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant_id, customer_id, id),
    FOREIGN KEY (merchant_id, customer_id) REFERENCES customers (merchant_id, id),
    -- A second guard, in the ledger itself, that one operation moves points at most once.
    CONSTRAINT ledger_entries_operation_key UNIQUE (merchant_id, kind, reference)
);

-- Who changed what, for merchant admins.
CREATE TABLE audit_log (
    merchant_id bigint      NOT NULL REFERENCES merchants (id),
    id          bigint GENERATED ALWAYS AS IDENTITY,
    at          timestamptz NOT NULL DEFAULT now(),
    -- "key:<id>" for an API caller, "cli" for the command line.
    actor       text        NOT NULL,
    action      text        NOT NULL,
    details     jsonb       NOT NULL DEFAULT '{}',
    PRIMARY KEY (merchant_id, id)
);
