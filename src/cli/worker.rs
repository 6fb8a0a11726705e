//! `postbox worker`: flags and `POSTBOX_*` variables → [`WorkerConfig`].

use std::time::Duration;

use postbox::config::{parse_bool, parse_duration, parse_fraction, parse_schedule};
use postbox::delivery::{ClientError, NetworkPolicy, Secrets};
use postbox::{ConfigError, Worker, WorkerConfig};

use super::{DbArgs, Failure};

/// Worker settings. Each flag falls back to its environment variable, then
/// to the default shown. Yes/no settings are switches (`--allow-http`) that
/// also take a value (`--allow-http=false`) and read `true/false`, `1/0`,
/// `yes/no` or `on/off` from the environment.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// Exit 0 once nothing is due or in flight.
    #[arg(long)]
    pub until_empty: bool,
    /// Default signing secret(s), `whsec_…`, space separated.
    #[arg(long, env = "POSTBOX_SIGNING_SECRET", hide_env_values = true)]
    pub signing_secret: Option<String>,
    /// Send unsigned webhooks when no default secret is set [default: false: refuse to start].
    #[arg(long, env = "POSTBOX_ALLOW_UNSIGNED", num_args = 0..=1, default_missing_value = "true")]
    pub allow_unsigned: Option<String>,
    /// Deliveries in flight at once in this process [default: 64].
    #[arg(long, env = "POSTBOX_CONCURRENCY")]
    pub concurrency: Option<String>,
    /// Events claimed per claim statement [default: 100].
    #[arg(long, env = "POSTBOX_BATCH_SIZE")]
    pub batch_size: Option<String>,
    /// Poll for due events this often when idle [default: 1s].
    #[arg(long, env = "POSTBOX_POLL_INTERVAL")]
    pub poll_interval: Option<String>,
    /// Lease on a claimed event; must exceed the request timeout by 5s [default: 60s].
    #[arg(long, env = "POSTBOX_LEASE")]
    pub lease: Option<String>,
    /// Deadline for one attempt [default: 30s].
    #[arg(long, env = "POSTBOX_REQUEST_TIMEOUT")]
    pub request_timeout: Option<String>,
    /// Delays after the 1st, 2nd, 3rd… failure [default: 4s,8s,10s].
    #[arg(long, env = "POSTBOX_RETRY_SCHEDULE")]
    pub retry_schedule: Option<String>,
    /// Extra random delay, at most 20% [default: 0%].
    #[arg(long, env = "POSTBOX_RETRY_JITTER")]
    pub retry_jitter: Option<String>,
    /// Longest Retry-After honoured [default: 10m].
    #[arg(long, env = "POSTBOX_MAX_RETRY_AFTER")]
    pub max_retry_after: Option<String>,
    /// Accept plain http:// callback URLs [default: false].
    #[arg(long, env = "POSTBOX_ALLOW_HTTP", num_args = 0..=1, default_missing_value = "true")]
    pub allow_http: Option<String>,
    /// Allow loopback, private and other non-public destinations [default: false].
    #[arg(
        long,
        env = "POSTBOX_ALLOW_PRIVATE_NETWORKS",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub allow_private_networks: Option<String>,
    /// Non-public networks allowed anyway, comma-separated CIDRs.
    #[arg(long, env = "POSTBOX_ALLOWED_NETWORKS")]
    pub allowed_networks: Option<String>,
    /// Extra trusted CA certificates (PEM file).
    #[arg(long, env = "POSTBOX_CA_CERT")]
    pub ca_cert: Option<String>,
    /// Serve /metrics, /healthz and /readyz on this address.
    #[arg(long, env = "POSTBOX_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// This worker's id [default: host-pid-random].
    #[arg(long, env = "POSTBOX_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Delete delivered and cancelled events older than this; `off` keeps them [default: 7d].
    #[arg(long, env = "POSTBOX_RETENTION")]
    pub retention: Option<String>,
    /// Delete failed events older than this [default: off: kept until replayed].
    #[arg(long, env = "POSTBOX_FAILED_RETENTION")]
    pub failed_retention: Option<String>,
    /// How often workers prune [default: 1m].
    #[arg(long, env = "POSTBOX_RETENTION_INTERVAL")]
    pub retention_interval: Option<String>,
    /// Distinct events failing in a row that open an endpoint's breaker [default: 5].
    #[arg(long, env = "POSTBOX_BREAKER_THRESHOLD")]
    pub breaker_threshold: Option<String>,
    /// How long an open breaker waits before its first probe [default: 30s].
    #[arg(long, env = "POSTBOX_BREAKER_COOLDOWN")]
    pub breaker_cooldown: Option<String>,
    /// Longest wait between probes (each failed probe doubles it) [default: 10m].
    #[arg(long, env = "POSTBOX_BREAKER_MAX_COOLDOWN")]
    pub breaker_max_cooldown: Option<String>,
    /// Time given to in-flight deliveries on shutdown [default: 30s].
    #[arg(long, env = "POSTBOX_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<String>,
}

