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
    /// List endpoints with their limits, retry policy, state and backlog.
    List {
        /// Print JSON (an array of endpoints) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Send one signed probe to URL as a worker would; writes nothing.
    ///
    /// Prints the verdict: the addresses URL resolves to and the SSRF
    /// guard's verdict, TLS, the HTTP status, the error kind, and what a
    /// worker would do with an event after such an answer. Nothing is
    /// written to the outbox or the attempt log. Exit 0 when the receiver
    /// answered 2xx, 1 otherwise.
    Test(super::probe::ProbeArgs),
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
    /// Change an endpoint's secret, limits or retry policy.
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
        /// This endpoint's delays after the 1st, 2nd… failure (the last
        /// repeats), e.g. `1m,10m,1h`: 1 to 100 delays, each above zero and
        /// at most 30 days; `default` uses the workers' POSTBOX_RETRY_SCHEDULE.
        #[arg(long, value_name = "DELAYS")]
        retry_schedule: Option<String>,
        /// Attempts given to each event enqueued for this endpoint from now
        /// on (1 to 100; events already enqueued keep theirs); `default` = 4.
        #[arg(long, value_name = "N")]
        max_attempts: Option<String>,
    },
}

/// `--retry-schedule`: `None` for `default`, else the delays in whole
/// microseconds (PostgreSQL's interval resolution). Their bounds are the
/// table's (CHECK endpoints_retry_schedule, see [`endpoint_rule`]).
fn parse_retry_schedule(s: &str) -> Result<Option<Vec<i64>>, Failure> {
    const FLAG: &str = "--retry-schedule";
    if s.trim().eq_ignore_ascii_case("default") {
        return Ok(None);
    }
    let list = postbox::config::parse_schedule(FLAG, s).map_err(|e| usage(FLAG, e.problem))?;
    Ok(Some(
        list.iter()
            .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
            .collect(),
    ))
}

/// `--max-attempts`: `None` for `default`, else a whole number (its bounds
/// are the table's, CHECK endpoints_max_attempts).
fn parse_max_attempts(s: &str) -> Result<Option<i32>, Failure> {
    if s.trim().eq_ignore_ascii_case("default") {
        return Ok(None);
    }
    s.trim()
        .parse::<i32>()
        .map(Some)
        .map_err(|_| usage("--max-attempts", format!("{s:?} is not a whole number, or `default`")))
}

/// An endpoint setting refused by one of the table's CHECK constraints,
/// as a usage error naming the option (the transaction is rolled back, so
/// nothing is written). The constraints are the rule; this only names them.
fn endpoint_rule(e: sqlx::Error) -> Failure {
    let constraint = e
        .as_database_error()
        .filter(|d| d.code().as_deref() == Some("23514"))
        .and_then(|d| d.constraint().map(str::to_owned));
    let (flag, rule) = match constraint.as_deref() {
        Some("endpoints_retry_schedule") => (
            "--retry-schedule",
            "1 to 100 delays, each above zero and at most 30 days",
        ),
        Some("endpoints_max_attempts") => ("--max-attempts", "a whole number from 1 to 100"),
        Some("endpoints_max_in_flight_check") => ("--max-in-flight", "at least 1"),
        Some("endpoints_rate_per_minute_check") => ("--rate-per-minute", "at least 1, or `unlimited`"),
        _ => return e.into(),
    };
    usage(
        flag,
        format!("must be {rule} (CHECK {})", constraint.unwrap_or_default()),
    )
}

/// An endpoint's retry schedule for reading, in the form `--retry-schedule`
/// takes: `1m`, `1m30s`, `1h`.
fn schedule_words(seconds: &[f64]) -> Vec<String> {
    seconds
        .iter()
        .map(|s| {
            humantime::format_duration(std::time::Duration::from_secs_f64(s.max(0.0)))
                .to_string()
                .replace(' ', "")
        })
        .collect()
}

