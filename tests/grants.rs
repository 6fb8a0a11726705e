//! `sql/grants.sql` against real, non-superuser roles: the application role
//! can enqueue and nothing more, the worker role can deliver, record,
//! release and prune but not migrate, and the operator role can run the
//! admin commands.
//!
//! Roles are cluster-wide: each test names its roles after its own database
//! (unique per test) and drops them when it ends.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use postbox::delivery::Secrets;
use postbox::WorkerConfig;
use sqlx::{Connection, PgPool};
use uuid::Uuid;

/// The signature of postbox.enqueue, as `ALTER FUNCTION` and `GRANT` name it.
const ENQUEUE: &str = "postbox.enqueue(text, uuid, jsonb, text)";

/// The three roles of `sql/grants.sql`, created for one test database.
struct Roles {
    app: String,
    worker: String,
    operator: String,
    /// The test database, as the superuser.
    db_url: String,
}

impl Roles {
    /// Creates the roles (LOGIN, no other attribute) and applies
    /// `sql/grants.sql` to them as the owner of the schema.
    async fn create(db: &TestDb) -> Roles {
        let roles = Roles {
            app: format!("{}_app", db.name),
            worker: format!("{}_worker", db.name),
            operator: format!("{}_operator", db.name),
            db_url: db.url.clone(),
        };
        let mut admin = sqlx::PgConnection::connect(&base_url()).await.unwrap();
        drop_stale_roles(&mut admin).await;
        for role in roles.all() {
            sqlx::query(&format!("CREATE ROLE {role} LOGIN"))
                .execute(&mut admin)
                .await
                .unwrap();
        }
        admin.close().await.ok();
        let out = grants_sql(
            &db.url,
            &[
                ("app_role", &roles.app),
                ("worker_role", &roles.worker),
                ("operator_role", &roles.operator),
            ],
        );
        assert!(
            out.status.success(),
            "sql/grants.sql failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        roles
    }

    fn all(&self) -> [&str; 3] {
        [&self.app, &self.worker, &self.operator]
    }

    /// The test database's URL for `role`.
    fn url(&self, role: &str) -> String {
        let mut u = reqwest::Url::parse(&self.db_url).unwrap();
        u.set_username(role).unwrap();
        u.set_password(None).unwrap();
        u.to_string()
    }

    async fn pool(&self, role: &str) -> PgPool {
        pool(&self.url(role), 4).await
    }
}

impl Drop for Roles {
    fn drop(&mut self) {
        // Drop cannot await: a thread of its own, as TestDb does.
        let base = base_url();
        let db_url = self.db_url.clone();
        let names: Vec<String> = self.all().iter().map(|r| r.to_string()).collect();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let list = names.join(", ");
                if let Ok(mut c) = sqlx::PgConnection::connect(&base).await {
                    let _ =
                        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ANY($1)")
                            .bind(&names)
                            .execute(&mut c)
                            .await;
                }
                // Privileges in the test database keep a role from being dropped.
                if let Ok(mut c) = sqlx::PgConnection::connect(&db_url).await {
                    let _ = sqlx::query(&format!("DROP OWNED BY {list}")).execute(&mut c).await;
                }
                if let Ok(mut c) = sqlx::PgConnection::connect(&base).await {
                    let _ = sqlx::query(&format!("DROP ROLE IF EXISTS {list}"))
                        .execute(&mut c)
                        .await;
                }
            });
        })
        .join()
        .ok();
    }
}

/// Roles left behind by a test run that was killed: their database is gone.
async fn drop_stale_roles(admin: &mut sqlx::PgConnection) {
    let stale: Vec<String> = sqlx::query_scalar(
        "SELECT r.rolname FROM pg_roles r
         WHERE r.rolname ~ '^postbox_test_[0-9a-f]{32}_(app|worker|operator)$'
           AND NOT EXISTS (SELECT 1 FROM pg_database d WHERE d.datname = left(r.rolname, 45))",
    )
    .fetch_all(&mut *admin)
    .await
    .unwrap_or_default();
    for role in stale {
        let _ = sqlx::query(&format!("DROP ROLE IF EXISTS {role}"))
            .execute(&mut *admin)
            .await;
    }
}