fn set<T>(
    value: &Option<String>,
    var: &'static str,
    parse: impl Fn(&'static str, &str) -> Result<T, ConfigError>,
    target: &mut T,
) -> Result<(), ConfigError> {
    if let Some(v) = value {
        *target = parse(var, v)?;
    }
    Ok(())
}

/// A duration, or `off` for none.
fn parse_optional_duration(var: &'static str, s: &str) -> Result<Option<Duration>, ConfigError> {
    match s.trim() {
        "off" | "none" | "" => Ok(None),
        other => parse_duration(var, other).map(Some),
    }
}

fn parse_count(var: &'static str, s: &str) -> Result<usize, ConfigError> {
    s.trim()
        .parse::<usize>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| ConfigError::new(var, format!("{s:?} is not a positive whole number")))
}

impl WorkerArgs {
    /// Builds and validates the configuration.
    pub fn config(&self) -> Result<WorkerConfig, ConfigError> {
        let mut c = WorkerConfig {
            until_empty: self.until_empty,
            ..WorkerConfig::default()
        };
        if let Some(id) = &self.worker_id {
            c.worker_id = id.trim().to_owned();
        }
        set(
            &self.concurrency,
            "POSTBOX_CONCURRENCY",
            parse_count,
            &mut c.concurrency,
        )?;
        set(&self.batch_size, "POSTBOX_BATCH_SIZE", parse_count, &mut c.batch_size)?;
        set(
            &self.poll_interval,
            "POSTBOX_POLL_INTERVAL",
            parse_duration,
            &mut c.poll_interval,
        )?;
        set(&self.lease, "POSTBOX_LEASE", parse_duration, &mut c.lease)?;
        set(
            &self.request_timeout,
            "POSTBOX_REQUEST_TIMEOUT",
            parse_duration,
            &mut c.client.request_timeout,
        )?;
        set(
            &self.retry_schedule,
            "POSTBOX_RETRY_SCHEDULE",
            parse_schedule,
            &mut c.retry.schedule,
        )?;
        set(
            &self.retry_jitter,
            "POSTBOX_RETRY_JITTER",
            parse_fraction,
            &mut c.retry.jitter,
        )?;
        set(
            &self.max_retry_after,
            "POSTBOX_MAX_RETRY_AFTER",
            parse_duration,
            &mut c.retry.max_retry_after,
        )?;
        set(
            &self.allow_http,
            "POSTBOX_ALLOW_HTTP",
            parse_bool,
            &mut c.client.allow_http,
        )?;
        set(
            &self.allow_unsigned,
            "POSTBOX_ALLOW_UNSIGNED",
            parse_bool,
            &mut c.allow_unsigned,
        )?;
        set(
            &self.shutdown_grace,
            "POSTBOX_SHUTDOWN_GRACE",
            parse_duration,
            &mut c.shutdown_grace,
        )?;
        set(
            &self.retention,
            "POSTBOX_RETENTION",
            parse_optional_duration,
            &mut c.retention,
        )?;
        set(
            &self.failed_retention,
            "POSTBOX_FAILED_RETENTION",
            parse_optional_duration,
            &mut c.failed_retention,
        )?;
        set(
            &self.retention_interval,
            "POSTBOX_RETENTION_INTERVAL",
            parse_duration,
            &mut c.retention_interval,
        )?;
        let mut threshold = c.breaker.threshold as usize;
        set(
            &self.breaker_threshold,
            "POSTBOX_BREAKER_THRESHOLD",
            parse_count,
            &mut threshold,
        )?;
        c.breaker.threshold =
            u32::try_from(threshold).map_err(|_| ConfigError::new("POSTBOX_BREAKER_THRESHOLD", "is too large"))?;
        set(
            &self.breaker_cooldown,
            "POSTBOX_BREAKER_COOLDOWN",
            parse_duration,
            &mut c.breaker.cooldown,
        )?;
        set(
            &self.breaker_max_cooldown,
            "POSTBOX_BREAKER_MAX_COOLDOWN",
            parse_duration,
            &mut c.breaker.max_cooldown,
        )?;
        let mut network = NetworkPolicy::default();
        set(
            &self.allow_private_networks,
            "POSTBOX_ALLOW_PRIVATE_NETWORKS",
            parse_bool,
            &mut network.allow_private,
        )?;
        if let Some(list) = self.allowed_networks.as_deref().filter(|s| !s.trim().is_empty()) {
            for item in list.split(',').map(str::trim) {
                let net = item
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| item.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        ConfigError::new(
                            "POSTBOX_ALLOWED_NETWORKS",
                            format!("{item:?} is not a CIDR like 10.0.0.0/8"),
                        )
                    })?;
                network.allow.push(net);
            }
        }
        c.client.network = network;
        if let Some(s) = self.signing_secret.as_deref().filter(|s| !s.trim().is_empty()) {
            c.signing_secret =
                Some(Secrets::parse(s).map_err(|e| ConfigError::new("POSTBOX_SIGNING_SECRET", e.to_string()))?);
        }
        if let Some(path) = self.ca_cert.as_deref().filter(|s| !s.is_empty()) {
            let pem = std::fs::read(path)
                .map_err(|e| ConfigError::new("POSTBOX_CA_CERT", format!("cannot read {path}: {e}")))?;
            if reqwest::Certificate::from_pem_bundle(&pem).map_or(true, |v| v.is_empty()) {
                return Err(ConfigError::new(
                    "POSTBOX_CA_CERT",
                    format!("{path} holds no PEM certificate"),
                ));
            }
            c.client.extra_roots_pem = Some(pem);
        }
        if let Some(addr) = &self.metrics_addr {
            addr.parse::<std::net::SocketAddr>().map_err(|_| {
                ConfigError::new(
                    "POSTBOX_METRICS_ADDR",
                    format!("{addr:?} is not an address like 0.0.0.0:9090"),
                )
            })?;
        }
        c.validate()?;
        Ok(c)
    }
}

