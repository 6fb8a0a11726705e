//! `postbox endpoint test URL`: one signed probe POST, sent as a worker
//! would send it — the database's URL rule, the worker's HTTP client and
//! SSRF guard, the same secret choice and retry decision — with nothing
//! written to the outbox or the attempt log.

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use postbox::config::parse_bool;
use postbox::delivery::guard::{classify, Reserved};
use postbox::delivery::{Client, Decision, ErrorKind, Next, Response, Secrets};
use postbox::{ConfigError, Message, Payload, WorkerConfig};
use serde_json::{json, Value};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::worker::WorkerArgs;
use super::Failure;

/// The conversation every probe claims to belong to: receivers can
/// recognise (and ignore) probes by it or by `metadata.postbox_test`.
pub const TEST_CONVERSATION_ID: Uuid = Uuid::from_u128(0x7e57_0000_0000_4000_8000_0000_0000_0001);
/// The message id of every probe.
pub const TEST_MESSAGE_ID: Uuid = Uuid::from_u128(0x7e57_0000_0000_4000_8000_0000_0000_0002);
/// The content of every probe.
pub const TEST_CONTENT: &str = "postbox endpoint test";

/// `postbox endpoint test URL`. Delivery settings not given here
/// (`POSTBOX_ALLOWED_NETWORKS`, `POSTBOX_CA_CERT`, `POSTBOX_REQUEST_TIMEOUT`,
/// `POSTBOX_RETRY_SCHEDULE`, …) are read from the environment exactly as
/// `postbox worker` reads them.
#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    /// The callback URL to probe.
    url: String,
    /// Print the verdict as JSON.
    #[arg(long)]
    json: bool,
    /// Sign with this secret (`whsec_…`) when URL is not an endpoint with
    /// its own; visible to `ps`: prefer --secret-file or --secret-env.
    #[arg(long, conflicts_with_all = ["secret_file", "secret_env"])]
    secret: Option<String>,
    /// Read that secret from this file (`-` reads standard input).
    #[arg(long, conflicts_with = "secret_env")]
    secret_file: Option<String>,
    /// Read that secret from this environment variable.
    #[arg(long, value_name = "VAR")]
    secret_env: Option<String>,
    /// Accept a plain http:// URL (also for the database's URL rule) [default: false].
    #[arg(long, env = "POSTBOX_ALLOW_HTTP", num_args = 0..=1, default_missing_value = "true")]
    allow_http: Option<String>,
    /// Allow loopback, private and other non-public destinations [default: false].
    #[arg(
        long,
        env = "POSTBOX_ALLOW_PRIVATE_NETWORKS",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    allow_private_networks: Option<String>,
    /// Send the probe unsigned when no secret applies [default: false: refuse].
    #[arg(long, env = "POSTBOX_ALLOW_UNSIGNED", num_args = 0..=1, default_missing_value = "true")]
    allow_unsigned: Option<String>,
}

impl ProbeArgs {
    /// The configuration a worker started here would run with: `postbox
    /// worker`'s own parsing of its flags and `POSTBOX_*` variables
    /// (src/cli/worker.rs), fed from the environment, with this command's
    /// switches on top. Also returns whether unsigned sending is allowed,
    /// which is decided per probe (an endpoint may have its own secret).
    fn worker_config(&self) -> Result<(WorkerConfig, bool), Failure> {
        use clap::{Args, FromArgMatches};
        let command = WorkerArgs::augment_args(clap::Command::new("postbox worker").no_binary_name(true));
        let matches = command
            .try_get_matches_from(std::iter::empty::<String>())
            .map_err(|e| Failure::Usage(e.to_string()))?;
        let mut w = WorkerArgs::from_arg_matches(&matches).map_err(|e| Failure::Usage(e.to_string()))?;
        if self.allow_http.is_some() {
            w.allow_http.clone_from(&self.allow_http);
        }
        if self.allow_private_networks.is_some() {
            w.allow_private_networks.clone_from(&self.allow_private_networks);
        }
        let unsigned = self.allow_unsigned.as_ref().or(w.allow_unsigned.as_ref());
        let allow_unsigned = match unsigned {
            Some(v) => parse_bool("POSTBOX_ALLOW_UNSIGNED", v).map_err(Failure::Config)?,
            None => false,
        };
        // Checked below against the secret this probe would use.
        w.allow_unsigned = Some("true".into());
        let config = w.config().map_err(Failure::Config)?;
        Ok((config, allow_unsigned))
    }
}

