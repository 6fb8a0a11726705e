-- postbox 0001: schema, endpoints, outbox, attempts and the enqueue function.
--
-- Everything lives in the schema "postbox", including the bookkeeping table
-- that records which of these files have been applied. `postbox migrate`
-- applies the missing files in order, all in one transaction under an
-- advisory lock; teams applying SQL files with their own tool can run them
-- as they are (each file records itself in postbox.schema_migrations).
-- Released files never change: a change is a new file.

CREATE SCHEMA IF NOT EXISTS postbox;

CREATE TABLE IF NOT EXISTS postbox.schema_migrations (
    version     bigint      PRIMARY KEY,
    description text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per distinct callback URL.
CREATE TABLE postbox.endpoints (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    url             text        NOT NULL UNIQUE,
    -- Space-separated `whsec_…` secrets; NULL = the worker's default secret.
    secret          text,
    max_in_flight   integer     NOT NULL DEFAULT 10 CHECK (max_in_flight > 0),
    rate_per_minute integer              DEFAULT 100 CHECK (rate_per_minute > 0),
    disabled_at     timestamptz,
    disabled_reason text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- This endpoint's retry policy, for receivers that need hours rather
    -- than seconds. retry_schedule: the delay after the 1st, 2nd… failed
    -- attempt (the last repeats); NULL = the worker's POSTBOX_RETRY_SCHEDULE.
    -- max_attempts: attempts given to each event enqueued for it from then
    -- on; NULL = 4 (postbox.default_max_attempts).
    -- Set both with `postbox endpoint set` or plain SQL.
    retry_schedule  interval[],
    max_attempts    integer,
    CONSTRAINT endpoints_secret_format CHECK (
        secret IS NULL OR secret ~ '^whsec_[A-Za-z0-9+/=]+( whsec_[A-Za-z0-9+/=]+)*$'),
    CONSTRAINT endpoints_retry_schedule CHECK (
        retry_schedule IS NULL
        OR (array_ndims(retry_schedule) = 1 AND cardinality(retry_schedule) BETWEEN 1 AND 100
            AND array_position(retry_schedule, NULL) IS NULL
            AND interval '0' < ALL (retry_schedule) AND interval '30 days' >= ALL (retry_schedule))),
    CONSTRAINT endpoints_max_attempts CHECK (max_attempts BETWEEN 1 AND 100)
);

-- Attempts an event gets when its endpoint sets none: the first try plus
-- the seed's three retries.
CREATE FUNCTION postbox.default_max_attempts() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT 4 $$;

-- One row per webhook event.
CREATE TABLE postbox.outbox (
    id               uuid        PRIMARY KEY,
    conversation_id  uuid        NOT NULL,
    message_id       uuid        NOT NULL,
    endpoint_id      bigint      NOT NULL REFERENCES postbox.endpoints (id),
    payload          jsonb       NOT NULL,
    status           text        NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'delivered', 'failed', 'cancelled')),
    attempts         integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    -- Fixed at enqueue: the endpoint's max_attempts (trigger event_attempts), or the default.
    max_attempts     integer     NOT NULL DEFAULT postbox.default_max_attempts() CHECK (max_attempts > 0),
    -- When the row may next be claimed. While a worker holds the lease this is
    -- the lease's end, so an expired lease makes the row due again by itself.
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    locked_by        text,
    locked_until     timestamptz,
    last_attempt_at  timestamptz,
    last_status_code integer,
    last_error       text,
    delivered_at     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- Events of one endpoint sharing a key go one at a time, in seq order.
    ordering_key     text,
    -- Commit order within an (endpoint, ordering_key): enqueue takes a
    -- per-key transaction lock before the row (and this number) is made.
    seq              bigint      GENERATED ALWAYS AS IDENTITY,
    -- false until a claim has looked at the event: how workers find new,
    -- retried and replayed events without the enqueue touching any shared
    -- row (see migrations/0002_dispatch.sql).
    noticed          boolean     NOT NULL DEFAULT false
) WITH (fillfactor = 70);

-- An endpoint's pending events by due time: the claim takes its events here.
CREATE INDEX outbox_queue_idx ON postbox.outbox (endpoint_id, next_attempt_at) WHERE status = 'pending';
-- Pending events no claim has looked at yet, by due time: how claims find new work.
CREATE INDEX outbox_unnoticed_idx ON postbox.outbox (next_attempt_at) WHERE status = 'pending' AND NOT noticed;
-- The oldest pending event of an ordering key within an endpoint.
CREATE INDEX outbox_key_idx ON postbox.outbox (endpoint_id, ordering_key, seq)
    WHERE status = 'pending' AND ordering_key IS NOT NULL;
