//! The commands that read and probe: `event show`, `endpoint test`, `--json`
//! on every reading command, per-endpoint retry policy in `endpoint set` and
//! `endpoint list`, and `replay`'s id cursor.

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use postbox::delivery::Secrets;
use serde_json::Value;
use uuid::Uuid;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `postbox ARGS` against `db` and returns its output.
async fn cli(db: &TestDb, args: &[&str]) -> std::process::Output {
    let mut c = postbox(Some(&db.url));
    c.args(args);
    run_async(c).await
}

/// Runs `postbox ARGS --json`, checks it succeeded, and parses its output.
async fn cli_json(db: &TestDb, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = cli(db, &all).await;
    assert!(out.status.success(), "{all:?}: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{all:?} prints JSON ({e}): {}", stdout(&out)))
}

/// How many rows the outbox and the attempt log hold.
async fn table_rows(db: &TestDb) -> (i64, i64) {
    sqlx::query_as("SELECT (SELECT count(*) FROM postbox.outbox), (SELECT count(*) FROM postbox.attempts)")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// `replay` walks the matching events once, by id: an event delivered again
/// between two batches is not replayed a second time. The trigger stands in
/// for a worker that delivers every replayed event before the next batch;
/// the old loop, which re-selected by filter, replayed the first event
/// forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_visits_each_event_once() {
    let db = TestDb::new().await;
    let ids = enqueue_many(&db.pool, "https://example.com/hook", 5).await;
    sqlx::query("UPDATE postbox.outbox SET status = 'delivered', attempts = 1, delivered_at = now()")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "CREATE FUNCTION public.instant_worker() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             UPDATE postbox.outbox SET status = 'delivered', attempts = attempts + 1, delivered_at = now()
             WHERE id = NEW.id;
             RETURN NULL;
         END $$",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "CREATE TRIGGER instant_worker AFTER UPDATE OF status ON postbox.outbox FOR EACH ROW
         WHEN (OLD.status <> 'pending' AND NEW.status = 'pending') EXECUTE FUNCTION public.instant_worker()",
    )
    .execute(&db.pool)
    .await
    .unwrap();

    let mut c = postbox(Some(&db.url));
    c.args(["replay", "--status", "delivered", "--batch", "2"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = WorkerProc(c.spawn().unwrap());
    let status = wait_exit(&mut child, Duration::from_secs(30)).await;
    let child = std::mem::replace(&mut child.0, std::process::Command::new("true").spawn().unwrap());
    let out = child.wait_with_output().unwrap();
    assert!(status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("replayed 5 event(s)"), "{}", stdout(&out));
    let attempts: Vec<i32> = sqlx::query_scalar("SELECT attempts FROM postbox.outbox WHERE id = ANY($1) ORDER BY id")
        .bind(&ids)
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(attempts, vec![2; 5], "each event replayed exactly once");
}

/// Checks that `hit` carries a valid signature by `secret`.
fn signed_by(hit: &Hit, secret: &str) -> bool {
    let ts: i64 = hit.header("webhook-timestamp").parse().expect("webhook-timestamp");
    Secrets::parse(secret)
        .unwrap()
        .verify(hit.header("webhook-id"), ts, &hit.body, hit.header("webhook-signature"))
}

/// `event show` tells an event's story by event, message or conversation
/// id: ids, state in words, payload and every attempt; `--json` the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_show_tells_the_story() {
    let db = TestDb::new().await;
    let receiver = Receiver::start(Arc::new(|n, _| {
        if n == 1 {
            Reply::status(500).body("{\"error\":\"database on fire\"}")
        } else {
            Reply::status(200)
        }
    }))
    .await;
    let id = enqueue_many(&db.pool, &receiver.url, 1).await[0];
    let (stop, worker) = spawn_worker(&db.pool, config());
    wait_until(
        &db.pool,
        "SELECT count(*) FROM postbox.outbox WHERE status = 'delivered'",
        1,
        Duration::from_secs(20),
    )
    .await;
    stop.send(()).unwrap();
    worker.await.unwrap();
    let (message_id, conversation_id): (Uuid, Uuid) =
        sqlx::query_as("SELECT message_id, conversation_id FROM postbox.outbox WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();

    let out = cli(&db, &["event", "show", &id.to_string()]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for want in [
        &id.to_string(),
        &conversation_id.to_string(),
        &message_id.to_string(),
        &receiver.url,
        "delivered",
        "2 of 4",
        "\"content\": \"message 0\"",
        "http_status",
        "HTTP 500",
        "database on fire",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let attempt_lines = text.lines().filter(|l| l.trim_start().starts_with(['1', '2'])).count();
    assert!(attempt_lines >= 2, "{text}");

    // By message id, as JSON: one object.
    let v = cli_json(&db, &["event", "show", &message_id.to_string()]).await;
    assert_eq!(v["id"], id.to_string());
    assert_eq!(v["conversation_id"], conversation_id.to_string());
    assert_eq!(v["status"], "delivered");
    assert_eq!(v["attempts"], 2);
    assert_eq!(v["max_attempts"], 4);
    assert!(v["delivered_at"].is_string() && v["created_at"].is_string());
    assert!(v["state"].as_str().unwrap().starts_with("delivered at"), "{v}");
    assert_eq!(v["payload"]["data"]["content"], "message 0");
    let log = v["attempt_log"].as_array().unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(log[0]["status_code"], 500);
    assert_eq!(log[0]["error_kind"], "http_status");
    assert!(log[0]["response_body"].as_str().unwrap().contains("database on fire"));
    assert_eq!(log[1]["status_code"], 200);
    assert!(log[1]["error_kind"].is_null());
    for key in ["started_at", "duration_ms", "worker_id", "error"] {
        assert!(log[0].get(key).is_some(), "attempt_log entries have {key}");
    }

    // A conversation with two events: an array; a waiting event says why.
    let conversation = Uuid::now_v7();
    let mut tx = db.pool.begin().await.unwrap();
    for content in ["first", "second"] {
        let mut e = event(content);
        e.conversation_id = conversation;
        postbox::enqueue(&mut tx, "https://example.com/held", &e).await.unwrap();
    }
    tx.commit().await.unwrap();
    let out = cli(
        &db,
        &[
            "endpoint",
            "disable",
            "https://example.com/held",
            "--reason",
            "customer asked",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let v = cli_json(&db, &["event", "show", &conversation.to_string()]).await;
    let events = v.as_array().expect("several events: an array");
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["payload"]["data"]["content"], "first");
    assert_eq!(events[1]["payload"]["data"]["content"], "second");
    for e in events {
        assert_eq!(e["status"], "pending");
        assert_eq!(e["attempt_log"], serde_json::json!([]));
        let state = e["state"].as_str().unwrap();
        assert!(
            state.contains("disabled") && state.contains("customer asked"),
            "{state}"
        );
    }
    let text = stdout(&cli(&db, &["event", "show", &conversation.to_string()]).await);
    assert!(text.contains("(1 of 2)") && text.contains("(2 of 2)"), "{text}");
    assert!(text.contains("attempts: none yet"), "{text}");
    assert!(text.contains("customer asked"), "{text}");
}

/// `event show` with an unknown or malformed id: exit 2 with a message
/// naming the id or the argument.
#[tokio::test]
async fn event_show_refuses_unknown_and_malformed_ids() {
    let db = TestDb::new().await;
    let unknown = Uuid::now_v7().to_string();
    let out = cli(&db, &["event", "show", &unknown]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains(&unknown), "{}", stderr(&out));
    assert!(stdout(&out).is_empty());
    let out = cli(&db, &["event", "show", "not-a-uuid", "--json"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("ID") && stderr(&out).contains("not-a-uuid"),
        "{}",
        stderr(&out)
    );
}

/// `endpoint test` sends one signed probe of the seed's shape to a
/// receiver that accepts it: exit 0, nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_test_accepted() {
    let db = TestDb::new().await;
    let receiver = Receiver::ok().await;
    let mut c = postbox(Some(&db.url));
    c.env("POSTBOX_SIGNING_SECRET", SECRET).args([
        "endpoint",
        "test",
        &receiver.url,
        "--allow-http",
        "--allow-private-networks",
    ]);
    let out = run_async(c).await;
    assert_eq!(out.status.code(), Some(0), "{}\n{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    for want in ["127.0.0.1", "loopback", "allowed", "200", "delivered", "plain http"] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let hits = receiver.hits();
    assert_eq!(hits.len(), 1);
    let hit = &hits[0];
    assert!(signed_by(hit, SECRET), "signed with POSTBOX_SIGNING_SECRET");
    assert!(text.contains(hit.header("webhook-id")), "{text}");
    let body = hit.json();
    assert_eq!(body["data"]["content"], "postbox endpoint test");
    assert_eq!(body["data"]["metadata"]["postbox_test"], true);
    assert!(body["conversation_id"].as_str().unwrap().parse::<Uuid>().is_ok());
    for key in [
        "id",
        "content_type",
        "type",
        "channel",
        "status",
        "created_by",
        "created_at",
    ] {
        assert!(body["data"].get(key).is_some(), "data.{key}: {body}");
    }
    assert!(body["timestamp"].is_string());

    // As JSON, with the secret given on the command line's safer forms.
    let mut c = postbox(Some(&db.url));
    c.env("PROBE_SECRET", SECRET).args([
        "endpoint",
        "test",
        &receiver.url,
        "--allow-http",
        "--allow-private-networks",
        "--secret-env",
        "PROBE_SECRET",
        "--json",
    ]);
    let out = run_async(c).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["accepted"], true);
    assert_eq!(v["status_code"], 200);
    assert!(v["error_kind"].is_null());
    assert_eq!(v["worker_would"], "delivered");
    assert_eq!(v["ssrf"], "allowed");
    assert_eq!(v["tls"], "not_used");
    assert_eq!(v["signed_with"], "given_secret");
    assert_eq!(v["addresses"][0]["address"], "127.0.0.1");
    assert_eq!(v["addresses"][0]["class"], "loopback");
    assert_eq!(v["addresses"][0]["allowed_by"], "POSTBOX_ALLOW_PRIVATE_NETWORKS");
    assert!(v["endpoint"].is_null());
    assert!(v["duration_ms"].is_u64());
    let hits = receiver.hits();
    assert_eq!(hits.len(), 2);
    assert_eq!(v["webhook_id"], hits[1].header("webhook-id"));
    assert_ne!(
        hits[0].header("webhook-id"),
        hits[1].header("webhook-id"),
        "a fresh webhook-id each time"
    );
    assert!(signed_by(&hits[1], SECRET));

    assert_eq!(
        table_rows(&db).await,
        (0, 0),
        "nothing in the outbox or the attempt log"
    );
    let endpoints: i64 = sqlx::query_scalar("SELECT count(*) FROM postbox.endpoints")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(endpoints, 0, "no endpoint is created either");
}

/// A refusal (500), a 410 and a blocked private address: exit 1 with the
/// error kind and what a worker would do; nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_test_refused_gone_and_blocked() {
    let db = TestDb::new().await;
    let failing = Receiver::start(Arc::new(|_, _| Reply::status(500).body("nope"))).await;
    let probe = |url: &str, extra: &[&str]| {
        let mut c = postbox(Some(&db.url));
        c.env("POSTBOX_SIGNING_SECRET", SECRET)
            .args(["endpoint", "test", url, "--allow-http"])
            .args(extra);
        c
    };
    let out = run_async(probe(&failing.url, &["--allow-private-networks", "--json"])).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["accepted"], false);
    assert_eq!(v["status_code"], 500);
    assert_eq!(v["error_kind"], "http_status");
    assert_eq!(v["worker_would"], "retry");
    assert_eq!(
        v["retry_in_ms"], 4000,
        "the workers' default schedule: 4s after the 1st failure"
    );
    assert_eq!(v["response_body"], "nope");
    assert_eq!(failing.count(), 1);
    let out = run_async(probe(&failing.url, &["--allow-private-networks"])).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("http_status") && stdout(&out).contains("retry in 4s"),
        "{}",
        stdout(&out)
    );

    let gone = Receiver::start(Arc::new(|_, _| Reply::status(410))).await;
    let out = run_async(probe(&gone.url, &["--allow-private-networks", "--json"])).await;
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status_code"], 410);
    assert_eq!(v["worker_would"], "endpoint_disabled");

    // The SSRF guard: a loopback receiver without --allow-private-networks.
    let accepting = Receiver::ok().await;
    let out = run_async(probe(&accepting.url, &["--json"])).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error_kind"], "blocked");
    assert_eq!(v["ssrf"], "blocked");
    assert_eq!(v["worker_would"], "failed");
    assert!(v["status_code"].is_null());
    assert_eq!(v["addresses"][0]["allowed"], false);
    assert!(
        v["error"].as_str().unwrap().contains("POSTBOX_ALLOW_PRIVATE_NETWORKS"),
        "{v}"
    );
    let out = run_async(probe(&accepting.url, &[])).await;
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        text.contains("blocked") && text.contains("POSTBOX_ALLOW_PRIVATE_NETWORKS") && text.contains("refused"),
        "{text}"
    );
    assert_eq!(accepting.count(), 0, "a blocked destination is never contacted");
    assert_eq!(table_rows(&db).await, (0, 0));
}

