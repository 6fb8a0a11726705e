//! Enqueueing events inside the application's own transaction.
//!
//! The Rust API calls the SQL function `postbox.enqueue`, which is the single
//! place that validates every field (the callback URL, the payload, the
//! ordering key), upserts the endpoint, inserts the outbox row and wakes the
//! workers: every language enqueues under the same rules, and a validation
//! error arrives as [`EnqueueError::Invalid`] naming the field. Run it on the connection of the
//! transaction that writes the message, and the event exists if and only if
//! that transaction commits.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::event::MessageEvent;

/// Why an event was not enqueued. Nothing was written in either case.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    /// A field is invalid; `field` names it (e.g. `callback_url`, `data.status`).
    #[error("invalid {field}: {problem}")]
    Invalid {
        /// The offending field.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The database failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl EnqueueError {
    /// Turns the SQL function's `invalid_parameter_value` errors into
    /// [`EnqueueError::Invalid`], keeping the field it names.
    fn from_db(e: sqlx::Error) -> Self {
        match invalid_field(&e) {
            Some((field, problem)) => EnqueueError::Invalid { field, problem },
            None => EnqueueError::Database(e),
        }
    }
}

/// The field and problem of a validation error raised by postbox's SQL
/// functions (`postbox.invalid`: SQLSTATE 22023 with the field as its
/// column), or `None` for any other error.
pub fn invalid_field(e: &sqlx::Error) -> Option<(String, String)> {
    let sqlx::Error::Database(db) = e else { return None };
    if db.code().as_deref() != Some("22023") {
        return None;
    }
    let pg = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()?;
    let field = pg.column()?;
    let prefix = format!("postbox: invalid {field}: ");
    let problem = pg.message().strip_prefix(&prefix).unwrap_or(pg.message());
    Some((field.to_owned(), problem.to_owned()))
}

/// Enqueues `event` for delivery to `callback_url` on `conn` (pass
/// `&mut *tx` to enqueue inside a transaction). Returns the event id, which
/// receivers get as `webhook-id`.
pub async fn enqueue(conn: &mut PgConnection, callback_url: &str, event: &MessageEvent) -> Result<Uuid, EnqueueError> {
    let data = serde_json::to_value(&event.message).expect("a message always serialises");
    call_sql(
        conn,
        callback_url,
        event.conversation_id,
        &data,
        event.ordering_key.as_deref(),
    )
    .await
}

/// Enqueues raw JSON `data` (the SQL function validates it): for callers that
/// hold the message as JSON already, such as `postbox enqueue`.
pub async fn enqueue_json(
    conn: &mut PgConnection,
    callback_url: &str,
    conversation_id: Uuid,
    data: &serde_json::Value,
    ordering_key: Option<&str>,
) -> Result<Uuid, EnqueueError> {
    call_sql(conn, callback_url, conversation_id, data, ordering_key).await
}

/// The one call of the SQL function, which validates every field.
async fn call_sql(
    conn: &mut PgConnection,
    callback_url: &str,
    conversation_id: Uuid,
    data: &serde_json::Value,
    ordering_key: Option<&str>,
) -> Result<Uuid, EnqueueError> {
    sqlx::query_scalar("SELECT postbox.enqueue($1, $2, $3, $4)")
        .bind(callback_url)
        .bind(conversation_id)
        .bind(data)
        .bind(ordering_key)
        .fetch_one(conn)
        .await
        .map_err(EnqueueError::from_db)
}
