-- postbox 0005: the attempt log without a per-row foreign key.
--
-- postbox.attempts referenced postbox.outbox with a foreign key, so every
-- attempt logged ran a lookup of its event (a trigger and a query per row,
-- about a twentieth of the database's work per delivered event). Every
-- writer of postbox.attempts is a dispatch function that holds the event's
-- row lock while it writes (claim: FOR UPDATE; record: the UPDATE of the
-- row, or FOR KEY SHARE for a late 2xx), so the check never found anything
-- those locks had not already established. What the foreign key also did,
-- remove an event's attempts with it, is now one statement per DELETE (and a
-- TRUNCATE) of events, by triggers that run with the owner's rights, as the
-- cascade did: a role allowed to delete events needs no right on the log.
--
-- Why no orphan is possible: the triggers' DELETE runs after the events'
-- rows are deleted, in a statement that sees every attempt committed before
-- it started. An attempt written concurrently was written while its writer
-- held the event's row lock, which the DELETE of that row waited for; so it
-- was committed before the DELETE went on, and the trigger sees it. That
-- holds for a DELETE in READ COMMITTED (the default, and what retention
-- uses). A REPEATABLE READ or SERIALIZABLE transaction reads with its first
-- snapshot: it fails with a serialization error if a claim or outcome
-- updated the row meanwhile, but a late 2xx only locks the row, so its log
-- entry may then outlive the event. Delete events in READ COMMITTED.

ALTER TABLE postbox.attempts DROP CONSTRAINT attempts_outbox_id_fkey;

CREATE FUNCTION postbox.events_deleted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM postbox.attempts a USING gone g WHERE a.outbox_id = g.id;
    RETURN NULL;
END
$$;
CREATE TRIGGER events_deleted AFTER DELETE ON postbox.outbox
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION postbox.events_deleted();

CREATE FUNCTION postbox.events_truncated() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    TRUNCATE postbox.attempts;
    RETURN NULL;
END
$$;
CREATE TRIGGER events_truncated AFTER TRUNCATE ON postbox.outbox
    FOR EACH STATEMENT EXECUTE FUNCTION postbox.events_truncated();

-- postbox.record as in 0002, but for where a late 2xx for a row it did not
-- update is logged (a statement of its own, under a row lock).
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
CREATE OR REPLACE FUNCTION postbox.record(
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

    -- A 2xx the fence refused (the row is delivered already, or another
    -- worker holds it) is still logged while the event exists. The row is
    -- locked first (FOR KEY SHARE, as the foreign key did), so a concurrent
    -- DELETE either waits for this entry and removes it with the event, or
    -- has removed the event and nothing is logged.
    -- (Usually every outcome was applied: then there is nothing to look for.)
    IF coalesce(cardinality(d_ids), 0) < cardinality(record.ids)
       AND EXISTS (SELECT 1 FROM unnest(record.ids, record.kinds) AS x(id, kind)
                   WHERE x.kind = 'delivered' AND x.id <> ALL (coalesce(d_ids, '{}'))) THEN
        INSERT INTO postbox.attempts AS a (outbox_id, attempt, worker_id, started_at, duration_ms, status_code,
                                           error_kind, error, response_body)
        SELECT r.id, r.attempt, record.worker_id, r.started_at, r.duration_ms, r.status_code, r.error_kind,
               r.error, r.response_body
        FROM unnest(record.ids, record.attempts, record.kinds, record.status_codes, record.error_kinds,
                    record.errors, record.started_ats, record.durations_ms, record.response_bodies)
             AS r(id, attempt, kind, status_code, error_kind, error, started_at, duration_ms, response_body)
        WHERE r.kind = 'delivered' AND r.id <> ALL (coalesce(d_ids, '{}'))
          AND r.id IN (SELECT x.id FROM postbox.outbox x WHERE x.id = ANY (record.ids) FOR KEY SHARE)
        ON CONFLICT (outbox_id, attempt) DO UPDATE
        SET worker_id = EXCLUDED.worker_id, started_at = EXCLUDED.started_at, duration_ms = EXCLUDED.duration_ms,
            status_code = EXCLUDED.status_code, error_kind = EXCLUDED.error_kind, error = EXCLUDED.error,
            response_body = EXCLUDED.response_body;
    END IF;

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

INSERT INTO postbox.schema_migrations (version, description)
VALUES (5, 'attempt_log') ON CONFLICT (version) DO NOTHING;
