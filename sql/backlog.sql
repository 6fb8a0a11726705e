-- Backlog by status, with the age of the oldest event in each.
-- psql "$DATABASE_URL" -f sql/backlog.sql
SELECT status,
       count(*)                                  AS events,
       date_trunc('second', now() - min(created_at)) AS oldest_age,
       count(*) FILTER (WHERE locked_by IS NOT NULL) AS in_flight,
       count(*) FILTER (WHERE status = 'pending' AND next_attempt_at <= now() AND locked_by IS NULL) AS due_now,
       count(*) FILTER (WHERE next_attempt_at = 'infinity') AS parked_disabled_endpoint
FROM postbox.outbox
GROUP BY status
ORDER BY array_position(ARRAY['pending', 'delivered', 'failed', 'cancelled'], status);
