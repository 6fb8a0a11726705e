//! Operating postbox: metrics and health endpoints, SQL views, retention, logs.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use uuid::Uuid;

/// (event_id, status, attempt, error_kind, response_body) of `postbox.event_story`.
type StoryRow = (Uuid, String, Option<i32>, Option<String>, Option<String>);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Reads one sample (`name{labels} value`) from a Prometheus text page.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// /metrics counts what the worker actually did; /healthz and /readyz answer.
#[tokio::test]
async fn metrics_match_deliveries() {
    let db = TestDb::new().await;
    let ok = Receiver::ok().await;
    let bad = Receiver::start(Arc::new(|_, _| Reply::status(500))).await;
    enqueue_bulk(&db.pool, &ok.url, 5, None).await;
    let failing = enqueue_bulk(&db.pool, &bad.url, 1, None).await[0];
    sqlx::query("UPDATE postbox.outbox SET max_attempts = 2 WHERE id = $1")
        .bind(failing)
        .execute(&db.pool)
        .await
        .unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut worker = spawn_worker_process(&db.url, &[("POSTBOX_METRICS_ADDR", &addr)]);
    wait_until(
        &db.pool,
        "SELECT count(*) FROM postbox.outbox WHERE status = 'pending'",
        0,
        Duration::from_secs(20),
    )
    .await;
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("http://{addr}{path}")).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    // Gauges refresh every few seconds; counters are immediate.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let page = get("/metrics").await.unwrap().text().await.unwrap();
    assert_eq!(
        sample(&page, "postbox_attempts_total{result=\"success\"}"),
        Some(5.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, "postbox_attempts_total{result=\"http_status\"}"),
        Some(2.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, "postbox_events_total{outcome=\"delivered\"}"),
        Some(5.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, "postbox_events_total{outcome=\"failed\"}"),
        Some(1.0),
        "{page}"
    );
    assert_eq!(sample(&page, "postbox_retries_total"), Some(1.0), "{page}");
    assert_eq!(
        sample(&page, "postbox_delivery_duration_seconds_count"),
        Some(7.0),
        "{page}"
    );
    assert!(page.contains("postbox_outbox_pending"), "{page}");
    assert!(page.contains("postbox_outbox_oldest_pending_seconds"), "{page}");
    assert!(page.contains("postbox_claim_batch_size"), "{page}");
    assert_eq!(sample(&page, "postbox_endpoints_breaker_open"), Some(0.0), "{page}");
    // The backlog gauges are read from the tables every 5 s.
    let mut pending = None;
    for _ in 0..80 {
        let page = get("/metrics").await.unwrap().text().await.unwrap();
        pending = sample(&page, "postbox_outbox_pending");
        if pending == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(pending, Some(0.0));
    // Endpoint lifecycle events are counted from the table, whoever made them.
    sqlx::query("UPDATE postbox.endpoints SET disabled_at = now() WHERE url = $1")
        .bind(&ok.url)
        .execute(&db.pool)
        .await
        .unwrap();
    let mut disabled = None;
    for _ in 0..80 {
        let page = get("/metrics").await.unwrap().text().await.unwrap();
        disabled = sample(&page, "postbox_endpoint_events_total{kind=\"disabled\"}");
        if disabled.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(disabled, Some(1.0));
    stop_all(std::slice::from_mut(&mut worker)).await;
}

/// /readyz says not ready when the database is not migrated.
#[tokio::test]
async fn readyz_needs_a_migrated_database() {
    let db = TestDb::new().await;
    let addr = format!("127.0.0.1:{}", free_port());
    let mut worker = spawn_worker_process(&db.url, &[("POSTBOX_METRICS_ADDR", &addr)]);
    let http = reqwest::Client::new();
    let mut status = None;
    for _ in 0..100 {
        if let Ok(r) = http.get(format!("http://{addr}/readyz")).send().await {
            status = Some(r.status().as_u16());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, Some(200));
    sqlx::query(
        "DELETE FROM postbox.schema_migrations WHERE version = (SELECT max(version) FROM postbox.schema_migrations)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let r = http.get(format!("http://{addr}/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    stop_all(std::slice::from_mut(&mut worker)).await;
}

/// The operator views return what the data says.
#[tokio::test]
async fn views_report_the_data() {
    let db = TestDb::new().await;
    let ok = Receiver::ok().await;
    let bad = Receiver::start(Arc::new(|_, _| Reply::status(503).body("down"))).await;
    let delivered = enqueue_bulk(&db.pool, &ok.url, 3, None).await;
    let failed = enqueue_bulk(&db.pool, &bad.url, 2, None).await;
    sqlx::query("UPDATE postbox.outbox SET max_attempts = 1 WHERE id = ANY($1)")
        .bind(&failed)
        .execute(&db.pool)
        .await
        .unwrap();
    drain(&db.pool, config()).await;
    enqueue_bulk(&db.pool, &ok.url, 1, None).await; // one left pending

    let backlog: Vec<(String, i64)> = sqlx::query_as("SELECT status, events FROM postbox.backlog")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        backlog,
        vec![
            ("pending".into(), 1),
            ("delivered".into(), 3),
            ("failed".into(), 2),
            ("cancelled".into(), 0)
        ]
    );
    let health: Vec<(String, i64, i64, Option<f64>, i64)> = sqlx::query_as(
        "SELECT url, attempts, succeeded, success_pct::float8, pending FROM postbox.endpoint_health ORDER BY endpoint_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        health,
        vec![
            (ok.url.clone(), 3, 3, Some(100.0), 1),
            (bad.url.clone(), 2, 0, Some(0.0), 0)
        ]
    );
    let failures: Vec<(String, String, i32, i64, i64)> =
        sqlx::query_as("SELECT url, error_kind, status_code, attempts, events FROM postbox.failures")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(failures, vec![(bad.url.clone(), "http_status".into(), 503, 2, 2)]);

    // The story of one event, by its id and by its message id.
    let message_id: Uuid = sqlx::query_scalar("SELECT message_id FROM postbox.outbox WHERE id = $1")
        .bind(failed[0])
        .fetch_one(&db.pool)
        .await
        .unwrap();
    for key in [failed[0], message_id] {
        let story: Vec<StoryRow> =
            sqlx::query_as("SELECT event_id, status, attempt, error_kind, response_body FROM postbox.event_story($1)")
                .bind(key)
                .fetch_all(&db.pool)
                .await
                .unwrap();
        assert_eq!(
            story,
            vec![(
                failed[0],
                "failed".into(),
                Some(1),
                Some("http_status".into()),
                Some("down".into())
            )]
        );
    }
    let conversation: Uuid = sqlx::query_scalar("SELECT conversation_id FROM postbox.outbox WHERE id = $1")
        .bind(delivered[0])
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM postbox.event_story($1)")
        .bind(conversation)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n, 1);
}

/// Every query file in sql/ runs against a migrated database.
#[tokio::test]
async fn sql_files_run() {
    let db = TestDb::new().await;
    enqueue_bulk(&db.pool, "https://example.com/h", 2, None).await;
    let id: Uuid = sqlx::query_scalar("SELECT id FROM postbox.outbox LIMIT 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/sql")).unwrap() {
        let path = entry.unwrap().path();
        // grants.sql is set-up, run through psql with roles by tests/grants.rs.
        if path.file_name().is_some_and(|n| n == "grants.sql") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // psql variables, as `psql -v key=… -v id=…` would fill them in.
        let sql = text
            .replace(":'key'", &format!("'{id}'"))
            .replace(":'id'", &format!("'{id}'"));
        let mut tx = db.pool.begin().await.unwrap();
        sqlx::raw_sql(&sql)
            .execute(&mut *tx)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        tx.rollback().await.ok();
    }
}

