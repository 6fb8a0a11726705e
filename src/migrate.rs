//! Schema migrations: plain SQL files in `migrations/`, embedded in the binary.
//!
//! Every object, the bookkeeping table `postbox.schema_migrations` included,
//! lives in the schema `postbox`, so an application's own migration tool
//! (sqlx's `public._sqlx_migrations`, Rails, Flyway…) is never touched.
//! [`migrate`] applies all the missing files in one transaction under an
//! advisory lock, so an upgrade lands whole or not at all; several processes
//! may run it at once: the first applies, the others wait and then find
//! nothing to do. Each file also records itself, so teams
//! may apply the files with their own tool instead.

use sqlx::PgPool;

/// One embedded migration file, `migrations/NNNN_name.sql`.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// The file's name without `.sql`: its version, `_`, a short name.
    pub name: &'static str,
    /// The file's SQL.
    pub sql: &'static str,
}

impl Migration {
    /// Its version: the file name's number.
    pub fn version(&self) -> i64 {
        let digits = self.name.split('_').next().unwrap_or_default();
        digits.parse().expect("a migration file name starts with its version")
    }

    /// Its short name: the file name after the number.
    pub fn description(&self) -> &'static str {
        self.name.split_once('_').map_or("", |(_, d)| d)
    }
}

/// Embeds `migrations/<name>.sql`: the file name is the one declaration of
/// its version (each file also records itself in `postbox.schema_migrations`
/// for teams that apply it with their own tool; tests/migrate.rs checks the
/// two agree, and that no released file changes).
macro_rules! migration {
    ($name:literal) => {
        Migration {
            name: $name,
            sql: include_str!(concat!("../migrations/", $name, ".sql")),
        }
    };
}

/// The migrations this binary knows, in order.
pub const MIGRATIONS: &[Migration] = &[
    migration!("0001_core"),
    migration!("0002_dispatch"),
    migration!("0003_operations"),
    migration!("0004_operator_actions"),
    migration!("0005_attempt_log"),
    migration!("0006_set_claim"),
    migration!("0007_lean_enqueue"),
    migration!("0008_plain_claim"),
    migration!("0009_lone_endpoint_claim"),
    migration!("0010_hash_support_indexes"),
];

/// Advisory lock key taken while migrating ("postbox" in ASCII).
const LOCK_KEY: i64 = 0x0070_6f73_7462_6f78;

/// Failure to migrate.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The database refused a statement or could not be reached.
    #[error("migration {version} failed: {source}")]
    Apply {
        /// The migration being applied (0 before any).
        version: i64,
        /// The database's error.
        #[source]
        source: sqlx::Error,
    },
}

/// Applies every missing migration; returns the versions it applied.
pub async fn migrate(pool: &PgPool) -> Result<Vec<i64>, MigrateError> {
    let mut tx = pool
        .begin()
        .await
        .map_err(|source| MigrateError::Apply { version: 0, source })?;
    let applied = applied_versions(&mut tx)
        .await
        .map_err(|source| MigrateError::Apply { version: 0, source })?;
    let mut done = Vec::new();
    for m in MIGRATIONS {
        if applied.contains(&m.version()) {
            continue;
        }
        // A query without arguments runs as a simple query: several statements at once.
        let result = sqlx::Executor::execute(&mut *tx, m.sql).await;
        result.map_err(|source| MigrateError::Apply {
            version: m.version(),
            source,
        })?;
        done.push(m.version());
    }
    tx.commit()
        .await
        .map_err(|source| MigrateError::Apply { version: 0, source })?;
    if let Some(newer) = applied.iter().filter(|v| **v > latest_version()).max() {
        tracing::warn!(
            newer,
            known = latest_version(),
            "the database has migrations newer than this binary"
        );
    }
    Ok(done)
}

/// Takes the migration lock for this transaction and reads what is applied.
async fn applied_versions(tx: &mut sqlx::PgConnection) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *tx)
        .await?;
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('postbox.schema_migrations') IS NOT NULL")
        .fetch_one(&mut *tx)
        .await?;
    if !exists {
        return Ok(Vec::new());
    }
    sqlx::query_scalar("SELECT version FROM postbox.schema_migrations")
        .fetch_all(&mut *tx)
        .await
}

/// The newest migration this binary knows.
pub fn latest_version() -> i64 {
    MIGRATIONS.last().map_or(0, Migration::version)
}

/// True when every migration this binary knows has been applied.
pub async fn is_current(pool: &PgPool) -> Result<bool, sqlx::Error> {
    let v: Option<i64> = sqlx::query_scalar(
        "SELECT CASE WHEN to_regclass('postbox.schema_migrations') IS NULL THEN NULL
                ELSE (SELECT max(version) FROM postbox.schema_migrations) END",
    )
    .fetch_one(pool)
    .await?;
    Ok(v.unwrap_or(0) >= latest_version())
}
