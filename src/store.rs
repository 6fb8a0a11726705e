//! The worker's SQL: claim due events, record outcomes, release leases.
//!
//! Every statement is a single round trip and a short transaction of its own;
//! no transaction or row lock is ever held across an HTTP request. All times
//! are the database's `now()`.

use std::borrow::Cow;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::config::BreakerPolicy;
use crate::delivery::{Decision, Next, Response};

/// One event claimed by this worker, with everything needed to deliver it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    /// Event id (`webhook-id`).
    pub id: Uuid,
    /// This attempt's number (1-based); also the lease token.
    pub attempt: i32,
    /// Attempts allowed in all.
    pub max_attempts: i32,
    /// The webhook body, exactly as stored: sent as it is, never parsed
    /// into a tree and written out again.
    pub payload: sqlx::types::Json<Box<serde_json::value::RawValue>>,
    /// The endpoint row.
    pub endpoint_id: i64,
    /// Where to send it.
    pub url: String,
    /// The endpoint's own secrets, if any.
    pub secret: Option<String>,
    /// Database time at the claim.
    pub claimed_at: DateTime<Utc>,
    /// The endpoint's own retry schedule in seconds (`None` = the worker's).
    pub retry_schedule: Option<sqlx::types::Json<Vec<f64>>>,
}

impl Claimed {
    /// The endpoint's own retry schedule, when it has one.
    pub fn own_schedule(&self) -> Option<Vec<Duration>> {
        let s = self.retry_schedule.as_ref()?;
        Some(s.0.iter().map(|secs| Duration::from_secs_f64(secs.max(0.0))).collect())
    }
}

/// A webhook body's conversation and message ids, for log lines (empty when
/// the body does not hold them), borrowed from the body.
pub fn support_ids(payload: &str) -> (Cow<'_, str>, Cow<'_, str>) {
    #[derive(serde::Deserialize)]
    struct Body<'a> {
        #[serde(borrow, default)]
        conversation_id: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        data: Option<Data<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Data<'a> {
        #[serde(borrow, default)]
        id: Option<Cow<'a, str>>,
    }
    match serde_json::from_str::<Body>(payload) {
        Ok(b) => (
            b.conversation_id.unwrap_or_default(),
            b.data.and_then(|d| d.id).unwrap_or_default(),
        ),
        Err(_) => Default::default(),
    }
}

/// Claims up to `limit` due events, honouring every endpoint's limits.
///
/// The work is done by the SQL function `postbox.claim_quick` (migrations
/// 0008 and 0009): the plain case (one endpoint with work and room for it)
/// in two statements, anything else by the full claim, `postbox.claim`
/// (migration 0002, where the concurrency argument is written out;
/// docs/dispatch.md has the invariants), with the same result. It serves
/// endpoints whose wake-up time has come or that have new events, each
/// under its `endpoint_state` row lock (`FOR UPDATE SKIP LOCKED`, so
/// workers skip each other's endpoints and never wait on applications; the
/// quick claim waits up to 50 ms for the row only when that endpoint is the
/// one with work), takes as many due events as each endpoint's limits
/// allow, and leases them:
/// `attempts + 1` and `next_attempt_at` moved to the lease's end, so they are
/// not due again unless the lease expires. Rows whose previous holder never
/// recorded an outcome get that lost attempt written to `postbox.attempts`;
/// if it was their last attempt they become `failed` instead.
pub async fn claim(
    conn: &mut PgConnection,
    worker_id: &str,
    limit: i64,
    lease: Duration,
) -> Result<Vec<Claimed>, sqlx::Error> {
    sqlx::query_as::<_, Claimed>(
        "SELECT id, attempt, max_attempts, payload, endpoint_id, url, secret, claimed_at, retry_schedule
         FROM postbox.claim_quick($1, $2, $3)",
    )
    .bind(worker_id)
    .bind(i32::try_from(limit).unwrap_or(i32::MAX))
    .bind(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX))
    .fetch_all(conn)
    .await
}

/// True while something is deliverable now or soon without outside help
/// (`postbox.has_due`, migrations 0002 and 0008): `--until-empty` keeps going until
/// this is false. Events held by a disabled, paused or broken endpoint, or
/// scheduled for later, do not keep it.
pub async fn has_due(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT postbox.has_due()").fetch_one(conn).await
}

