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
//! The flow enqueue → claim → deliver → record, one module per step:
//!
//! - [`event`]: the seed guide's payload as types (`ContentType`, `MessageType`, …).
//! - [`mod@enqueue`]: the Rust face of the SQL function `postbox.enqueue`, which
//!   validates every field (the rules live in SQL, once, for every language).
//! - [`mod@migrate`]: the embedded SQL migrations (schema `postbox` only). The
//!   lease protocol itself (claim, record, release, prune) is SQL, in
//!   `migrations/0002_dispatch.sql`.
//! - `store` (private): the worker's calls of those SQL functions.
//! - [`delivery`]: the HTTP client, Standard Webhooks signatures, the SSRF
//!   guard and the pure decision after an attempt.
//! - [`worker`]: the claim loop and shutdown, with one file per job: one
//!   attempt, the recorder, wake-ups, retention, database errors.
//! - [`config`]: the worker's configuration and its validation.
//!
//! The public API is what an application needs: enqueue (and the event
//! types), migrate, and a [`Worker`] with its [`WorkerConfig`] (whose parts,
//! the retry and breaker policies, the client settings and the signing
//! secrets, are public so that it can be built in code). The `postbox`
//! command (`src/cli/`) is built on that same API; the delivery client is
//! public because `postbox endpoint test` sends through it. Outcomes are
//! written only by a worker, through the fenced SQL functions.
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
mod store;
pub mod worker;

pub use config::{BreakerPolicy, ConfigError, WorkerConfig};
pub use enqueue::{enqueue, enqueue_json, EnqueueError};
pub use event::{Channel, ContentType, Message, MessageEvent, MessageStatus, MessageType, Payload};
pub use migrate::{migrate, MigrateError};
pub use worker::{RunStats, Worker, WorkerBuilder, WorkerError};