/// What is known of URL as an endpoint.
struct Known {
    id: i64,
    secret: Option<String>,
    state: String,
    max_attempts: i32,
    schedule: Option<Vec<Duration>>,
}

/// Which secret signs the probe.
#[derive(Clone, Copy)]
enum SignedWith {
    Endpoint,
    Given,
    Default,
    Unsigned,
}

impl SignedWith {
    fn key(self) -> &'static str {
        match self {
            SignedWith::Endpoint => "endpoint_secret",
            SignedWith::Given => "given_secret",
            SignedWith::Default => "default_secret",
            SignedWith::Unsigned => "unsigned",
        }
    }

    fn words(self) -> &'static str {
        match self {
            SignedWith::Endpoint => "the endpoint's own secret",
            SignedWith::Given => "the given secret",
            SignedWith::Default => "the default secret (POSTBOX_SIGNING_SECRET)",
            SignedWith::Unsigned => "nothing: sent unsigned (POSTBOX_ALLOW_UNSIGNED)",
        }
    }
}

/// One address the host resolves to, and the guard's verdict on it.
struct Address {
    ip: IpAddr,
    class: Option<Reserved>,
    allowed: bool,
    /// The setting that lets a non-public address through.
    allowed_by: Option<&'static str>,
}

pub async fn run(a: ProbeArgs, pool: &PgPool) -> Result<(), Failure> {
    let (config, allow_unsigned) = a.worker_config()?;
    let given = super::endpoint::read_secret(a.secret.clone(), a.secret_file.clone(), a.secret_env.clone())?;
    check_url(pool, &a.url, config.client.allow_http).await?;
    let known = find(pool, &a.url).await?;

    let own = match known.as_ref().and_then(|k| k.secret.as_deref()).map(Secrets::parse) {
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => {
            eprintln!(
                "note: the endpoint's own secret is invalid ({e}); a worker signs with the default secret instead"
            );
            None
        }
        None => None,
    };
    if own.is_some() && given.is_some() {
        eprintln!(
            "note: {} has its own secret, which a worker signs with: the given secret is not used",
            a.url
        );
    }
    let given = given
        .map(|s| Secrets::parse(&s))
        .transpose()
        .map_err(|e| Failure::Usage(e.to_string()))?;
    let (secrets, signed_with) = match (own, given, config.signing_secret.clone()) {
        (Some(s), _, _) => (Some(s), SignedWith::Endpoint),
        (None, Some(s), _) => (Some(s), SignedWith::Given),
        (None, None, Some(s)) => (Some(s), SignedWith::Default),
        (None, None, None) if allow_unsigned => (None, SignedWith::Unsigned),
        (None, None, None) => {
            return Err(Failure::Config(ConfigError::new(
                "POSTBOX_SIGNING_SECRET",
                format!(
                    "is not set and {} has no secret of its own, so the probe would go unsigned: \
                     give --secret-file, --secret-env or --secret, set POSTBOX_SIGNING_SECRET, \
                     or pass --allow-unsigned to send it unsigned on purpose",
                    a.url
                ),
            )))
        }
    };

    // Database time, as a worker signs with.
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(pool).await?;
    let webhook_id = Uuid::now_v7();
    let body = probe_body(now);
    let signature = secrets
        .as_ref()
        .map(|s| s.sign(&webhook_id.to_string(), now.timestamp(), &body));
    let (addresses, resolve_error) = resolve(&a.url, &config).await;
    let client = Client::new(config.client.clone()).map_err(super::worker::client_failure)?;
    let resp = client
        .post(
            &a.url,
            &webhook_id.to_string(),
            now.timestamp(),
            signature.as_deref(),
            body,
        )
        .await;

    let max_attempts = match &known {
        Some(k) => k.max_attempts,
        None => {
            sqlx::query_scalar("SELECT postbox.default_max_attempts()")
                .fetch_one(pool)
                .await?
        }
    };
    let decision = config.retry.decide_with(
        known.as_ref().and_then(|k| k.schedule.as_deref()),
        1,
        max_attempts,
        &resp,
        0.0,
    );
    let verdict = Verdict {
        url: &a.url,
        webhook_id,
        known: known.as_ref(),
        signed_with,
        addresses: &addresses,
        resolve_error: resolve_error.as_deref(),
        tls: tls_outcome(&a.url, &resp, config.client.extra_roots_pem.is_some()),
        resp: &resp,
        decision: &decision,
        max_attempts,
    };
    if a.json {
        super::print_json(&verdict.json());
    } else {
        verdict.print();
    }
    if resp.error.is_none() {
        Ok(())
    } else {
        Err(Failure::Runtime(format!(
            "the receiver did not accept the probe ({})",
            resp.error.map_or("other", ErrorKind::as_str)
        )))
    }
}