/// Retention deletes old delivered and cancelled events with their attempts, keeps the rest.
#[tokio::test]
async fn retention_prunes_old_finished_events() {
    let db = TestDb::new().await;
    let ids = enqueue_bulk(&db.pool, "https://example.com/h", 5, None).await;
    // Give them ids from 8 days ago (ids are UUIDv7: their time is their age).
    let old: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE postbox.outbox SET id = overlay(id::text PLACING left(replace(postbox.uuid_v7_at(now() - interval '8 days')::text, '-', ''), 8) FROM 1 FOR 8)::uuid
         WHERE id = ANY($1) RETURNING id",
    )
    .bind(&ids[..4])
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let status = ["delivered", "cancelled", "failed", "pending"];
    for (id, s) in old.iter().zip(status) {
        sqlx::query("UPDATE postbox.outbox SET status = $2 WHERE id = $1")
            .bind(id)
            .bind(s)
            .execute(&db.pool)
            .await
            .unwrap();
        sqlx::query("INSERT INTO postbox.attempts (outbox_id, attempt, worker_id, started_at, duration_ms) VALUES ($1, 1, 'w', now() - interval '8 days', 1)")
            .bind(id)
            .execute(&db.pool)
            .await
            .unwrap();
    }
    sqlx::query("UPDATE postbox.outbox SET status = 'delivered' WHERE id = $1")
        .bind(ids[4])
        .execute(&db.pool)
        .await
        .unwrap();
    let mut cfg = config();
    cfg.retention_interval = Duration::from_millis(100);
    let (stop, handle) = spawn_worker(&db.pool, cfg);
    wait_until(
        &db.pool,
        "SELECT count(*) FROM postbox.outbox",
        3,
        Duration::from_secs(10),
    )
    .await;
    stop.send(()).unwrap();
    handle.await.unwrap();
    let left: Vec<String> = sqlx::query_scalar("SELECT status FROM postbox.outbox ORDER BY status")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        left,
        ["delivered", "failed", "pending"],
        "recent delivered, old failed and pending are kept"
    );
    let attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM postbox.attempts")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(attempts, 2, "the pruned events' attempts went with them");
    // With a failed retention, the old failed event goes too.
    cfg = config();
    cfg.retention_interval = Duration::from_millis(100);
    cfg.failed_retention = Some(Duration::from_secs(24 * 3600));
    let (stop, handle) = spawn_worker(&db.pool, cfg);
    wait_until(
        &db.pool,
        "SELECT count(*) FROM postbox.outbox WHERE status = 'failed'",
        0,
        Duration::from_secs(10),
    )
    .await;
    stop.send(()).unwrap();
    handle.await.unwrap();
}

