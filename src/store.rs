//! The worker's SQL: claim due events, record outcomes, release leases.
//!
//! Every statement is a single round trip and a short transaction of its own;
//! no transaction or row lock is ever held across an HTTP request. All times
//! are the database's `now()`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// One event claimed by this worker, with everything needed to deliver it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    /// Event id (`webhook-id`).
    pub id: Uuid,
    /// This attempt's number (1-based); also the lease token.
    pub attempt: i32,
    /// Attempts allowed in all.
    pub max_attempts: i32,
    /// The webhook body.
    pub payload: serde_json::Value,
    /// The endpoint row.
    pub endpoint_id: i64,
    /// Where to send it.
    pub url: String,
    /// The endpoint's own secrets, if any.
    pub secret: Option<String>,
    /// Database time at the claim.
    pub claimed_at: DateTime<Utc>,
}

/// Claims up to `limit` due events in one statement.
///
/// Why this is correct with any number of workers: the `due` CTE locks the
/// rows it picks with `FOR UPDATE SKIP LOCKED`, so concurrent claimers pick
/// disjoint rows without waiting on each other; the outer `UPDATE` then, in
/// the same statement and transaction, counts the attempt, records the lease
/// owner and moves `next_attempt_at` to the end of the lease. Once committed
/// the rows are no longer due, so no other worker can claim them until the
/// lease expires, at which point they are due again with no sweeper needed.
///
/// Rows whose previous holder never recorded an outcome (its lease expired)
/// get that lost attempt written to `postbox.attempts`; if it was their last
/// attempt they become `failed` here instead of being delivered again.
pub async fn claim(pool: &PgPool, worker_id: &str, limit: i64, lease: Duration) -> Result<Vec<Claimed>, sqlx::Error> {
    sqlx::query_as::<_, Claimed>(
        r#"
WITH due AS (
    SELECT o.id, o.endpoint_id, o.attempts AS prev_attempt, o.locked_by AS prev_owner,
           o.last_attempt_at AS prev_started, o.attempts >= o.max_attempts AS exhausted
    FROM postbox.outbox o
    WHERE o.status = 'pending'
      AND o.next_attempt_at <= now()
      AND NOT EXISTS (SELECT 1 FROM postbox.endpoints e
                      WHERE e.id = o.endpoint_id AND e.disabled_at IS NOT NULL)
    ORDER BY o.next_attempt_at
    LIMIT $2
    FOR UPDATE OF o SKIP LOCKED
), lost AS (
    INSERT INTO postbox.attempts (outbox_id, attempt, worker_id, started_at, duration_ms, error_kind, error)
    SELECT id, prev_attempt, prev_owner, coalesce(prev_started, now()),
           (extract(epoch FROM now() - coalesce(prev_started, now())) * 1000)::int,
           'other', 'lease expired: the worker stopped before recording an outcome'
    FROM due WHERE prev_owner IS NOT NULL AND prev_attempt > 0
    ON CONFLICT (outbox_id, attempt) DO NOTHING
), claimed AS (
    UPDATE postbox.outbox o
    SET attempts        = CASE WHEN due.exhausted THEN o.attempts ELSE o.attempts + 1 END,
        status          = CASE WHEN due.exhausted THEN 'failed' ELSE o.status END,
        last_error      = CASE WHEN due.exhausted
                               THEN 'other: lease expired on the final attempt' ELSE o.last_error END,
        locked_by       = CASE WHEN due.exhausted THEN NULL ELSE $1 END,
        locked_until    = CASE WHEN due.exhausted THEN NULL ELSE now() + $3 * interval '1 millisecond' END,
        next_attempt_at = CASE WHEN due.exhausted THEN o.next_attempt_at
                               ELSE now() + $3 * interval '1 millisecond' END,
        last_attempt_at = CASE WHEN due.exhausted THEN o.last_attempt_at ELSE now() END
    FROM due
    WHERE o.id = due.id
    RETURNING o.id, o.attempts, o.max_attempts, o.payload, o.endpoint_id, due.exhausted
)
SELECT c.id, c.attempts AS attempt, c.max_attempts, c.payload, c.endpoint_id, e.url, e.secret,
       now() AS claimed_at
FROM claimed c JOIN postbox.endpoints e ON e.id = c.endpoint_id
WHERE NOT c.exhausted
"#,
    )
    .bind(worker_id)
    .bind(limit)
    .bind(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await
}

/// What to do with a row once its attempt is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// `status = delivered`.
    Delivered,
    /// Stay `pending`, due again after the delay.
    Retry(Duration),
    /// `status = failed`.
    Failed,
    /// Stay `pending`; the endpoint answered 410 Gone and is disabled.
    Gone,
}

/// One finished attempt, ready to be written.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Event id.
    pub id: Uuid,
    /// The attempt number claimed (the lease token).
    pub attempt: i32,
    /// Where the row goes next.
    pub transition: Transition,
    /// Database time when the request started.
    pub started_at: DateTime<Utc>,
    /// How long the attempt took.
    pub duration: Duration,
    /// Response status, if a response came.
    pub status_code: Option<i32>,
    /// `error_kind` for a failed attempt.
    pub error_kind: Option<&'static str>,
    /// Error text for a failed attempt.
    pub error: Option<String>,
    /// The first 4 KiB of the response body.
    pub response_body: Option<String>,
}

