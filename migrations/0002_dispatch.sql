-- postbox 0002: dispatch. The lease protocol as SQL functions: claim,
-- record, release, prune, and what wakes a worker.
--
-- The concurrency argument, once (docs/dispatch.md has the row states and
-- each invariant with its test):
--
-- * Application transactions only INSERT into postbox.outbox (and, for a new
--   callback URL, postbox.endpoints). Their foreign key takes FOR KEY SHARE
--   on the endpoint row; no worker statement ever locks an endpoints row
--   more strongly than FOR NO KEY UPDATE (an UPDATE of non-key columns), and
--   workers keep their accounting in postbox.endpoint_state, which
--   application transactions never lock. So an open application
--   transaction never makes a claim skip or wait, and a claim never makes an
--   enqueue wait. Writers of one ordering key take turns on an advisory lock
--   that workers never take.
-- * Every dispatch decision about an endpoint is made while holding that
--   endpoint's endpoint_state row lock, by a statement whose snapshot was
--   taken after the lock was granted (a new statement in these VOLATILE
--   functions): claims (FOR UPDATE SKIP LOCKED, never waiting), outcomes and
--   releases (an UPDATE of the row, waiting a claim out), the ordering-key
--   trigger and the wake-up triggers. Whoever changes what a claim decides
--   on (a freed lease, a finished key head, a re-enabled endpoint) therefore
--   either commits before the claim's snapshot or updates the state row
--   after the claim, and then wakes it.
-- * New work is found without the enqueue touching any shared row: a new
--   event is "unnoticed" (noticed = false) and sits in a small index that
--   claims read first. A claim either takes an endpoint's events or, when the
--   endpoint cannot receive, marks them noticed and records in
--   endpoint_state.wake_at when the endpoint is worth looking at again. An
--   endpoint that cannot receive therefore costs a claim nothing, however
--   many events wait for it.
-- * A claimed row is leased: attempts + 1, locked_by, locked_until, and
--   next_attempt_at = the lease end, so it is not due while leased and due
--   again by itself if the worker dies. Outcomes are fenced on (attempts,
--   locked_by); only a 2xx may be recorded late (it is the truth about the
--   event, never a failure).

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

-- When a full rate window (counts as of second now_s) next frees a start:
-- the second after its oldest start leaves the 61-second window.
CREATE FUNCTION postbox.rate_free_at(counts integer[], now_s bigint) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT to_timestamp(now_s - max(i) + 62)
    FROM generate_subscripts(counts, 1) AS i WHERE counts[i] > 0
$$;

-- Wake-ups. An endpoint whose settings change (re-enabled, limits raised) is
-- looked at again at once; so is one whose pause or breaker an operator
-- clears or shortens. Plain SQL on the documented columns is enough.
CREATE FUNCTION postbox.endpoint_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Only an endpoint that is held can be released by this; one that is
    -- not finds its events through claims as usual.
    UPDATE postbox.endpoint_state SET wake_at = now() WHERE endpoint_id = NEW.id AND hold IS NOT NULL;
    IF FOUND THEN
        PERFORM postbox.wake_workers();
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER endpoint_changed AFTER UPDATE ON postbox.endpoints FOR EACH ROW
    WHEN (OLD.disabled_at IS DISTINCT FROM NEW.disabled_at
          OR OLD.max_in_flight IS DISTINCT FROM NEW.max_in_flight
          OR OLD.rate_per_minute IS DISTINCT FROM NEW.rate_per_minute)
    EXECUTE FUNCTION postbox.endpoint_changed();

CREATE FUNCTION postbox.endpoint_hold_relaxed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.wake_at := now();
    PERFORM postbox.wake_workers();
    RETURN NEW;
END
$$;
CREATE TRIGGER endpoint_hold_relaxed BEFORE UPDATE ON postbox.endpoint_state FOR EACH ROW
    WHEN ((OLD.paused_until IS NOT NULL AND (NEW.paused_until IS NULL OR NEW.paused_until < OLD.paused_until))
          OR (OLD.breaker_open_until IS NOT NULL
              AND (NEW.breaker_open_until IS NULL OR NEW.breaker_open_until < OLD.breaker_open_until)))
    EXECUTE FUNCTION postbox.endpoint_hold_relaxed();

-- An event made due sooner (a lease ended by hand included), or made
-- pending again (a replay), by anything but a worker becomes unnoticed, so
-- claims find it. Workers set `noticed` themselves whenever they make an
-- event due sooner, so this never fires for them.
CREATE FUNCTION postbox.event_renewed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.noticed := false;
    PERFORM postbox.wake_workers();
    RETURN NEW;
END
$$;
CREATE TRIGGER event_renewed BEFORE UPDATE ON postbox.outbox FOR EACH ROW
    WHEN (NEW.status = 'pending' AND NEW.noticed
          AND (OLD.status <> 'pending' OR NEW.next_attempt_at < OLD.next_attempt_at))
    EXECUTE FUNCTION postbox.event_renewed();

