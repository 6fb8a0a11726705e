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

/// Claims up to `limit` due events, honouring every endpoint's limits.
///
/// The work is done by the SQL function `postbox.claim` (migration 0002),
/// which locks the endpoints with due events (`FOR UPDATE SKIP LOCKED`, so
/// concurrent workers never wait on each other and never account for the
/// same endpoint at once), then, in a second statement whose snapshot sees
/// every claim committed before those locks, gives each endpoint a budget
/// (in-flight limit, rate window, breaker probe, fair share) and claims that
/// many due rows with `FOR UPDATE SKIP LOCKED`: counting the attempt and
/// moving `next_attempt_at` to the end of the lease. Once committed the rows
/// are not due, so no other worker can claim them until the lease expires,
/// at which point they are due again with no sweeper needed.
///
/// Rows whose previous holder never recorded an outcome get that lost
/// attempt written to `postbox.attempts`; if it was their last attempt they
/// become `failed` instead of being delivered again.
pub async fn claim(pool: &PgPool, worker_id: &str, limit: i64, lease: Duration) -> Result<Vec<Claimed>, sqlx::Error> {
    sqlx::query_as::<_, Claimed>(
        "SELECT id, attempt, max_attempts, payload, endpoint_id, url, secret, claimed_at
         FROM postbox.claim($1, $2, $3)",
    )
    .bind(worker_id)
    .bind(i32::try_from(limit).unwrap_or(i32::MAX))
    .bind(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await
}

/// True while some event is due now for an endpoint that may receive it
/// (enabled, not paused, breaker not open): `--until-empty` keeps going
/// until this is false, even when endpoint limits hold those events back
/// for a while.
pub async fn has_due(pool: &PgPool) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (
             SELECT 1 FROM postbox.outbox o JOIN postbox.endpoints e ON e.id = o.endpoint_id
             WHERE o.status = 'pending' AND o.next_attempt_at <= now() AND e.disabled_at IS NULL
               AND (e.paused_until IS NULL OR e.paused_until <= now())
               AND (e.breaker_open_until IS NULL OR e.breaker_open_until <= now()))",
    )
    .fetch_one(pool)
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
    /// Back-pressure: pause the whole endpoint this long (a 429/503 `Retry-After`).
    pub pause: Option<Duration>,
}

/// Circuit-breaker settings, applied when outcomes are recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerPolicy {
    /// The breaker opens when this many distinct events of an endpoint have
    /// failed in a row (no success in between). One event's own retries
    /// therefore never open it.
    pub threshold: u32,
    /// How long it stays open before the first probe.
    pub cooldown: Duration,
    /// Each failed probe doubles the cool-down, up to this.
    pub max_cooldown: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            threshold: 5,
            cooldown: Duration::from_secs(30),
            max_cooldown: Duration::from_secs(600),
        }
    }
}

