//! The enqueue examples of `examples/enqueue/`, each run against a migrated
//! database of its own: the committed event is in the outbox next to its
//! message row, the rolled-back one left neither, and a refused field comes
//! back under its own name (`data.status`, `callback_url`), with nothing
//! written.
//!
//! Python, Node and Rust run in every `cargo test` (psycopg and pg are
//! installed into the target directory when missing). Java, Go and PHP need
//! Debian packages, so their tests are ignored: `examples/enqueue/test-all.sh`
//! installs the packages and runs every example, or, with the packages
//! installed, `cargo test --test examples_enqueue -- --ignored`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::TestDb;
use uuid::Uuid;

/// The conversation every example writes to.
const CONVERSATION_ID: &str = "5e7c0a4e-3c1b-4f0e-9a57-2d1f8c6b9e10";
/// What every example prints for its deliberately invalid status.
const REJECTED: &str = r#"rejected: invalid data.status: must be one of RECEIVED, PROCESSED, FAILED (got "DONE")"#;
/// A callback URL that is refused, and the error line naming its field.
const BAD_URL: &str = "ftp://customer.example.com/webhook";
const BAD_URL_ERROR: &str = "invalid callback_url: must be an absolute https:// URL";

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/enqueue")
}

/// Where the examples' packages are installed (under the target directory).
fn deps_dir(language: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("enqueue-examples")
        .join(language)
}

/// Runs a setup command, panicking with `what` when it cannot run or fails.
fn setup(mut c: Command, what: &str) {
    let out = c
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Panics with `install` unless `program` runs.
fn require(program: &str, arg: &str, install: &str) {
    let ok = Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "`{program}` is needed to run this example: {install}");
}

/// python3 with psycopg 3: the system's, else installed from PyPI into the
/// target directory from the example's requirements.txt.
fn python() -> Command {
    require("python3", "--version", "install Python 3");
    let has_psycopg = |path: &Path| {
        Command::new("python3")
            .args(["-c", "import psycopg"])
            .env("PYTHONPATH", path)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let dir = deps_dir("python");
    if !has_psycopg(&dir) {
        let mut pip = Command::new("python3");
        pip.args(["-m", "pip", "install", "-q", "--disable-pip-version-check", "--target"])
            .arg(&dir)
            .arg("-r")
            .arg(examples_dir().join("python/requirements.txt"));
        setup(pip, "pip install psycopg into the target directory");
        assert!(has_psycopg(&dir), "psycopg is not importable after pip install");
    }
    let mut c = Command::new("python3");
    c.arg(examples_dir().join("python/enqueue.py")).env("PYTHONPATH", dir);
    c
}

/// node with the example's locked `pg`, installed by `npm ci` into the
/// target directory (so the source tree gets no node_modules).
fn node() -> Command {
    require("node", "--version", "install Node.js");
    let dir = deps_dir("node");
    std::fs::create_dir_all(&dir).unwrap();
    let lock = examples_dir().join("node/package-lock.json");
    let installed_lock = dir.join("package-lock.json");
    let fresh = dir.join("node_modules/pg").is_dir()
        && std::fs::read(&installed_lock).ok() == Some(std::fs::read(&lock).unwrap());
    if !fresh {
        require("npm", "--version", "install npm");
        std::fs::copy(examples_dir().join("node/package.json"), dir.join("package.json")).unwrap();
        std::fs::copy(&lock, &installed_lock).unwrap();
        let mut npm = Command::new("npm");
        npm.args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir);
        setup(npm, "npm ci (the node example's pg) in the target directory");
    }
    let mut c = Command::new("node");
    c.arg(examples_dir().join("node/enqueue.js"))
        .env("NODE_PATH", dir.join("node_modules"));
    c
}

/// The Rust example, built by cargo like any example of this package.
fn rust() -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(&cargo);
    build
        .args(["build", "--quiet", "--example", "enqueue"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    setup(build, "cargo build --example enqueue");
    // tests/…/deps/examples_enqueue-<hash> → …/examples/enqueue
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    Command::new(profile_dir.join("examples/enqueue"))
}

const JDBC_JAR: &str = "/usr/share/java/postgresql.jar";
const APT: &str = "run examples/enqueue/test-all.sh, which installs the Debian packages";

fn java() -> Command {
    require("java", "-version", APT);
    assert!(
        Path::new(JDBC_JAR).exists(),
        "{JDBC_JAR} is missing (libpostgresql-jdbc-java): {APT}"
    );
    let mut c = Command::new("java");
    c.args(["-cp", JDBC_JAR]).arg(examples_dir().join("java/Enqueue.java"));
    c
}

fn go() -> Command {
    require("go", "version", APT);
    assert!(
        Path::new("/usr/share/gocode/src/github.com/lib/pq").is_dir(),
        "lib/pq is missing (golang-github-lib-pq-dev): {APT}"
    );
    let mut c = Command::new("go");
    c.args(["run", "main.go"])
        .current_dir(examples_dir().join("go"))
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .env("GOCACHE", deps_dir("go-cache"));
    c
}

fn php() -> Command {
    require("php", "--version", APT);
    let out = Command::new("php").arg("-m").output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).lines().any(|l| l == "pdo_pgsql"),
        "PHP has no pdo_pgsql (php-pgsql): {APT}"
    );
    let mut c = Command::new("php");
    c.arg(examples_dir().join("php/enqueue.php"));
    c
}

