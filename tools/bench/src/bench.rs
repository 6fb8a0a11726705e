//! The scenarios, the receiver process and the /proc sampling.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::serve::ListenerExt;
use axum::Router;
use postbox_support::throwaway::{Cluster, Durability};
use sqlx::PgPool;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::{connect, Failure};

/// The signing secret the benchmark's workers sign with (as in production).
const SIGNING_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// How often a worker's memory and CPU are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(25);

/// Events per bulk enqueue statement (one transaction each).
const ENQUEUE_CHUNK: u64 = 1000;

/// Connections the latency scenario enqueues on, so a slow commit never
/// holds back the next event (the offered load stays steady).
const ENQUEUE_CONNECTIONS: u32 = 16;

/// Clock ticks per second in `/proc/*/stat` and `/proc/stat` (USER_HZ, 100
/// on every mainstream Linux build).
const CLOCK_TICKS: f64 = 100.0;

/// The benchmark's settings.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The server the benchmark databases are created on; unset = a
    /// throwaway cluster with PostgreSQL's default durability.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Events per drain.
    #[arg(long, default_value_t = 20_000)]
    events: u64,
    /// Distinct callback URLs the events are spread over.
    #[arg(long, default_value_t = 10)]
    endpoints: u64,
    /// Worker process counts to drain with, comma separated (e.g. 1,2,4).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    workers: Vec<usize>,
    /// POSTBOX_CONCURRENCY of each worker (drain and latency).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// POSTBOX_CONCURRENCY of each worker when the receiver is slow.
    #[arg(long, default_value_t = 256)]
    delay_concurrency: usize,
    /// POSTBOX_BATCH_SIZE of each worker.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Events per second in the latency scenario.
    #[arg(long, default_value_t = 500)]
    latency_rate: u64,
    /// How long the latency scenario enqueues, in seconds.
    #[arg(long, default_value_t = 10)]
    latency_seconds: u64,
    /// The slow receiver's delay per request, in milliseconds.
    #[arg(long, default_value_t = 20)]
    delay_ms: u64,
    /// Skip the latency scenario.
    #[arg(long)]
    skip_latency: bool,
    /// Skip the slow-receiver drains.
    #[arg(long)]
    skip_delay: bool,
    /// Skip every drain (measure latency only).
    #[arg(long)]
    skip_drain: bool,
}

/// The receiver process's settings (started by the benchmark itself).
#[derive(Debug, clap::Args)]
pub struct ReceiverArgs {
    /// Address to listen on; the bound address is printed as the first line.
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
    /// Wait this many milliseconds before answering each request.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// File receiving one line `webhook-id arrival-unix-micros` per request.
    #[arg(long)]
    out: PathBuf,
}

impl BenchArgs {
    fn validate(&self) -> Result<(), Failure> {
        let bad = |m: &str| Err(Failure::Usage(m.to_owned()));
        if self.events == 0 || self.endpoints == 0 {
            return bad("--events and --endpoints must be at least 1");
        }
        if self.workers.is_empty() || self.workers.contains(&0) {
            return bad("--workers needs worker counts of at least 1, e.g. 1,2,4");
        }
        if self.latency_rate == 0 || self.latency_seconds == 0 {
            return bad("--latency-rate and --latency-seconds must be at least 1");
        }
        Ok(())
    }

    /// The drains to run, in order.
    fn drains(&self) -> Vec<Drain> {
        if self.skip_drain {
            return Vec::new();
        }
        let plain = self.workers.iter().map(|&workers| Drain {
            workers,
            delay_ms: 0,
            concurrency: self.concurrency,
        });
        let slow = self.workers.iter().map(|&workers| Drain {
            workers,
            delay_ms: self.delay_ms,
            concurrency: self.delay_concurrency,
        });
        if self.skip_delay {
            plain.collect()
        } else {
            plain.chain(slow).collect()
        }
    }
}

/// One drain scenario.
#[derive(Debug, Clone, Copy)]
struct Drain {
    workers: usize,
    delay_ms: u64,
    concurrency: usize,
}

impl Drain {
    fn label(&self) -> String {
        if self.delay_ms == 0 {
            "drain".into()
        } else {
            format!("drain, {} ms receiver", self.delay_ms)
        }
    }
}

// ---------------------------------------------------------------------------
// The benchmark
// ---------------------------------------------------------------------------

/// Runs every scenario, prints the results, and fails if any event was lost.
pub async fn run(a: BenchArgs) -> Result<(), Failure> {
    a.validate()?;
    let (server_url, cluster) = server(&a).await?;
    let admin = connect(&server_url, 2).await?;
    print_machine(&admin, cluster.is_none()).await?;

    let mut drains = Vec::new();
    for drain in a.drains() {
        let db = BenchDb::create(&admin, &server_url).await?;
        let report = run_drain(&a, &db, drain).await;
        db.drop(&admin).await;
        drains.push(report?);
    }
    let latency = if a.skip_latency {
        None
    } else {
        let db = BenchDb::create(&admin, &server_url).await?;
        let report = run_latency(&a, &db).await;
        db.drop(&admin).await;
        Some(report?)
    };
    admin.close().await;

    print_results(&drains, latency.as_ref());
    let problems: Vec<String> = drains
        .iter()
        .map(|d| (d.label.clone(), &d.check))
        .chain(latency.iter().map(|l| ("latency".to_owned(), &l.check)))
        .filter_map(|(label, check)| check.problem().map(|p| format!("{label}: {p}")))
        .collect();
    if problems.is_empty() {
        println!("\nverified: the receiver got every event id and every row is delivered.");
        Ok(())
    } else {
        Err(Failure::Runtime(format!("benchmark FAILED: {}", problems.join("; "))))
    }
}

