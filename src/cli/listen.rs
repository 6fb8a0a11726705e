//! `postbox listen`: a local webhook receiver for development. It prints
//! each webhook, checks its signature, and answers a chosen status after a
//! chosen delay, so retries can be rehearsed without a tunnel.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use postbox::config::parse_duration;
use postbox::delivery::Secrets;
use postbox::ConfigError;
use tokio::sync::mpsc;

use super::Failure;

/// `postbox listen` settings.
#[derive(Debug, clap::Args)]
pub struct ListenArgs {
    /// Address to listen on.
    #[arg(long, env = "POSTBOX_LISTEN_ADDR", default_value = "127.0.0.1:8000")]
    addr: SocketAddr,
    /// Secret(s) to verify signatures with.
    #[arg(long, env = "POSTBOX_SIGNING_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Status code to answer.
    #[arg(long, default_value_t = 200)]
    status: u16,
    /// Answer 2xx only from this request on (e.g. 3: fail twice, then succeed).
    #[arg(long, default_value_t = 1)]
    succeed_from: u64,
    /// Wait this long before answering.
    #[arg(long, default_value = "0s")]
    delay: String,
}

/// One webhook as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Received {
    /// `webhook-id`.
    pub id: String,
    /// `webhook-timestamp`.
    pub timestamp: i64,
    /// Signature check: `None` when no secret is configured.
    pub valid: Option<bool>,
    /// The body as JSON (or null when it is not JSON).
    pub body: serde_json::Value,
    /// The status answered.
    pub answered: u16,
}

/// How the receiver answers request number `n` (1-based).
pub type Responder = Arc<dyn Fn(u64) -> (StatusCode, Duration) + Send + Sync>;

#[derive(Clone)]
struct Ctx {
    secrets: Option<Secrets>,
    respond: Responder,
    seen: Arc<AtomicU64>,
    tx: mpsc::UnboundedSender<Received>,
}

/// Serves webhooks on `listener`, sending each to `tx`.
pub fn serve(
    listener: tokio::net::TcpListener,
    secrets: Option<Secrets>,
    respond: Responder,
    tx: mpsc::UnboundedSender<Received>,
) {
    let ctx = Ctx {
        secrets,
        respond,
        seen: Arc::new(AtomicU64::new(0)),
        tx,
    };
    let app = Router::new().fallback(post(handle)).with_state(ctx);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
}

async fn handle(State(ctx): State<Ctx>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let n = ctx.seen.fetch_add(1, Ordering::SeqCst) + 1;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let id = header("webhook-id");
    let timestamp = header("webhook-timestamp").parse::<i64>().unwrap_or(0);
    let valid = ctx
        .secrets
        .as_ref()
        .map(|s| s.verify(&id, timestamp, &body, &header("webhook-signature")));
    let (status, delay) = (ctx.respond)(n);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let body = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let _ = ctx.tx.send(Received {
        id,
        timestamp,
        valid,
        body,
        answered: status.as_u16(),
    });
    status
}

pub async fn run(a: ListenArgs) -> Result<(), Failure> {
    let secrets = match a.secret.as_deref().filter(|s| !s.trim().is_empty()) {
        Some(s) => Some(
            Secrets::parse(s)
                .map_err(|e| Failure::Config(ConfigError::new("POSTBOX_SIGNING_SECRET", e.to_string())))?,
        ),
        None => None,
    };
    let status = StatusCode::from_u16(a.status)
        .map_err(|_| Failure::Usage(format!("--status: {} is not an HTTP status", a.status)))?;
    let delay = parse_duration("--delay", &a.delay).map_err(Failure::Config)?;
    let listener = tokio::net::TcpListener::bind(a.addr)
        .await
        .map_err(|e| Failure::Runtime(format!("cannot listen on {}: {e}", a.addr)))?;
    let succeed_from = a.succeed_from;
    let respond: Responder = Arc::new(move |n| {
        if n < succeed_from {
            (StatusCode::INTERNAL_SERVER_ERROR, delay)
        } else {
            (status, delay)
        }
    });
    let (tx, mut rx) = mpsc::unbounded_channel();
    serve(listener, secrets, respond, tx);
    println!(
        "listening on http://{} (answering {}{})",
        a.addr,
        status.as_u16(),
        if delay.is_zero() {
            String::new()
        } else {
            format!(" after {}", a.delay)
        }
    );
    println!("tip: ALTER DATABASE … SET postbox.allow_http = on, and run the worker with POSTBOX_ALLOW_HTTP=true POSTBOX_ALLOW_PRIVATE_NETWORKS=true");
    loop {
        tokio::select! {
            r = rx.recv() => match r {
                Some(r) => print_received(&r),
                None => break,
            },
            _ = super::shutdown_signal() => {
                // Print what was received before the signal.
                while let Ok(r) = rx.try_recv() {
                    print_received(&r);
                }
                break;
            }
        }
    }
    Ok(())
}

/// Prints one webhook readably.
pub fn print_received(r: &Received) {
    let sig = match r.valid {
        Some(true) => "signature valid",
        Some(false) => "SIGNATURE INVALID",
        None => "signature not checked (no secret)",
    };
    let skew = chrono::Utc::now().timestamp() - r.timestamp;
    println!(
        "── webhook {}  ts {} ({skew:+}s)  {sig}  → {}",
        r.id, r.timestamp, r.answered
    );
    println!("{}", serde_json::to_string_pretty(&r.body).unwrap_or_default());
}
