//! Operator commands: `enqueue`, `status`, `replay`, `endpoint`.

use chrono::{DateTime, Utc};
use postbox::{Channel, ContentType, EnqueueError, Message, MessageEvent, MessageStatus, MessageType};
use sqlx::Row;
use uuid::Uuid;

use super::endpoint::find_endpoint;
use super::{DbArgs, Failure};

pub(super) fn usage(field: &str, problem: impl std::fmt::Display) -> Failure {
    Failure::Usage(format!("{field}: {problem}"))
}

fn enqueue_failure(e: EnqueueError) -> Failure {
    match e {
        EnqueueError::Invalid { field, problem } => usage(&field, problem),
        EnqueueError::Database(e) => e.into(),
    }
}

/// `postbox enqueue`: one test message event (the seed's "manual testing").
#[derive(Debug, clap::Args)]
pub struct EnqueueArgs {
    /// The callback URL.
    #[arg(long)]
    url: String,
    /// The message content.
    #[arg(long)]
    content: String,
    /// TEXT, IMAGE, VIDEO, DOCUMENT or AUDIO.
    #[arg(long, default_value = "TEXT")]
    content_type: ContentType,
    /// USER_INPUT, SYSTEM or BOT.
    #[arg(long = "type", default_value = "USER_INPUT")]
    message_type: MessageType,
    /// API, WHATSAPP or SMS.
    #[arg(long, default_value = "API")]
    channel: Channel,
    /// RECEIVED, PROCESSED or FAILED.
    #[arg(long, default_value = "RECEIVED")]
    status: MessageStatus,
    /// File name, for media messages.
    #[arg(long)]
    filename: Option<String>,
    /// Metadata, a JSON object.
    #[arg(long)]
    metadata: Option<String>,
    /// Creator and last modifier.
    #[arg(long, default_value = "postbox-cli")]
    author: String,
    /// Conversation id [default: a new one].
    #[arg(long)]
    conversation_id: Option<Uuid>,
    /// Message id [default: a new one].
    #[arg(long)]
    message_id: Option<Uuid>,
    /// Deliver strictly in order with other events of this key.
    #[arg(long)]
    ordering_key: Option<String>,
    /// How many events to enqueue (one transaction).
    #[arg(long, default_value_t = 1)]
    count: u32,
}

pub async fn enqueue(a: EnqueueArgs, db: &DbArgs) -> Result<(), Failure> {
    let metadata = match &a.metadata {
        None => None,
        Some(s) => match serde_json::from_str::<serde_json::Value>(s) {
            Ok(serde_json::Value::Object(m)) => Some(m),
            _ => return Err(usage("--metadata", "must be a JSON object")),
        },
    };
    let pool = db.connect(1).await?;
    let mut tx = pool.begin().await?;
    let conversation_id = a.conversation_id.unwrap_or_else(Uuid::now_v7);
    for i in 0..a.count {
        let now = Utc::now();
        let message = Message {
            id: if i == 0 {
                a.message_id.unwrap_or_else(Uuid::now_v7)
            } else {
                Uuid::now_v7()
            },
            content: a.content.clone(),
            content_type: a.content_type,
            filename: a.filename.clone(),
            message_type: a.message_type,
            channel: a.channel,
            status: a.status,
            metadata: metadata.clone(),
            created_by: a.author.clone(),
            updated_by: a.author.clone(),
            created_at: now,
            updated_at: now,
        };
        let event = MessageEvent {
            conversation_id,
            message,
            ordering_key: a.ordering_key.clone(),
        };
        let id = postbox::enqueue(&mut tx, &a.url, &event)
            .await
            .map_err(enqueue_failure)?;
        println!("{id}");
    }
    tx.commit().await?;
    Ok(())
}

