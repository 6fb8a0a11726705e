//! Endpoint lifecycle events (`postbox.endpoint_events` and the NOTIFY
//! channel `postbox_endpoint_events`) and per-endpoint retry policies.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use sqlx::postgres::PgListener;
use sqlx::PgPool;

/// The lifecycle rows of an endpoint, oldest first: (kind, detail).
async fn events_of(pool: &PgPool, url: &str) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT ev.kind, coalesce(ev.detail, '') FROM postbox.endpoint_events ev
         JOIN postbox.endpoints e ON e.id = ev.endpoint_id WHERE e.url = $1 ORDER BY ev.id",
    )
    .bind(url)
    .fetch_all(pool)
    .await
    .unwrap()
}

fn kinds(events: &[(String, String)]) -> Vec<&str> {
    events.iter().map(|(k, _)| k.as_str()).collect()
}

/// Every notification received so far on the channel, as JSON.
async fn drain_notifications(listener: &mut PgListener) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(300), listener.recv()).await {
        out.push(serde_json::from_str(n.payload()).expect("the payload is JSON"));
    }
    out
}

/// 410 Gone disables (recorded and announced); re-enabling with plain SQL
/// records `enabled`; disabling by hand records the operator's reason.
#[tokio::test]
async fn disable_and_enable_are_recorded_and_announced() {
    let db = TestDb::new().await;
    let mut listener = PgListener::connect(&db.url).await.unwrap();
    listener.listen("postbox_endpoint_events").await.unwrap();
    let gone = Receiver::start(Arc::new(|_, _| Reply::status(410))).await;
    enqueue_many(&db.pool, &gone.url, 1).await;
    drain(&db.pool, config()).await;
    sqlx::query("UPDATE postbox.endpoints SET disabled_at = NULL, disabled_reason = NULL")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE postbox.endpoints SET disabled_at = now(), disabled_reason = 'customer asked'")
        .execute(&db.pool)
        .await
        .unwrap();
    let events = events_of(&db.pool, &gone.url).await;
    assert_eq!(kinds(&events), ["disabled", "enabled", "disabled"], "{events:?}");
    assert_eq!(events[0].1, "410 Gone");
    assert!(events[1].1.starts_with("was disabled since"), "{events:?}");
    assert_eq!(events[2].1, "customer asked");

    let heard = drain_notifications(&mut listener).await;
    let heard_kinds: Vec<&str> = heard.iter().map(|n| n["kind"].as_str().unwrap()).collect();
    assert_eq!(heard_kinds, ["disabled", "enabled", "disabled"], "{heard:?}");
    let endpoint_id: i64 = sqlx::query_scalar("SELECT id FROM postbox.endpoints")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(heard[0]["endpoint_id"], endpoint_id);
    assert_eq!(heard[0]["detail"], "410 Gone");
    assert!(heard[0]["at"].is_string() && heard[0]["id"].is_i64(), "{}", heard[0]);
}

/// A pause is recorded once, however many 429s with Retry-After arrive
/// while it lasts: five events in flight at once all get a 429, answered
/// 100 ms apart so that each outcome is recorded on its own and the later
/// ones extend the pause.
#[tokio::test]
async fn a_retry_after_pause_is_recorded_once() {
    let db = TestDb::new().await;
    let busy = Receiver::start(Arc::new(|n, _| {
        if n <= 5 {
            Reply::status(429)
                .header("retry-after", "2")
                .delay(Duration::from_millis(100 * n as u64))
        } else {
            Reply::status(200)
        }
    }))
    .await;
    enqueue_many(&db.pool, &busy.url, 5).await;
    let mut cfg = config();
    cfg.concurrency = 5;
    let (stop, worker) = spawn_worker(&db.pool, cfg);
    wait_until(
        &db.pool,
        "SELECT count(*) FROM postbox.outbox WHERE status = 'delivered'",
        5,
        Duration::from_secs(20),
    )
    .await;
    stop.send(()).ok();
    worker.await.unwrap();
    let hits = busy.requests();
    let first_five: Vec<u16> = hits.iter().take(5).map(|(_, status, _)| *status).collect();
    assert_eq!(first_five, [429; 5], "all five were answered 429");
    let events = events_of(&db.pool, &busy.url).await;
    let paused: Vec<_> = events.iter().filter(|(k, _)| k == "paused").collect();
    assert_eq!(paused.len(), 1, "one pause, one row: {events:?}");
    assert!(
        paused[0].1.starts_with("Retry-After: nothing is sent until"),
        "{events:?}"
    );
}