-- Ordering keys: when the head of a key stops being pending (delivered,
-- failed, cancelled or deleted, by a worker or by hand), the next event of
-- that endpoint and key is due. Claims park events that wait behind their
-- key's head (next_attempt_at = 'infinity'); this trigger, holding the
-- endpoint's state row, unparks the next one.
CREATE FUNCTION postbox.key_head_done() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM postbox.endpoint_state s WHERE s.endpoint_id = OLD.endpoint_id FOR NO KEY UPDATE;
    UPDATE postbox.outbox o SET next_attempt_at = now(), noticed = false
    WHERE o.id = (SELECT n.id FROM postbox.outbox n
                  WHERE n.endpoint_id = OLD.endpoint_id AND n.ordering_key = OLD.ordering_key
                    AND n.status = 'pending'
                  ORDER BY n.seq LIMIT 1)
      AND o.next_attempt_at = 'infinity';
    IF FOUND THEN
        PERFORM postbox.wake_workers();
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER key_head_done AFTER UPDATE OF status ON postbox.outbox FOR EACH ROW
    WHEN (OLD.status = 'pending' AND NEW.status <> 'pending' AND OLD.ordering_key IS NOT NULL)
    EXECUTE FUNCTION postbox.key_head_done();
CREATE TRIGGER key_head_deleted AFTER DELETE ON postbox.outbox FOR EACH ROW
    WHEN (OLD.status = 'pending' AND OLD.ordering_key IS NOT NULL)
    EXECUTE FUNCTION postbox.key_head_done();

-- Workers' own transactions (claims, outcomes, releases) commit without
-- waiting for the WAL flush unless postbox.worker_synchronous_commit is on
-- (ALTER DATABASE … SET postbox.worker_synchronous_commit = on). Nothing an
-- application wrote depends on them: if the server crashes, the last
-- fraction of a second of that bookkeeping may be lost, and then a lease
-- comes back (the event is delivered again, as at-least-once allows) or an
-- outcome is recorded again by a later attempt. Events themselves are
-- committed by the application with its own settings. In exchange a worker
-- holds an endpoint's state row for the statement only, not for a disk flush.
CREATE FUNCTION postbox.bookkeeping_commit() RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT set_config('synchronous_commit',
                      CASE WHEN coalesce(current_setting('postbox.worker_synchronous_commit', true), '')
                                IN ('on', 'true', '1', 'yes')
                           THEN current_setting('synchronous_commit') ELSE 'off' END,
                      true)
$$;

-- Claims up to max_rows deliverable events for worker_id, leased for
-- lease_ms. Returns nothing only when nothing is deliverable now (or every
-- endpoint with work is locked by another worker for longer than a moment).
--
-- Each round: (1) pick endpoints worth serving, oldest need first: those
-- whose wake_at has come and those with unnoticed due events, and lock
-- their state rows FOR UPDATE SKIP LOCKED. (2) Then, endpoint by endpoint,
-- in statements whose snapshots see everything committed before those
-- locks: decide whether it may receive (disabled, paused, breaker open or
-- probing, in-flight and rate limits) and how many events it may take (also
-- a fair share of max_rows); take that many due events, oldest first,
-- skipping events behind the head of their ordering key (and parking those);
-- lease them; fail rows whose final lease expired; if it is held, mark its
-- new events noticed; and write its accounting and next wake_at. Rounds
-- repeat while they make progress and the batch is not full, so endpoints
-- that cannot receive are moved out of the way within one call. Every
-- statement is driven by a key (an endpoint id or event ids), so its plan
-- does not depend on table statistics.
CREATE FUNCTION postbox.claim(worker_id text, max_rows integer, lease_ms bigint)
RETURNS TABLE (id uuid, attempt integer, max_attempts integer, payload jsonb, endpoint_id bigint,
               url text, secret text, claimed_at timestamptz, retry_schedule jsonb)
LANGUAGE plpgsql VOLATILE
-- One plan per statement, made once per connection, and made with the
-- indexes whatever the statistics said then (a plan made while the outbox
-- was nearly empty must not scan it whole once it is not).
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off AS $$
#variable_conflict use_column
DECLARE
    lease interval := lease_ms * interval '1 millisecond';
    now_s bigint := floor(extract(epoch FROM now()))::bigint;
    began timestamptz := clock_timestamp();
    eps bigint[];
    ep record;
    got integer := 0;
    round_got integer;
    moved integer;
    share integer;
    -- per endpoint
    flying integer;
    lease_check timestamptz;
    counts integer[];
    used integer;
    due boolean;
    held text;
    n integer;
    started integer;
    new_leases integer;
    expired integer;
    looked integer;
    heads integer;
    waiting integer;
    more boolean;
    k integer;
    r_ids uuid[];
    r_attempts integer[];
    r_max integer[];
    r_payloads jsonb[];
    c_ids uuid[] := '{}';
    c_attempts integer[] := '{}';
    c_max integer[] := '{}';
    c_payloads jsonb[] := '{}';
    c_eids bigint[] := '{}';
    c_urls text[] := '{}';
    c_secrets text[] := '{}';
    c_schedules jsonb[] := '{}';
    sync text;
    eps_seen integer;
    any_more boolean;