/// Checks `url` with the database's rule, `postbox.check_callback_url`, as
/// enqueue does; `allow_http` turns `postbox.allow_http` on for the check.
async fn check_url(pool: &PgPool, url: &str, allow_http: bool) -> Result<(), Failure> {
    let mut tx = pool.begin().await?;
    if allow_http {
        sqlx::query("SET LOCAL postbox.allow_http = on")
            .execute(&mut *tx)
            .await?;
    }
    let checked = sqlx::query("SELECT postbox.check_callback_url($1)")
        .bind(url)
        .execute(&mut *tx)
        .await;
    tx.rollback().await?;
    match checked {
        Ok(_) => Ok(()),
        Err(e) => match postbox::enqueue::invalid_field(&e) {
            Some((field, problem)) => Err(Failure::Usage(format!("{field}: {problem}"))),
            None => Err(e.into()),
        },
    }
}

/// The endpoint registered for exactly `url`, if any.
async fn find(pool: &PgPool, url: &str) -> Result<Option<Known>, Failure> {
    let row = sqlx::query(
        "SELECT e.id, e.secret, postbox.endpoint_state_words(e, s) AS state,
                coalesce(e.max_attempts, postbox.default_max_attempts()) AS max_attempts,
                (SELECT array_agg(extract(epoch FROM d)::float8 ORDER BY i)
                 FROM unnest(e.retry_schedule) WITH ORDINALITY AS r(d, i)) AS schedule
         FROM postbox.endpoints e JOIN postbox.endpoint_state s ON s.endpoint_id = e.id
         WHERE e.url = $1",
    )
    .bind(url)
    .fetch_optional(pool)
    .await?;
    let Some(r) = row else { return Ok(None) };
    let schedule: Option<Vec<f64>> = r.try_get("schedule")?;
    Ok(Some(Known {
        id: r.try_get("id")?,
        secret: r.try_get("secret")?,
        state: r.try_get("state")?,
        max_attempts: r.try_get("max_attempts")?,
        schedule: schedule.map(|s| s.into_iter().map(|x| Duration::from_secs_f64(x.max(0.0))).collect()),
    }))
}

/// A well-formed message event of the seed's shape, marked as a test:
/// fixed conversation and message ids, content `postbox endpoint test`
/// and `metadata.postbox_test = true`.
fn probe_body(now: DateTime<Utc>) -> Bytes {
    let mut message = Message::text(TEST_MESSAGE_ID, TEST_CONTENT, "postbox", now);
    let mut metadata = serde_json::Map::new();
    metadata.insert("postbox_test".into(), Value::Bool(true));
    message.metadata = Some(metadata);
    let payload = Payload {
        conversation_id: TEST_CONVERSATION_ID,
        data: message,
        timestamp: now,
    };
    Bytes::from(serde_json::to_vec(&payload).expect("a payload always serialises"))
}

