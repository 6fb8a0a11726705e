//! `postbox event show ID`: one event's story — its ids, where it stands in
//! words, its payload and every attempt — read from `postbox.event_story`
//! (migration 0003) and the outbox row's payload.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};
use sqlx::Row;
use uuid::Uuid;

use super::{DbArgs, Failure};

/// `postbox event`.
#[derive(Debug, clap::Args)]
pub struct EventArgs {
    #[command(subcommand)]
    action: EventAction,
}

#[derive(Debug, clap::Subcommand)]
enum EventAction {
    /// One event's story: payload, attempts, and why it waits if it does.
    Show {
        /// An event id (`webhook-id`), a message id, or a conversation id
        /// (then every event of that conversation).
        #[arg(value_name = "ID")]
        id: String,
        /// Print JSON: an object for one event, an array for several.
        #[arg(long)]
        json: bool,
    },
}

/// One attempt of an event, from `postbox.attempts`.
struct Attempt {
    attempt: i32,
    worker_id: Option<String>,
    started_at: Option<DateTime<Utc>>,
    duration_ms: Option<i32>,
    status_code: Option<i32>,
    error_kind: Option<String>,
    error: Option<String>,
    /// The first 200 characters of the stored response body.
    response_body: Option<String>,
}

/// One event and its attempts.
struct Story {
    id: Uuid,
    conversation_id: Uuid,
    message_id: Uuid,
    endpoint_id: i64,
    url: String,
    status: String,
    attempts: i32,
    max_attempts: i32,
    ordering_key: Option<String>,
    created_at: DateTime<Utc>,
    /// `None` while the event waits behind its ordering key (`infinity`).
    next_attempt_at: Option<DateTime<Utc>>,
    delivered_at: Option<DateTime<Utc>>,
    /// Where it stands, in words (`postbox.event_state`).
    state: String,
    payload: Value,
    log: Vec<Attempt>,
}

pub async fn run(a: EventArgs, db: &DbArgs) -> Result<(), Failure> {
    match a.action {
        EventAction::Show { id, json } => show(&id, json, db).await,
    }
}

async fn show(raw: &str, json: bool, db: &DbArgs) -> Result<(), Failure> {
    let key = Uuid::parse_str(raw.trim()).map_err(|_| {
        Failure::Usage(format!(
            "ID: {raw:?} is not a UUID: give an event id (webhook-id), a message id or a conversation id"
        ))
    })?;
    let pool = db.connect(1).await?;
    let stories = load(&pool, key).await?;
    if stories.is_empty() {
        return Err(Failure::Usage(format!(
            "ID: no event has the event, message or conversation id {key}"
        )));
    }
    if json {
        let out = match stories.as_slice() {
            [one] => story_json(one),
            many => Value::Array(many.iter().map(story_json).collect()),
        };
        super::print_json(&out);
        return Ok(());
    }
    for (i, s) in stories.iter().enumerate() {
        if i > 0 {
            println!();
        }
        print_story(s, i + 1, stories.len());
    }
    Ok(())
}

/// Every event matching `key`, oldest first, with its attempts in order.
async fn load(pool: &sqlx::PgPool, key: Uuid) -> Result<Vec<Story>, Failure> {
    // `infinity` (an event parked behind its key) has no chrono value.
    let rows = sqlx::query(
        "SELECT s.event_id, s.conversation_id, s.message_id, s.url, s.status, s.attempts, s.max_attempts,
                s.created_at, nullif(s.next_attempt_at, 'infinity') AS next_attempt_at, s.delivered_at, s.state,
                s.attempt, s.worker_id, s.started_at, s.duration_ms, s.status_code, s.error_kind, s.error,
                s.response_body, o.payload, o.endpoint_id, o.ordering_key
         FROM postbox.event_story($1) WITH ORDINALITY AS s
         JOIN postbox.outbox o ON o.id = s.event_id
         ORDER BY s.ordinality",
    )
    .bind(key)
    .fetch_all(pool)
    .await?;
    let mut stories: Vec<Story> = Vec::new();
    for r in rows {
        let id: Uuid = r.try_get("event_id")?;
        if stories.last().is_none_or(|s| s.id != id) {
            stories.push(Story {
                id,
                conversation_id: r.try_get("conversation_id")?,
                message_id: r.try_get("message_id")?,
                endpoint_id: r.try_get("endpoint_id")?,
                url: r.try_get("url")?,
                status: r.try_get("status")?,
                attempts: r.try_get("attempts")?,
                max_attempts: r.try_get("max_attempts")?,
                ordering_key: r.try_get("ordering_key")?,
                created_at: r.try_get("created_at")?,
                next_attempt_at: r.try_get("next_attempt_at")?,
                delivered_at: r.try_get("delivered_at")?,
                state: r.try_get::<Option<String>, _>("state")?.unwrap_or_default(),
                payload: r.try_get("payload")?,
                log: Vec::new(),
            });
        }
        if let Some(attempt) = r.try_get::<Option<i32>, _>("attempt")? {
            let story = stories.last_mut().expect("pushed above");
            story.log.push(Attempt {
                attempt,
                worker_id: r.try_get("worker_id")?,
                started_at: r.try_get("started_at")?,
                duration_ms: r.try_get("duration_ms")?,
                status_code: r.try_get("status_code")?,
                error_kind: r.try_get("error_kind")?,
                error: r.try_get("error")?,
                response_body: r.try_get("response_body")?,
            });
        }
    }
    Ok(stories)
}

