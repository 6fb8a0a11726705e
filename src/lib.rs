//! postbox delivers webhooks for message events out of a PostgreSQL
//! transactional outbox.
//!
//! An application writes its message row and enqueues the webhook event in
//! the same transaction; any number of workers claim due events with
//! `FOR UPDATE SKIP LOCKED`, POST them signed to the callback URL, and keep
//! attempts, the next attempt's time and the outcome in the outbox table.
//!
//! **Guarantee:** an event is enqueued if and only if its transaction
//! commits, is never visible to workers before the commit, and is delivered
//! at least once unless it exhausts its attempts (then it stays `failed` and
//! can be replayed). Nothing is dropped silently.
//!
//! # Quick start
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use postbox::{Message, MessageEvent, Worker};
//!
//! let pool = sqlx::PgPool::connect("postgres://localhost/app").await?;
//! postbox::migrate(&pool).await?;
//!
//! // In the transaction that writes the message:
//! let mut tx = pool.begin().await?;
//! let message = Message::text(uuid::Uuid::now_v7(), "Hello", "user123", chrono::Utc::now());
//! let event = MessageEvent { conversation_id: uuid::Uuid::now_v7(), message, ordering_key: None };
//! postbox::enqueue(&mut tx, "https://example.com/webhook", &event).await?;
//! tx.commit().await?;
//!
//! // Anywhere, any number of times:
//! let worker = Worker::builder(pool).build()?;
//! worker.run(async { tokio::signal::ctrl_c().await.ok(); }).await;
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! The flow enqueue → claim → deliver → record, one file per step:
//!
//! - [`event`]: the seed guide's payload as types (`ContentType`, `MessageType`, …).
//! - [`enqueue`]: the Rust face of the SQL function `postbox.enqueue`.
//! - [`migrate`]: the embedded SQL migrations (schema `postbox` only).
//! - [`store`]: the claim, record and release statements.
//! - [`delivery`]: the HTTP client, Standard Webhooks signatures, the SSRF
//!   guard and the pure retry decision.
//! - [`worker`]: the claim loop and shutdown, with one file per job: one
//!   attempt, the recorder, wake-ups, retention, database errors.
//! - [`config`]: the worker's configuration and its validation.
//!
//! Outside this crate: `support/` (a throwaway PostgreSQL cluster for the
//! demo, the tests and the benchmark) and `tools/bench` (the benchmark).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod delivery;
pub mod enqueue;
pub mod event;
pub mod migrate;
pub mod store;
pub mod worker;

pub use config::{ConfigError, WorkerConfig};
pub use enqueue::{enqueue, enqueue_json, EnqueueError};
pub use event::{Channel, ContentType, Message, MessageEvent, MessageStatus, MessageType, Payload};
pub use migrate::{migrate, MigrateError};
pub use worker::{RunStats, Worker, WorkerBuilder, WorkerError};
