//! Delivery end to end: a real worker, a real receiver on loopback.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use postbox::delivery::{NetworkPolicy, Secrets};
use sqlx::PgPool;
use uuid::Uuid;

/// A committed event is delivered exactly once, with the seed's body and the Standard Webhooks headers.
#[tokio::test]
async fn body_and_headers_follow_the_spec() {
    let db = TestDb::new().await;
    let receiver = Receiver::ok().await;
    let mut tx = db.pool.begin().await.unwrap();
    let ev = event("Hello");
    let id = postbox::enqueue(&mut tx, &receiver.url, &ev).await.unwrap();
    tx.commit().await.unwrap();
    let stats = drain(&db.pool, config()).await;
    assert_eq!((stats.attempts, stats.delivered), (1, 1));
    let hits = receiver.hits();
    assert_eq!(hits.len(), 1, "delivered exactly once");
    let hit = &hits[0];
    assert_eq!(hit.header("content-type"), "application/json");
    assert_eq!(hit.header("user-agent"), concat!("postbox/", env!("CARGO_PKG_VERSION")));
    assert_eq!(hit.header("webhook-id"), id.to_string());
    let ts: i64 = hit.header("webhook-timestamp").parse().unwrap();
    assert!(
        (chrono::Utc::now().timestamp() - ts).abs() < 60,
        "webhook-timestamp is the attempt's unix time"
    );
    let sig = hit.header("webhook-signature");
    assert!(sig.starts_with("v1,"), "{sig}");
    assert!(
        Secrets::parse(SECRET)
            .unwrap()
            .verify(&id.to_string(), ts, &hit.body, sig),
        "signature verifies"
    );

    let body = hit.json();
    let obj = body.as_object().unwrap();
    let mut keys: Vec<_> = obj.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["conversation_id", "data", "timestamp"]);
    assert_eq!(body["conversation_id"], ev.conversation_id.to_string());
    let data = &body["data"];
    assert_eq!(data["id"], ev.message.id.to_string());
    assert_eq!(data["content"], "Hello");
    assert_eq!(data["content_type"], "TEXT");
    assert_eq!(data["type"], "USER_INPUT");
    assert_eq!(data["channel"], "API");
    assert_eq!(data["status"], "RECEIVED");
    assert_eq!(data["created_by"], "user123");
    assert_eq!(data["updated_by"], "user123");
    assert_eq!(data["created_at"], "2024-03-21T10:00:00Z");
    assert_eq!(data["updated_at"], "2024-03-21T10:00:00Z");
    assert!(data.get("filename").is_none() && data.get("metadata").is_none());
    assert!(chrono::DateTime::parse_from_rfc3339(body["timestamp"].as_str().unwrap()).is_ok());

    let (status, attempts) = row(&db.pool, id).await;
    assert_eq!((status.as_str(), attempts), ("delivered", 1));
    let (locked_by, delivered_at, code): (Option<String>, Option<chrono::DateTime<chrono::Utc>>, Option<i32>) =
        sqlx::query_as("SELECT locked_by, delivered_at, last_status_code FROM postbox.outbox WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(locked_by.is_none() && delivered_at.is_some());
    assert_eq!(code, Some(200));
    assert_eq!(attempts_of(&db.pool, id).await, vec![(1, Some(200), None, None)]);
}