CREATE INDEX outbox_conversation_idx ON postbox.outbox (conversation_id);

-- A new event gets its endpoint's max_attempts when the endpoint sets one.
-- A trigger rather than a column in enqueue's INSERT, so that the
-- application role needs no privilege on max_attempts and cannot choose it.
CREATE FUNCTION postbox.event_attempts() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    SELECT coalesce(e.max_attempts, NEW.max_attempts) INTO NEW.max_attempts
    FROM postbox.endpoints e WHERE e.id = NEW.endpoint_id;
    RETURN NEW;
END
$$;
CREATE TRIGGER event_attempts BEFORE INSERT ON postbox.outbox
    FOR EACH ROW EXECUTE FUNCTION postbox.event_attempts();
CREATE INDEX outbox_message_idx ON postbox.outbox (message_id);

-- Dispatch state of each endpoint: written by workers (claims and outcomes)
-- and never locked by application transactions, which only insert events.
-- Operators may clear paused_until and breaker_open_until with plain SQL
-- (a trigger then wakes the endpoint).
CREATE TABLE postbox.endpoint_state (
    endpoint_id        bigint      PRIMARY KEY REFERENCES postbox.endpoints (id) ON DELETE CASCADE,
    -- When a claim should next look at this endpoint; NULL = nothing to do
    -- until new events arrive or something changes (see 0002).
    wake_at            timestamptz,
    -- Why it is not being served, when it is not: disabled, paused, breaker,
    -- probe, capacity, rate; NULL when it is served or idle.
    hold               text CHECK (hold IN ('disabled', 'paused', 'breaker', 'probe', 'capacity', 'rate')),
    -- Leases held (claims add, outcomes and releases subtract; recounted
    -- from the outbox whenever it reaches max_in_flight).
    in_flight          integer     NOT NULL DEFAULT 0,
    -- The earliest end of those leases (when one might expire unrecorded).
    lease_check_at     timestamptz,
    -- Sliding-window rate accounting: starts per second over the last 61
    -- seconds; rate_counts[1] is the second rate_epoch (Unix seconds).
    rate_epoch         bigint,
    rate_counts        integer[],
    -- Back-pressure: a 429/503 with Retry-After pauses the endpoint until then.
    paused_until       timestamptz,
    -- Circuit breaker: distinct events whose latest attempts failed with no
    -- success since; it opens when there are enough of them.
    failing_events     uuid[]      NOT NULL DEFAULT '{}',
    -- Open breaker: nothing is sent until then; afterwards one probe at a time.
    breaker_open_until timestamptz,
    breaker_cooldown   interval,
    -- The probe in flight while the breaker is half-open, and its lease end.
    probe_event        uuid,
    probe_until        timestamptz
) WITH (fillfactor = 50);
CREATE INDEX endpoint_state_wake_idx ON postbox.endpoint_state (wake_at) WHERE wake_at IS NOT NULL;

-- One row per delivery attempt: the retry attempt log.
CREATE TABLE postbox.attempts (
    outbox_id     uuid        NOT NULL REFERENCES postbox.outbox (id) ON DELETE CASCADE,
    attempt       integer     NOT NULL CHECK (attempt > 0),
    worker_id     text        NOT NULL,
    started_at    timestamptz NOT NULL,
    duration_ms   integer     NOT NULL,
    status_code   integer,
    error_kind    text CHECK (error_kind IN
                  ('timeout', 'connect', 'tls', 'http_status', 'blocked', 'redirect', 'body_too_large', 'other')),
    error         text,
    response_body text,
    PRIMARY KEY (outbox_id, attempt)
);
CREATE INDEX attempts_started_at_idx ON postbox.attempts (started_at);

-- Endpoint lifecycle: disabled, enabled, paused, breaker opened or closed,
-- recorded by triggers (see 0003) and announced on the channel
-- postbox_endpoint_events.
CREATE TABLE postbox.endpoint_events (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint_id bigint      NOT NULL REFERENCES postbox.endpoints (id) ON DELETE CASCADE,
    at          timestamptz NOT NULL DEFAULT now(),
    kind        text        NOT NULL
                CHECK (kind IN ('disabled', 'enabled', 'paused', 'breaker_opened', 'breaker_closed')),
    detail      text
);
CREATE INDEX endpoint_events_endpoint_idx ON postbox.endpoint_events (endpoint_id, at);
CREATE INDEX endpoint_events_at_idx ON postbox.endpoint_events (at);

