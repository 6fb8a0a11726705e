-- postbox 0003: what operators read: every state in words, the backlog,
-- endpoint health, failures and an event's story.

-- Why an endpoint is not sending, in words ('ok' when nothing holds it).
CREATE FUNCTION postbox.endpoint_state_words(e postbox.endpoints, s postbox.endpoint_state) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN e.disabled_at IS NOT NULL
            THEN format('endpoint disabled since %s (%s)', date_trunc('second', e.disabled_at),
                        coalesce(e.disabled_reason, 'by an operator'))
        WHEN s.paused_until > now()
            THEN format('endpoint paused by Retry-After until %s', date_trunc('second', s.paused_until))
        WHEN s.breaker_open_until > now()
            THEN format('breaker open until %s', date_trunc('second', s.breaker_open_until))
        WHEN s.breaker_open_until IS NOT NULL AND s.probe_until > now()
            THEN format('breaker half-open: waits for probe event %s', s.probe_event)
        WHEN s.breaker_open_until IS NOT NULL
            THEN 'breaker half-open: the next delivery is a probe'
        WHEN s.in_flight >= e.max_in_flight
            THEN format('at max_in_flight (%s in flight)', s.in_flight)
        WHEN e.rate_per_minute IS NOT NULL
             AND (SELECT sum(x) FROM unnest(postbox.rate_window(s.rate_counts, s.rate_epoch,
                                                                floor(extract(epoch FROM now()))::bigint)) x)
                 >= e.rate_per_minute
            THEN format('rate window full until %s',
                        postbox.rate_free_at(postbox.rate_window(s.rate_counts, s.rate_epoch,
                                                                 floor(extract(epoch FROM now()))::bigint),
                                             floor(extract(epoch FROM now()))::bigint))
        ELSE 'ok'
    END
$$;

-- Where an event stands and, when it is pending but not in flight, why it
-- waits: due now, scheduled, waiting for its key's head, or held by its
-- endpoint (in the words of endpoint_state_words).
CREATE FUNCTION postbox.event_state(o postbox.outbox) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN o.status = 'delivered' THEN format('delivered at %s', date_trunc('second', o.delivered_at))
        WHEN o.status = 'failed' THEN format('failed after %s attempt(s): %s', o.attempts, o.last_error)
        WHEN o.status = 'cancelled' THEN 'cancelled'
        WHEN o.locked_until > now()
            THEN format('in flight: attempt %s by worker %s, lease until %s', o.attempts, o.locked_by,
                        date_trunc('second', o.locked_until))
        WHEN o.locked_by IS NOT NULL
            THEN format('lease of worker %s expired at %s: due again', o.locked_by,
                        date_trunc('second', o.locked_until))
        WHEN e.disabled_at IS NOT NULL THEN postbox.endpoint_state_words(e, s)
        WHEN head.id IS NOT NULL
            THEN format('waits for event %s of key %s', head.id, o.ordering_key)
        WHEN o.next_attempt_at > now()
            THEN format('%s at %s', CASE WHEN o.attempts > 0 THEN 'retry scheduled' ELSE 'due' END,
                        date_trunc('second', o.next_attempt_at))
        WHEN postbox.endpoint_state_words(e, s) <> 'ok' THEN postbox.endpoint_state_words(e, s)
        ELSE 'due now'
    END
    FROM postbox.endpoints e
    JOIN postbox.endpoint_state s ON s.endpoint_id = e.id
    LEFT JOIN LATERAL (
        SELECT p.id FROM postbox.outbox p
        WHERE o.ordering_key IS NOT NULL AND p.endpoint_id = o.endpoint_id
          AND p.ordering_key = o.ordering_key AND p.status = 'pending' AND p.seq < o.seq
        ORDER BY p.seq LIMIT 1) head ON true
    WHERE e.id = o.endpoint_id
$$;

