-- Backlog by status: events, oldest age, in flight, due now, waiting on their key.
-- psql "$DATABASE_URL" -f sql/backlog.sql
SELECT * FROM postbox.backlog;

-- The oldest pending events and why they wait, in words:
SELECT event_id, url, attempts, max_attempts, next_attempt_at, state
FROM postbox.pending_events
ORDER BY created_at
LIMIT 20;
