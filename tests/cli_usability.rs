//! The command line as a newcomer meets it: where options go, switches,
//! connection errors that say what is wrong, secrets kept off the command line.

mod common;

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use postbox::delivery::Secrets;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `--database-url` is accepted before the command, after it, and after a subcommand.
#[tokio::test]
async fn database_url_goes_anywhere_on_the_line() {
    let db = TestDb::new().await;
    enqueue_many(&db.pool, "https://example.com/hook", 1).await;
    let lines: [&[&str]; 4] = [
        &["--database-url", &db.url, "endpoint", "list"],
        &["endpoint", "--database-url", &db.url, "list"],
        &["endpoint", "list", "--database-url", &db.url],
        &["status", "--database-url", &db.url],
    ];
    for args in lines {
        let mut c = postbox(None);
        c.args(args);
        let out = run(c);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        if args.contains(&"list") {
            assert!(stdout(&out).contains("https://example.com/hook"), "{args:?}");
        }
    }
}

/// Yes/no options are switches that also take a value; the environment reads true/false.
// The receiver runs on the test's runtime while `run` blocks a thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boolean_options_are_switches() {
    let db = TestDb::new().await;
    let receiver = Receiver::ok().await;
    let id = enqueue_many(&db.pool, &receiver.url, 1).await[0];
    let mut c = postbox(Some(&db.url));
    c.env("POSTBOX_SIGNING_SECRET", SECRET).args([
        "worker",
        "--allow-http",
        "--allow-private-networks",
        "--until-empty",
    ]);
    let out = run(c);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(row(&db.pool, id).await.0, "delivered", "{}", stderr(&out));
    assert_eq!(receiver.count(), 1);

    // An explicit false wins over the environment's true.
    let id = enqueue_many(&db.pool, &receiver.url, 1).await[0];
    let mut c = postbox(Some(&db.url));
    c.env("POSTBOX_SIGNING_SECRET", SECRET)
        .env("POSTBOX_ALLOW_HTTP", "true")
        .env("POSTBOX_ALLOW_PRIVATE_NETWORKS", "yes")
        .args(["worker", "--allow-http=false", "--until-empty"]);
    let out = run(c);
    assert!(out.status.success(), "{}", stderr(&out));
    let (_, _, kind, error) = attempts_of(&db.pool, id).await.remove(0);
    assert_eq!(kind.as_deref(), Some("blocked"), "{error:?}");
    assert!(error.unwrap_or_default().contains("POSTBOX_ALLOW_HTTP"));
    assert_eq!(receiver.count(), 1, "the http:// request was not sent");
}

/// A worker with no default secret refuses to start, naming the variable and
/// the way out; `POSTBOX_ALLOW_UNSIGNED=true` sends unsigned webhooks on purpose.
// The receiver runs on the test's runtime while `run` blocks a thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_only_when_asked_for() {
    let db = TestDb::new().await;
    let receiver = Receiver::ok().await;
    let id = enqueue_many(&db.pool, &receiver.url, 1).await[0];
    let base = || {
        let mut c = postbox(Some(&db.url));
        c.env("POSTBOX_ALLOW_HTTP", "true")
            .env("POSTBOX_ALLOW_PRIVATE_NETWORKS", "true")
            .args(["worker", "--until-empty"]);
        c
    };
    let out = run(base());
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("POSTBOX_SIGNING_SECRET") && err.contains("POSTBOX_ALLOW_UNSIGNED") && err.contains("secret new"),
        "{err}"
    );
    assert_eq!(row(&db.pool, id).await, ("pending".into(), 0), "nothing was attempted");

    let mut c = base();
    c.env("POSTBOX_ALLOW_UNSIGNED", "true");
    let out = run(c);
    assert!(out.status.success(), "{}", stderr(&out));
    let hits = receiver.hits();
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].header("webhook-signature"), "", "sent unsigned, as asked");
}

/// `postbox secret new` prints a fresh, valid secret of 32 random bytes each time.
#[test]
fn secret_new_prints_fresh_secrets() {
    let mut seen = std::collections::HashSet::new();
    for _ in 0..3 {
        let mut c = postbox(None);
        c.args(["secret", "new"]);
        let out = run(c);
        assert!(out.status.success());
        let s = stdout(&out).trim().to_owned();
        let key = s.strip_prefix("whsec_").expect("whsec_ prefix");
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD.decode(key).unwrap();
        assert_eq!(bytes.len(), 32);
        assert!(Secrets::parse(&s).is_ok());
        assert!(seen.insert(s), "a new secret every time");
    }
}

