-- postbox 0004: what operators do, as functions, so that the CLI, scripts
-- and plain SQL do exactly the same thing.

-- Stops delivering to an endpoint; its events stay pending until it is
-- enabled. Disabling a disabled endpoint keeps its first disabled_at and
-- takes the new reason. Returns false when there is no such endpoint.
CREATE FUNCTION postbox.disable_endpoint(endpoint_id bigint, reason text DEFAULT 'disabled by an operator')
RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    UPDATE postbox.endpoints e
    SET disabled_at = coalesce(e.disabled_at, now()), disabled_reason = disable_endpoint.reason
    WHERE e.id = disable_endpoint.endpoint_id;
    RETURN FOUND;
END
$$;

-- Resumes an endpoint at once: "deliver now" also ends a Retry-After pause
-- and closes the breaker. Triggers record the changes in
-- postbox.endpoint_events and wake the workers. Returns false when there is
-- no such endpoint.
CREATE FUNCTION postbox.enable_endpoint(endpoint_id bigint) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    UPDATE postbox.endpoints e SET disabled_at = NULL, disabled_reason = NULL
    WHERE e.id = enable_endpoint.endpoint_id;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    UPDATE postbox.endpoint_state s
    SET paused_until = NULL, breaker_open_until = NULL, breaker_cooldown = NULL,
        failing_events = '{}', probe_event = NULL, probe_until = NULL
    WHERE s.endpoint_id = enable_endpoint.endpoint_id;
    RETURN true;
END
$$;

-- Puts finished events back to pending, one batch per call: those with
-- status `status` (failed, cancelled or delivered), and, when given, among
-- `ids`, of endpoint `endpoint_id`, created in [since, until). A replayed
-- event keeps its id (receivers deduplicate on it) and its attempt history,
-- and gets `attempts` more attempts. Events are taken in id order after
-- `after`: call again with the returned last_id until it returns 0 rows
-- looked at, and no event is replayed twice, even one that is delivered
-- again meanwhile. With dry_run nothing changes (replayed = 0): the rows
-- looked at are what would be replayed. Workers are woken by trigger
-- event_renewed (0002).
CREATE FUNCTION postbox.replay(status text, ids uuid[] DEFAULT NULL, endpoint_id bigint DEFAULT NULL,
                               since timestamptz DEFAULT NULL, until timestamptz DEFAULT NULL,
                               attempts integer DEFAULT 4, after uuid DEFAULT NULL, batch integer DEFAULT 1000,
                               dry_run boolean DEFAULT false)
RETURNS TABLE (looked integer, replayed integer, last_id uuid)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
BEGIN
    IF replay.status IS NULL OR replay.status NOT IN ('failed', 'cancelled', 'delivered') THEN
        PERFORM postbox.invalid('status', 'must be failed, cancelled or delivered');
    END IF;
    IF replay.attempts IS NULL OR replay.attempts NOT BETWEEN 1 AND 100 THEN
        PERFORM postbox.invalid('attempts', 'must be between 1 and 100');
    END IF;
    IF replay.batch IS NULL OR replay.batch < 1 THEN
        PERFORM postbox.invalid('batch', 'must be at least 1');
    END IF;
    RETURN QUERY
    WITH cand AS (
        SELECT o.id, o.status FROM postbox.outbox o
        WHERE (replay.after IS NULL OR o.id > replay.after)
          AND (replay.ids IS NULL OR o.id = ANY (replay.ids))
          AND (replay.endpoint_id IS NULL OR o.endpoint_id = replay.endpoint_id)
          AND (replay.since IS NULL OR o.created_at >= replay.since)
          AND (replay.until IS NULL OR o.created_at < replay.until)
          AND o.status = replay.status
        ORDER BY o.id
        LIMIT replay.batch
        FOR UPDATE
    ), done AS (
        UPDATE postbox.outbox o
        SET status = 'pending', max_attempts = o.attempts + replay.attempts, next_attempt_at = now(),
            delivered_at = NULL, locked_by = NULL, locked_until = NULL
        FROM cand c WHERE o.id = c.id AND o.status = replay.status AND NOT replay.dry_run
        RETURNING o.id
    )
    SELECT (SELECT count(*) FROM cand)::int, (SELECT count(*) FROM done)::int, (SELECT c.id FROM cand c ORDER BY c.id DESC LIMIT 1);
END
$$;

INSERT INTO postbox.schema_migrations (version, description)
VALUES (4, 'operator_actions') ON CONFLICT (version) DO NOTHING;
