//! The `postbox` binary: configuration errors, worker processes, signals, admin commands.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use uuid::Uuid;

/// Every bad configuration value stops the worker at start with exit 2 and a message naming the variable.
#[tokio::test]
async fn bad_configuration_exits_2_naming_the_variable() {
    let db = TestDb::new().await;
    // A readable file with no certificate in it.
    let not_pem = std::env::temp_dir().join(format!("postbox-not-pem-{}.pem", uuid::Uuid::new_v4().simple()));
    std::fs::write(&not_pem, "hello\n").unwrap();
    let not_pem = not_pem.to_str().unwrap().to_owned();
    let cases: &[(&str, &str)] = &[
        ("POSTBOX_CA_CERT", &not_pem),
        ("POSTBOX_CONCURRENCY", "abc"),
        ("POSTBOX_CONCURRENCY", "0"),
        ("POSTBOX_BATCH_SIZE", "-1"),
        ("POSTBOX_POLL_INTERVAL", "soon"),
        ("POSTBOX_POLL_INTERVAL", "0s"),
        ("POSTBOX_LEASE", "30s"),
        ("POSTBOX_REQUEST_TIMEOUT", "5 parsecs"),
        ("POSTBOX_RETRY_SCHEDULE", "4s,x"),
        ("POSTBOX_RETRY_JITTER", "50%"),
        ("POSTBOX_ALLOW_HTTP", "maybe"),
        ("POSTBOX_ALLOW_PRIVATE_NETWORKS", "2"),
        ("POSTBOX_ALLOWED_NETWORKS", "10.0.0.0/99"),
        ("POSTBOX_SIGNING_SECRET", "not-a-secret"),
        ("POSTBOX_CA_CERT", "/nonexistent/ca.pem"),
        ("POSTBOX_METRICS_ADDR", "nowhere"),
        ("POSTBOX_LOG_FORMAT", "xml"),
        ("POSTBOX_BREAKER_THRESHOLD", "0"),
        ("POSTBOX_BREAKER_COOLDOWN", "forever"),
        ("POSTBOX_BREAKER_MAX_COOLDOWN", "1s"),
        ("POSTBOX_ALLOW_UNSIGNED", "perhaps"),
    ];
    for (var, value) in cases {
        let mut c = postbox(Some(&db.url));
        c.arg("worker").env("POSTBOX_SIGNING_SECRET", SECRET).env(var, value);
        let out = run(c);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}={value}: {stderr}");
        assert!(
            stderr.contains(var),
            "{var}={value}: message does not name it: {stderr}"
        );
    }
    // The lease rule: 35s is exactly the 30 s timeout plus 5 s.
    let mut c = postbox(Some(&db.url));
    c.args(["worker", "--until-empty", "--allow-unsigned"])
        .env("POSTBOX_LEASE", "35s");
    assert_eq!(run(c).status.code(), Some(0));
    for url in [None, Some("not a url")] {
        let mut c = postbox(url);
        c.arg("worker").env("POSTBOX_SIGNING_SECRET", SECRET);
        let out = run(c);
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("DATABASE_URL"));
    }
}

