-- Occasions and greetings (EngagementService): which occasions a program greets, the greetings
-- the daily job makes (one per customer, occasion and local year) and their hand-out to sender
-- workers under leases.

-- The program's occasion settings (src/greetings/rules.rs, `OccasionProgram`): birthdays and
-- anniversaries on or off, holidays, the birthday reward. Validated in Rust; '{}' reads as
-- the default (birthdays and anniversaries, no holidays, no reward).
ALTER TABLE programs ADD COLUMN occasions jsonb NOT NULL DEFAULT '{}';

-- The birthday gift is granted with the birthday greeting: source 'birthday', its reference
-- the greeting key (so one per customer and year).
ALTER TABLE gift_grants DROP CONSTRAINT gift_grants_source_check;
ALTER TABLE gift_grants ADD CONSTRAINT gift_grants_source_check
    CHECK (source IN ('points', 'rule', 'manual', 'birthday'));

-- One greeting of one customer's occasion in one local year: the unit of work of a sender.
--
-- status: 'due' (made, never handed out), 'leased' (handed out until lease_expires_at),
-- 'retry_later' (the sender asked for another attempt at next_attempt_at), 'sent' and
-- 'failed' (final). `offer_at` is when it can be handed out (again): its creation for 'due',
-- the lease's end for 'leased', the next attempt for 'retry_later', NULL once final; so
-- ClaimGreetings reads one index range.
CREATE TABLE greetings (
    merchant_id      bigint      NOT NULL,
    id               bigint      GENERATED ALWAYS AS IDENTITY,
    -- What senders name it by: random, says nothing about other greetings or merchants.
    greeting_id      text        NOT NULL DEFAULT replace(gen_random_uuid()::text, '-', ''),
    customer_id      bigint      NOT NULL,
    -- The greeting key (rules::GreetingKey): 'birthday', 'anniversary', 'holiday:<id>', and
    -- the local year of the occasion's date.
    occasion         text        NOT NULL,
    year             integer     NOT NULL,
    kind             text        NOT NULL CHECK (kind IN ('birthday', 'anniversary', 'holiday')),
    -- "Birthday", "Enrollment anniversary" or the holiday's name when it was made.
    occasion_name    text        NOT NULL,
    -- The occasion's date in the customer's calendar.
    local_date       date        NOT NULL,
    status           text        NOT NULL DEFAULT 'due'
                                 CHECK (status IN ('due', 'leased', 'retry_later', 'sent', 'failed')),
    offer_at         timestamptz,
    -- The current lease: a fresh random token per hand-out.
    lease_token      text,
    lease_expires_at timestamptz,
    next_attempt_at  timestamptz,
    -- How many times it was handed out.
    attempts         integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    -- The ack that ended the last lease, so its replay answers the same.
    acked_token      text,
    acked_outcome    text        CHECK (acked_outcome IN ('sent', 'failed_permanently', 'retry_later')),
    -- The birthday gift granted with it: gift_grants (source 'birthday', this reference).
    gift_reference   text,
    bonus_points     bigint      NOT NULL DEFAULT 0 CHECK (bonus_points >= 0),
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    CONSTRAINT greetings_pkey PRIMARY KEY (merchant_id, id),
    CONSTRAINT greetings_key UNIQUE (merchant_id, customer_id, occasion, year),
    CONSTRAINT greetings_greeting_id_key UNIQUE (merchant_id, greeting_id),
    FOREIGN KEY (merchant_id, customer_id) REFERENCES customers (merchant_id, id),
    CHECK ((status = 'leased') = (lease_token IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CHECK ((status = 'retry_later') = (next_attempt_at IS NOT NULL)),
    CHECK ((status IN ('sent', 'failed')) = (offer_at IS NULL)),
    CHECK ((acked_token IS NULL) = (acked_outcome IS NULL))
);

-- ClaimGreetings: what can be handed out now, oldest offer first.
CREATE INDEX greetings_offer_idx ON greetings (merchant_id, offer_at, id)
    WHERE offer_at IS NOT NULL;

-- The greeting job's candidates: consenting customers whose birthday, or the (UTC) month and
-- day of whose enrolment, is near today.
CREATE INDEX customers_greeting_birthday_idx
    ON customers (merchant_id, birth_month, birth_day) WHERE marketing_consent;
CREATE INDEX customers_greeting_anniversary_idx
    ON customers (merchant_id,
                  (extract(month FROM enrolled_at AT TIME ZONE 'UTC')::integer),
                  (extract(day FROM enrolled_at AT TIME ZONE 'UTC')::integer))
    WHERE marketing_consent;