BEGIN
    sync := postbox.bookkeeping_commit();
    LOOP
        SELECT array_agg(l.endpoint_id ORDER BY l.since) INTO eps FROM (
            SELECT s.endpoint_id, b.since
            FROM (SELECT c.endpoint_id, min(c.since) AS since FROM (
                      (SELECT w.endpoint_id, w.wake_at AS since FROM postbox.endpoint_state w
                       WHERE w.wake_at <= now() ORDER BY w.wake_at LIMIT max_rows - got)
                      UNION ALL
                      (SELECT o.endpoint_id, o.next_attempt_at FROM postbox.outbox o
                       WHERE o.status = 'pending' AND NOT o.noticed AND o.next_attempt_at <= now()
                       ORDER BY o.next_attempt_at LIMIT max_rows - got)) c
                  GROUP BY c.endpoint_id ORDER BY min(c.since) LIMIT max_rows - got) b
            JOIN postbox.endpoint_state s ON s.endpoint_id = b.endpoint_id
            FOR UPDATE OF s SKIP LOCKED) l;
        IF eps IS NULL THEN
            -- Every endpoint with work is locked by another worker's claim or
            -- outcome (statements of a few milliseconds): wait a moment
            -- rather than return nothing while something is deliverable.
            EXIT WHEN got > 0 OR clock_timestamp() - began > interval '50 milliseconds'
                      OR NOT EXISTS (SELECT 1 FROM postbox.endpoint_state w WHERE w.wake_at <= now())
                         AND NOT EXISTS (SELECT 1 FROM postbox.outbox o
                                         WHERE o.status = 'pending' AND NOT o.noticed AND o.next_attempt_at <= now());
            PERFORM pg_sleep(0.001);
            CONTINUE;
        END IF;

        round_got := 0;
        moved := 0;
        any_more := false;
        eps_seen := max_rows - got;
        -- A fair share of the batch, but at least a few events: an endpoint
        -- visited for a single event costs as much as one visited for ten.
        -- The endpoints left out are first in line at the next claim.
        share := greatest(least(10, max_rows - got), ceil((max_rows - got)::numeric / cardinality(eps)))::int;
        FOR ep IN
            SELECT s.endpoint_id AS eid, s.in_flight, s.lease_check_at, s.rate_counts, s.rate_epoch,
                   s.paused_until, s.breaker_open_until, s.probe_until,
                   e.url, e.secret, e.max_in_flight, e.rate_per_minute, e.disabled_at,
                   -- The endpoint's own retry schedule in seconds (NULL = the worker's).
                   (SELECT jsonb_agg(extract(epoch FROM d) ORDER BY i)
                    FROM unnest(e.retry_schedule) WITH ORDINALITY AS r(d, i)) AS schedule
            FROM unnest(eps) WITH ORDINALITY AS l(eid, ord)
            JOIN postbox.endpoint_state s ON s.endpoint_id = l.eid
            JOIN postbox.endpoints e ON e.id = l.eid
            ORDER BY l.ord
        LOOP
            -- The batch is full: leave the remaining endpoints as they are
            -- (still due; the next claim takes them first).
            CONTINUE WHEN got >= max_rows;
            -- The counter is exact but for leases that expired unrecorded:
            -- recount when it would hold the endpoint back, or when a lease
            -- may have expired.
            flying := ep.in_flight;
            lease_check := ep.lease_check_at;
            IF flying >= ep.max_in_flight OR lease_check <= now() THEN
                SELECT count(*)::int, min(f.locked_until) INTO flying, lease_check
                FROM postbox.outbox f
                WHERE f.endpoint_id = ep.eid AND f.status = 'pending'
                  AND f.next_attempt_at > now() AND f.locked_until > now();
            END IF;
            counts := CASE WHEN ep.rate_per_minute IS NOT NULL
                           THEN postbox.rate_window(ep.rate_counts, ep.rate_epoch, now_s) END;
            used := CASE WHEN ep.rate_per_minute IS NOT NULL THEN (SELECT sum(x)::int FROM unnest(counts) x) END;
            held := CASE
                WHEN ep.disabled_at IS NOT NULL THEN 'disabled'
                WHEN ep.paused_until > now() THEN 'paused'
                WHEN ep.breaker_open_until > now() THEN 'breaker'
                WHEN ep.breaker_open_until IS NOT NULL AND ep.probe_until > now() THEN 'probe'
                WHEN flying >= ep.max_in_flight THEN 'capacity'
                WHEN used >= ep.rate_per_minute THEN 'rate'
                END;
            -- A hold only counts for an endpoint with due events.
            IF held IS NOT NULL THEN
                due := (SELECT d.next_attempt_at FROM postbox.outbox d
                        WHERE d.endpoint_id = ep.eid AND d.status = 'pending'
                        ORDER BY d.next_attempt_at LIMIT 1) <= now();
                IF NOT coalesce(due, false) THEN
                    held := NULL;
                    due := false;
                END IF;
            ELSE
                due := true;
            END IF;
            n := CASE WHEN held IS NOT NULL OR NOT due THEN 0
                      ELSE least(share, max_rows - got, ep.max_in_flight - flying,
                                 coalesce(ep.rate_per_minute - used, share),
                                 CASE WHEN ep.breaker_open_until IS NOT NULL THEN 1 ELSE share END) END;
            started := 0; new_leases := 0; expired := 0; looked := 0; heads := 0; waiting := 0;
            r_ids := NULL;
            IF n > 0 THEN
                -- Due events, oldest first, one past the budget (to know
                -- whether more are due).
                WITH cand AS (
                    SELECT o.id, o.seq, o.next_attempt_at, o.attempts, o.max_attempts, o.locked_by,
                           o.last_attempt_at,
                           o.locked_by IS NOT NULL AND o.attempts >= o.max_attempts AS exhausted,
                           (o.ordering_key IS NULL OR NOT EXISTS (
                               SELECT 1 FROM postbox.outbox p
                               WHERE p.endpoint_id = o.endpoint_id AND p.ordering_key = o.ordering_key
                                 AND p.status = 'pending' AND p.seq < o.seq)) AS head
                    FROM postbox.outbox o
                    WHERE o.endpoint_id = ep.eid AND o.status = 'pending' AND o.next_attempt_at <= now()
                    ORDER BY o.next_attempt_at
                    LIMIT n + 1
                    FOR UPDATE OF o SKIP LOCKED
                ), chosen AS (
                    SELECT c.* FROM cand c WHERE c.head AND NOT c.exhausted
                    ORDER BY c.next_attempt_at, c.seq LIMIT n
                ), exhausted AS (
                    UPDATE postbox.outbox o
                    SET status = 'failed', locked_by = NULL, locked_until = NULL, noticed = true,
                        last_error = 'other: lease expired on the final attempt'
                    WHERE o.id = ANY (ARRAY(SELECT c.id FROM cand c WHERE c.exhausted))
                    RETURNING o.id
                ), lost AS (
                    INSERT INTO postbox.attempts (outbox_id, attempt, worker_id, started_at, duration_ms,
                                                  error_kind, error)
                    SELECT c.id, c.attempts, c.locked_by, coalesce(c.last_attempt_at, now()),
                           (extract(epoch FROM now() - coalesce(c.last_attempt_at, now())) * 1000)::int,
                           'other', 'lease expired: the worker stopped before recording an outcome'
                    FROM cand c
                    WHERE c.locked_by IS NOT NULL AND c.attempts > 0
                      AND (c.exhausted OR c.id IN (SELECT ch.id FROM chosen ch))
                    ON CONFLICT ON CONSTRAINT attempts_pkey DO NOTHING
                ), claimed AS (
                    UPDATE postbox.outbox o
                    SET attempts = o.attempts + 1, locked_by = claim.worker_id, locked_until = now() + lease,
                        next_attempt_at = now() + lease, last_attempt_at = now(), noticed = true
                    FROM chosen c
                    WHERE o.id = ANY (ARRAY(SELECT ch.id FROM chosen ch)) AND o.id = c.id
                    RETURNING o.id, o.attempts, o.max_attempts, o.payload, c.locked_by IS NOT NULL AS relet
                )
                SELECT array_agg(c.id), array_agg(c.attempts), array_agg(c.max_attempts), array_agg(c.payload),
                       count(*)::int, (count(*) FILTER (WHERE NOT c.relet))::int,
                       (SELECT count(*) FROM exhausted)::int, (SELECT count(*) FROM cand)::int,
                       (SELECT count(*) FROM cand x WHERE x.head AND NOT x.exhausted)::int,
                       (SELECT count(*) FROM cand x WHERE NOT x.head AND x.locked_by IS NULL)::int
                INTO r_ids, r_attempts, r_max, r_payloads, started, new_leases, expired, looked, heads, waiting
                FROM claimed c;
                IF waiting > 0 THEN
                    -- Events behind the head of their key leave the due range
                    -- until the head is done (trigger key_head_done).
                    UPDATE postbox.outbox o SET noticed = true, next_attempt_at = 'infinity'
                    WHERE o.id = ANY (ARRAY(
                        SELECT q.id FROM postbox.outbox q
                        WHERE q.endpoint_id = ep.eid AND q.status = 'pending' AND q.next_attempt_at <= now()
                          AND q.ordering_key IS NOT NULL AND q.locked_by IS NULL
                          AND EXISTS (SELECT 1 FROM postbox.outbox h
                                      WHERE h.endpoint_id = q.endpoint_id AND h.ordering_key = q.ordering_key
                                        AND h.status = 'pending' AND h.seq < q.seq)
                        ORDER BY q.next_attempt_at LIMIT 1000
                        FOR UPDATE SKIP LOCKED));
                    GET DIAGNOSTICS k = ROW_COUNT;
                    moved := moved + k;
                END IF;
                IF r_ids IS NOT NULL THEN
                    c_ids := c_ids || r_ids;
                    c_attempts := c_attempts || r_attempts;
                    c_max := c_max || r_max;
                    c_payloads := c_payloads || r_payloads;
                    c_eids := c_eids || array_fill(ep.eid, ARRAY[started]);
                    c_urls := c_urls || array_fill(ep.url, ARRAY[started]);
                    c_secrets := c_secrets || array_fill(ep.secret, ARRAY[started]);
                    c_schedules := c_schedules || array_fill(ep.schedule, ARRAY[started]);
                    got := got + started;
                    round_got := round_got + started;
                END IF;
                moved := moved + expired;
            END IF;
            more := n > 0 AND (looked > n OR heads > started);
            any_more := any_more OR more;
            flying := flying + new_leases - expired;
            IF started > 0 AND ep.rate_per_minute IS NOT NULL THEN
                counts := array_prepend(counts[1] + started, counts[2:61]);
            END IF;
            IF held IS NULL AND more THEN
                held := CASE
                    WHEN flying >= ep.max_in_flight THEN 'capacity'
                    WHEN used + started >= ep.rate_per_minute THEN 'rate'
                    WHEN ep.breaker_open_until IS NOT NULL AND started > 0 THEN 'probe'
                    END;
            END IF;
            IF held IS NOT NULL AND waiting = 0 THEN
                -- A held endpoint's new events are noticed, so they stop
                -- showing up to claims; wake_at says when to look again.
                UPDATE postbox.outbox o SET noticed = true
                WHERE o.id = ANY (ARRAY(
                    SELECT u.id FROM postbox.outbox u
                    WHERE u.endpoint_id = ep.eid AND u.status = 'pending' AND NOT u.noticed
                      AND u.next_attempt_at <= now() AND u.locked_by IS NULL
                    ORDER BY u.next_attempt_at LIMIT 5000
                    FOR UPDATE SKIP LOCKED));
                GET DIAGNOSTICS k = ROW_COUNT;
                moved := moved + k;
            END IF;
            IF started > 0 THEN
                lease_check := least(lease_check, now() + lease);
            ELSIF flying <= 0 AND lease_check <= now() THEN
                lease_check := NULL;
            END IF;
            UPDATE postbox.endpoint_state s
            SET in_flight      = greatest(0, flying),
                lease_check_at = lease_check,
                rate_epoch     = now_s,
                rate_counts    = counts,
                probe_event    = CASE WHEN ep.breaker_open_until IS NOT NULL AND started > 0
                                      THEN r_ids[1] ELSE s.probe_event END,
                probe_until    = CASE WHEN ep.breaker_open_until IS NOT NULL AND started > 0
                                      THEN now() + lease ELSE s.probe_until END,
                hold           = held,
                wake_at        = CASE
                    -- Still due, and looked at within the last second: keep
                    -- the value. wake_at is indexed: leaving it alone keeps
                    -- this update (and an outcome's) a HOT update of a hot
                    -- row. Fairness rotates at that granularity.
                    WHEN held IS NULL AND more AND s.wake_at <= now() AND s.wake_at > now() - interval '1 second'
                        THEN s.wake_at
                    ELSE (SELECT min(t) FROM unnest(ARRAY[
                             CASE held
                                 WHEN 'paused' THEN ep.paused_until
                                 WHEN 'breaker' THEN ep.breaker_open_until
                                 WHEN 'probe' THEN CASE WHEN started > 0 THEN now() + lease
                                                        ELSE ep.probe_until END
                                 WHEN 'rate' THEN postbox.rate_free_at(counts, now_s)
                                 WHEN 'capacity' THEN now() + lease
                                 WHEN 'disabled' THEN NULL
                                 ELSE CASE WHEN more THEN now() END
                             END,
                             -- Leases end: wake to take back any that expire unrecorded.
                             lease_check]) t)
                    END
            WHERE s.endpoint_id = ep.eid;
        END LOOP;

        got := cardinality(c_ids);
        -- Another round while this one made progress (took events, or moved
        -- held or key-blocked events out of the way) and the batch has room;
        -- a claim that has worked for 200 ms returns what it has (the
        -- worker claims again at once).
        EXIT WHEN got >= max_rows OR (round_got = 0 AND moved = 0)
                  -- every candidate was served and none has more
                  OR (NOT any_more AND moved = 0 AND cardinality(eps) < eps_seen)
                  OR clock_timestamp() - began > interval '200 milliseconds';
    END LOOP;

    RETURN QUERY
    SELECT u.id, u.attempt, u.max_attempts, u.payload, u.endpoint_id, u.url, u.secret, now(), u.schedule
    FROM unnest(c_ids, c_attempts, c_max, c_payloads, c_eids, c_urls, c_secrets, c_schedules)
         AS u(id, attempt, max_attempts, payload, endpoint_id, url, secret, schedule);
END
$$;

-- Records finished attempts (one array element each) for worker_id and
-- returns the ids recorded. kind is delivered, retry, failed or gone;
-- delay_s the retry delay; pause_s a Retry-After pause for the endpoint
-- (0 = none, and then a 429/503 counts as a failure for the breaker).
--
-- The fence: an outcome is applied only while the row is pending, leased
-- by worker_id, at the attempt it claimed. A 2xx is the exception: it is
-- recorded whenever the row is pending or failed and no other lease on it
-- is running, because a receiver's acknowledgement is never a failure (a
-- late 2xx for a row another worker holds is logged, and that worker's
-- outcome then finds it). Then, holding each endpoint's state row: leases
-- are given back, a Retry-After pauses the endpoint, the breaker counts
-- distinct failing events and opens, only a failed probe doubles its
-- cool-down, any success closes it, and 410 Gone disables the endpoint.
CREATE FUNCTION postbox.record(
    worker_id text, ids uuid[], attempts integer[], kinds text[], delays_s double precision[],
    status_codes integer[], error_kinds text[], errors text[], started_ats timestamptz[],
    durations_ms integer[], response_bodies text[], pauses_s double precision[],
    breaker_threshold integer, breaker_cooldown_s double precision, breaker_max_cooldown_s double precision)
