//! The quick claim in front of the full one (migrations 0008 and 0009).
//!
//! `postbox.claim_quick` (what the worker calls) first tries a
//! two-statement claim for the plain case (one endpoint with work,
//! nothing held, room under its limits) and otherwise runs the full claim,
//! `postbox.claim`. The rule: in every state, `claim_quick` leaves the
//! tables exactly as the full claim would and returns the same leases. The
//! random test plays claims, outcomes, releases and operator changes, and
//! at every claim runs the full claim in a savepoint, rolls it back, runs
//! `claim_quick` in the same transaction (so `now()` is the same), and
//! compares every row of the dispatch tables.

mod common;

use std::time::Duration;

use common::protocol::{outcome, record};
use common::*;
use postbox::delivery::Next;
use postbox::BreakerPolicy;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

const URLS: [&str; 3] = [
    "http://127.0.0.1:9/plain-a",
    "http://127.0.0.1:9/plain-b",
    "http://127.0.0.1:9/plain-c",
];

/// Every row a claim may write, as text, in a fixed order.
const STATE_SQL: &str = "SELECT concat_ws(E'\\n--\\n',
    (SELECT string_agg(o::text, E'\\n' ORDER BY o.id) FROM postbox.outbox o),
    (SELECT string_agg(s::text, E'\\n' ORDER BY s.endpoint_id) FROM postbox.endpoint_state s),
    (SELECT string_agg(a::text, E'\\n' ORDER BY a.outbox_id, a.attempt) FROM postbox.attempts a),
    (SELECT string_agg(e::text, E'\\n' ORDER BY e.id) FROM postbox.endpoint_events e),
    (SELECT string_agg(p::text, E'\\n' ORDER BY p.id) FROM postbox.endpoints p))";

/// Calls of the full claim in this transaction (`track_functions` is on).
const FULL_CALLS_SQL: &str =
    "SELECT coalesce((SELECT calls FROM pg_stat_xact_user_functions WHERE funcname = 'claim' AND schemaname = 'postbox'), 0)";

async fn connect(db: &TestDb) -> PgConnection {
    PgConnection::connect(&db.url).await.expect("connect")
}

/// What one claim did: its leases as text, every dispatch row after it, and
/// whether the full claim ran.
#[derive(Debug)]
struct Claim {
    leases: Option<String>,
    state: String,
    full_ran: bool,
}

/// Runs `postbox.<function>` and reads what it did.
async fn run(tx: &mut PgConnection, function: &str, worker: &str, want: i32, lease_ms: i64) -> Claim {
    let before: i64 = sqlx::query_scalar(FULL_CALLS_SQL).fetch_one(&mut *tx).await.unwrap();
    let leases: Option<String> = sqlx::query_scalar(&format!(
        "SELECT string_agg(c::text, E'\\n' ORDER BY c.id) FROM postbox.{function}($1, $2, $3) c"
    ))
    .bind(worker)
    .bind(want)
    .bind(lease_ms)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    let state: String = sqlx::query_scalar(STATE_SQL).fetch_one(&mut *tx).await.unwrap();
    let after: i64 = sqlx::query_scalar(FULL_CALLS_SQL).fetch_one(&mut *tx).await.unwrap();
    Claim {
        leases,
        state,
        full_ran: after > before,
    }
}

/// Runs the full claim and `postbox.claim_quick` on the same state and the
/// same `now()`; keeps `claim_quick`'s work. Returns (full, claim).
async fn both(c: &mut PgConnection, worker: &str, want: i32, lease_ms: i64) -> (Claim, Claim) {
    let mut tx = c.begin().await.unwrap();
    sqlx::query("SET LOCAL track_functions = 'pl'")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("SAVEPOINT before_claim").execute(&mut *tx).await.unwrap();
    let full = run(&mut tx, "claim", worker, want, lease_ms).await;
    sqlx::query("ROLLBACK TO SAVEPOINT before_claim")
        .execute(&mut *tx)
        .await
        .unwrap();
    let claim = run(&mut tx, "claim_quick", worker, want, lease_ms).await;
    tx.commit().await.unwrap();
    (full, claim)
}

/// `postbox.claim_quick`, checked against the full claim, in its own
/// transaction: (events leased, whether the full claim ran).
async fn claim(c: &mut PgConnection, want: i32) -> (i64, bool) {
    let (full, claim) = both(c, "w1", want, 60_000).await;
    assert_eq!(claim.leases, full.leases, "the same leases as the full claim");
    assert_eq!(claim.state, full.state, "the same rows as the full claim");
    let n = claim.leases.map_or(0, |l| l.lines().count() as i64);
    (n, claim.full_ran)
}

async fn exec(c: &mut PgConnection, sql: &str) {
    sqlx::query(sql).execute(&mut *c).await.unwrap();
}

