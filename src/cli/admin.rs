//! Operator commands: `enqueue`, `status`, `replay`, `endpoint`.

use chrono::{DateTime, Utc};
use postbox::{Channel, ContentType, EnqueueError, Message, MessageEvent, MessageStatus, MessageType};
use sqlx::Row;
use uuid::Uuid;

use super::{DbArgs, Failure};

fn usage(field: &str, problem: impl std::fmt::Display) -> Failure {
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
    let counts = sqlx::query(
        "SELECT s.status, count(o.id) AS n,
                extract(epoch FROM now() - min(o.created_at))::float8 AS oldest_s
         FROM unnest(ARRAY['pending','delivered','failed','cancelled']) AS s(status)
         LEFT JOIN postbox.outbox o ON o.status = s.status
         GROUP BY s.status ORDER BY array_position(ARRAY['pending','delivered','failed','cancelled'], s.status)",
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
        println!("{}", serde_json::to_string_pretty(&out).expect("JSON"));
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
}

const REPLAY_FILTER: &str = "o.status = $1
    AND (cardinality($2::uuid[]) = 0 OR o.id = ANY($2))
    AND ($3::bigint IS NULL OR o.endpoint_id = $3)
    AND ($4::timestamptz IS NULL OR o.created_at >= $4)
    AND ($5::timestamptz IS NULL OR o.created_at < $5)";

pub async fn replay(a: ReplayArgs, db: &DbArgs) -> Result<(), Failure> {
    if !["failed", "cancelled", "delivered"].contains(&a.status.as_str()) {
        return Err(usage("--status", "must be failed, cancelled or delivered"));
    }
    if a.attempts < 1 {
        return Err(usage("--attempts", "must be at least 1"));
    }
    if a.batch < 1 {
        return Err(usage("--batch", "must be at least 1"));
    }
    let pool = db.connect(1).await?;
    let endpoint_id = match &a.endpoint {
        None => None,
        Some(e) => Some(find_endpoint(&pool, e).await?),
    };
    let count: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM postbox.outbox o WHERE {REPLAY_FILTER}"))
        .bind(&a.status)
        .bind(&a.ids)
        .bind(endpoint_id)
        .bind(a.since)
        .bind(a.until)
        .fetch_one(&pool)
        .await?;
    if a.dry_run {
        println!("would replay {count} {} event(s)", a.status);
        return Ok(());
    }
    // Attempt numbers keep counting (the attempt log keeps its history):
    // a replayed event gets `--attempts` more.
    let sql = format!(
        "WITH batch AS (SELECT o.id FROM postbox.outbox o WHERE {REPLAY_FILTER}
                        ORDER BY o.id LIMIT $7 FOR UPDATE SKIP LOCKED)
         UPDATE postbox.outbox o
         SET status = 'pending', max_attempts = o.attempts + $6, next_attempt_at = now(),
             delivered_at = NULL, locked_by = NULL, locked_until = NULL
         FROM batch WHERE o.id = batch.id"
    );
    // Progress on a terminal only: logs get the summary line alone.
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut done = 0i64;
    loop {
        let mut tx = pool.begin().await?;
        let n = sqlx::query(&sql)
            .bind(&a.status)
            .bind(&a.ids)
            .bind(endpoint_id)
            .bind(a.since)
            .bind(a.until)
            .bind(a.attempts)
            .bind(a.batch)
            .execute(&mut *tx)
            .await?
            .rows_affected() as i64;
        // (trigger event_renewed marks them for the claims and wakes the workers)
        tx.commit().await?;
        done += n;
        if n == 0 {
            break;
        }
        if progress {
            eprint!("\rreplayed {done}/{count}");
        }
    }
    if progress && done > 0 {
        eprintln!();
    }
    println!("replayed {done} event(s)");
    Ok(())
}