/// Writes a batch of outcomes in one statement: the outbox rows, the
/// `attempts` log rows, and the endpoint state they change (410 disables,
/// `Retry-After` pauses, the circuit breaker).
///
/// The fence: a row is updated only while it is still `pending`, leased by
/// this worker, and at the attempt number this worker claimed. If the lease
/// expired and another claim (by any worker, this one included) has since
/// counted a new attempt, the stale outcome is dropped, so a slow worker can
/// never overwrite a newer attempt. Returns the ids that were recorded.
///
/// Endpoint rows are only written when something changes for them (a
/// failure, a 410, a pause, or the first success after failures), so healthy
/// endpoints cost nothing here.
pub async fn record(
    pool: &PgPool,
    worker_id: &str,
    outcomes: &[Outcome],
    breaker: &BreakerPolicy,
) -> Result<Vec<Uuid>, sqlx::Error> {
    let n = outcomes.len();
    let mut ids = Vec::with_capacity(n);
    let mut attempts = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    let mut delays = Vec::with_capacity(n);
    let mut codes = Vec::with_capacity(n);
    let mut error_kinds = Vec::with_capacity(n);
    let mut errors = Vec::with_capacity(n);
    let mut started = Vec::with_capacity(n);
    let mut durations = Vec::with_capacity(n);
    let mut bodies = Vec::with_capacity(n);
    let mut pauses = Vec::with_capacity(n);
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
        pauses.push(o.pause.map_or(0.0, |d| d.as_secs_f64()));
    }
    sqlx::query_scalar(
        r#"
WITH r AS (
    SELECT * FROM unnest($2::uuid[], $3::int4[], $4::text[], $5::float8[], $6::int4[], $7::text[],
                         $8::text[], $9::timestamptz[], $10::int4[], $11::text[], $12::float8[])
        AS r(id, attempt, kind, delay_s, status_code, error_kind, error, started_at, duration_ms,
             response_body, pause_s)
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
    RETURNING o.id, o.endpoint_id, r.kind, r.error_kind, r.pause_s
), ep AS (
    SELECT d.endpoint_id,
           bool_or(d.kind = 'delivered') AS ok,
           bool_or(d.kind = 'gone') AS gone,
           count(*) FILTER (WHERE d.kind IN ('retry', 'failed') AND d.error_kind <> 'blocked')::int AS failures,
           coalesce(array_agg(DISTINCT d.id) FILTER (WHERE d.kind IN ('retry', 'failed')
                                                     AND d.error_kind <> 'blocked'), '{}') AS failed_ids,
           max(d.pause_s) AS pause_s
    FROM done d GROUP BY d.endpoint_id
), endpoint AS (
    UPDATE postbox.endpoints e
    SET disabled_at        = CASE WHEN ep.gone THEN coalesce(e.disabled_at, now()) ELSE e.disabled_at END,
        disabled_reason    = CASE WHEN ep.gone AND e.disabled_at IS NULL THEN '410 Gone'
                                  ELSE e.disabled_reason END,
        paused_until       = CASE WHEN ep.pause_s > 0
                                  THEN greatest(e.paused_until, now() + ep.pause_s * interval '1 second')
                                  ELSE e.paused_until END,
        failure_streak     = CASE WHEN ep.ok THEN 0 ELSE e.failure_streak + ep.failures END,
        failing_events     = CASE WHEN ep.ok THEN '{}'
                                  ELSE coalesce((SELECT (array_agg(DISTINCT x))[1:$13]
                                                 FROM unnest(e.failing_events || ep.failed_ids) x), '{}')
                             END,
        breaker_open_until = CASE
            WHEN ep.ok THEN NULL
            WHEN ep.failures = 0 THEN e.breaker_open_until
            -- A failure while open (a failed probe): open again, for longer.
            WHEN e.breaker_open_until IS NOT NULL
                THEN now() + least(coalesce(e.breaker_cooldown, $14 * interval '1 second') * 2, $15 * interval '1 second')
            WHEN (SELECT count(DISTINCT x) FROM unnest(e.failing_events || ep.failed_ids) x) >= $13
                THEN now() + $14 * interval '1 second'
            ELSE NULL END,
        breaker_cooldown   = CASE
            WHEN ep.ok THEN NULL
            WHEN ep.failures = 0 THEN e.breaker_cooldown
            WHEN e.breaker_open_until IS NOT NULL
                THEN least(coalesce(e.breaker_cooldown, $14 * interval '1 second') * 2, $15 * interval '1 second')
            WHEN (SELECT count(DISTINCT x) FROM unnest(e.failing_events || ep.failed_ids) x) >= $13
                THEN $14 * interval '1 second'
            ELSE e.breaker_cooldown END
    FROM ep
    WHERE e.id = ep.endpoint_id
      AND (NOT ep.ok OR ep.gone OR ep.pause_s > 0 OR e.failure_streak > 0 OR e.breaker_open_until IS NOT NULL)
    RETURNING e.id, ep.gone
), parked AS (
    UPDATE postbox.outbox o SET next_attempt_at = 'infinity'
    WHERE o.endpoint_id IN (SELECT id FROM endpoint WHERE gone) AND o.status = 'pending' AND o.locked_by IS NULL
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
    .bind(pauses)
    .bind(i32::try_from(breaker.threshold.max(1)).unwrap_or(i32::MAX))
    .bind(breaker.cooldown.as_secs_f64())
    .bind(breaker.max_cooldown.as_secs_f64())
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

/// Advisory lock key held while pruning ("pbprune").
const PRUNE_LOCK: i64 = 0x0070_6270_7275_6e65;

/// Deletes up to `batch` finished events created more than `older_than`
/// ago (their attempts go with them): delivered and cancelled ones, and, when
/// `failed_older_than` is set, failed ones. One worker prunes at a time (a
/// transaction-level advisory lock); returns `None` when another worker is
/// pruning, else how many events were deleted.
pub async fn prune(
    pool: &PgPool,
    older_than: Duration,
    failed_older_than: Option<Duration>,
    batch: i64,
) -> Result<Option<u64>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(PRUNE_LOCK)
        .fetch_one(&mut *tx)
        .await?;
    if !locked {
        return Ok(None);
    }
    // Event ids are UUIDv7, so "created before the cut-off" is a primary-key range.
    let mut deleted = 0;
    let rounds = [
        (Some(older_than), &["delivered", "cancelled"][..]),
        (failed_older_than, &["failed"][..]),
    ];
    for (age, statuses) in rounds {
        let Some(age) = age else { continue };
        deleted += sqlx::query(
            "DELETE FROM postbox.outbox WHERE id IN (
                 SELECT id FROM postbox.outbox
                 WHERE id < postbox.uuid_v7_at(now() - $1 * interval '1 second') AND status = ANY($2)
                 LIMIT $3)",
        )
        .bind(age.as_secs_f64())
        .bind(statuses)
        .bind(batch)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    }
    tx.commit().await?;
    Ok(Some(deleted))
}