RETURNS SETOF uuid
LANGUAGE plpgsql VOLATILE
-- One plan per statement, made once per connection, with the indexes (see
-- postbox.claim).
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off AS $$
#variable_conflict use_column
DECLARE
    d_ids uuid[];
    d_eids bigint[];
    d_kinds text[];
    d_failure boolean[];
    d_cleared boolean[];
    d_pause double precision[];
    sync text;
    held boolean;
BEGIN
    sync := postbox.bookkeeping_commit();
    WITH r AS (
        SELECT * FROM unnest(record.ids, record.attempts, record.kinds, record.delays_s, record.status_codes,
                             record.error_kinds, record.errors, record.started_ats, record.durations_ms,
                             record.response_bodies, record.pauses_s)
            AS r(id, attempt, kind, delay_s, status_code, error_kind, error, started_at, duration_ms,
                 response_body, pause_s)
    ), k AS (
        -- A failure after an earlier attempt was acknowledged: the event was delivered.
        SELECT r.*, CASE WHEN r.kind IN ('retry', 'failed') AND EXISTS (
                             SELECT 1 FROM postbox.attempts a
                             WHERE a.outbox_id = r.id AND a.status_code BETWEEN 200 AND 299)
                         THEN 'delivered' ELSE r.kind END AS eff
        FROM r
    ), done AS (
        UPDATE postbox.outbox o
        SET status           = CASE k.eff WHEN 'delivered' THEN 'delivered' WHEN 'failed' THEN 'failed'
                                          ELSE 'pending' END,
            next_attempt_at  = CASE k.eff WHEN 'retry' THEN now() + k.delay_s * interval '1 second'
                                          WHEN 'gone' THEN now() ELSE o.next_attempt_at END,
            -- A retried event is found again by claims when it is due.
            noticed          = k.eff NOT IN ('retry', 'gone'),
            max_attempts     = CASE WHEN k.eff = 'gone' THEN greatest(o.max_attempts, o.attempts + 1)
                                    ELSE o.max_attempts END,
            delivered_at     = CASE WHEN k.eff = 'delivered' THEN now() ELSE o.delivered_at END,
            locked_by        = NULL,
            locked_until     = NULL,
            last_status_code = k.status_code,
            last_error       = CASE WHEN k.eff = 'delivered' OR k.error_kind IS NULL THEN NULL
                                    ELSE k.error_kind || ': ' || coalesce(k.error, '') END
        FROM k JOIN postbox.outbox prev ON prev.id = k.id
        WHERE o.id = k.id
          AND ((o.status = 'pending' AND o.attempts = k.attempt AND o.locked_by = record.worker_id)
               OR (k.kind = 'delivered' AND o.status IN ('pending', 'failed')
                   AND (o.locked_until IS NULL OR o.locked_until <= now())))
        RETURNING o.id, o.endpoint_id, k.eff,
                  k.eff IN ('retry', 'failed') AND coalesce(k.error_kind, '') <> 'blocked'
                      AND NOT (k.status_code IN (429, 503) AND k.pause_s > 0) AS failure,
                  prev.locked_by IS NOT NULL AS cleared, k.pause_s
    ), logged AS (
        INSERT INTO postbox.attempts AS a (outbox_id, attempt, worker_id, started_at, duration_ms, status_code,
                                           error_kind, error, response_body)
        SELECT r.id, r.attempt, record.worker_id, r.started_at, r.duration_ms, r.status_code, r.error_kind,
               r.error, r.response_body
        FROM r
        WHERE r.id IN (SELECT d.id FROM done d)
           OR (r.kind = 'delivered' AND EXISTS (SELECT 1 FROM postbox.outbox x WHERE x.id = r.id))
        -- A late outcome replaces the "lease expired" entry written when the lease was taken back.
        ON CONFLICT (outbox_id, attempt) DO UPDATE
        SET worker_id = EXCLUDED.worker_id, started_at = EXCLUDED.started_at, duration_ms = EXCLUDED.duration_ms,
            status_code = EXCLUDED.status_code, error_kind = EXCLUDED.error_kind, error = EXCLUDED.error,
            response_body = EXCLUDED.response_body
    )
    SELECT array_agg(d.id), array_agg(d.endpoint_id), array_agg(d.eff), array_agg(d.failure),
           array_agg(d.cleared), array_agg(d.pause_s)
    INTO d_ids, d_eids, d_kinds, d_failure, d_cleared, d_pause
    FROM done d;

    IF d_ids IS NULL THEN
        RETURN;
    END IF;

    -- 410 Gone: the endpoint is disabled (its events stay pending).
    IF 'gone' = ANY (d_kinds) THEN
        UPDATE postbox.endpoints e
        SET disabled_at = now(), disabled_reason = '410 Gone'
        WHERE e.id IN (SELECT x.eid FROM unnest(d_eids, d_kinds) AS x(eid, kind) WHERE x.kind = 'gone')
          AND e.disabled_at IS NULL;
    END IF;

    -- Every endpoint touched is written (never skipped), so a claim deciding
    -- on it either saw these outcomes or is woken by this update. Locked in
    -- id order: two workers' outcomes never deadlock.
    SELECT bool_or(l.hold IS NOT NULL) INTO held FROM (
        SELECT s.hold FROM postbox.endpoint_state s WHERE s.endpoint_id = ANY (d_eids)
        ORDER BY s.endpoint_id FOR NO KEY UPDATE) l;
    -- An endpoint that was held (at its limit, say) may take more now: wake
    -- idle workers, wherever they run.
    IF held THEN
        PERFORM postbox.wake_workers();
    END IF;
    WITH d AS (
        SELECT * FROM unnest(d_ids, d_eids, d_kinds, d_failure, d_cleared, d_pause)
            AS d(id, eid, kind, failure, cleared, pause_s)
    ), per AS (
        SELECT d.eid,
               count(*) FILTER (WHERE d.cleared)::int AS cleared,
               bool_or(d.kind = 'delivered') AS ok,
               coalesce(array_agg(DISTINCT d.id) FILTER (WHERE d.failure), '{}') AS failed_ids,
               array_agg(d.id) AS all_ids,
               max(d.pause_s) AS pause_s
        FROM d GROUP BY d.eid
    ), b AS (
        SELECT s.endpoint_id, per.*,
               s.probe_event IS NOT NULL AND s.probe_event = ANY (per.failed_ids) AS probe_failed,
               s.probe_event IS NOT NULL AND s.probe_event = ANY (per.all_ids) AS probe_done,
               (SELECT count(DISTINCT x) FROM unnest(s.failing_events || per.failed_ids) x) AS failing,
               least(coalesce(s.breaker_cooldown * 2, breaker_cooldown_s * interval '1 second'),
                     breaker_max_cooldown_s * interval '1 second') AS doubled
        FROM postbox.endpoint_state s JOIN per ON per.eid = s.endpoint_id
    )
    UPDATE postbox.endpoint_state s
    SET in_flight          = greatest(0, s.in_flight - b.cleared),
        -- A held endpoint whose leases end may take more: look at it now.
        -- (Others are found through their new events; wake_at is indexed and
        -- left alone, so this stays a HOT update.)
        wake_at            = CASE WHEN s.hold IS NOT NULL AND (b.cleared > 0 OR b.ok)
                                  THEN least(s.wake_at, now()) ELSE s.wake_at END,
        hold               = CASE WHEN b.cleared > 0 THEN NULL ELSE s.hold END,
        paused_until       = CASE WHEN b.pause_s > 0
                                  THEN greatest(s.paused_until, now() + b.pause_s * interval '1 second')
                                  ELSE s.paused_until END,
        failing_events     = CASE WHEN b.ok THEN '{}'
                                  ELSE coalesce((SELECT (array_agg(DISTINCT x))[1:breaker_threshold]
                                                 FROM unnest(s.failing_events || b.failed_ids) x), '{}') END,
        breaker_open_until = CASE
            WHEN b.ok THEN NULL
            WHEN b.probe_failed THEN now() + b.doubled
            WHEN s.breaker_open_until IS NULL AND b.failing >= breaker_threshold
                THEN now() + breaker_cooldown_s * interval '1 second'
            ELSE s.breaker_open_until END,
        breaker_cooldown   = CASE
            WHEN b.ok THEN NULL
            WHEN b.probe_failed THEN b.doubled
            WHEN s.breaker_open_until IS NULL AND b.failing >= breaker_threshold
                THEN breaker_cooldown_s * interval '1 second'
            ELSE s.breaker_cooldown END,
        probe_event        = CASE WHEN b.ok OR b.probe_done THEN NULL ELSE s.probe_event END,
        probe_until        = CASE WHEN b.ok OR b.probe_done THEN NULL ELSE s.probe_until END
    FROM b
    WHERE s.endpoint_id = b.endpoint_id;

    RETURN QUERY SELECT unnest(d_ids);
