-- Backlog by status: events, oldest age, in flight, due now, parked.
-- psql "$DATABASE_URL" -f sql/backlog.sql
SELECT * FROM postbox.backlog;

-- The oldest pending events and why they wait:
SELECT id, endpoint_id, attempts, max_attempts, next_attempt_at, locked_by, last_status_code, last_error
FROM postbox.outbox
WHERE status = 'pending'
ORDER BY created_at
LIMIT 20;