/// The breaker: opened (with the failing count), a failed probe opens it
/// again, a delivery closes it.
#[tokio::test]
async fn breaker_transitions_are_recorded() {
    let db = TestDb::new().await;
    let healthy = Arc::new(AtomicBool::new(false));
    let h = healthy.clone();
    let receiver = Receiver::start(Arc::new(move |_, _| {
        Reply::status(if h.load(Ordering::SeqCst) { 200 } else { 500 })
    }))
    .await;
    enqueue_many(&db.pool, &receiver.url, 4).await;
    sqlx::query("UPDATE postbox.endpoints SET max_in_flight = 1")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut cfg = config();
    cfg.concurrency = 1;
    cfg.breaker.threshold = 2;
    cfg.breaker.cooldown = Duration::from_millis(500);
    cfg.breaker.max_cooldown = Duration::from_secs(2);
    cfg.retry.schedule = vec![Duration::from_millis(100)];
    let (stop, worker) = spawn_worker(&db.pool, cfg);
    // Opened, then at least one probe failed.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let k = kinds(&events_of(&db.pool, &receiver.url).await)
            .iter()
            .filter(|k| **k == "breaker_opened")
            .count();
        if k >= 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the breaker did not open and re-open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    healthy.store(true, Ordering::SeqCst);
    wait_until(
        &db.pool,
        "SELECT count(*) FROM postbox.outbox WHERE status = 'delivered'",
        4,
        Duration::from_secs(30),
    )
    .await;
    stop.send(()).ok();
    worker.await.unwrap();
    let events = events_of(&db.pool, &receiver.url).await;
    let k = kinds(&events);
    assert_eq!(k.first(), Some(&"breaker_opened"), "{events:?}");
    assert!(events[0].1.starts_with("2 events failing"), "{events:?}");
    assert!(events[1].1.starts_with("the probe failed"), "{events:?}");
    assert_eq!(k.last(), Some(&"breaker_closed"), "{events:?}");
    assert_eq!(events.last().unwrap().1, "a delivery succeeded");
    // Opens and closes alternate: never two closes in a row.
    assert!(
        !k.windows(2).any(|w| w == ["breaker_closed", "breaker_closed"]),
        "{events:?}"
    );

    // An operator clearing the breaker by hand is recorded too.
    sqlx::query(
        "UPDATE postbox.endpoint_state SET breaker_open_until = now() + interval '1 hour',
                                           breaker_cooldown = interval '1 hour'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("UPDATE postbox.endpoint_state SET breaker_open_until = NULL, breaker_cooldown = NULL")
        .execute(&db.pool)
        .await
        .unwrap();
    let events = events_of(&db.pool, &receiver.url).await;
    assert_eq!(
        events.last().unwrap(),
        &("breaker_closed".to_string(), "cleared".to_string())
    );
}

/// Lifecycle rows older than the retention of delivered events are pruned.
#[tokio::test]
async fn lifecycle_events_are_pruned_with_delivered_events() {
    let db = TestDb::new().await;
    let r = Receiver::ok().await;
    enqueue_many(&db.pool, &r.url, 1).await;
    sqlx::query("UPDATE postbox.endpoints SET disabled_at = now()")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE postbox.endpoints SET disabled_at = NULL")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE postbox.endpoint_events SET at = now() - interval '8 days' WHERE kind = 'disabled'")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("SELECT postbox.prune(interval '7 days', NULL, 100)")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(kinds(&events_of(&db.pool, &r.url).await), ["enabled"]);
}

