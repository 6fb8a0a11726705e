//! The worker: claim due events, deliver them with bounded concurrency,
//! record every outcome.
//!
//! Three tasks cooperate. The claim loop (the caller's task) claims batches
//! while there is free capacity and sleeps on a LISTEN/NOTIFY wake-up, the
//! poll interval or a finished delivery. Each delivery runs in its own task,
//! outside any transaction. The recorder writes finished attempts in batches
//! (one statement per batch) and retries with backoff while the database is
//! away, so an outage loses no outcome.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::config::{ConfigError, WorkerConfig};
use crate::delivery::{AttemptResult, Client, ClientError, Decision, Secrets};
use crate::store::{self, Claimed, Outcome, Transition};

/// The channel `postbox.enqueue` notifies.
pub const NOTIFY_CHANNEL: &str = "postbox_outbox";

/// Outcomes written per statement, at most.
const RECORD_BATCH: usize = 512;

/// How long the recorder waits for more outcomes when it has only a few.
const RECORD_LINGER: Duration = Duration::from_millis(2);

/// While claims find events but fewer than asked for, how soon to look
/// again (a NOTIFY may come sooner).
const BUSY_POLL: Duration = Duration::from_millis(5);

/// The shortest idle sleep: when work is due but every endpoint that has it
/// is being claimed by another worker at that instant, look again this soon.
const MIN_NAP: Duration = Duration::from_millis(5);

/// The worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The HTTP client could not be built.
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Counts of what a worker did, returned by [`Worker::run`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RunStats {
    /// Attempts made.
    pub attempts: u64,
    /// Events delivered.
    pub delivered: u64,
    /// Events that exhausted their attempts (or were blocked).
    pub failed: u64,
    /// Attempts that will be retried.
    pub retried: u64,
    /// Outcomes dropped because the lease had passed to another attempt.
    pub fenced: u64,
}

/// Builds a [`Worker`].
#[derive(Debug)]
pub struct WorkerBuilder {
    pool: PgPool,
    config: WorkerConfig,
}

impl WorkerBuilder {
    /// Replaces the whole configuration.
    pub fn config(mut self, config: WorkerConfig) -> Self {
        self.config = config;
        self
    }

    /// Sets the worker id.
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.config.worker_id = id.into();
        self
    }

    /// Sets the default signing secrets.
    pub fn signing_secret(mut self, secrets: Secrets) -> Self {
        self.config.signing_secret = Some(secrets);
        self
    }

    /// Exit once nothing is due or in flight.
    pub fn until_empty(mut self, yes: bool) -> Self {
        self.config.until_empty = yes;
        self
    }

    /// Validates the configuration and builds the HTTP client.
    pub fn build(self) -> Result<Worker, WorkerError> {
        self.config.validate()?;
        let client = Client::new(self.config.client.clone())?;
        Ok(Worker {
            pool: self.pool,
            config: Arc::new(self.config),
            client,
        })
    }
}

/// A webhook worker. Run any number of them, in any number of processes.
#[derive(Debug)]
pub struct Worker {
    pool: PgPool,
    config: Arc<WorkerConfig>,
    client: Client,
}

/// What the recorder is asked to write.
enum Record {
    Outcome(Outcome),
    Release(Uuid, i32),
}

/// State shared by the claim loop, the deliveries and the recorder.
struct Shared {
    config: Arc<WorkerConfig>,
    client: Client,
    records: mpsc::UnboundedSender<Record>,
    /// Records sent but not yet written (for `--until-empty`).
    unrecorded: AtomicUsize,
    /// Leases held by running deliveries: released if shutdown cuts them short.
    in_flight: Mutex<HashMap<Uuid, i32>>,
    /// Signalled when a delivery finishes or a batch is recorded.
    progress: Notify,
    /// Signalled when recorded outcomes scheduled events for later (retries,
    /// releases): the idle claim loop recomputes when to look again.
    rescheduled: Notify,
    attempts: AtomicU64,
    delivered: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
}

impl Worker {
    /// Starts building a worker on `pool` with the default configuration.
    pub fn builder(pool: PgPool) -> WorkerBuilder {
        WorkerBuilder {
            pool,
            config: WorkerConfig::default(),
        }
    }

    /// This worker's id.
    pub fn id(&self) -> &str {
        &self.config.worker_id
    }