-- Events by status: how many, the oldest, how many in flight, due now, or
-- waiting behind their ordering key.
CREATE VIEW postbox.backlog AS
SELECT s.status,
       count(o.id)                                                   AS events,
       date_trunc('second', now() - min(o.created_at))               AS oldest_age,
       count(o.id) FILTER (WHERE o.locked_until > now())             AS in_flight,
       count(o.id) FILTER (WHERE o.status = 'pending' AND o.locked_until IS NULL
                              AND o.next_attempt_at <= now())        AS due_now,
       count(o.id) FILTER (WHERE o.next_attempt_at = 'infinity')     AS waiting_on_key
FROM unnest(ARRAY['pending', 'delivered', 'failed', 'cancelled']) WITH ORDINALITY AS s(status, n)
LEFT JOIN postbox.outbox o ON o.status = s.status
GROUP BY s.status, s.n
ORDER BY s.n;

-- Every pending event and why it waits, in words.
CREATE VIEW postbox.pending_events AS
SELECT o.id AS event_id, o.endpoint_id, e.url, o.ordering_key, o.attempts, o.max_attempts,
       o.next_attempt_at, o.created_at, postbox.event_state(o) AS state
FROM postbox.outbox o JOIN postbox.endpoints e ON e.id = o.endpoint_id
WHERE o.status = 'pending';

-- Each endpoint over the last hour: attempts, success rate, latency
-- percentiles, and its state in words.
CREATE VIEW postbox.endpoint_health AS
SELECT e.id AS endpoint_id,
       e.url,
       postbox.endpoint_state_words(e, s)                                     AS state,
       count(a.attempt)                                                       AS attempts,
       count(a.attempt) FILTER (WHERE a.error_kind IS NULL)                   AS succeeded,
       round(100.0 * count(a.attempt) FILTER (WHERE a.error_kind IS NULL)
             / nullif(count(a.attempt), 0), 1)                                AS success_pct,
       percentile_cont(0.5)  WITHIN GROUP (ORDER BY a.duration_ms)            AS p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY a.duration_ms)            AS p95_ms,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY a.duration_ms)            AS p99_ms,
       (SELECT count(*) FROM postbox.outbox p WHERE p.endpoint_id = e.id AND p.status = 'pending') AS pending,
       s.in_flight
FROM postbox.endpoints e
JOIN postbox.endpoint_state s ON s.endpoint_id = e.id
LEFT JOIN postbox.outbox o   ON o.endpoint_id = e.id
LEFT JOIN postbox.attempts a ON a.outbox_id = o.id AND a.started_at > now() - interval '1 hour'
GROUP BY e.id, s.endpoint_id;

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
-- a message id: one row per attempt (or one row with no attempt yet), with
-- where the event stands now in words.
CREATE FUNCTION postbox.event_story(key uuid)
RETURNS TABLE (event_id uuid, conversation_id uuid, message_id uuid, url text, status text,
               attempts integer, max_attempts integer, created_at timestamptz, next_attempt_at timestamptz,
               delivered_at timestamptz, state text, attempt integer, worker_id text, started_at timestamptz,
               duration_ms integer, status_code integer, error_kind text, error text, response_body text)
LANGUAGE sql STABLE AS $$
    SELECT o.id, o.conversation_id, o.message_id, e.url, o.status, o.attempts, o.max_attempts,
           o.created_at, o.next_attempt_at, o.delivered_at, postbox.event_state(o),
           a.attempt, a.worker_id, a.started_at, a.duration_ms, a.status_code, a.error_kind, a.error,
           left(a.response_body, 200)
    FROM postbox.outbox o
    JOIN postbox.endpoints e ON e.id = o.endpoint_id
    LEFT JOIN postbox.attempts a ON a.outbox_id = o.id
    WHERE o.id = key OR o.conversation_id = key OR o.message_id = key
    ORDER BY o.created_at, o.id, a.attempt
$$;

