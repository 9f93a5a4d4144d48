-- Whether this session writes the outbox. A deployment that nobody follows (no WatchEvents
-- consumer) can switch it off with LOYALTY_EVENTS_OUTBOX=off: the server then opens its
-- connections with `loyalty.outbox = off`, and every insert into `events` is guarded by this
-- function, so the rows are never written (no event, no index entries, nothing for the
-- sequencer to number). Unset (every other session, migrations, psql) means on.
--
-- A plain STABLE SQL expression: the planner inlines it, and as a qual without columns it is
-- a one-time filter, evaluated once per statement.
CREATE FUNCTION outbox_on() RETURNS boolean
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT current_setting('loyalty.outbox', true) IS DISTINCT FROM 'off' $$;