/// `postbox migrate` applies the schema and is idempotent.
#[tokio::test]
async fn migrate_command() {
    let db = TestDb::empty().await;
    for _ in 0..2 {
        let mut c = postbox(Some(&db.url));
        c.arg("migrate");
        let out = run(c);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(postbox::migrate::is_current(&db.pool).await.unwrap());
}

/// A worker killed mid-delivery: after its lease another worker delivers the event.
#[tokio::test]
async fn killed_worker_is_replaced_after_the_lease() {
    let db = TestDb::new().await;
    let receiver = Receiver::start(Arc::new(|n, _| {
        Reply::status(200).delay(if n == 1 {
            Duration::from_secs(30)
        } else {
            Duration::ZERO
        })
    }))
    .await;
    let id = enqueue_many(&db.pool, &receiver.url, 1).await[0];
    let mut a = worker_cmd(&db.url);
    a.env("POSTBOX_LEASE", "8s")
        .env("POSTBOX_REQUEST_TIMEOUT", "3s")
        .env("POSTBOX_WORKER_ID", "doomed");
    let mut a = a.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    receiver.wait_for(1, Duration::from_secs(20)).await;
    let killed_at = Instant::now();
    a.kill().unwrap(); // SIGKILL mid-delivery
    a.wait().unwrap();
    let mut b = worker_cmd(&db.url);
    b.env("POSTBOX_WORKER_ID", "survivor")
        .env("POSTBOX_LEASE", "8s")
        .env("POSTBOX_REQUEST_TIMEOUT", "3s");
    let mut b = b.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_until(
        &db.pool,
        &format!("SELECT count(*) FROM postbox.outbox WHERE id = '{id}' AND status = 'delivered'"),
        1,
        Duration::from_secs(30),
    )
    .await;
    assert!(
        killed_at.elapsed() >= Duration::from_secs(3),
        "not taken before the lease ran out"
    );
    signal(&b, "TERM");
    assert!(wait_exit(&mut b, Duration::from_secs(10)).await.success());
    assert_eq!(receiver.count(), 2);
    let log: Vec<(i32, String, Option<String>)> = sqlx::query_as(
        "SELECT attempt, worker_id, error_kind FROM postbox.attempts WHERE outbox_id = $1 ORDER BY attempt",
    )
    .bind(id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        log,
        vec![(1, "doomed".into(), Some("other".into())), (2, "survivor".into(), None)]
    );
}

/// Two worker processes draining 2,000 events deliver each exactly once.
#[tokio::test]
async fn two_workers_deliver_each_event_exactly_once() {
    let db = TestDb::new().await;
    let receiver = Receiver::ok().await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.extend(enqueue_many(&db.pool, &receiver.url, 500).await);
    }
    unlimited(&db.pool).await;
    let spawn = |n: &str| {
        let mut c = worker_cmd(&db.url);
        c.arg("--until-empty")
            .env("POSTBOX_WORKER_ID", n)
            .env("POSTBOX_BATCH_SIZE", "50");
        c.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
    };
    let (mut a, mut b) = (spawn("w1"), spawn("w2"));
    assert!(wait_exit(&mut a, Duration::from_secs(120)).await.success());
    assert!(wait_exit(&mut b, Duration::from_secs(120)).await.success());
    let mut seen: Vec<Uuid> = receiver.hits().iter().map(|h| h.id()).collect();
    assert_eq!(seen.len(), 2000, "no duplicates, none missing");
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 2000);
    let delivered: i64 =
        sqlx::query_scalar("SELECT count(*) FROM postbox.outbox WHERE status = 'delivered' AND attempts = 1")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(delivered, 2000);
    let logged: i64 = sqlx::query_scalar("SELECT count(*) FROM postbox.attempts")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(logged, 2000);
}

/// SIGTERM with deliveries in flight: exit 0, every outcome recorded, no lease left held.
#[tokio::test]
async fn sigterm_finishes_in_flight_deliveries() {
    let db = TestDb::new().await;
    let receiver = Receiver::start(Arc::new(|_, _| Reply::status(200).delay(Duration::from_millis(800)))).await;
    enqueue_many(&db.pool, &receiver.url, 40).await;
    let mut c = worker_cmd(&db.url);
    c.env("POSTBOX_CONCURRENCY", "10").env("POSTBOX_SHUTDOWN_GRACE", "10s");
    let mut child = c.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    receiver.wait_for(5, Duration::from_secs(20)).await;
    signal(&child, "TERM");
    let status = wait_exit(&mut child, Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0));
    let hits = receiver.count() as i64;
    assert!(hits < 40, "it stopped claiming");
    let (delivered, held, logged): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM postbox.outbox WHERE status = 'delivered'),
                (SELECT count(*) FROM postbox.outbox WHERE locked_by IS NOT NULL),
                (SELECT count(*) FROM postbox.attempts)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(delivered, hits, "every delivery that reached the receiver is recorded");
    assert_eq!(logged, hits);
    assert_eq!(held, 0, "no lease left held");
}

