//! Enqueueing events inside the application's own transaction.
//!
//! The Rust API checks what it can before any SQL runs (the URL's shape, the
//! ordering key), then calls the SQL function `postbox.enqueue`, which is the
//! single place that validates the payload, upserts the endpoint, inserts the
//! outbox row and wakes the workers. Run it on the connection of the
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
    fn invalid(field: &str, problem: impl Into<String>) -> Self {
        EnqueueError::Invalid {
            field: field.to_owned(),
            problem: problem.into(),
        }
    }

    /// Turns the SQL function's `invalid_parameter_value` errors into
    /// [`EnqueueError::Invalid`], keeping the field it names.
    fn from_db(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e {
            if db.code().as_deref() == Some("22023") {
                if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                    if let Some(field) = pg.column() {
                        let prefix = format!("postbox: invalid {field}: ");
                        let problem = pg.message().strip_prefix(&prefix).unwrap_or(pg.message());
                        return EnqueueError::invalid(field, problem);
                    }
                }
            }
        }
        EnqueueError::Database(e)
    }
}

/// Checks a callback URL's shape: absolute, `https` (or `http`, which the
/// database accepts only where `postbox.allow_http` is on), a host, no
/// credentials, no control characters.
pub fn check_callback_url(url: &str) -> Result<reqwest::Url, EnqueueError> {
    let field = "callback_url";
    if url.is_empty() {
        return Err(EnqueueError::invalid(field, "is required"));
    }
    if url.len() > 2048 {
        return Err(EnqueueError::invalid(field, "is longer than 2048 characters"));
    }
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(EnqueueError::invalid(
            field,
            "contains white space or control characters",
        ));
    }
    let parsed =
        reqwest::Url::parse(url).map_err(|e| EnqueueError::invalid(field, format!("is not an absolute URL ({e})")))?;
    if !matches!(parsed.scheme(), "https" | "http") {
        return Err(EnqueueError::invalid(field, "must be an absolute https:// URL"));
    }
    let authority = url
        .split_once("://")
        .map_or("", |(_, rest)| rest.split(['/', '?', '#']).next().unwrap_or(""));
    if authority.contains('@') || !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(EnqueueError::invalid(
            field,
            "must not carry credentials (user:password@)",
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(EnqueueError::invalid(field, "has no host"));
    }
    Ok(parsed)
}

/// Enqueues `event` for delivery to `callback_url` on `conn` (pass
/// `&mut *tx` to enqueue inside a transaction). Returns the event id, which
/// receivers get as `webhook-id`.
pub async fn enqueue(conn: &mut PgConnection, callback_url: &str, event: &MessageEvent) -> Result<Uuid, EnqueueError> {
    check_callback_url(callback_url)?;
    if event.ordering_key.as_deref() == Some("") {
        return Err(EnqueueError::invalid(
            "ordering_key",
            "must not be empty (use None for no ordering)",
        ));
    }
    for (field, value) in [
        ("data.created_by", &event.message.created_by),
        ("data.updated_by", &event.message.updated_by),
    ] {
        if value.is_empty() {
            return Err(EnqueueError::invalid(field, "must not be empty"));
        }
    }
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
    check_callback_url(callback_url)?;
    call_sql(conn, callback_url, conversation_id, data, ordering_key).await
}

/// The one call of the SQL function, after the Rust-side checks.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(url: &str) -> String {
        match check_callback_url(url) {
            Err(EnqueueError::Invalid { field, problem }) => format!("{field}: {problem}"),
            other => panic!("{url} accepted: {other:?}"),
        }
    }

    #[test]
    fn url_shape_is_checked_before_sql() {
        assert!(check_callback_url("https://example.com/hook").is_ok());
        assert!(field_of("").contains("required"));
        assert!(field_of("example.com/hook").contains("absolute"));
        assert!(field_of("ftp://example.com/").contains("https://"));
        assert!(field_of("https://user:pw@example.com/").contains("credentials"));
        assert!(field_of("https://@example.com/").contains("credentials"));
        assert!(field_of("https://example.com/a b").contains("white space"));
        assert!(field_of("https://example.com/\u{7}").starts_with("callback_url"));
    }
}