/// The addresses the URL's host resolves to, each with the guard's verdict
/// under `config`'s network policy. The client resolves again when it
/// sends, and its answer is the one that counts; this is for the reader.
async fn resolve(url: &str, config: &WorkerConfig) -> (Vec<Address>, Option<String>) {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return (Vec::new(), Some("the URL cannot be parsed".into()));
    };
    let ips: Vec<IpAddr> = match parsed.host() {
        Some(url::Host::Ipv4(ip)) => vec![IpAddr::V4(ip)],
        Some(url::Host::Ipv6(ip)) => vec![IpAddr::V6(ip)],
        Some(url::Host::Domain(name)) => {
            let lookup = tokio::net::lookup_host((name, 0));
            match tokio::time::timeout(config.client.request_timeout, lookup).await {
                Ok(Ok(addrs)) => {
                    let mut ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
                    ips.dedup();
                    ips
                }
                Ok(Err(e)) => return (Vec::new(), Some(format!("DNS lookup of {name} failed: {e}"))),
                Err(_) => return (Vec::new(), Some(format!("DNS lookup of {name} timed out"))),
            }
        }
        None => return (Vec::new(), Some("the URL has no host".into())),
    };
    let host = parsed.host_str().unwrap_or_default();
    let addresses = ips
        .into_iter()
        .map(|ip| {
            let class = classify(ip);
            let allowed = config.client.network.check(host, ip).is_ok();
            let allowed_by = match (class, allowed) {
                (Some(_), true) if config.client.network.allow_private => Some("POSTBOX_ALLOW_PRIVATE_NETWORKS"),
                (Some(_), true) => Some("POSTBOX_ALLOWED_NETWORKS"),
                _ => None,
            };
            Address {
                ip,
                class,
                allowed,
                allowed_by,
            }
        })
        .collect();
    (addresses, None)
}

/// What happened to TLS: `(key, words)`.
fn tls_outcome(url: &str, resp: &Response, extra_roots: bool) -> (&'static str, String) {
    if !url.get(..8).is_some_and(|s| s.eq_ignore_ascii_case("https://")) {
        return ("not_used", "not used (plain http://)".into());
    }
    match (resp.error, resp.status) {
        (Some(ErrorKind::Tls), _) => (
            "failed",
            format!("failed: {}", resp.message.as_deref().unwrap_or("TLS error")),
        ),
        (_, Some(_)) => (
            "verified",
            format!(
                "verified (certificate chain and host name, against the system roots{})",
                if extra_roots { " and POSTBOX_CA_CERT" } else { "" }
            ),
        ),
        (Some(ErrorKind::Blocked | ErrorKind::Connect), _) => {
            ("not_reached", "not reached (no connection was made)".into())
        }
        (Some(ErrorKind::Timeout), _) => ("not_completed", "not completed (no answer in time)".into()),
        _ => ("unknown", "unknown (the request failed before a response)".into()),
    }
}

/// Everything the probe found out, for printing.
struct Verdict<'a> {
    url: &'a str,
    webhook_id: Uuid,
    known: Option<&'a Known>,
    signed_with: SignedWith,
    addresses: &'a [Address],
    resolve_error: Option<&'a str>,
    tls: (&'static str, String),
    resp: &'a Response,
    decision: &'a Decision,
    max_attempts: i32,
}

