-- postbox 0008: a quick claim in front of the full one (and, at the end
-- of this file, has_due() asked in due order and no JIT in the dispatch
-- functions).
--
-- At a low rate every event is claimed on its own, right after its NOTIFY,
-- and the claim is most of the time between the application's commit and
-- the receiver's request. The full claim (postbox.claim, 0006) spends
-- about 0.6 ms of PostgreSQL time on a one-event claim: five statements,
-- each set up anew, and the PL/pgSQL that carries its decisions from one
-- to the next. Most of its steps exist for cases that a one-event claim
-- rarely meets: several endpoints to share a batch between, holds to
-- decide and record, events waiting behind their key, leases that expired
-- unrecorded.
--
-- postbox.claim_quick takes the same arguments and returns the same rows.
-- The worker calls it. It first tries the plain case, in two statements:
--
-- 1. Pick and lock. When no endpoint is due a look (no wake_at has come)
--    and the oldest max_rows + 1 new due events all belong to one endpoint,
--    lock that endpoint's state row (FOR UPDATE SKIP LOCKED, as the full
--    claim does). The full claim would pick that endpoint alone too. When
--    no new event is due and no endpoint is due a look, return nothing, as
--    the full claim would.
-- 2. Decide, lease and account, in one statement whose snapshot was taken
--    after the lock was granted (the rule of 0002). It acts only when the
--    endpoint is plain: enabled, not paused, breaker closed, no hold, no
--    look due, no lease that may have expired (so in_flight is exact, with
--    no recount), and room under max_in_flight and rate_per_minute. It reads
--    one past what it may take; it takes them only when every event read is
--    plain (no ordering key, not leased before) and either no more are due
--    or the batch, not a limit, is what stopped it.
--
-- In that case the full claim would make exactly the same decisions: the
-- same events (the oldest due ones, up to the same number), the same
-- leases, and the same accounting (in_flight plus the leases taken, the
-- earliest lease end, the rate window, no hold, wake_at the earliest lease
-- end, or now when more are due). Anything else returns no row from step 2
-- and the full claim runs, in the same transaction, with the state row
-- already held by it. tests/plain_claim.rs plays random sequences of
-- claims, outcomes and operator changes and checks, at every claim, that
-- both give the same result.

CREATE FUNCTION postbox.claim_quick(worker_id text, max_rows integer, lease_ms bigint)
RETURNS TABLE (id uuid, attempt integer, max_attempts integer, payload jsonb, endpoint_id bigint,
               url text, secret text, claimed_at timestamptz, retry_schedule jsonb)
LANGUAGE plpgsql VOLATILE
-- As the full claim (see 0002): one plan per statement and connection, on
-- the indexes.
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off AS $$
#variable_conflict use_column
DECLARE
    lease interval := lease_ms * interval '1 millisecond';
    now_s bigint := floor(extract(epoch FROM now()))::bigint;
    eid bigint;
    work boolean;
