//! The example receivers in `examples/receivers/` against a real `postbox
//! worker` process: each one must accept postbox's signed deliveries (two
//! signatures, one of them under a secret it does not know), refuse forged,
//! tampered, stale and malformed requests with 400/401, survive a 500 answer
//! through the worker's retry, deduplicate a replayed event (also after a
//! restart, so the store is persistent), answer before processing, and
//! process every event exactly once.
//!
//! Django, FastAPI, Flask and Express run in plain `cargo test` (their
//! packages are installed from PyPI and npm when missing). The plain-Java
//! (Spring Boot's verifier and inbox) and PHP receivers need a JDK and
//! php-cli, so they are ignored by default: `examples/receivers/test-all.sh`
//! installs those from Debian's packages and runs everything.

mod common;

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use sqlx::PgPool;
use uuid::Uuid;

use common::{spawn_worker_process, stop_all, wait_until, TestDb, SECRET};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/receivers");
/// Simulated work per event in the receivers: an answer that waited for the
/// processing would take at least this long.
const PROCESS_DELAY_MS: i32 = 1000;
/// A second, valid secret the receivers do not know: the worker signs with
/// both, so each receiver must find its own among several signatures.
const OTHER_SECRET: &str = "whsec_YW5vdGhlci1lbmRwb2ludC1zZWNyZXQh";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Django,
    FastApi,
    Flask,
    Express,
    Java,
    Php,
}