impl Verdict<'_> {
    fn ssrf(&self) -> &'static str {
        if self.resp.error == Some(ErrorKind::Blocked) || self.addresses.iter().any(|a| !a.allowed) {
            "blocked"
        } else if self.addresses.is_empty() {
            "unknown"
        } else {
            "allowed"
        }
    }

    /// `(key, words)`: what a worker would do with an event after this attempt.
    fn worker_would(&self) -> (&'static str, String) {
        match self.decision.next {
            Next::Delivered => ("delivered", "mark the event delivered".into()),
            Next::Retry { after } => (
                "retry",
                format!(
                    "retry in {} (this was attempt 1 of {})",
                    humantime::format_duration(after),
                    self.max_attempts
                ),
            ),
            Next::Failed if self.resp.error == Some(ErrorKind::Blocked) => (
                "failed",
                "fail the event at once (a blocked destination is never retried)".into(),
            ),
            Next::Failed => (
                "failed",
                format!("fail the event (its {} attempt(s) are spent)", self.max_attempts),
            ),
            Next::Gone => (
                "endpoint_disabled",
                "disable the endpoint (410 Gone); its events are kept until it is enabled".into(),
            ),
        }
    }

    fn json(&self) -> Value {
        let (would, would_words) = self.worker_would();
        let addresses: Vec<Value> = self
            .addresses
            .iter()
            .map(|a| {
                json!({
                    "address": a.ip.to_string(),
                    "class": a.class.map_or_else(|| "public".to_string(), |c| c.to_string()),
                    "allowed": a.allowed,
                    "allowed_by": a.allowed_by,
                })
            })
            .collect();
        json!({
            "url": self.url,
            "webhook_id": self.webhook_id,
            "endpoint": self.known.map(|k| json!({"id": k.id, "state": k.state, "held": k.state != "ok"})),
            "signed_with": self.signed_with.key(),
            "addresses": addresses,
            "resolve_error": self.resolve_error,
            "ssrf": self.ssrf(),
            "tls": self.tls.0,
            "tls_detail": self.tls.1,
            "status_code": self.resp.status,
            "duration_ms": self.resp.elapsed.as_millis() as u64,
            "error_kind": self.resp.error.map(ErrorKind::as_str),
            "error": self.resp.message,
            "response_body": self.resp.body,
            "accepted": self.resp.error.is_none(),
            "worker_would": would,
            "retry_in_ms": match self.decision.next {
                Next::Retry { after } => Some(after.as_millis() as u64),
                _ => None,
            },
            "worker_would_detail": would_words,
        })
    }

    fn print(&self) {
        let dash = || "-".to_string();
        println!("probe POST {}", self.url);
        println!("  webhook-id     {}", self.webhook_id);
        match self.known {
            Some(k) => println!("  endpoint       id {}, {}", k.id, k.state),
            None => println!("  endpoint       not registered (nothing has been enqueued for this URL)"),
        }
        println!("  signed with    {}", self.signed_with.words());
        if let Some(e) = self.resolve_error {
            println!("  addresses      {e}");
        }
        for (i, a) in self.addresses.iter().enumerate() {
            let class = a.class.map_or_else(|| "public".to_string(), |c| c.to_string());
            let verdict = match (a.allowed, a.allowed_by) {
                (true, Some(by)) => format!("allowed by {by}"),
                (true, None) => "allowed".to_string(),
                (false, _) => "refused".to_string(),
            };
            let label = if i == 0 { "addresses" } else { "" };
            println!("  {label:<14} {} ({class}): {verdict}", a.ip);
        }
        println!("  ssrf guard     {}", self.ssrf());
        println!("  tls            {}", self.tls.1);
        println!(
            "  http status    {}",
            self.resp.status.map_or_else(dash, |s| s.to_string())
        );
        println!("  duration       {} ms", self.resp.elapsed.as_millis());
        println!("  error kind     {}", self.resp.error.map_or("-", ErrorKind::as_str));
        if let Some(m) = &self.resp.message {
            println!("  error          {m}");
        }
        if let Some(b) = self.resp.body.as_deref().filter(|b| !b.is_empty()) {
            let flat: String = b.split_whitespace().collect::<Vec<_>>().join(" ");
            let cut: String = flat.chars().take(200).collect();
            println!("  response       {cut}");
        }
        if let Some(k) = self.known.filter(|k| k.state != "ok") {
            println!("note: a worker holds this endpoint's events for now ({})", k.state);
        }
        let (_, would) = self.worker_would();
        let accepted = if self.resp.error.is_none() {
            "accepted"
        } else {
            "not accepted"
        };
        println!("verdict: {accepted}; a worker would {would}");
    }
}