/// Why the HTTP client could not be built: only the extra CA file is a
/// setting to fix (exit 2); anything else reqwest refuses is a fault of
/// this build or machine, not of the configuration.
pub(super) fn client_failure(e: ClientError) -> Failure {
    match e {
        ClientError::BadCaCert(m) => Failure::Config(ConfigError::new(
            "POSTBOX_CA_CERT",
            format!("the CA certificate file is not valid PEM: {m}"),
        )),
        other => Failure::Runtime(other.to_string()),
    }
}

pub async fn run(args: WorkerArgs, db: &DbArgs) -> Result<(), Failure> {
    let config = args.config().map_err(Failure::Config)?;
    if config.signing_secret.is_none() {
        tracing::warn!(
            "POSTBOX_ALLOW_UNSIGNED is on and POSTBOX_SIGNING_SECRET is not set: endpoints without their own secret get unsigned webhooks"
        );
    }
    let metrics_addr = args
        .metrics_addr
        .as_deref()
        .map(|a| a.parse().expect("validated above"));
    // LISTEN, and one for health checks, gauges and retention; the claim
    // loop and the outcomes each open one more of their own (Worker::run),
    // four in all.
    let pool = db.connect(2).await?;
    if !postbox::migrate::is_current(&pool).await? {
        return Err(Failure::Runtime(
            "the database is not migrated: run `postbox migrate` first".into(),
        ));
    }
    if let Some(addr) = metrics_addr {
        super::metrics_server::start(addr, pool.clone()).await?;
    }
    let worker = Worker::builder(pool).config(config).build().map_err(|e| match e {
        postbox::WorkerError::Config(c) => Failure::Config(c),
        postbox::WorkerError::Client(c) => client_failure(c),
    })?;
    let stats = worker.run(super::shutdown_signal()).await;
    tracing::info!(
        attempts = stats.attempts,
        delivered = stats.delivered,
        failed = stats.failed,
        retried = stats.retried,
        "worker exited"
    );
    Ok(())
}