    /// Runs until `shutdown` completes (or, with `until_empty`, until
    /// nothing is left to do). On shutdown it stops claiming, lets in-flight
    /// deliveries finish within the grace period, releases the leases of any
    /// it had to cut short, and records every outcome before returning.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> RunStats {
        let (stop_tx, mut stop) = watch::channel(false);
        let stopper = tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let (records, records_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            config: self.config.clone(),
            client: self.client.clone(),
            records,
            unrecorded: AtomicUsize::new(0),
            in_flight: Mutex::new(HashMap::new()),
            progress: Notify::new(),
            rescheduled: Notify::new(),
            attempts: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retried: AtomicU64::new(0),
        });
        let recorder = tokio::spawn(record_loop(self.pool.clone(), shared.clone(), records_rx));
        let wake = Arc::new(Notify::new());
        let listener = tokio::spawn(listen_loop(self.pool.clone(), wake.clone()));
        let pruner = self.config.retention.map(|keep| {
            tokio::spawn(prune_loop(
                self.pool.clone(),
                keep,
                self.config.failed_retention,
                self.config.retention_interval,
            ))
        });
        info!(worker_id = %self.config.worker_id, concurrency = self.config.concurrency, "worker started");

        let slots = Arc::new(Semaphore::new(self.config.concurrency));
        let mut tasks = JoinSet::new();
        let mut errors = 0u32;
        // Whether a claim may find something: at start, after a NOTIFY, an
        // outcome that rescheduled events, the idle deadline, or a claim that
        // came back full. Cleared by a claim that found less than it asked.
        let mut work = true;
        // While idle: when to look again (the earliest wake-up the database
        // knows of, capped by the poll interval).
        let mut deadline = Instant::now();
        // Whether this worker is registered in postbox.sleeping_workers (so
        // enqueues notify it). It is, unless it is saturated: then it claims
        // again as soon as slots free up, and the enqueues that keep it busy
        // need not take the lock a NOTIFY takes at commit.
        let mut sleeping = false;
        loop {
            if *stop.borrow() {
                break;
            }
            while tasks.try_join_next().is_some() {}
            let free = slots.available_permits();
            // Claim in batches: while deliveries are running, wait until a
            // quarter of the slots (or of the batch size) is free, so that a
            // busy worker makes a few large claims rather than many small ones.
            let refill = (self.config.batch_size.min(self.config.concurrency) / 4).max(1);
            let slots_ready = free > 0 && (free >= refill || free == self.config.concurrency);
            if work && slots_ready {
                let want = free.min(self.config.batch_size);
                let claimed = store::claim(&self.pool, &self.config.worker_id, want as i64, self.config.lease).await;
                let rows = match claimed {
                    Ok(rows) => {
                        errors = 0;
                        rows
                    }
                    Err(e) => {
                        errors = errors.saturating_add(1);
                        let delay = reconnect_delay(errors);
                        warn!(error = %e, retry_in = ?delay, "claim failed; the database may be away");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = stop.changed() => {}
                        }
                        continue;
                    }
                };
                let got = rows.len();
                if got > 0 {
                    metrics::histogram!("postbox_claim_batch_size").record(got as f64);
                }
                let claimed_at = Instant::now();
                for row in rows {
                    let Ok(permit) = slots.clone().try_acquire_owned() else {
                        // More rows than free slots would be a claim bug; give the lease back.
                        warn!(event_id = %row.id, "claimed more events than free slots; releasing one");
                        shared.unrecorded.fetch_add(1, Ordering::SeqCst);
                        let _ = shared.records.send(Record::Release(row.id, row.attempt));
                        continue;
                    };
                    shared
                        .in_flight
                        .lock()
                        .expect("in-flight map")
                        .insert(row.id, row.attempt);
                    tasks.spawn(deliver(shared.clone(), row, claimed_at, permit));
                }
                // A full claim may have left more behind: claim again as soon
                // as slots allow.
                work = got >= want;
                if got > 0 {
                    // Saturated (a full claim): enqueues need not notify this
                    // worker, it looks by itself. Otherwise keep receiving
                    // NOTIFYs, and look again shortly in any case.
                    if sleeping && work {
                        sleeping = false;
                        let _ = store::awake(&self.pool, &self.config.worker_id).await;
                    }
                    deadline = Instant::now() + BUSY_POLL;
                    continue;
                }
                if self.config.until_empty
                    && slots.available_permits() == self.config.concurrency
                    && shared.unrecorded.load(Ordering::SeqCst) == 0
                    && !store::has_due(&self.pool).await.unwrap_or(true)
                {
                    info!("nothing due or in flight; exiting (--until-empty)");
                    break;
                }
                // Nothing to claim: register as sleeping, so that enqueues
                // send a NOTIFY, look once more (for an event committed just
                // before), and sleep until the earliest wake-up the database
                // knows of (a retry, the end of a pause or of a breaker's
                // cool-down, a lease that may expire), capped by the poll
                // interval, or until told.
                if !sleeping {
                    sleeping = store::asleep(&self.pool, &self.config.worker_id).await.is_ok();
                    work = true;
                } else {
                    let nap = match store::next_wake(&self.pool).await {
                        Ok(Some(d)) => d.clamp(MIN_NAP, self.config.poll_interval.max(MIN_NAP)),
                        Ok(None) | Err(_) => self.config.poll_interval,
                    };
                    deadline = Instant::now() + nap;
                }
                continue;
            }
            // Waiting for free slots (work to do) or for news (idle).
            let until = if work {
                Instant::now() + self.config.poll_interval
            } else {
                deadline
            };
            tokio::select! {
                _ = wake.notified() => work = true,
                _ = shared.rescheduled.notified() => work = true,
                _ = tokio::time::sleep_until(until) => work = true,
                _ = shared.progress.notified() => {
                    // --until-empty: once the last outcome is written, look
                    // (and exit if nothing is due).
                    if self.config.until_empty
                        && slots.available_permits() == self.config.concurrency
                        && shared.unrecorded.load(Ordering::SeqCst) == 0
                    {
                        work = true;
                    }
                }
                _ = stop.changed() => {}
            }
        }

        if sleeping {
            let _ = store::awake(&self.pool, &self.config.worker_id).await;
        }

        // Shutdown: let deliveries finish within the grace period.
        let running = shared.in_flight.lock().expect("in-flight map").len();
        if running > 0 {
            info!(in_flight = running, grace = ?self.config.shutdown_grace, "waiting for in-flight deliveries");
        }
        let drained = tokio::time::timeout(self.config.shutdown_grace, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
            let cut: Vec<(Uuid, i32)> = shared.in_flight.lock().expect("in-flight map").drain().collect();
            warn!(
                released = cut.len(),
                "grace period over; releasing the leases of unfinished deliveries"
            );
            for (id, attempt) in cut {
                shared.unrecorded.fetch_add(1, Ordering::SeqCst);
                let _ = shared.records.send(Record::Release(id, attempt));
            }
        }
        listener.abort();
        stopper.abort();
        if let Some(p) = pruner {
            p.abort();
        }
        let stats = RunStats {
            attempts: shared.attempts.load(Ordering::Relaxed),
            delivered: shared.delivered.load(Ordering::Relaxed),
            failed: shared.failed.load(Ordering::Relaxed),
            retried: shared.retried.load(Ordering::Relaxed),
            fenced: 0,
        };
        // The recorder ends once every sender is gone; give it the lease to
        // write what is left (after that the leases have expired anyway and
        // the events will be delivered again).
        let lease = self.config.lease;
        drop(shared);
        match tokio::time::timeout(lease, recorder).await {
            Ok(Ok(fenced)) => {
                info!(?stats, "worker stopped; every outcome recorded");
                RunStats { fenced, ..stats }
            }
            _ => {
                warn!("worker stopped before every outcome could be recorded; those events will be retried");
                stats
            }
        }
    }
}