/// SIGINT with a grace period shorter than the delivery: the lease is released, the attempt not counted.
#[tokio::test]
async fn sigint_after_grace_releases_leases() {
    let db = TestDb::new().await;
    let receiver = Receiver::start(Arc::new(|_, _| Reply::status(200).delay(Duration::from_secs(20)))).await;
    let id = enqueue_many(&db.pool, &receiver.url, 1).await[0];
    let mut c = worker_cmd(&db.url);
    c.env("POSTBOX_SHUTDOWN_GRACE", "500ms");
    let mut child = c.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    receiver.wait_for(1, Duration::from_secs(20)).await;
    signal(&child, "INT");
    assert_eq!(wait_exit(&mut child, Duration::from_secs(10)).await.code(), Some(0));
    let (status, attempts, locked, due_now): (String, i32, Option<String>, bool) = sqlx::query_as(
        "SELECT status, attempts, locked_by, next_attempt_at <= now() FROM postbox.outbox WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((status.as_str(), attempts, locked, due_now), ("pending", 0, None, true));
}

/// `enqueue`, `status`, `replay` and `endpoint` work end to end and refuse bad input with exit 2.
#[tokio::test]
async fn admin_commands() {
    let db = TestDb::new().await;
    let receiver = Receiver::start(Arc::new(|_, _| Reply::status(500))).await;
    let mut c = postbox(Some(&db.url));
    c.args([
        "enqueue",
        "--url",
        &receiver.url,
        "--content",
        "hello",
        "--channel",
        "SMS",
    ]);
    let out = run(c);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id: Uuid = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();

    let mut c = postbox(Some(&db.url));
    c.args(["enqueue", "--url", "https://u:p@example.com/", "--content", "x"]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("callback_url"));
    let mut c = postbox(Some(&db.url));
    c.args([
        "enqueue",
        "--url",
        "https://example.com/",
        "--content",
        "x",
        "--channel",
        "EMAIL",
    ]);
    assert_eq!(run(c).status.code(), Some(2));

    let mut worker = worker_cmd(&db.url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        &db.pool,
        &format!("SELECT count(*) FROM postbox.outbox WHERE id = '{id}' AND status = 'failed'"),
        1,
        Duration::from_secs(20),
    )
    .await;
    signal(&worker, "TERM");
    assert!(wait_exit(&mut worker, Duration::from_secs(10)).await.success());
    let mut c = postbox(Some(&db.url));
    c.args(["status", "--json"]);
    let out = run(c);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["backlog"]["failed"], 1);
    assert_eq!(status["failing_endpoints"][0]["url"], receiver.url);
    let mut c = postbox(Some(&db.url));
    c.arg("status");
    let out = run(c);
    assert!(String::from_utf8_lossy(&out.stdout).contains("failed"));

    let mut c = postbox(Some(&db.url));
    c.args(["replay", "--dry-run"]);
    assert!(String::from_utf8_lossy(&run(c).stdout).contains("would replay 1"));
    assert_eq!(row(&db.pool, id).await.0, "failed");
    let mut c = postbox(Some(&db.url));
    c.args(["replay", "--endpoint", &receiver.url]);
    assert!(run(c).status.success());
    let (status, attempts, max): (String, i32, i32) =
        sqlx::query_as("SELECT status, attempts, max_attempts FROM postbox.outbox WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), attempts, max), ("pending", 4, 8));

    let mut c = postbox(Some(&db.url));
    c.args(["endpoint", "disable", &receiver.url]);
    assert!(run(c).status.success());
    let mut c = postbox(Some(&db.url));
    c.args(["endpoint", "list"]);
    let listing = String::from_utf8_lossy(&run(c).stdout).to_string();
    assert!(
        listing.contains("disabled") && listing.contains(&receiver.url),
        "{listing}"
    );
    let mut c = postbox(Some(&db.url));
    c.args(["endpoint", "set", &receiver.url, "--secret", "nope"]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("nope"),
        "secrets are never echoed"
    );
    let mut c = postbox(Some(&db.url));
    c.args([
        "endpoint",
        "set",
        &receiver.url,
        "--secret",
        SECRET,
        "--max-in-flight",
        "3",
    ]);
    assert!(run(c).status.success());
    let mut c = postbox(Some(&db.url));
    c.args(["endpoint", "list"]);
    assert!(
        !String::from_utf8_lossy(&run(c).stdout).contains("MfKQ9r8"),
        "list never prints secrets"
    );
    let mut c = postbox(Some(&db.url));
    c.args(["endpoint", "enable", &receiver.url]);
    assert!(run(c).status.success());
    let (max_in_flight, disabled): (i32, bool) =
        sqlx::query_as("SELECT max_in_flight, disabled_at IS NOT NULL FROM postbox.endpoints")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((max_in_flight, disabled), (3, false));
}

/// `postbox demo` runs the whole flow on the given database and reports every event delivered.
#[tokio::test]
async fn demo_runs() {
    let db = TestDb::empty().await;
    let mut c = postbox(Some(&db.url));
    c.args(["demo", "--events", "3"]);
    let out = run(c);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("summary: 3 delivered, 0 failed"), "{stdout}");
    assert!(stdout.contains("rolled-back event rows: 0"));
}