pub async fn endpoint(a: EndpointArgs, db: &DbArgs) -> Result<(), Failure> {
    let pool = db.connect(1).await?;
    match a.action {
        EndpointAction::List { json } => list_endpoints(&pool, json).await?,
        EndpointAction::Test(args) => super::probe::run(args, &pool).await?,
        // Both through the SQL functions of migration 0004, as plain SQL
        // would do it.
        EndpointAction::Disable { endpoint, reason } => {
            let id = find_endpoint(&pool, &endpoint).await?;
            sqlx::query("SELECT postbox.disable_endpoint($1, $2)")
                .bind(id)
                .bind(&reason)
                .execute(&pool)
                .await?;
            println!("endpoint {id} disabled; its pending events are kept until it is enabled");
        }
        EndpointAction::Enable { endpoint } => {
            let id = find_endpoint(&pool, &endpoint).await?;
            // "Deliver now": also ends a pause and closes the breaker.
            sqlx::query("SELECT postbox.enable_endpoint($1)")
                .bind(id)
                .execute(&pool)
                .await?;
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
            retry_schedule,
            max_attempts,
        } => {
            let id = find_endpoint(&pool, &endpoint).await?;
            let secret = read_secret(secret, secret_file, secret_env)?;
            let rate: Option<Option<i32>> = match rate_per_minute.as_deref() {
                None => None,
                Some("unlimited") => Some(None),
                Some(s) => Some(Some(s.parse::<i32>().map_err(|_| {
                    usage("--rate-per-minute", "must be a whole number, or `unlimited`")
                })?)),
            };
            let schedule = retry_schedule.as_deref().map(parse_retry_schedule).transpose()?;
            let attempts = max_attempts.as_deref().map(parse_max_attempts).transpose()?;
            // Written in one go; the table's CHECK constraints refuse a value
            // out of range and the whole change is rolled back.
            let mut tx = pool.begin().await?;
            if secret.is_some() || default_secret {
                sqlx::query("UPDATE postbox.endpoints SET secret = $2 WHERE id = $1")
                    .bind(id)
                    .bind(secret.as_deref())
                    .execute(&mut *tx)
                    .await
                    .map_err(endpoint_rule)?;
            }
            if let Some(n) = max_in_flight {
                sqlx::query("UPDATE postbox.endpoints SET max_in_flight = $2 WHERE id = $1")
                    .bind(id)
                    .bind(n)
                    .execute(&mut *tx)
                    .await
                    .map_err(endpoint_rule)?;
            }
            if let Some(r) = rate {
                sqlx::query("UPDATE postbox.endpoints SET rate_per_minute = $2 WHERE id = $1")
                    .bind(id)
                    .bind(r)
                    .execute(&mut *tx)
                    .await
                    .map_err(endpoint_rule)?;
            }
            if let Some(schedule) = &schedule {
                sqlx::query(
                    "UPDATE postbox.endpoints
                     SET retry_schedule = (SELECT array_agg(us * interval '1 microsecond' ORDER BY i)
                                           FROM unnest($2::bigint[]) WITH ORDINALITY AS u(us, i))
                     WHERE id = $1",
                )
                .bind(id)
                .bind(schedule)
                .execute(&mut *tx)
                .await
                .map_err(endpoint_rule)?;
            }
            if let Some(n) = attempts {
                sqlx::query("UPDATE postbox.endpoints SET max_attempts = $2 WHERE id = $1")
                    .bind(id)
                    .bind(n)
                    .execute(&mut *tx)
                    .await
                    .map_err(endpoint_rule)?;
            }
            tx.commit().await?;
            println!("endpoint {id} updated");
            if attempts.is_some() {
                println!("(max attempts apply to events enqueued from now on; events already enqueued keep theirs)");
            }
        }
    }
    Ok(())
}

/// The secret given to `endpoint set`, from the command line, a file,
/// standard input or an environment variable, checked; surrounding
/// whitespace (a file's final newline) is ignored.
pub(super) fn read_secret(
    arg: Option<String>,
    file: Option<String>,
    env: Option<String>,
) -> Result<Option<String>, Failure> {
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

/// `endpoint list`: every endpoint with its limits, retry policy, state and
/// pending backlog. Secrets are never printed, only whether there is one.
async fn list_endpoints(pool: &sqlx::PgPool, json: bool) -> Result<(), Failure> {
    let rows = sqlx::query(
        "SELECT e.id, e.url, e.max_in_flight, e.rate_per_minute, e.secret IS NOT NULL AS own_secret,
                postbox.endpoint_state_words(e, s) AS state, e.disabled_at, e.disabled_reason, e.max_attempts,
                (SELECT array_agg(extract(epoch FROM d)::float8 ORDER BY i)
                 FROM unnest(e.retry_schedule) WITH ORDINALITY AS r(d, i)) AS retry_schedule,
                (SELECT count(*) FROM postbox.outbox o WHERE o.endpoint_id = e.id AND o.status = 'pending') AS pending
         FROM postbox.endpoints e JOIN postbox.endpoint_state s ON s.endpoint_id = e.id ORDER BY e.id",
    )
    .fetch_all(pool)
    .await?;
    if json {
        let list: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                let schedule: Option<Vec<f64>> = r.get("retry_schedule");
                serde_json::json!({
                    "id": r.get::<i64, _>("id"),
                    "url": r.get::<String, _>("url"),
                    "pending": r.get::<i64, _>("pending"),
                    "max_in_flight": r.get::<i32, _>("max_in_flight"),
                    "rate_per_minute": r.get::<Option<i32>, _>("rate_per_minute"),
                    "own_secret": r.get::<bool, _>("own_secret"),
                    "state": r.get::<String, _>("state"),
                    "disabled_at": r.get::<Option<DateTime<Utc>>, _>("disabled_at")
                        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
                    "disabled_reason": r.get::<Option<String>, _>("disabled_reason"),
                    "retry_schedule": schedule.as_deref().map(schedule_words),
                    "max_attempts": r.get::<Option<i32>, _>("max_attempts"),
                })
            })
            .collect();
        super::print_json(&serde_json::Value::Array(list));
        return Ok(());
    }
    println!(
        "{:>5}  {:>8} {:>9} {:>8}  {:<7}  {:>8}  {:<16}  {:<40}  state",
        "id", "pending", "in-flight", "rate/min", "secret", "attempts", "retry schedule", "url"
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
        let attempts = r
            .get::<Option<i32>, _>("max_attempts")
            .map_or("default".to_string(), |n| n.to_string());
        let schedule = r
            .get::<Option<Vec<f64>>, _>("retry_schedule")
            .map_or("default".to_string(), |s| schedule_words(&s).join(","));
        println!(
            "{:>5}  {:>8} {:>9} {:>8}  {:<7}  {:>8}  {:<16}  {:<40}  {}",
            r.get::<i64, _>("id"),
            r.get::<i64, _>("pending"),
            r.get::<i32, _>("max_in_flight"),
            rate,
            secret,
            attempts,
            schedule,
            r.get::<String, _>("url"),
            r.get::<String, _>("state"),
        );
    }
    Ok(())
}