/// psql from PATH, or from the PostgreSQL installation the tests use.
fn psql() -> PathBuf {
    if Command::new("psql")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return PathBuf::from("psql");
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin/psql"))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop().expect("psql is installed (PostgreSQL's client)")
}

/// Runs `sql/grants.sql` with psql variables, as the superuser of `db_url`.
fn grants_sql(db_url: &str, vars: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new(psql());
    c.arg("-X").arg("-q").arg("-d").arg(db_url);
    for (k, v) in vars {
        c.arg("-v").arg(format!("{k}={v}"));
    }
    c.arg("-f")
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sql/grants.sql"));
    c.output().expect("run psql")
}

/// `sql` is refused for lack of privilege (SQLSTATE 42501), not for any other reason.
async fn denied(pool: &PgPool, sql: &str) {
    match sqlx::query(sql).execute(pool).await {
        Ok(_) => panic!("allowed, but should be refused: {sql}"),
        Err(e) => {
            let code = e.as_database_error().and_then(|d| d.code()).map(|c| c.into_owned());
            assert_eq!(code.as_deref(), Some("42501"), "{sql}: {e}");
        }
    }
}

async fn allowed(pool: &PgPool, sql: &str) {
    if let Err(e) = sqlx::query(sql).execute(pool).await {
        panic!("refused, but should be allowed: {sql}: {e}");
    }
}

async fn enqueue_is_definer(pool: &PgPool) -> bool {
    sqlx::query_scalar(&format!(
        "SELECT prosecdef FROM pg_proc WHERE oid = '{ENQUEUE}'::regprocedure"
    ))
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Enqueues one event per URL as `pool`'s role, in one transaction; returns the ids.
async fn enqueue_as(pool: &PgPool, urls: &[(&str, Option<&str>)]) -> Vec<Uuid> {
    let mut tx = pool.begin().await.unwrap();
    let mut ids = Vec::new();
    for (i, (url, key)) in urls.iter().enumerate() {
        let mut e = event(&format!("message {i}"));
        e.ordering_key = key.map(str::to_owned);
        ids.push(postbox::enqueue(&mut tx, url, &e).await.unwrap());
    }
    tx.commit().await.unwrap();
    ids
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// A valid call of postbox.enqueue in SQL.
fn enqueue_call(url: &str) -> String {
    format!(
        "SELECT postbox.enqueue('{url}', gen_random_uuid(), jsonb_build_object(
             'id', gen_random_uuid(), 'content', 'hi', 'content_type', 'TEXT', 'type', 'USER_INPUT',
             'channel', 'API', 'status', 'RECEIVED', 'created_by', 'u', 'updated_by', 'u',
             'created_at', '2024-03-21T10:00:00Z', 'updated_at', '2024-03-21T10:00:00Z'))"
    )
}

/// A plain INSERT of exactly the columns postbox.enqueue writes.
fn direct_insert(endpoint_id: i64) -> String {
    format!(
        "INSERT INTO postbox.outbox (id, conversation_id, message_id, endpoint_id, payload)
         VALUES (gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), {endpoint_id}, '{{}}')"
    )
}