/// The server URL: `DATABASE_URL`, or a throwaway cluster kept alive by the
/// returned handle.
async fn server(a: &BenchArgs) -> Result<(String, Option<Cluster>), Failure> {
    if let Some(url) = a.database_url.clone().filter(|u| !u.is_empty()) {
        return Ok((url, None));
    }
    println!("DATABASE_URL is unset: starting a throwaway PostgreSQL (default durability)…");
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(Durability::Default))
        .await
        .expect("cluster start task")
        .map_err(|e| Failure::Runtime(format!("cannot start a throwaway PostgreSQL: {e}")))?;
    Ok((cluster.url(), Some(cluster)))
}

/// Prints the machine and server the figures come from.
async fn print_machine(admin: &PgPool, external: bool) -> Result<(), Failure> {
    let show = |name: &'static str| async move {
        sqlx::query_scalar::<_, String>(&format!("SHOW {name}"))
            .fetch_one(admin)
            .await
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let mem_gb = read_kb("/proc/meminfo", "MemTotal:").map_or(0.0, |kb| kb as f64 / 1024.0 / 1024.0);
    println!("machine: {cores} CPUs ({model}), {mem_gb:.0} GB RAM");
    println!(
        "postgres: {} ({}), synchronous_commit={}, fsync={}, shared_buffers={}",
        show("server_version").await?,
        if external { "DATABASE_URL" } else { "throwaway cluster" },
        show("synchronous_commit").await?,
        show("fsync").await?,
        show("shared_buffers").await?,
    );
    Ok(())
}

/// One drain: enqueue everything, then time the workers until they exit.
async fn run_drain(a: &BenchArgs, db: &BenchDb, drain: Drain) -> Result<DrainReport, Failure> {
    let label = drain.label();
    let receiver = Receiver::start(drain.delay_ms).await?;
    let prefix = receiver.url_prefix();
    print!(
        "{label}, {} worker(s) × concurrency {}: enqueueing {} events… ",
        drain.workers, drain.concurrency, a.events
    );
    let enqueue_started = Instant::now();
    let enqueued = enqueue_bulk(&db.pool, &prefix, a.endpoints, a.events).await?;
    let enqueue_secs = enqueue_started.elapsed().as_secs_f64();
    raise_limits(&db.pool).await?;
    sqlx::query("ANALYZE postbox.outbox, postbox.endpoints")
        .execute(&db.pool)
        .await?;
    let sample: serde_json::Value = sqlx::query_scalar("SELECT payload FROM postbox.outbox LIMIT 1")
        .fetch_one(&db.pool)
        .await?;
    // The worker sends the payload as compact JSON.
    let body_bytes = serde_json::to_vec(&sample).map_or(0, |b| b.len());
    print!(
        "{:.1} s ({:.0}/s, {body_bytes}-byte bodies); draining… ",
        enqueue_secs,
        a.events as f64 / enqueue_secs
    );
    let _ = std::io::stdout().flush();

    let before = CpuSnapshot::take(receiver.pid, 0);
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..drain.workers {
        let child = spawn_worker(&db.url, drain.concurrency, a.batch_size, true)?;
        workers.spawn(watch(child));
    }
    let runs = collect_runs(workers).await?;
    let seconds = started.elapsed().as_secs_f64();
    let after = CpuSnapshot::take(receiver.pid, runs.iter().map(|r| r.cpu_ticks).sum());

    let arrivals = receiver.stop().await?;
    let check = verify(&db.pool, &arrivals, &enqueued).await?;
    let report = DrainReport {
        label,
        drain,
        events: a.events,
        seconds,
        peak_rss_kb: runs.iter().map(|r| r.peak_rss_kb).max().unwrap_or(0),
        cpu: CpuSplit::between(&before, &after, seconds),
        check,
    };
    let each: Vec<String> = runs.iter().map(|r| format!("{:.1}", mb(r.peak_rss_kb))).collect();
    println!(
        "{:.2} s, {:.0} events/s, peak RSS {} MB{}",
        seconds,
        report.rate(),
        each.join(" / "),
        report.check.problem().map_or(String::new(), |p| format!(" — {p}"))
    );
    Ok(report)
}