END
$$;

-- Gives leases back without an outcome (deliveries cut short by shutdown):
-- the rows are due again at once and the unfinished attempts do not count.
CREATE FUNCTION postbox.release(worker_id text, ids uuid[], attempts integer[]) RETURNS integer
LANGUAGE plpgsql VOLATILE
-- One plan per statement, made once per connection, with the indexes (see
-- postbox.claim).
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off AS $$
#variable_conflict use_column
DECLARE
    eids bigint[];
    rids uuid[];
    sync text;
BEGIN
    sync := postbox.bookkeeping_commit();
    WITH done AS (
        UPDATE postbox.outbox o
        SET attempts = o.attempts - 1, locked_by = NULL, locked_until = NULL, next_attempt_at = now(),
            noticed = false
        FROM unnest(release.ids, release.attempts) AS l(id, attempt)
        WHERE o.id = l.id AND o.attempts = l.attempt AND o.locked_by = release.worker_id AND o.status = 'pending'
        RETURNING o.id, o.endpoint_id
    )
    SELECT array_agg(d.endpoint_id), array_agg(d.id) INTO eids, rids FROM done d;
    IF eids IS NULL THEN
        RETURN 0;
    END IF;
    PERFORM 1 FROM postbox.endpoint_state s WHERE s.endpoint_id = ANY (eids)
    ORDER BY s.endpoint_id FOR NO KEY UPDATE;
    UPDATE postbox.endpoint_state s
    SET in_flight   = greatest(0, s.in_flight - x.n),
        wake_at     = least(s.wake_at, now()),
        hold        = NULL,
        probe_event = CASE WHEN s.probe_event = ANY (rids) THEN NULL ELSE s.probe_event END,
        probe_until = CASE WHEN s.probe_event = ANY (rids) THEN NULL ELSE s.probe_until END
    FROM (SELECT e AS eid, count(*)::int AS n FROM unnest(eids) e GROUP BY e) x
    WHERE s.endpoint_id = x.eid;
    RETURN cardinality(rids);
