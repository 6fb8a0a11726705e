-- Failed attempts in the last hour, by endpoint, error kind and status.
-- psql "$DATABASE_URL" -f sql/failures.sql
SELECT * FROM postbox.failures ORDER BY attempts DESC;