/// The latency scenario: a steady rate into one running worker.
async fn run_latency(a: &BenchArgs, db: &BenchDb) -> Result<LatencyReport, Failure> {
    let receiver = Receiver::start(0).await?;
    let prefix = receiver.url_prefix();
    create_endpoints(&db.pool, &prefix, a.endpoints).await?;
    raise_limits(&db.pool).await?;
    let child = spawn_worker(&db.url, a.concurrency, a.batch_size, false)?;
    let pid = child
        .id()
        .ok_or_else(|| Failure::Runtime("the worker exited at once".into()))?;
    let mut worker = JoinSet::new();
    worker.spawn(watch(child));

    // Warm up: one event per endpoint, delivered before the clock starts, so
    // process start-up and first connections are not counted.
    let mut enqueued = Vec::new();
    for i in 0..a.endpoints {
        enqueued.push(enqueue_one(&db.pool, &prefix, a.endpoints, i).await?.0);
    }
    wait_delivered(&db.pool, Duration::from_secs(30)).await?;
    print!(
        "latency: {} events/s for {} s into 1 worker… ",
        a.latency_rate, a.latency_seconds
    );
    let _ = std::io::stdout().flush();
    let before = CpuSnapshot::take(receiver.pid, process_ticks(pid).unwrap_or(0));
    let started = Instant::now();
    let (commits, enqueue_secs) = steady_enqueue(db, &prefix, a).await?;
    wait_delivered(&db.pool, Duration::from_secs(60)).await?;
    let after = CpuSnapshot::take(receiver.pid, process_ticks(pid).unwrap_or(0));
    let cpu = CpuSplit::between(&before, &after, started.elapsed().as_secs_f64());
    terminate(pid)?;
    let runs = collect_runs(worker).await?;

    let arrivals = receiver.stop().await?;
    enqueued.extend(commits.iter().map(|(id, _)| *id));
    let check = verify(&db.pool, &arrivals, &enqueued).await?;
    let mut latencies: Vec<i64> = commits
        .iter()
        .filter_map(|(id, committed)| arrivals.first.get(id).map(|arrived| arrived - committed))
        .collect();
    latencies.sort_unstable();
    let report = LatencyReport {
        events: commits.len(),
        offered_rate: commits.len() as f64 / enqueue_secs,
        percentiles: [0.50, 0.90, 0.99, 1.0].map(|p| percentile(&latencies, p)),
        peak_rss_kb: runs.iter().map(|r| r.peak_rss_kb).max().unwrap_or(0),
        cpu,
        check,
    };
    println!(
        "p50 {:.2} ms, p99 {:.2} ms{}",
        report.percentiles[0],
        report.percentiles[2],
        report.check.problem().map_or(String::new(), |p| format!(" — {p}"))
    );
    Ok(report)
}

/// Enqueues at `--latency-rate` for `--latency-seconds`, one event per
/// transaction; returns each event id with the unix micros right after its
/// COMMIT returned, and how long enqueueing took.
async fn steady_enqueue(db: &BenchDb, prefix: &str, a: &BenchArgs) -> Result<(Vec<(Uuid, i64)>, f64), Failure> {
    let pool = connect(&db.url, ENQUEUE_CONNECTIONS).await?;
    let total = a.latency_rate * a.latency_seconds;
    let started = tokio::time::Instant::now();
    let mut pending = JoinSet::new();
    let mut commits = Vec::with_capacity(total as usize);
    for k in 0..total {
        tokio::time::sleep_until(started + Duration::from_secs_f64(k as f64 / a.latency_rate as f64)).await;
        let (pool, prefix, endpoints) = (pool.clone(), prefix.to_owned(), a.endpoints);
        pending.spawn(async move { enqueue_one(&pool, &prefix, endpoints, endpoints + k).await });
        while let Some(done) = pending.try_join_next() {
            commits.push(done.expect("enqueue task")?);
        }
    }
    while let Some(done) = pending.join_next().await {
        commits.push(done.expect("enqueue task")?);
    }
    let seconds = started.elapsed().as_secs_f64();
    pool.close().await;
    Ok((commits, seconds))
}

// ---------------------------------------------------------------------------
// Databases and SQL
// ---------------------------------------------------------------------------

/// A fresh database on the server, migrated, with `postbox.allow_http = on`
/// (the receiver is plain http on loopback).
struct BenchDb {
    name: String,
    url: String,
    pool: PgPool,
}

impl BenchDb {
    async fn create(admin: &PgPool, server_url: &str) -> Result<BenchDb, Failure> {
        let name = format!("bench_{}", &Uuid::new_v4().simple().to_string()[..12]);
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(admin).await?;
        sqlx::query(&format!("ALTER DATABASE {name} SET postbox.allow_http = on"))
            .execute(admin)
            .await?;
        let mut url =
            url::Url::parse(server_url).map_err(|e| Failure::Usage(format!("DATABASE_URL is not a URL: {e}")))?;
        url.set_path(&format!("/{name}"));
        let url = url.to_string();
        let pool = connect(&url, 4).await?;
        postbox::migrate(&pool).await?;
        Ok(BenchDb { name, url, pool })
    }