/// An endpoint's own schedule and attempt count replace the worker's; other
/// endpoints keep the worker's; max_attempts applies to events enqueued
/// after it is set.
#[tokio::test]
async fn an_endpoint_retry_policy_replaces_the_workers() {
    let db = TestDb::new().await;
    let own = Receiver::start(Arc::new(|_, _| Reply::status(500))).await;
    let plain = Receiver::start(Arc::new(|_, _| Reply::status(500))).await;
    let before = enqueue_many(&db.pool, &own.url, 1).await[0];
    sqlx::query("UPDATE postbox.endpoints SET retry_schedule = '{1200ms, 300ms}', max_attempts = 3 WHERE url = $1")
        .bind(&own.url)
        .execute(&db.pool)
        .await
        .unwrap();
    let after = enqueue_many(&db.pool, &own.url, 1).await[0];
    let other = enqueue_many(&db.pool, &plain.url, 1).await[0];
    let max: Vec<i32> = sqlx::query_scalar("SELECT max_attempts FROM postbox.outbox WHERE id = ANY($1) ORDER BY id")
        .bind(vec![before, after, other])
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(max, [4, 3, 4], "fixed at enqueue");

    let mut cfg = config();
    cfg.retry.schedule = vec![Duration::from_millis(100)];
    let (stop, worker) = spawn_worker(&db.pool, cfg);
    wait_until(
        &db.pool,
        "SELECT count(*) FROM postbox.outbox WHERE status = 'failed'",
        3,
        Duration::from_secs(20),
    )
    .await;
    stop.send(()).ok();
    worker.await.unwrap();
    assert_eq!(row(&db.pool, after).await, ("failed".to_string(), 3));
    assert_eq!(row(&db.pool, before).await, ("failed".to_string(), 4));
    assert_eq!(row(&db.pool, other).await, ("failed".to_string(), 4));

    // Gaps between attempts (start to start) follow each endpoint's schedule.
    let gaps = |id| {
        let pool = db.pool.clone();
        async move {
            let g: Vec<f64> = sqlx::query_scalar(
                "SELECT extract(epoch FROM started_at - lag(started_at) OVER (ORDER BY attempt))::float8
                 FROM postbox.attempts WHERE outbox_id = $1 ORDER BY attempt OFFSET 1",
            )
            .bind(id)
            .fetch_all(&pool)
            .await
            .unwrap();
            g
        }
    };
    let g = gaps(after).await;
    assert!(
        g[0] >= 1.2 && g[1] >= 0.3 && g[1] < 1.2,
        "the endpoint's 1200ms, 300ms: {g:?}"
    );
    let g = gaps(other).await;
    assert!(g.iter().all(|s| *s >= 0.1 && *s < 1.0), "the worker's 100ms: {g:?}");

    // Out-of-range policies are refused by the table, naming the constraint.
    for bad in [
        "UPDATE postbox.endpoints SET retry_schedule = '{}'",
        "UPDATE postbox.endpoints SET retry_schedule = '{0s}'",
        "UPDATE postbox.endpoints SET retry_schedule = '{31 days}'",
        "UPDATE postbox.endpoints SET retry_schedule = ARRAY[NULL::interval]",
        "UPDATE postbox.endpoints SET max_attempts = 0",
        "UPDATE postbox.endpoints SET max_attempts = 101",
    ] {
        let e = sqlx::query(bad).execute(&db.pool).await.unwrap_err().to_string();
        assert!(
            e.contains("endpoints_retry_schedule") || e.contains("endpoints_max_attempts"),
            "{bad}: {e}"
        );
    }
}
