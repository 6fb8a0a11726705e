//! `postbox endpoint`: list, disable, enable, set (secret, limits, retry
//! policy) and test an endpoint.

use super::admin::usage;
use super::{DbArgs, Failure};
use chrono::{DateTime, Utc};
use sqlx::Row;
pub(super) async fn find_endpoint(pool: &sqlx::PgPool, key: &str) -> Result<i64, Failure> {
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
            // One statement: the table's CHECK constraints refuse a value out
            // of range, and then nothing is written. For each setting, $n
            // says whether it was given and $n+1 is the new value (NULL =
            // the default).
            sqlx::query(
                "UPDATE postbox.endpoints
                 SET secret          = CASE WHEN $2 THEN $3 ELSE secret END,
                     max_in_flight   = coalesce($4, max_in_flight),
                     rate_per_minute = CASE WHEN $5 THEN $6 ELSE rate_per_minute END,
                     retry_schedule  = CASE WHEN $7 THEN
                                           (SELECT array_agg(us * interval '1 microsecond' ORDER BY i)
                                            FROM unnest($8::bigint[]) WITH ORDINALITY AS u(us, i))
                                       ELSE retry_schedule END,
                     max_attempts    = CASE WHEN $9 THEN $10 ELSE max_attempts END
                 WHERE id = $1",
            )
            .bind(id)
            .bind(secret.is_some() || default_secret)
            .bind(secret.as_deref())
            .bind(max_in_flight)
            .bind(rate.is_some())
            .bind(rate.flatten())
            .bind(schedule.is_some())
            .bind(schedule.flatten())
            .bind(attempts.is_some())
            .bind(attempts.flatten())
            .execute(&pool)
            .await
            .map_err(endpoint_rule)?;
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