/// Writes a batch of outcomes in one statement: the outbox rows, the
/// `attempts` log rows and any endpoint disabled by a 410.
///
/// The fence: a row is updated only while it is still `pending`, leased by
/// this worker, and at the attempt number this worker claimed. If the lease
/// expired and another claim (by any worker, this one included) has since
/// counted a new attempt, the stale outcome is dropped, so a slow worker can
/// never overwrite a newer attempt. Returns the ids that were recorded.
pub async fn record(pool: &PgPool, worker_id: &str, outcomes: &[Outcome]) -> Result<Vec<Uuid>, sqlx::Error> {
    let mut ids = Vec::with_capacity(outcomes.len());
    let mut attempts = Vec::with_capacity(outcomes.len());
    let mut kinds = Vec::with_capacity(outcomes.len());
    let mut delays = Vec::with_capacity(outcomes.len());
    let mut codes = Vec::with_capacity(outcomes.len());
    let mut error_kinds = Vec::with_capacity(outcomes.len());
    let mut errors = Vec::with_capacity(outcomes.len());
    let mut started = Vec::with_capacity(outcomes.len());
    let mut durations = Vec::with_capacity(outcomes.len());
    let mut bodies = Vec::with_capacity(outcomes.len());
    for o in outcomes {
        ids.push(o.id);
        attempts.push(o.attempt);
        let (kind, delay) = match o.transition {
            Transition::Delivered => ("delivered", 0.0),
            Transition::Retry(d) => ("retry", d.as_secs_f64()),
            Transition::Failed => ("failed", 0.0),
            Transition::Gone => ("gone", 0.0),
        };
        kinds.push(kind);
        delays.push(delay);
        codes.push(o.status_code);
        error_kinds.push(o.error_kind);
        errors.push(o.error.as_deref());
        started.push(o.started_at);
        durations.push(i32::try_from(o.duration.as_millis()).unwrap_or(i32::MAX));
        bodies.push(o.response_body.as_deref());
    }
    sqlx::query_scalar(
        r#"
WITH r AS (
    SELECT * FROM unnest($2::uuid[], $3::int4[], $4::text[], $5::float8[], $6::int4[], $7::text[],
                         $8::text[], $9::timestamptz[], $10::int4[], $11::text[])
        AS r(id, attempt, kind, delay_s, status_code, error_kind, error, started_at, duration_ms, response_body)
), done AS (
    UPDATE postbox.outbox o
    SET status           = CASE r.kind WHEN 'delivered' THEN 'delivered' WHEN 'failed' THEN 'failed'
                                       ELSE 'pending' END,
        next_attempt_at  = CASE r.kind WHEN 'retry' THEN now() + r.delay_s * interval '1 second'
                                       WHEN 'gone' THEN 'infinity'
                                       ELSE o.next_attempt_at END,
        max_attempts     = CASE WHEN r.kind = 'gone' THEN greatest(o.max_attempts, o.attempts + 1)
                                ELSE o.max_attempts END,
        delivered_at     = CASE WHEN r.kind = 'delivered' THEN now() ELSE o.delivered_at END,
        locked_by        = NULL,
        locked_until     = NULL,
        last_status_code = r.status_code,
        last_error       = CASE WHEN r.error_kind IS NULL THEN NULL
                                ELSE r.error_kind || ': ' || coalesce(r.error, '') END
    FROM r
    WHERE o.id = r.id AND o.attempts = r.attempt AND o.locked_by = $1 AND o.status = 'pending'
    RETURNING o.id, o.endpoint_id, r.kind
), gone AS (
    UPDATE postbox.endpoints e
    SET disabled_at = now(), disabled_reason = '410 Gone'
    WHERE e.id IN (SELECT endpoint_id FROM done WHERE kind = 'gone') AND e.disabled_at IS NULL
    RETURNING e.id
), parked AS (
    UPDATE postbox.outbox o SET next_attempt_at = 'infinity'
    WHERE o.endpoint_id IN (SELECT id FROM gone) AND o.status = 'pending' AND o.locked_by IS NULL
      AND o.id NOT IN (SELECT id FROM done)
), logged AS (
    INSERT INTO postbox.attempts (outbox_id, attempt, worker_id, started_at, duration_ms, status_code,
                                  error_kind, error, response_body)
    SELECT r.id, r.attempt, $1, r.started_at, r.duration_ms, r.status_code, r.error_kind, r.error,
           r.response_body
    FROM r JOIN done ON done.id = r.id
    ON CONFLICT (outbox_id, attempt) DO NOTHING
)
SELECT id FROM done
"#,
    )
    .bind(worker_id)
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
    .fetch_all(pool)
    .await
}

/// Gives leases back without an outcome (a delivery cut short by shutdown):
/// the rows are due again at once and the unfinished attempt is not counted.
pub async fn release(pool: &PgPool, worker_id: &str, leases: &[(Uuid, i32)]) -> Result<u64, sqlx::Error> {
    let (ids, attempts): (Vec<Uuid>, Vec<i32>) = leases.iter().copied().unzip();
    let r = sqlx::query(
        r#"
UPDATE postbox.outbox o
SET attempts = o.attempts - 1, locked_by = NULL, locked_until = NULL, next_attempt_at = now()
FROM unnest($2::uuid[], $3::int4[]) AS l(id, attempt)
WHERE o.id = l.id AND o.attempts = l.attempt AND o.locked_by = $1 AND o.status = 'pending'
"#,
    )
    .bind(worker_id)
    .bind(ids)
    .bind(attempts)
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}
