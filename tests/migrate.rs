//! Migrations: schema `postbox` only, idempotent, concurrent, coexisting with the application's own.

mod common;

use common::TestDb;

async fn versions(pool: &sqlx::PgPool) -> Vec<i64> {
    sqlx::query_scalar("SELECT version FROM postbox.schema_migrations ORDER BY version")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Running migrate again applies nothing and changes nothing.
#[tokio::test]
async fn migrate_is_idempotent() {
    let db = TestDb::empty().await;
    let first = postbox::migrate(&db.pool).await.unwrap();
    let all: Vec<i64> = postbox::migrate::MIGRATIONS.iter().map(|m| m.version()).collect();
    assert_eq!(first, all);
    assert!(postbox::migrate(&db.pool).await.unwrap().is_empty());
    assert_eq!(versions(&db.pool).await, all);
    assert!(postbox::migrate::is_current(&db.pool).await.unwrap());
}

/// Several processes migrating at once all succeed, and the migration is applied once.
#[tokio::test]
async fn concurrent_migrations_all_succeed() {
    let db = TestDb::empty().await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let url = db.url.clone();
        tasks.push(tokio::spawn(async move {
            let pool = common::pool(&url, 1).await;
            postbox::migrate(&pool).await
        }));
    }
    let mut applied = 0;
    for t in tasks {
        applied += t.await.unwrap().expect("every concurrent migrate succeeds").len();
    }
    assert_eq!(
        applied,
        postbox::migrate::MIGRATIONS.len(),
        "each migration applied exactly once"
    );
    assert_eq!(versions(&db.pool).await.len(), postbox::migrate::MIGRATIONS.len());
}

/// An application's own sqlx migrations (public._sqlx_migrations) are untouched, and nothing lands in public.
#[tokio::test]
async fn coexists_with_the_applications_migrations() {
    let db = TestDb::empty().await;
    let dir = std::env::temp_dir().join(format!("app-migrations-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("20240101000000_messages.sql"),
        "CREATE TABLE public.messages (id uuid PRIMARY KEY, body text);",
    )
    .unwrap();
    let app = sqlx::migrate::Migrator::new(dir.as_path()).await.unwrap();
    app.run(&db.pool).await.unwrap();
    let before: Vec<(i64, String)> = sqlx::query_as("SELECT version, description FROM public._sqlx_migrations")
        .fetch_all(&db.pool)
        .await
        .unwrap();

    postbox::migrate(&db.pool).await.unwrap();

    let after: Vec<(i64, String)> = sqlx::query_as("SELECT version, description FROM public._sqlx_migrations")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(before, after);
    app.run(&db.pool).await.expect("the application's migrator still works");
    let public: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(
        public
            .iter()
            .all(|n| n.starts_with("messages") || n.starts_with("_sqlx_migrations")),
        "{public:?}"
    );
    let functions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(functions, 0, "no functions in public");
    std::fs::remove_dir_all(dir).ok();
}

/// Files applied by another tool (psql -f) are recognised: migrate then applies nothing.
#[tokio::test]
async fn files_applied_by_another_tool_are_recognised() {
    let db = TestDb::empty().await;
    for m in postbox::migrate::MIGRATIONS {
        sqlx::raw_sql(m.sql).execute(&db.pool).await.unwrap();
    }
    assert!(postbox::migrate(&db.pool).await.unwrap().is_empty());
    assert!(postbox::migrate::is_current(&db.pool).await.unwrap());
}

/// Each file records itself under the version and name its file name
/// declares, and every file in migrations/ is embedded.
#[test]
fn file_names_and_self_records_agree() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations");
    let mut on_disk: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".sql").map(str::to_owned))
        .collect();
    on_disk.sort();
    let embedded: Vec<&str> = postbox::migrate::MIGRATIONS.iter().map(|m| m.name).collect();
    assert_eq!(on_disk, embedded, "every file in migrations/ is embedded, in order");
    for (i, m) in postbox::migrate::MIGRATIONS.iter().enumerate() {
        assert_eq!(m.version(), i as i64 + 1, "{}: versions are 1, 2, 3…", m.name);
        let record = format!(
            "INSERT INTO postbox.schema_migrations (version, description)\nVALUES ({}, '{}') ON CONFLICT (version) DO NOTHING;",
            m.version(),
            m.description()
        );
        assert!(
            m.sql.trim_end().ends_with(&record),
            "{} must end by recording itself:\n{record}",
            m.name
        );
    }
}