/// The app role enqueues in its own transaction (and a rollback leaves
/// nothing), but cannot read secrets or events, change or delete events,
/// forge a worker's columns, or reach the dispatch functions.
#[tokio::test]
async fn app_role_enqueues_and_nothing_else() {
    let db = TestDb::new().await;
    let roles = Roles::create(&db).await;
    let app = roles.pool(&roles.app).await;

    let ids = enqueue_as(
        &app,
        &[("https://a.example/hook", None), ("https://b.example/hook", Some("k"))],
    )
    .await;
    let rows: Vec<(Uuid, String, serde_json::Value)> =
        sqlx::query_as("SELECT id, status, payload FROM postbox.outbox ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), ids);
    assert!(rows.iter().all(|r| r.1 == "pending"));
    assert_eq!(rows[0].2["data"]["content"], "message 0");
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM postbox.endpoint_state").await,
        2,
        "each new endpoint got its state row"
    );

    // Rolled back: nothing written.
    let mut tx = app.begin().await.unwrap();
    postbox::enqueue(&mut tx, "https://c.example/hook", &event("never"))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(count(&db.pool, "SELECT count(*) FROM postbox.outbox").await, 2);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM postbox.endpoints").await, 2);

    // Validation still names the field.
    let mut conn = app.acquire().await.unwrap();
    let err = postbox::enqueue_json(
        &mut conn,
        "https://a.example/hook",
        Uuid::now_v7(),
        &serde_json::json!({"id": Uuid::now_v7(), "content": "x"}),
        None,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, postbox::EnqueueError::Invalid { field, .. } if field.starts_with("data.")),
        "{err}"
    );
    drop(conn);

    sqlx::query("UPDATE postbox.endpoints SET secret = $1")
        .bind(SECRET)
        .execute(&db.pool)
        .await
        .unwrap();
    for sql in [
        "SELECT secret FROM postbox.endpoints",
        "SELECT * FROM postbox.endpoints",
        "SELECT payload FROM postbox.outbox",
        "SELECT count(*) FROM postbox.outbox",
        "SELECT * FROM postbox.attempts",
        "SELECT * FROM postbox.endpoint_state",
        "SELECT * FROM postbox.backlog",
        "SELECT * FROM postbox.pending_events",
        "SELECT * FROM postbox.event_story(gen_random_uuid())",
        "UPDATE postbox.outbox SET status = 'delivered'",
        "UPDATE postbox.outbox SET payload = '{}'",
        "DELETE FROM postbox.outbox",
        "TRUNCATE postbox.outbox",
        "UPDATE postbox.endpoints SET secret = NULL",
        "UPDATE postbox.endpoints SET disabled_at = now()",
        "DELETE FROM postbox.endpoints",
        "UPDATE postbox.endpoint_state SET paused_until = now() + interval '1 hour'",
        "DELETE FROM postbox.sleeping_workers",
        "SELECT * FROM postbox.claim('intruder', 10, 60000)",
        "SELECT postbox.prune(interval '0', interval '0', 100)",
        "SELECT postbox.release('intruder', '{}', '{}')",
        "SELECT postbox.has_due()",
        "CREATE TABLE postbox.mine (a int)",
    ] {
        denied(&app, sql).await;
    }
    // The worker's columns cannot be forged by an INSERT either.
    for (col, val) in [
        ("status", "'delivered'"),
        ("attempts", "4"),
        ("locked_by", "'me'"),
        ("next_attempt_at", "now()"),
        ("max_attempts", "100"),
    ] {
        denied(
            &app,
            &format!(
                "INSERT INTO postbox.outbox (id, conversation_id, message_id, endpoint_id, payload, {col})
                 VALUES (gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), 1, '{{}}', {val})"
            ),
        )
        .await;
    }
    denied(
        &app,
        "INSERT INTO postbox.attempts (outbox_id, attempt, worker_id, started_at, duration_ms)
         SELECT gen_random_uuid(), 1, 'x', now(), 1",
    )
    .await;

    // A plain INSERT of exactly the columns enqueue writes: refused only
    // where enqueue is SECURITY DEFINER (see sql/grants.sql and the test
    // below). With the invoker-rights enqueue of migration 0001 the app role
    // needs those column privileges, and this is the one thing it can do
    // beyond enqueue.
    if enqueue_is_definer(&db.pool).await {
        denied(&app, &direct_insert(1)).await;
    } else {
        allowed(&app, &direct_insert(1)).await;
    }
    drop(roles);
}