-- Endpoint lifecycle: one row each time an endpoint is disabled (410 Gone
-- or an operator), enabled again, paused by a Retry-After, or its breaker
-- opens or closes, however the change was made (by a worker, the CLI or
-- plain SQL: triggers record it). Each row is also announced with NOTIFY on
-- the channel postbox_endpoint_events, its payload the row as JSON, so an
-- application can tell its customer "your endpoint is failing" as it
-- happens. (The table is made in 0001; postbox.prune deletes rows older
-- than the retention of delivered events.)
-- Records one lifecycle event and announces it (at commit).
CREATE FUNCTION postbox.endpoint_event(endpoint_id bigint, kind text, detail text) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    r postbox.endpoint_events;
BEGIN
    INSERT INTO postbox.endpoint_events (endpoint_id, kind, detail)
    VALUES (endpoint_event.endpoint_id, endpoint_event.kind, endpoint_event.detail)
    RETURNING * INTO r;
    PERFORM pg_notify('postbox_endpoint_events', row_to_json(r)::text);
END
$$;

CREATE FUNCTION postbox.endpoint_enabled_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.disabled_at IS NOT NULL THEN
        PERFORM postbox.endpoint_event(NEW.id, 'disabled', coalesce(NEW.disabled_reason, 'by an operator'));
    ELSE
        PERFORM postbox.endpoint_event(NEW.id, 'enabled',
                                       format('was disabled since %s', date_trunc('second', OLD.disabled_at)));
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER endpoint_enabled_changed AFTER UPDATE ON postbox.endpoints FOR EACH ROW
    WHEN ((OLD.disabled_at IS NULL) <> (NEW.disabled_at IS NULL))
    EXECUTE FUNCTION postbox.endpoint_enabled_changed();
CREATE TRIGGER endpoint_created_disabled AFTER INSERT ON postbox.endpoints FOR EACH ROW
    WHEN (NEW.disabled_at IS NOT NULL)
    EXECUTE FUNCTION postbox.endpoint_enabled_changed();

-- Pauses and the breaker, from the state row workers keep. The WHEN clause
-- keeps the cost off the (frequent) updates that change neither.
CREATE FUNCTION postbox.endpoint_hold_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.paused_until > now() AND (OLD.paused_until IS NULL OR OLD.paused_until <= now()) THEN
        PERFORM postbox.endpoint_event(NEW.endpoint_id, 'paused',
            format('Retry-After: nothing is sent until %s', date_trunc('second', NEW.paused_until)));
    END IF;
    IF NEW.breaker_open_until IS NOT NULL
       AND (OLD.breaker_open_until IS NULL
            OR (OLD.breaker_open_until <= now() AND NEW.breaker_open_until > now())) THEN
        PERFORM postbox.endpoint_event(NEW.endpoint_id, 'breaker_opened',
            CASE WHEN OLD.breaker_open_until IS NULL
                 THEN format('%s events failing; nothing is sent until %s, then one probe at a time',
                             cardinality(NEW.failing_events), date_trunc('second', NEW.breaker_open_until))
                 ELSE format('the probe failed; open again until %s (cool-down %s)',
                             date_trunc('second', NEW.breaker_open_until), NEW.breaker_cooldown)
            END);
    ELSIF OLD.breaker_open_until IS NOT NULL AND NEW.breaker_open_until IS NULL THEN
        PERFORM postbox.endpoint_event(NEW.endpoint_id, 'breaker_closed',
            CASE WHEN NEW.failing_events = '{}' AND OLD.failing_events <> '{}' THEN 'a delivery succeeded'
                 ELSE 'cleared' END);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER endpoint_hold_changed AFTER UPDATE ON postbox.endpoint_state FOR EACH ROW
    WHEN ((NEW.paused_until IS DISTINCT FROM OLD.paused_until AND NEW.paused_until IS NOT NULL)
          OR NEW.breaker_open_until IS DISTINCT FROM OLD.breaker_open_until)
    EXECUTE FUNCTION postbox.endpoint_hold_changed();

INSERT INTO postbox.schema_migrations (version, description)
VALUES (3, 'operations') ON CONFLICT (version) DO NOTHING;
