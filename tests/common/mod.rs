//! Shared test harness: a real PostgreSQL database per test and a real HTTP
//! receiver on loopback.
#![allow(dead_code)]

pub mod protocol;

// Not every test binary uses the receiver.
#[allow(unused_imports)]
pub use postbox_support::receiver::{Hit, Receiver, Reply, Script};

use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use postbox::delivery::{NetworkPolicy, Secrets};
use postbox::{Message, MessageEvent, WorkerConfig};
use postbox_support::throwaway::{Cluster, Durability};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgPool};
use uuid::Uuid;

/// The default secret used by test workers.
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

/// `DATABASE_URL`, or a throwaway cluster started once per test process.
pub fn base_url() -> String {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => CLUSTER
            .get_or_init(|| Cluster::start(Durability::Fast).expect("start a throwaway PostgreSQL"))
            .url(),
    }
}

/// A fresh database with postbox migrated into it.
pub struct TestDb {
    pub pool: PgPool,
    pub url: String,
    pub name: String,
}

fn with_db(url: &str, db: &str) -> String {
    let mut u = reqwest::Url::parse(url).expect("DATABASE_URL is a URL");
    u.set_path(&format!("/{db}"));
    u.to_string()
}

async fn create_database() -> (String, String) {
    let base = base_url();
    let name = format!("postbox_test_{}", Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(&base)
        .await
        .expect("connect to DATABASE_URL");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("create test database");
    admin.close().await.ok();
    let url = with_db(&base, &name);
    (name, url)
}

impl TestDb {
    /// A new migrated database where `postbox.allow_http` is on (the test
    /// receivers are plain http on loopback).
    pub async fn new() -> TestDb {
        let (name, url) = create_database().await;
        let p = pool(&url, 1).await;
        sqlx::query(&format!("ALTER DATABASE {name} SET postbox.allow_http = on"))
            .execute(&p)
            .await
            .unwrap();
        p.close().await;
        let pool = pool(&url, 10).await;
        postbox::migrate(&pool).await.expect("migrate");
        TestDb { pool, url, name }
    }

    /// A new database with nothing in it.
    pub async fn empty() -> TestDb {
        let (name, url) = create_database().await;
        TestDb {
            pool: pool(&url, 10).await,
            url,
            name,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop the database on a thread of its own (Drop cannot await).
        let base = base_url();
        let name = self.name.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                // FORCE ends this test's remaining connections.
                if let Ok(mut c) = sqlx::PgConnection::connect(&base).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut c)
                        .await;
                }
            });
        })
        .join()
        .ok();
    }
}

pub async fn pool(url: &str, size: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(size)
        .connect(url)
        .await
        .expect("connect to the test database")
}

/// A pool whose connections show `name` as their application_name (to
/// find them in pg_stat_activity).
pub async fn named_pool(url: &str, name: &str, size: u32) -> PgPool {
    let opts: sqlx::postgres::PgConnectOptions = url.parse().expect("a database URL");
    PgPoolOptions::new()
        .max_connections(size)
        .connect_with(opts.application_name(name))
        .await
        .expect("connect to the test database")
}

/// A worker configuration for tests: loopback http allowed, short retry
/// schedule, fast polling, the test secret.
pub fn config() -> WorkerConfig {
    let mut c = WorkerConfig {
        poll_interval: Duration::from_millis(100),
        signing_secret: Some(Secrets::parse(SECRET).unwrap()),
        shutdown_grace: Duration::from_secs(5),
        ..WorkerConfig::default()
    };
    c.retry.schedule = vec![
        Duration::from_millis(300),
        Duration::from_millis(600),
        Duration::from_millis(900),
    ];
    c.client.allow_http = true;
    c.client.network = NetworkPolicy {
        allow_private: true,
        allow: vec![],
    };
    c.client.request_timeout = Duration::from_secs(5);
    c.lease = Duration::from_secs(10);
    c
}

/// A sample message event.
pub fn event(content: &str) -> MessageEvent {
    let at = chrono::DateTime::parse_from_rfc3339("2024-03-21T10:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    MessageEvent {
        conversation_id: Uuid::now_v7(),
        message: Message::text(Uuid::now_v7(), content, "user123", at),
        ordering_key: None,
    }
}

/// Enqueues `n` events to `url` in one transaction; returns their ids.
pub async fn enqueue_many(pool: &PgPool, url: &str, n: usize) -> Vec<Uuid> {
    let mut tx = pool.begin().await.unwrap();
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        ids.push(
            postbox::enqueue(&mut tx, url, &event(&format!("message {i}")))
                .await
                .unwrap(),
        );
    }
    tx.commit().await.unwrap();
    ids
}

/// Runs a worker until nothing is due or in flight.
pub async fn drain(pool: &PgPool, config: WorkerConfig) -> postbox::RunStats {
    let worker = postbox::Worker::builder(pool.clone())
        .config(WorkerConfig {
            until_empty: true,
            ..config
        })
        .build()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), worker.run(std::future::pending()))
        .await
        .expect("drain finished")
}

/// Runs a worker in the background until the returned sender is dropped or sent.
pub fn spawn_worker(
    pool: &PgPool,
    config: WorkerConfig,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<postbox::RunStats>,
) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let worker = postbox::Worker::builder(pool.clone()).config(config).build().unwrap();
    let handle = tokio::spawn(worker.run(async move {
        let _ = rx.await;
    }));
    (tx, handle)
}