/// `postbox status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub async fn status(a: StatusArgs, db: &DbArgs) -> Result<(), Failure> {
    let pool = db.connect(1).await?;
    // The view postbox.backlog (migration 0003), one row per status in order.
    let counts = sqlx::query(
        "SELECT status, events AS n, extract(epoch FROM oldest_age)::float8 AS oldest_s FROM postbox.backlog",
    )
    .fetch_all(&pool)
    .await?;
    let endpoints = sqlx::query(
        "SELECT e.id, e.url, e.disabled_at IS NOT NULL AS disabled,
                postbox.endpoint_state_words(e, s) AS state,
                count(a.*) FILTER (WHERE a.error_kind IS NOT NULL) AS failed_attempts,
                count(a.*) AS attempts,
                (SELECT o.last_error FROM postbox.outbox o WHERE o.endpoint_id = e.id AND o.last_error IS NOT NULL
                 ORDER BY o.last_attempt_at DESC NULLS LAST LIMIT 1) AS last_error
         FROM postbox.endpoints e
         JOIN postbox.endpoint_state s ON s.endpoint_id = e.id
         LEFT JOIN postbox.outbox o ON o.endpoint_id = e.id
         LEFT JOIN postbox.attempts a ON a.outbox_id = o.id AND a.started_at > now() - interval '1 hour'
         GROUP BY e.id, s.endpoint_id
         HAVING e.disabled_at IS NOT NULL OR s.breaker_open_until IS NOT NULL
             OR count(a.*) FILTER (WHERE a.error_kind IS NOT NULL) > 0
         ORDER BY failed_attempts DESC, e.id",
    )
    .fetch_all(&pool)
    .await?;
    if a.json {
        let backlog: serde_json::Map<String, serde_json::Value> = counts
            .iter()
            .map(|r| (r.get::<String, _>("status"), r.get::<i64, _>("n").into()))
            .collect();
        let oldest = counts.first().and_then(|r| r.get::<Option<f64>, _>("oldest_s"));
        let failing: Vec<_> = endpoints
            .iter()
            .map(|r| {
                serde_json::json!({
                    "id": r.get::<i64, _>("id"),
                    "url": r.get::<String, _>("url"),
                    "disabled": r.get::<bool, _>("disabled"),
                    "state": r.get::<String, _>("state"),
                    "failed_attempts_last_hour": r.get::<i64, _>("failed_attempts"),
                    "attempts_last_hour": r.get::<i64, _>("attempts"),
                    "last_error": r.get::<Option<String>, _>("last_error"),
                })
            })
            .collect();
        let out =
            serde_json::json!({"backlog": backlog, "oldest_pending_seconds": oldest, "failing_endpoints": failing});
        super::print_json(&out);
        return Ok(());
    }
    println!("{:<10} {:>10}  oldest", "status", "events");
    for r in &counts {
        let status: String = r.get("status");
        let oldest = if status == "pending" {
            r.get::<Option<f64>, _>("oldest_s")
                .map(|s| humantime::format_duration(std::time::Duration::from_secs(s.max(0.0) as u64)).to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        println!("{:<10} {:>10}  {}", status, r.get::<i64, _>("n"), oldest);
    }
    if endpoints.is_empty() {
        println!("\nno failing endpoints in the last hour");
    } else {
        println!("\nfailing endpoints (last hour):");
        println!(
            "{:>5}  {:>9}  {:<40}  {:<40}  last error",
            "id", "failed", "url", "state"
        );
        for r in &endpoints {
            println!(
                "{:>5}  {:>4}/{:<4}  {:<40}  {:<40}  {}",
                r.get::<i64, _>("id"),
                r.get::<i64, _>("failed_attempts"),
                r.get::<i64, _>("attempts"),
                r.get::<String, _>("url"),
                r.get::<String, _>("state"),
                r.get::<Option<String>, _>("last_error").unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// `postbox replay`: put events back to `pending` with fresh attempts.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Only these event ids (repeatable).
    #[arg(long = "id")]
    ids: Vec<Uuid>,
    /// Only events for this endpoint (URL or id).
    #[arg(long)]
    endpoint: Option<String>,
    /// Which status to replay: failed, cancelled or delivered.
    #[arg(long, default_value = "failed")]
    status: String,
    /// Only events created at or after this time (RFC 3339).
    #[arg(long)]
    since: Option<DateTime<Utc>>,
    /// Only events created before this time (RFC 3339).
    #[arg(long)]
    until: Option<DateTime<Utc>>,
    /// Attempts granted to each replayed event.
    #[arg(long, default_value_t = 4)]
    attempts: i32,
    /// Count what would be replayed, change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Rows per transaction.
    #[arg(long, default_value_t = 1000)]
    batch: i64,
    /// Print the outcome (or, with --dry-run, the count) as JSON.
    #[arg(long)]
    json: bool,
}

/// A validation error of postbox's SQL functions as a usage error naming
/// the command-line option (`--status` for the parameter `status`).
fn sql_usage(e: sqlx::Error) -> Failure {
    match postbox::enqueue::invalid_field(&e) {
        Some((field, problem)) => usage(&format!("--{field}"), problem),
        None => e.into(),
    }
}

/// Replays (or, with `--dry-run`, counts) in batches through the SQL
/// function `postbox.replay` (migration 0004): it validates the options,
/// walks the matching events once by id, and gives each `--attempts` more.
pub async fn replay(a: ReplayArgs, db: &DbArgs) -> Result<(), Failure> {
    let pool = db.connect(1).await?;
    let endpoint_id = match &a.endpoint {
        None => None,
        Some(e) => Some(find_endpoint(&pool, e).await?),
    };
    let ids = (!a.ids.is_empty()).then_some(&a.ids);
    // Progress on a terminal only: logs get the summary line alone.
    let progress = !a.json && !a.dry_run && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (mut looked, mut replayed) = (0i64, 0i64);
    let mut after: Option<Uuid> = None;
    loop {
        // Each batch commits on its own (trigger event_renewed wakes the workers).
        let (n, done, last): (i32, i32, Option<Uuid>) = sqlx::query_as(
            "SELECT * FROM postbox.replay($1, ids => $2, endpoint_id => $3, since => $4, until => $5,
                                          attempts => $6, after => $7, batch => $8, dry_run => $9)",
        )
        .bind(&a.status)
        .bind(ids)
        .bind(endpoint_id)
        .bind(a.since)
        .bind(a.until)
        .bind(a.attempts)
        .bind(after)
        .bind(i32::try_from(a.batch).unwrap_or(i32::MAX))
        .bind(a.dry_run)
        .fetch_one(&pool)
        .await
        .map_err(sql_usage)?;
        if n == 0 {
            break;
        }
        looked += i64::from(n);
        replayed += i64::from(done);
        after = last;
        if progress {
            eprint!("\rreplayed {replayed}");
        }
    }
    if progress && replayed > 0 {
        eprintln!();
    }
    match (a.dry_run, a.json) {
        (true, true) => {
            super::print_json(&serde_json::json!({"status": a.status, "dry_run": true, "would_replay": looked}))
        }
        (true, false) => println!("would replay {looked} {} event(s)", a.status),
        (false, true) => super::print_json(&serde_json::json!({"status": a.status, "replayed": replayed})),
        (false, false) => println!("replayed {replayed} event(s)"),
    }
    Ok(())
}

/// `postbox secret`.
#[derive(Debug, clap::Args)]
pub struct SecretArgs {
    #[command(subcommand)]
    action: SecretAction,
}

#[derive(Debug, clap::Subcommand)]
enum SecretAction {
    /// Print a fresh signing secret (`whsec_` and 32 random bytes in base64).
    New,
}

pub fn secret(a: SecretArgs) -> Result<(), Failure> {
    match a.action {
        SecretAction::New => println!("{}", postbox::delivery::Secrets::generate()),
    }
    Ok(())
}
