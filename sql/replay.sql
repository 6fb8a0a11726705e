-- Replaying events by hand (`postbox replay` does the same in batches, with a
-- dry run). A replayed event keeps its id and its attempt history; it gets
-- four more attempts. Run inside a transaction and check the count first.

-- One event:
--   psql "$DATABASE_URL" -v id=<event uuid> -f sql/replay.sql
BEGIN;

UPDATE postbox.outbox
SET status = 'pending', max_attempts = attempts + 4, next_attempt_at = now(),
    delivered_at = NULL, locked_by = NULL, locked_until = NULL
WHERE id = :'id'::uuid AND status IN ('failed', 'cancelled');

-- Every failed event of one endpoint in the last day (edit, then uncomment):
-- UPDATE postbox.outbox o
-- SET status = 'pending', max_attempts = o.attempts + 4, next_attempt_at = now()
-- FROM postbox.endpoints e
-- WHERE e.id = o.endpoint_id AND e.url = 'https://example.com/webhook'
--   AND o.status = 'failed' AND o.created_at > now() - interval '1 day';

-- No NOTIFY needed: an event made pending again wakes the workers by itself
-- (trigger event_renewed, migration 0002).
COMMIT;