END
$$;

-- Deletes up to batch finished events created more than older_than ago
-- (their attempts go with them): delivered and cancelled ones, and failed
-- ones older than failed_older_than when it is given; and endpoint
-- lifecycle events older than older_than. Event ids are UUIDv7,
-- so "created before" is a primary-key range. The status is checked again
-- on the row being deleted, so an event replayed meanwhile is kept. One
-- caller prunes at a time; returns NULL when another is pruning.
CREATE FUNCTION postbox.prune(older_than interval, failed_older_than interval, batch integer) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    deleted bigint := 0;
    n bigint;
BEGIN
    -- (class "pc": distinct from the ordering-key locks)
    IF NOT pg_try_advisory_xact_lock(28771, 0) THEN
        RETURN NULL;
    END IF;
    DELETE FROM postbox.outbox o
    WHERE o.id IN (SELECT x.id FROM postbox.outbox x
                   WHERE x.id < postbox.uuid_v7_at(now() - older_than)
                     AND x.status IN ('delivered', 'cancelled')
                   LIMIT batch)
      AND o.status IN ('delivered', 'cancelled');
    GET DIAGNOSTICS n = ROW_COUNT;
    deleted := n;
    IF failed_older_than IS NOT NULL THEN
        DELETE FROM postbox.outbox o
        WHERE o.id IN (SELECT x.id FROM postbox.outbox x
                       WHERE x.id < postbox.uuid_v7_at(now() - failed_older_than) AND x.status = 'failed'
                       LIMIT batch)
          AND o.status = 'failed';
        GET DIAGNOSTICS n = ROW_COUNT;
        deleted := deleted + n;
    END IF;
    -- Endpoint lifecycle events live as long as delivered events (not counted).
    DELETE FROM postbox.endpoint_events ev
    WHERE ev.id IN (SELECT x.id FROM postbox.endpoint_events x WHERE x.at < now() - older_than
                    ORDER BY x.at LIMIT batch);
    RETURN deleted;
