-- MemberService.ClaimGift: points debit, stock and grant in one transaction, idempotent on
-- claim_key. The grant itself is in gift_grants (source 'points', reference the claim key);
-- this row keeps what a replay needs besides: the request's hash and the balance it answered.
CREATE TABLE gift_claims (
    merchant_id  bigint      NOT NULL,
    claim_key    text        NOT NULL,
    customer_id  bigint      NOT NULL,
    gift_id      text        NOT NULL,
    points       bigint      NOT NULL CHECK (points > 0),
    request_hash bytea       NOT NULL,
    answer       jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant_id, claim_key),
    FOREIGN KEY (merchant_id, customer_id) REFERENCES customers (merchant_id, id)
);