/// With postbox.enqueue SECURITY DEFINER (owned by the schema owner, with a
/// fixed search_path, EXECUTE revoked from PUBLIC), `sql/grants.sql` gives
/// the app role EXECUTE on enqueue and no table privilege: enqueue still
/// validates, creates endpoints, honours ordering keys and the session's
/// `postbox.allow_http`, and a direct INSERT is refused.
#[tokio::test]
async fn definer_enqueue_needs_no_table_privilege() {
    let db = TestDb::new().await;
    // The change a migration would make (applied here as the owner).
    for sql in [
        format!("ALTER FUNCTION {ENQUEUE} SECURITY DEFINER SET search_path = pg_catalog, pg_temp"),
        format!("REVOKE EXECUTE ON FUNCTION {ENQUEUE} FROM PUBLIC"),
    ] {
        sqlx::query(&sql).execute(&db.pool).await.unwrap();
    }
    let roles = Roles::create(&db).await;
    let app = roles.pool(&roles.app).await;

    let table_privileges: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_class c
         WHERE c.relnamespace = 'postbox'::regnamespace AND c.relkind IN ('r', 'p', 'v')
           AND (has_any_column_privilege($1, c.oid, 'SELECT, INSERT, UPDATE, REFERENCES')
                OR has_table_privilege($1, c.oid, 'DELETE, TRUNCATE, TRIGGER'))",
    )
    .bind(&roles.app)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(table_privileges, 0, "the app role holds no table privilege");

    let ids = enqueue_as(
        &app,
        &[
            ("https://a.example/hook", Some("k")),
            ("https://a.example/hook", Some("k")),
            ("https://new.example/hook", None),
        ],
    )
    .await;
    let got: Vec<(Uuid, Option<String>)> = sqlx::query_as("SELECT id, ordering_key FROM postbox.outbox ORDER BY seq")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), ids);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM postbox.endpoint_state").await, 2);

    // Validation runs as before and names the field.
    let mut conn = app.acquire().await.unwrap();
    let err = postbox::enqueue_json(
        &mut conn,
        "https://a.example/hook",
        Uuid::now_v7(),
        &serde_json::json!({"id": "not-a-uuid"}),
        None,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, postbox::EnqueueError::Invalid { field, .. } if field == "data.id"),
        "{err}"
    );
    // The caller's setting decides about http:// (the database sets it on here).
    sqlx::query("SET postbox.allow_http = off")
        .execute(&mut *conn)
        .await
        .unwrap();
    let err = postbox::enqueue(&mut conn, "http://a.example/hook", &event("x"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, postbox::EnqueueError::Invalid { field, .. } if field == "callback_url"),
        "{err}"
    );
    drop(conn);

    denied(&app, &direct_insert(1)).await;
    denied(&app, "SELECT id, url FROM postbox.endpoints").await;
    denied(&app, "SELECT secret FROM postbox.endpoints").await;
    // A role with USAGE but no grant on enqueue (the worker) cannot enqueue.
    let worker = roles.pool(&roles.worker).await;
    denied(&worker, &enqueue_call("https://a.example/hook")).await;
    drop(roles);
}