-- Workers that wait for a NOTIFY when new events arrive. A worker registers
-- here when a claim finds nothing, and leaves while its claims come back
-- full (saturated, it looks for work by itself).
CREATE TABLE postbox.sleeping_workers (
    worker_id text        PRIMARY KEY,
    since     timestamptz NOT NULL DEFAULT now()
);

-- A time-ordered UUID (version 7): 48 bits of Unix milliseconds, then random bits.
CREATE FUNCTION postbox.uuid_v7() RETURNS uuid
LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
    SELECT encode(
        set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                    PLACING substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1),
        'hex')::uuid
$$;

ALTER TABLE postbox.outbox ALTER COLUMN id SET DEFAULT postbox.uuid_v7();

-- The smallest UUIDv7 of a moment: event ids are time-ordered, so
-- "id < postbox.uuid_v7_at(t)" selects events created before t through the
-- primary key, with no extra index.
CREATE FUNCTION postbox.uuid_v7_at(t timestamptz) RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT encode(
        set_bit(set_bit(set_bit(set_bit(
            overlay('\x00000000000000000000000000000000'::bytea
                    PLACING substring(int8send((extract(epoch FROM t) * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1), 54, 1), 71, 1),
        'hex')::uuid
$$;

-- Raises invalid_parameter_value naming the offending field.
CREATE FUNCTION postbox.invalid(field text, problem text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'postbox: invalid %: %', field, problem
        USING ERRCODE = 'invalid_parameter_value', COLUMN = field;
END
$$;

-- Checks a callback URL: the one rule, for every entry point (the Rust API
-- and the CLI call this; the worker's HTTP client parses whatever it
-- accepts to the same host, tests/url_rule.rs). http:// is accepted only
-- where the setting postbox.allow_http is on (e.g. ALTER DATABASE … SET
-- postbox.allow_http = on). The host must be one of:
--   * a DNS name in ASCII: labels of letters, digits, '-' and '_', each at
--     most 63 characters, at most 253 in all (an internationalised name is
--     given in its xn-- form); a name whose last label is numeric is not a
--     name (browsers and HTTP clients read "0x7f.1" as 127.0.0.1), so it must
--     be a dotted IPv4 address;
--   * a dotted IPv4 address, four decimal numbers 0-255 without leading zeros;
--   * an IPv6 address in brackets, without a zone.
-- Percent-encoding, backslashes and credentials are refused: they are where
-- URL parsers disagree.
CREATE FUNCTION postbox.check_callback_url(url text) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    allow_http boolean := coalesce(current_setting('postbox.allow_http', true), '') IN ('on', 'true', '1', 'yes');
    authority text;
    host text;
    port text;
    parts text[];
    octet constant text := '(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])';
BEGIN
    IF url IS NULL OR url = '' THEN
        PERFORM postbox.invalid('callback_url', 'is required');
    END IF;
    IF length(url) > 2048 THEN
        PERFORM postbox.invalid('callback_url', 'is longer than 2048 characters');
    END IF;
    IF url ~ '[[:cntrl:][:space:]]' THEN
        PERFORM postbox.invalid('callback_url', 'contains white space or control characters');
    END IF;
    IF url ~* '^http://' THEN
        IF NOT allow_http THEN
            PERFORM postbox.invalid('callback_url',
                'must be an absolute https:// URL (plain http:// needs postbox.allow_http = on)');
        END IF;
    ELSIF url !~* '^https://' THEN
        PERFORM postbox.invalid('callback_url', 'must be an absolute https:// URL');
    END IF;
    IF position('\' IN url) > 0 THEN
        PERFORM postbox.invalid('callback_url', 'must not contain a backslash');
    END IF;
    authority := substring(url FROM '^[A-Za-z]+://([^/?#]*)');
    IF authority IS NULL OR authority = '' THEN
        PERFORM postbox.invalid('callback_url', 'has no host');
    END IF;
    IF position('@' IN authority) > 0 THEN
        PERFORM postbox.invalid('callback_url', 'must not carry credentials (user:password@)');
    END IF;
    IF authority ~ '^\[' THEN
        parts := regexp_match(authority, '^\[([^\]]*)\](:([^:]*))?$');
    ELSE
        parts := regexp_match(authority, '^([^:]*)(:([^:]*))?$');
    END IF;
    IF parts IS NULL THEN
        PERFORM postbox.invalid('callback_url', 'has a malformed host or port');
    END IF;
    host := parts[1];
    port := parts[3];
    IF port IS NOT NULL AND (port !~ '^[0-9]{1,5}$' OR port::int NOT BETWEEN 1 AND 65535) THEN
        PERFORM postbox.invalid('callback_url', 'has a port outside 1-65535');
    END IF;
    IF authority ~ '^\[' THEN
        IF host !~ '^[0-9A-Fa-f:.]+$' OR host !~ ':' THEN
            PERFORM postbox.invalid('callback_url', 'has a malformed IPv6 address (zones are not allowed)');
        END IF;
        BEGIN
            PERFORM host::inet;
        EXCEPTION WHEN invalid_text_representation THEN
            PERFORM postbox.invalid('callback_url', 'has a malformed IPv6 address');
        END;
    ELSIF host = '' THEN
        PERFORM postbox.invalid('callback_url', 'has no host');
    ELSIF host ~ '[^\x01-\x7f]' THEN
        PERFORM postbox.invalid('callback_url',
            'has a host that is not ASCII: give an internationalised name in its xn-- form');
    ELSIF host ~ '[%~]' THEN
        PERFORM postbox.invalid('callback_url', 'has a percent-encoded or otherwise malformed host');
    ELSIF rtrim(host, '.') ~* '(^|\.)(0x[0-9a-f]*|[0-9]+)$' THEN
        IF rtrim(host, '.') !~ ('^' || octet || '(\.' || octet || '){3}$') THEN
            PERFORM postbox.invalid('callback_url',
                'has a numeric host that is not a dotted IPv4 address (four numbers 0-255)');
        END IF;
    ELSIF host !~ '^[A-Za-z0-9_-]{1,63}(\.[A-Za-z0-9_-]{1,63})*\.?$' OR length(rtrim(host, '.')) > 253 THEN
        PERFORM postbox.invalid('callback_url',
            'has a malformed host name (letters, digits, ''-'' and ''_'' in dot-separated labels)');
    END IF;
    RETURN url;
END
$$;

-- Checks that a text field holds an ISO 8601 / RFC 3339 timestamp and returns
-- it in RFC 3339 form: unchanged when it carries an offset, read as UTC and
-- given a "Z" when it has none.
CREATE FUNCTION postbox.check_timestamp(field text, value jsonb) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    s text;
BEGIN
    IF value IS NULL OR jsonb_typeof(value) = 'null' THEN
        PERFORM postbox.invalid(field, 'is required');
    END IF;
    IF jsonb_typeof(value) <> 'string' THEN
        PERFORM postbox.invalid(field, 'must be an RFC 3339 timestamp string');
    END IF;
    s := value #>> '{}';
    IF s !~ '^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})?$' THEN
        PERFORM postbox.invalid(field, format('must be an RFC 3339 timestamp (got %s)', left(s, 64)));
    END IF;
    BEGIN
        PERFORM (CASE WHEN s ~ '([Zz]|[+-]\d{2}:\d{2})$' THEN s ELSE s || 'Z' END)::timestamptz;
    EXCEPTION WHEN others THEN
        PERFORM postbox.invalid(field, format('is not a valid date and time (got %s)', left(s, 64)));
    END;
    IF s !~ '([Zz]|[+-]\d{2}:\d{2})$' THEN
        s := s || 'Z';
    END IF;
    RETURN s;
END
$$;

-- Validates a message event's "data" object and returns it normalised
-- (timestamps in RFC 3339 form, JSON null optional fields dropped).
CREATE FUNCTION postbox.check_message(data jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    key text;
    f text;
    out jsonb;
BEGIN
    IF data IS NULL OR jsonb_typeof(data) <> 'object' THEN
        PERFORM postbox.invalid('data', 'must be a JSON object');
    END IF;
    FOR key IN SELECT jsonb_object_keys(data) LOOP
        IF key NOT IN ('id', 'content', 'content_type', 'filename', 'type', 'channel', 'status',
                       'metadata', 'created_by', 'updated_by', 'created_at', 'updated_at') THEN
            PERFORM postbox.invalid('data.' || key, 'is not a field of a message event');
        END IF;
    END LOOP;

    IF NOT data ? 'id' OR jsonb_typeof(data -> 'id') = 'null' THEN
        PERFORM postbox.invalid('data.id', 'is required');
    END IF;
    IF jsonb_typeof(data -> 'id') <> 'string'
       OR (data ->> 'id') !~* '^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$' THEN
        PERFORM postbox.invalid('data.id', format('must be a UUID (got %s)', left(data ->> 'id', 64)));
    END IF;

    FOREACH f IN ARRAY ARRAY['content', 'created_by', 'updated_by'] LOOP
        IF NOT data ? f OR jsonb_typeof(data -> f) = 'null' THEN
            PERFORM postbox.invalid('data.' || f, 'is required');
        END IF;
        IF jsonb_typeof(data -> f) <> 'string' THEN
            PERFORM postbox.invalid('data.' || f, 'must be a string');
        END IF;
    END LOOP;
    IF (data ->> 'created_by') = '' THEN
        PERFORM postbox.invalid('data.created_by', 'must not be empty');
    END IF;
    IF (data ->> 'updated_by') = '' THEN
        PERFORM postbox.invalid('data.updated_by', 'must not be empty');
    END IF;

    PERFORM postbox.check_enum('data.content_type', data -> 'content_type',
                               ARRAY['TEXT', 'IMAGE', 'VIDEO', 'DOCUMENT', 'AUDIO']);
    PERFORM postbox.check_enum('data.type', data -> 'type', ARRAY['USER_INPUT', 'SYSTEM', 'BOT']);
    PERFORM postbox.check_enum('data.channel', data -> 'channel', ARRAY['API', 'WHATSAPP', 'SMS']);
    PERFORM postbox.check_enum('data.status', data -> 'status', ARRAY['RECEIVED', 'PROCESSED', 'FAILED']);

    out := data;
    IF jsonb_typeof(data -> 'filename') = 'null' THEN
        out := out - 'filename';
    ELSIF data ? 'filename' AND jsonb_typeof(data -> 'filename') <> 'string' THEN
        PERFORM postbox.invalid('data.filename', 'must be a string');
    END IF;
    IF jsonb_typeof(data -> 'metadata') = 'null' THEN
        out := out - 'metadata';
    ELSIF data ? 'metadata' AND jsonb_typeof(data -> 'metadata') <> 'object' THEN
        PERFORM postbox.invalid('data.metadata', 'must be a JSON object');
    END IF;

    out := jsonb_set(out, '{id}', to_jsonb(lower(data ->> 'id')::uuid::text));
    out := jsonb_set(out, '{created_at}', to_jsonb(postbox.check_timestamp('data.created_at', data -> 'created_at')));
    out := jsonb_set(out, '{updated_at}', to_jsonb(postbox.check_timestamp('data.updated_at', data -> 'updated_at')));
    RETURN out;
END
$$;

CREATE FUNCTION postbox.check_enum(field text, value jsonb, allowed text[]) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF value IS NULL OR jsonb_typeof(value) = 'null' THEN
        PERFORM postbox.invalid(field, 'is required');
    END IF;
    IF jsonb_typeof(value) <> 'string' OR NOT (value #>> '{}') = ANY (allowed) THEN
        PERFORM postbox.invalid(field, format('must be one of %s (got %s)',
                                              array_to_string(allowed, ', '), left(value::text, 64)));
    END IF;
END
$$;

-- Wakes waiting workers at commit: the one place the channel is named in
-- SQL (the worker LISTENs on it, src/worker.rs NOTIFY_CHANNEL).
CREATE FUNCTION postbox.wake_workers() RETURNS void
LANGUAGE sql VOLATILE AS $$ SELECT pg_notify('postbox_outbox', '') $$;

-- The first key of the two-part advisory locks that serialise writers of
-- one ordering key ("pb" in ASCII); the second is a hash of endpoint and key.
CREATE FUNCTION postbox.key_lock_class() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT 28770 $$;

-- Every endpoint has its dispatch state row, however the endpoint was made.
CREATE FUNCTION postbox.endpoint_created() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO postbox.endpoint_state (endpoint_id) VALUES (NEW.id) ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;
CREATE TRIGGER endpoint_created AFTER INSERT ON postbox.endpoints
    FOR EACH ROW EXECUTE FUNCTION postbox.endpoint_created();

-- Endpoint limits for new endpoints come from settings when present:
--   ALTER DATABASE … SET postbox.default_max_in_flight = 20;
--   ALTER DATABASE … SET postbox.default_rate_per_minute = 600;  -- or 'unlimited'
CREATE FUNCTION postbox.new_endpoint(callback_url text) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    mif text := nullif(current_setting('postbox.default_max_in_flight', true), '');
    rpm text := nullif(current_setting('postbox.default_rate_per_minute', true), '');
    ep_id bigint;
BEGIN
    INSERT INTO postbox.endpoints (url, max_in_flight, rate_per_minute)
    VALUES (callback_url,
            coalesce(mif::int, 10),
            CASE WHEN rpm = 'unlimited' THEN NULL ELSE coalesce(rpm::int, 100) END)
    ON CONFLICT (url) DO NOTHING
    RETURNING id INTO ep_id;
    -- Another transaction made it first (this statement waited for it to commit).
    IF ep_id IS NULL THEN
        SELECT e.id INTO ep_id FROM postbox.endpoints e WHERE e.url = callback_url;
    END IF;
    RETURN ep_id;
END
$$;

-- Enqueues one message event for delivery to callback_url, inside the
-- caller's transaction: the event becomes visible to workers when (and only
-- if) that transaction commits. Returns the event id (the webhook-id).
CREATE FUNCTION postbox.enqueue(callback_url text, conversation_id uuid, data jsonb,
                                ordering_key text DEFAULT NULL) RETURNS uuid
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    max_bytes bigint := coalesce(nullif(current_setting('postbox.max_payload_bytes', true), ''), '262144')::bigint;
    msg jsonb;
    body jsonb;
    ep_id bigint;
    event_id uuid := postbox.uuid_v7();
BEGIN
    PERFORM postbox.check_callback_url(callback_url);
    IF conversation_id IS NULL THEN
        PERFORM postbox.invalid('conversation_id', 'is required');
    END IF;
    IF ordering_key = '' THEN
        PERFORM postbox.invalid('ordering_key', 'must not be empty (use NULL for no ordering)');
    END IF;
    IF length(ordering_key) > 256 THEN
        PERFORM postbox.invalid('ordering_key', format('is %s characters long; at most 256 are allowed',
                                                       length(ordering_key)));
    END IF;
    msg := postbox.check_message(data);
    body := jsonb_build_object(
        'conversation_id', conversation_id,
        'data', msg,
        'timestamp', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'));
    IF octet_length(body::text) > max_bytes THEN
        PERFORM postbox.invalid('data', format('makes a payload of %s bytes, over the limit of %s bytes',
                                               octet_length(body::text), max_bytes));
    END IF;

    SELECT e.id INTO ep_id FROM postbox.endpoints e WHERE e.url = callback_url;
    IF ep_id IS NULL THEN
        ep_id := postbox.new_endpoint(callback_url);
    END IF;

    -- Ordering keys: concurrent writers of one (endpoint, key) take turns
    -- here, so each one's row (and seq) is made after the previous writer
    -- committed: seq order is commit order. Only writers of the same key
    -- wait; workers never take this lock.
    IF ordering_key IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(postbox.key_lock_class(), hashtext(ep_id::text || '/' || ordering_key));
    END IF;

    -- Events of a disabled endpoint are kept like any other: the endpoint,
    -- not the event, is held back until it is enabled.
    INSERT INTO postbox.outbox (id, conversation_id, message_id, endpoint_id, payload, ordering_key)
    VALUES (event_id, conversation_id, (msg ->> 'id')::uuid, ep_id, body, ordering_key);

    -- Wakes waiting workers at commit. Only when one waits: a transaction
    -- that notifies holds a cluster-wide lock from its commit until its WAL
    -- is flushed, so notifying on every enqueue under a heavy load would
    -- serialise the application's commits. Saturated workers (whose claims
    -- come back full) are not registered: they look by themselves.
    IF EXISTS (SELECT 1 FROM postbox.sleeping_workers) THEN
        PERFORM postbox.wake_workers();
    END IF;
    RETURN event_id;
END
$$;

INSERT INTO postbox.schema_migrations (version, description)
VALUES (1, 'core') ON CONFLICT (version) DO NOTHING;