/// `endpoint set` reads a secret from a file, standard input or an environment
/// variable; a bad one is refused naming where it came from, never echoing it.
#[tokio::test]
async fn endpoint_secret_from_file_stdin_or_environment() {
    let db = TestDb::new().await;
    let url = "https://example.com/hook";
    enqueue_many(&db.pool, url, 1).await;
    let stored = || async {
        sqlx::query_scalar::<_, Option<String>>("SELECT secret FROM postbox.endpoints")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    let fresh = || Secrets::generate();

    let dir = std::env::temp_dir().join(format!("postbox-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{}.txt", db.name));
    let s1 = fresh();
    std::fs::write(&file, format!("{s1}\n")).unwrap();
    let mut c = postbox(Some(&db.url));
    c.args(["endpoint", "set", url, "--secret-file", file.to_str().unwrap()]);
    let out = run(c);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stored().await.as_deref(), Some(s1.as_str()));

    let s2 = fresh();
    let mut c = postbox(Some(&db.url));
    c.args(["endpoint", "set", url, "--secret-file", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    child.stdin.take().unwrap().write_all(s2.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stored().await.as_deref(), Some(s2.as_str()));

    let s3 = fresh();
    let mut c = postbox(Some(&db.url));
    c.env("CUSTOMER_SECRET", &s3)
        .args(["endpoint", "set", url, "--secret-env", "CUSTOMER_SECRET"]);
    let out = run(c);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stored().await.as_deref(), Some(s3.as_str()));

    std::fs::write(&file, "whsec_not*base64").unwrap();
    let mut c = postbox(Some(&db.url));
    c.args(["endpoint", "set", url, "--secret-file", file.to_str().unwrap()]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--secret-file"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("not*base64"), "never echoed");
    assert_eq!(stored().await.as_deref(), Some(s3.as_str()), "unchanged");

    let mut c = postbox(Some(&db.url));
    c.args(["endpoint", "set", url, "--secret-env", "POSTBOX_NO_SUCH_VARIABLE"]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("POSTBOX_NO_SUCH_VARIABLE"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A database that cannot be used is reported at once with the real cause,
/// naming `DATABASE_URL` without its password.
#[tokio::test]
async fn connection_errors_say_what_is_wrong() {
    let db = TestDb::new().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let refused = format!("postgres://postbox:hunter2@127.0.0.1:{port}/app");
    let mut missing_db = url::Url::parse(&db.url).unwrap();
    missing_db.set_path("/postbox_no_such_database");
    let mut bad_user = url::Url::parse(&db.url).unwrap();
    bad_user.set_username("postbox_no_such_role").unwrap();
    bad_user.set_password(Some("hunter2")).unwrap();
    let cases = [
        (refused, 1, "connection refused"),
        (missing_db.to_string(), 2, "does not exist"),
        (bad_user.to_string(), 2, "authentication failed"),
        (
            "postgres://u:hunter2@no-such-host.invalid/db".to_string(),
            1,
            "unknown host",
        ),
    ];
    for (url, code, says) in cases {
        for args in [&["status"][..], &["worker", "--allow-unsigned"][..]] {
            let mut c = postbox(Some(&url));
            c.args(args);
            let started = Instant::now();
            let out = run(c);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(code), "{args:?} {url}: {err}");
            assert!(err.contains("DATABASE_URL") && err.contains(says), "{err}");
            assert!(!err.contains("hunter2"), "the password is never printed: {err}");
            assert!(
                started.elapsed() < Duration::from_secs(8),
                "reported at once, not after a pool timeout"
            );
        }
    }
    // A database postbox was never migrated into says what to run.
    let empty = TestDb::empty().await;
    let mut c = postbox(Some(&empty.url));
    c.arg("status");
    let out = run(c);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("postbox migrate"), "{}", stderr(&out));
}

/// `replay` writes no carriage-return progress when stderr is not a terminal.
#[tokio::test]
async fn replay_progress_only_on_a_terminal() {
    let db = TestDb::new().await;
    enqueue_many(&db.pool, "https://example.com/hook", 5).await;
    sqlx::query("UPDATE postbox.outbox SET status = 'failed', attempts = 4")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut c = postbox(Some(&db.url));
    c.args(["replay", "--batch", "2"]);
    let out = run(c);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains('\r'), "{:?}", stderr(&out));
    assert!(stdout(&out).contains("replayed 5 event(s)"), "{}", stdout(&out));
}

/// `status` names an endpoint's state under a `state` header, in words.
#[tokio::test]
async fn status_shows_endpoint_state_in_words() {
    let db = TestDb::new().await;
    let url = "https://example.com/hook";
    enqueue_many(&db.pool, url, 1).await;
    let mut c = postbox(Some(&db.url));
    c.args(["endpoint", "disable", url, "--reason", "customer asked"]);
    assert!(run(c).status.success());
    let mut c = postbox(Some(&db.url));
    c.arg("status");
    let out = stdout(&run(c));
    let header = out.lines().find(|l| l.contains("url")).expect("endpoint table");
    assert!(header.contains("state") && !header.contains("breaker"), "{out}");
    let line = out.lines().find(|l| l.contains(url)).expect("the endpoint is listed");
    assert!(line.contains("disabled"), "{out}");
}