/// A real worker connected as the worker role delivers signed webhooks
/// (ordering keys included), records a retry and a 410 Gone, registers as
/// sleeping, releases an unfinished delivery at shutdown and prunes old
/// events; it cannot change payloads, insert events, read past its grants or
/// create anything.
#[tokio::test]
async fn worker_role_delivers_records_releases_and_prunes() {
    let db = TestDb::new().await;
    let roles = Roles::create(&db).await;
    let app = roles.pool(&roles.app).await;
    let worker = roles.pool(&roles.worker).await;

    let ok = Receiver::ok().await;
    let gone = Receiver::start(Arc::new(|_, _| Reply::status(410))).await;
    let flaky = Receiver::start(Arc::new(|n, _| Reply::status(if n == 1 { 500 } else { 200 }))).await;
    // The first request hangs (a delivery cut short by shutdown), then 200.
    let slow = Receiver::start(Arc::new(|n, _| {
        if n == 1 {
            Reply::status(200).delay(Duration::from_secs(30))
        } else {
            Reply::status(200)
        }
    }))
    .await;

    let cfg = || WorkerConfig {
        worker_id: format!("w-{}", Uuid::new_v4().simple()),
        retention: None,
        ..config()
    };

    // 1. Drain: claims, outcomes, ordering keys, 410 Gone, has_due.
    let first = enqueue_as(
        &app,
        &[
            (&ok.url, Some("conv")),
            (&ok.url, Some("conv")),
            (&ok.url, None),
            (&gone.url, None),
        ],
    )
    .await;
    let c = cfg();
    let id = c.worker_id.clone();
    let stats = drain(&worker, c).await;
    assert_eq!(stats.delivered, 3, "{stats:?}");
    let secrets = Secrets::parse(SECRET).unwrap();
    let hits = ok.hits();
    assert_eq!(hits.len(), 3);
    for h in &hits {
        let ts: i64 = h.header("webhook-timestamp").parse().unwrap();
        assert!(
            secrets.verify(h.header("webhook-id"), ts, &h.body, h.header("webhook-signature")),
            "signature verifies"
        );
    }
    let order: Vec<Uuid> = hits.iter().map(Hit::id).filter(|i| first[..2].contains(i)).collect();
    assert_eq!(order, first[..2], "one ordering key, in commit order");
    for i in &first[..3] {
        assert_eq!(row(&db.pool, *i).await.0, "delivered");
    }
    let (status, disabled): (String, Option<String>) = sqlx::query_as(
        "SELECT o.status, e.disabled_reason FROM postbox.outbox o JOIN postbox.endpoints e ON e.id = o.endpoint_id
         WHERE o.id = $1",
    )
    .bind(first[3])
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((status.as_str(), disabled.as_deref()), ("pending", Some("410 Gone")));
    assert_eq!(
        count(
            &db.pool,
            &format!("SELECT count(*) FROM postbox.attempts WHERE worker_id = '{id}'")
        )
        .await,
        4,
        "every attempt logged by the worker role"
    );

    // 2. A running worker: a retry after a 500, the sleeping_workers
    //    registration, a wake-up by NOTIFY.
    let c = cfg();
    let id = c.worker_id.clone();
    let (stop, handle) = spawn_worker(&worker, c);
    let retried = enqueue_as(&app, &[(&flaky.url, None)]).await[0];
    wait_until(
        &db.pool,
        &format!("SELECT count(*) FROM postbox.outbox WHERE id = '{retried}' AND status = 'delivered'"),
        1,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(attempts_of(&db.pool, retried).await.len(), 2, "a 500, then a 200");
    wait_until(
        &db.pool,
        &format!("SELECT count(*) FROM postbox.sleeping_workers WHERE worker_id = '{id}'"),
        1,
        Duration::from_secs(10),
    )
    .await;
    stop.send(()).unwrap();
    handle.await.unwrap();
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM postbox.sleeping_workers").await,
        0,
        "a stopping worker unregisters"
    );

    // 3. Shutdown with a delivery in flight: its lease is released.
    let c = WorkerConfig {
        shutdown_grace: Duration::from_millis(300),
        ..cfg()
    };
    let (stop, handle) = spawn_worker(&worker, c);
    let cut = enqueue_as(&app, &[(&slow.url, None)]).await[0];
    slow.wait_for(1, Duration::from_secs(20)).await;
    stop.send(()).unwrap();
    handle.await.unwrap();
    let (status, attempts, locked_by): (String, i32, Option<String>) =
        sqlx::query_as("SELECT status, attempts, locked_by FROM postbox.outbox WHERE id = $1")
            .bind(cut)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), attempts, locked_by), ("pending", 0, None), "released");

    // 4. Retention: the released event is delivered, then every delivered
    //    event is pruned with its attempts; the 410 endpoint's event stays.
    let c = WorkerConfig {
        retention: Some(Duration::from_millis(1)),
        retention_interval: Duration::from_millis(100),
        ..cfg()
    };
    let (stop, handle) = spawn_worker(&worker, c);
    slow.wait_for(2, Duration::from_secs(20)).await;
    // Only the held event is left.
    wait_until(
        &db.pool,
        "SELECT count(*) FROM postbox.outbox",
        1,
        Duration::from_secs(20),
    )
    .await;
    stop.send(()).unwrap();
    handle.await.unwrap();
    assert_eq!(row(&db.pool, first[3]).await.0, "pending");
    assert_eq!(
        count(
            &db.pool,
            &format!(
                "SELECT count(*) FROM postbox.attempts WHERE outbox_id <> '{}'",
                first[3]
            )
        )
        .await,
        0,
        "pruned events took their attempts with them"
    );

    // What the worker role may not do.
    for sql in [
        "UPDATE postbox.outbox SET payload = '{}'",
        "UPDATE postbox.outbox SET endpoint_id = 1",
        "UPDATE postbox.endpoints SET secret = NULL",
        "UPDATE postbox.endpoints SET url = 'https://elsewhere.example/'",
        "DELETE FROM postbox.endpoints",
        "DELETE FROM postbox.attempts",
        "TRUNCATE postbox.outbox",
        "INSERT INTO postbox.endpoints (url) VALUES ('https://x.example/')",
        "INSERT INTO postbox.schema_migrations (version, description) VALUES (99, 'x')",
        "CREATE TABLE postbox.mine (a int)",
        "ALTER TABLE postbox.outbox SET (fillfactor = 50)",
        "DROP VIEW postbox.backlog",
        "SELECT * FROM postbox.backlog",
    ] {
        denied(&worker, sql).await;
    }
    denied(&worker, &direct_insert(1)).await;
    denied(&worker, &enqueue_call(&ok.url)).await;
    drop(roles);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `postbox worker` runs as the worker role and its /healthz and /readyz
