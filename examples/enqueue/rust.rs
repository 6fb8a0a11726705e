//! Enqueue a postbox webhook event in the transaction that writes the message.
//!
//! Rust with the `postbox` crate (and sqlx, tokio, uuid, chrono, serde_json).
//! Run:  DATABASE_URL=postgres://... cargo run --example enqueue
//! (CALLBACK_URL overrides the receiver's URL.)
//!
//! The message row and its event commit together or not at all. A field that
//! the crate or `postbox.enqueue` rejects comes back as
//! `EnqueueError::Invalid { field, problem }`.

use std::process::ExitCode;

use chrono::{DateTime, Utc};
use postbox::{EnqueueError, Message, MessageEvent};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// An existing conversation.
const CONVERSATION_ID: Uuid = uuid::uuid!("5e7c0a4e-3c1b-4f0e-9a57-2d1f8c6b9e10");

/// Inserts the message row; returns its id.
async fn insert_message(conn: &mut PgConnection, content: &str, now: DateTime<Utc>) -> sqlx::Result<Uuid> {
    sqlx::query_scalar(
        "INSERT INTO example_app.messages (conversation_id, content, created_at) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(CONVERSATION_ID)
    .bind(content)
    .bind(now)
    .fetch_one(conn)
    .await
}

/// Inserts the message and enqueues its event; returns (message id, event id).
async fn save_message(conn: &mut PgConnection, callback_url: &str, content: &str) -> anyhow::Result<(Uuid, Uuid)> {
    let now = Utc::now();
    let message_id = insert_message(conn, content, now).await?;
    let event = MessageEvent {
        conversation_id: CONVERSATION_ID,
        message: Message::text(message_id, content, "user123", now),
        // Events of one conversation are delivered one after another.
        ordering_key: Some(CONVERSATION_ID.to_string()),
    };
    let event_id = postbox::enqueue(conn, callback_url, &event).await?;
    Ok((message_id, event_id))
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e:#}"); // e.g. "invalid callback_url: must be an absolute https:// URL"
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let callback_url = std::env::var("CALLBACK_URL").unwrap_or_else(|_| "https://customer.example.com/webhook".into());
    let pool = PgPool::connect(&std::env::var("DATABASE_URL")?).await?;
    sqlx::query("CREATE SCHEMA IF NOT EXISTS example_app")
        .execute(&pool)
        .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS example_app.messages (
             id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
             conversation_id uuid NOT NULL, content text NOT NULL,
             created_at timestamptz NOT NULL)",
    )
    .execute(&pool)
    .await?;

    // 1. Commit: the message and its event are both written.
    let mut tx = pool.begin().await?;
    let (message_id, event_id) = save_message(&mut tx, &callback_url, "Hello").await?;
    tx.commit().await?;
    println!("committed event {event_id} (message {message_id})");

    // 2. Roll back (or drop the transaction): neither the message nor its event exists.
    let mut tx = pool.begin().await?;
    let (message_id, event_id) = save_message(&mut tx, &callback_url, "Never sent").await?;
    tx.rollback().await?;
    let kept: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM postbox.outbox WHERE id = $1)")
        .bind(event_id)
        .fetch_one(&pool)
        .await?;
    println!("rolled back event {event_id} (message {message_id}); in the outbox: {kept}");

    // 3. The typed API cannot build an unknown status; a message held as JSON
    // is checked by the database, whose error names the field all the same.
    let mut tx = pool.begin().await?;
    let now = Utc::now();
    let message_id = insert_message(&mut tx, "Bad status", now).await?;
    let mut data = serde_json::to_value(Message::text(message_id, "Bad status", "user123", now))?;
    data["status"] = "DONE".into();
    match postbox::enqueue_json(&mut tx, &callback_url, CONVERSATION_ID, &data, None).await {
        Err(EnqueueError::Invalid { field, problem }) => println!("rejected: invalid {field}: {problem}"),
        Err(e) => return Err(e.into()),
        Ok(_) => anyhow::bail!("an invalid status was accepted"),
    }
    tx.rollback().await?;
    Ok(())
}
