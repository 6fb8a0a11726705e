//! The recorder: writes finished attempts in batches, one statement per
//! batch, and retries while the database is away, so an outage loses no
//! outcome.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use backon::RetryableWithContext;
use tokio::sync::mpsc;
use tracing::warn;
use uuid::Uuid;

use super::db_error::{db_backoff, is_transient, log_retry};
use super::{Kept, Record, Shared};
use crate::delivery::Next;
use crate::store;

/// Outcomes written per statement, at most.
const RECORD_BATCH: usize = 512;

/// How long the recorder waits for more outcomes when it has fewer than
/// [`LINGER_BELOW`].
const RECORD_LINGER: Duration = Duration::from_millis(2);

/// Below this many queued outcomes the recorder lingers for more.
pub(super) const LINGER_BELOW: usize = RECORD_BATCH / 8;

/// Runs `$call` on the kept connection `$conn` (a `Kept`), again with
/// backoff while the database is away; `$conn` holds the connection again
/// afterwards. `$call` may use only `Copy` values (references): each try
/// moves them into its future. A macro, not a function: a function taking
/// the call as an async closure makes the recorder's task not provably
/// `Send`.
macro_rules! retrying {
    ($conn:ident, |$c:ident| $call:expr) => {{
        let (back, result) = (|mut kept: Kept| async move {
            let result = kept.with(async |$c| $call.await).await;
            (kept, result)
        })
        .retry(db_backoff())
        .context($conn)
        .when(is_transient)
        .notify(log_retry)
        .await;
        $conn = back;
        result
    }};
}

/// Writes outcomes in batches, on the outcomes' own connection, until every
/// sender is gone; returns how many were dropped by the lease fence.
pub(super) async fn record_loop(mut conn: Kept, shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Record>) -> u64 {
    let worker_id = shared.config.worker_id.clone();
    let breaker = shared.config.breaker.clone();
    // Only a weak reference: the channel closes when the last delivery and
    // the claim loop drop theirs.
    let weak = Arc::downgrade(&shared);
    drop(shared);
    let mut fenced_total = 0u64;
    let mut batch = Vec::with_capacity(RECORD_BATCH);
    while rx.recv_many(&mut batch, RECORD_BATCH).await > 0 {
        // Linger a moment for more: one statement (and one commit) for many
        // outcomes. Delivery is not delayed by this; only the bookkeeping is.
        if batch.len() < LINGER_BELOW {
            tokio::time::sleep(RECORD_LINGER).await;
            while batch.len() < RECORD_BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
        }
        let n = batch.len();
        let mut outcomes = Vec::with_capacity(n);
        let mut releases = Vec::new();
        for r in batch.drain(..) {
            match r {
                Record::Outcome(o) => outcomes.push(o),
                Record::Release(id, attempt) => releases.push((id, attempt)),
            }
        }
        let rescheduled = !releases.is_empty() || outcomes.iter().any(|o| o.decision.next != Next::Delivered);
        if !outcomes.is_empty() {
            let (id, batch, policy) = (&worker_id, &outcomes, &breaker);
            let written = retrying!(conn, |c| store::record(c, id, batch, policy));
            match written {
                Ok(ids) => {
                    let fenced = outcomes.len() - ids.len();
                    if fenced > 0 {
                        fenced_total += fenced as u64;
                        metrics::counter!("postbox_fenced_outcomes_total").increment(fenced as u64);
                        warn!(fenced, "outcomes dropped: their lease had passed to a newer attempt");
                    }
                    let recorded: std::collections::HashSet<Uuid> = ids.into_iter().collect();
                    for o in &outcomes {
                        if !recorded.contains(&o.id) {
                            continue;
                        }
                        match o.decision.next {
                            Next::Delivered => {
                                metrics::counter!("postbox_events_total", "outcome" => "delivered").increment(1)
                            }
                            Next::Failed => {
                                metrics::counter!("postbox_events_total", "outcome" => "failed").increment(1)
                            }
                            _ => {}
                        }
                    }
                }
                Err(e) => {
                    warn!(error = %e, count = outcomes.len(), "could not record outcomes; the events will be retried after their lease")
                }
            }
        }
        if !releases.is_empty() {
            let (id, leases) = (&worker_id, &releases);
            let released = retrying!(conn, |c| store::release(c, id, leases));
            if let Err(e) = released {
                warn!(error = %e, "could not release leases; they will expire by themselves");
            }
        }
        if let Some(s) = weak.upgrade() {
            s.unrecorded.fetch_sub(n, Ordering::SeqCst);
            s.progress.notify_one();
            if rescheduled {
                s.rescheduled.notify_one();
            }
        }
    }
    conn.close().await;
    fenced_total
}
