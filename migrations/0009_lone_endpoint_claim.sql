-- postbox 0009: the quick claim also serves the endpoint that is due a look
-- when it is the only endpoint with work.
--
-- The quick claim of 0008 stepped aside whenever some endpoint was due a
-- look (wake_at come). But a claim that leases a full batch while more
-- events are due sets its endpoint's wake_at to now, so that the next claim
-- looks at it first; with one busy endpoint, every claim after the first
-- of a backlog therefore took the full way (210 of 214 claims of a
-- 20,000-event drain, measured with track_functions).
--
-- Here step 1 reads, beside the oldest max_rows + 1 new due events, the two
-- endpoints due a look the soonest, and locks the endpoint when all of them
-- are one endpoint: the full claim would pick it alone too (it reads the
-- same two lists in the same order, and the endpoint is first in both).
-- Step 2 then accepts a due wake_at and writes it back as the full claim
-- does: when more events are due and the endpoint was due within the last
-- second, wake_at keeps its value (an unchanged indexed column keeps the
-- update HOT); otherwise now when more are due, or the earliest lease end.
-- When that endpoint's state row is locked (an outcome being recorded, or
-- another worker's claim), step 1 waits for it, for at most 50 ms, instead
-- of handing over to the full claim, which would find it locked too and
-- poll for it every millisecond (16–27 such hand-overs in a 20,000-event
-- drain; none with the wait).
-- Every other rule of 0008 stands: a hold, a pause, an open breaker, a
-- lease that may have expired, a limit that stops it with more due, an
-- ordering key or a lease taken back all go to the full claim.
-- tests/plain_claim.rs compares both claims on random sequences, as before.

CREATE OR REPLACE FUNCTION postbox.claim_quick(worker_id text, max_rows integer, lease_ms bigint)
RETURNS TABLE (id uuid, attempt integer, max_attempts integer, payload jsonb, endpoint_id bigint,
               url text, secret text, claimed_at timestamptz, retry_schedule jsonb)
LANGUAGE plpgsql VOLATILE
-- As the full claim (see 0002 and 0008): one plan per statement and
-- connection, on the indexes, without JIT.
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET jit = off AS $$
#variable_conflict use_column
DECLARE
    lease interval := lease_ms * interval '1 millisecond';
    now_s bigint := floor(extract(epoch FROM now()))::bigint;
    eid bigint;
    work boolean;
    lone bigint;
    waited text;
BEGIN
    PERFORM postbox.bookkeeping_commit();
    SELECT (SELECT s.endpoint_id FROM postbox.endpoint_state s
            WHERE s.endpoint_id = u.one
            FOR UPDATE OF s SKIP LOCKED),
           u.found, u.one
    INTO eid, work, lone
    FROM (SELECT CASE WHEN min(c.endpoint_id) = max(c.endpoint_id) THEN min(c.endpoint_id) END AS one,
                 count(*) > 0 AS found
          FROM ((SELECT o.endpoint_id FROM postbox.outbox o
                 WHERE o.status = 'pending' AND NOT o.noticed AND o.next_attempt_at <= now()
                 ORDER BY o.next_attempt_at LIMIT max_rows + 1)
                UNION ALL
                (SELECT d.endpoint_id FROM postbox.endpoint_state d
                 WHERE d.wake_at <= now()
                 ORDER BY d.wake_at LIMIT 2)) c) u;
    -- Nothing new is due and no endpoint is due a look: the full claim
    -- would return nothing too.
    IF NOT work THEN
        RETURN;
    END IF;
    -- The lone endpoint's state row is held: by an outcome being recorded
    -- or another worker's claim, both a few milliseconds. Wait for it (at
    -- most 50 ms, as long as the full claim polls) rather than hand over to
    -- the full claim, which would find the same row locked and poll for it.
    -- Nothing else is held while waiting, so the wait closes no cycle.
    IF eid IS NULL AND lone IS NOT NULL THEN
        waited := current_setting('lock_timeout');
        BEGIN
            PERFORM set_config('lock_timeout', '50ms', true);
            SELECT s.endpoint_id INTO eid FROM postbox.endpoint_state s
            WHERE s.endpoint_id = lone
            FOR UPDATE OF s;
        EXCEPTION WHEN lock_not_available THEN
            eid := NULL;
        END;
        PERFORM set_config('lock_timeout', waited, true);
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
                wake_at        = CASE
                    -- More due, and due a look within the last second: keep
                    -- it (as the full claim does).
                    WHEN (SELECT go.more FROM go) AND s.wake_at <= now() AND s.wake_at > now() - interval '1 second'
                        THEN s.wake_at
                    -- More due (the batch is full): look again now.
                    WHEN (SELECT go.more FROM go) THEN now()
                    -- Otherwise when the earliest lease ends (to take back
                    -- any that expire unrecorded).
                    ELSE least(s.lease_check_at, now() + lease)
                    END
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

INSERT INTO postbox.schema_migrations (version, description)
VALUES (9, 'lone_endpoint_claim') ON CONFLICT (version) DO NOTHING;
