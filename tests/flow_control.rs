//! Flow control across worker processes: per-endpoint concurrency and rate,
//! fairness, back-pressure, the circuit breaker, ordering keys.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use uuid::Uuid;

const THREE: usize = 3;

fn workers(db_url: &str, env: &[(&str, &str)]) -> Vec<WorkerProc> {
    (0..THREE).map(|_| spawn_worker_process(db_url, env)).collect()
}

/// max_in_flight holds at the receiver with three worker processes.
#[tokio::test]
async fn concurrency_limit_holds_across_workers() {
    let db = TestDb::new().await;
    let receiver = Receiver::start(Arc::new(|_, _| Reply::status(200).delay(Duration::from_millis(300)))).await;
    enqueue_bulk(&db.pool, &receiver.url, 30, None).await;
    set_limits(&db.pool, &receiver.url, 3, None).await;
    let mut ws = workers(&db.url, &[("POSTBOX_CONCURRENCY", "10")]);
    wait_until(
        &db.pool,
        "SELECT count(*) FROM postbox.outbox WHERE status <> 'delivered'",
        0,
        Duration::from_secs(60),
    )
    .await;
    stop_all(&mut ws).await;
    assert_eq!(receiver.count(), 30);
    assert_eq!(
        receiver.max_concurrent(),
        3,
        "never more than max_in_flight, and the limit is used"
    );
}

