-- Ledger entry ids that callers see are per customer: `seq` is the account version the entry
-- produced (every change of an account writes one entry and bumps the version by one), so it
-- reveals nothing about other customers or merchants, unlike the table-wide identity `id`,
-- which stays internal.
ALTER TABLE ledger_entries ADD COLUMN seq bigint;

-- Every entry written so far is a purchase's EARN entry, whose purchase kept the version.
UPDATE ledger_entries e
   SET seq = p.version_after
  FROM purchases p
 WHERE p.merchant_id = e.merchant_id
   AND p.purchase_id = e.reference
   AND e.kind = 'earn';

ALTER TABLE ledger_entries
    ALTER COLUMN seq SET NOT NULL,
    ADD CONSTRAINT ledger_entries_seq_key UNIQUE (merchant_id, customer_id, seq);
