-- Success rate and latency per endpoint over the last hour.
-- psql "$DATABASE_URL" -f sql/endpoint_health.sql
SELECT e.id,
       e.url,
       e.disabled_at IS NOT NULL                                    AS disabled,
       count(a.*)                                                   AS attempts,
       round(100.0 * count(a.*) FILTER (WHERE a.error_kind IS NULL) / nullif(count(a.*), 0), 1) AS success_pct,
       percentile_cont(0.5)  WITHIN GROUP (ORDER BY a.duration_ms)  AS p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY a.duration_ms)  AS p95_ms,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY a.duration_ms)  AS p99_ms
FROM postbox.endpoints e
JOIN postbox.outbox o   ON o.endpoint_id = e.id
JOIN postbox.attempts a ON a.outbox_id = o.id AND a.started_at > now() - interval '1 hour'
GROUP BY e.id
ORDER BY success_pct NULLS FIRST, attempts DESC;
