//! The dispatch invariants (docs/dispatch.md), each tried against the
//! interleaving that could break it: application transactions held open,
//! endpoints that cannot receive, concurrent writers of one ordering key,
//! operators changing state with plain SQL, late acknowledgements.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::protocol::{claim, outcome, record, release, Outcome};
use common::*;
use postbox::delivery::Next;
use postbox::BreakerPolicy;
use sqlx::PgPool;
use uuid::Uuid;

const LEASE: Duration = Duration::from_secs(30);

async fn endpoint_id(pool: &PgPool, url: &str) -> i64 {
    sqlx::query_scalar("SELECT id FROM postbox.endpoints WHERE url = $1")
        .bind(url)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Where the event stands, in words (`postbox.event_state`).
async fn state_of(pool: &PgPool, id: Uuid) -> String {
    sqlx::query_scalar("SELECT postbox.event_state(o) FROM postbox.outbox o WHERE o.id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn exec(pool: &PgPool, sql: &str) {
    sqlx::query(sql).execute(pool).await.unwrap();
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

fn sorted(mut v: Vec<Uuid>) -> Vec<Uuid> {
    v.sort();
    v
}

/// An application transaction held open on an endpoint neither hides that endpoint's committed events from a claim nor delays their delivery.
#[tokio::test]
async fn open_app_transaction_never_holds_back_committed_events() {
    let db = TestDb::new().await;
    let receiver = Receiver::ok().await;
    let committed = enqueue_bulk(&db.pool, &receiver.url, 5, None).await;
    // The application writes an event for the same endpoint and does not commit.
    let mut app = db.pool.begin().await.unwrap();
    let held = postbox::enqueue(&mut app, &receiver.url, &event("held open"))
        .await
        .unwrap();
    let got = claim(&db.pool, "w", 10, LEASE).await.unwrap();
    assert_eq!(
        sorted(got.iter().map(|r| r.id).collect()),
        sorted(committed.clone()),
        "one claim takes every committed event"
    );
    let leases: Vec<(Uuid, i32)> = got.iter().map(|r| (r.id, r.attempt)).collect();
    assert_eq!(release(&db.pool, "w", &leases).await.unwrap(), 5);

    let (stop, handle) = spawn_worker(&db.pool, config());
    receiver.wait_for(5, Duration::from_secs(5)).await;
    let more = enqueue_bulk(&db.pool, &receiver.url, 5, None).await;
    let hits = receiver.wait_for(10, Duration::from_secs(5)).await;
    let seen: Vec<Uuid> = hits.iter().map(Hit::id).collect();
    assert_eq!(sorted(seen), sorted([committed, more].concat()));
    app.commit().await.unwrap();
    let hits = receiver.wait_for(11, Duration::from_secs(5)).await;
    assert_eq!(hits[10].id(), held, "the event arrives once its transaction commits");
    stop.send(()).unwrap();
    handle.await.unwrap();
}

/// The locks workers take (a claim's endpoint_state row, an outcome's UPDATE of an endpoints row, a leased event row) never make an enqueue wait.
#[tokio::test]
async fn worker_locks_never_block_an_enqueue() {
    let db = TestDb::new().await;
    let url = "https://example.com/hook";
    enqueue_bulk(&db.pool, url, 1, Some("k")).await;
    let leased = claim(&db.pool, "w", 1, LEASE).await.unwrap();
    let ep = endpoint_id(&db.pool, url).await;
    let mut worker = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM postbox.endpoint_state WHERE endpoint_id = $1 FOR UPDATE")
        .bind(ep)
        .execute(&mut *worker)
        .await
        .unwrap();
    sqlx::query("UPDATE postbox.endpoints SET disabled_reason = disabled_reason WHERE id = $1")
        .bind(ep)
        .execute(&mut *worker)
        .await
        .unwrap();
    sqlx::query("UPDATE postbox.outbox SET last_error = last_error WHERE id = $1")
        .bind(leased[0].id)
        .execute(&mut *worker)
        .await
        .unwrap();

    let mut app = db.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL statement_timeout = '2s'")
        .execute(&mut *app)
        .await
        .unwrap();
    let start = Instant::now();
    postbox::enqueue(&mut app, url, &event("plain")).await.unwrap();
    let mut keyed = event("keyed");
    keyed.ordering_key = Some("k".into());
    postbox::enqueue(&mut app, url, &keyed).await.unwrap();
    app.commit().await.unwrap();
    assert!(start.elapsed() < Duration::from_secs(1), "{:?}", start.elapsed());
    worker.rollback().await.unwrap();
}

/// Endpoints that cannot receive (at max_in_flight, paused, breaker open, disabled, waiting on a key, rate window full) never delay one that can: a single claim returns the healthy endpoint's events, and each held event says why it waits.
#[tokio::test]
async fn blocked_endpoints_never_delay_a_healthy_one() {
    let db = TestDb::new().await;
    let p = &db.pool;
    let url = |name: &str| format!("https://{name}.example.com/hook");
    // At max_in_flight: one event leased, then a backlog.
    enqueue_bulk(p, &url("full"), 1, None).await;
    set_limits(p, &url("full"), 1, None).await;
    assert_eq!(claim(p, "other", 1, LEASE).await.unwrap().len(), 1);
    let full = enqueue_bulk(p, &url("full"), 300, None).await;
    // Waiting on a key whose head is in flight.
    let head = enqueue_bulk(p, &url("keyed"), 1, Some("k")).await[0];
    assert_eq!(claim(p, "other", 1, LEASE).await.unwrap()[0].id, head);
    let keyed = enqueue_bulk(p, &url("keyed"), 300, Some("k")).await;
    // Rate window full.
    enqueue_bulk(p, &url("rate"), 1, None).await;
    set_limits(p, &url("rate"), 10, Some(1)).await;
    assert_eq!(claim(p, "other", 1, LEASE).await.unwrap().len(), 1);
    let rate = enqueue_bulk(p, &url("rate"), 300, None).await;
    // Paused, breaker open, disabled.
    let paused = enqueue_bulk(p, &url("paused"), 300, None).await;
    let broken = enqueue_bulk(p, &url("broken"), 300, None).await;
    let disabled = enqueue_bulk(p, &url("disabled"), 300, None).await;
    exec(
        p,
        "UPDATE postbox.endpoint_state s SET paused_until = now() + interval '1 hour'
         FROM postbox.endpoints e WHERE e.id = s.endpoint_id AND e.url LIKE 'https://paused.%'",
    )
    .await;
    exec(
        p,
        "UPDATE postbox.endpoint_state s SET breaker_open_until = now() + interval '1 hour'
         FROM postbox.endpoints e WHERE e.id = s.endpoint_id AND e.url LIKE 'https://broken.%'",
    )
    .await;
    exec(
        p,
        "UPDATE postbox.endpoints SET disabled_at = now() WHERE url LIKE 'https://disabled.%'",
    )
    .await;

    let healthy = enqueue_bulk(p, &url("healthy"), 5, None).await;
    let got = claim(p, "w", 10, LEASE).await.unwrap();
    assert_eq!(sorted(got.iter().map(|r| r.id).collect()), sorted(healthy));
    assert!(
        claim(p, "w", 10, LEASE).await.unwrap().is_empty(),
        "nothing else is deliverable"
    );

    let says = |id, words: String| async move {
        let s = state_of(p, id).await;
        assert!(s.starts_with(&words), "{s:?} should start with {words:?}");
    };
    says(full[7], "at max_in_flight (1 in flight)".into()).await;
    says(keyed[7], format!("waits for event {head} of key k")).await;
    says(rate[7], "rate window full until".into()).await;
    says(paused[7], "endpoint paused by Retry-After until".into()).await;
    says(broken[7], "breaker open until".into()).await;
    says(disabled[7], "endpoint disabled since".into()).await;
    let pending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM postbox.pending_events WHERE state LIKE 'waits for event%'")
            .fetch_one(p)
            .await
            .unwrap();
    assert_eq!(pending, 300, "the view says the same");
}

/// Concurrent writers of one ordering key take turns, so events of a key go in the order their transactions committed, one at a time; the same key on another endpoint does not wait.
#[tokio::test]
async fn ordering_key_follows_commit_order_across_writers() {
    let db = TestDb::new().await;
    let receiver = Receiver::start(Arc::new(|_, _| Reply::status(200).delay(Duration::from_millis(100)))).await;
    let other = Receiver::ok().await;
    // Endpoints exist with room for several in flight.
    enqueue_bulk(&db.pool, &receiver.url, 1, None).await;
    set_limits(&db.pool, &receiver.url, 10, None).await;
    let (stop, handle) = spawn_worker(&db.pool, config());
    receiver.wait_for(1, Duration::from_secs(5)).await;

    let keyed = |content: &str| {
        let mut e = event(content);
        e.ordering_key = Some("order-42".into());
        e
    };
    let mut first = db.pool.begin().await.unwrap();
    let first_id = postbox::enqueue(&mut first, &receiver.url, &keyed("first"))
        .await
        .unwrap();
    let pool = db.pool.clone();
    let url = receiver.url.clone();
    let second = tokio::spawn(async move {
        let mut tx = pool.begin().await.unwrap();
        let id = postbox::enqueue(&mut tx, &url, &keyed("second")).await.unwrap();
        tx.commit().await.unwrap();
        id
    });
    // The same key on another endpoint is not held by the open transaction.
    let mut tx = db.pool.begin().await.unwrap();
    let elsewhere = postbox::enqueue(&mut tx, &other.url, &keyed("elsewhere"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let hits = other.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(hits[0].id(), elsewhere);
    assert!(
        !second.is_finished(),
        "the second writer of the key waits for the first"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.commit().await.unwrap();
    let second_id = second.await.unwrap();
    let hits = receiver.wait_for(3, Duration::from_secs(5)).await;
    let order: Vec<Uuid> = hits[1..].iter().map(Hit::id).collect();
    assert_eq!(order, vec![first_id, second_id], "commit order");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let requests = receiver.requests();
    let (a, b) = (&requests[1], &requests[2]);
    assert!(b.0.at >= a.2.expect("first answered"), "never two of a key in flight");
    stop.send(()).unwrap();
    handle.await.unwrap();
}

/// A key is scoped to its endpoint: events waiting on a disabled endpoint never hold back the same key elsewhere, and `--until-empty` still exits.
#[tokio::test]
async fn key_on_a_disabled_endpoint_holds_nothing_else() {
    let db = TestDb::new().await;
    let healthy = Receiver::ok().await;
    let dead = Receiver::ok().await;
    let parked = enqueue_bulk(&db.pool, &dead.url, 3, Some("k")).await;
    exec(
        &db.pool,
        &format!(
            "UPDATE postbox.endpoints SET disabled_at = now() WHERE url = '{}'",
            dead.url
        ),
    )
    .await;
    let ids = enqueue_bulk(&db.pool, &healthy.url, 3, Some("k")).await;
    drain(&db.pool, config()).await;
    let got: Vec<Uuid> = healthy.hits().iter().map(Hit::id).collect();
    assert_eq!(got, ids, "delivered, in order");
    assert_eq!(dead.count(), 0);
    for id in parked {
        assert_eq!(row(&db.pool, id).await, ("pending".into(), 0));
    }
}

/// Plain SQL on the documented columns resumes anything, with a worker running and polling only every 10 s: re-enabling, ending a pause, closing a breaker, cancelling the head of a key.
#[tokio::test]
async fn plain_sql_resumes_everything() {
    let db = TestDb::new().await;
    let p = &db.pool;
    let receiver = Receiver::ok().await;
    let failing = Receiver::start(Arc::new(|_, _| Reply::status(500))).await;
    // Make the endpoints, then hold each one back in its own way.
    enqueue_bulk(p, &receiver.url, 1, None).await;
    let mut cfg = config();
    cfg.poll_interval = Duration::from_secs(10);
    cfg.retry.schedule = vec![Duration::from_secs(3600)];
    let (stop, handle) = spawn_worker(p, cfg);
    receiver.wait_for(1, Duration::from_secs(5)).await;
    let ep = endpoint_id(p, &receiver.url).await;

    let hold_and_resume = |hold: &'static str, resume: &'static str, words: &'static str| {
        let receiver = receiver.clone();
        async move {
            exec(p, &hold.replace("$EP", &ep.to_string())).await;
            let before = receiver.count();
            let id = enqueue_bulk(p, &receiver.url, 1, None).await[0];
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert_eq!(receiver.count(), before, "held: {hold}");
            let s = state_of(p, id).await;
            assert!(s.starts_with(words), "{s}");
            let at = Instant::now();
            exec(p, &resume.replace("$EP", &ep.to_string())).await;
            let hits = receiver.wait_for(before + 1, Duration::from_secs(3)).await;
            assert_eq!(hits[before].id(), id);
            assert!(at.elapsed() < Duration::from_secs(2), "{resume}: {:?}", at.elapsed());
            // (the success is recorded before the next hold is set: a success closes a breaker)
            wait_until(
                p,
                "SELECT count(*) FROM postbox.outbox WHERE status <> 'delivered'",
                0,
                Duration::from_secs(5),
            )
            .await;
        }
    };
    hold_and_resume(
        "UPDATE postbox.endpoints SET disabled_at = now() WHERE id = $EP",
        "UPDATE postbox.endpoints SET disabled_at = NULL WHERE id = $EP",
        "endpoint disabled since",
    )
    .await;
    hold_and_resume(
        "UPDATE postbox.endpoint_state SET paused_until = now() + interval '1 hour' WHERE endpoint_id = $EP",
        "UPDATE postbox.endpoint_state SET paused_until = NULL WHERE endpoint_id = $EP",
        "endpoint paused by Retry-After until",
    )
    .await;
    hold_and_resume(
        "UPDATE postbox.endpoint_state SET breaker_open_until = now() + interval '1 hour' WHERE endpoint_id = $EP",
        "UPDATE postbox.endpoint_state SET breaker_open_until = NULL WHERE endpoint_id = $EP",
        "breaker open until",
    )
    .await;

    // The head of a key fails and waits an hour for its retry; cancelling it lets the next go.
    let keyed = enqueue_bulk(p, &failing.url, 2, Some("k")).await;
    failing.wait_for(1, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(failing.count(), 1);
    assert!(state_of(p, keyed[0]).await.starts_with("retry scheduled at"));
    assert_eq!(
        state_of(p, keyed[1]).await,
        format!("waits for event {} of key k", keyed[0])
    );
    sqlx::query("UPDATE postbox.outbox SET status = 'cancelled' WHERE id = $1")
        .bind(keyed[0])
        .execute(p)
        .await
        .unwrap();
    let hits = failing.wait_for(2, Duration::from_secs(2)).await;
    assert_eq!(hits[1].id(), keyed[1]);
    stop.send(()).unwrap();
    handle.await.unwrap();
}

/// The breaker opens on distinct failing events; failures already in flight when it opened do not lengthen it, only a failed probe doubles the cool-down, and a 429/503 with Retry-After is back-pressure, not a failure.
#[tokio::test]
async fn breaker_doubles_only_on_a_failed_probe() {
    let db = TestDb::new().await;
    let p = &db.pool;
    let url = "https://example.com/hook";
    enqueue_bulk(p, url, 6, None).await;
    let policy = BreakerPolicy {
        threshold: 2,
        cooldown: Duration::from_secs(10),
        max_cooldown: Duration::from_secs(600),
    };
    let got = claim(p, "w", 5, LEASE).await.unwrap();
    assert_eq!(got.len(), 5);
    let fail = |r: &common::protocol::Claimed| {
        outcome(
            r.id,
            r.attempt,
            500,
            Next::Retry {
                after: Duration::from_secs(1),
            },
        )
    };
    let breaker = || async {
        sqlx::query_as::<_, (Option<f64>, Option<f64>)>(
            "SELECT extract(epoch FROM breaker_open_until - now())::float8,
                    extract(epoch FROM breaker_cooldown)::float8
             FROM postbox.endpoint_state",
        )
        .fetch_one(p)
        .await
        .unwrap()
    };
    record(p, "w", &[fail(&got[0]), fail(&got[1])], &policy).await.unwrap();
    let (open, cooldown) = breaker().await;
    assert_eq!(cooldown, Some(10.0), "opened on two distinct events");
    assert!(open.unwrap() > 9.0);
    // Three more failures that were in flight when it opened.
    record(p, "w", &[fail(&got[2]), fail(&got[3]), fail(&got[4])], &policy)
        .await
        .unwrap();
    assert_eq!(breaker().await.1, Some(10.0), "in-flight failures do not double it");
    assert!(
        claim(p, "w", 5, LEASE).await.unwrap().is_empty(),
        "nothing goes while open"
    );

    // Half-open: exactly one probe; it fails and the cool-down doubles.
    exec(p, "UPDATE postbox.endpoint_state SET breaker_open_until = now()").await;
    exec(
        p,
        "UPDATE postbox.outbox SET next_attempt_at = now() WHERE status = 'pending' AND locked_by IS NULL",
    )
    .await;
    let probe = claim(p, "w", 5, LEASE).await.unwrap();
    assert_eq!(probe.len(), 1, "one probe at a time");
    assert!(claim(p, "w", 5, LEASE).await.unwrap().is_empty());
    record(p, "w", &[fail(&probe[0])], &policy).await.unwrap();
    let (open, cooldown) = breaker().await;
    assert_eq!(cooldown, Some(20.0), "a failed probe doubles the cool-down");
    assert!(open.unwrap() > 19.0);

    // A successful probe closes it.
    exec(p, "UPDATE postbox.endpoint_state SET breaker_open_until = now()").await;
    exec(
        p,
        "UPDATE postbox.outbox SET next_attempt_at = now() WHERE status = 'pending' AND locked_by IS NULL",
    )
    .await;
    let probe = claim(p, "w", 5, LEASE).await.unwrap();
    assert_eq!(probe.len(), 1);
    record(
        p,
        "w",
        &[outcome(probe[0].id, probe[0].attempt, 200, Next::Delivered)],
        &policy,
    )
    .await
    .unwrap();
    assert_eq!(breaker().await, (None, None), "closed");

    // Back-pressure is not a failure: three distinct 429s with Retry-After.
    let rest = claim(p, "w", 10, LEASE).await.unwrap();
    assert_eq!(rest.len(), 5);
    let throttled: Vec<Outcome> = rest[..3]
        .iter()
        .map(|r| {
            let mut o = outcome(
                r.id,
                r.attempt,
                429,
                Next::Retry {
                    after: Duration::from_secs(4),
                },
            );
            o.decision.pause = Some(Duration::from_secs(2));
            o
        })
        .collect();
    record(p, "w", &throttled, &policy).await.unwrap();
    let (open, paused, failing): (bool, bool, i32) = sqlx::query_as(
        "SELECT breaker_open_until IS NOT NULL, paused_until > now(), cardinality(failing_events)
         FROM postbox.endpoint_state",
    )
    .fetch_one(p)
    .await
    .unwrap();
    assert_eq!((open, paused, failing), (false, true, 0));
}

/// Retries, Retry-After pauses and breaker probes fire on time (within 10 % + 250 ms) although the worker polls only every 10 s.
#[tokio::test]
async fn wake_ups_are_on_time_whatever_the_poll_interval() {
    let db = TestDb::new().await;
    let p = &db.pool;
    // Retry after 1 s.
    let retried = Receiver::start(Arc::new(|n, _| Reply::status(if n == 1 { 500 } else { 200 }))).await;
    // 429 with Retry-After: 2 on the first request.
    let throttled = Receiver::start(Arc::new(|n, _| {
        if n == 1 {
            Reply::status(429).header("retry-after", "2")
        } else {
            Reply::status(200)
        }
    }))
    .await;
    // Two distinct failures open the breaker (cool-down 1.5 s); the probe succeeds.
    let broken = Receiver::start(Arc::new(|n, _| Reply::status(if n <= 2 { 500 } else { 200 }))).await;
    enqueue_bulk(p, &broken.url, 2, None).await;
    set_limits(p, &broken.url, 2, None).await;
    let mut cfg = config();
    cfg.poll_interval = Duration::from_secs(10);
    cfg.retry.schedule = vec![Duration::from_secs(1)];
    cfg.breaker = BreakerPolicy {
        threshold: 2,
        cooldown: Duration::from_millis(1500),
        max_cooldown: Duration::from_secs(60),
    };
    let (stop, handle) = spawn_worker(p, cfg);
    enqueue_bulk(p, &retried.url, 1, None).await;
    enqueue_bulk(p, &throttled.url, 1, None).await;
    let r = retried.wait_for(2, Duration::from_secs(5)).await;
    let t = throttled.wait_for(2, Duration::from_secs(6)).await;
    let b = broken.wait_for(3, Duration::from_secs(6)).await;
    stop.send(()).unwrap();
    handle.await.unwrap();
    let on_time = |what: &str, gap: Duration, want: Duration| {
        let late = want.mul_f64(1.1) + Duration::from_millis(250);
        assert!(gap >= want && gap <= late, "{what}: {gap:?}, wanted {want:?}..{late:?}");
    };
    on_time("retry", r[1].at - r[0].at, Duration::from_secs(1));
    on_time("Retry-After", t[1].at - t[0].at, Duration::from_secs(2));
    on_time("breaker probe", b[2].at - b[1].at, Duration::from_millis(1500));
}

/// A 2xx is never recorded as failed: not when it arrives after the final attempt's lease expired, nor when a later attempt by another worker fails.
#[tokio::test]
async fn acknowledged_deliveries_are_never_failed() {
    let db = TestDb::new().await;
    let p = &db.pool;
    let url = "https://example.com/hook";
    let policy = BreakerPolicy::default();
    let expire = "UPDATE postbox.outbox SET next_attempt_at = now() - interval '1 second',
                                            locked_until = now() - interval '1 second'
                  WHERE id = $1";

    // The final attempt's lease expires; the row is failed; then the 2xx arrives.
    let a = enqueue_bulk(p, url, 1, None).await[0];
    exec(p, "UPDATE postbox.outbox SET max_attempts = 1").await;
    let first = claim(p, "slow", 1, LEASE).await.unwrap();
    sqlx::query(expire).bind(a).execute(p).await.unwrap();
    assert!(claim(p, "other", 1, LEASE).await.unwrap().is_empty());
    assert_eq!(row(p, a).await, ("failed".into(), 1));
    let recorded = record(
        p,
        "slow",
        &[outcome(a, first[0].attempt, 200, Next::Delivered)],
        &policy,
    )
    .await
    .unwrap();
    assert_eq!(recorded, vec![a]);
    assert_eq!(row(p, a).await, ("delivered".into(), 1));
    let log = attempts_of(p, a).await;
    assert_eq!(
        (log.len(), log[0].1),
        (1, Some(200)),
        "the lost-attempt entry now holds the answer"
    );

    // Attempt 1's lease expires and another worker takes attempt 2; attempt 1's 2xx arrives
    // while attempt 2 runs, then attempt 2 fails for good.
    let b = enqueue_bulk(p, url, 1, None).await[0];
    exec(
        p,
        &format!("UPDATE postbox.outbox SET max_attempts = 2 WHERE id = '{b}'"),
    )
    .await;
    let one = claim(p, "slow", 1, LEASE).await.unwrap();
    sqlx::query(expire).bind(b).execute(p).await.unwrap();
    let two = claim(p, "fast", 1, LEASE).await.unwrap();
    assert_eq!((two[0].id, two[0].attempt), (b, 2));
    let late = record(p, "slow", &[outcome(b, one[0].attempt, 200, Next::Delivered)], &policy)
        .await
        .unwrap();
    assert!(late.is_empty(), "another worker holds the row");
    assert_eq!(row(p, b).await, ("pending".into(), 2));
    record(p, "fast", &[outcome(b, 2, 500, Next::Failed)], &policy)
        .await
        .unwrap();
    assert_eq!(row(p, b).await, ("delivered".into(), 2), "attempt 1 was acknowledged");
}

/// Retention deletes only rows that are terminal when deleted: an event replayed while the prune runs is kept.
#[tokio::test]
async fn retention_keeps_an_event_replayed_meanwhile() {
    let db = TestDb::new().await;
    let p = &db.pool;
    let ids = enqueue_bulk(p, "https://example.com/hook", 3, None).await;
    exec(
        p,
        "UPDATE postbox.outbox SET status = 'delivered', delivered_at = now()",
    )
    .await;
    let mut replay = p.begin().await.unwrap();
    sqlx::query("UPDATE postbox.outbox SET status = 'pending', next_attempt_at = now() WHERE id = $1")
        .bind(ids[0])
        .execute(&mut *replay)
        .await
        .unwrap();
    let pool = p.clone();
    let prune = tokio::spawn(async move { common::protocol::prune(&pool, Duration::ZERO, None, 100).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!prune.is_finished(), "the prune waits for the replaying transaction");
    replay.commit().await.unwrap();
    assert_eq!(prune.await.unwrap(), Some(2));
    assert_eq!(row(p, ids[0]).await.0, "pending", "the replayed event is kept");
}

/// An endpoint left out of a full batch keeps its due events due: leases that expired on two endpoints are all taken back by claims of two rows.
#[tokio::test]
async fn endpoints_left_out_of_a_full_batch_stay_due() {
    let db = TestDb::new().await;
    let p = &db.pool;
    let a = enqueue_bulk(p, "https://a.example.com/hook", 2, None).await;
    let b = enqueue_bulk(p, "https://b.example.com/hook", 1, None).await;
    // A worker takes all three and dies: its leases end 50 ms later.
    assert_eq!(claim(p, "dead", 10, Duration::from_millis(50)).await.unwrap().len(), 3);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut back = Vec::new();
    for _ in 0..5 {
        back.extend(claim(p, "alive", 2, LEASE).await.unwrap().into_iter().map(|r| r.id));
    }
    assert_eq!(
        sorted(back),
        sorted([a, b].concat()),
        "every expired lease is taken back"
    );
}

/// An event's attempts go with it, however it is deleted (plain SQL, retention, TRUNCATE), and a late 2xx never logs an attempt for an event deleted meanwhile: the log holds no entry without its event.
#[tokio::test]
async fn attempts_never_outlive_their_event() {
    let db = TestDb::new().await;
    let p = &db.pool;
    let policy = BreakerPolicy::default();
    let ids = enqueue_bulk(p, "https://example.com/hook", 4, None).await;
    let claimed = claim(p, "w", 4, LEASE).await.unwrap();
    assert_eq!(claimed.len(), 4);
    let done: Vec<Outcome> = claimed
        .iter()
        .map(|c| outcome(c.id, c.attempt, 200, Next::Delivered))
        .collect();
    assert_eq!(record(p, "w", &done, &policy).await.unwrap().len(), 4);
    for id in &ids {
        assert_eq!(attempts_of(p, *id).await.len(), 1);
    }
    let orphans = "SELECT count(*) FROM postbox.attempts a
                   WHERE NOT EXISTS (SELECT 1 FROM postbox.outbox o WHERE o.id = a.outbox_id)";

    // A late 2xx for an event whose DELETE is not committed yet waits for it,
    // then finds the event gone and logs nothing.
    let mut delete = p.begin().await.unwrap();
    sqlx::query("DELETE FROM postbox.outbox WHERE id = $1")
        .bind(ids[0])
        .execute(&mut *delete)
        .await
        .unwrap();
    let pool = p.clone();
    let late = outcome(ids[0], 2, 200, Next::Delivered);
    let policy2 = policy.clone();
    let recording = tokio::spawn(async move { record(&pool, "late", &[late], &policy2).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!recording.is_finished(), "the late 2xx waits for the DELETE");
    delete.commit().await.unwrap();
    assert!(recording.await.unwrap().is_empty());
    assert!(attempts_of(p, ids[0]).await.is_empty(), "no entry for a deleted event");

    // A late 2xx for an event that exists is logged (a second answer).
    record(p, "late", &[outcome(ids[1], 2, 200, Next::Delivered)], &policy)
        .await
        .unwrap();
    assert_eq!(attempts_of(p, ids[1]).await.len(), 2);

    // Plain SQL, retention and TRUNCATE each take the attempts along.
    exec(p, &format!("DELETE FROM postbox.outbox WHERE id = '{}'", ids[1])).await;
    assert!(attempts_of(p, ids[1]).await.is_empty());
    exec(
        p,
        &format!("UPDATE postbox.outbox SET status = 'pending' WHERE id = '{}'", ids[3]),
    )
    .await;
    assert_eq!(
        common::protocol::prune(p, Duration::ZERO, None, 100).await.unwrap(),
        Some(1)
    );
    assert!(attempts_of(p, ids[2]).await.is_empty(), "pruned with its event");
    assert_eq!(attempts_of(p, ids[3]).await.len(), 1, "a kept event keeps its log");
    assert_eq!(count(p, orphans).await, 0);
    exec(p, "TRUNCATE postbox.outbox").await;
    assert_eq!(count(p, "SELECT count(*) FROM postbox.attempts").await, 0);
}

/// One claim round over several endpoints (the set-based lease of migration 0006) keeps every rule of the one-endpoint path: a final lease that expired fails its event, a lost lease is logged and taken back, an event behind its key's head is parked, a disabled endpoint is held, and each leased row carries its own endpoint's URL.
#[tokio::test]
async fn a_round_over_many_endpoints_keeps_every_rule() {
    let db = TestDb::new().await;
    let p = &db.pool;
    let (ua, ub, uc) = (
        "https://a.example.com/hook",
        "https://b.example.com/hook",
        "https://c.example.com/hook",
    );
    // A worker takes one event of A (its final attempt) and one of B, and dies.
    let a1 = enqueue_bulk(p, ua, 1, None).await[0];
    let b1 = enqueue_bulk(p, ub, 1, None).await[0];
    exec(
        p,
        &format!("UPDATE postbox.outbox SET max_attempts = 1 WHERE id = '{a1}'"),
    )
    .await;
    assert_eq!(claim(p, "dead", 10, Duration::from_millis(50)).await.unwrap().len(), 2);
    // Meanwhile: a fresh event for A, two of one key for B, one for a disabled C.
    let a2 = enqueue_bulk(p, ua, 1, None).await[0];
    let keyed = enqueue_bulk(p, ub, 2, Some("k")).await;
    let c1 = enqueue_bulk(p, uc, 1, None).await[0];
    exec(
        p,
        &format!("UPDATE postbox.endpoints SET disabled_at = now() WHERE url = '{uc}'"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let got = claim(p, "alive", 10, LEASE).await.unwrap();
    let mut taken: Vec<(Uuid, i32)> = got.iter().map(|r| (r.id, r.attempt)).collect();
    taken.sort();
    let mut want = vec![(a2, 1), (b1, 2), (keyed[0], 1)];
    want.sort();
    assert_eq!(
        taken, want,
        "fresh events, the lost lease and the key's head; nothing else"
    );
    for r in &got {
        let url: String = sqlx::query_scalar("SELECT url FROM postbox.endpoints WHERE id = $1")
            .bind(r.endpoint_id)
            .fetch_one(p)
            .await
            .unwrap();
        assert_eq!(r.url, url, "each row carries its own endpoint's URL");
    }

    assert_eq!(row(p, a1).await, ("failed".into(), 1), "the final lease expired");
    assert_eq!(
        count(p, &format!("SELECT count(*) FROM postbox.attempts WHERE outbox_id = '{b1}' AND attempt = 1 AND error LIKE 'lease expired%'")).await,
        1,
        "the lost attempt is logged"
    );
    assert_eq!(
        count(
            p,
            &format!(
                "SELECT count(*) FROM postbox.outbox WHERE id = '{}' AND next_attempt_at = 'infinity'",
                keyed[1]
            )
        )
        .await,
        1,
        "the event behind its key's head is parked"
    );
    assert!(state_of(p, c1).await.contains("disabled"), "{}", state_of(p, c1).await);
    let flying: Vec<(String, i32, Option<String>)> = sqlx::query_as(
        "SELECT e.url, s.in_flight, s.hold FROM postbox.endpoint_state s JOIN postbox.endpoints e ON e.id = s.endpoint_id
         ORDER BY e.url",
    )
    .fetch_all(p)
    .await
    .unwrap();
    assert_eq!(
        flying,
        vec![
            (ua.to_string(), 1, None),
            (ub.to_string(), 2, None),
            (uc.to_string(), 0, Some("disabled".to_string())),
        ],
        "each endpoint's accounting"
    );
}

/// Leases that ended unrecorded leave an endpoint's in-flight count exact: an expired final lease leaves it, a lease taken back counts once, a fresh one adds one (the count is what max_in_flight is held to).
#[tokio::test]
async fn taken_back_leases_keep_the_in_flight_count_exact() {
    let db = TestDb::new().await;
    let p = &db.pool;
    let url = "https://a.example.com/hook";
    let ids = enqueue_bulk(p, url, 2, None).await;
    exec(
        p,
        &format!("UPDATE postbox.outbox SET max_attempts = 1 WHERE id = '{}'", ids[0]),
    )
    .await;
    assert_eq!(claim(p, "dead", 10, Duration::from_millis(50)).await.unwrap().len(), 2);
    let fresh = enqueue_bulk(p, url, 1, None).await[0];
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut got: Vec<Uuid> = claim(p, "alive", 10, LEASE)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    got.sort();
    assert_eq!(got, sorted(vec![ids[1], fresh]));
    assert_eq!(row(p, ids[0]).await.0, "failed");
    let live = count(
        p,
        "SELECT count(*) FROM postbox.outbox WHERE locked_by IS NOT NULL AND locked_until > now()",
    )
    .await;
    assert_eq!(live, 2);
    assert_eq!(
        count(p, "SELECT in_flight::bigint FROM postbox.endpoint_state").await,
        live,
        "the counter matches the live leases"
    );
}