/// The probe signs with a known endpoint's own secret and follows its own
/// retry schedule; with no secret at all it refuses unless told to send
/// unsigned; a URL the database refuses is named as callback_url.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_test_secrets_and_url_rule() {
    let db = TestDb::new().await;
    let receiver = Receiver::start(Arc::new(|_, _| Reply::status(503))).await;
    let own = Secrets::generate();
    enqueue_many(&db.pool, &receiver.url, 1).await;
    let out = cli(
        &db,
        &[
            "endpoint",
            "set",
            &receiver.url,
            "--secret",
            &own,
            "--retry-schedule",
            "1m,1h",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let before = table_rows(&db).await;
    let mut c = postbox(Some(&db.url));
    c.env("POSTBOX_SIGNING_SECRET", SECRET).args([
        "endpoint",
        "test",
        &receiver.url,
        "--allow-http",
        "--allow-private-networks",
        "--json",
    ]);
    let out = run_async(c).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["signed_with"], "endpoint_secret");
    assert!(v["endpoint"]["id"].is_i64(), "{v}");
    assert_eq!(v["retry_in_ms"], 60_000, "the endpoint's own schedule");
    let hit = &receiver.hits()[0];
    assert!(signed_by(hit, &own) && !signed_by(hit, SECRET));
    assert_eq!(table_rows(&db).await, before, "nothing written");

    // No secret anywhere: refused before anything is sent, unless unsigned is allowed.
    let other = Receiver::ok().await;
    let mut c = postbox(Some(&db.url));
    c.args([
        "endpoint",
        "test",
        &other.url,
        "--allow-http",
        "--allow-private-networks",
    ]);
    let out = run_async(c).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("POSTBOX_SIGNING_SECRET"), "{}", stderr(&out));
    assert_eq!(other.count(), 0);
    let mut c = postbox(Some(&db.url));
    c.env("POSTBOX_ALLOW_UNSIGNED", "true").args([
        "endpoint",
        "test",
        &other.url,
        "--allow-http",
        "--allow-private-networks",
    ]);
    let out = run_async(c).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("unsigned"), "{}", stdout(&out));
    assert_eq!(other.hits()[0].header("webhook-signature"), "");

    // The database's URL rule.
    let mut c = postbox(Some(&db.url));
    c.env("POSTBOX_SIGNING_SECRET", SECRET)
        .args(["endpoint", "test", "https://user:pw@example.com/hook"]);
    let out = run_async(c).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("callback_url"), "{}", stderr(&out));
    let mut c = postbox(Some(&db.url));
    c.env("POSTBOX_SIGNING_SECRET", SECRET)
        .args(["endpoint", "test", "ftp://example.com/hook"]);
    let out = run_async(c).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("callback_url"), "{}", stderr(&out));
}

