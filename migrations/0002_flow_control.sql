-- postbox 0002: flow control across workers.
--
-- Per-endpoint concurrency and rate limits, fairness between endpoints,
-- back-pressure (Retry-After), a circuit breaker and ordering keys, all
-- enforced at claim time through the database so that they hold across any
-- number of worker processes.

ALTER TABLE postbox.endpoints
    -- Fair rotation: endpoints claimed longest ago go first.
    ADD COLUMN last_claimed_at    timestamptz,
    -- Sliding-window rate accounting: starts per second over the last 61
    -- seconds; rate_counts[1] is the second rate_epoch (Unix seconds).
    ADD COLUMN rate_epoch         bigint,
    ADD COLUMN rate_counts        integer[],
    -- Back-pressure: a 429/503 with Retry-After pauses the endpoint until then.
    ADD COLUMN paused_until       timestamptz,
    -- Circuit breaker: distinct events whose latest attempts failed with no
    -- success since; the breaker opens when there are enough of them.
    ADD COLUMN failure_streak     integer     NOT NULL DEFAULT 0,
    ADD COLUMN failing_events     uuid[]      NOT NULL DEFAULT '{}',
    -- Open breaker: no deliveries until then, except one probe afterwards.
    ADD COLUMN breaker_open_until timestamptz,
    ADD COLUMN breaker_cooldown   interval;

-- Enqueue order, for ordering keys (UUIDv7 ids tie within a millisecond).
ALTER TABLE postbox.outbox ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY;

-- Due events of one endpoint, oldest first (the claim walks this per endpoint).
CREATE INDEX outbox_endpoint_due_idx ON postbox.outbox (endpoint_id, next_attempt_at) WHERE status = 'pending';
-- Leases held per endpoint (the concurrency limit). Its predicate is on
-- locked_until, not locked_by, so that the outcome UPDATE (which filters on
-- locked_by = worker) finds its rows by primary key instead of walking this.
CREATE INDEX outbox_leased_idx ON postbox.outbox (endpoint_id) WHERE locked_until IS NOT NULL;
-- The oldest pending event of an ordering key.
CREATE INDEX outbox_ordering_idx ON postbox.outbox (ordering_key, seq)
    WHERE status = 'pending' AND ordering_key IS NOT NULL;
DROP INDEX postbox.outbox_due_idx;

