//! `postbox demo`: the whole flow on one machine with no set-up. It starts a
//! throwaway PostgreSQL (unless `DATABASE_URL` is set), migrates it, runs a
//! local receiver, enqueues sample message events in transactions (one of
//! them rolled back), delivers them with a worker, and prints what arrived
//! and what the tables say.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use base64::Engine;
use postbox::delivery::{NetworkPolicy, Secrets};
use postbox::{Message, MessageEvent, Worker, WorkerConfig};
use postbox_support::throwaway::{Cluster, Durability};
use sqlx::Row;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::listen::{print_received, serve, Responder};
use super::{DbArgs, Failure};

/// `postbox demo` settings.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// How many message events to enqueue.
    #[arg(long, default_value_t = 5)]
    events: u32,
}

pub async fn run(a: DemoArgs, db: &DbArgs) -> Result<(), Failure> {
    let mut _cluster = None;
    let url = match db.database_url.clone().filter(|u| !u.is_empty()) {
        Some(url) => url,
        None => {
            println!("1. DATABASE_URL is unset: starting a throwaway PostgreSQL…");
            let c = tokio::task::spawn_blocking(|| Cluster::start(Durability::Fast))
                .await
                .expect("cluster start task")
                .map_err(|e| Failure::Runtime(format!("cannot start a throwaway PostgreSQL: {e}")))?;
            let url = c.url();
            println!("   {url}");
            _cluster = Some(c);
            url
        }
    };
    let pool = super::connect(&url, 5).await?;
    let applied = postbox::migrate(&pool).await?;
    println!("2. migrations applied: {applied:?} (schema postbox)");

    let key: Vec<u8> = Uuid::new_v4()
        .as_bytes()
        .iter()
        .chain(Uuid::new_v4().as_bytes())
        .copied()
        .collect();
    let secret_text = format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(key));
    let secrets = Secrets::parse(&secret_text).expect("generated secret");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| Failure::Runtime(e.to_string()))?;
    let receiver_url = format!(
        "http://{}/webhook",
        listener.local_addr().map_err(|e| Failure::Runtime(e.to_string()))?
    );
    // The first request fails with 500 to show a retry.
    let respond: Responder = Arc::new(|n| {
        if n == 1 {
            (StatusCode::INTERNAL_SERVER_ERROR, Duration::ZERO)
        } else {
            (StatusCode::OK, Duration::ZERO)
        }
    });
    let (tx, mut rx) = mpsc::unbounded_channel();
    serve(listener, Some(secrets.clone()), respond, tx);
    println!("3. receiver listening at {receiver_url} (answers 500 to its first request, then 200)");

    let conversation = Uuid::now_v7();
    let mut ids = Vec::new();
    for i in 1..=a.events {
        let mut txn = pool.begin().await?;
        // The demo receiver is plain http on loopback: allow it for this transaction.
        sqlx::query("SET LOCAL postbox.allow_http = on")
            .execute(&mut *txn)
            .await?;
        let now = chrono::Utc::now();
        let message = Message::text(Uuid::now_v7(), format!("Demo message {i}"), "demo-user", now);
        let event = MessageEvent {
            conversation_id: conversation,
            message,
            ordering_key: None,
        };
        ids.push(
            postbox::enqueue(&mut txn, &receiver_url, &event)
                .await
                .map_err(|e| Failure::Runtime(e.to_string()))?,
        );
        txn.commit().await?;
    }
    let mut txn = pool.begin().await?;
    sqlx::query("SET LOCAL postbox.allow_http = on")
        .execute(&mut *txn)
        .await?;
    let message = Message::text(
        Uuid::now_v7(),
        "Rolled back: never delivered",
        "demo-user",
        chrono::Utc::now(),
    );
    let event = MessageEvent {
        conversation_id: conversation,
        message,
        ordering_key: None,
    };
    let ghost = postbox::enqueue(&mut txn, &receiver_url, &event)
        .await
        .map_err(|e| Failure::Runtime(e.to_string()))?;
    txn.rollback().await?;
    println!(
        "4. enqueued {} events in their own transactions; event {ghost} was rolled back",
        a.events
    );

    let mut config = WorkerConfig {
        poll_interval: Duration::from_millis(200),
        signing_secret: Some(secrets),
        ..WorkerConfig::default()
    };
    config.retry.schedule = vec![Duration::from_secs(1)];
    config.client.allow_http = true;
    config.client.network = NetworkPolicy {
        allow_private: true,
        allow: vec![],
    };
    let worker = Worker::builder(pool.clone())
        .config(config)
        .build()
        .map_err(|e| Failure::Runtime(e.to_string()))?;
    println!(
        "5. worker {} delivering (retry schedule shortened to 1s for the demo)…\n",
        worker.id()
    );
    let watch_pool = pool.clone();
    let done = async move {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let pending: Result<i64, _> =
                sqlx::query_scalar("SELECT count(*) FROM postbox.outbox WHERE status = 'pending'")
                    .fetch_one(&watch_pool)
                    .await;
            if matches!(pending, Ok(0)) {
                break;
            }
        }
    };
    let printer = tokio::spawn(async move {
        let mut arrived = Vec::new();
        while let Some(r) = rx.recv().await {
            print_received(&r);
            arrived.push(r);
        }
        arrived
    });
    let stats = tokio::time::timeout(Duration::from_secs(60), worker.run(done))
        .await
        .map_err(|_| Failure::Runtime("the demo did not finish within 60s".into()))?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    printer.abort();

    println!("\n6. the outbox (SELECT id, status, attempts, last_status_code, delivered_at FROM postbox.outbox):");
    let rows = sqlx::query(
        "SELECT id, status, attempts, last_status_code, delivered_at FROM postbox.outbox
         WHERE id = ANY($1) ORDER BY id",
    )
    .bind(&ids)
    .fetch_all(&pool)
    .await?;
    for r in rows {
        println!(
            "   {}  {:<9} attempts={}  last_status={:<4} delivered_at={}",
            r.get::<Uuid, _>("id"),
            r.get::<String, _>("status"),
            r.get::<i32, _>("attempts"),
            r.get::<Option<i32>, _>("last_status_code")
                .map_or("-".into(), |c| c.to_string()),
            r.get::<Option<chrono::DateTime<chrono::Utc>>, _>("delivered_at")
                .map_or("-".into(), |t| t.to_rfc3339())
        );
    }
    let ghost_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM postbox.outbox WHERE id = $1")
        .bind(ghost)
        .fetch_one(&pool)
        .await?;
    println!("   rolled-back event rows: {ghost_rows}");
    println!("\n   the attempt log (postbox.attempts):");
    let attempts = sqlx::query(
        "SELECT outbox_id, attempt, status_code, error_kind, duration_ms FROM postbox.attempts
         WHERE outbox_id = ANY($1) ORDER BY started_at, attempt",
    )
    .bind(&ids)
    .fetch_all(&pool)
    .await?;
    for r in attempts {
        println!(
            "   {} #{}  status={:<4} error_kind={:<12} {} ms",
            r.get::<Uuid, _>("outbox_id"),
            r.get::<i32, _>("attempt"),
            r.get::<Option<i32>, _>("status_code")
                .map_or("-".into(), |c| c.to_string()),
            r.get::<Option<String>, _>("error_kind").unwrap_or_else(|| "-".into()),
            r.get::<i32, _>("duration_ms")
        );
    }
    println!(
        "\nsummary: {} delivered, {} failed, {} attempts ({} retried); the rolled-back event was never sent.",
        stats.delivered, stats.failed, stats.attempts, stats.retried
    );
    pool.close().await;
    Ok(())
}
