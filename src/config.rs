//! Worker configuration: one struct, validated once, with the defaults of
//! the seed guide. The CLI fills it from flags and `POSTBOX_*` variables.

use std::time::Duration;

use crate::delivery::{ClientConfig, RetryPolicy, Secrets};

/// Everything a worker needs to know.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Written to `locked_by` and `attempts.worker_id`; unique per process.
    pub worker_id: String,
    /// Deliveries in flight at once in this process. The default, 256, is
    /// sized for receivers that take tens to hundreds of milliseconds (a
    /// worker then sustains about 256 ÷ latency deliveries a second); the
    /// per-endpoint `max_in_flight` is what protects any one receiver.
    pub concurrency: usize,
    /// Most events claimed by one claim statement.
    pub batch_size: usize,
    /// How often an idle worker looks for due events without a notification
    /// (the safety net under LISTEN/NOTIFY, and how retries are picked up).
    pub poll_interval: Duration,
    /// How long a claimed event stays leased; must exceed the request timeout
    /// by at least 5 s so that an attempt always ends inside its lease.
    pub lease: Duration,
    /// On SIGTERM/SIGINT, how long in-flight deliveries may run before they
    /// are cut short and their leases released.
    pub shutdown_grace: Duration,
    /// Delays between attempts.
    pub retry: RetryPolicy,
    /// When an endpoint's circuit breaker opens, and for how long.
    pub breaker: BreakerPolicy,
    /// Default signing secrets, for endpoints without their own.
    pub signing_secret: Option<Secrets>,
    /// Send unsigned webhooks to endpoints without their own secret when
    /// `signing_secret` is unset. Off by default: such a worker refuses to start.
    pub allow_unsigned: bool,
    /// HTTP client settings.
    pub client: ClientConfig,
    /// Exit once nothing is due, in flight or waiting to be recorded.
    pub until_empty: bool,
    /// Delivered and cancelled events (and their attempts) older than this
    /// are deleted by the workers; `None` keeps everything.
    pub retention: Option<Duration>,
    /// Failed events older than this are deleted too; `None` keeps them
    /// until they are replayed or removed by hand.
    pub failed_retention: Option<Duration>,
    /// How often a worker looks for events to prune.
    pub retention_interval: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            worker_id: default_worker_id(),
            concurrency: 256,
            batch_size: 100,
            poll_interval: Duration::from_secs(1),
            lease: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            breaker: BreakerPolicy::default(),
            signing_secret: None,
            allow_unsigned: false,
            client: ClientConfig::default(),
            until_empty: false,
            retention: Some(Duration::from_secs(7 * 24 * 3600)),
            failed_retention: None,
            retention_interval: Duration::from_secs(60),
        }
    }
}

/// Circuit-breaker settings, applied when outcomes are recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerPolicy {
    /// The breaker opens when this many distinct events of an endpoint have
    /// failed in a row (no success in between). One event's own retries
    /// therefore never open it.
    pub threshold: u32,
    /// How long it stays open before the first probe.
    pub cooldown: Duration,
    /// Each failed probe doubles the cool-down, up to this.
    pub max_cooldown: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            threshold: 5,
            cooldown: Duration::from_secs(30),
            max_cooldown: Duration::from_secs(600),
        }
    }
}

/// A configuration value that cannot be used; `var` names the variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {problem}")]
pub struct ConfigError {
    /// The environment variable (and flag) at fault.
    pub var: &'static str,
    /// What is wrong.
    pub problem: String,
}

impl ConfigError {
    /// An error about `var`.
    pub fn new(var: &'static str, problem: impl Into<String>) -> Self {
        ConfigError {
            var,
            problem: problem.into(),
        }
    }
}

