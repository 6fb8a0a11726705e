-- Failed attempts in the last hour, by endpoint and error kind.
-- psql "$DATABASE_URL" -f sql/failures.sql
SELECT e.url,
       a.error_kind,
       a.status_code,
       count(*)          AS attempts,
       max(a.started_at) AS latest,
       (array_agg(a.error ORDER BY a.started_at DESC))[1] AS latest_error
FROM postbox.attempts a
JOIN postbox.outbox o    ON o.id = a.outbox_id
JOIN postbox.endpoints e ON e.id = o.endpoint_id
WHERE a.error_kind IS NOT NULL
  AND a.started_at > now() - interval '1 hour'
GROUP BY e.url, a.error_kind, a.status_code
ORDER BY attempts DESC;