/// 500 → 500 → 200 ends delivered after 3 attempts, spaced by the schedule.
#[tokio::test]
async fn retries_follow_the_schedule_until_delivered() {
    let db = TestDb::new().await;
    let receiver = Receiver::start(Arc::new(|n, _| {
        Reply::status(if n < 3 { 500 } else { 200 }).body("nope")
    }))
    .await;
    let id = enqueue_many(&db.pool, &receiver.url, 1).await[0];
    let stats = spawn_and_wait(&db.pool, config(), id).await;
    assert_eq!(stats.delivered, 1);
    let hits = receiver.hits();
    assert_eq!(hits.len(), 3);
    assert!(
        hits.iter().all(|h| h.id() == id),
        "webhook-id is identical on every retry"
    );
    let gap1 = hits[1].at - hits[0].at;
    let gap2 = hits[2].at - hits[1].at;
    assert!(gap1 >= Duration::from_millis(300), "first retry after {gap1:?}");
    assert!(gap2 >= Duration::from_millis(600), "second retry after {gap2:?}");
    assert!(
        gap1 < Duration::from_millis(1500) && gap2 < Duration::from_millis(1800),
        "{gap1:?} {gap2:?}"
    );
    assert_eq!(row(&db.pool, id).await, ("delivered".into(), 3));
    let log = attempts_of(&db.pool, id).await;
    assert_eq!(log.len(), 3);
    assert_eq!(log[0].2.as_deref(), Some("http_status"));
    assert_eq!(log[0].1, Some(500));
    assert_eq!(log[2], (3, Some(200), None, None));
    let body: Option<String> =
        sqlx::query_scalar("SELECT response_body FROM postbox.attempts WHERE outbox_id = $1 AND attempt = 1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(body.as_deref(), Some("nope"));
}

/// Runs a worker until the event is no longer pending.
async fn spawn_and_wait(pool: &PgPool, config: postbox::WorkerConfig, id: Uuid) -> postbox::RunStats {
    let (stop, handle) = spawn_worker(pool, config);
    wait_until(
        pool,
        &format!("SELECT count(*) FROM postbox.outbox WHERE id = '{id}' AND status = 'pending'"),
        0,
        Duration::from_secs(30),
    )
    .await;
    stop.send(()).unwrap();
    handle.await.unwrap()
}

/// An event that always fails ends `failed` after max_attempts, every attempt logged.
#[tokio::test]
async fn exhausted_attempts_end_failed() {
    let db = TestDb::new().await;
    let receiver = Receiver::start(Arc::new(|_, _| Reply::status(503))).await;
    let id = enqueue_many(&db.pool, &receiver.url, 1).await[0];
    let stats = spawn_and_wait(&db.pool, config(), id).await;
    assert_eq!((stats.failed, stats.attempts), (1, 4));
    assert_eq!(receiver.count(), 4, "first try plus three retries");
    assert_eq!(row(&db.pool, id).await, ("failed".into(), 4));
    let log = attempts_of(&db.pool, id).await;
    assert_eq!(log.iter().map(|a| a.0).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert!(log
        .iter()
        .all(|a| a.1 == Some(503) && a.2.as_deref() == Some("http_status")));
    let last_error: Option<String> = sqlx::query_scalar("SELECT last_error FROM postbox.outbox WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(last_error.unwrap().contains("503"));
}

/// Timeouts, refused connections and redirects are each classified and retried.
#[tokio::test]
async fn network_failures_are_classified_and_retried() {
    let db = TestDb::new().await;
    let slow = Receiver::start(Arc::new(|n, _| {
        if n == 1 {
            Reply::status(200).delay(Duration::from_secs(3))
        } else {
            Reply::status(200)
        }
    }))
    .await;
    let redirect = Receiver::start(Arc::new(|n, _| {
        if n == 1 {
            Reply::status(302).header("location", "http://127.0.0.1:1/")
        } else {
            Reply::status(204)
        }
    }))
    .await;
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let refused_url = format!("http://{}/hook", closed.local_addr().unwrap());
    drop(closed);
    let t = enqueue_many(&db.pool, &slow.url, 1).await[0];
    let r = enqueue_many(&db.pool, &redirect.url, 1).await[0];
    let c = enqueue_many(&db.pool, &refused_url, 1).await[0];
    let mut cfg = config();
    cfg.client.request_timeout = Duration::from_secs(1);
    cfg.lease = Duration::from_secs(6);
    let (stop, handle) = spawn_worker(&db.pool, cfg);
    wait_until(
        &db.pool,
        &format!("SELECT count(*) FROM postbox.outbox WHERE id IN ('{t}','{r}') AND status = 'delivered'"),
        2,
        Duration::from_secs(20),
    )
    .await;
    wait_until(
        &db.pool,
        &format!("SELECT count(*) FROM postbox.outbox WHERE id = '{c}' AND status = 'failed'"),
        1,
        Duration::from_secs(20),
    )
    .await;
    stop.send(()).unwrap();
    handle.await.unwrap();
    let kind = |log: Log| log[0].2.clone().unwrap();
    assert_eq!(kind(attempts_of(&db.pool, t).await), "timeout");
    assert_eq!(kind(attempts_of(&db.pool, r).await), "redirect");
    assert_eq!(attempts_of(&db.pool, r).await[0].1, Some(302));
    let refused = attempts_of(&db.pool, c).await;
    assert_eq!(refused.len(), 4, "refused connections are retried");
    assert!(
        refused
            .iter()
            .all(|a| a.2.as_deref() == Some("connect") && a.1.is_none()),
        "{refused:?}"
    );
    assert_eq!(redirect.count(), 2, "the redirect was not followed");
}

/// A destination on loopback is refused when private networks are not allowed, and the receiver sees nothing.
#[tokio::test]
async fn private_destinations_are_blocked_by_default() {
    let db = TestDb::new().await;
    let receiver = Receiver::ok().await;
    let by_name = receiver.url.replace("127.0.0.1", "localhost");
    let a = enqueue_many(&db.pool, &receiver.url, 1).await[0];
    let b = enqueue_many(&db.pool, &by_name, 1).await[0];
    let mut cfg = config();
    cfg.client.network = NetworkPolicy::default();
    let stats = drain(&db.pool, cfg).await;
    assert_eq!(stats.failed, 2);
    assert_eq!(receiver.count(), 0, "no request reached the blocked address");
    for id in [a, b] {
        assert_eq!(
            row(&db.pool, id).await,
            ("failed".into(), 1),
            "blocked fails at once, without a retry storm"
        );
        let log = attempts_of(&db.pool, id).await;
        assert_eq!(log[0].2.as_deref(), Some("blocked"));
        let why = log[0].3.as_deref().unwrap_or_default();
        assert!(
            (why.contains("POSTBOX_ALLOWED_NETWORKS=127.0.0.1/32") || why.contains("POSTBOX_ALLOWED_NETWORKS=::1/128"))
                && why.contains("POSTBOX_ALLOW_PRIVATE_NETWORKS"),
            "the error names the settings that would allow it: {why}"
        );
    }
}

/// Plain http:// is refused by the worker unless POSTBOX_ALLOW_HTTP.
#[tokio::test]
async fn http_needs_allow_http() {
    let db = TestDb::new().await;
    let receiver = Receiver::ok().await;
    let id = enqueue_many(&db.pool, &receiver.url, 1).await[0];
    let mut cfg = config();
    cfg.client.allow_http = false;
    drain(&db.pool, cfg).await;
    assert_eq!(receiver.count(), 0);
    assert_eq!(attempts_of(&db.pool, id).await[0].2.as_deref(), Some("blocked"));
}

/// 410 Gone disables the endpoint and keeps its events pending; enabling resumes them.
#[tokio::test]
async fn gone_disables_the_endpoint_and_keeps_events() {
    let db = TestDb::new().await;
    let receiver = Receiver::start(Arc::new(|n, _| Reply::status(if n == 1 { 410 } else { 200 }))).await;
    let ids = enqueue_many(&db.pool, &receiver.url, 1).await;
    drain(&db.pool, config()).await;
    let more = enqueue_many(&db.pool, &receiver.url, 2).await;
    drain(&db.pool, config()).await;
    assert_eq!(receiver.count(), 1, "nothing is sent to a disabled endpoint");
    let disabled: bool = sqlx::query_scalar("SELECT disabled_at IS NOT NULL FROM postbox.endpoints")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(disabled);
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM postbox.outbox WHERE status = 'pending'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(pending, 3, "events are kept");
    // Re-enable with plain SQL: nothing else is needed.
    sqlx::query("UPDATE postbox.endpoints SET disabled_at = NULL")
        .execute(&db.pool)
        .await
        .unwrap();
    drain(&db.pool, config()).await;
    for id in ids.iter().chain(&more) {
        assert_eq!(row(&db.pool, *id).await.0, "delivered");
    }
}

/// An endpoint's own secrets override the default; two secrets give two signatures.
#[tokio::test]
async fn endpoint_secrets_override_the_default_and_rotate() {
    let db = TestDb::new().await;
    let receiver = Receiver::ok().await;
    let id = enqueue_many(&db.pool, &receiver.url, 1).await[0];
    let old = "whsec_b2xkLXNlY3JldC1rZXktMTIzNDU2Nzg5MA==";
    let new = "whsec_bmV3LXNlY3JldC1rZXktMTIzNDU2Nzg5MA==";
    sqlx::query("UPDATE postbox.endpoints SET secret = $1")
        .bind(format!("{old} {new}"))
        .execute(&db.pool)
        .await
        .unwrap();
    drain(&db.pool, config()).await;
    let hit = &receiver.hits()[0];
    let ts: i64 = hit.header("webhook-timestamp").parse().unwrap();
    let sig = hit.header("webhook-signature");
    assert_eq!(sig.split(' ').count(), 2, "{sig}");
    for s in [old, new] {
        assert!(Secrets::parse(s).unwrap().verify(&id.to_string(), ts, &hit.body, sig));
    }
    assert!(
        !Secrets::parse(SECRET)
            .unwrap()
            .verify(&id.to_string(), ts, &hit.body, sig),
        "the default secret is not used"
    );
    let bad = sqlx::query("UPDATE postbox.endpoints SET secret = 'not-a-secret'")
        .execute(&db.pool)
        .await;
    assert!(bad.is_err(), "a malformed secret is refused by the table");
}

/// The status decides: a 2xx with a 10 MiB body is delivered at the first attempt (its first 4 KiB
/// kept), while a 500 with such a body is a failed attempt (`body_too_large`) and is retried.
#[tokio::test]
async fn oversized_response_body_does_not_decide_the_outcome() {
    let db = TestDb::new().await;
    let receiver = Receiver::start(Arc::new(|_, hit: &Hit| {
        let big = "x".repeat(10 << 20);
        match hit.json()["data"]["content"].as_str() {
            Some("accepted") => Reply::status(200).body(big),
            _ => Reply::status(500).body(big),
        }
    }))
    .await;
    let mut tx = db.pool.begin().await.unwrap();
    let accepted = postbox::enqueue(&mut tx, &receiver.url, &event("accepted"))
        .await
        .unwrap();
    let refused = postbox::enqueue(&mut tx, &receiver.url, &event("refused"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    sqlx::query("UPDATE postbox.outbox SET max_attempts = 2 WHERE id = $1")
        .bind(refused)
        .execute(&db.pool)
        .await
        .unwrap();
    spawn_and_wait(&db.pool, config(), refused).await;
    wait_until(
        &db.pool,
        &format!("SELECT count(*) FROM postbox.outbox WHERE id = '{accepted}' AND status = 'delivered'"),
        1,
        Duration::from_secs(10),
    )
    .await;
    let log = attempts_of(&db.pool, accepted).await;
    assert_eq!(log.len(), 1, "delivered at the first attempt: {log:?}");
    assert_eq!((log[0].1, log[0].2.as_deref()), (Some(200), None));
    let stored: String = sqlx::query_scalar("SELECT response_body FROM postbox.attempts WHERE outbox_id = $1")
        .bind(accepted)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(stored, "x".repeat(4096), "the first 4 KiB are kept");
    assert_eq!(row(&db.pool, refused).await, ("failed".to_string(), 2));
    let log = attempts_of(&db.pool, refused).await;
    assert!(
        log.iter()
            .all(|a| a.1 == Some(500) && a.2.as_deref() == Some("body_too_large")),
        "{log:?}"
    );
}

/// A 2xx whose body stalls, or is shorter than it declared, is still delivered once.
#[tokio::test]
async fn accepted_response_with_a_stalled_body_is_delivered() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = TestDb::new().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = requests.clone();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let _ = sock.read(&mut buf).await;
                let _ = sock
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\naccepted")
                    .await;
                // Never sends the rest, and keeps the connection open.
                tokio::time::sleep(Duration::from_secs(60)).await;
            });
        }
    });
    let id = enqueue_many(&db.pool, &url, 1).await[0];
    let mut c = config();
    c.client.request_timeout = Duration::from_secs(1);
    c.lease = Duration::from_secs(6);
    spawn_and_wait(&db.pool, c, id).await;
    assert_eq!(row(&db.pool, id).await, ("delivered".to_string(), 1));
    assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 1);
    let log = attempts_of(&db.pool, id).await;
    assert_eq!((log[0].1, log[0].2.as_deref()), (Some(200), None), "{log:?}");
}

