-- postbox 0003: views for operators, and what retention needs.

-- The smallest UUIDv7 of a moment: event ids are time-ordered, so
-- "id < postbox.uuid_v7_at(t)" selects events created before t through the
-- primary key, with no extra index.
CREATE FUNCTION postbox.uuid_v7_at(t timestamptz) RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT encode(
        set_bit(set_bit(set_bit(set_bit(
            overlay('\x00000000000000000000000000000000'::bytea
                    PLACING substring(int8send((extract(epoch FROM t) * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1), 54, 1), 71, 1),
        'hex')::uuid
$$;

-- Events by status: how many, the oldest, how many in flight, due now, or
-- parked behind a disabled endpoint.
CREATE VIEW postbox.backlog AS
SELECT s.status,
       count(o.id)                                                   AS events,
       date_trunc('second', now() - min(o.created_at))               AS oldest_age,
       count(o.id) FILTER (WHERE o.locked_by IS NOT NULL)            AS in_flight,
       count(o.id) FILTER (WHERE o.status = 'pending' AND o.locked_by IS NULL
                              AND o.next_attempt_at <= now())        AS due_now,
       count(o.id) FILTER (WHERE o.next_attempt_at = 'infinity')     AS parked
FROM unnest(ARRAY['pending', 'delivered', 'failed', 'cancelled']) WITH ORDINALITY AS s(status, n)
LEFT JOIN postbox.outbox o ON o.status = s.status
GROUP BY s.status, s.n
ORDER BY s.n;

-- Each endpoint over the last hour: attempts, success rate, latency
-- percentiles, and its state.
CREATE VIEW postbox.endpoint_health AS
SELECT e.id AS endpoint_id,
       e.url,
       CASE WHEN e.disabled_at IS NOT NULL THEN 'disabled'
            WHEN e.breaker_open_until > now() THEN 'breaker open'
            WHEN e.breaker_open_until IS NOT NULL THEN 'probing'
            WHEN e.paused_until > now() THEN 'paused'
            ELSE 'ok' END                                                     AS state,
       count(a.attempt)                                                       AS attempts,
       count(a.attempt) FILTER (WHERE a.error_kind IS NULL)                   AS succeeded,
       round(100.0 * count(a.attempt) FILTER (WHERE a.error_kind IS NULL)
             / nullif(count(a.attempt), 0), 1)                                AS success_pct,
       percentile_cont(0.5)  WITHIN GROUP (ORDER BY a.duration_ms)            AS p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY a.duration_ms)            AS p95_ms,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY a.duration_ms)            AS p99_ms,
       (SELECT count(*) FROM postbox.outbox p WHERE p.endpoint_id = e.id AND p.status = 'pending') AS pending
FROM postbox.endpoints e
LEFT JOIN postbox.outbox o   ON o.endpoint_id = e.id
LEFT JOIN postbox.attempts a ON a.outbox_id = o.id AND a.started_at > now() - interval '1 hour'
GROUP BY e.id;

-- Failed attempts over the last hour by endpoint, error kind and status.
CREATE VIEW postbox.failures AS
SELECT e.url,
       a.error_kind,
       a.status_code,
       count(*)                                            AS attempts,
       count(DISTINCT a.outbox_id)                         AS events,
       max(a.started_at)                                   AS latest,
       (array_agg(a.error ORDER BY a.started_at DESC))[1]  AS latest_error
FROM postbox.attempts a
JOIN postbox.outbox o    ON o.id = a.outbox_id
JOIN postbox.endpoints e ON e.id = o.endpoint_id
WHERE a.error_kind IS NOT NULL AND a.started_at > now() - interval '1 hour'
GROUP BY e.url, a.error_kind, a.status_code;

-- The whole story of the events matching an event id, a conversation id or
-- a message id: one row per attempt (or one row with no attempt yet).
CREATE FUNCTION postbox.event_story(key uuid)
RETURNS TABLE (event_id uuid, conversation_id uuid, message_id uuid, url text, status text,
               attempts integer, max_attempts integer, created_at timestamptz, next_attempt_at timestamptz,
               delivered_at timestamptz, attempt integer, worker_id text, started_at timestamptz,
               duration_ms integer, status_code integer, error_kind text, error text, response_body text)
LANGUAGE sql STABLE AS $$
    SELECT o.id, o.conversation_id, o.message_id, e.url, o.status, o.attempts, o.max_attempts,
           o.created_at, o.next_attempt_at, o.delivered_at,
           a.attempt, a.worker_id, a.started_at, a.duration_ms, a.status_code, a.error_kind, a.error,
           left(a.response_body, 200)
    FROM postbox.outbox o
    JOIN postbox.endpoints e ON e.id = o.endpoint_id
    LEFT JOIN postbox.attempts a ON a.outbox_id = o.id
    WHERE o.id = key OR o.conversation_id = key OR o.message_id = key
    ORDER BY o.created_at, o.id, a.attempt
$$;

INSERT INTO postbox.schema_migrations (version, description)
VALUES (3, 'operations') ON CONFLICT (version) DO NOTHING;
