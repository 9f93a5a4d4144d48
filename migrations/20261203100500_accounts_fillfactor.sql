-- Every purchase, spend, return and sweep updates its customer's accounts row. An update that
-- changes no indexed column is HOT (no new index entries, much less WAL) only if the new
-- version fits on the same page. Leaving a fifth of each page free keeps room for it; the
-- rows carry the standing's JSON and are a few hundred bytes. Applies to pages filled from
-- now on (a VACUUM FULL or pg_repack would apply it to the existing ones).
ALTER TABLE accounts SET (fillfactor = 80);