/// At most 4 KiB of a response body is stored.
#[tokio::test]
async fn stored_response_body_is_capped() {
    let db = TestDb::new().await;
    let receiver = Receiver::start(Arc::new(|_, _| Reply::status(500).body("y".repeat(20_000)))).await;
    let id = enqueue_many(&db.pool, &receiver.url, 1).await[0];
    let mut cfg = config();
    cfg.retry.schedule = vec![Duration::from_secs(60)];
    drain(&db.pool, cfg).await;
    let len: i32 = sqlx::query_scalar("SELECT length(response_body) FROM postbox.attempts WHERE outbox_id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(len, 4096);
}

/// NOTIFY wakes an idle worker: delivery starts long before the poll interval.
#[tokio::test]
async fn enqueue_wakes_idle_workers() {
    let db = TestDb::new().await;
    let receiver = Receiver::ok().await;
    let mut cfg = config();
    cfg.poll_interval = Duration::from_secs(30);
    let (stop, handle) = spawn_worker(&db.pool, cfg);
    tokio::time::sleep(Duration::from_millis(500)).await; // let it go idle
    let start = std::time::Instant::now();
    enqueue_many(&db.pool, &receiver.url, 1).await;
    receiver.wait_for(1, Duration::from_secs(10)).await;
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "woken by NOTIFY, not by the 30 s poll: {:?}",
        start.elapsed()
    );
    stop.send(()).unwrap();
    handle.await.unwrap();
}

