//! The lease protocol's SQL functions (migration 0002) called directly, as
//! any client of the database could: for tests that play out an
//! interleaving of claims and outcomes by hand. The worker calls the same
//! functions through its own (crate-private) store module.

use std::time::Duration;

use chrono::{DateTime, Utc};
use postbox::delivery::{Decision, ErrorKind, Next, Response};
use postbox::BreakerPolicy;
use sqlx::PgPool;
use uuid::Uuid;

/// One row of `postbox.claim_quick` (as of `postbox.claim`).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    pub id: Uuid,
    pub attempt: i32,
    pub max_attempts: i32,
    pub payload: serde_json::Value,
    pub endpoint_id: i64,
    pub url: String,
    pub secret: Option<String>,
    pub claimed_at: DateTime<Utc>,
}

/// `SELECT … FROM postbox.claim_quick(worker, limit, lease)`: the worker's
/// claim (the plain case quickly, anything else by `postbox.claim`).
pub async fn claim(pool: &PgPool, worker: &str, limit: i64, lease: Duration) -> Result<Vec<Claimed>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, attempt, max_attempts, payload, endpoint_id, url, secret, claimed_at
         FROM postbox.claim_quick($1, $2, $3)",
    )
    .bind(worker)
    .bind(limit as i32)
    .bind(lease.as_millis() as i64)
    .fetch_all(pool)
    .await
}

/// One finished attempt.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub id: Uuid,
    pub attempt: i32,
    pub started_at: DateTime<Utc>,
    pub response: Response,
    pub decision: Decision,
}

/// An attempt that got `status` (an HTTP-status error unless 2xx), with
/// `next` decided and no pause.
pub fn outcome(id: Uuid, attempt: i32, status: u16, next: Next) -> Outcome {
    Outcome {
        id,
        attempt,
        started_at: chrono::Utc::now(),
        response: Response {
            status: Some(status),
            error: (!(200..300).contains(&status)).then_some(ErrorKind::HttpStatus),
            message: None,
            body: None,
            retry_after: None,
            elapsed: Duration::from_millis(3),
        },
        decision: Decision { next, pause: None },
    }
}

/// `postbox.record` for `outcomes`; returns the ids recorded.
pub async fn record(
    pool: &PgPool,
    worker: &str,
    outcomes: &[Outcome],
    breaker: &BreakerPolicy,
) -> Result<Vec<Uuid>, sqlx::Error> {
    let col = |f: &dyn Fn(&Outcome) -> Option<String>| outcomes.iter().map(f).collect::<Vec<_>>();
    let ids: Vec<Uuid> = outcomes.iter().map(|o| o.id).collect();
    let attempts: Vec<i32> = outcomes.iter().map(|o| o.attempt).collect();
    let kinds = col(&|o| Some(o.decision.next.as_str().to_owned()));
    let delays: Vec<f64> = outcomes
        .iter()
        .map(|o| match o.decision.next {
            Next::Retry { after } => after.as_secs_f64(),
            _ => 0.0,
        })
        .collect();
    let codes: Vec<Option<i32>> = outcomes.iter().map(|o| o.response.status.map(i32::from)).collect();
    let error_kinds = col(&|o| o.response.error.map(|k| k.as_str().to_owned()));
    let errors = col(&|o| o.response.message.clone());
    let started: Vec<DateTime<Utc>> = outcomes.iter().map(|o| o.started_at).collect();
    let durations: Vec<i32> = outcomes.iter().map(|o| o.response.elapsed.as_millis() as i32).collect();
    let bodies = col(&|o| o.response.body.clone());
    let pauses: Vec<f64> = outcomes
        .iter()
        .map(|o| o.decision.pause.map_or(0.0, |d| d.as_secs_f64()))
        .collect();
    sqlx::query_scalar("SELECT postbox.record($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)")
        .bind(worker)
        .bind(ids)
        .bind(attempts)
        .bind(kinds)
        .bind(delays)
        .bind(codes)
        .bind(error_kinds)
        .bind(errors)
        .bind(started)
        .bind(durations)
        .bind(bodies)
        .bind(pauses)
        .bind(breaker.threshold as i32)
        .bind(breaker.cooldown.as_secs_f64())
        .bind(breaker.max_cooldown.as_secs_f64())
        .fetch_all(pool)
        .await
}

/// `postbox.release` of `leases` (id, attempt).
pub async fn release(pool: &PgPool, worker: &str, leases: &[(Uuid, i32)]) -> Result<u64, sqlx::Error> {
    let (ids, attempts): (Vec<Uuid>, Vec<i32>) = leases.iter().copied().unzip();
    let n: i32 = sqlx::query_scalar("SELECT postbox.release($1, $2, $3)")
        .bind(worker)
        .bind(ids)
        .bind(attempts)
        .fetch_one(pool)
        .await?;
    Ok(n as u64)
}

/// `postbox.prune`; `None` when another caller is pruning.
pub async fn prune(
    pool: &PgPool,
    older_than: Duration,
    failed_older_than: Option<Duration>,
    batch: i64,
) -> Result<Option<u64>, sqlx::Error> {
    let n: Option<i64> =
        sqlx::query_scalar("SELECT postbox.prune($1 * interval '1 second', $2 * interval '1 second', $3::int)")
            .bind(older_than.as_secs_f64())
            .bind(failed_older_than.map(|d| d.as_secs_f64()))
            .bind(batch)
            .fetch_one(pool)
            .await?;
    Ok(n.map(|n| n as u64))
}