/// Polls `sql` (a single bigint) until it equals `want`.
pub async fn wait_until(pool: &PgPool, sql: &str, want: i64, limit: Duration) {
    let start = Instant::now();
    loop {
        let got: i64 = sqlx::query_scalar(sql).fetch_one(pool).await.unwrap();
        if got == want {
            return;
        }
        assert!(start.elapsed() < limit, "{sql} = {got}, wanted {want} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The row's status and attempts.
pub async fn row(pool: &PgPool, id: Uuid) -> (String, i32) {
    sqlx::query_as("SELECT status, attempts FROM postbox.outbox WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Lifts every endpoint's limits (for tests that push volume through one endpoint).
pub async fn unlimited(pool: &PgPool) {
    sqlx::query("UPDATE postbox.endpoints SET max_in_flight = 10000, rate_per_minute = NULL")
        .execute(pool)
        .await
        .unwrap();
}

/// A `postbox` command with a clean environment, run in an empty directory.
pub fn postbox(db_url: Option<&str>) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_postbox"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info");
    c.current_dir(std::env::temp_dir());
    if let Some(url) = db_url {
        c.env("DATABASE_URL", url);
    }
    c
}

/// Worker settings for loopback receivers and short schedules.
pub fn worker_cmd(db_url: &str) -> Command {
    let mut c = postbox(Some(db_url));
    c.arg("worker")
        .env("POSTBOX_SIGNING_SECRET", SECRET)
        .env("POSTBOX_ALLOW_HTTP", "true")
        .env("POSTBOX_ALLOW_PRIVATE_NETWORKS", "true")
        .env("POSTBOX_POLL_INTERVAL", "100ms")
        .env("POSTBOX_RETRY_SCHEDULE", "300ms,600ms,900ms");
    c
}

pub fn run(mut c: Command) -> Output {
    c.stdin(Stdio::null()).output().expect("run postbox")
}

pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args(["-s", sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -s {sig}");
}

pub async fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(start.elapsed() < limit, "process did not exit within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A worker process, killed if the test ends (or panics) without stopping it.
pub struct WorkerProc(pub Child);

impl Drop for WorkerProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for WorkerProc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for WorkerProc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// Starts a worker process (output discarded) with extra environment.
pub fn spawn_worker_process(db_url: &str, env: &[(&str, &str)]) -> WorkerProc {
    let mut c = worker_cmd(db_url);
    for (k, v) in env {
        c.env(k, v);
    }
    // POSTBOX_TEST_LOGS=dir keeps each worker's log for debugging.
    let stderr = match std::env::var("POSTBOX_TEST_LOGS") {
        Ok(dir) => Stdio::from(std::fs::File::create(format!("{dir}/worker-{}.log", Uuid::new_v4().simple())).unwrap()),
        Err(_) => Stdio::null(),
    };
    WorkerProc(
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn postbox worker"),
    )
}

/// Stops worker processes with SIGTERM and checks they exit 0.
pub async fn stop_all(children: &mut [WorkerProc]) {
    for c in children.iter() {
        signal(c, "TERM");
    }
    for c in children.iter_mut() {
        assert!(
            wait_exit(c, Duration::from_secs(30)).await.success(),
            "worker exits 0 on SIGTERM"
        );
    }
}

/// Enqueues `n` events to `url` with one SQL statement (fast, for volume).
pub async fn enqueue_bulk(pool: &PgPool, url: &str, n: i32, ordering_key: Option<&str>) -> Vec<Uuid> {
    sqlx::query_scalar(
        "SELECT postbox.enqueue($1, gen_random_uuid(), jsonb_build_object(
             'id', gen_random_uuid(), 'content', 'message ' || i, 'content_type', 'TEXT', 'type', 'USER_INPUT',
             'channel', 'API', 'status', 'RECEIVED', 'created_by', 'u', 'updated_by', 'u',
             'created_at', '2024-03-21T10:00:00Z', 'updated_at', '2024-03-21T10:00:00Z'), $3)
         FROM generate_series(1, $2) AS i ORDER BY i",
    )
    .bind(url)
    .bind(n)
    .bind(ordering_key)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Sets one endpoint's limits.
pub async fn set_limits(pool: &PgPool, url: &str, max_in_flight: i32, rate_per_minute: Option<i32>) {
    sqlx::query("UPDATE postbox.endpoints SET max_in_flight = $2, rate_per_minute = $3 WHERE url = $1")
        .bind(url)
        .bind(max_in_flight)
        .bind(rate_per_minute)
        .execute(pool)
        .await
        .unwrap();
}

/// Runs a command without blocking the test's runtime (which serves the receivers).
pub async fn run_async(c: Command) -> Output {
    tokio::task::spawn_blocking(move || run(c)).await.unwrap()
}

/// (attempt, status_code, error_kind, error) rows of one event's attempt log.
pub type Log = Vec<(i32, Option<i32>, Option<String>, Option<String>)>;

/// One event's attempt log, oldest first.
pub async fn attempts_of(pool: &PgPool, id: Uuid) -> Log {
    sqlx::query_as(
        "SELECT attempt, status_code, error_kind, error FROM postbox.attempts WHERE outbox_id = $1 ORDER BY attempt",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// A small deterministic generator (xorshift64*), so a failing seed replays.
#[derive(Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}