/// Reconnect delay after `n` consecutive database errors: exponential from
/// 100 ms to 5 s, with jitter.
fn reconnect_delay(n: u32) -> Duration {
    let base = Duration::from_millis(100)
        .saturating_mul(1u32 << n.min(6).saturating_sub(1))
        .min(Duration::from_secs(5));
    base.mul_f64(0.5 + unit_random() * 0.5)
}

/// A number in [0, 1) from the OS random source (via UUIDv4).
fn unit_random() -> f64 {
    (Uuid::new_v4().as_u128() as u64 >> 11) as f64 / (1u64 << 53) as f64
}

/// Delivers one claimed event and hands the outcome to the recorder.
#[tracing::instrument(skip_all, fields(
    event_id = %row.id,
    conversation_id = row.payload["conversation_id"].as_str().unwrap_or_default(),
    message_id = row.payload["data"]["id"].as_str().unwrap_or_default(),
    endpoint_id = row.endpoint_id,
    attempt = row.attempt,
))]
async fn deliver(shared: Arc<Shared>, row: Claimed, claimed: Instant, permit: OwnedSemaphorePermit) {
    let config = &shared.config;
    // Database time at the start of this attempt: the claim's now() plus the
    // time elapsed since, so the worker's own clock never matters.
    let started_at = row.claimed_at + claimed.elapsed();
    let timestamp = started_at.timestamp();
    let id = row.id.to_string();
    let body = Bytes::from(serde_json::to_vec(&row.payload).expect("JSON values always serialise"));
    let own;
    let secrets = match row.secret.as_deref().map(Secrets::parse) {
        Some(Ok(s)) => {
            own = s;
            Some(&own)
        }
        Some(Err(e)) => {
            warn!(error = %e, "the endpoint's secret is invalid; using the default secret");
            config.signing_secret.as_ref()
        }
        None => config.signing_secret.as_ref(),
    };
    let signature = secrets.map(|s| s.sign(&id, timestamp, &body));
    let resp = shared
        .client
        .post(&row.url, &id, timestamp, signature.as_deref(), body)
        .await;

    let result = AttemptResult {
        status: resp.status,
        error: resp.error,
        retry_after: resp.retry_after,
    };
    let own_schedule = row.own_schedule();
    let decision = config.retry.decide_with(
        own_schedule.as_deref(),
        row.attempt,
        row.max_attempts,
        &result,
        unit_random(),
    );
    let kind = resp.error.map_or("success", |k| k.as_str());
    metrics::counter!("postbox_attempts_total", "result" => kind).increment(1);
    metrics::histogram!("postbox_delivery_duration_seconds").record(resp.elapsed.as_secs_f64());
    shared.attempts.fetch_add(1, Ordering::Relaxed);
    let transition = match decision {
        Decision::Delivered => {
            shared.delivered.fetch_add(1, Ordering::Relaxed);
            debug!(status = resp.status, ms = resp.elapsed.as_millis() as u64, "delivered");
            Transition::Delivered
        }
        Decision::Retry { after } => {
            shared.retried.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("postbox_retries_total").increment(1);
            info!(status = resp.status, error_kind = kind, error = resp.message.as_deref(), retry_in = ?after, "attempt failed; will retry");
            Transition::Retry(after)
        }
        Decision::Failed => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            warn!(
                status = resp.status,
                error_kind = kind,
                error = resp.message.as_deref(),
                "attempts exhausted; event failed"
            );
            Transition::Failed
        }
        Decision::Gone => {
            warn!(url = %row.url, "endpoint answered 410 Gone; disabling it (its events are kept)");
            Transition::Gone
        }
    };
    let outcome = Outcome {
        id: row.id,
        attempt: row.attempt,
        transition,
        started_at,
        duration: resp.elapsed,
        status_code: resp.status.map(i32::from),
        error_kind: resp.error.map(|k| k.as_str()),
        error: resp.message,
        response_body: resp.body,
        // Back-pressure: a receiver asking for time gets it for all its events.
        pause: match (resp.status, resp.retry_after) {
            (Some(429 | 503), Some(d)) if !d.is_zero() => Some(d.min(config.retry.max_retry_after)),
            _ => None,
        },
    };
    // From here on nothing awaits, so a shutdown abort cannot split sending
    // the outcome from forgetting the lease.
    shared.unrecorded.fetch_add(1, Ordering::SeqCst);
    let _ = shared.records.send(Record::Outcome(outcome));
    shared.in_flight.lock().expect("in-flight map").remove(&row.id);
    drop(permit);
    shared.progress.notify_one();
}