async fn scalar<T>(c: &mut PgConnection, sql: &str) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    sqlx::query_scalar(sql).fetch_one(&mut *c).await.unwrap()
}

/// One random sequence of steps from `seed`; returns (plain claims, full claims) among the
/// claims that leased something. A `calm` sequence is mostly one healthy endpoint (the
/// plain case); the others mix endpoints, failures, pauses, limits and operators.
async fn play(seed: u64, steps: usize, calm: bool) -> (usize, usize) {
    let db = TestDb::new().await;
    let mut c = connect(&db).await;
    let mut rng = Rng(seed);
    let breaker = BreakerPolicy {
        threshold: 2,
        cooldown: Duration::from_millis(50),
        max_cooldown: Duration::from_millis(200),
    };
    for url in URLS {
        enqueue_bulk(&db.pool, url, 1, None).await;
    }
    sqlx::query("UPDATE postbox.endpoints SET max_in_flight = $1, rate_per_minute = NULL")
        .bind(if calm { 10 } else { 4 })
        .execute(&mut c)
        .await
        .unwrap();
    let (mut plain, mut full) = (0, 0);
    for step in 0..steps {
        match rng.below(100) {
            // New events, now and then with an ordering key.
            0..=29 => {
                // Mostly one endpoint, as at a low rate; sometimes several.
                let url = match rng.below(if calm { 20 } else { 6 }) {
                    4 => URLS[1],
                    5 => URLS[2],
                    _ => URLS[0],
                };
                let key = match rng.below(if calm { 60 } else { 6 }) {
                    0 => Some("k1"),
                    1 => Some("k2"),
                    _ => None,
                };
                let n = if calm { 1 } else { 1 + rng.below(4) as i32 };
                enqueue_bulk(&db.pool, url, n, key).await;
            }
            // A claim, by either of two workers, with a short or a long lease.
            30..=59 => {
                let worker = if rng.below(2) == 0 { "w1" } else { "w2" };
                let want = 1 + rng.below(6) as i32;
                let lease_ms = if rng.below(if calm { 80 } else { 8 }) == 0 {
                    20
                } else {
                    60_000
                };
                let (f, p) = both(&mut c, worker, want, lease_ms).await;
                assert!(f.full_ran, "seed {seed} step {step}: the full claim ran");
                assert_eq!(
                    p.leases, f.leases,
                    "seed {seed} step {step}: postbox.claim_quick({worker}, {want}, {lease_ms}) leased other events than the full claim"
                );
                assert_eq!(
                    p.state, f.state,
                    "seed {seed} step {step}: postbox.claim_quick({worker}, {want}, {lease_ms}) left other rows than the full claim"
                );
                if p.leases.is_some() {
                    if p.full_ran {
                        full += 1;
                    } else {
                        plain += 1;
                    }
                }
            }
            // Outcomes of up to six leases, most of them deliveries.
            60..=79 => {
                let leased: Vec<(Uuid, i32, String)> = sqlx::query_as(
                    "SELECT id, attempts, locked_by FROM postbox.outbox
                     WHERE locked_by IS NOT NULL ORDER BY id LIMIT 6",
                )
                .fetch_all(&mut c)
                .await
                .unwrap();
                for (id, attempt, worker) in leased {
                    let retry = |ms| Next::Retry {
                        after: Duration::from_millis(ms),
                    };
                    let (status, next) = match rng.below(if calm { 400 } else { 40 }) {
                        30..=32 => (500, retry(0)),
                        33..=34 => (429, retry(50)),
                        35..=37 => (500, retry(30)),
                        38 => (500, Next::Failed),
                        39 => (410, Next::Gone),
                        _ => (200, Next::Delivered),
                    };
                    let mut o = outcome(id, attempt, status, next);
                    if let (429, Next::Retry { after }) = (status, next) {
                        // Retry-After: back-pressure pauses the endpoint.
                        o.decision.pause = Some(after);
                    }
                    record(&db.pool, &worker, &[o], &breaker).await.unwrap();
                }
            }
            // A lease given back (shutdown).
            80..=84 => {
                sqlx::query(
                    "SELECT postbox.release(o.locked_by, ARRAY[o.id], ARRAY[o.attempts])
                     FROM postbox.outbox o WHERE o.locked_by IS NOT NULL ORDER BY o.id LIMIT 1",
                )
                .execute(&mut c)
                .await
                .unwrap();
            }
            // Operators, with plain SQL on the documented columns.
            85..=94 if !calm => {
                let sql = match rng.below(5) {
                    0 => "UPDATE postbox.endpoints SET disabled_at = NULL WHERE disabled_at IS NOT NULL".to_owned(),
                    1 => format!(
                        "UPDATE postbox.endpoints SET max_in_flight = {} WHERE url = '{}'",
                        1 + rng.below(4),
                        URLS[rng.below(3) as usize]
                    ),
                    2 => format!(
                        "UPDATE postbox.endpoints SET rate_per_minute = {} WHERE url = '{}'",
                        ["NULL", "3", "8"][rng.below(3) as usize],
                        URLS[rng.below(3) as usize]
                    ),
                    3 => "UPDATE postbox.endpoint_state SET paused_until = NULL WHERE paused_until IS NOT NULL"
                        .to_owned(),
                    _ => "UPDATE postbox.endpoint_state SET breaker_open_until = now()
                          WHERE breaker_open_until > now()"
                        .to_owned(),
                };
                sqlx::query(&sql).execute(&mut c).await.unwrap();
            }
            // Time passes: short leases, pauses and cool-downs end.
            _ => tokio::time::sleep(Duration::from_millis(30)).await,
        }
    }
    (plain, full)
}