/// `endpoint list --json`: one object per endpoint with its limits, state
/// and retry policy, never the secret; `replay --json` and `status --json`
/// parse too.
#[tokio::test]
async fn reading_commands_print_json() {
    let db = TestDb::new().await;
    enqueue_many(&db.pool, "https://example.com/a", 2).await;
    enqueue_many(&db.pool, "https://example.com/b", 1).await;
    let out = cli(&db, &["endpoint", "set", "https://example.com/b", "--secret", SECRET]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(
        &db,
        &[
            "endpoint",
            "disable",
            "https://example.com/b",
            "--reason",
            "maintenance",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));

    let out = cli(&db, &["endpoint", "list", "--json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout(&out).contains("MfKQ9r8"), "never the secret");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = v.as_array().expect("an array");
    assert_eq!(list.len(), 2);
    for e in list {
        for key in [
            "id",
            "url",
            "pending",
            "max_in_flight",
            "rate_per_minute",
            "own_secret",
            "state",
            "disabled_at",
            "disabled_reason",
            "retry_schedule",
            "max_attempts",
        ] {
            assert!(e.get(key).is_some(), "{key} in {e}");
        }
    }
    assert_eq!(list[0]["url"], "https://example.com/a");
    assert_eq!(list[0]["pending"], 2);
    assert_eq!(list[0]["max_in_flight"], 10);
    assert_eq!(list[0]["rate_per_minute"], 100);
    assert_eq!(list[0]["own_secret"], false);
    assert_eq!(list[0]["state"], "ok");
    assert!(list[0]["disabled_at"].is_null() && list[0]["retry_schedule"].is_null());
    assert!(list[0]["max_attempts"].is_null());
    assert_eq!(list[1]["own_secret"], true);
    assert_eq!(list[1]["disabled_reason"], "maintenance");
    assert!(list[1]["disabled_at"].is_string());
    assert!(list[1]["state"].as_str().unwrap().contains("disabled"));

    let v = cli_json(&db, &["status"]).await;
    assert_eq!(v["backlog"]["pending"], 3);
    let v = cli_json(&db, &["replay", "--status", "delivered", "--dry-run"]).await;
    assert_eq!(v["would_replay"], 0);
    assert_eq!(v["dry_run"], true);
    sqlx::query("UPDATE postbox.outbox SET status = 'failed', attempts = 4")
        .execute(&db.pool)
        .await
        .unwrap();
    let v = cli_json(&db, &["replay"]).await;
    assert_eq!(v["replayed"], 3);
}

/// `endpoint set --retry-schedule/--max-attempts` set, show and reset an
/// endpoint's retry policy; max attempts apply to events enqueued later.
#[tokio::test]
async fn endpoint_retry_policy() {
    let db = TestDb::new().await;
    let url = "https://example.com/slow";
    let old = enqueue_many(&db.pool, url, 1).await[0];
    let out = cli(
        &db,
        &[
            "endpoint",
            "set",
            url,
            "--retry-schedule",
            "1m, 10m,1h",
            "--max-attempts",
            "7",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let (schedule, max): (String, Option<i32>) =
        sqlx::query_as("SELECT retry_schedule::text, max_attempts FROM postbox.endpoints WHERE url = $1")
            .bind(url)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((schedule.as_str(), max), ("{00:01:00,00:10:00,01:00:00}", Some(7)));
    let new = enqueue_many(&db.pool, url, 1).await[0];
    let max_of = |id: Uuid| {
        sqlx::query_scalar::<_, i32>("SELECT max_attempts FROM postbox.outbox WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
    };
    assert_eq!(
        max_of(old).await.unwrap(),
        4,
        "an event enqueued before keeps its attempts"
    );
    assert_eq!(max_of(new).await.unwrap(), 7);

    let v = cli_json(&db, &["endpoint", "list"]).await;
    assert_eq!(v[0]["retry_schedule"], serde_json::json!(["1m", "10m", "1h"]));
    assert_eq!(v[0]["max_attempts"], 7);
    let text = stdout(&cli(&db, &["endpoint", "list"]).await);
    let header = text.lines().next().unwrap();
    assert!(
        header.contains("attempts") && header.contains("retry schedule"),
        "{text}"
    );
    let line = text.lines().find(|l| l.contains(url)).unwrap();
    assert!(line.contains("1m,10m,1h") && line.contains(" 7 "), "{text}");

    // Out of range: exit 2 naming the option, and nothing written (not even
    // the valid option given alongside).
    let bad: &[(&str, &str)] = &[
        ("--retry-schedule", "0s"),
        ("--retry-schedule", "31days"),
        ("--retry-schedule", "1m,soon"),
        ("--retry-schedule", ""),
        ("--max-attempts", "0"),
        ("--max-attempts", "101"),
        ("--max-attempts", "many"),
    ];
    let long = vec!["1s"; 101].join(",");
    let mut cases: Vec<(&str, &str)> = bad.to_vec();
    cases.push(("--retry-schedule", &long));
    for (flag, value) in cases {
        let out = cli(&db, &["endpoint", "set", url, "--max-in-flight", "3", flag, value]).await;
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {}", stderr(&out));
        assert!(stderr(&out).contains(flag), "{flag} {value}: {}", stderr(&out));
    }
    for (flag, value) in [("--max-in-flight", "0"), ("--rate-per-minute", "0")] {
        let out = cli(&db, &["endpoint", "set", url, "--max-attempts", "9", flag, value]).await;
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {}", stderr(&out));
        assert!(stderr(&out).contains(flag), "{flag} {value}: {}", stderr(&out));
    }
    let (schedule, max, in_flight): (String, Option<i32>, i32) = sqlx::query_as(
        "SELECT retry_schedule::text, max_attempts, max_in_flight FROM postbox.endpoints WHERE url = $1",
    )
    .bind(url)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (schedule.as_str(), max, in_flight),
        ("{00:01:00,00:10:00,01:00:00}", Some(7), 10)
    );
    // The bounds themselves are accepted.
    let out = cli(
        &db,
        &[
            "endpoint",
            "set",
            url,
            "--retry-schedule",
            "500ms,30days",
            "--max-attempts",
            "100",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));

    // `default` resets both.
    let out = cli(
        &db,
        &[
            "endpoint",
            "set",
            url,
            "--retry-schedule",
            "default",
            "--max-attempts",
            "default",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let v = cli_json(&db, &["endpoint", "list"]).await;
    assert!(
        v[0]["retry_schedule"].is_null() && v[0]["max_attempts"].is_null(),
        "{v}"
    );
    let line = stdout(&cli(&db, &["endpoint", "list"]).await);
    assert!(line.contains("default"), "{line}");
}

/// An HTTPS receiver on 127.0.0.1 with a certificate for localhost signed
/// by a fresh CA; answers 200. Returns its port and the CA in PEM.
async fn https_receiver() -> (u16, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let ca_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "postbox probe test CA");
    let ca = params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let config = tokio_rustls::rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(leaf.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                        bytes::Bytes::new(),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (port, ca.pem())
}

/// The TLS verdict: verified against POSTBOX_CA_CERT, failed without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_test_tls() {
    let db = TestDb::new().await;
    let (port, ca_pem) = https_receiver().await;
    let ca_file = std::env::temp_dir().join(format!("postbox-probe-ca-{}.pem", Uuid::new_v4().simple()));
    std::fs::write(&ca_file, ca_pem).unwrap();
    let url = format!("https://localhost:{port}/hook");
    let probe = |ca: Option<&std::path::Path>| {
        let mut c = postbox(Some(&db.url));
        c.env("POSTBOX_SIGNING_SECRET", SECRET)
            .args(["endpoint", "test", &url, "--allow-private-networks", "--json"]);
        if let Some(ca) = ca {
            c.env("POSTBOX_CA_CERT", ca);
        }
        c
    };
    let out = run_async(probe(Some(&ca_file))).await;
    assert_eq!(out.status.code(), Some(0), "{}\n{}", stdout(&out), stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tls"], "verified");
    assert!(v["tls_detail"].as_str().unwrap().contains("POSTBOX_CA_CERT"), "{v}");
    assert_eq!(v["status_code"], 200);

    let out = run_async(probe(None)).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tls"], "failed");
    assert_eq!(v["error_kind"], "tls");
    assert_eq!(v["worker_would"], "retry");
    std::fs::remove_file(&ca_file).ok();
    assert_eq!(table_rows(&db).await, (0, 0));
}
