-- Per endpoint over the last hour: state, attempts, success rate, p50/p95/p99 latency, pending.
-- psql "$DATABASE_URL" -f sql/endpoint_health.sql
SELECT * FROM postbox.endpoint_health ORDER BY success_pct NULLS LAST, attempts DESC;