/// answer; when a migration is due, /readyz says so and `postbox migrate`
/// as the worker role is refused and applies nothing.
#[tokio::test]
async fn worker_role_runs_the_binary_but_cannot_migrate() {
    let db = TestDb::new().await;
    let roles = Roles::create(&db).await;
    let app = roles.pool(&roles.app).await;
    let worker_url = roles.url(&roles.worker);
    let ok = Receiver::ok().await;

    let addr = format!("127.0.0.1:{}", free_port());
    let mut proc = spawn_worker_process(&worker_url, &[("POSTBOX_METRICS_ADDR", &addr)]);
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let get = |path: &'static str| {
        let req = http.get(format!("http://{addr}{path}"));
        async move {
            let r = req.send().await?;
            let status = r.status().as_u16();
            Ok::<_, reqwest::Error>((status, r.text().await?))
        }
    };
    let mut health = None;
    for _ in 0..200 {
        if let Ok(r) = get("/healthz").await {
            health = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(health, Some((200, "ok\n".to_owned())));
    assert_eq!(get("/readyz").await.unwrap(), (200, "ready\n".to_owned()));

    let id = enqueue_as(&app, &[(&ok.url, None)]).await[0];
    let hit = &ok.wait_for(1, Duration::from_secs(20)).await[0];
    assert_eq!(hit.id(), id);

    // A migration is due (as after installing a newer binary).
    let latest = postbox::migrate::latest_version();
    sqlx::query("DELETE FROM postbox.schema_migrations WHERE version = $1")
        .bind(latest)
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        get("/readyz").await.unwrap(),
        (503, "database not migrated\n".to_owned())
    );
    let mut migrate = postbox(Some(&worker_url));
    migrate.arg("migrate");
    let out = run_async(migrate).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // Refused for want of a right: a missing grant, or ownership (which
    // ALTER TABLE needs), depending on what the latest migration does first.
    assert!(
        stderr.contains("permission denied") || stderr.contains("must be owner"),
        "{stderr}"
    );
    assert_eq!(
        count(
            &db.pool,
            &format!("SELECT count(*) FROM postbox.schema_migrations WHERE version = {latest}")
        )
        .await,
        0,
        "nothing applied"
    );
    sqlx::query("INSERT INTO postbox.schema_migrations (version, description) VALUES ($1, 'restored')")
        .bind(latest)
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(get("/readyz").await.unwrap(), (200, "ready\n".to_owned()));

    signal(&proc, "TERM");
    assert!(wait_exit(&mut proc, Duration::from_secs(30)).await.success());
    drop(roles);
}