/// Runs an example against `db_url`, optionally with another callback URL.
async fn run(example: fn() -> Command, db_url: &str, callback_url: Option<&str>) -> Output {
    let db_url = db_url.to_owned();
    let callback_url = callback_url.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let mut c = example();
        c.env("DATABASE_URL", db_url).env_remove("CALLBACK_URL");
        if let Some(url) = callback_url {
            c.env("CALLBACK_URL", url);
        }
        c.stdin(Stdio::null()).output().expect("run the example")
    })
    .await
    .unwrap()
}

/// The two UUIDs of a "… event <id> (message <id>) …" line that starts with `prefix`.
fn ids(stdout: &str, prefix: &str) -> (Uuid, Uuid) {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{stdout}"));
    let found: Vec<Uuid> = line
        .split(|c: char| !(c.is_ascii_hexdigit() || c == '-'))
        .filter_map(|w| Uuid::parse_str(w).ok())
        .collect();
    assert_eq!(found.len(), 2, "an event and a message id in {line:?}");
    (found[0], found[1])
}

/// How many rows `sql` (a count with `$1` the id) finds.
async fn count(db: &TestDb, sql: &str, id: Uuid) -> i64 {
    sqlx::query_scalar(sql).bind(id).fetch_one(&db.pool).await.unwrap()
}

/// (events in the outbox, rows in example_app.messages).
async fn totals(db: &TestDb) -> (i64, i64) {
    sqlx::query_as("SELECT (SELECT count(*) FROM postbox.outbox), (SELECT count(*) FROM example_app.messages)")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

async fn check(example: fn() -> Command) {
    let db = TestDb::new().await;

    let out = run(example, &db.url, None).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the example failed:\n{stdout}{stderr}");

    // Committed: the event is pending in the outbox and its message row exists.
    let (event, message) = ids(&stdout, "committed event ");
    let (message_id, conversation, key, status, data): (Uuid, Uuid, Option<String>, String, serde_json::Value) =
        sqlx::query_as(
            "SELECT message_id, conversation_id, ordering_key, status, payload -> 'data' FROM postbox.outbox WHERE id = $1",
        )
        .bind(event)
        .fetch_optional(&db.pool)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("the committed event {event} is not in the outbox"));
    assert_eq!(message_id, message);
    assert_eq!(conversation.to_string(), CONVERSATION_ID);
    assert_eq!(key.as_deref(), Some(CONVERSATION_ID), "ordering key");
    assert_eq!(status, "pending");
    assert_eq!(data["id"], message.to_string());
    assert_eq!(data["content"], "Hello");
    assert_eq!(data["status"], "RECEIVED");
    let content: String = sqlx::query_scalar("SELECT content FROM example_app.messages WHERE id = $1")
        .bind(message)
        .fetch_one(&db.pool)
        .await
        .expect("the committed message row exists");
    assert_eq!(content, "Hello");

    // Rolled back: neither the event nor its message row exists.
    let (undone_event, undone_message) = ids(&stdout, "rolled back event ");
    assert_ne!(undone_event, event);
    assert!(stdout.contains("in the outbox: false"), "{stdout}");
    assert_eq!(
        count(&db, "SELECT count(*) FROM postbox.outbox WHERE id = $1", undone_event).await,
        0
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM example_app.messages WHERE id = $1",
            undone_message
        )
        .await,
        0
    );

    // Rejected: the field is named, and its transaction wrote nothing.
    assert!(
        stdout.lines().any(|l| l == REJECTED),
        "no {REJECTED:?} line in:\n{stdout}"
    );
    assert_eq!(totals(&db).await, (1, 1), "one event and one message row in all");

    // A refused callback URL stops the example naming that field; nothing is written.
    let out = run(example, &db.url, Some(BAD_URL)).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{BAD_URL} was accepted:\n{stdout}");
    assert!(
        stderr.lines().any(|l| l == BAD_URL_ERROR),
        "no {BAD_URL_ERROR:?} line in:\n{stderr}"
    );
    assert!(!stdout.contains("committed"), "{stdout}");
    assert_eq!(totals(&db).await, (1, 1), "the refused event left nothing");
}

#[tokio::test]
async fn python_example() {
    check(python).await;
}

#[tokio::test]
async fn node_example() {
    check(node).await;
}

#[tokio::test]
async fn rust_example() {
    check(rust).await;
}

#[tokio::test]
#[ignore = "needs Debian's default-jdk and libpostgresql-jdbc-java: examples/enqueue/test-all.sh"]
async fn java_example() {
    check(java).await;
}

#[tokio::test]
#[ignore = "needs Debian's golang-go and golang-github-lib-pq-dev: examples/enqueue/test-all.sh"]
async fn go_example() {
    check(go).await;
}

#[tokio::test]
#[ignore = "needs Debian's php-cli and php-pgsql: examples/enqueue/test-all.sh"]
async fn php_example() {
    check(php).await;
}