/// JSON logs carry the event's ids and never the secret or the payload.
#[tokio::test]
async fn json_logs_carry_ids_not_secrets() {
    let db = TestDb::new().await;
    let receiver = Receiver::start(Arc::new(|n, _| Reply::status(if n == 1 { 500 } else { 200 }))).await;
    let id = enqueue_bulk(&db.pool, &receiver.url, 1, None).await[0];
    let mut c = worker_cmd(&db.url);
    c.arg("--until-empty")
        .env("POSTBOX_LOG_FORMAT", "json")
        .env("POSTBOX_RETRY_SCHEDULE", "10ms");
    let mut out = run_async(c).await;
    for _ in 0..20 {
        if receiver.count() >= 2 {
            break;
        }
        let mut c = worker_cmd(&db.url);
        c.arg("--until-empty").env("POSTBOX_LOG_FORMAT", "json");
        let more = run_async(c).await;
        out.stderr.extend(more.stderr);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).expect("every line is JSON"))
        .collect();
    let retry = lines
        .iter()
        .find(|l| l["message"] == "attempt failed; will retry")
        .expect("the failed attempt is logged");
    assert_eq!(retry["event_id"], id.to_string(), "{retry}");
    assert!(retry["conversation_id"].as_str().is_some_and(|s| s.len() == 36));
    assert!(retry["message_id"].as_str().is_some_and(|s| s.len() == 36));
    assert_eq!(
        (&retry["endpoint_id"], &retry["attempt"]),
        (&1.into(), &1.into()),
        "{retry}"
    );
    assert_eq!(retry["status"], 500, "{retry}");
    assert!(
        !log.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        "the secret is never logged"
    );
    assert!(!log.contains("message 1"), "payload bodies are not logged");
}