BEGIN
    PERFORM postbox.bookkeeping_commit();
    SELECT (SELECT s.endpoint_id FROM postbox.endpoint_state s
            WHERE s.endpoint_id = u.one AND NOT w.due
            FOR UPDATE OF s SKIP LOCKED),
           u.found OR w.due
    INTO eid, work
    FROM (SELECT CASE WHEN min(n.endpoint_id) = max(n.endpoint_id) THEN min(n.endpoint_id) END AS one,
                 count(*) > 0 AS found
          FROM (SELECT o.endpoint_id FROM postbox.outbox o
                WHERE o.status = 'pending' AND NOT o.noticed AND o.next_attempt_at <= now()
                ORDER BY o.next_attempt_at LIMIT max_rows + 1) n) u,
         (SELECT EXISTS (SELECT 1 FROM postbox.endpoint_state d WHERE d.wake_at <= now()) AS due) w;
    -- Nothing new is due and no endpoint is due a look: the full claim
    -- would return nothing too.
    IF NOT work THEN
        RETURN;
    END IF;

    IF eid IS NOT NULL AND max_rows > 0 THEN
        RETURN QUERY
        WITH ep AS (
            SELECT e.url, e.secret, e.rate_per_minute AS rate, w.counts,
                   -- The endpoint's own retry schedule in seconds (NULL = the worker's).
                   (SELECT jsonb_agg(extract(epoch FROM d) ORDER BY i)
                    FROM unnest(e.retry_schedule) WITH ORDINALITY AS r(d, i)) AS schedule,
                   -- How many more it may take now, by its limits.
                   least(e.max_in_flight - s.in_flight,
                         e.rate_per_minute - (SELECT sum(x)::int FROM unnest(w.counts) x)) AS room
            FROM postbox.endpoint_state s
            JOIN postbox.endpoints e ON e.id = s.endpoint_id
            CROSS JOIN LATERAL (SELECT CASE WHEN e.rate_per_minute IS NOT NULL
                                            THEN postbox.rate_window(s.rate_counts, s.rate_epoch, now_s) END
                                       AS counts) w
            WHERE s.endpoint_id = eid
              AND s.hold IS NULL AND e.disabled_at IS NULL
              AND NOT coalesce(s.paused_until > now(), false)
              AND s.breaker_open_until IS NULL
              AND NOT coalesce(s.wake_at <= now(), false)
              AND NOT coalesce(s.lease_check_at <= now(), false)
        ), lim AS (
            SELECT ep.room, least(max_rows, ep.room) AS n FROM ep WHERE ep.room > 0
        ), cand AS (
            SELECT o.id, o.next_attempt_at, o.seq, o.ordering_key IS NULL AND o.locked_by IS NULL AS plain
            FROM postbox.outbox o
            WHERE o.endpoint_id = eid AND o.status = 'pending' AND o.next_attempt_at <= now()
            ORDER BY o.next_attempt_at
            LIMIT coalesce((SELECT lim.n + 1 FROM lim), 0)
            FOR UPDATE OF o SKIP LOCKED
        ), go AS (
            SELECT lim.n, r.looked > lim.n AS more
            FROM lim, (SELECT count(*) AS looked, coalesce(bool_and(c.plain), true) AS plain FROM cand c) r
            WHERE r.plain
              -- More are due and a limit stopped it: the full claim decides the hold.
              AND (r.looked <= lim.n OR lim.n < lim.room)
        ), claimed AS (
            UPDATE postbox.outbox o
            SET attempts = o.attempts + 1, locked_by = claim_quick.worker_id, locked_until = now() + lease,
                next_attempt_at = now() + lease, last_attempt_at = now(), noticed = true
            WHERE o.id = ANY (ARRAY(SELECT c.id FROM cand c ORDER BY c.next_attempt_at, c.seq
                                    LIMIT coalesce((SELECT go.n FROM go), 0)))
            RETURNING o.id, o.attempts, o.max_attempts, o.payload
        ), acct AS (
            UPDATE postbox.endpoint_state s
            SET in_flight      = s.in_flight + t.started,
                lease_check_at = least(s.lease_check_at, now() + lease),
                rate_epoch     = now_s,
                rate_counts    = CASE WHEN ep.rate IS NOT NULL
                                      THEN array_prepend(ep.counts[1] + t.started, ep.counts[2:61]) END,
                -- More due (the batch is full): look again now; otherwise when
                -- the earliest lease ends (to take back any that expire
                -- unrecorded).
                wake_at        = CASE WHEN (SELECT go.more FROM go) THEN now()
                                      ELSE least(s.lease_check_at, now() + lease) END
            FROM ep, (SELECT count(*)::int AS started FROM claimed) t
            WHERE s.endpoint_id = eid AND t.started > 0
        )
        SELECT c.id, c.attempts, c.max_attempts, c.payload, eid, ep.url, ep.secret, now(), ep.schedule
        FROM claimed c, ep;
        IF FOUND THEN
            RETURN;
        END IF;
    END IF;

    RETURN QUERY SELECT * FROM postbox.claim(worker_id, max_rows, lease_ms);
END
$$;

-- Is anything due (worker --until-empty asks before it exits)? The same
-- question as 0002's, asked so that the new-event test reads the partial
-- index in due order and stops at the first row. Asked as a plain EXISTS,
-- PostgreSQL chose from the statistics of the last ANALYZE: after a bulk
-- enqueue they say most of the outbox is new, so it read the whole table
-- (9–13 ms for 20,000 delivered events here, and a full scan of a large
-- outbox in production until the next ANALYZE).
CREATE OR REPLACE FUNCTION postbox.has_due() RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM (SELECT o.next_attempt_at FROM postbox.outbox o
                                  WHERE o.status = 'pending' AND NOT o.noticed AND o.next_attempt_at <= now()
                                  ORDER BY o.next_attempt_at LIMIT 1) n)
        OR EXISTS (SELECT 1 FROM postbox.endpoint_state s
                   WHERE s.wake_at <= now() OR s.hold IN ('capacity', 'rate'))
$$;

-- No JIT in the functions that turn sequential scans off. They do so to
-- keep every statement on its index, but a plan that has to scan a table
-- anyway then costs over 10^10, far past jit_above_cost, and compiling it
-- takes 100–230 ms on every execution (measured on endpoint_state after a
-- drain: 233 ms with JIT, 0.035 ms without). Their statements are short;
-- JIT never pays for itself there.
ALTER FUNCTION postbox.claim(text, integer, bigint) SET jit = off;
ALTER FUNCTION postbox.claim_quick(text, integer, bigint) SET jit = off;
ALTER FUNCTION postbox.record(text, uuid[], integer[], text[], double precision[], integer[], text[], text[],
                              timestamptz[], integer[], text[], double precision[], integer, double precision,
                              double precision) SET jit = off;
ALTER FUNCTION postbox.release(text, uuid[], integer[]) SET jit = off;

INSERT INTO postbox.schema_migrations (version, description)
VALUES (8, 'plain_claim') ON CONFLICT (version) DO NOTHING;
