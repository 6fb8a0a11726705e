-- The whole story of an event, found by event id, conversation id or message id
-- (what the integration guide asks receivers to send to support).
-- psql "$DATABASE_URL" -v key=<uuid> -f sql/event_story.sql
SELECT * FROM postbox.event_story(:'key');