    /// Drops the database; a failure is only reported, never fatal.
    async fn drop(self, admin: &PgPool) {
        self.pool.close().await;
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(e) = sqlx::query(&sql).execute(admin).await {
            eprintln!("warning: could not drop database {}: {e}", self.name);
        }
    }
}

/// A chat message of about 250 characters: with the envelope and the
/// metadata the body is about 600 bytes, like the seed guide's message.
const CONTENT: &str = "Hello! I ordered a pair of running shoes last Tuesday (order 48213) and the tracking page \
    still says the parcel is waiting at the depot. Could you check whether it has left, and if not, send it to \
    my office at 14 Harbour Street instead? Thanks a lot, Sam.";

/// The seed's message as `data`, numbered `g.i`; with the envelope the body
/// is about 600 bytes. `$3` is the content.
const DATA_SQL: &str = r#"jsonb_build_object(
    'id', gen_random_uuid(), 'content', $3::text,
    'content_type', 'TEXT', 'type', 'USER_INPUT', 'channel', 'API', 'status', 'RECEIVED',
    'metadata', jsonb_build_object('source', 'bench', 'sequence', g.i),
    'created_by', 'user123', 'updated_by', 'user123',
    'created_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
    'updated_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))"#;

/// `postbox.enqueue` of event `g.i` to endpoint `$1 || g.i % $2`.
fn enqueue_call() -> String {
    format!("postbox.enqueue($1::text || (g.i % $2::bigint)::text, gen_random_uuid(), {DATA_SQL}, NULL)")
}

/// Enqueues `n` events in chunks, in SQL; returns their ids.
async fn enqueue_bulk(pool: &PgPool, prefix: &str, endpoints: u64, n: u64) -> Result<Vec<Uuid>, Failure> {
    let sql = format!(
        "SELECT {} FROM generate_series($4::bigint, $5::bigint) AS g(i)",
        enqueue_call()
    );
    let mut ids = Vec::with_capacity(n as usize);
    let mut first = 0;
    while first < n {
        let last = (first + ENQUEUE_CHUNK).min(n) - 1;
        let chunk: Vec<Uuid> = sqlx::query_scalar(&sql)
            .bind(prefix)
            .bind(endpoints as i64)
            .bind(CONTENT)
            .bind(first as i64)
            .bind(last as i64)
            .fetch_all(pool)
            .await?;
        ids.extend(chunk);
        first = last + 1;
    }
    Ok(ids)
}

/// Enqueues event `i` in a transaction of its own; returns its id and the
/// unix micros right after COMMIT returned.
async fn enqueue_one(pool: &PgPool, prefix: &str, endpoints: u64, i: u64) -> Result<(Uuid, i64), Failure> {
    let sql = format!("SELECT {} FROM (SELECT $4::bigint AS i) AS g", enqueue_call());
    let mut tx = pool.begin().await?;
    let id: Uuid = sqlx::query_scalar(&sql)
        .bind(prefix)
        .bind(endpoints as i64)
        .bind(CONTENT)
        .bind(i as i64)
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok((id, unix_micros()))
}

/// Creates the endpoint rows up front (the latency scenario raises their
/// limits before any event exists).
async fn create_endpoints(pool: &PgPool, prefix: &str, endpoints: u64) -> Result<(), Failure> {
    sqlx::query(
        "INSERT INTO postbox.endpoints (url) SELECT $1::text || i FROM generate_series(0, $2::bigint - 1) AS i
         ON CONFLICT (url) DO NOTHING",
    )
    .bind(prefix)
    .bind(endpoints as i64)
    .execute(pool)
    .await?;
    Ok(())
}

