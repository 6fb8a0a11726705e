//! Wake-ups: enqueues NOTIFY idle workers (see `postbox.enqueue` and
//! `postbox.wake_workers`); the claim loop also wakes at the earliest due
//! time the database knows (`postbox.next_wake`).

use std::sync::Arc;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::Notify;
use tracing::warn;

use super::db_error::next_delay;

/// The channel `postbox.enqueue` notifies.
pub const NOTIFY_CHANNEL: &str = "postbox_outbox";

/// Listens for enqueue notifications and wakes the claim loop; reconnects
/// with backoff when the connection drops (polling covers the gap).
pub(super) async fn listen_loop(pool: PgPool, wake: Arc<Notify>) {
    let mut failures = 0u32;
    let mut backoff = None;
    loop {
        let listener = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen(NOTIFY_CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        match listener.await {
            Ok(mut l) => {
                failures = 0;
                backoff = None;
                wake.notify_one();
                loop {
                    match l.try_recv().await {
                        Ok(_) => wake.notify_one(),
                        Err(e) => {
                            warn!(error = %e, "LISTEN connection lost; reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                if failures == 1 {
                    warn!(error = %e, "cannot LISTEN for new events; polling until it can");
                }
            }
        }
        tokio::time::sleep(next_delay(&mut backoff)).await;
    }
}