/// rate_per_minute holds at the receiver with three worker processes.
#[tokio::test]
async fn rate_limit_holds_across_workers() {
    let db = TestDb::new().await;
    let receiver = Receiver::ok().await;
    enqueue_bulk(&db.pool, &receiver.url, 50, None).await;
    set_limits(&db.pool, &receiver.url, 10, Some(20)).await;
    let mut ws = workers(&db.url, &[]);
    receiver.wait_for(20, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_all(&mut ws).await;
    assert_eq!(receiver.count(), 20, "exactly the rate in the first window");
    let started: i64 = sqlx::query_scalar("SELECT count(*) FROM postbox.outbox WHERE attempts > 0")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(started, 20);
}

/// A slow endpoint with a huge backlog does not delay another endpoint.
#[tokio::test]
async fn slow_backlog_does_not_delay_other_endpoints() {
    let db = TestDb::new().await;
    let slow = Receiver::start(Arc::new(|_, _| Reply::status(200).delay(Duration::from_secs(2)))).await;
    let fast = Receiver::ok().await;
    enqueue_bulk(&db.pool, &slow.url, 5000, None).await;
    let mut ws = workers(&db.url, &[("POSTBOX_CONCURRENCY", "20")]);
    slow.wait_for(5, Duration::from_secs(20)).await;
    let start = Instant::now();
    enqueue_bulk(&db.pool, &fast.url, 10, None).await;
    fast.wait_for(10, Duration::from_secs(10)).await;
    let took = start.elapsed();
    stop_all(&mut ws).await;
    assert!(took < Duration::from_secs(5), "endpoint B's events took {took:?}");
    assert!(slow.max_concurrent() <= 10, "the slow endpoint keeps its own limit");
}

/// 429 with Retry-After delays the event (never sooner than asked) and pauses the endpoint.
#[tokio::test]
async fn retry_after_delays_and_pauses_the_endpoint() {
    let db = TestDb::new().await;
    let receiver = Receiver::start(Arc::new(|n, _| {
        if n == 1 {
            Reply::status(429).header("retry-after", "2")
        } else {
            Reply::status(200)
        }
    }))
    .await;
    enqueue_bulk(&db.pool, &receiver.url, 1, None).await;
    set_limits(&db.pool, &receiver.url, 1, None).await;
    let (stop, handle) = spawn_worker(&db.pool, config());
    receiver.wait_for(1, Duration::from_secs(10)).await;
    enqueue_bulk(&db.pool, &receiver.url, 1, None).await;
    let hits = receiver.wait_for(3, Duration::from_secs(15)).await;
    stop.send(()).unwrap();
    handle.await.unwrap();
    let gap = hits[1].at - hits[0].at;
    assert!(
        gap >= Duration::from_millis(1900),
        "nothing reached the endpoint during its pause: {gap:?}"
    );
    let paused: bool = sqlx::query_scalar("SELECT paused_until IS NOT NULL FROM postbox.endpoint_state")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(paused);
}

/// The breaker opens after failures of several distinct events, holds events without spending attempts, probes, and closes.
#[tokio::test]
async fn breaker_opens_probes_and_closes() {
    let db = TestDb::new().await;
    let healthy = Arc::new(AtomicBool::new(false));
    let h = healthy.clone();
    let receiver = Receiver::start(Arc::new(move |_, _| {
        Reply::status(if h.load(Ordering::SeqCst) { 200 } else { 500 })
    }))
    .await;
    let ids = enqueue_bulk(&db.pool, &receiver.url, 8, None).await;
    set_limits(&db.pool, &receiver.url, 1, None).await;
    let env = [
        ("POSTBOX_BREAKER_THRESHOLD", "3"),
        ("POSTBOX_BREAKER_COOLDOWN", "2s"),
        ("POSTBOX_RETRY_SCHEDULE", "100ms"),
        ("POSTBOX_CONCURRENCY", "1"),
    ];
    let mut ws = workers(&db.url, &env);
    wait_until(
        &db.pool,
        "SELECT count(*) FROM postbox.endpoint_state WHERE breaker_open_until > now()",
        1,
        Duration::from_secs(20),
    )
    .await;
    let at_open = receiver.count();
    let out = run({
        let mut c = postbox(Some(&db.url));
        c.args(["status", "--json"]);
        c
    });
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        status["failing_endpoints"][0]["state"]
            .as_str()
            .unwrap()
            .starts_with("breaker open until"),
        "{status}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(receiver.count(), at_open, "no deliveries while open");
    let failed: i64 = sqlx::query_scalar("SELECT count(*) FROM postbox.outbox WHERE status = 'failed'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(failed, 0, "events wait without spending their attempts");
    healthy.store(true, Ordering::SeqCst);
    wait_until(
        &db.pool,
        "SELECT count(*) FROM postbox.outbox WHERE status = 'delivered'",
        ids.len() as i64,
        Duration::from_secs(30),
    )
    .await;
    stop_all(&mut ws).await;
    let (open, failing): (bool, i32) = sqlx::query_as(
        "SELECT breaker_open_until IS NOT NULL, cardinality(failing_events) FROM postbox.endpoint_state",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((open, failing), (false, 0), "a successful probe closes the breaker");
}

/// One event's own retries never open the breaker: a lone event follows the schedule to failed.
#[tokio::test]
async fn lone_event_retries_do_not_open_the_breaker() {
    let db = TestDb::new().await;
    let receiver = Receiver::start(Arc::new(|_, _| Reply::status(500))).await;
    let id = enqueue_bulk(&db.pool, &receiver.url, 1, None).await[0];
    let mut cfg = config();
    cfg.breaker.threshold = 2;
    let (stop, handle) = spawn_worker(&db.pool, cfg);
    wait_until(
        &db.pool,
        &format!("SELECT count(*) FROM postbox.outbox WHERE id = '{id}' AND status = 'failed'"),
        1,
        Duration::from_secs(20),
    )
    .await;
    stop.send(()).unwrap();
    handle.await.unwrap();
    assert_eq!(receiver.count(), 4);
    let open: bool = sqlx::query_scalar("SELECT breaker_open_until IS NOT NULL FROM postbox.endpoint_state")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(!open);
}

/// Events sharing an ordering key arrive one at a time, in enqueue order, across three workers, even through retries.
#[tokio::test]
async fn ordering_key_is_strict_across_workers() {
    let db = TestDb::new().await;
    // The 5th keyed event fails once, so the rest must wait for its retry.
    let target: Arc<std::sync::Mutex<Option<(Uuid, bool)>>> = Arc::default();
    let t = target.clone();
    let receiver = Receiver::start(Arc::new(move |_, hit| {
        let mut t = t.lock().unwrap();
        let status = match *t {
            Some((id, false)) if id == hit.id() => {
                *t = Some((id, true));
                503
            }
            _ => 200,
        };
        Reply::status(status).delay(Duration::from_millis(30))
    }))
    .await;
    let ids = enqueue_bulk(&db.pool, &receiver.url, 20, Some("conversation-1")).await;
    *target.lock().unwrap() = Some((ids[4], false));
    let others = enqueue_bulk(&db.pool, &receiver.url, 10, None).await;
    unlimited(&db.pool).await;
    let mut ws = workers(&db.url, &[]);
    wait_until(
        &db.pool,
        "SELECT count(*) FROM postbox.outbox WHERE status <> 'delivered'",
        0,
        Duration::from_secs(30),
    )
    .await;
    stop_all(&mut ws).await;
    let keyed: Vec<Uuid> = receiver
        .hits()
        .iter()
        .map(|h| h.id())
        .filter(|id| ids.contains(id))
        .collect();
    let mut first_seen: Vec<Uuid> = Vec::new();
    for id in &keyed {
        if !first_seen.contains(id) {
            first_seen.push(*id);
        }
    }
    assert_eq!(first_seen, ids, "arrival order is enqueue order");
    // A retried event is attempted again before the next one starts.
    let mut last = 0;
    for id in &keyed {
        let pos = ids.iter().position(|x| x == id).unwrap();
        assert!(pos >= last, "event {pos} arrived after event {last}");
        last = pos;
    }
    assert_eq!(keyed.len(), 21, "twenty events, one retried");
    assert!(others.iter().all(|o| receiver.hits().iter().any(|h| h.id() == *o)));
}

/// A claim never returns more rows than asked for, however the fair shares round.
#[tokio::test]
async fn claim_never_exceeds_the_batch() {
    let db = TestDb::new().await;
    for e in 0..5 {
        enqueue_bulk(&db.pool, &format!("https://example.com/{e}"), 10, None).await;
    }
    unlimited(&db.pool).await;
    for want in [1, 3, 7, 9, 11] {
        let got = common::protocol::claim(&db.pool, "w", want, Duration::from_secs(30))
            .await
            .unwrap();
        assert!(
            !got.is_empty() && got.len() as i64 <= want,
            "asked {want}, got {}",
            got.len()
        );
    }
}

/// A worker does not run ahead of its recorder: while outcomes cannot be
/// written, it delivers at most its concurrency plus the queue it allows
/// (its concurrency, but at least the 64 outcomes the recorder lingers for),
/// then waits; their leases still count against the endpoint's
/// max_in_flight, and more claims would only lengthen the queue.
#[tokio::test]
async fn a_worker_waits_for_its_recorder() {
    let db = TestDb::new().await;
    let receiver = Receiver::ok().await;
    enqueue_bulk(&db.pool, &receiver.url, 200, None).await;
    set_limits(&db.pool, &receiver.url, 1000, None).await;
    // Outcomes cannot be written while the attempt log is locked against inserts.
    let mut lock = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE postbox.attempts IN SHARE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let mut cfg = config();
    cfg.concurrency = 4;
    cfg.batch_size = 4;
    let (stop, handle) = spawn_worker(&db.pool, cfg);
    receiver.wait_for(64, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let ahead = receiver.count();
    assert!(
        (64..=67).contains(&ahead),
        "{ahead} events delivered while none could be recorded (at most 64 + 4 - 1)"
    );
    lock.commit().await.unwrap();
    wait_until(
        &db.pool,
        "SELECT count(*) FROM postbox.outbox WHERE status <> 'delivered'",
        0,
        Duration::from_secs(30),
    )
    .await;
    let _ = stop.send(());
    let stats = handle.await.unwrap();
    assert_eq!((receiver.count(), stats.delivered), (200, 200));
}