/// Released migrations never change (databases that applied them would
/// silently differ from new ones): a change is a new file. The SHA-256 of
/// each released file is in migrations.sha256 (`sha256sum -c` reads it);
/// add a line there when a new file is released.
#[test]
fn released_migrations_are_unchanged() {
    use sha2::{Digest, Sha256};
    let root = env!("CARGO_MANIFEST_DIR");
    let sums = std::fs::read_to_string(format!("{root}/migrations.sha256")).unwrap();
    let mut released = 0;
    for line in sums.lines().filter(|l| !l.trim().is_empty()) {
        let (want, file) = line.split_once("  ").expect("`<sha256>  <file>` lines");
        let bytes = std::fs::read(format!("{root}/{file}")).unwrap_or_else(|e| panic!("{file}: {e}"));
        let got: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            got, want,
            "{file} was released and has changed: restore it and put the change in a new migration"
        );
        released += 1;
    }
    assert_eq!(
        released,
        postbox::migrate::MIGRATIONS.len(),
        "every embedded migration is listed in migrations.sha256"
    );
}

/// The migrations apply, and an event goes through enqueue, claim and
/// record, on every PostgreSQL server version installed on this machine
/// (Debian's /usr/lib/postgresql/<version>; 13 and newer are supported).
#[tokio::test]
async fn migrations_run_on_every_installed_postgresql() {
    use postbox_support::throwaway::{installed_versions, Cluster, Durability};
    let versions = installed_versions();
    if versions.is_empty() {
        eprintln!("no server binaries under /usr/lib/postgresql: nothing to check");
        return;
    }
    for (version, bin) in versions {
        let cluster = tokio::task::spawn_blocking(move || Cluster::start_with(bin, Durability::Fast))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("PostgreSQL {version}: {e}"));
        let pool = common::pool(&cluster.url(), 2).await;
        postbox::migrate(&pool)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL {version}: {e}"));
        assert!(
            postbox::migrate(&pool).await.unwrap().is_empty(),
            "PostgreSQL {version}: idempotent"
        );
        let mut tx = pool.begin().await.unwrap();
        let id = postbox::enqueue(&mut tx, "https://example.com/hook", &common::event("x"))
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL {version}: {e}"));
        tx.commit().await.unwrap();
        let claimed = common::protocol::claim(&pool, "w", 10, std::time::Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL {version}: {e}"));
        assert_eq!(
            claimed.iter().map(|c| c.id).collect::<Vec<_>>(),
            [id],
            "PostgreSQL {version}"
        );
        pool.close().await;
        drop(cluster);
    }
}

/// Every postbox function that turns sequential scans off (to keep its
/// statements on their indexes) also turns JIT off: a plan that must scan
/// anyway then costs over 10^10, past `jit_above_cost`, and would be
/// compiled on every call (100–230 ms here, migration 0008).
#[tokio::test]
async fn functions_without_seqscans_run_without_jit() {
    let db = TestDb::new().await;
    let rows: Vec<(String, Vec<String>)> = sqlx::query_as(
        "SELECT p.oid::regprocedure::text, p.proconfig FROM pg_proc p
         WHERE p.pronamespace = 'postbox'::regnamespace AND 'enable_seqscan=off' = ANY (p.proconfig)
         ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let names: Vec<&str> = rows.iter().map(|(f, _)| f.split('(').next().unwrap()).collect();
    for want in [
        "postbox.claim",
        "postbox.claim_quick",
        "postbox.record",
        "postbox.release",
    ] {
        assert!(names.contains(&want), "{want} turns sequential scans off: {names:?}");
    }
    for (function, config) in &rows {
        assert!(config.iter().any(|c| c == "jit=off"), "{function} runs with {config:?}");
    }
}

/// Support finds an event by its id, conversation id or message id
/// (`postbox.event_story`) through the indexes: the two support indexes are
/// hash indexes (migration 0010), cheaper for every claim and outcome to
/// keep than B-trees of random UUIDs, and equality is all they answer.
#[tokio::test]
async fn support_lookups_use_the_hash_indexes() {
    let db = TestDb::new().await;
    common::enqueue_bulk(&db.pool, "http://127.0.0.1:9/lookup", 2000, None).await;
    sqlx::query("ANALYZE postbox.outbox").execute(&db.pool).await.unwrap();
    let kinds: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.relname::text, a.amname::text FROM pg_class c JOIN pg_am a ON a.oid = c.relam
         WHERE c.relname IN ('outbox_conversation_idx', 'outbox_message_idx') ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        kinds,
        [
            ("outbox_conversation_idx".to_string(), "hash".to_string()),
            ("outbox_message_idx".to_string(), "hash".to_string())
        ]
    );
    // The look-up of event_story, with a key that is none of the three.
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN SELECT o.id FROM postbox.outbox o
         WHERE o.id = '00000000-0000-4000-8000-000000000000'::uuid
            OR o.conversation_id = '00000000-0000-4000-8000-000000000000'::uuid
            OR o.message_id = '00000000-0000-4000-8000-000000000000'::uuid",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let plan = plan.join("\n");
    for index in ["outbox_pkey", "outbox_conversation_idx", "outbox_message_idx"] {
        assert!(plan.contains(index), "{index} is not used:\n{plan}");
    }
    assert!(!plan.contains("Seq Scan"), "{plan}");
}