async fn find_endpoint(pool: &sqlx::PgPool, key: &str) -> Result<i64, Failure> {
    let id: Option<i64> = match key.parse::<i64>() {
        Ok(id) => {
            sqlx::query_scalar("SELECT id FROM postbox.endpoints WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await?
        }
        Err(_) => {
            sqlx::query_scalar("SELECT id FROM postbox.endpoints WHERE url = $1")
                .bind(key)
                .fetch_optional(pool)
                .await?
        }
    };
    id.ok_or_else(|| usage("endpoint", format!("no endpoint {key:?}")))
}

/// `postbox endpoint`.
#[derive(Debug, clap::Args)]
pub struct EndpointArgs {
    #[command(subcommand)]
    action: EndpointAction,
}

#[derive(Debug, clap::Subcommand)]
enum EndpointAction {
    /// List endpoints with their limits and backlog.
    List,
    /// Stop delivering to an endpoint (its events stay pending).
    Disable {
        /// URL or id.
        endpoint: String,
        /// Why (shown in `list`).
        #[arg(long, default_value = "disabled by an operator")]
        reason: String,
    },
    /// Resume deliveries to an endpoint.
    Enable {
        /// URL or id.
        endpoint: String,
    },
    /// Change an endpoint's secret or limits.
    Set {
        /// URL or id.
        endpoint: String,
        /// Signing secret(s), `whsec_…`, space separated. Visible to `ps` and
        /// shell history: prefer --secret-file or --secret-env.
        #[arg(long, conflicts_with_all = ["default_secret", "secret_file", "secret_env"])]
        secret: Option<String>,
        /// Read the secret(s) from this file (`-` reads standard input).
        #[arg(long, conflicts_with_all = ["default_secret", "secret_env"])]
        secret_file: Option<String>,
        /// Read the secret(s) from this environment variable.
        #[arg(long, value_name = "VAR", conflicts_with = "default_secret")]
        secret_env: Option<String>,
        /// Use the workers' default secret.
        #[arg(long)]
        default_secret: bool,
        /// Deliveries in flight across all workers.
        #[arg(long)]
        max_in_flight: Option<i32>,
        /// Deliveries started per minute, or `unlimited`.
        #[arg(long)]
        rate_per_minute: Option<String>,
    },
}

pub async fn endpoint(a: EndpointArgs, db: &DbArgs) -> Result<(), Failure> {
    let pool = db.connect(1).await?;
    match a.action {
        EndpointAction::List => {
            let rows = sqlx::query(
                "SELECT e.id, e.url, e.max_in_flight, e.rate_per_minute, e.secret IS NOT NULL AS own_secret,
                        postbox.endpoint_state_words(e, s) AS state, e.disabled_at, e.disabled_reason,
                        (SELECT count(*) FROM postbox.outbox o WHERE o.endpoint_id = e.id AND o.status = 'pending') AS pending
                 FROM postbox.endpoints e JOIN postbox.endpoint_state s ON s.endpoint_id = e.id ORDER BY e.id",
            )
            .fetch_all(&pool)
            .await?;
            println!(
                "{:>5}  {:>8} {:>9} {:>8}  {:<7}  {:<40}  state",
                "id", "pending", "in-flight", "rate/min", "secret", "url"
            );
            for r in rows {
                let rate = r
                    .get::<Option<i32>, _>("rate_per_minute")
                    .map_or("unlimited".to_string(), |n| n.to_string());
                let secret = if r.get::<bool, _>("own_secret") {
                    "own"
                } else {
                    "default"
                };
                println!(
                    "{:>5}  {:>8} {:>9} {:>8}  {:<7}  {:<40}  {}",
                    r.get::<i64, _>("id"),
                    r.get::<i64, _>("pending"),
                    r.get::<i32, _>("max_in_flight"),
                    rate,
                    secret,
                    r.get::<String, _>("url"),
                    r.get::<String, _>("state"),
                );
            }
        }
        EndpointAction::Disable { endpoint, reason } => {
            let id = find_endpoint(&pool, &endpoint).await?;
            // The endpoint, not its events, is held: nothing else to change.
            sqlx::query(
                "UPDATE postbox.endpoints SET disabled_at = coalesce(disabled_at, now()), disabled_reason = $2
                 WHERE id = $1",
            )
            .bind(id)
            .bind(&reason)
            .execute(&pool)
            .await?;
            println!("endpoint {id} disabled; its pending events are kept until it is enabled");
        }
        EndpointAction::Enable { endpoint } => {
            let id = find_endpoint(&pool, &endpoint).await?;
            let mut tx = pool.begin().await?;
            // Enabling means "deliver now": also end any pause and close the
            // breaker. Triggers wake the endpoint (migration 0002).
            sqlx::query("UPDATE postbox.endpoints SET disabled_at = NULL, disabled_reason = NULL WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "UPDATE postbox.endpoint_state
                 SET paused_until = NULL, breaker_open_until = NULL, breaker_cooldown = NULL,
                     failing_events = '{}', probe_event = NULL, probe_until = NULL
                 WHERE endpoint_id = $1",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            println!("endpoint {id} enabled");
        }
        EndpointAction::Set {
            endpoint,
            secret,
            secret_file,
            secret_env,
            default_secret,
            max_in_flight,
            rate_per_minute,
        } => {
            let id = find_endpoint(&pool, &endpoint).await?;
            let secret = read_secret(secret, secret_file, secret_env)?;
            if max_in_flight.is_some_and(|n| n < 1) {
                return Err(usage("--max-in-flight", "must be at least 1"));
            }
            let rate: Option<Option<i32>> = match rate_per_minute.as_deref() {
                None => None,
                Some("unlimited") => Some(None),
                Some(s) => Some(Some(s.parse::<i32>().ok().filter(|n| *n >= 1).ok_or_else(|| {
                    usage(
                        "--rate-per-minute",
                        "must be a whole number of at least 1, or `unlimited`",
                    )
                })?)),
            };
            let mut tx = pool.begin().await?;
            if secret.is_some() || default_secret {
                sqlx::query("UPDATE postbox.endpoints SET secret = $2 WHERE id = $1")
                    .bind(id)
                    .bind(secret.as_deref())
                    .execute(&mut *tx)
                    .await?;
            }
            if let Some(n) = max_in_flight {
                sqlx::query("UPDATE postbox.endpoints SET max_in_flight = $2 WHERE id = $1")
                    .bind(id)
                    .bind(n)
                    .execute(&mut *tx)
                    .await?;
            }
            if let Some(r) = rate {
                sqlx::query("UPDATE postbox.endpoints SET rate_per_minute = $2 WHERE id = $1")
                    .bind(id)
                    .bind(r)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            println!("endpoint {id} updated");
        }
    }
    Ok(())
}

/// The secret given to `endpoint set`, from the command line, a file,
/// standard input or an environment variable, checked; surrounding
/// whitespace (a file's final newline) is ignored.
fn read_secret(arg: Option<String>, file: Option<String>, env: Option<String>) -> Result<Option<String>, Failure> {
    let (flag, value) = if let Some(v) = arg {
        eprintln!("note: a secret on the command line is visible to ps and shell history; --secret-file or --secret-env avoid that");
        ("--secret", v)
    } else if let Some(path) = file {
        let read = if path == "-" {
            std::io::read_to_string(std::io::stdin())
        } else {
            std::fs::read_to_string(&path)
        };
        let v = read.map_err(|e| usage("--secret-file", format!("cannot read {path}: {e}")))?;
        ("--secret-file", v)
    } else if let Some(var) = env {
        let v = std::env::var(&var)
            .map_err(|_| usage("--secret-env", format!("the environment variable {var} is not set")))?;
        ("--secret-env", v)
    } else {
        return Ok(None);
    };
    let value = value.split_whitespace().collect::<Vec<_>>().join(" ");
    postbox::delivery::Secrets::parse(&value).map_err(|e| usage(flag, e))?;
    Ok(Some(value))
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