/// A stale outcome is fenced: once another claim has counted a newer attempt, the old holder cannot record.
#[tokio::test]
async fn stale_outcomes_are_fenced() {
    use common::protocol::{claim, record, Outcome};
    use postbox::delivery::{Decision, ErrorKind, Next, Response};
    let db = TestDb::new().await;
    let id = enqueue_many(&db.pool, "https://example.com/h", 1).await[0];
    let lease = Duration::from_secs(30);
    let a = claim(&db.pool, "worker-a", 10, lease).await.unwrap();
    assert_eq!(a.len(), 1);
    assert!(
        claim(&db.pool, "worker-b", 10, lease).await.unwrap().is_empty(),
        "leased rows are not claimable"
    );
    // A's lease runs out; B claims the row.
    sqlx::query("UPDATE postbox.outbox SET next_attempt_at = now() - interval '1 second'")
        .execute(&db.pool)
        .await
        .unwrap();
    let b = claim(&db.pool, "worker-b", 10, lease).await.unwrap();
    assert_eq!(b[0].attempt, 2);
    let outcome = |attempt, status: u16| Outcome {
        id,
        attempt,
        started_at: chrono::Utc::now(),
        response: Response {
            status: Some(status),
            error: (status != 200).then_some(ErrorKind::HttpStatus),
            message: None,
            body: None,
            retry_after: None,
            elapsed: Duration::from_millis(5),
        },
        decision: Decision {
            next: if status == 200 {
                Next::Delivered
            } else {
                Next::Retry {
                    after: Duration::from_secs(4),
                }
            },
            pause: None,
        },
    };
    assert!(
        record(&db.pool, "worker-a", &[outcome(1, 500)], &Default::default())
            .await
            .unwrap()
            .is_empty(),
        "A no longer holds the lease"
    );
    assert_eq!(row(&db.pool, id).await, ("pending".into(), 2));
    assert_eq!(
        record(&db.pool, "worker-b", &[outcome(2, 200)], &Default::default())
            .await
            .unwrap(),
        vec![id]
    );
    assert_eq!(row(&db.pool, id).await, ("delivered".into(), 2));
    // The lost attempt 1 is in the log, marked as such.
    let log = attempts_of(&db.pool, id).await;
    assert_eq!(log.len(), 2);
    assert_eq!((log[0].0, log[0].2.as_deref()), (1, Some("other")));
    assert!(log[0].3.as_deref().unwrap().contains("lease expired"));
}

