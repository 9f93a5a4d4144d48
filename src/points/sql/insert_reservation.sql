-- A new hold, written after its points were taken (TAKE_POINTS) and the account written
-- (WRITE_ACCOUNT), in the same transaction under the account lock.
--
-- $1 merchant_id, $2 reservation_id, $3 customer_id, $4 points, $5 discount_minor,
-- $6 purchase_id (NULL: none), $7 request_hash, $8 expires_at, $9 hold_seq (the RESERVE
-- entry, whose lot movements a release gives back), $10 answer (the response a replay gets).
--
-- A reservation_id another customer's request took meanwhile fails on the primary key
-- (SQLSTATE 23505): ALREADY_EXISTS.
INSERT INTO reservations (merchant_id, reservation_id, customer_id, points,
                          discount_minor, purchase_id, request_hash, expires_at,
                          hold_seq, answer)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
