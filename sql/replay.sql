-- Replaying events by hand, with the function `postbox replay` uses
-- (migration 0004). A replayed event keeps its id and its attempt history;
-- it gets four more attempts. Each call replays one batch (1000 by default)
-- in id order: call again with `after` = the last_id it returned until it
-- looks at 0 rows.

-- One event:
--   psql "$DATABASE_URL" -v id=<event uuid> -f sql/replay.sql
SELECT * FROM postbox.replay('failed', ids => ARRAY[:'id'::uuid]);

-- Every failed event of one endpoint in the last day (edit, then run;
-- dry_run => true first shows how many in `looked`):
-- SELECT * FROM postbox.replay('failed',
--     endpoint_id => (SELECT id FROM postbox.endpoints WHERE url = 'https://example.com/webhook'),
--     since => now() - interval '1 day', dry_run => true);

-- No NOTIFY needed: an event made pending again wakes the workers by itself
-- (trigger event_renewed, migration 0002).
