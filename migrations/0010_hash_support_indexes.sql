-- postbox 0010: the support look-up indexes become hash indexes.
--
-- outbox.conversation_id and outbox.message_id are indexed so that support
-- can find an event by either (postbox.event_story, `postbox inspect`, plain
-- SQL with `=`). Every claim and every outcome rewrites an outbox row, and
-- neither can be a HOT update (each moves the row in or out of the partial
-- dispatch indexes), so each adds an entry to every index. In a B-tree of
-- random UUIDs that entry is a descent to a random leaf, and the leaves fill
-- with versions of the same keys, which PostgreSQL then clears by visiting
-- the heap (bottom-up deletion). Measured here: the claim's and the
-- outcome's UPDATEs of 20,000 events took 62 µs per event with these two
-- B-trees, 35–43 µs without them and 46–54 µs with hash indexes; a
-- 20,000-event drain used 74–86 µs of PostgreSQL CPU per event with hash
-- indexes against 96–98 µs with the B-trees (three drains each,
-- alternating).
--
-- Look-ups are by equality only, which a hash index answers as well (and
-- event_story's `id = key OR conversation_id = key OR message_id = key`
-- becomes a BitmapOr of the three, as before). Dead entries are removed by
-- VACUUM, as in any index (docs/deploy.md: the outbox needs autovacuum).
-- Applying this file rebuilds the two indexes, blocking writes to the
-- outbox while it runs: about 3 s per index and million rows here.

DROP INDEX postbox.outbox_conversation_idx;
DROP INDEX postbox.outbox_message_idx;
CREATE INDEX outbox_conversation_idx ON postbox.outbox USING hash (conversation_id);
CREATE INDEX outbox_message_idx ON postbox.outbox USING hash (message_id);

INSERT INTO postbox.schema_migrations (version, description)
VALUES (10, 'hash_support_indexes') ON CONFLICT (version) DO NOTHING;
