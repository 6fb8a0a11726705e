-- The lease protocol's own cost, without HTTP: enqueue :events events to
-- :endpoints endpoints, then claim and record them (all delivered) in
-- batches of :batch from one session, and report the backend's CPU time per
-- event (from /proc; needs a superuser and a server on this machine).
-- Run by tools/bench/protocol-cost.sh, which makes a fresh database.
SET postbox.allow_http = on;
SELECT count(postbox.enqueue('http://127.0.0.1:9/e' || (g.i % :endpoints)::text, gen_random_uuid(),
    jsonb_build_object('id', gen_random_uuid(), 'content', repeat('Hello shoes ', 21),
    'content_type', 'TEXT', 'type', 'USER_INPUT', 'channel', 'API', 'status', 'RECEIVED',
    'metadata', jsonb_build_object('source', 'bench', 'sequence', g.i),
    'created_by', 'user123', 'updated_by', 'user123',
    'created_at', '2026-12-03T10:00:00.000Z', 'updated_at', '2026-12-03T10:00:00.000Z'), NULL)) AS enqueued
FROM generate_series(1, :events) AS g(i);
UPDATE postbox.endpoints SET max_in_flight = 100000, rate_per_minute = NULL;
ANALYZE;
CHECKPOINT;

CREATE PROCEDURE pg_temp.drain(batch integer) LANGUAGE plpgsql AS $$
DECLARE
    ids uuid[];
    atts integer[];
    n integer;
    calls integer := 0;
    total integer := 0;
    t0 timestamptz := clock_timestamp();
    cpu0 text[] := string_to_array(pg_read_file('/proc/' || pg_backend_pid() || '/stat'), ' ');
    cpu1 text[];
BEGIN
    LOOP
        SELECT array_agg(c.id), array_agg(c.attempt) INTO ids, atts FROM postbox.claim_quick('cost', batch, 60000) c;
        COMMIT;
        EXIT WHEN ids IS NULL;
        n := cardinality(ids);
        PERFORM postbox.record('cost', ids, atts, array_fill('delivered'::text, ARRAY[n]),
            array_fill(0::float8, ARRAY[n]), array_fill(200, ARRAY[n]), array_fill(NULL::text, ARRAY[n]),
            array_fill(NULL::text, ARRAY[n]), array_fill(now(), ARRAY[n]), array_fill(3, ARRAY[n]),
            array_fill('ok'::text, ARRAY[n]), array_fill(0::float8, ARRAY[n]), 5, 30, 3600);
        COMMIT;
        calls := calls + 1;
        total := total + n;
    END LOOP;
    cpu1 := string_to_array(pg_read_file('/proc/' || pg_backend_pid() || '/stat'), ' ');
    -- Fields 14 and 15 of /proc/PID/stat: user and system time, in ticks of 10 ms.
    RAISE NOTICE 'batch %: % events in % claim+record pairs; per event: % us wall, % us backend CPU',
        batch, total, calls,
        round(extract(epoch FROM clock_timestamp() - t0) * 1e6 / greatest(total, 1)),
        round(((cpu1[14]::bigint + cpu1[15]::bigint) - (cpu0[14]::bigint + cpu0[15]::bigint))
              * 10000.0 / greatest(total, 1));
END
$$;
CALL pg_temp.drain(:batch);