/// The operator role runs `postbox status`, `endpoint list|disable|enable|set`
/// and `replay`, reads every view, cancels an event with SQL; it cannot
/// insert or delete events or rewrite payloads.
#[tokio::test]
async fn operator_role_runs_the_admin_commands() {
    let db = TestDb::new().await;
    let roles = Roles::create(&db).await;
    let app = roles.pool(&roles.app).await;
    let op = roles.pool(&roles.operator).await;
    let op_url = roles.url(&roles.operator);
    let url = "https://customer.example/hook";
    let ids = enqueue_as(&app, &[(url, Some("k")), (url, Some("k")), (url, None)]).await;
    sqlx::query("UPDATE postbox.outbox SET status = 'failed', attempts = 4 WHERE id = $1")
        .bind(ids[2])
        .execute(&db.pool)
        .await
        .unwrap();

    let cli = |args: &[&str]| {
        let mut c = postbox(Some(&op_url));
        c.args(args);
        run_async(c)
    };
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["endpoint", "list"],
        &["endpoint", "disable", url],
        &["endpoint", "enable", url],
        &[
            "endpoint",
            "set",
            url,
            "--max-in-flight",
            "5",
            "--rate-per-minute",
            "unlimited",
        ],
        &["endpoint", "set", url, "--secret", SECRET],
        &["replay", "--status", "failed"],
    ] {
        let out = cli(args).await;
        assert!(
            out.status.success(),
            "postbox {args:?} as the operator role:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (mif, rate, secret, disabled): (i32, Option<i32>, Option<String>, Option<String>) =
        sqlx::query_as("SELECT max_in_flight, rate_per_minute, secret, disabled_reason FROM postbox.endpoints")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((mif, rate, secret.as_deref(), disabled), (5, None, Some(SECRET), None));
    assert_eq!(row(&db.pool, ids[2]).await.0, "pending", "replayed");

    for sql in [
        "SELECT * FROM postbox.backlog",
        "SELECT * FROM postbox.pending_events",
        "SELECT * FROM postbox.endpoint_health",
        "SELECT * FROM postbox.failures",
        "SELECT * FROM postbox.attempts",
        "SELECT secret FROM postbox.endpoints",
    ] {
        allowed(&op, sql).await;
    }
    let story: i64 = sqlx::query_scalar("SELECT count(*) FROM postbox.event_story($1)")
        .bind(ids[0])
        .fetch_one(&op)
        .await
        .unwrap();
    assert_eq!(story, 1);
    // Cancelling the head of a key runs the key_head_done trigger as the operator.
    sqlx::query("UPDATE postbox.outbox SET status = 'cancelled' WHERE id = $1")
        .bind(ids[0])
        .execute(&op)
        .await
        .unwrap();
    assert_eq!(row(&db.pool, ids[0]).await.0, "cancelled");

    for sql in [
        "DELETE FROM postbox.outbox",
        "UPDATE postbox.outbox SET payload = '{}'",
        "TRUNCATE postbox.attempts",
        "INSERT INTO postbox.endpoints (url) VALUES ('https://x.example/')",
        "CREATE TABLE postbox.mine (a int)",
    ] {
        denied(&op, sql).await;
    }
    denied(&op, &direct_insert(1)).await;
    drop(roles);
}

/// Without any role variable, `sql/grants.sql` stops with its usage and an
/// error exit, granting nothing.
#[tokio::test]
async fn grants_sql_needs_a_role() {
    let db = TestDb::new().await;
    let out = grants_sql(&db.url, &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage: psql -v app_role="));
}