END
$$;

-- How long until a claim may find something: the earliest endpoint wake-up
-- or unnoticed event (NULL when nothing is scheduled at all). Idle workers
-- sleep this long (capped by their poll interval).
CREATE FUNCTION postbox.next_wake() RETURNS interval
LANGUAGE sql STABLE AS $$
    SELECT least((SELECT min(s.wake_at) FROM postbox.endpoint_state s WHERE s.wake_at IS NOT NULL),
                 (SELECT min(o.next_attempt_at) FROM postbox.outbox o
                  WHERE o.status = 'pending' AND NOT o.noticed)) - now()
$$;

-- True while something is deliverable now or soon without outside help:
-- an unnoticed due event, an endpoint due a look, or due events that wait
-- only for a free slot or the rate window. Events held by a disabled,
-- paused or broken endpoint, or scheduled for later, do not count
-- (`worker --until-empty` exits when this is false and it has nothing in flight).
CREATE FUNCTION postbox.has_due() RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM postbox.outbox o
                   WHERE o.status = 'pending' AND NOT o.noticed AND o.next_attempt_at <= now())
        OR EXISTS (SELECT 1 FROM postbox.endpoint_state s
                   WHERE s.wake_at <= now() OR s.hold IN ('capacity', 'rate'))
$$;

INSERT INTO postbox.schema_migrations (version, description)
VALUES (2, 'dispatch') ON CONFLICT (version) DO NOTHING;
