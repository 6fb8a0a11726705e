-- postbox 0007: a cheaper enqueue for the usual message, and state-row
-- triggers that only look at the columns they are about.
--
-- The payload check of 0001 (check_message) is a PL/pgSQL function that
-- runs a dozen statements and two sub-transactions (the timestamp casts):
-- about 0.1 ms of every enqueue, and 4-6 ms the first time a session calls
-- it (each statement is planned then). Most messages are already in the
-- form check_message returns (a lower-case hyphenated id, RFC 3339
-- timestamps with an offset, no JSON nulls to drop). For those, one
-- expression says so, and the message is used as it is; anything else
-- (including every invalid message) goes through the full check, which
-- normalises it or names the field that is wrong, exactly as before.
--
-- The callback URL's check (check_callback_url) gets a quick test in the
-- same way. Each quick test only accepts what its full check accepts
-- unchanged: tests/lean_enqueue.rs runs both over the same valid and
-- invalid input.

-- An RFC 3339 timestamp that check_timestamp returns as it is: a calendar
-- date that exists (leap years included), a time of day, an offset within
-- ±14:59. Written so that no cast is reached unless the text has the shape.
CREATE FUNCTION postbox.timestamp_is_plain(s text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN s ~ '^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt]([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,9})?([Zz]|[+-](0[0-9]|1[0-4]):[0-5][0-9])$'
             AND left(s, 4) <> '0000'
        THEN substr(s, 9, 2)::int <= CASE
            WHEN substr(s, 6, 2) IN ('04', '06', '09', '11') THEN 30
            WHEN substr(s, 6, 2) <> '02' THEN 31
            WHEN left(s, 4)::int % 4 = 0 AND (left(s, 4)::int % 100 <> 0 OR left(s, 4)::int % 400 = 0) THEN 29
            ELSE 28 END
        ELSE false
    END
$$;

-- A message event that check_message would return unchanged.
CREATE FUNCTION postbox.message_is_plain(data jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN jsonb_typeof(data) = 'object' THEN coalesce(
        data - ARRAY['id', 'content', 'content_type', 'filename', 'type', 'channel', 'status',
                         'metadata', 'created_by', 'updated_by', 'created_at', 'updated_at'] = '{}'::jsonb
        AND jsonb_typeof(data -> 'id') = 'string'
        AND (data ->> 'id') ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
        AND jsonb_typeof(data -> 'content') = 'string'
        AND jsonb_typeof(data -> 'created_by') = 'string' AND (data ->> 'created_by') <> ''
        AND jsonb_typeof(data -> 'updated_by') = 'string' AND (data ->> 'updated_by') <> ''
        AND jsonb_typeof(data -> 'content_type') = 'string'
        AND (data ->> 'content_type') IN ('TEXT', 'IMAGE', 'VIDEO', 'DOCUMENT', 'AUDIO')
        AND jsonb_typeof(data -> 'type') = 'string' AND (data ->> 'type') IN ('USER_INPUT', 'SYSTEM', 'BOT')
        AND jsonb_typeof(data -> 'channel') = 'string' AND (data ->> 'channel') IN ('API', 'WHATSAPP', 'SMS')
        AND jsonb_typeof(data -> 'status') = 'string'
        AND (data ->> 'status') IN ('RECEIVED', 'PROCESSED', 'FAILED')
        AND coalesce(jsonb_typeof(data -> 'filename') = 'string', true)
        AND coalesce(jsonb_typeof(data -> 'metadata') = 'object', true)
        AND jsonb_typeof(data -> 'created_at') = 'string' AND postbox.timestamp_is_plain(data ->> 'created_at')
        AND jsonb_typeof(data -> 'updated_at') = 'string' AND postbox.timestamp_is_plain(data ->> 'updated_at'),
        false) ELSE false END
$$;

-- The full check of 0001 keeps its body under a new name; check_message
-- (what enqueue calls) tries the quick test first. Both are SQL
-- expressions, folded into enqueue's own when it is planned.
ALTER FUNCTION postbox.check_message(jsonb) RENAME TO check_message_in_full;
CREATE FUNCTION postbox.check_message(data jsonb) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN postbox.message_is_plain(data) THEN data ELSE postbox.check_message_in_full(data) END
$$;

-- The same for the callback URL (check_callback_url, 0001). A URL whose
-- scheme is https:// (or http:// where postbox.allow_http is on), whose
-- authority is a host of letters, digits, '.', '-' and '_' with an optional
-- port, and which holds no white space, control character or backslash, is
-- checked here; any other goes through the full check. (Several small
-- regular expressions: PostgreSQL runs one large alternation of them tens
-- of times slower, and the authority is cut out with split_part, not a
-- regular expression, as the helper reads it several times.)
--
-- First the authority of such a URL (url_is_plain, below, has checked its
-- shape: host[:port], the port 1-5 digits): a port of 1-65535; a dotted IPv4 address
-- (four numbers 0-255 without leading zeros), or a name of labels of 1-63
-- characters, 253 in all, whose last label starts with a letter (so it is
-- not a number in disguise).
CREATE FUNCTION postbox.authority_is_plain(authority text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(nullif(split_part(authority, ':', 2), '')::int BETWEEN 1 AND 65535, true)
        AND length(split_part(authority, ':', 1)) BETWEEN 1 AND 253
        AND CASE
            WHEN split_part(authority, ':', 1) ~ '^[0-9.]+$'
                THEN split_part(authority, ':', 1)
                     ~ '^(0|[1-9][0-9]?|1[0-9][0-9]|2[0-4][0-9]|25[0-5])(\.(0|[1-9][0-9]?|1[0-9][0-9]|2[0-4][0-9]|25[0-5])){3}$'
            ELSE split_part(authority, ':', 1) ~* '(^|\.)[a-z][a-z0-9_-]*$'
                 AND split_part(authority, ':', 1) !~ '(^\.|\.\.|\.$|[^.]{64})'
        END
$$;

CREATE FUNCTION postbox.url_is_plain(url text) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN url IS NULL OR length(url) > 2048 THEN false
        WHEN url !~* '^https?://[a-z0-9._-]+(:[0-9]{1,5})?([/?#][^[:cntrl:][:space:]\\]*)?$' THEN false
        WHEN url !~* '^https://'
             AND coalesce(current_setting('postbox.allow_http', true), '') NOT IN ('on', 'true', '1', 'yes') THEN false
        ELSE postbox.authority_is_plain(split_part(split_part(split_part(url, '/', 3), '?', 1), '#', 1))
    END
$$;

ALTER FUNCTION postbox.check_callback_url(text) RENAME TO check_callback_url_in_full;
CREATE FUNCTION postbox.check_callback_url(url text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN postbox.url_is_plain(url) THEN url ELSE postbox.check_callback_url_in_full(url) END
$$;

-- The wake-up triggers on endpoint_state compare pauses and the breaker's
-- cool-down; named columns let PostgreSQL skip them (and the set-up of
-- their WHEN clauses, done anew by every statement) for the updates that do
-- not set those columns: every claim's accounting, for one.
DROP TRIGGER endpoint_hold_relaxed ON postbox.endpoint_state;
CREATE TRIGGER endpoint_hold_relaxed BEFORE UPDATE OF paused_until, breaker_open_until
    ON postbox.endpoint_state FOR EACH ROW
    WHEN ((OLD.paused_until IS NOT NULL AND (NEW.paused_until IS NULL OR NEW.paused_until < OLD.paused_until))
          OR (OLD.breaker_open_until IS NOT NULL
              AND (NEW.breaker_open_until IS NULL OR NEW.breaker_open_until < OLD.breaker_open_until)))
    EXECUTE FUNCTION postbox.endpoint_hold_relaxed();
DROP TRIGGER endpoint_hold_changed ON postbox.endpoint_state;
CREATE TRIGGER endpoint_hold_changed AFTER UPDATE OF paused_until, breaker_open_until
    ON postbox.endpoint_state FOR EACH ROW
    WHEN ((NEW.paused_until IS DISTINCT FROM OLD.paused_until AND NEW.paused_until IS NOT NULL)
          OR NEW.breaker_open_until IS DISTINCT FROM OLD.breaker_open_until)
    EXECUTE FUNCTION postbox.endpoint_hold_changed();

INSERT INTO postbox.schema_migrations (version, description)
VALUES (7, 'lean_enqueue') ON CONFLICT (version) DO NOTHING;
