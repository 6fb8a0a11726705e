//! One delivery attempt: sign, POST, decide what follows, hand the outcome
//! to the recorder.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use uuid::Uuid;

use super::{Record, Shared};
use crate::delivery::{Next, Secrets};
use crate::store::{self, Claimed, Outcome};

/// A number in [0, 1) from the OS random source (via UUIDv4).
pub(super) fn unit_random() -> f64 {
    (Uuid::new_v4().as_u128() as u64 >> 11) as f64 / (1u64 << 53) as f64
}

/// Logs an event about this attempt at `$level`, with the attempt's ids:
/// event, endpoint, attempt number, and the conversation and message ids
/// read from the body (only when the line is written: a delivery that logs
/// nothing parses nothing and opens no span).
macro_rules! attempt_log {
    ($level:ident, $row:expr, $body:expr, $($rest:tt)+) => {
        if tracing::enabled!(tracing::Level::$level) {
            let (conversation_id, message_id) = store::support_ids(std::str::from_utf8(&$body).unwrap_or_default());
            tracing::event!(
                tracing::Level::$level,
                event_id = %$row.id,
                endpoint_id = $row.endpoint_id,
                attempt = $row.attempt,
                conversation_id = &*conversation_id,
                message_id = &*message_id,
                $($rest)+
            );
        }
    };
}

/// Delivers one claimed event and hands the outcome to the recorder.
pub(super) async fn deliver(shared: Arc<Shared>, row: Claimed, claimed: Instant, permit: OwnedSemaphorePermit) {
    let config = &shared.config;
    // Database time at the start of this attempt: the claim's now() plus the
    // time elapsed since, so the worker's own clock never matters.
    let started_at = row.claimed_at + claimed.elapsed();
    let timestamp = started_at.timestamp();
    let id = row.id.to_string();
    let own_schedule = row.own_schedule();
    let body = Bytes::from(Box::<str>::from(row.payload.0).into_boxed_bytes());
    let own;
    let secrets = match row.secret.as_deref().map(Secrets::parse) {
        Some(Ok(s)) => {
            own = s;
            Some(&own)
        }
        Some(Err(e)) => {
            attempt_log!(WARN, row, body, error = %e, "the endpoint's secret is invalid; using the default secret");
            config.signing_secret.as_ref()
        }
        None => config.signing_secret.as_ref(),
    };
    let signature = secrets.map(|s| s.sign(&id, timestamp, &body));
    // A second handle on the body (a reference count), for the log lines below.
    let sent = body.clone();
    let resp = shared
        .client
        .post(&row.url, &id, timestamp, signature.as_deref(), body)
        .await;

    let decision = config.retry.decide_with(
        own_schedule.as_deref(),
        row.attempt,
        row.max_attempts,
        &resp,
        unit_random(),
    );
    let kind = resp.error.map_or("success", |k| k.as_str());
    metrics::counter!("postbox_attempts_total", "result" => kind).increment(1);
    metrics::histogram!("postbox_delivery_duration_seconds").record(resp.elapsed.as_secs_f64());
    shared.attempts.fetch_add(1, Ordering::Relaxed);
    match decision.next {
        Next::Delivered => {
            shared.delivered.fetch_add(1, Ordering::Relaxed);
            attempt_log!(
                DEBUG,
                row,
                sent,
                status = resp.status,
                ms = resp.elapsed.as_millis() as u64,
                "delivered"
            );
        }
        Next::Retry { after } => {
            shared.retried.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("postbox_retries_total").increment(1);
            attempt_log!(INFO, row, sent, status = resp.status, error_kind = kind, error = resp.message.as_deref(), retry_in = ?after, "attempt failed; will retry");
        }
        Next::Failed => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            attempt_log!(
                WARN,
                row,
                sent,
                status = resp.status,
                error_kind = kind,
                error = resp.message.as_deref(),
                "attempts exhausted; event failed"
            );
        }
        Next::Gone => {
            attempt_log!(WARN, row, sent, url = %row.url, "endpoint answered 410 Gone; disabling it (its events are kept)");
        }
    }
    let outcome = Outcome {
        id: row.id,
        attempt: row.attempt,
        started_at,
        response: resp,
        decision,
    };
    // From here on nothing awaits, so a shutdown abort cannot split sending
    // the outcome from forgetting the lease.
    shared.unrecorded.fetch_add(1, Ordering::SeqCst);
    let _ = shared.records.send(Record::Outcome(outcome));
    shared.in_flight.lock().expect("in-flight map").remove(&row.id);
    drop(permit);
    shared.progress.notify_one();
}