/// How long until a claim may find something (`postbox.next_wake`): the
/// earliest endpoint wake-up or unnoticed event, measured in database time.
/// `None` when nothing is scheduled at all.
pub async fn next_wake(conn: &mut PgConnection) -> Result<Option<Duration>, sqlx::Error> {
    let secs: Option<f64> = sqlx::query_scalar("SELECT extract(epoch FROM postbox.next_wake())::float8")
        .fetch_one(conn)
        .await?;
    Ok(secs.map(|s| Duration::from_secs_f64(s.max(0.0))))
}

/// Registers the worker as sleeping: from now on enqueues send a NOTIFY
/// (`postbox.enqueue` notifies only while some worker sleeps).
pub async fn asleep(conn: &mut PgConnection, worker_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO postbox.sleeping_workers (worker_id) VALUES ($1)
         ON CONFLICT (worker_id) DO UPDATE SET since = now()",
    )
    .bind(worker_id)
    .execute(conn)
    .await
    .map(drop)
}

/// The worker is busy again: enqueues need not notify it.
pub async fn awake(conn: &mut PgConnection, worker_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM postbox.sleeping_workers WHERE worker_id = $1")
        .bind(worker_id)
        .execute(conn)
        .await
        .map(drop)
}

/// One finished attempt, ready to be written: the response as the client
/// saw it and the decision taken on it, both written as they are.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Event id.
    pub id: Uuid,
    /// The attempt number claimed (the lease token).
    pub attempt: i32,
    /// Database time when the request started.
    pub started_at: DateTime<Utc>,
    /// What the attempt produced.
    pub response: Response,
    /// What happens next, to the event and its endpoint.
    pub decision: Decision,
}

/// Writes a batch of outcomes with `postbox.record` (migration 0002): the
/// outbox rows, the `attempts` log rows, and the endpoint state they change
/// (leases given back, 410 disables, `Retry-After` pauses, the circuit
/// breaker).
///
/// The fence: a row is updated only while it is still `pending`, leased by
/// this worker, and at the attempt number this worker claimed, so a slow
/// worker never overwrites a newer attempt. A 2xx is recorded even late
/// (while the row is pending or failed and no other lease runs): an
/// acknowledged delivery is never recorded as failed. Returns the ids that
/// were recorded.
pub async fn record(
    conn: &mut PgConnection,
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
        let r = &o.response;
        ids.push(o.id);
        attempts.push(o.attempt);
        kinds.push(o.decision.next.as_str());
        delays.push(match o.decision.next {
            Next::Retry { after } => after.as_secs_f64(),
            _ => 0.0,
        });
        codes.push(r.status.map(i32::from));
        error_kinds.push(r.error.map(|k| k.as_str()));
        errors.push(r.message.as_deref());
        started.push(o.started_at);
        durations.push(i32::try_from(r.elapsed.as_millis()).unwrap_or(i32::MAX));
        bodies.push(r.body.as_deref());
        pauses.push(o.decision.pause.map_or(0.0, |d| d.as_secs_f64()));
    }
    sqlx::query_scalar("SELECT postbox.record($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)")
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
        .fetch_all(conn)
        .await
}

/// Gives leases back without an outcome (a delivery cut short by shutdown):
/// the rows are due again at once and the unfinished attempt is not counted.
pub async fn release(conn: &mut PgConnection, worker_id: &str, leases: &[(Uuid, i32)]) -> Result<u64, sqlx::Error> {
    let (ids, attempts): (Vec<Uuid>, Vec<i32>) = leases.iter().copied().unzip();
    let n: i32 = sqlx::query_scalar("SELECT postbox.release($1, $2, $3)")
        .bind(worker_id)
        .bind(ids)
        .bind(attempts)
        .fetch_one(conn)
        .await?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Deletes up to `batch` finished events created more than `older_than`
/// ago (their attempts go with them): delivered and cancelled ones, and, when
/// `failed_older_than` is set, failed ones (`postbox.prune`, migration 0002:
/// only rows still terminal when deleted). One worker prunes at a time;
/// returns `None` when another worker is pruning, else how many events were
/// deleted.
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
    Ok(n.map(|n| u64::try_from(n).unwrap_or(0)))
}
