//! `/metrics` (Prometheus text), `/healthz` and `/readyz` for a worker.

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;

use super::Failure;

const DURATION_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];

/// Installs the Prometheus recorder, starts the backlog gauges and serves
/// the endpoints on `addr`.
pub async fn start(addr: SocketAddr, pool: PgPool) -> Result<(), Failure> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("postbox_delivery_duration_seconds".into()),
            DURATION_BUCKETS,
        )
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full("postbox_claim_batch_size".into()), BATCH_BUCKETS))
        .map_err(|e| Failure::Runtime(format!("metrics: {e}")))?
        .install_recorder()
        .map_err(|e| Failure::Runtime(format!("metrics: {e}")))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Failure::Runtime(format!("POSTBOX_METRICS_ADDR: cannot listen on {addr}: {e}")))?;
    tokio::spawn(backlog_gauges(pool.clone()));
    let app = Router::new()
        .route("/metrics", get(move || render(handle.clone())))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(move || ready(pool.clone())));
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}

async fn render(handle: PrometheusHandle) -> String {
    handle.render()
}

async fn ready(pool: PgPool) -> (StatusCode, &'static str) {
    match postbox::migrate::is_current(&pool).await {
        Ok(true) => (StatusCode::OK, "ready\n"),
        Ok(false) => (StatusCode::SERVICE_UNAVAILABLE, "database not migrated\n"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "database unreachable\n"),
    }
}

/// Refreshes the gauges read from the tables: `postbox_outbox_pending`,
/// `postbox_outbox_oldest_pending_seconds`, `postbox_outbox_expired_leases`
/// (claimed rows whose worker vanished, waiting to be taken again),
/// `postbox_endpoints_breaker_open` and `postbox_endpoints_disabled`; and
/// counts the rows added to `postbox.endpoint_events` since this process
/// started in `postbox_endpoint_events_total{kind}`. Every worker counts
/// every endpoint's events, so aggregate it with `max`, not `sum`.
async fn backlog_gauges(pool: PgPool) {
    let mut seen: Option<i64> = None;
    loop {
        count_endpoint_events(&pool, &mut seen).await;
        let row: Result<(i64, f64, i64, i64, i64), _> = sqlx::query_as(
            "SELECT (SELECT count(*) FROM postbox.outbox WHERE status = 'pending'),
                    (SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8
                     FROM postbox.outbox WHERE status = 'pending'),
                    (SELECT count(*) FROM postbox.outbox
                     WHERE status = 'pending' AND locked_by IS NOT NULL AND locked_until < now()),
                    (SELECT count(*) FROM postbox.endpoint_state WHERE breaker_open_until > now()),
                    (SELECT count(*) FROM postbox.endpoints WHERE disabled_at IS NOT NULL)",
        )
        .fetch_one(&pool)
        .await;
        if let Ok((pending, oldest, expired, open, disabled)) = row {
            metrics::gauge!("postbox_outbox_pending").set(pending as f64);
            metrics::gauge!("postbox_outbox_oldest_pending_seconds").set(oldest);
            metrics::gauge!("postbox_outbox_expired_leases").set(expired as f64);
            metrics::gauge!("postbox_endpoints_breaker_open").set(open as f64);
            metrics::gauge!("postbox_endpoints_disabled").set(disabled as f64);
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Adds the lifecycle events after `seen` (the highest id counted; at the
/// first call, the current highest) to `postbox_endpoint_events_total`.
async fn count_endpoint_events(pool: &PgPool, seen: &mut Option<i64>) {
    let Some(after) = *seen else {
        if let Ok(top) = sqlx::query_scalar::<_, i64>("SELECT coalesce(max(id), 0) FROM postbox.endpoint_events")
            .fetch_one(pool)
            .await
        {
            *seen = Some(top);
        }
        return;
    };
    let rows: Result<Vec<(String, i64, i64)>, _> =
        sqlx::query_as("SELECT kind, count(*), max(id) FROM postbox.endpoint_events WHERE id > $1 GROUP BY kind")
            .bind(after)
            .fetch_all(pool)
            .await;
    for (kind, n, top) in rows.unwrap_or_default() {
        metrics::counter!("postbox_endpoint_events_total", "kind" => kind).increment(n.max(0) as u64);
        *seen = Some(seen.map_or(top, |s| s.max(top)));
    }
}
