//! The worker: claim due events, deliver them with bounded concurrency,
//! record every outcome.
//!
//! Three tasks cooperate. The claim loop (the caller's task) claims batches
//! while there is free capacity and sleeps on a LISTEN/NOTIFY wake-up, the
//! poll interval or a finished delivery. Each delivery runs in its own task,
//! outside any transaction. The recorder writes finished attempts in batches
//! (one statement per batch) and retries with backoff while the database is
//! away, so an outage loses no outcome.
//!
//! One file per job: this one holds the claim loop and shutdown;
//! `attempt` makes one delivery attempt and decides what follows,
//! `recorder` writes outcomes in batches, `wake` listens for NOTIFYs,
//! `retention` prunes finished events, and `db_error` says which
//! database errors are worth retrying and how long to wait (one backoff,
//! `backon`'s).

mod attempt;
mod db_error;
mod recorder;
mod retention;
mod wake;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{info, warn};
use uuid::Uuid;

use crate::config::{ConfigError, WorkerConfig};
use crate::delivery::{Client, ClientError};
use crate::store::{self, Outcome};

pub use wake::NOTIFY_CHANNEL;

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
    /// The worker LISTENs on one of `pool`'s connections (the retention
    /// pass uses the others); its claim loop and its outcomes each use one
    /// more connection, made with `pool`'s settings while it runs.
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
        let mut claims = Kept::new(&self.pool);
        let recorder = tokio::spawn(recorder::record_loop(Kept::new(&self.pool), shared.clone(), records_rx));
        let wake = Arc::new(Notify::new());
        let listener = tokio::spawn(wake::listen_loop(self.pool.clone(), wake.clone()));
        let pruner = self.config.retention.map(|keep| {
            tokio::spawn(retention::prune_loop(
                self.pool.clone(),
                keep,
                self.config.failed_retention,
                self.config.retention_interval,
            ))
        });
        info!(worker_id = %self.config.worker_id, concurrency = self.config.concurrency, "worker started");

        let slots = Arc::new(Semaphore::new(self.config.concurrency));
        let mut tasks = JoinSet::new();
        // Set while claims fail (the database is away): the next delay.
        let mut backoff = None;
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
            // Nor while the recorder is a whole concurrency's worth of
            // outcomes behind: those leases still count against their
            // endpoints' max_in_flight, and more claims would only lengthen
            // the queue. (At least as many as the recorder lingers for, so a
            // worker with few slots never waits for each linger.) Every
            // recorded batch wakes this loop (progress).
            let recorder_behind =
                shared.unrecorded.load(Ordering::SeqCst) >= self.config.concurrency.max(recorder::LINGER_BELOW);
            let slots_ready = free > 0 && (free >= refill || free == self.config.concurrency) && !recorder_behind;
            if work && slots_ready {
                let want = free.min(self.config.batch_size);
                let (id, lease) = (&self.config.worker_id, self.config.lease);
                let claimed = claims
                    .with(async |c| store::claim(c, id, want as i64, lease).await)
                    .await;
                let rows = match claimed {
                    Ok(rows) => {
                        backoff = None;
                        rows
                    }
                    Err(e) => {
                        let delay = db_error::next_delay(&mut backoff);
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
                    tasks.spawn(attempt::deliver(shared.clone(), row, claimed_at, permit));
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
                        let id = &self.config.worker_id;
                        let _ = claims.with(async |c| store::awake(c, id).await).await;
                    }
                    deadline = Instant::now() + BUSY_POLL;
                    continue;
                }
                if self.config.until_empty
                    && slots.available_permits() == self.config.concurrency
                    && shared.unrecorded.load(Ordering::SeqCst) == 0
                    && !claims.with(async |c| store::has_due(c).await).await.unwrap_or(true)
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
                    let id = &self.config.worker_id;
                    sleeping = claims.with(async |c| store::asleep(c, id).await).await.is_ok();
                    work = true;
                } else {
                    let nap = match claims.with(async |c| store::next_wake(c).await).await {
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
            let id = &self.config.worker_id;
            let _ = claims.with(async |c| store::awake(c, id).await).await;
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
        let stats = match tokio::time::timeout(lease, recorder).await {
            Ok(Ok(fenced)) => {
                info!(?stats, "worker stopped; every outcome recorded");
                RunStats { fenced, ..stats }
            }
            _ => {
                warn!("worker stopped before every outcome could be recorded; those events will be retried");
                stats
            }
        };
        claims.close().await;
        stats
    }
}

/// A connection kept for one kind of call: the claim loop's, or the
/// outcomes'.
///
/// PostgreSQL plans the statements of a PL/pgSQL function once per
/// connection, the first time they run: the first `postbox.claim` on a
/// connection costs about 10 ms, the later ones about 0.5 ms, and
/// `postbox.record` alike. A shared pool hands its idle connections out in
/// turn, so claims and outcomes taking turns on its connections paid that
/// set-up once per connection, right when the worker starts working (and
/// again whenever the pool replaced a connection); and sqlx tests a pooled
/// connection with a round trip when it is handed out and again when it
/// comes back, two round trips around every claim. The claim loop and the
/// outcomes therefore each keep one connection checked out of a pool of one
/// made with the shared pool's connect options, timeouts and hooks. The
/// claim loop's other questions (is anything due, when to look again, the
/// NOTIFY registration) go on its connection too, where the tables they
/// read are already known: on a connection that had not read them,
/// `postbox.has_due()` took 5.8 ms instead of well under one. After an error
/// the connection goes back to its pool, which tests it and replaces it if
/// it is broken.
struct Kept {
    pool: PgPool,
    conn: Option<PoolConnection<Postgres>>,
}

impl Kept {
    fn new(shared: &PgPool) -> Self {
        let pool = shared
            .options()
            .clone()
            .max_connections(1)
            .min_connections(0)
            .connect_lazy_with((*shared.connect_options()).clone());
        Kept { pool, conn: None }
    }

    /// Runs `call` on the kept connection (taking one first if there is
    /// none); gives the connection back after an error.
    async fn with<T>(
        &mut self,
        call: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, sqlx::Error> {
        let conn = match self.conn.take() {
            Some(c) => c,
            None => self.pool.acquire().await?,
        };
        let result = call(&mut **self.conn.insert(conn)).await;
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    /// Gives the connection back and closes the pool.
    async fn close(mut self) {
        self.conn = None;
        self.pool.close().await;
    }
}
