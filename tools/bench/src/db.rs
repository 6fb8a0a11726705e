//! Benchmark databases, the bench's enqueues and the SQL they run.

use crate::{bench::*, receiver::*};
use crate::{connect, Failure};
use sqlx::PgPool;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// A fresh database on the server, migrated, with `postbox.allow_http = on`
/// (the receiver is plain http on loopback).
pub(crate) struct BenchDb {
    pub(crate) name: String,
    pub(crate) url: String,
    pub(crate) pool: PgPool,
}

impl BenchDb {
    pub(crate) async fn create(admin: &PgPool, server_url: &str) -> Result<BenchDb, Failure> {
        let name = format!("bench_{}", &Uuid::new_v4().simple().to_string()[..12]);
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(admin).await?;
        sqlx::query(&format!("ALTER DATABASE {name} SET postbox.allow_http = on"))
            .execute(admin)
            .await?;
        let mut url =
            url::Url::parse(server_url).map_err(|e| Failure::Usage(format!("DATABASE_URL is not a URL: {e}")))?;
        url.set_path(&format!("/{name}"));
        let url = url.to_string();
        let pool = connect(&url, 4).await?;
        postbox::migrate(&pool).await?;
        Ok(BenchDb { name, url, pool })
    }

    /// Drops the database; a failure is only reported, never fatal.
    pub(crate) async fn drop(self, admin: &PgPool) {
        self.pool.close().await;
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(e) = sqlx::query(&sql).execute(admin).await {
            eprintln!("warning: could not drop database {}: {e}", self.name);
        }
    }
}

/// A chat message of about 250 characters: with the envelope and the
/// metadata the body is about 600 bytes, like the seed guide's message.
pub(crate) const CONTENT: &str =
    "Hello! I ordered a pair of running shoes last Tuesday (order 48213) and the tracking page \
    still says the parcel is waiting at the depot. Could you check whether it has left, and if not, send it to \
    my office at 14 Harbour Street instead? Thanks a lot, Sam.";

/// The seed's message as `data`, numbered `g.i`; with the envelope the body
/// is about 600 bytes. `$3` is the content.
pub(crate) const DATA_SQL: &str = r#"jsonb_build_object(
    'id', gen_random_uuid(), 'content', $3::text,
    'content_type', 'TEXT', 'type', 'USER_INPUT', 'channel', 'API', 'status', 'RECEIVED',
    'metadata', jsonb_build_object('source', 'bench', 'sequence', g.i),
    'created_by', 'user123', 'updated_by', 'user123',
    'created_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
    'updated_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))"#;

/// `postbox.enqueue` of event `g.i` to endpoint `$1 || g.i % $2`.
pub(crate) fn enqueue_call() -> String {
    format!("postbox.enqueue($1::text || (g.i % $2::bigint)::text, gen_random_uuid(), {DATA_SQL}, NULL)")
}

/// Enqueues `n` events in chunks, in SQL; returns their ids.
pub(crate) async fn enqueue_bulk(pool: &PgPool, prefix: &str, endpoints: u64, n: u64) -> Result<Vec<Uuid>, Failure> {
    let sql = format!(
        "SELECT {} FROM generate_series($4::bigint, $5::bigint) AS g(i)",
        enqueue_call()
    );
    let mut ids = Vec::with_capacity(n as usize);
    let mut first = 0;
    while first < n {
        let last = (first + ENQUEUE_CHUNK).min(n) - 1;
        let chunk: Vec<Uuid> = sqlx::query_scalar(&sql)
            .bind(prefix)
            .bind(endpoints as i64)
            .bind(CONTENT)
            .bind(first as i64)
            .bind(last as i64)
            .fetch_all(pool)
            .await?;
        ids.extend(chunk);
        first = last + 1;
    }
    Ok(ids)
}

/// Enqueues event `i` in a transaction of its own; returns its id and the
/// unix micros right after COMMIT returned.
pub(crate) async fn enqueue_one(pool: &PgPool, prefix: &str, endpoints: u64, i: u64) -> Result<(Uuid, i64), Failure> {
    let sql = format!("SELECT {} FROM (SELECT $4::bigint AS i) AS g", enqueue_call());
    let mut tx = pool.begin().await?;
    let id: Uuid = sqlx::query_scalar(&sql)
        .bind(prefix)
        .bind(endpoints as i64)
        .bind(CONTENT)
        .bind(i as i64)
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok((id, unix_micros()))
}

/// Creates the endpoint rows up front (the latency scenario raises their
/// limits before any event exists).
pub(crate) async fn create_endpoints(pool: &PgPool, prefix: &str, endpoints: u64) -> Result<(), Failure> {
    sqlx::query(
        "INSERT INTO postbox.endpoints (url) SELECT $1::text || i FROM generate_series(0, $2::bigint - 1) AS i
         ON CONFLICT (url) DO NOTHING",
    )
    .bind(prefix)
    .bind(endpoints as i64)
    .execute(pool)
    .await?;
    Ok(())
}

/// Lifts the per-endpoint limits (in flight, per minute) where the schema
/// has them, so the benchmark measures postbox rather than its throttles.
pub(crate) async fn raise_limits(pool: &PgPool) -> Result<(), Failure> {
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns
         WHERE table_schema = 'postbox' AND table_name = 'endpoints'",
    )
    .fetch_all(pool)
    .await?;
    let has = |c: &str| columns.iter().any(|x| x == c);
    if has("max_in_flight") {
        sqlx::query("UPDATE postbox.endpoints SET max_in_flight = 100000")
            .execute(pool)
            .await?;
    }
    if has("rate_per_minute") {
        sqlx::query("UPDATE postbox.endpoints SET rate_per_minute = NULL")
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// Waits until no row is pending.
pub(crate) async fn wait_delivered(pool: &PgPool, limit: Duration) -> Result<(), Failure> {
    let started = Instant::now();
    loop {
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM postbox.outbox WHERE status = 'pending'")
            .fetch_one(pool)
            .await?;
        if pending == 0 {
            return Ok(());
        }
        if started.elapsed() > limit {
            return Err(Failure::Runtime(format!(
                "{pending} events still pending after {}",
                humantime::format_duration(limit)
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