/// A row whose final attempt's lease expired becomes failed instead of being attempted again.
#[tokio::test]
async fn lost_final_attempt_ends_failed() {
    let db = TestDb::new().await;
    let id = enqueue_many(&db.pool, "https://example.com/h", 1).await[0];
    sqlx::query("UPDATE postbox.outbox SET max_attempts = 1")
        .execute(&db.pool)
        .await
        .unwrap();
    common::protocol::claim(&db.pool, "dead", 10, Duration::from_secs(30))
        .await
        .unwrap();
    sqlx::query("UPDATE postbox.outbox SET next_attempt_at = now() - interval '1 second'")
        .execute(&db.pool)
        .await
        .unwrap();
    let again = common::protocol::claim(&db.pool, "alive", 10, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(again.is_empty());
    assert_eq!(row(&db.pool, id).await, ("failed".into(), 1));
}

/// Killing the database connections mid-drain loses nothing: the worker reconnects and finishes.
#[tokio::test]
async fn survives_terminated_connections() {
    let db = TestDb::new().await;
    let receiver = Receiver::start(Arc::new(|_, _| Reply::status(200).delay(Duration::from_millis(20)))).await;
    let ids = enqueue_many(&db.pool, &receiver.url, 300).await;
    unlimited(&db.pool).await;
    let mut cfg = config();
    cfg.concurrency = 8;
    cfg.batch_size = 8;
    let worker_pool = pool(&db.url, 4).await;
    let (stop, handle) = spawn_worker(&worker_pool, cfg);
    receiver.wait_for(20, Duration::from_secs(20)).await;
    let admin = pool(&db.url, 1).await;
    for _ in 0..3 {
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
            .execute(&admin)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    wait_until(
        &admin,
        "SELECT count(*) FROM postbox.outbox WHERE status <> 'delivered'",
        0,
        Duration::from_secs(60),
    )
    .await;
    stop.send(()).unwrap();
    handle.await.unwrap();
    let mut seen: Vec<Uuid> = receiver.hits().iter().map(|h| h.id()).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), ids.len(), "every event arrived");
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM postbox.outbox WHERE locked_by IS NOT NULL")
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(held, 0);
}
