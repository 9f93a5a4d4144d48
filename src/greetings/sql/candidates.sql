-- The greeting job's and ListUpcomingOccasions' candidates: consenting customers of a
-- merchant after id $2 (keyset), at most $3, whose birthday or (UTC) enrolment month and day
-- is one of ($4[i], $5[i]) — unless $6: then every consenting customer (a holiday is near).
--
-- $1 merchant_id, $2 after customer id, $3 limit, $4 months, $5 days, $6 all
SELECT c.id, c.external_id, c.display_name, c.birth_month, c.birth_day, c.birth_year,
       c.time_zone, c.enrolled_at
  FROM customers c
 WHERE c.merchant_id = $1 AND c.marketing_consent AND c.id > $2
   AND ($6
        OR (c.birth_month, c.birth_day) IN (SELECT * FROM unnest($4::smallint[], $5::smallint[]))
        OR (extract(month FROM c.enrolled_at AT TIME ZONE 'UTC')::integer,
            extract(day FROM c.enrolled_at AT TIME ZONE 'UTC')::integer)
           IN (SELECT m::integer, d::integer FROM unnest($4::smallint[], $5::smallint[]) AS u (m, d)))
 ORDER BY c.id
 LIMIT $3