-- The rate window of an endpoint moved to the current second: 61 per-second
-- counts, newest first.
CREATE FUNCTION postbox.rate_window(counts integer[], epoch bigint, now_s bigint) RETURNS integer[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN counts IS NULL OR epoch IS NULL OR now_s - epoch >= 61 THEN array_fill(0, ARRAY[61])
        WHEN now_s <= epoch THEN counts
        ELSE array_fill(0, ARRAY[(now_s - epoch)::int]) || counts[1:61 - (now_s - epoch)::int]
    END
$$;

-- Claims up to max_rows due events for worker_id, with a lease of lease_ms.
--
-- Two statements, each with its own snapshot (this function is VOLATILE):
--  1. Lock up to max_endpoints endpoints that have due events and may
--     receive now (not disabled, not paused, breaker not open), least
--     recently claimed first, with FOR UPDATE SKIP LOCKED: two workers never account for the same
--     endpoint at once, and never wait on each other.
--  2. With those locks held, and a snapshot taken after them (so every
--     claim committed before is visible), give each endpoint a budget:
--     max_in_flight minus its unexpired leases, rate_per_minute minus the
--     starts in the last 61 seconds, one while its breaker probes, and a
--     fair share of max_rows. Then claim that many of its due events, oldest
--     first, skipping events whose ordering key has an older pending event,
--     count the attempt, set the lease, and account the starts.
-- Rows whose lease expired on their final attempt become failed here.
CREATE FUNCTION postbox.claim(worker_id text, max_rows integer, lease_ms bigint, max_endpoints integer DEFAULT 4)
RETURNS TABLE (id uuid, attempt integer, max_attempts integer, payload jsonb, endpoint_id bigint,
               url text, secret text, claimed_at timestamptz)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    eps bigint[];
    share integer;
BEGIN
    SELECT array_agg(l.id) INTO eps FROM (
        SELECT e.id FROM postbox.endpoints e
        WHERE e.disabled_at IS NULL
          AND (e.paused_until IS NULL OR e.paused_until <= now())
          AND (e.breaker_open_until IS NULL OR e.breaker_open_until <= now())
          AND EXISTS (SELECT 1 FROM postbox.outbox o
                      WHERE o.endpoint_id = e.id AND o.status = 'pending' AND o.next_attempt_at <= now())
        ORDER BY e.last_claimed_at NULLS FIRST
        -- A few endpoints per claim: concurrent workers then lock different
        -- endpoints instead of skipping each other's whole batch.
        LIMIT least(max_rows, max_endpoints)
        FOR UPDATE SKIP LOCKED
    ) l;
    IF eps IS NULL THEN
        RETURN;
    END IF;
    share := greatest(1, ceil(max_rows::numeric / cardinality(eps)))::int;

    RETURN QUERY
    WITH ep AS (
        SELECT e.id, e.url, e.secret, e.breaker_open_until IS NOT NULL AS probing,
               postbox.rate_window(e.rate_counts, e.rate_epoch, extract(epoch FROM now())::bigint) AS counts,
               e.max_in_flight, e.rate_per_minute
        FROM postbox.endpoints e WHERE e.id = ANY (eps)
    ), budget AS (
        SELECT ep.*, greatest(0, least(
                   share,
                   ep.max_in_flight - (SELECT count(*) FROM postbox.outbox f
                                       WHERE f.endpoint_id = ep.id AND f.locked_until > now()),
                   coalesce(ep.rate_per_minute - (SELECT sum(c) FROM unnest(ep.counts) c), share),
                   CASE WHEN ep.probing THEN 1 ELSE share END))::int AS n
        FROM ep
    ), due AS (
        SELECT d.* FROM budget b, LATERAL (
            SELECT o.id, o.endpoint_id, o.attempts AS prev_attempt, o.locked_by AS prev_owner,
                   o.last_attempt_at AS prev_started, o.attempts >= o.max_attempts AS exhausted
            FROM postbox.outbox o
            WHERE o.endpoint_id = b.id AND o.status = 'pending' AND o.next_attempt_at <= now()
              AND (o.ordering_key IS NULL OR NOT EXISTS (
                      SELECT 1 FROM postbox.outbox p
                      WHERE p.ordering_key = o.ordering_key AND p.status = 'pending' AND p.seq < o.seq))
            ORDER BY o.next_attempt_at
            LIMIT b.n
            FOR UPDATE OF o SKIP LOCKED
        ) d
        -- Fair shares are rounded up: never return more than asked for.
        LIMIT max_rows
    ), lost AS (
        INSERT INTO postbox.attempts (outbox_id, attempt, worker_id, started_at, duration_ms, error_kind, error)
        SELECT due.id, due.prev_attempt, due.prev_owner, coalesce(due.prev_started, now()),
               (extract(epoch FROM now() - coalesce(due.prev_started, now())) * 1000)::int,
               'other', 'lease expired: the worker stopped before recording an outcome'
        FROM due WHERE due.prev_owner IS NOT NULL AND due.prev_attempt > 0
        ON CONFLICT ON CONSTRAINT attempts_pkey DO NOTHING
    ), claimed AS (
        UPDATE postbox.outbox o
        SET attempts        = CASE WHEN due.exhausted THEN o.attempts ELSE o.attempts + 1 END,
            status          = CASE WHEN due.exhausted THEN 'failed' ELSE o.status END,
            last_error      = CASE WHEN due.exhausted
                                   THEN 'other: lease expired on the final attempt' ELSE o.last_error END,
            locked_by       = CASE WHEN due.exhausted THEN NULL ELSE claim.worker_id END,
            locked_until    = CASE WHEN due.exhausted THEN NULL ELSE now() + lease_ms * interval '1 millisecond' END,
            next_attempt_at = CASE WHEN due.exhausted THEN o.next_attempt_at
                                   ELSE now() + lease_ms * interval '1 millisecond' END,
            last_attempt_at = CASE WHEN due.exhausted THEN o.last_attempt_at ELSE now() END
        FROM due
        WHERE o.id = due.id
        RETURNING o.id, o.attempts, o.max_attempts, o.payload, o.endpoint_id, due.exhausted
    ), started AS (
        SELECT c.endpoint_id, count(*)::int AS n FROM claimed c WHERE NOT c.exhausted GROUP BY c.endpoint_id
    ), accounted AS (
        UPDATE postbox.endpoints e
        SET last_claimed_at    = now(),
            rate_epoch         = extract(epoch FROM now())::bigint,
            rate_counts        = CASE WHEN e.rate_per_minute IS NULL THEN NULL
                                      ELSE (SELECT array_prepend(b.counts[1] + s.n, b.counts[2:61])) END,
            breaker_open_until = CASE WHEN b.probing THEN now() + lease_ms * interval '1 millisecond'
                                      ELSE e.breaker_open_until END
        FROM started s JOIN budget b ON b.id = s.endpoint_id
        WHERE e.id = s.endpoint_id
    )
    SELECT c.id, c.attempts, c.max_attempts, c.payload, c.endpoint_id, b.url, b.secret, now()
    FROM claimed c JOIN budget b ON b.id = c.endpoint_id
    WHERE NOT c.exhausted;
END
$$;

INSERT INTO postbox.schema_migrations (version, description)
VALUES (2, 'flow control') ON CONFLICT (version) DO NOTHING;