impl WorkerConfig {
    /// Checks the combination of values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.worker_id.is_empty() || self.worker_id.len() > 200 {
            return Err(ConfigError::new("POSTBOX_WORKER_ID", "must be 1 to 200 characters"));
        }
        if self.concurrency == 0 || self.concurrency > 10_000 {
            return Err(ConfigError::new("POSTBOX_CONCURRENCY", "must be between 1 and 10000"));
        }
        if self.batch_size == 0 || self.batch_size > 10_000 {
            return Err(ConfigError::new("POSTBOX_BATCH_SIZE", "must be between 1 and 10000"));
        }
        if self.poll_interval.is_zero() {
            return Err(ConfigError::new("POSTBOX_POLL_INTERVAL", "must be greater than zero"));
        }
        if self.client.request_timeout.is_zero() {
            return Err(ConfigError::new("POSTBOX_REQUEST_TIMEOUT", "must be greater than zero"));
        }
        if self.lease < self.client.request_timeout + Duration::from_secs(5) {
            return Err(ConfigError::new(
                "POSTBOX_LEASE",
                format!(
                    "must exceed POSTBOX_REQUEST_TIMEOUT ({}) by at least 5s, got {}",
                    humantime::format_duration(self.client.request_timeout),
                    humantime::format_duration(self.lease)
                ),
            ));
        }
        if self.retry.schedule.is_empty() {
            return Err(ConfigError::new("POSTBOX_RETRY_SCHEDULE", "needs at least one delay"));
        }
        if self.retention_interval.is_zero() {
            return Err(ConfigError::new(
                "POSTBOX_RETENTION_INTERVAL",
                "must be greater than zero",
            ));
        }
        if self.breaker.threshold == 0 {
            return Err(ConfigError::new("POSTBOX_BREAKER_THRESHOLD", "must be at least 1"));
        }
        if self.breaker.cooldown.is_zero() || self.breaker.max_cooldown < self.breaker.cooldown {
            return Err(ConfigError::new(
                "POSTBOX_BREAKER_COOLDOWN",
                "must be greater than zero and at most POSTBOX_BREAKER_MAX_COOLDOWN",
            ));
        }
        if !(0.0..=0.2).contains(&self.retry.jitter) {
            return Err(ConfigError::new("POSTBOX_RETRY_JITTER", "must be between 0% and 20%"));
        }
        // Last, so a wrong value elsewhere is named first.
        if self.signing_secret.is_none() && !self.allow_unsigned {
            return Err(ConfigError::new(
                "POSTBOX_SIGNING_SECRET",
                "is not set, so endpoints without their own secret would get unsigned webhooks: \
                 set it (`postbox secret new` prints a fresh one), or set POSTBOX_ALLOW_UNSIGNED=true \
                 to send unsigned webhooks on purpose",
            ));
        }
        Ok(())
    }
}

/// `host-pid-xxxx`: readable in `locked_by`, unique per process.
pub fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".to_owned());
    let tag = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &tag[..4])
}

/// Parses a duration such as `500ms`, `30s` or `5m`.
pub fn parse_duration(var: &'static str, s: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(s.trim())
        .map_err(|e| ConfigError::new(var, format!("{s:?} is not a duration like 500ms, 30s or 5m ({e})")))
}

/// Parses a comma-separated list of durations (`4s,8s,10s`).
pub fn parse_schedule(var: &'static str, s: &str) -> Result<Vec<Duration>, ConfigError> {
    let list: Vec<Duration> = s.split(',').map(|p| parse_duration(var, p)).collect::<Result<_, _>>()?;
    if list.is_empty() {
        return Err(ConfigError::new(var, "needs at least one delay"));
    }
    Ok(list)
}

/// Parses a percentage (`10%`) or a fraction (`0.1`).
pub fn parse_fraction(var: &'static str, s: &str) -> Result<f64, ConfigError> {
    let t = s.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|p| p / 100.0),
        None => t.parse::<f64>(),
    };
    v.ok()
        .filter(|f| f.is_finite() && *f >= 0.0)
        .ok_or_else(|| ConfigError::new(var, format!("{s:?} is not a percentage like 10%")))
}

/// Parses a boolean (`true/false`, `1/0`, `yes/no`, `on/off`).
pub fn parse_bool(var: &'static str, s: &str) -> Result<bool, ConfigError> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err(ConfigError::new(var, format!("{s:?} is not a boolean (true or false)"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_lists() {
        assert_eq!(parse_duration("X", "500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("X", "5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("X", "bogus").unwrap_err().var, "X");
        assert_eq!(
            parse_schedule("S", "4s, 8s,10s").unwrap(),
            vec![Duration::from_secs(4), Duration::from_secs(8), Duration::from_secs(10)]
        );
        assert!(parse_schedule("S", "4s,,8s").is_err());
        assert_eq!(parse_fraction("J", "10%").unwrap(), 0.1);
        assert!(parse_bool("B", "maybe").is_err());
    }

    #[test]
    fn lease_must_exceed_timeout_by_five_seconds() {
        let mut c = WorkerConfig {
            allow_unsigned: true,
            ..WorkerConfig::default()
        };
        assert!(c.validate().is_ok());
        c.lease = Duration::from_secs(34);
        assert_eq!(c.validate().unwrap_err().var, "POSTBOX_LEASE");
        c.lease = Duration::from_secs(35);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn unsigned_only_when_asked_for() {
        let mut c = WorkerConfig::default();
        assert_eq!(c.validate().unwrap_err().var, "POSTBOX_SIGNING_SECRET");
        c.allow_unsigned = true;
        assert!(c.validate().is_ok());
        c.allow_unsigned = false;
        c.signing_secret = Some(Secrets::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap());
        assert!(c.validate().is_ok());
    }
}
