-- postbox 0006: a claim whose cost grows with its rounds, not with the
-- endpoints it serves.
--
-- The claim of 0002 ran five to seven statements for every endpoint it
-- visited (a look at its events, their lease, the endpoint's accounting).
-- With many small endpoints (thousands of tenants with a few events each)
-- that is a statement or more per delivered event, and the claim's backend
-- became the bottleneck: 270 µs of PostgreSQL CPU per event with 5,000
-- endpoints of two events, against about 105 µs with one endpoint.
--
-- Here each round makes its decisions in three passes: (A) endpoint by
-- endpoint in PL/pgSQL, without a statement in the common case, decide
-- whether it may receive and how many events it may take; (B) one statement
-- takes the events of every endpoint of the round (a lateral index scan per
-- endpoint, FOR UPDATE SKIP LOCKED), fails exhausted leases, logs lost ones
-- and leases the rest; (C) endpoint by endpoint, from what B found, decide
-- what follows (parking events behind their key's head, noticing a held
-- endpoint's events: statements only in those cases), and write every
-- endpoint's accounting in one UPDATE. A round thus costs four statements
-- whatever its number of endpoints.
--
-- The concurrency argument of 0002 is unchanged: every decision about an
-- endpoint is still made while this transaction holds its endpoint_state
-- row (locked FOR UPDATE SKIP LOCKED at the start of the round, as before),
-- by statements whose snapshots were taken after the lock was granted; the
-- events are leased, parked and noticed by the same rules, and each visited
-- endpoint's state row is written in the round that visited it. What
-- changes is only how many statements carry those decisions.
--
-- One difference in what a round does: a round hands out its budget before
-- it knows how many events each endpoint has, so an endpoint that has fewer
-- than its share leaves the rest unused in that round; the next round (same
-- call) hands it to the endpoints still due. The share is the batch divided
-- evenly among the round's endpoints, but at least two events: a tenant with
-- two events is then served in one visit rather than two, and the endpoints
-- the budget does not reach stay due, first in line for the next round.

CREATE OR REPLACE FUNCTION postbox.claim(worker_id text, max_rows integer, lease_ms bigint)
RETURNS TABLE (id uuid, attempt integer, max_attempts integer, payload jsonb, endpoint_id bigint,
               url text, secret text, claimed_at timestamptz, retry_schedule jsonb)
LANGUAGE plpgsql VOLATILE
-- One plan per statement, made once per connection, and made with the
-- indexes whatever the statistics said then (see 0002).
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
    budget integer;
    skipped boolean;
    eps_seen integer;
    any_more boolean;
    sync text;
    i integer;
    k integer;
    -- one endpoint, pass A
    flying integer;
    lease_check timestamptz;
    recounted boolean;
    counts integer[];
    used integer;
    due boolean;
    held text;
    n integer;
    -- the round's plan: one element per endpoint visited, in visiting order
    p_eid bigint[];
    p_n integer[];
    p_flying integer[];
    p_recounted boolean[];
    p_lease_check timestamptz[];
    p_used integer[];
    p_held text[];
    p_max integer[];
    p_rate integer[];
    p_probing boolean[];
    p_until timestamptz[];
    p_url text[];
    p_secret text[];
    p_schedule jsonb[];
    -- what pass B found, per planned endpoint (aligned with p_*)
    b_started integer[];
    b_new integer[];
    b_expired integer[];
    b_looked integer[];
    b_heads integer[];
    b_waiting integer[];
    b_first uuid[];
    -- pass B for a single endpoint
    planned integer;
    j integer;
    k_new integer;
    k_expired integer;
    k_looked integer;
    k_heads integer;
    k_first uuid;
    -- one endpoint, pass C
    started integer;
    waiting integer;
    more boolean;
    -- the accounting written in pass C, one element per endpoint visited
    u_flying integer[];
    u_lease_check timestamptz[];
    u_probe uuid[];
    u_held text[];
    u_more boolean[];
    u_target timestamptz[];
    -- the round's leases
    r_ids uuid[];
    r_attempts integer[];
    r_max integer[];
    r_payloads jsonb[];
    r_eids bigint[];
    r_urls text[];
    r_secrets text[];
    r_schedules jsonb[];
    -- the call's leases
    c_ids uuid[] := '{}';
    c_attempts integer[] := '{}';
    c_max integer[] := '{}';
    c_payloads jsonb[] := '{}';
    c_eids bigint[] := '{}';
    c_urls text[] := '{}';
    c_secrets text[] := '{}';
    c_schedules jsonb[] := '{}';
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
        skipped := false;
        eps_seen := max_rows - got;
        budget := max_rows - got;
        share := greatest(least(2, budget), ceil(budget::numeric / cardinality(eps)))::int;
        p_eid := '{}'; p_n := '{}'; p_flying := '{}'; p_lease_check := '{}'; p_used := '{}';
        p_recounted := '{}';
        p_held := '{}'; p_max := '{}'; p_rate := '{}'; p_probing := '{}'; p_until := '{}';
        p_url := '{}'; p_secret := '{}';
        p_schedule := '{}';
        planned := 0;

        -- Pass A: may each endpoint receive, and how many events may it take?
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
            -- The batch is spoken for: leave the remaining endpoints as they
            -- are (still due; the next round or claim takes them first).
            IF budget <= 0 THEN
                skipped := true;
                EXIT;
            END IF;
            -- The counter is exact but for leases that expired unrecorded:
            -- recount when it would hold the endpoint back, or when a lease
            -- may have expired.
            flying := ep.in_flight;
            lease_check := ep.lease_check_at;
            recounted := flying >= ep.max_in_flight OR coalesce(lease_check <= now(), false);
            IF recounted THEN
                SELECT count(*)::int, min(f.locked_until) INTO flying, lease_check
                FROM postbox.outbox f
                WHERE f.endpoint_id = ep.eid AND f.status = 'pending'
                  AND f.next_attempt_at > now() AND f.locked_until > now();
            END IF;
            counts := CASE WHEN ep.rate_per_minute IS NOT NULL
                           THEN postbox.rate_window(ep.rate_counts, ep.rate_epoch, now_s) END;
            used := NULL;
            IF ep.rate_per_minute IS NOT NULL THEN
                used := (SELECT sum(x)::int FROM unnest(counts) x);
            END IF;
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
                      ELSE least(share, budget, ep.max_in_flight - flying,
                                 coalesce(ep.rate_per_minute - used, share),
                                 CASE WHEN ep.breaker_open_until IS NOT NULL THEN 1 ELSE share END) END;
            budget := budget - n;
            p_eid := p_eid || ep.eid;
            IF n > 0 THEN
                planned := planned + 1;
                j := cardinality(p_eid);
            END IF;
            p_n := p_n || n;
            p_flying := p_flying || flying;
            p_recounted := p_recounted || recounted;
            p_lease_check := p_lease_check || lease_check;
            p_used := p_used || used;
            p_held := p_held || held;
            p_max := p_max || ep.max_in_flight;
            p_rate := p_rate || ep.rate_per_minute;
            p_probing := p_probing || (ep.breaker_open_until IS NOT NULL);
            -- When the hold decided here ends, or when a full rate window
            -- (now, or once this round's starts are counted) frees a start:
            -- the latter only worked out when it may be needed.
            p_until := p_until || CASE held
                WHEN 'paused' THEN ep.paused_until
                WHEN 'breaker' THEN ep.breaker_open_until
                WHEN 'probe' THEN ep.probe_until
                ELSE CASE WHEN held = 'rate' OR used + n >= ep.rate_per_minute
                          THEN coalesce(postbox.rate_free_at(counts, now_s), to_timestamp(now_s + 61)) END
                END;
            p_url := p_url || ep.url;
            p_secret := p_secret || ep.secret;
            p_schedule := p_schedule || ep.schedule;
        END LOOP;

        -- Pass B: every planned endpoint's due events, oldest first, one past
        -- its budget (to know whether more are due), in one statement. A
        -- plan is set up anew on every call, so a round that serves a
        -- single endpoint (the usual case at low rates, and with one busy
        -- endpoint) runs the same steps in a statement made for one
        -- endpoint, a fraction of the size; a round that serves none runs
        -- none.
        r_ids := NULL; r_attempts := NULL; r_max := NULL; r_payloads := NULL;
        r_eids := NULL; r_urls := NULL; r_secrets := NULL; r_schedules := NULL;
        IF planned <= 1 THEN
            k := cardinality(p_eid);
            b_started := array_fill(0, ARRAY[k]);
            b_new := b_started;
            b_expired := b_started;
            b_looked := b_started;
            b_heads := b_started;
            b_waiting := b_started;
            b_first := array_fill(NULL::uuid, ARRAY[k]);
        END IF;
        IF planned = 1 THEN
            WITH cand AS (
                SELECT o.id, o.seq, o.next_attempt_at, o.attempts, o.max_attempts, o.locked_by,
                       o.last_attempt_at,
                       o.locked_by IS NOT NULL AND o.attempts >= o.max_attempts AS exhausted,
                       (o.ordering_key IS NULL OR NOT EXISTS (
                           SELECT 1 FROM postbox.outbox h
                           WHERE h.endpoint_id = o.endpoint_id AND h.ordering_key = o.ordering_key
                             AND h.status = 'pending' AND h.seq < o.seq)) AS head
                FROM postbox.outbox o
                WHERE o.endpoint_id = p_eid[j] AND o.status = 'pending' AND o.next_attempt_at <= now()
                ORDER BY o.next_attempt_at
                LIMIT p_n[j] + 1
                FOR UPDATE OF o SKIP LOCKED
            ), chosen AS (
                SELECT c.* FROM cand c WHERE c.head AND NOT c.exhausted
                ORDER BY c.next_attempt_at, c.seq LIMIT p_n[j]
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
                WHERE o.id = ANY (ARRAY(SELECT ch.id FROM chosen ch))
                RETURNING o.id, o.attempts, o.max_attempts, o.payload,
                          o.id = ANY (ARRAY(SELECT ch.id FROM chosen ch WHERE ch.locked_by IS NOT NULL)) AS relet
            )
            SELECT array_agg(c.id), array_agg(c.attempts), array_agg(c.max_attempts), array_agg(c.payload),
                   count(*)::int, (count(*) FILTER (WHERE NOT c.relet))::int, (array_agg(c.id))[1],
                   (SELECT count(*) FROM exhausted)::int, (SELECT count(*) FROM cand)::int,
                   (SELECT count(*) FROM cand x WHERE x.head AND NOT x.exhausted)::int,
                   (SELECT count(*) FROM cand x WHERE NOT x.head AND x.locked_by IS NULL)::int
            INTO r_ids, r_attempts, r_max, r_payloads, started, k_new, k_first, k_expired, k_looked, k_heads,
                 waiting
            FROM claimed c;
            b_started[j] := started;
            b_new[j] := k_new;
            b_expired[j] := k_expired;
            b_looked[j] := k_looked;
            b_heads[j] := k_heads;
            b_waiting[j] := waiting;
            b_first[j] := k_first;
            IF r_ids IS NOT NULL THEN
                r_eids := array_fill(p_eid[j], ARRAY[started]);
                r_urls := array_fill(p_url[j], ARRAY[started]);
                r_secrets := array_fill(p_secret[j], ARRAY[started]);
                r_schedules := array_fill(p_schedule[j], ARRAY[started]);
            END IF;
        ELSIF planned > 1 THEN
            WITH plan AS (
                SELECT p.eid, p.n, p.url, p.secret, p.schedule
                FROM unnest(p_eid, p_n, p_url, p_secret, p_schedule) AS p(eid, n, url, secret, schedule)
                WHERE p.n > 0
            ), cand AS (
                SELECT c.* FROM plan p CROSS JOIN LATERAL (
                    SELECT o.id, o.endpoint_id AS eid, o.seq, o.next_attempt_at, o.attempts, o.max_attempts,
                           o.locked_by, o.last_attempt_at,
                           o.locked_by IS NOT NULL AND o.attempts >= o.max_attempts AS exhausted,
                           (o.ordering_key IS NULL OR NOT EXISTS (
                               SELECT 1 FROM postbox.outbox h
                               WHERE h.endpoint_id = o.endpoint_id AND h.ordering_key = o.ordering_key
                                 AND h.status = 'pending' AND h.seq < o.seq)) AS head
                    FROM postbox.outbox o
                    WHERE o.endpoint_id = p.eid AND o.status = 'pending' AND o.next_attempt_at <= now()
                    ORDER BY o.next_attempt_at
                    LIMIT p.n + 1
                    FOR UPDATE OF o SKIP LOCKED) c
            ), chosen AS (
                SELECT r.* FROM (
                    SELECT c.*, row_number() OVER (PARTITION BY c.eid ORDER BY c.next_attempt_at, c.seq) AS rank
                    FROM cand c WHERE c.head AND NOT c.exhausted) r
                JOIN plan p ON p.eid = r.eid
                WHERE r.rank <= p.n
            ), exhausted AS (
                UPDATE postbox.outbox o
                SET status = 'failed', locked_by = NULL, locked_until = NULL, noticed = true,
                    last_error = 'other: lease expired on the final attempt'
                WHERE o.id = ANY (ARRAY(SELECT c.id FROM cand c WHERE c.exhausted))
                RETURNING o.id, o.endpoint_id
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
                -- Driven by the ids alone: a join with chosen would probe the
                -- whole id list once per chosen row.
                WHERE o.id = ANY (ARRAY(SELECT ch.id FROM chosen ch))
                RETURNING o.id, o.endpoint_id, o.attempts, o.max_attempts, o.payload,
                          -- a lease taken back from a worker that stopped (it still counts in flight)
                          o.id = ANY (ARRAY(SELECT ch.id FROM chosen ch WHERE ch.locked_by IS NOT NULL)) AS relet
            )
            SELECT r.ids, r.attempts, r.maxs, r.payloads, r.eids, r.urls, r.secrets, r.schedules,
                   s.started, s.new_leases, s.expired, s.looked, s.heads, s.waiting, s.first
            INTO r_ids, r_attempts, r_max, r_payloads, r_eids, r_urls, r_secrets, r_schedules,
                 b_started, b_new, b_expired, b_looked, b_heads, b_waiting, b_first
            FROM (SELECT array_agg(c.id) AS ids, array_agg(c.attempts) AS attempts,
                         array_agg(c.max_attempts) AS maxs, array_agg(c.payload) AS payloads,
                         array_agg(c.endpoint_id) AS eids, array_agg(p.url) AS urls,
                         array_agg(p.secret) AS secrets, array_agg(p.schedule) AS schedules
                  FROM claimed c JOIN plan p ON p.eid = c.endpoint_id) r,
                 (SELECT array_agg(coalesce(cl.started, 0) ORDER BY l.ord) AS started,
                         array_agg(coalesce(cl.new_leases, 0) ORDER BY l.ord) AS new_leases,
                         array_agg(coalesce(ex.expired, 0) ORDER BY l.ord) AS expired,
                         array_agg(coalesce(ca.looked, 0) ORDER BY l.ord) AS looked,
                         array_agg(coalesce(ca.heads, 0) ORDER BY l.ord) AS heads,
                         array_agg(coalesce(ca.waiting, 0) ORDER BY l.ord) AS waiting,
                         array_agg(cl.first ORDER BY l.ord) AS first
                  FROM unnest(p_eid) WITH ORDINALITY AS l(eid, ord)
                  LEFT JOIN (SELECT c.endpoint_id AS eid, count(*)::int AS started,
                                    (count(*) FILTER (WHERE NOT c.relet))::int AS new_leases,
                                    (array_agg(c.id))[1] AS first
                             FROM claimed c GROUP BY c.endpoint_id) cl ON cl.eid = l.eid
                  LEFT JOIN (SELECT x.eid, count(*)::int AS looked,
                                    (count(*) FILTER (WHERE x.head AND NOT x.exhausted))::int AS heads,
                                    (count(*) FILTER (WHERE NOT x.head AND x.locked_by IS NULL))::int AS waiting
                             FROM cand x GROUP BY x.eid) ca ON ca.eid = l.eid
                  LEFT JOIN (SELECT x.endpoint_id AS eid, count(*)::int AS expired
                             FROM exhausted x GROUP BY x.endpoint_id) ex ON ex.eid = l.eid) s;
        END IF;

        IF r_ids IS NOT NULL THEN
            c_ids := c_ids || r_ids;
            c_attempts := c_attempts || r_attempts;
            c_max := c_max || r_max;
            c_payloads := c_payloads || r_payloads;
            c_eids := c_eids || r_eids;
            c_urls := c_urls || r_urls;
            c_secrets := c_secrets || r_secrets;
            c_schedules := c_schedules || r_schedules;
            round_got := cardinality(r_ids);
        END IF;

        -- Pass C: what follows for each endpoint visited.
        u_flying := '{}'; u_lease_check := '{}'; u_probe := '{}'; u_held := '{}';
        u_more := '{}'; u_target := '{}';
        FOR i IN 1 .. coalesce(cardinality(p_eid), 0) LOOP
            n := p_n[i];
            started := b_started[i];
            waiting := b_waiting[i];
            held := p_held[i];
            IF waiting > 0 THEN
                -- Events behind the head of their key leave the due range
                -- until the head is done (trigger key_head_done).
                UPDATE postbox.outbox o SET noticed = true, next_attempt_at = 'infinity'
                WHERE o.id = ANY (ARRAY(
                    SELECT q.id FROM postbox.outbox q
                    WHERE q.endpoint_id = p_eid[i] AND q.status = 'pending' AND q.next_attempt_at <= now()
                      AND q.ordering_key IS NOT NULL AND q.locked_by IS NULL
                      AND EXISTS (SELECT 1 FROM postbox.outbox h
                                  WHERE h.endpoint_id = q.endpoint_id AND h.ordering_key = q.ordering_key
                                    AND h.status = 'pending' AND h.seq < q.seq)
                    ORDER BY q.next_attempt_at LIMIT 1000
                    FOR UPDATE SKIP LOCKED));
                GET DIAGNOSTICS k = ROW_COUNT;
                moved := moved + k;
            END IF;
            moved := moved + b_expired[i];
            more := n > 0 AND (b_looked[i] > n OR b_heads[i] > started);
            any_more := any_more OR more;
            -- A recount saw only live leases: every lease taken now adds
            -- one. The counter also holds leases that ended unrecorded: a
            -- lease taken back replaces one, an expired final lease leaves.
            flying := p_flying[i] + CASE WHEN p_recounted[i] THEN started ELSE b_new[i] - b_expired[i] END;
            IF held IS NULL AND more THEN
                held := CASE
                    WHEN flying >= p_max[i] THEN 'capacity'
                    WHEN p_used[i] + started >= p_rate[i] THEN 'rate'
                    WHEN p_probing[i] AND started > 0 THEN 'probe'
                    END;
            END IF;
            IF held IS NOT NULL AND waiting = 0 THEN
                -- A held endpoint's new events are noticed, so they stop
                -- showing up to claims; wake_at says when to look again.
                UPDATE postbox.outbox o SET noticed = true
                WHERE o.id = ANY (ARRAY(
                    SELECT u.id FROM postbox.outbox u
                    WHERE u.endpoint_id = p_eid[i] AND u.status = 'pending' AND NOT u.noticed
                      AND u.next_attempt_at <= now() AND u.locked_by IS NULL
                    ORDER BY u.next_attempt_at LIMIT 5000
                    FOR UPDATE SKIP LOCKED));
                GET DIAGNOSTICS k = ROW_COUNT;
                moved := moved + k;
            END IF;
            lease_check := p_lease_check[i];
            IF started > 0 THEN
                lease_check := least(lease_check, now() + lease);
            ELSIF flying <= 0 AND lease_check <= now() THEN
                lease_check := NULL;
            END IF;
            u_flying := u_flying || greatest(0, flying);
            u_lease_check := u_lease_check || lease_check;
            u_probe := u_probe || CASE WHEN p_probing[i] AND started > 0 THEN b_first[i] END;
            u_held := u_held || held;
            u_more := u_more || more;
            u_target := u_target || CASE held
                WHEN 'paused' THEN p_until[i]
                WHEN 'breaker' THEN p_until[i]
                WHEN 'probe' THEN CASE WHEN started > 0 THEN now() + lease ELSE p_until[i] END
                WHEN 'rate' THEN p_until[i]
                WHEN 'capacity' THEN now() + lease
                WHEN 'disabled' THEN NULL
                ELSE CASE WHEN more THEN now() END
                END;
        END LOOP;

        -- Every visited endpoint's accounting, in one statement.
        UPDATE postbox.endpoint_state s
        SET in_flight      = u.flying,
            lease_check_at = u.lease_check,
            rate_epoch     = now_s,
            rate_counts    = CASE WHEN u.rate IS NOT NULL THEN (
                                 SELECT array_prepend(w.c[1] + u.started, w.c[2:61])
                                 FROM (SELECT postbox.rate_window(s.rate_counts, s.rate_epoch, now_s) AS c) w)
                             END,
            probe_event    = coalesce(u.probe, s.probe_event),
            probe_until    = CASE WHEN u.probe IS NOT NULL THEN now() + lease ELSE s.probe_until END,
            hold           = u.held,
            wake_at        = CASE
                -- Still due, and looked at within the last second: keep the
                -- value. wake_at is indexed: leaving it alone keeps this
                -- update (and an outcome's) a HOT update of a hot row.
                -- Fairness rotates at that granularity.
                WHEN u.held IS NULL AND u.more AND s.wake_at <= now() AND s.wake_at > now() - interval '1 second'
                    THEN s.wake_at
                -- The hold's end, or a lease's (to take back any that
                -- expire unrecorded), whichever comes first.
                ELSE (SELECT min(t) FROM unnest(ARRAY[u.target, u.lease_check]) t)
                END
        FROM unnest(p_eid, p_rate, u_flying, u_lease_check, b_started, u_probe, u_held, u_more, u_target)
             AS u(eid, rate, flying, lease_check, started, probe, held, more, target)
        WHERE s.endpoint_id = u.eid;

        got := cardinality(c_ids);
        -- Another round while this one made progress (took events, or moved
        -- held or key-blocked events out of the way) and the batch has room;
        -- a claim that has worked for 200 ms returns what it has (the
        -- worker claims again at once).
        EXIT WHEN got >= max_rows OR (round_got = 0 AND moved = 0)
                  -- every candidate was served and none has more
                  OR (NOT any_more AND NOT skipped AND moved = 0 AND cardinality(eps) < eps_seen)
                  OR clock_timestamp() - began > interval '200 milliseconds';
    END LOOP;

    RETURN QUERY
    SELECT u.id, u.attempt, u.max_attempts, u.payload, u.endpoint_id, u.url, u.secret, now(), u.schedule
    FROM unnest(c_ids, c_attempts, c_max, c_payloads, c_eids, c_urls, c_secrets, c_schedules)
         AS u(id, attempt, max_attempts, payload, endpoint_id, url, secret, schedule);
END
$$;

INSERT INTO postbox.schema_migrations (version, description)
VALUES (6, 'set_claim') ON CONFLICT (version) DO NOTHING;