impl Kind {
    /// The `receiver` field of the lines it writes.
    fn label(self) -> &'static str {
        match self {
            Kind::Django => "django",
            Kind::FastApi => "fastapi",
            Kind::Flask => "flask",
            Kind::Express => "express",
            Kind::Java => "plain-java",
            Kind::Php => "php",
        }
    }

    fn dir(self) -> PathBuf {
        let name = match self {
            Kind::Django => "django",
            Kind::FastApi => "fastapi",
            Kind::Flask => "flask",
            Kind::Express => "express",
            Kind::Java => "spring-boot",
            Kind::Php => "php",
        };
        Path::new(EXAMPLES).join(name)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn django_receiver() {
    exercise(Kind::Django).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fastapi_receiver() {
    exercise(Kind::FastApi).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flask_receiver() {
    exercise(Kind::Flask).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn express_receiver() {
    exercise(Kind::Express).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a JDK: run examples/receivers/test-all.sh"]
async fn java_receiver() {
    exercise(Kind::Java).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs php-cli with pdo_sqlite: run examples/receivers/test-all.sh"]
async fn php_receiver() {
    exercise(Kind::Php).await;
}

/// The whole scenario for one receiver.
async fn exercise(kind: Kind) {
    let db = TestDb::new().await;
    let setup = tokio::task::spawn_blocking(move || Setup::prepare(kind)).await.unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/webhook");
    let mut rx = Running::start(&setup, port, 1).await;
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();

    // 1. Requests the receiver must refuse, before anything was delivered.
    let manual_id = format!("msg_{}", Uuid::new_v4().simple());
    let manual_body = serde_json::to_vec(&manual_payload()).unwrap();
    refuses_bad_requests(&http, &url, &manual_id, &manual_body, &rx).await;

    // 2. Three events through the outbox; the receiver fails its first
    //    verified delivery with 500, so one of them is retried.
    let events = enqueue(&db.pool, &url, &["first ✓", "second \"quoted\"\nline", "third"]).await;
    let mut worker = spawn_worker_process(
        &db.url,
        &[("POSTBOX_SIGNING_SECRET", &format!("{OTHER_SECRET} {SECRET}"))],
    );
    wait_until(
        &db.pool,
        "SELECT count(*) FROM postbox.outbox WHERE status = 'delivered'",
        3,
        Duration::from_secs(30),
    )
    .await;
    let codes = status_codes(&db.pool).await;
    let retried: Vec<Uuid> = events.iter().filter(|e| codes[&e.id].len() > 1).map(|e| e.id).collect();
    assert_eq!(retried.len(), 1, "exactly one event was answered 500 first: {codes:?}");
    for e in &events {
        let want: &[i32] = if e.id == retried[0] { &[500, 200] } else { &[200] };
        assert_eq!(codes[&e.id], want, "attempts of {}: {codes:?}", e.id);
    }
    rx.wait_for_lines(3).await;

    // 3. A duplicate delivery while it runs: replay the retried event.
    let before = successes(&db.pool).await;
    replay(&db.url, &["--id", &retried[0].to_string()]).await;
    wait_for_successes(&db.pool, before + 1).await;

    // 4. An event signed by this test (fresh timestamp, its own signature
    //    second in the header), sent twice; the receiver is killed while the
    //    event waits for processing, and must still process it after a
    //    restart. This also shows that the stale request of step 1, with
    //    the same id and body, was not stored.
    for _ in 0..2 {
        let ts = now();
        let signature = format!(
            "{} {}",
            sign(OTHER_SECRET, &manual_id, ts, &manual_body),
            sign(SECRET, &manual_id, ts, &manual_body)
        );
        let status = post(&http, &url, &manual_id, &ts.to_string(), &signature, &manual_body).await;
        assert_eq!(status, 200, "a correctly signed request is accepted\n{}", rx.logs());
    }
    rx.kill();
    assert!(
        !rx.lines().iter().any(|l| l["webhook_id"] == manual_id.as_str()),
        "killed before its 1 s of processing ended"
    );
    let mut rx = Running::start(&setup, port, 0).await;
    rx.wait_for_id(&manual_id).await;

    // 5. Duplicates after the restart: replay all three events again.
    let before = successes(&db.pool).await;
    replay(&db.url, &["--endpoint", &url]).await;
    wait_for_successes(&db.pool, before + 3).await;

    // 6. One more event as a barrier: the receivers process in arrival
    //    order, so once it is processed, any duplicate stored by mistake
    //    would have been processed too.
    let barrier = enqueue(&db.pool, &url, &["barrier"]).await;
    let lines = rx.wait_for_id(&barrier[0].id.to_string()).await;
    stop_all(std::slice::from_mut(&mut worker)).await;

    // Every event processed exactly once, with the payload it was sent.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for line in &lines {
        assert_eq!(line["receiver"], kind.label(), "{line}");
        *seen.entry(line["webhook_id"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    let expected: HashSet<String> = events
        .iter()
        .chain(&barrier)
        .map(|e| e.id.to_string())
        .chain([manual_id.clone()])
        .collect();
    assert!(
        seen.values().all(|&n| n == 1),
        "each event processed exactly once despite the duplicates: {seen:?}"
    );
    assert_eq!(
        seen.keys().cloned().collect::<HashSet<_>>(),
        expected,
        "processed exactly the delivered events and the test's own"
    );
    for e in events.iter().chain(&barrier) {
        let line = lines.iter().find(|l| l["webhook_id"] == e.id.to_string()).unwrap();
        let payload = &line["payload"];
        assert_eq!(payload["conversation_id"], e.conversation_id.to_string());
        assert_eq!(payload["data"]["id"], e.message_id.to_string());
        assert_eq!(payload["data"]["content"], e.content);
    }
    let manual = lines.iter().find(|l| l["webhook_id"] == manual_id.as_str()).unwrap();
    assert_eq!(manual["payload"], manual_payload());

    // It answered before processing: every 2xx took less than the work.
    let slowest: i32 =
        sqlx::query_scalar("SELECT max(duration_ms) FROM postbox.attempts WHERE status_code BETWEEN 200 AND 299")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(
        slowest < PROCESS_DELAY_MS,
        "the slowest acknowledgment took {slowest} ms, as long as the processing ({PROCESS_DELAY_MS} ms)"
    );
    // Nothing is left pending in the outbox, and nothing failed.
    let not_delivered: i64 = sqlx::query_scalar("SELECT count(*) FROM postbox.outbox WHERE status <> 'delivered'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(not_delivered, 0);
    rx.kill();
    // Kept when a test fails (the logs are there); removed when it passes.
    let _ = std::fs::remove_dir_all(&setup.state);
}

/// Forged, tampered, stale, future and malformed requests get 400 or 401
/// and are never processed.
async fn refuses_bad_requests(http: &reqwest::Client, url: &str, id: &str, body: &[u8], rx: &Running) {
    let ts = now();
    let good = sign(SECRET, id, ts, body);
    let mut tampered = body.to_vec();
    tampered[body.len() / 2] ^= 0x01;
    let cases: Vec<(&str, String, String, Vec<u8>)> = vec![
        ("no signature", ts.to_string(), String::new(), body.to_vec()),
        (
            "signed with another secret",
            ts.to_string(),
            sign(OTHER_SECRET, id, ts, body),
            body.to_vec(),
        ),
        ("body changed after signing", ts.to_string(), good.clone(), tampered),
        (
            "forged signature",
            ts.to_string(),
            format!("v1,{}", B64.encode([7u8; 32])),
            body.to_vec(),
        ),
        (
            "stale timestamp (10 minutes old), correctly signed",
            (ts - 600).to_string(),
            sign(SECRET, id, ts - 600, body),
            body.to_vec(),
        ),
        (
            "timestamp 10 minutes ahead, correctly signed",
            (ts + 600).to_string(),
            sign(SECRET, id, ts + 600, body),
            body.to_vec(),
        ),
        ("timestamp not a number", "soon".to_owned(), good.clone(), body.to_vec()),
        (
            "signature header without a version",
            ts.to_string(),
            "garbage".to_owned(),
            body.to_vec(),
        ),
        (
            "signature that is not base64",
            ts.to_string(),
            "v1,%%%not-base64%%%".to_owned(),
            body.to_vec(),
        ),
        (
            "right signature under an unknown version",
            ts.to_string(),
            good.replacen("v1,", "v9,", 1),
            body.to_vec(),
        ),
    ];
    for (what, timestamp, signature, body) in cases {
        let status = post(http, url, id, &timestamp, &signature, &body).await;
        assert!(
            status == 400 || status == 401,
            "{what}: answered {status}, wanted 400 or 401\n{}",
            rx.logs()
        );
    }
}

/// One enqueued event.
#[derive(Debug, Clone)]
struct Event {
    id: Uuid,
    conversation_id: Uuid,
    message_id: Uuid,
    content: String,
}

/// Enqueues one event per content with `postbox.enqueue`, in one transaction.
async fn enqueue(pool: &PgPool, url: &str, contents: &[&str]) -> Vec<Event> {
    let mut tx = pool.begin().await.unwrap();
    let mut out = Vec::new();
    for content in contents {
        let (conversation_id, message_id) = (Uuid::new_v4(), Uuid::new_v4());
        let id: Uuid = sqlx::query_scalar(
            "SELECT postbox.enqueue($1, $2, jsonb_build_object(
                 'id', $3::uuid, 'content', $4::text, 'content_type', 'TEXT', 'type', 'USER_INPUT',
                 'channel', 'API', 'status', 'RECEIVED', 'created_by', 'user123', 'updated_by', 'user123',
                 'created_at', '2024-03-21T10:00:00Z', 'updated_at', '2024-03-21T10:00:00Z'))",
        )
        .bind(url)
        .bind(conversation_id)
        .bind(message_id)
        .bind(*content)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        out.push(Event {
            id,
            conversation_id,
            message_id,
            content: (*content).to_owned(),
        });
    }
    tx.commit().await.unwrap();
    out
}

const SUCCESSES: &str = "SELECT count(*) FROM postbox.attempts WHERE status_code BETWEEN 200 AND 299";

async fn successes(pool: &PgPool) -> i64 {
    sqlx::query_scalar(SUCCESSES).fetch_one(pool).await.unwrap()
}

/// Waits until at least `n` attempts were answered 2xx. (At least: a
/// replay may deliver an event more than once, which is what receivers
/// deduplicate.)
async fn wait_for_successes(pool: &PgPool, n: i64) {
    let start = Instant::now();
    loop {
        let got = successes(pool).await;
        if got >= n {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{got} of {n} successful attempts within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Each event's status codes, attempt by attempt.
async fn status_codes(pool: &PgPool) -> HashMap<Uuid, Vec<i32>> {
    let rows: Vec<(Uuid, Option<i32>)> =
        sqlx::query_as("SELECT outbox_id, status_code FROM postbox.attempts ORDER BY outbox_id, attempt")
            .fetch_all(pool)
            .await
            .unwrap();
    let mut out: HashMap<Uuid, Vec<i32>> = HashMap::new();
    for (id, code) in rows {
        out.entry(id).or_default().push(code.unwrap_or(0));
    }
    out
}

/// `postbox replay --status delivered ARGS`, the supported way to send
/// delivered events again.
async fn replay(db_url: &str, args: &[&str]) {
    let mut c = common::postbox(Some(db_url));
    c.args(["replay", "--status", "delivered"]).args(args);
    let out = common::run_async(c).await;
    assert!(
        out.status.success(),
        "postbox replay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The payload of the event this test signs itself: the guide's structure.
fn manual_payload() -> Value {
    json!({
        "conversation_id": "6f1c1c1e-3c1b-4a57-9d27-1f4a3c6b2d10",
        "data": {
            "channel": "API",
            "content": "signed by the test",
            "content_type": "TEXT",
            "created_at": "2024-03-21T10:00:00Z",
            "created_by": "user123",
            "id": "0b6a2f0e-8a51-4f3c-9a7e-2a1d5c4b3e21",
            "metadata": {},
            "status": "RECEIVED",
            "type": "USER_INPUT",
            "updated_at": "2024-03-21T10:00:00Z",
            "updated_by": "user123"
        },
        "timestamp": "2024-03-21T10:00:00.000Z"
    })
}

/// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, computed here
/// independently of postbox.
fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> String {
    let key = B64.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// POSTs a webhook by hand; an empty header value leaves the header out.
async fn post(http: &reqwest::Client, url: &str, id: &str, timestamp: &str, signature: &str, body: &[u8]) -> u16 {
    let mut req = http
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_vec());
    for (name, value) in [
        ("webhook-id", id),
        ("webhook-timestamp", timestamp),
        ("webhook-signature", signature),
    ] {
        if !value.is_empty() {
            req = req.header(name, value);
        }
    }
    req.send().await.expect("the receiver answers").status().as_u16()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What a receiver needs before it can start: installed packages or
/// compiled classes, and a state directory of its own.
struct Setup {
    kind: Kind,
    state: PathBuf,
    /// PYTHONPATH for the Python receivers.
    python_path: Option<PathBuf>,
    /// Compiled classes for the Java receiver.
    classes: Option<PathBuf>,
}

impl Setup {
    fn prepare(kind: Kind) -> Setup {
        let state = Path::new(env!("CARGO_TARGET_TMPDIR")).join("receivers").join(format!(
            "{}-{}",
            kind.label(),
            Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&state).unwrap();
        let mut setup = Setup {
            kind,
            state,
            python_path: None,
            classes: None,
        };
        match kind {
            Kind::Django | Kind::FastApi | Kind::Flask => setup.python_path = Some(python_packages()),
            Kind::Express => node_modules(),
            Kind::Java => setup.classes = Some(compile_java(&setup.state)),
            Kind::Php => check_php(),
        }
        setup
    }
}

/// A started receiver: its processes, killed when it is dropped, and their
/// log, printed when a test fails.
struct Running {
    procs: Vec<Child>,
    log: PathBuf,
    output: PathBuf,
}

impl Running {
    async fn start(setup: &Setup, port: u16, fail_first: u32) -> Running {
        let log = setup.state.join("receiver.log");
        let output = setup.state.join("processed.jsonl");
        let store = setup.state.join("store");
        let dir = setup.kind.dir();
        let command = |program: &str, args: &[&str]| {
            let mut c = Command::new(program);
            c.args(args)
                .current_dir(&dir)
                .env("WEBHOOK_SECRET", SECRET)
                .env("HOST", "127.0.0.1")
                .env("PORT", port.to_string())
                .env("RECEIVER_STATE_DIR", &store)
                .env("RECEIVER_OUTPUT", &output)
                .env("RECEIVER_FAIL_FIRST", fail_first.to_string())
                .env("RECEIVER_PROCESS_DELAY_MS", PROCESS_DELAY_MS.to_string())
                .env("PYTHONUNBUFFERED", "1")
                .env("PYTHONDONTWRITEBYTECODE", "1")
                .env_remove("DJANGO_SETTINGS_MODULE")
                .stdin(Stdio::null());
            if let Some(p) = &setup.python_path {
                c.env("PYTHONPATH", p);
            }
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .unwrap();
            c.stdout(f.try_clone().unwrap()).stderr(f);
            c
        };
        let port_s = port.to_string();
        let bind = format!("127.0.0.1:{port}");
        let mut procs = Vec::new();
        let mut server = match setup.kind {
            Kind::Django => {
                let migrate = command("python3", &["manage.py", "migrate", "--noinput"])
                    .status()
                    .unwrap();
                assert!(migrate.success(), "manage.py migrate failed\n{}", read(&log));
                command("python3", &["manage.py", "runserver", "--noreload", &bind])
            }
            Kind::FastApi => command(
                "python3",
                &["-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", &port_s],
            ),
            Kind::Flask => command("python3", &["app.py"]),
            Kind::Express => command("node", &["server.js"]),
            Kind::Java => {
                let cp = setup.classes.as_ref().unwrap().to_str().unwrap().to_owned();
                command("java", &["-cp", &cp, "com.example.webhooks.plain.PlainJavaReceiver"])
            }
            Kind::Php => command("php", &["-S", &bind, "public/index.php"]),
        };
        procs.push(server.spawn().expect("start the receiver"));
        let mut running = Running {
            procs,
            log: log.clone(),
            output: output.clone(),
        };
        running.wait_ready(port).await;
        if setup.kind == Kind::Php {
            // The processor is a process of its own in PHP.
            running
                .procs
                .push(command("php", &["worker.php"]).spawn().expect("start worker.php"));
        }
        running
    }

    async fn wait_ready(&mut self, port: u16) {
        let start = Instant::now();
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return;
            }
            if let Some(status) = self.procs[0].try_wait().unwrap() {
                panic!("the receiver exited with {status}\n{}", self.logs());
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the receiver did not listen within 60 s\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The processed events so far, one JSON object per line.
    fn lines(&self) -> Vec<Value> {
        match std::fs::read_to_string(&self.output) {
            Ok(text) => text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Waits until at least `n` events were processed.
    async fn wait_for_lines(&self, n: usize) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let lines = self.lines();
            if lines.len() >= n {
                return lines;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{} of {n} events processed within 30 s\n{}",
                lines.len(),
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the event `id` was processed; returns every line so far.
    async fn wait_for_id(&self, id: &str) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let lines = self.lines();
            if lines.iter().any(|l| l["webhook_id"] == id) {
                return lines;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{id} not processed within 30 s\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn logs(&self) -> String {
        format!("--- receiver log ---\n{}--- end of log ---", read(&self.log))
    }

    fn kill(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        self.procs.clear();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let _ = writeln!(std::io::stderr(), "{}", self.logs());
        }
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn run_ok(c: &mut Command, what: &str) {
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

/// A directory under the target dir holding the Python receivers' packages
/// (Django, FastAPI, uvicorn, Flask, standardwebhooks) as their
/// requirements.txt files pin them, installed from PyPI when missing. Its
/// name carries a hash of those files, so a change reinstalls.
fn python_packages() -> PathBuf {
    let requirements: Vec<PathBuf> = ["django", "fastapi", "flask"]
        .iter()
        .map(|d| Path::new(EXAMPLES).join(d).join("requirements.txt"))
        .collect();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for r in &requirements {
        std::fs::read(r).unwrap().hash(&mut h);
    }
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let dir = base.join(format!("receivers-pydeps-{:016x}", h.finish()));
    let installed = |dir: &Path| {
        let check = "import sys, django, fastapi, uvicorn, flask, standardwebhooks\n\
                     mods = (django, fastapi, uvicorn, flask, standardwebhooks)\n\
                     sys.exit(0 if all(m.__file__.startswith(sys.argv[1]) for m in mods) else 1)";
        Command::new("python3")
            .args(["-c", check, dir.to_str().unwrap()])
            .env("PYTHONPATH", dir)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if installed(&dir) {
        return dir;
    }
    // Several tests may get here at once: one installs, the others wait.
    let _lock = FileLock::acquire(&dir.with_extension("lock"));
    if !installed(&dir) {
        let tmp = dir.with_extension("partial");
        let _ = std::fs::remove_dir_all(&tmp);
        let mut pip = Command::new("python3");
        pip.args(["-m", "pip", "install", "-q", "--disable-pip-version-check", "--target"])
            .arg(&tmp);
        for r in &requirements {
            pip.arg("-r").arg(r);
        }
        run_ok(&mut pip, "pip install of the Python receivers' requirements");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir).unwrap();
        assert!(installed(&dir), "the packages installed into {dir:?} do not import");
    }
    dir
}

/// `npm ci` in examples/receivers/express when its packages are missing.
fn node_modules() {
    let dir = Kind::Express.dir();
    let present = || {
        Command::new("node")
            .args(["-e", "require.resolve('express'); require.resolve('standardwebhooks')"])
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !present() {
        run_ok(
            Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(&dir),
            "npm ci in examples/receivers/express",
        );
        assert!(present(), "express and standardwebhooks resolve after npm ci");
    }
}

/// Compiles the JDK-only classes of the Spring Boot example (verifier,
/// inbox, processor, plain-Java server) with javac.
fn compile_java(state: &Path) -> PathBuf {
    let src = Kind::Java.dir().join("src/main/java/com/example/webhooks");
    let mut files = Vec::new();
    for dir in [src.clone(), src.join("plain")] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "java") {
                files.push(path);
            }
        }
    }
    let out = state.join("classes");
    run_ok(
        Command::new("javac")
            .args(["--release", "17", "-Xlint:all", "-Werror", "-d"])
            .arg(&out)
            .args(&files),
        "javac (needs a JDK 17: apt-get install openjdk-17-jdk-headless)",
    );
    out
}

fn check_php() {
    run_ok(
        Command::new("php").args(["-r", "exit(extension_loaded('pdo_sqlite') ? 0 : 1);"]),
        "php with pdo_sqlite (apt-get install php-cli php-sqlite3)",
    );
}

/// A lock file created exclusively; removed on drop. A lock left behind by
/// a killed run is taken over after ten minutes.
struct FileLock(PathBuf);

impl FileLock {
    fn acquire(path: &Path) -> FileLock {
        let start = Instant::now();
        loop {
            match std::fs::OpenOptions::new().write(true).create_new(true).open(path) {
                Ok(_) => return FileLock(path.to_owned()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let stale = std::fs::metadata(path)
                        .and_then(|m| m.modified())
                        .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(600));
                    if stale {
                        let _ = std::fs::remove_file(path);
                    }
                    assert!(start.elapsed() < Duration::from_secs(900), "{path:?} stays locked");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("lock {path:?}: {e}"),
            }
        }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
