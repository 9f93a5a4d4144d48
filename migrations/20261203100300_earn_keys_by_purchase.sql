-- Checkout writes one purchase, its ledger entry and its lot. Each unique key is one more
-- index entry per checkout, and three keys guarded the same fact ("a purchase earns once"):
-- purchases_pkey, the ledger's operation key and the lots' source key. Only the purchase's
-- primary key is needed: the earn entry and the earn lot are written by the statement that
-- inserts the purchase row, never otherwise, so a second copy of either would need a second
-- purchase row, which the primary key refuses (the whole statement rolls back).
--
-- Every other kind keeps both keys. An earn's lot is found from its purchase (lot_id) now,
-- rather than by the source key.
ALTER TABLE purchases ADD COLUMN lot_id bigint;

UPDATE purchases p
   SET lot_id = l.id
  FROM point_lots l
 WHERE l.merchant_id = p.merchant_id AND l.customer_id = p.customer_id
   AND l.source_kind = 'earn' AND l.source_reference = p.purchase_id;

ALTER TABLE point_lots DROP CONSTRAINT point_lots_source_key;
CREATE UNIQUE INDEX point_lots_source_key ON point_lots (merchant_id, source_kind, source_reference)
    WHERE source_kind <> 'earn';

DROP INDEX ledger_entries_operation_key;
CREATE UNIQUE INDEX ledger_entries_operation_key ON ledger_entries (merchant_id, kind, reference)
    WHERE kind NOT IN ('redeem', 'earn');
