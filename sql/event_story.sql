-- The whole story of an event, found by event id, conversation id or message id
-- (what the integration guide asks receivers to send to support).
-- psql "$DATABASE_URL" -v key=<uuid> -f sql/event_story.sql
SELECT o.id AS event_id, o.conversation_id, o.message_id, e.url, o.status,
       o.attempts, o.max_attempts, o.created_at, o.next_attempt_at, o.last_attempt_at,
       o.last_status_code, o.last_error, o.delivered_at, o.locked_by, o.locked_until
FROM postbox.outbox o
JOIN postbox.endpoints e ON e.id = o.endpoint_id
WHERE :'key'::uuid IN (o.id, o.conversation_id, o.message_id)
ORDER BY o.created_at;

SELECT a.outbox_id AS event_id, a.attempt, a.worker_id, a.started_at, a.duration_ms,
       a.status_code, a.error_kind, a.error, left(a.response_body, 200) AS response_body
FROM postbox.attempts a
JOIN postbox.outbox o ON o.id = a.outbox_id
WHERE :'key'::uuid IN (o.id, o.conversation_id, o.message_id)
ORDER BY a.outbox_id, a.attempt;