/// Writes outcomes in batches until every sender is gone; returns how many
/// were dropped by the lease fence.
async fn record_loop(pool: PgPool, shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Record>) -> u64 {
    let worker_id = shared.config.worker_id.clone();
    let breaker = shared.config.breaker.clone();
    // Only a weak reference: the channel closes when the last delivery and
    // the claim loop drop theirs.
    let weak = Arc::downgrade(&shared);
    drop(shared);
    let mut fenced_total = 0u64;
    let mut batch = Vec::with_capacity(RECORD_BATCH);
    while rx.recv_many(&mut batch, RECORD_BATCH).await > 0 {
        // Linger a moment for more: one statement (and one commit) for many
        // outcomes. Delivery is not delayed by this; only the bookkeeping is.
        if batch.len() < RECORD_BATCH / 8 {
            tokio::time::sleep(RECORD_LINGER).await;
            while batch.len() < RECORD_BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
        }
        let n = batch.len();
        let mut outcomes = Vec::with_capacity(n);
        let mut releases = Vec::new();
        for r in batch.drain(..) {
            match r {
                Record::Outcome(o) => outcomes.push(o),
                Record::Release(id, attempt) => releases.push((id, attempt)),
            }
        }
        let rescheduled =
            !releases.is_empty() || outcomes.iter().any(|o| !matches!(o.transition, Transition::Delivered));
        if !outcomes.is_empty() {
            let write = || store::record(&pool, &worker_id, &outcomes, &breaker);
            match write.retry(db_backoff()).when(is_transient).notify(log_retry).await {
                Ok(ids) => {
                    let fenced = outcomes.len() - ids.len();
                    if fenced > 0 {
                        fenced_total += fenced as u64;
                        metrics::counter!("postbox_fenced_outcomes_total").increment(fenced as u64);
                        warn!(fenced, "outcomes dropped: their lease had passed to a newer attempt");
                    }
                    let recorded: std::collections::HashSet<Uuid> = ids.into_iter().collect();
                    for o in &outcomes {
                        if !recorded.contains(&o.id) {
                            continue;
                        }
                        match o.transition {
                            Transition::Delivered => {
                                metrics::counter!("postbox_events_total", "outcome" => "delivered").increment(1)
                            }
                            Transition::Failed => {
                                metrics::counter!("postbox_events_total", "outcome" => "failed").increment(1)
                            }
                            _ => {}
                        }
                    }
                }
                Err(e) => {
                    warn!(error = %e, count = outcomes.len(), "could not record outcomes; the events will be retried after their lease")
                }
            }
        }
        if !releases.is_empty() {
            let write = || store::release(&pool, &worker_id, &releases);
            if let Err(e) = write.retry(db_backoff()).when(is_transient).notify(log_retry).await {
                warn!(error = %e, "could not release leases; they will expire by themselves");
            }
        }
        if let Some(s) = weak.upgrade() {
            s.unrecorded.fetch_sub(n, Ordering::SeqCst);
            s.progress.notify_one();
            if rescheduled {
                s.rescheduled.notify_one();
            }
        }
    }
    fenced_total
}

