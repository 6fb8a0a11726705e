//! Which database errors are worth retrying, and the one backoff used for
//! every in-process retry (claims, outcomes, the LISTEN connection).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tracing::warn;

/// Exponential from 100 ms to 5 s, with jitter, for as long as it takes.
pub(super) fn db_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
}

/// Logs one retry of a database call.
pub(super) fn log_retry(e: &sqlx::Error, after: Duration) {
    warn!(error = %e, retry_in = ?after, "database unavailable; retrying");
}

/// Errors worth retrying: the connection, not the statement.
pub(super) fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // connection exceptions, admin shutdown, serialization, deadlock, resources
            code.starts_with("08")
                || code.starts_with("57")
                || code.starts_with("53")
                || code == "40001"
                || code == "40P01"
        }
        _ => false,
    }
}

/// The next wait of a retry sequence kept in `state` (`None` starts a new
/// sequence; set it back to `None` after a success).
pub(super) fn next_delay(state: &mut Option<ExponentialBackoff>) -> Duration {
    state
        .get_or_insert_with(|| db_backoff().build())
        .next()
        .unwrap_or(Duration::from_secs(5))
}
