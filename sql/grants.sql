-- postbox: the privileges of the roles that use the outbox, and nothing more.
--
--   psql "$DATABASE_URL" -v app_role=app -v worker_role=postbox_worker \
--        [-v operator_role=postbox_operator] -f sql/grants.sql
--
-- Run it as the role that owns the schema postbox (the one that ran
-- `postbox migrate`), after creating the roles, and again after every
-- `postbox migrate` that adds a migration: privileges are granted on the
-- objects that exist when it runs. It is idempotent. Each variable is
-- optional; the sections for the roles not given are skipped. The roles get
-- no other privilege here: CONNECT on the database and the login itself are
-- yours to manage (PostgreSQL grants CONNECT to PUBLIC unless revoked).
--
-- app_role      the application: calls postbox.enqueue inside its own
--               transactions. It cannot read events or secrets, change or
--               delete events, or touch the dispatch state.
-- worker_role   `postbox worker`: claims, delivers, records outcomes,
--               releases leases, prunes old events, serves /readyz and the
--               backlog gauges. It cannot create or alter anything (so
--               `postbox migrate` fails as this role when a migration is
--               due), cannot change payloads, and cannot insert events.
-- operator_role `postbox status`, `replay`, `endpoint list|disable|enable|set`
--               and the views in sql/*.sql: reads everything, changes the
--               columns operators change. No INSERT or DELETE. For
--               `postbox enqueue` (a test event) also grant it the app role:
--               GRANT app TO postbox_operator.
--
-- Functions. postbox's functions run with the privileges of their caller
-- (SECURITY INVOKER), so what a role may do through them is exactly what
-- its table privileges below allow: the app role calling postbox.claim() or
-- postbox.prune() is refused with "permission denied for table outbox". They
-- keep PostgreSQL's default EXECUTE for PUBLIC; PUBLIC has no USAGE on the
-- schema, so only roles granted USAGE here can reach them.
--
-- The app role and postbox.enqueue. While enqueue runs with its caller's
-- privileges, the app role needs INSERT on the outbox columns enqueue writes
-- (and on a new endpoint's columns), so it could also insert such a row
-- directly, skipping enqueue's validation; it can never set the status,
-- attempts, lease or schedule columns, read payloads, or update or delete
-- anything. Where postbox.enqueue is SECURITY DEFINER (owned by the schema
-- owner, with a fixed search_path, EXECUTE revoked from PUBLIC), this file
-- grants the app role EXECUTE on enqueue and no table privilege at all; it
-- looks at the function to decide (docs/deploy.md has the change).

\set ON_ERROR_STOP on

\if :{?app_role}
\elif :{?worker_role}
\elif :{?operator_role}
\else
DO $$ BEGIN RAISE EXCEPTION 'usage: psql -v app_role=ROLE -v worker_role=ROLE [-v operator_role=ROLE] -f sql/grants.sql'; END $$;
\endif

BEGIN;

-- Is postbox.enqueue SECURITY DEFINER here? Is there an endpoint event log
-- (postbox.endpoint_events, written when an endpoint is disabled, enabled,
-- paused or its breaker opens or closes)?
SELECT p.prosecdef AS enqueue_is_definer,
       to_regclass('postbox.endpoint_events') IS NOT NULL AS has_endpoint_events
FROM pg_proc p
WHERE p.oid = 'postbox.enqueue(text, uuid, jsonb, text)'::regprocedure \gset

-- ---------------------------------------------------------------- app role
\if :{?app_role}
GRANT USAGE ON SCHEMA postbox TO :"app_role";
GRANT EXECUTE ON FUNCTION postbox.enqueue(text, uuid, jsonb, text) TO :"app_role";

\if :enqueue_is_definer
-- enqueue writes as its owner: nothing else is needed.
\else
-- enqueue writes as its caller. It looks the endpoint up by URL (id, url:
-- never the secret), creates it when the URL is new (the trigger
-- endpoint_created adds its endpoint_state row), inserts the event, and
-- checks whether a worker sleeps before notifying.
GRANT SELECT (id, url, max_attempts) ON postbox.endpoints TO :"app_role";
GRANT INSERT (url, max_in_flight, rate_per_minute) ON postbox.endpoints TO :"app_role";
GRANT INSERT (endpoint_id) ON postbox.endpoint_state TO :"app_role";
GRANT INSERT (id, conversation_id, message_id, endpoint_id, payload, ordering_key)
    ON postbox.outbox TO :"app_role";
GRANT SELECT ON postbox.sleeping_workers TO :"app_role";
\endif
\endif

-- ------------------------------------------------------------- worker role
\if :{?worker_role}
GRANT USAGE ON SCHEMA postbox TO :"worker_role";
-- Is the database migrated? (the worker refuses to start otherwise; /readyz)
GRANT SELECT ON postbox.schema_migrations TO :"worker_role";
-- Claims read each endpoint's URL, secret and limits; a 410 Gone disables it.
GRANT SELECT ON postbox.endpoints TO :"worker_role";
GRANT UPDATE (disabled_at, disabled_reason) ON postbox.endpoints TO :"worker_role";
-- Claims, outcomes and releases keep each endpoint's dispatch state.
GRANT SELECT, UPDATE ON postbox.endpoint_state TO :"worker_role";
-- Claims lease events; outcomes and releases end leases; retention deletes
-- finished events (their attempts go with them, deleted by a trigger that runs
-- with the owner's rights, migration 0005).
-- The payload, the event's identity and its ordering are never written.
GRANT SELECT, DELETE ON postbox.outbox TO :"worker_role";
GRANT UPDATE (status, attempts, max_attempts, next_attempt_at, noticed, locked_by, locked_until,
              last_attempt_at, last_status_code, last_error, delivered_at)
    ON postbox.outbox TO :"worker_role";
-- The attempt log: a late outcome replaces a "lease expired" entry.
GRANT SELECT, INSERT ON postbox.attempts TO :"worker_role";
GRANT UPDATE (worker_id, started_at, duration_ms, status_code, error_kind, error, response_body)
    ON postbox.attempts TO :"worker_role";
-- An idle worker registers so that enqueues notify it.
GRANT SELECT, INSERT, DELETE ON postbox.sleeping_workers TO :"worker_role";
GRANT UPDATE (since) ON postbox.sleeping_workers TO :"worker_role";
\if :has_endpoint_events
-- A 410 Gone, a pause and the breaker change an endpoint's state, which is
-- logged (and announced with the new row, hence SELECT); retention prunes
-- old entries.
GRANT SELECT, INSERT, DELETE ON postbox.endpoint_events TO :"worker_role";
\endif
\endif

-- ----------------------------------------------------------- operator role
\if :{?operator_role}
GRANT USAGE ON SCHEMA postbox TO :"operator_role";
-- Every table and view (the views of migration 0003, sql/*.sql, `postbox status`).
GRANT SELECT ON ALL TABLES IN SCHEMA postbox TO :"operator_role";
-- Replay and cancel events (the trigger key_head_done may move the next
-- event of an ordering key, hence next_attempt_at and noticed).
GRANT UPDATE (status, max_attempts, next_attempt_at, noticed, delivered_at, locked_by, locked_until)
    ON postbox.outbox TO :"operator_role";
-- Disable, enable, set an endpoint's secret, limits and retry policy.
GRANT UPDATE (secret, max_in_flight, rate_per_minute, disabled_at, disabled_reason, retry_schedule,
              max_attempts)
    ON postbox.endpoints TO :"operator_role";
-- Enable also ends a pause and closes the breaker; the trigger
-- endpoint_changed wakes the endpoint (wake_at).
GRANT UPDATE (paused_until, breaker_open_until, breaker_cooldown, failing_events, probe_event,
              probe_until, wake_at)
    ON postbox.endpoint_state TO :"operator_role";
\if :has_endpoint_events
-- Disabling and enabling an endpoint is logged.
GRANT INSERT ON postbox.endpoint_events TO :"operator_role";
\endif
\endif

COMMIT;