/// RFC 3339 in UTC with milliseconds.
fn time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn story_json(s: &Story) -> Value {
    let log: Vec<Value> = s
        .log
        .iter()
        .map(|a| {
            json!({
                "attempt": a.attempt,
                "worker_id": a.worker_id,
                "started_at": a.started_at.as_ref().map(time),
                "duration_ms": a.duration_ms,
                "status_code": a.status_code,
                "error_kind": a.error_kind,
                "error": a.error,
                "response_body": a.response_body,
            })
        })
        .collect();
    json!({
        "id": s.id,
        "conversation_id": s.conversation_id,
        "message_id": s.message_id,
        "endpoint_id": s.endpoint_id,
        "url": s.url,
        "status": s.status,
        "attempts": s.attempts,
        "max_attempts": s.max_attempts,
        "ordering_key": s.ordering_key,
        "created_at": time(&s.created_at),
        "next_attempt_at": s.next_attempt_at.as_ref().map(time),
        "delivered_at": s.delivered_at.as_ref().map(time),
        "state": s.state,
        "payload": s.payload,
        "attempt_log": log,
    })
}

/// Text on one line, cut to `max` characters (with `…` when cut).
fn one_line(s: &str, max: usize) -> String {
    let flat = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        flat
    } else {
        let mut cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

fn print_story(s: &Story, n: usize, of: usize) {
    let opt = |t: &Option<DateTime<Utc>>| t.as_ref().map_or_else(|| "-".to_string(), time);
    if of > 1 {
        println!("event {} ({n} of {of})", s.id);
    } else {
        println!("event {}", s.id);
    }
    println!("  conversation   {}", s.conversation_id);
    println!("  message        {}", s.message_id);
    println!("  endpoint       {} (id {})", s.url, s.endpoint_id);
    if let Some(k) = &s.ordering_key {
        println!("  ordering key   {k}");
    }
    println!("  status         {}", s.status);
    println!("  attempts       {} of {}", s.attempts, s.max_attempts);
    println!("  created        {}", time(&s.created_at));
    let next = match (&s.next_attempt_at, s.status.as_str()) {
        (_, "delivered" | "failed" | "cancelled") => "-".to_string(),
        (None, _) => "when the events before it under its key are done".to_string(),
        (t, _) => opt(t),
    };
    println!("  next attempt   {next}");
    println!("  delivered      {}", opt(&s.delivered_at));
    println!("  state          {}", s.state);
    println!("payload:");
    let pretty = serde_json::to_string_pretty(&s.payload).unwrap_or_else(|_| s.payload.to_string());
    for line in pretty.lines() {
        println!("  {line}");
    }
    if s.log.is_empty() {
        println!("attempts: none yet");
        return;
    }
    println!("attempts:");
    println!(
        "  {:>3}  {:<24}  {:>8}  {:>6}  {:<14}  {:<40}  response",
        "#", "started_at", "ms", "status", "error_kind", "error"
    );
    for a in &s.log {
        let dash = || "-".to_string();
        println!(
            "  {:>3}  {:<24}  {:>8}  {:>6}  {:<14}  {:<40}  {}",
            a.attempt,
            a.started_at.as_ref().map_or_else(dash, time),
            a.duration_ms.map_or_else(dash, |d| d.to_string()),
            a.status_code.map_or_else(dash, |c| c.to_string()),
            a.error_kind.as_deref().unwrap_or("-"),
            a.error.as_deref().map_or_else(dash, |e| one_line(e, 200)),
            a.response_body.as_deref().map_or_else(dash, |b| one_line(b, 80)),
        );
    }
}