/// Lifts the per-endpoint limits (in flight, per minute) where the schema
/// has them, so the benchmark measures postbox rather than its throttles.
async fn raise_limits(pool: &PgPool) -> Result<(), Failure> {
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns
         WHERE table_schema = 'postbox' AND table_name = 'endpoints'",
    )
    .fetch_all(pool)
    .await?;
    let has = |c: &str| columns.iter().any(|x| x == c);
    if has("max_in_flight") {
        sqlx::query("UPDATE postbox.endpoints SET max_in_flight = 100000")
            .execute(pool)
            .await?;
    }
    if has("rate_per_minute") {
        sqlx::query("UPDATE postbox.endpoints SET rate_per_minute = NULL")
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// Waits until no row is pending.
async fn wait_delivered(pool: &PgPool, limit: Duration) -> Result<(), Failure> {
    let started = Instant::now();
    loop {
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM postbox.outbox WHERE status = 'pending'")
            .fetch_one(pool)
            .await?;
        if pending == 0 {
            return Ok(());
        }
        if started.elapsed() > limit {
            return Err(Failure::Runtime(format!(
                "{pending} events still pending after {}",
                humantime::format_duration(limit)
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// Verification
// ---------------------------------------------------------------------------

/// What the receiver saw, read from its journal.
#[derive(Debug, Default)]
struct Arrivals {
    /// First arrival (unix micros) of each event id.
    first: HashMap<Uuid, i64>,
    /// Requests with a readable id, duplicates included.
    requests: u64,
    /// Requests without a readable `webhook-id`.
    unreadable: u64,
}

impl Arrivals {
    fn parse(journal: &str) -> Arrivals {
        let mut a = Arrivals::default();
        for line in journal.lines() {
            let mut fields = line.split(' ');
            let id = fields.next().and_then(|s| Uuid::parse_str(s).ok());
            let micros = fields.next().and_then(|s| s.parse::<i64>().ok());
            match (id, micros) {
                (Some(id), Some(micros)) => {
                    a.requests += 1;
                    let first = a.first.entry(id).or_insert(micros);
                    *first = (*first).min(micros);
                }
                _ => a.unreadable += 1,
            }
        }
        a
    }

    fn duplicates(&self) -> u64 {
        self.requests - self.first.len() as u64
    }
}

/// The outcome of comparing what was enqueued with the receiver's journal.
#[derive(Debug)]
struct Check {
    /// Events the scenario enqueued.
    expected: u64,
    /// Of those, rows found in the outbox.
    rows: u64,
    /// Enqueued or outbox ids the receiver never saw.
    missing: u64,
    /// Ids the receiver saw that were never enqueued, plus unreadable requests.
    unknown: u64,
    /// Deliveries beyond the first of an id (allowed: at least once).
    duplicates: u64,
    /// Rows whose status is not `delivered`.
    undelivered: i64,
}

impl Check {
    /// Why the run failed, if it did.
    fn problem(&self) -> Option<String> {
        let mut p = Vec::new();
        if self.rows != self.expected {
            p.push(format!("{} rows in the outbox, expected {}", self.rows, self.expected));
        }
        if self.missing > 0 {
            p.push(format!("{} events never reached the receiver", self.missing));
        }
        if self.unknown > 0 {
            p.push(format!("{} requests with unknown ids", self.unknown));
        }
        if self.undelivered > 0 {
            p.push(format!("{} rows not delivered", self.undelivered));
        }
        (!p.is_empty()).then(|| p.join(", "))
    }
}

/// Compares the ids `postbox.enqueue` returned, and every id in the outbox,
/// with what the receiver saw; counts the rows that are not `delivered`.
async fn verify(pool: &PgPool, arrivals: &Arrivals, enqueued: &[Uuid]) -> Result<Check, Failure> {
    let outbox: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM postbox.outbox")
        .fetch_all(pool)
        .await?;
    let undelivered: i64 = sqlx::query_scalar("SELECT count(*) FROM postbox.outbox WHERE status <> 'delivered'")
        .fetch_one(pool)
        .await?;
    let expected: HashSet<Uuid> = enqueued.iter().copied().collect();
    let ids: HashSet<Uuid> = expected.iter().chain(&outbox).copied().collect();
    Ok(Check {
        expected: expected.len() as u64,
        rows: outbox.iter().filter(|id| expected.contains(id)).count() as u64,
        missing: ids.iter().filter(|id| !arrivals.first.contains_key(id)).count() as u64,
        unknown: arrivals.first.keys().filter(|id| !ids.contains(id)).count() as u64 + arrivals.unreadable,
        duplicates: arrivals.duplicates(),
        undelivered,
    })
}

// ---------------------------------------------------------------------------
// Worker processes
// ---------------------------------------------------------------------------

/// A worker process as the bench saw it.
#[derive(Debug)]
struct WorkerRun {
    status: ExitStatus,
    /// Highest `VmHWM` seen, in kB.
    peak_rss_kb: u64,
    /// User + system CPU at the last sample, in clock ticks.
    cpu_ticks: u64,
}

/// Starts `postbox worker` (this same binary) on the database at `url`.
fn spawn_worker(url: &str, concurrency: usize, batch_size: usize, until_empty: bool) -> Result<Child, Failure> {
    let mut cmd = Command::new(postbox_bin()?);
    cmd.arg("worker");
    if until_empty {
        cmd.arg("--until-empty");
    }
    cmd.env("DATABASE_URL", url)
        .env("POSTBOX_ALLOW_HTTP", "true")
        .env("POSTBOX_ALLOW_PRIVATE_NETWORKS", "true")
        .env("POSTBOX_SIGNING_SECRET", SIGNING_SECRET)
        .env("POSTBOX_CONCURRENCY", concurrency.to_string())
        .env("POSTBOX_BATCH_SIZE", batch_size.to_string())
        // Warnings only; sqlx's slow-statement warnings quote whole statements
        // and would bury the results (they are counted in the CPU split anyway).
        .env("RUST_LOG", "warn,sqlx::query=error")
        // Several workers on one host must not fight over one metrics port.
        .env_remove("POSTBOX_METRICS_ADDR")
        .env_remove("POSTBOX_WORKER_ID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    cmd.spawn()
        .map_err(|e| Failure::Runtime(format!("cannot start a worker: {e}")))
}

/// Waits for a worker to exit, sampling its peak RSS and CPU meanwhile.
async fn watch(mut child: Child) -> std::io::Result<WorkerRun> {
    let pid = child.id();
    let (mut peak_rss_kb, mut cpu_ticks) = (0, 0);
    loop {
        if let Some(pid) = pid {
            // A process that has exited but is not yet reaped has no VmHWM.
            if let Some(kb) = read_kb(&format!("/proc/{pid}/status"), "VmHWM:") {
                peak_rss_kb = peak_rss_kb.max(kb);
            }
            if let Some(ticks) = process_ticks(pid) {
                cpu_ticks = cpu_ticks.max(ticks);
            }
        }
        tokio::select! {
            status = child.wait() => {
                return Ok(WorkerRun { status: status?, peak_rss_kb, cpu_ticks });
            }
            _ = tokio::time::sleep(SAMPLE_EVERY) => {}
        }
    }
}

/// Waits for every watched worker; any that failed fails the scenario.
async fn collect_runs(mut set: JoinSet<std::io::Result<WorkerRun>>) -> Result<Vec<WorkerRun>, Failure> {
    let mut runs = Vec::new();
    while let Some(joined) = set.join_next().await {
        let run = joined
            .expect("worker watch task")
            .map_err(|e| Failure::Runtime(format!("waiting for a worker: {e}")))?;
        if !run.status.success() {
            return Err(Failure::Runtime(format!("a worker exited with {}", run.status)));
        }
        runs.push(run);
    }
    Ok(runs)
}

/// Sends SIGTERM with `kill` (this crate forbids the unsafe of libc).
fn terminate(pid: u32) -> Result<(), Failure> {
    let status = std::process::Command::new("kill")
        .args(["-s", "TERM", &pid.to_string()])
        .status()
        .map_err(|e| Failure::Runtime(format!("cannot run kill: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(Failure::Runtime(format!("kill -s TERM {pid} failed")))
    }
}

fn current_exe() -> Result<PathBuf, Failure> {
    std::env::current_exe().map_err(|e| Failure::Runtime(format!("cannot find this program: {e}")))
}

/// The `postbox` binary the workers run: `POSTBOX_BIN`, or the one built
/// next to this program (`cargo build --release --workspace`).
fn postbox_bin() -> Result<PathBuf, Failure> {
    if let Some(bin) = std::env::var_os("POSTBOX_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let bin = current_exe()?.with_file_name("postbox");
    if bin.exists() {
        Ok(bin)
    } else {
        Err(Failure::Usage(format!(
            "{} not found: build it with `cargo build --release --workspace`, or set POSTBOX_BIN",
            bin.display()
        )))
    }
}

// ---------------------------------------------------------------------------
// CPU and memory from /proc
// ---------------------------------------------------------------------------

/// The number in kB on the line starting with `key` of a /proc file.
fn read_kb(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find_map(|l| l.strip_prefix(key))?;
    line.split_whitespace().next()?.parse().ok()
}

/// Fields of `/proc/<pid>/stat` after the command name, from field 3 (state) on.
fn stat_fields(pid: u32) -> Option<(String, Vec<u64>)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = text.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_owned();
    // Field 3 (state) is a letter; parse it as 0 to keep the indices.
    let fields = rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect();
    Some((comm, fields))
}

/// utime + stime of a process, in ticks.
fn process_ticks(pid: u32) -> Option<u64> {
    let (_, f) = stat_fields(pid)?;
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after field 3.
    Some(f.get(11)? + f.get(12)?)
}

/// CPU of every local `postgres` process, counting the children that the
/// postmaster has reaped (cutime + cstime), so that backends which come and
/// go between two snapshots are still counted.
fn postgres_ticks() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(stat_fields)
        .filter(|(comm, _)| comm == "postgres")
        .map(|(_, f)| f.get(11..15).map_or(0, |t| t.iter().sum::<u64>()))
        .sum()
}

/// Busy ticks of the whole machine (all CPUs) from `/proc/stat`.
fn machine_busy_ticks() -> u64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find_map(|l| l.strip_prefix("cpu ")) else {
        return 0;
    };
    let v: Vec<u64> = line.split_whitespace().filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
    v.iter().take(8).sum::<u64>() - v.get(3).unwrap_or(&0) - v.get(4).unwrap_or(&0)
}

/// CPU counters (ticks) read at the start and the end of a measurement.
struct CpuSnapshot {
    machine: u64,
    postgres: u64,
    receiver: u64,
    /// This process (the bench: enqueueing, sampling).
    bench: u64,
    /// The workers, as sampled by [`watch`] or read here.
    workers: u64,
}

impl CpuSnapshot {
    fn take(receiver_pid: u32, workers: u64) -> CpuSnapshot {
        CpuSnapshot {
            machine: machine_busy_ticks(),
            postgres: postgres_ticks(),
            receiver: process_ticks(receiver_pid).unwrap_or(0),
            bench: process_ticks(std::process::id()).unwrap_or(0),
            workers,
        }
    }
}

/// Where the CPU went, in % of one CPU (so up to nproc × 100). `other` is
/// everything else on the machine: another program's load shows up there and
/// makes the figures suspect.
#[derive(Debug, Clone, Copy)]
struct CpuSplit {
    workers: f64,
    postgres: f64,
    receiver: f64,
    bench: f64,
    other: f64,
}

impl CpuSplit {
    fn between(before: &CpuSnapshot, after: &CpuSnapshot, seconds: f64) -> CpuSplit {
        let pct = |a: u64, b: u64| a.saturating_sub(b) as f64 / CLOCK_TICKS / seconds * 100.0;
        let workers = pct(after.workers, before.workers);
        let postgres = pct(after.postgres, before.postgres);
        let receiver = pct(after.receiver, before.receiver);
        let bench = pct(after.bench, before.bench);
        let machine = pct(after.machine, before.machine);
        CpuSplit {
            workers,
            postgres,
            receiver,
            bench,
            other: (machine - workers - postgres - receiver - bench).max(0.0),
        }
    }

    /// `worker 45% · postgres 80% · receiver 15% · bench 2% · other 3%`.
    fn columns(&self) -> String {
        format!(
            "{:>5.0}% {:>5.0}% {:>5.0}% {:>5.0}% {:>5.0}%",
            self.workers, self.postgres, self.receiver, self.bench, self.other
        )
    }
}

// ---------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------

/// One drain's figures.
struct DrainReport {
    label: String,
    drain: Drain,
    events: u64,
    seconds: f64,
    /// The highest peak RSS of its workers, in kB.
    peak_rss_kb: u64,
    cpu: CpuSplit,
    check: Check,
}

impl DrainReport {
    fn rate(&self) -> f64 {
        self.events as f64 / self.seconds
    }
}

/// The latency scenario's figures.
struct LatencyReport {
    events: usize,
    /// The rate actually offered (events ÷ enqueueing time).
    offered_rate: f64,
    /// p50, p90, p99 and max, in ms.
    percentiles: [f64; 4],
    peak_rss_kb: u64,
    cpu: CpuSplit,
    check: Check,
}

/// The `p` quantile (nearest rank) of sorted microseconds, in ms.
fn percentile(sorted: &[i64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1000.0
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// Above this much foreign CPU (% of one CPU) the figures are flagged.
const BUSY_MACHINE: f64 = 20.0;

/// The drain table.
fn print_drains(drains: &[DrainReport]) {
    if drains.is_empty() {
        return;
    }
    println!("\nscenario               workers  conc  events  seconds  events/s  RSS MB  dups | worker     pg   recv  bench  other | pg µs/event");
    for d in drains {
        println!(
            "{:<22} {:>7} {:>5} {:>7} {:>8.2} {:>9.0} {:>7.1} {:>5} | {} | {:>6.0}",
            d.label,
            d.drain.workers,
            d.drain.concurrency,
            d.events,
            d.seconds,
            d.rate(),
            mb(d.peak_rss_kb),
            d.check.duplicates,
            d.cpu.columns(),
            d.cpu.postgres / 100.0 * d.seconds / d.events as f64 * 1e6
        );
    }
    println!("RSS: the highest VmHWM of the workers. CPU in % of one CPU: the workers together, postgres, receiver,");
    println!("this bench process, and everything else on the machine. pg µs/event: PostgreSQL CPU time (all its");
    println!("processes) per delivered event.");
}

fn print_results(drains: &[DrainReport], latency: Option<&LatencyReport>) {
    print_drains(drains);
    let mut busy = drains.iter().map(|d| d.cpu.other).collect::<Vec<_>>();
    if let Some(l) = latency {
        let [p50, p90, p99, max] = l.percentiles;
        println!(
            "\nlatency (receiver arrival − COMMIT returned): {} events at {:.0} events/s, one per transaction, 1 worker",
            l.events, l.offered_rate
        );
        println!("  p50 {p50:.2} ms   p90 {p90:.2} ms   p99 {p99:.2} ms   max {max:.2} ms");
        println!(
            "  worker peak RSS {:.1} MB, {} dups; CPU worker/pg/recv/bench/other: {}",
            mb(l.peak_rss_kb),
            l.check.duplicates,
            l.cpu.columns()
        );
        busy.push(l.cpu.other);
    }
    if busy.iter().any(|&o| o > BUSY_MACHINE) {
        println!("\nwarning: other programs used over {BUSY_MACHINE:.0}% of a CPU during a measurement; rerun on a quiet machine.");
    }
}

// ---------------------------------------------------------------------------
// The receiver process
// ---------------------------------------------------------------------------

fn unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The bench's handle on a the receiver process process.
struct Receiver {
    child: Child,
    pid: u32,
    addr: SocketAddr,
    journal: PathBuf,
}

impl Receiver {
    /// Starts the receiver and reads the address it bound.
    async fn start(delay_ms: u64) -> Result<Receiver, Failure> {
        let journal = std::env::temp_dir().join(format!("postbox-bench-{}.txt", Uuid::new_v4().simple()));
        let mut child = Command::new(current_exe()?)
            .args(["receiver", "--addr", "127.0.0.1:0", "--delay-ms"])
            .arg(delay_ms.to_string())
            .arg("--out")
            .arg(&journal)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Failure::Runtime(format!("cannot start the receiver: {e}")))?;
        let pid = child.id().unwrap_or(0);
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        let mut stdout = tokio::io::BufReader::new(stdout);
        let _ = tokio::time::timeout(Duration::from_secs(10), stdout.read_line(&mut line)).await;
        let addr = line
            .trim()
            .parse()
            .map_err(|_| Failure::Runtime(format!("the receiver did not report its address (got {line:?})")))?;
        Ok(Receiver {
            child,
            pid,
            addr,
            journal,
        })
    }

    /// `http://127.0.0.1:PORT/webhook/`; endpoint `k` appends `k`.
    fn url_prefix(&self) -> String {
        format!("http://{}/webhook/", self.addr)
    }

    /// Closes its stdin (it flushes its journal and exits) and reads the journal.
    async fn stop(mut self) -> Result<Arrivals, Failure> {
        drop(self.child.stdin.take());
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .map_err(|_| Failure::Runtime("the receiver did not exit".into()))?
            .map_err(|e| Failure::Runtime(format!("waiting for the receiver: {e}")))?;
        if !status.success() {
            return Err(Failure::Runtime(format!("the receiver exited with {status}")));
        }
        let text = tokio::fs::read_to_string(&self.journal)
            .await
            .map_err(|e| Failure::Runtime(format!("cannot read the receiver's journal: {e}")))?;
        Ok(Arrivals::parse(&text))
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.journal);
    }
}

/// The receiver's journal: one line per request, written before answering,
/// so every request answered 2xx is in the file once it is closed.
struct Journal {
    file: Mutex<Option<std::io::BufWriter<std::fs::File>>>,
    delay: Duration,
    write_failed: AtomicBool,
}

impl Journal {
    /// Appends a line; false once the journal is closed or broken.
    fn record(&self, id: &str, micros: i64) -> bool {
        let mut file = self.file.lock().expect("journal lock");
        let Some(w) = file.as_mut() else {
            return false;
        };
        if writeln!(w, "{id} {micros}").is_err() {
            self.write_failed.store(true, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Flushes and closes; later requests are answered 503 (never 2xx).
    fn close(&self) -> std::io::Result<()> {
        let taken = self.file.lock().expect("journal lock").take();
        if let Some(mut w) = taken {
            w.flush()?;
        }
        if self.write_failed.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("a journal write failed"));
        }
        Ok(())
    }
}

async fn arrive(State(journal): State<Arc<Journal>>, headers: HeaderMap, _body: Bytes) -> StatusCode {
    let micros = unix_micros();
    let id = headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or("-");
    if !journal.record(id, micros) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    if !journal.delay.is_zero() {
        tokio::time::sleep(journal.delay).await;
    }
    StatusCode::NO_CONTENT
}

/// Resolves when stdin reaches end of file (the bench closed it or died) or
/// on SIGTERM/SIGINT.
async fn stop_requested() {
    use tokio::signal::unix::{signal, SignalKind};
    let (eof_tx, eof) = tokio::sync::oneshot::channel();
    // A plain thread: a blocked tokio stdin read would hold up runtime shutdown.
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = eof_tx.send(());
    });
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = eof => {}
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// the receiver process: answers 204 to every POST (after `--delay-ms`)
/// and journals `webhook-id` with the arrival time.
pub async fn receiver(a: ReceiverArgs) -> Result<(), Failure> {
    let file = std::fs::File::create(&a.out)
        .map_err(|e| Failure::Runtime(format!("cannot create {}: {e}", a.out.display())))?;
    let journal = Arc::new(Journal {
        file: Mutex::new(Some(std::io::BufWriter::with_capacity(1 << 16, file))),
        delay: Duration::from_millis(a.delay_ms),
        write_failed: AtomicBool::new(false),
    });
    let listener = tokio::net::TcpListener::bind(a.addr)
        .await
        .map_err(|e| Failure::Runtime(format!("cannot listen on {}: {e}", a.addr)))?;
    let addr = listener.local_addr().map_err(|e| Failure::Runtime(e.to_string()))?;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let app = Router::new().fallback(post(arrive)).with_state(journal.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    println!("{addr}");
    stop_requested().await;
    server.abort();
    journal
        .close()
        .map_err(|e| Failure::Runtime(format!("journal {}: {e}", a.out.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<i64> = (1..=100).map(|ms| ms * 1000).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[7000], 0.5), 7.0);
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[test]
    fn the_journal_keeps_first_arrivals_and_counts_duplicates() {
        let a = Uuid::now_v7();
        let b = Uuid::now_v7();
        let journal = format!("{a} 30\n{b} 10\n{a} 20\n- 5\n");
        let arrivals = Arrivals::parse(&journal);
        assert_eq!(arrivals.first[&a], 20);
        assert_eq!(arrivals.first[&b], 10);
        assert_eq!(arrivals.duplicates(), 1);
        assert_eq!(arrivals.unreadable, 1);
    }
}
