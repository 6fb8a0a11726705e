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

/// Refreshes `postbox_outbox_pending` and `postbox_outbox_oldest_pending_seconds`.
async fn backlog_gauges(pool: PgPool) {
    loop {
        let row: Result<(i64, f64), _> = sqlx::query_as(
            "SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8
             FROM postbox.outbox WHERE status = 'pending'",
        )
        .fetch_one(&pool)
        .await;
        if let Ok((pending, oldest)) = row {
            metrics::gauge!("postbox_outbox_pending").set(pending as f64);
            metrics::gauge!("postbox_outbox_oldest_pending_seconds").set(oldest);
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}
