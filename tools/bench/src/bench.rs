//! The benchmark's settings and scenarios: drains, the slow-receiver drains
//! and the steady-rate latency run.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use postbox_support::throwaway::{Cluster, Durability};
use sqlx::PgPool;
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::{connect, Failure};
use crate::{db::*, procfs::*, receiver::*, report::*, verify::*, workers::*};

/// The signing secret the benchmark's workers sign with (as in production).
pub(crate) const SIGNING_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// How often a worker's memory and CPU are sampled.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_millis(25);

/// Events per bulk enqueue statement (one transaction each).
pub(crate) const ENQUEUE_CHUNK: u64 = 1000;

/// Connections the latency scenario enqueues on, so a slow commit never
/// holds back the next event (the offered load stays steady).
pub(crate) const ENQUEUE_CONNECTIONS: u32 = 16;

/// Clock ticks per second in `/proc/*/stat` and `/proc/stat` (USER_HZ, 100
/// on every mainstream Linux build).
pub(crate) const CLOCK_TICKS: f64 = 100.0;

/// The benchmark's settings.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The server the benchmark databases are created on; unset = a
    /// throwaway cluster with PostgreSQL's default durability.
    #[arg(long, env = "DATABASE_URL")]
    pub(crate) database_url: Option<String>,
    /// Events per drain.
    #[arg(long, default_value_t = 20_000)]
    pub(crate) events: u64,
    /// Distinct callback URLs the events are spread over.
    #[arg(long, default_value_t = 10)]
    pub(crate) endpoints: u64,
    /// Worker process counts to drain with, comma separated (e.g. 1,2,4).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub(crate) workers: Vec<usize>,
    /// POSTBOX_CONCURRENCY of each worker (drain and latency).
    #[arg(long, default_value_t = 256)]
    pub(crate) concurrency: usize,
    /// POSTBOX_CONCURRENCY of each worker when the receiver is slow.
    #[arg(long, default_value_t = 256)]
    pub(crate) delay_concurrency: usize,
    /// POSTBOX_BATCH_SIZE of each worker.
    #[arg(long, default_value_t = 100)]
    pub(crate) batch_size: usize,
    /// Events per second in the latency scenario.
    #[arg(long, default_value_t = 500)]
    pub(crate) latency_rate: u64,
    /// How long the latency scenario enqueues, in seconds.
    #[arg(long, default_value_t = 10)]
    pub(crate) latency_seconds: u64,
    /// The slow receiver's delay per request, in milliseconds.
    #[arg(long, default_value_t = 20)]
    pub(crate) delay_ms: u64,
    /// Skip the latency scenario.
    #[arg(long)]
    pub(crate) skip_latency: bool,
    /// Skip the slow-receiver drains.
    #[arg(long)]
    pub(crate) skip_delay: bool,
    /// Skip every drain (measure latency only).
    #[arg(long)]
    pub(crate) skip_drain: bool,
}

/// The receiver process's settings (started by the benchmark itself).
#[derive(Debug, clap::Args)]
pub struct ReceiverArgs {
    /// Address to listen on; the bound address is printed as the first line.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub(crate) addr: SocketAddr,
    /// Wait this many milliseconds before answering each request.
    #[arg(long, default_value_t = 0)]
    pub(crate) delay_ms: u64,
    /// File receiving one line `webhook-id arrival-unix-micros` per request.
    #[arg(long)]
    pub(crate) out: PathBuf,
}

impl BenchArgs {
    pub(crate) fn validate(&self) -> Result<(), Failure> {
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
    pub(crate) fn drains(&self) -> Vec<Drain> {
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
pub(crate) struct Drain {
    pub(crate) workers: usize,
    pub(crate) delay_ms: u64,
    pub(crate) concurrency: usize,
}

impl Drain {
    pub(crate) fn label(&self) -> String {
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
pub(crate) async fn server(a: &BenchArgs) -> Result<(String, Option<Cluster>), Failure> {
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
pub(crate) async fn print_machine(admin: &PgPool, external: bool) -> Result<(), Failure> {
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
pub(crate) async fn run_drain(a: &BenchArgs, db: &BenchDb, drain: Drain) -> Result<DrainReport, Failure> {
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
pub(crate) async fn run_latency(a: &BenchArgs, db: &BenchDb) -> Result<LatencyReport, Failure> {
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
pub(crate) async fn steady_enqueue(
    db: &BenchDb,
    prefix: &str,
    a: &BenchArgs,
) -> Result<(Vec<(Uuid, i64)>, f64), Failure> {
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