fn db_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
}

fn log_retry(e: &sqlx::Error, after: Duration) {
    warn!(error = %e, retry_in = ?after, "database unavailable; retrying");
}

/// Errors worth retrying: the connection, not the statement.
pub(crate) fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // connection exceptions, admin shutdown, serialization, deadlock, resources
            code.starts_with("08")
                || code.starts_with("57")
                || code.starts_with("53")
                || code == "40001"
                || code == "40P01"
        }
        _ => false,
    }
}

/// Listens for enqueue notifications and wakes the claim loop; reconnects
/// with backoff when the connection drops (polling covers the gap).
async fn listen_loop(pool: PgPool, wake: Arc<Notify>) {
    let mut failures = 0u32;
    loop {
        let listener = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen(NOTIFY_CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        match listener.await {
            Ok(mut l) => {
                failures = 0;
                wake.notify_one();
                loop {
                    match l.try_recv().await {
                        Ok(_) => wake.notify_one(),
                        Err(e) => {
                            warn!(error = %e, "LISTEN connection lost; reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                if failures == 1 {
                    warn!(error = %e, "cannot LISTEN for new events; polling until it can");
                }
            }
        }
        tokio::time::sleep(reconnect_delay(failures.max(1))).await;
    }
}

/// Retention: every `interval`, deletes finished events older than `keep`
/// in batches of 1,000 (at most 100 batches a round, so a large first
/// clean-up is spread out). One worker prunes at a time.
async fn prune_loop(pool: PgPool, keep: Duration, failed_keep: Option<Duration>, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        for _ in 0..100 {
            match store::prune(&pool, keep, failed_keep, 1000).await {
                Ok(Some(n)) => {
                    if n > 0 {
                        metrics::counter!("postbox_retention_deleted_total").increment(n);
                        debug!(deleted = n, "pruned finished events");
                    }
                    if n < 1000 {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    debug!(error = %e, "pruning failed; will try again");
                    break;
                }
            }
        }
    }
}
