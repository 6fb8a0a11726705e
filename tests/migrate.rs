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
    let all: Vec<i64> = postbox::migrate::MIGRATIONS.iter().map(|m| m.version).collect();
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