/// `postbox listen` prints each webhook, says whether its signature is valid, and answers the chosen status.
#[tokio::test]
async fn listen_verifies_and_answers_as_told() {
    let db = TestDb::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut c = postbox(None);
    c.args([
        "listen",
        "--addr",
        &format!("127.0.0.1:{port}"),
        "--secret",
        SECRET,
        "--succeed-from",
        "2",
    ]);
    let mut listener = WorkerProc(
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{port}/hook");
    // Wait for it to listen.
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let signed = enqueue_many(&db.pool, &url, 1).await[0];
    let forged = enqueue_many(&db.pool, &format!("{url}?forged"), 1).await[0];
    sqlx::query(
        "UPDATE postbox.endpoints SET secret = 'whsec_b3RoZXItc2VjcmV0LWtleS0xMjM0NTY3OA==' WHERE url LIKE '%forged'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let (stop, handle) = spawn_worker(&db.pool, config());
    wait_until(
        &db.pool,
        "SELECT count(*) FROM postbox.outbox WHERE status = 'pending'",
        0,
        Duration::from_secs(20),
    )
    .await;
    stop.send(()).unwrap();
    handle.await.unwrap();
    signal(&listener, "TERM");
    let out = tokio::task::spawn_blocking(move || {
        let child = std::mem::replace(&mut listener.0, Command::new("true").spawn().unwrap());
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let heads: Vec<&str> = stdout.lines().filter(|l| l.starts_with("── webhook")).collect();
    assert_eq!(heads.len(), 3, "one request failed with 500 and was retried: {stdout}");
    // The two first requests arrive together, so the printed order is not the arrival order:
    // one answer is 500, and that event is sent again and answered 200.
    let failed: Vec<&&str> = heads.iter().filter(|h| h.ends_with("→ 500")).collect();
    assert_eq!(failed.len(), 1, "{stdout}");
    let failed_id = failed[0].split_whitespace().nth(2).unwrap();
    assert_eq!(
        heads
            .iter()
            .filter(|h| h.contains(failed_id) && h.ends_with("→ 200"))
            .count(),
        1,
        "the refused event is retried and accepted: {stdout}"
    );
    for h in &heads {
        if h.contains(&signed.to_string()) {
            assert!(h.contains("signature valid"), "{h}");
        } else {
            assert!(
                h.contains(&forged.to_string()) && h.contains("SIGNATURE INVALID"),
                "{h}"
            );
        }
    }
    assert!(
        stdout.contains("\"content\": \"message 0\""),
        "the body is printed readably: {stdout}"
    );
}