#[tokio::test]
async fn the_plain_claim_decides_as_the_full_claim_in_random_sequences() {
    let steps: usize = std::env::var("POSTBOX_PLAIN_CLAIM_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let (mut plain, mut full) = (0, 0);
    for (seed, calm) in [
        (0x9E37_79B9_7F4A_7C15, false),
        (0xD1B5_4A32_D192_ED03, false),
        (0x2545_F491_4F6C_DD1D, true),
        (0x94D0_49BB_1331_11EB, true),
    ] {
        let (p, f) = play(seed, steps, calm).await;
        eprintln!("seed {seed:#x} (calm: {calm}): {p} claims the plain way, {f} the full way");
        plain += p;
        full += f;
    }
    // Both ways were taken often enough for the comparison to mean something.
    assert!(
        plain >= 40,
        "only {plain} claims took the plain way ({full} the full one)"
    );
    assert!(
        full >= 40,
        "only {full} claims took the full way ({plain} the plain one)"
    );
}

#[tokio::test]
async fn a_lone_event_is_claimed_the_plain_way() {
    let db = TestDb::new().await;
    let mut c = connect(&db).await;
    enqueue_bulk(&db.pool, URLS[0], 1, None).await;
    // The endpoint's default limits: 10 in flight, 100 a minute.
    assert_eq!(claim(&mut c, 100).await, (1, false));
    let (in_flight, rate, wake_is_lease_end): (i32, Option<i32>, bool) = sqlx::query_as(
        "SELECT s.in_flight, s.rate_counts[1], s.wake_at = s.lease_check_at AND s.wake_at > now()
         FROM postbox.endpoint_state s",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert_eq!((in_flight, rate, wake_is_lease_end), (1, Some(1), true));
    // Nothing new: nothing to claim, and the full claim is not asked.
    assert_eq!(claim(&mut c, 100).await, (0, false));
}

#[tokio::test]
async fn a_full_batch_is_claimed_the_plain_way_and_the_rest_stays_due() {
    let db = TestDb::new().await;
    let mut c = connect(&db).await;
    enqueue_bulk(&db.pool, URLS[0], 5, None).await;
    set_limits(&db.pool, URLS[0], 100, None).await;
    assert_eq!(claim(&mut c, 2).await, (2, false));
    let due: bool = scalar(&mut c, "SELECT wake_at <= now() FROM postbox.endpoint_state").await;
    assert!(due, "more are due: the endpoint is due a look");
    // The lone endpoint due a look is claimed the quick way too (0009).
    assert_eq!(claim(&mut c, 10).await, (3, false));
}

#[tokio::test]
async fn a_look_due_at_another_endpoint_goes_to_the_full_claim() {
    let db = TestDb::new().await;
    let mut c = connect(&db).await;
    enqueue_bulk(&db.pool, URLS[0], 3, None).await;
    set_limits(&db.pool, URLS[0], 100, None).await;
    // The first endpoint is left due a look (more are due after a batch of one)…
    assert_eq!(claim(&mut c, 1).await, (1, false));
    // …and the second has new events: two endpoints with work, the full claim shares the batch.
    enqueue_bulk(&db.pool, URLS[1], 3, None).await;
    assert_eq!(claim(&mut c, 10).await, (5, true));
    // The same when the other endpoint is only due a look (its events noticed).
    let db = TestDb::new().await;
    let mut c = connect(&db).await;
    enqueue_bulk(&db.pool, URLS[0], 2, None).await;
    enqueue_bulk(&db.pool, URLS[1], 2, None).await;
    sqlx::query("UPDATE postbox.outbox SET noticed = true WHERE endpoint_id = (SELECT id FROM postbox.endpoints WHERE url = $1)")
        .bind(URLS[1])
        .execute(&mut c)
        .await
        .unwrap();
    exec(
        &mut c,
        "UPDATE postbox.endpoint_state SET wake_at = now() - interval '1 minute'",
    )
    .await;
    assert_eq!(claim(&mut c, 10).await, (4, true));
}

#[tokio::test]
async fn everything_but_the_plain_case_goes_to_the_full_claim() {
    // (what makes it not plain, events, want, events leased)
    let cases: [(&str, i32, i32, i64); 6] = [
        ("two endpoints with new events", 2, 10, 4),
        ("an ordering key", 2, 10, 1),
        ("paused", 2, 10, 0),
        ("disabled", 2, 10, 0),
        ("max_in_flight reached with more due", 3, 10, 2),
        ("rate_per_minute reached with more due", 3, 10, 2),
    ];
    for (case, events, want, leased) in cases {
        let db = TestDb::new().await;
        let mut c = connect(&db).await;
        let key = (case == "an ordering key").then_some("k");
        enqueue_bulk(&db.pool, URLS[0], events, key).await;
        match case {
            "two endpoints with new events" => {
                enqueue_bulk(&db.pool, URLS[1], events, None).await;
            }
            "paused" => {
                sqlx::query("UPDATE postbox.endpoint_state SET paused_until = now() + interval '1 hour'")
                    .execute(&mut c)
                    .await
                    .unwrap();
            }
            "disabled" => {
                sqlx::query("UPDATE postbox.endpoints SET disabled_at = now()")
                    .execute(&mut c)
                    .await
                    .unwrap();
            }
            "max_in_flight reached with more due" => set_limits(&db.pool, URLS[0], 2, None).await,
            "rate_per_minute reached with more due" => set_limits(&db.pool, URLS[0], 10, Some(2)).await,
            _ => {}
        }
        assert_eq!(claim(&mut c, want).await, (leased, true), "{case}");
    }
}

#[tokio::test]
async fn an_expired_lease_goes_to_the_full_claim() {
    let db = TestDb::new().await;
    let mut c = connect(&db).await;
    enqueue_bulk(&db.pool, URLS[0], 1, None).await;
    let (full, plain) = both(&mut c, "w1", 10, 1).await;
    assert_eq!((full.leases.is_some(), plain.full_ran), (true, false));
    tokio::time::sleep(Duration::from_millis(20)).await;
    // The lease ended unrecorded: the full claim takes it back and logs the lost attempt.
    assert_eq!(claim(&mut c, 10).await, (1, true));
    let lost: i64 = scalar(
        &mut c,
        "SELECT count(*) FROM postbox.attempts WHERE error LIKE 'lease expired%'",
    )
    .await;
    assert_eq!(lost, 1);
}

#[tokio::test]
async fn a_claim_waits_a_moment_for_the_lone_endpoints_state_row() {
    // What postbox.record takes while it writes an endpoint's outcomes.
    const HOLD: &str = "SELECT 1 FROM postbox.endpoint_state FOR NO KEY UPDATE";
    let db = TestDb::new().await;
    let mut c = connect(&db).await;
    enqueue_bulk(&db.pool, URLS[0], 3, None).await;
    set_limits(&db.pool, URLS[0], 100, None).await;
    // An outcome being recorded holds the state row (as postbox.record does).
    let mut holder = connect(&db).await;
    let mut tx = holder.begin().await.unwrap();
    exec(&mut tx, HOLD).await;
    let waiting = tokio::spawn(async move {
        let mut tx = c.begin().await.unwrap();
        exec(&mut tx, "SET LOCAL track_functions = 'pl'").await;
        let quick = run(&mut tx, "claim_quick", "w1", 10, 60_000).await;
        let timeout: String = scalar(&mut tx, "SHOW lock_timeout").await;
        tx.commit().await.unwrap();
        let n = quick.leases.map_or(0, |l| l.lines().count());
        (n, quick.full_ran, timeout)
    });
    tokio::time::sleep(Duration::from_millis(15)).await;
    assert!(!waiting.is_finished(), "the claim waits for the row");
    tx.commit().await.unwrap();
    // Released within the wait: the quick claim takes the events, and the
    // lock timeout is the session's again.
    assert_eq!(waiting.await.unwrap(), (3, false, "0".to_string()));

    // Held for longer: the full claim runs, finds the row still locked, and
    // returns nothing rather than wait on (say) an operator's open transaction.
    let mut c = connect(&db).await;
    enqueue_bulk(&db.pool, URLS[0], 2, None).await;
    let mut tx = holder.begin().await.unwrap();
    exec(&mut tx, HOLD).await;
    let mut ctx = c.begin().await.unwrap();
    exec(&mut ctx, "SET LOCAL track_functions = 'pl'").await;
    let quick = run(&mut ctx, "claim_quick", "w1", 10, 60_000).await;
    ctx.commit().await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!((quick.leases, quick.full_ran), (None, true));
    // Once released, the next claim takes them.
    assert_eq!(claim(&mut c, 10).await.0, 2);
}