/// The operator functions: replay in batches by id cursor (never twice),
/// dry runs change nothing, invalid arguments name the parameter; disable
/// and enable (which also ends a pause and closes the breaker).
#[tokio::test]
async fn operator_functions() {
    let db = TestDb::new().await;
    let mut ids = enqueue_bulk(&db.pool, "https://example.com/hook", 5, None).await;
    // In id order (UUIDs compare byte by byte in Rust as in PostgreSQL).
    ids.sort();
    sqlx::query("UPDATE postbox.outbox SET status = 'failed', attempts = 4")
        .execute(&db.pool)
        .await
        .unwrap();
    let call = |after: Option<Uuid>, dry: bool| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_as::<_, (i32, i32, Option<Uuid>)>(
                "SELECT * FROM postbox.replay('failed', after => $1, batch => 2, dry_run => $2)",
            )
            .bind(after)
            .bind(dry)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    // Dry run: looks at all five, changes nothing.
    let (mut after, mut looked) = (None, 0);
    loop {
        let (n, replayed, last) = call(after, true).await;
        assert_eq!(replayed, 0);
        if n == 0 {
            break;
        }
        looked += n;
        after = last;
    }
    assert_eq!(looked, 5);
    let failed: i64 = sqlx::query_scalar("SELECT count(*) FROM postbox.outbox WHERE status = 'failed'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(failed, 5);
    // First batch: the two oldest.
    let (n, replayed, last) = call(None, false).await;
    assert_eq!((n, replayed, last), (2, 2, Some(ids[1])));
    // They fail again before the next batch: the cursor does not take them twice.
    sqlx::query("UPDATE postbox.outbox SET status = 'failed' WHERE id = ANY($1)")
        .bind(&ids[..2])
        .execute(&db.pool)
        .await
        .unwrap();
    let mut after = last;
    let mut total = replayed;
    loop {
        let (n, replayed, last) = call(after, false).await;
        if n == 0 {
            break;
        }
        total += replayed;
        after = last;
    }
    assert_eq!(total, 5, "each event replayed once");
    let rows: Vec<(String, i32)> =
        sqlx::query_as("SELECT status, max_attempts FROM postbox.outbox WHERE id = ANY($1) ORDER BY id")
            .bind(&ids[2..])
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert!(rows.iter().all(|r| r == &("pending".to_string(), 8)), "{rows:?}");
    for (sql, field) in [
        ("SELECT * FROM postbox.replay('pending')", "status"),
        ("SELECT * FROM postbox.replay('failed', attempts => 0)", "attempts"),
        ("SELECT * FROM postbox.replay('failed', batch => 0)", "batch"),
    ] {
        let e = sqlx::query(sql).execute(&db.pool).await.unwrap_err().to_string();
        assert!(e.contains(&format!("invalid {field}")), "{sql}: {e}");
    }

    // Disable keeps the first time and takes the new reason; enable clears
    // the pause and the breaker too.
    let id: i64 = sqlx::query_scalar("SELECT id FROM postbox.endpoints")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    for reason in ["first", "second"] {
        let ok: bool = sqlx::query_scalar("SELECT postbox.disable_endpoint($1, $2)")
            .bind(id)
            .bind(reason)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert!(ok);
    }
    let reason: String = sqlx::query_scalar("SELECT disabled_reason FROM postbox.endpoints")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(reason, "second");
    sqlx::query(
        "UPDATE postbox.endpoint_state SET paused_until = now() + interval '1 hour',
                breaker_open_until = now() + interval '1 hour', breaker_cooldown = interval '1 hour'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let ok: bool = sqlx::query_scalar("SELECT postbox.enable_endpoint($1)")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(ok);
    let state: (bool, bool, bool) = sqlx::query_as(
        "SELECT e.disabled_at IS NULL, s.paused_until IS NULL, s.breaker_open_until IS NULL
         FROM postbox.endpoints e JOIN postbox.endpoint_state s ON s.endpoint_id = e.id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(state, (true, true, true));
    let missing: bool = sqlx::query_scalar("SELECT postbox.enable_endpoint(999999)")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(!missing);
}

/// A worker on a pool of two (as `postbox worker` makes it) holds at most
/// four connections: LISTEN and one more from the pool, and one each for
/// its claim loop and its outcomes, made with the pool's settings.
#[tokio::test]
async fn a_worker_holds_at_most_four_connections() {
    let db = TestDb::new().await;
    let receiver = Receiver::start(Arc::new(|_, _| Reply::status(200))).await;
    let worker_pool = named_pool(&db.url, "postbox-conn-test", 2).await;
    // The endpoint, with limits that let 250 events through at once.
    enqueue_many(&db.pool, &receiver.url, 1).await;
    sqlx::query("UPDATE postbox.endpoints SET max_in_flight = 100, rate_per_minute = NULL")
        .execute(&db.pool)
        .await
        .unwrap();
    let (stop, handle) = spawn_worker(&worker_pool, config());
    let count = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'postbox-conn-test'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    let mut most = 0;
    for round in 0..5 {
        enqueue_many(&db.pool, &receiver.url, 50).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            most = most.max(count().await);
            if receiver.hits().len() > 50 * (round + 1) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "deliveries stalled");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    stop.send(()).unwrap();
    handle.await.unwrap();
    assert!(
        most >= 3,
        "LISTEN, claims and outcomes each hold a connection: saw {most}"
    );
    assert!(most <= 4, "a worker holds at most four connections: saw {most}");
}

/// `postbox worker` connects to a server on this machine without TLS when
/// no `sslmode` is given (TLS on loopback protects nothing and costs every
/// round trip), where a client with the default `sslmode=prefer` uses it.
#[tokio::test]
async fn the_cli_skips_tls_to_a_loopback_server() {
    let db = TestDb::new().await;
    let ssl_on: String = sqlx::query_scalar("SHOW ssl").fetch_one(&db.pool).await.unwrap();
    let loopback = db.url.contains("@127.0.0.1") || db.url.contains("@localhost");
    if ssl_on != "on" || !loopback || db.url.contains("sslmode") {
        eprintln!(
            "skipped: the test server has ssl = {ssl_on} at {} (needs ssl = on, loopback, no sslmode)",
            db.url
        );
        return;
    }
    let sql = "SELECT bool_or(s.ssl) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
               WHERE a.datname = current_database() AND a.application_name = $1";
    // A client with sqlx's defaults: TLS, as the server offers it.
    let default_client = named_pool(&db.url, "postbox-tls-test", 1).await;
    sqlx::query("SELECT 1").execute(&default_client).await.unwrap();
    let tls: Option<bool> = sqlx::query_scalar(sql)
        .bind("postbox-tls-test")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(tls, Some(true), "a default client uses TLS here");
    let mut worker = spawn_worker_process(&db.url, &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let tls = loop {
        // Running: its claim loop found nothing and waits for a NOTIFY (so
        // its connections are open and SIGTERM is handled).
        let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM postbox.sleeping_workers")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        let tls: Option<bool> = sqlx::query_scalar(sql)
            .bind("postbox")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        if waiting > 0 && tls.is_some() {
            break tls;
        }
        assert!(std::time::Instant::now() < deadline, "the worker never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stop_all(std::slice::from_mut(&mut worker)).await;
    assert_eq!(tls, Some(false), "the worker's connections are plain on loopback");
}
