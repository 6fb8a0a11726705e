//! Retention: workers prune finished events in small batches.

use std::time::Duration;

use sqlx::PgPool;
use tracing::debug;

use crate::store;

/// Retention: every `interval`, deletes finished events older than `keep`
/// in batches of 1,000 (at most 100 batches a round, so a large first
/// clean-up is spread out). One worker prunes at a time.
pub(super) async fn prune_loop(pool: PgPool, keep: Duration, failed_keep: Option<Duration>, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        for _ in 0..100 {
            match store::prune(&pool, keep, failed_keep, 1000).await {
                Ok(Some(n)) => {
                    if n > 0 {
                        metrics::counter!("postbox_retention_deleted_total").increment(n);
                        debug!(deleted = n, "pruned finished events");
                    }
                    if n < 1000 {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    debug!(error = %e, "pruning failed; will try again");
                    break;
                }
            }
        }
    }
}
