//! The HTTP client: one POST per attempt, with a total deadline, a cap on
//! the response body, no redirects, no proxies, and the SSRF guard on every
//! connection.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, DATE, RETRY_AFTER, USER_AGENT};
use tokio::time::{timeout_at, Instant};

use super::guard::{Blocked, GuardedResolver, NetworkPolicy};
use super::ErrorKind;

/// At most this much of a response body is read.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// At most this much of a response body is stored in `postbox.attempts`.
pub const STORED_RESPONSE_BYTES: usize = 4 * 1024;

/// The `User-Agent` sent with every webhook.
pub const USER_AGENT_VALUE: &str = concat!("postbox/", env!("CARGO_PKG_VERSION"));

/// How the client behaves.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Deadline for a whole attempt: connect, send, and read the response.
    pub request_timeout: Duration,
    /// Accept plain `http://` URLs.
    pub allow_http: bool,
    /// Which destination addresses are allowed.
    pub network: NetworkPolicy,
    /// Extra trusted root certificates (PEM), beside the system's.
    pub extra_roots_pem: Option<Vec<u8>>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            request_timeout: Duration::from_secs(30),
            allow_http: false,
            network: NetworkPolicy::default(),
            extra_roots_pem: None,
        }
    }
}

/// The client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The extra CA file holds no usable certificate.
    #[error("the CA certificate file is not valid PEM: {0}")]
    BadCaCert(String),
    /// reqwest refused the configuration.
    #[error("cannot build the HTTP client: {0}")]
    Build(#[from] reqwest::Error),
}

/// What one attempt produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// The response status, when one came.
    pub status: Option<u16>,
    /// Why it failed; `None` for a 2xx with a body within the limit.
    pub error: Option<ErrorKind>,
    /// A readable account of the failure (never the secret or the payload).
    pub message: Option<String>,
    /// The first 4 KiB of the response body, as text.
    pub body: Option<String>,
    /// `Retry-After`, as a delay.
    pub retry_after: Option<Duration>,
    /// How long the attempt took.
    pub elapsed: Duration,
}

/// The webhook HTTP client. Cheap to clone; connections are pooled.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    config: Arc<ClientConfig>,
}

impl Client {
    /// Builds the client.
    pub fn new(config: ClientConfig) -> Result<Self, ClientError> {
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .https_only(!config.allow_http)
            .connect_timeout(config.request_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .dns_resolver(Arc::new(GuardedResolver::new(Arc::new(config.network.clone()))));
        if let Some(pem) = &config.extra_roots_pem {
            let certs =
                reqwest::Certificate::from_pem_bundle(pem).map_err(|e| ClientError::BadCaCert(e.to_string()))?;
            if certs.is_empty() {
                return Err(ClientError::BadCaCert("no certificate found".into()));
            }
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        Ok(Client {
            http: builder.build()?,
            config: Arc::new(config),
        })
    }

    /// POSTs `body` to `url` with the Standard Webhooks headers.
    pub async fn post(&self, url: &str, id: &str, timestamp: i64, signature: Option<&str>, body: Bytes) -> Response {
        let start = Instant::now();
        let fail = |error, message: String, status| Response {
            status,
            error: Some(error),
            message: Some(message),
            body: None,
            retry_after: None,
            elapsed: start.elapsed(),
        };
        let parsed = match reqwest::Url::parse(url) {
            Ok(u) => u,
            // Enqueue refuses such URLs (postbox.check_callback_url); one
            // edited into postbox.endpoints by hand cannot be fixed by
            // retrying, so it fails at once.
            Err(e) => {
                return fail(
                    ErrorKind::Blocked,
                    format!("the callback URL cannot be parsed ({e}): fix postbox.endpoints.url"),
                    None,
                )
            }
        };
        match parsed.scheme() {
            "https" => {}
            "http" if self.config.allow_http => {}
            "http" => {
                return fail(
                    ErrorKind::Blocked,
                    "plain http:// is not allowed (POSTBOX_ALLOW_HTTP)".into(),
                    None,
                )
            }
            other => return fail(ErrorKind::Blocked, format!("scheme {other} is not allowed"), None),
        }
        // IP literals never reach the resolver: check them here.
        let literal = match parsed.host() {
            Some(url::Host::Ipv4(ip)) => Some(std::net::IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Some(std::net::IpAddr::V6(ip)),
            _ => None,
        };
        if let Some(ip) = literal {
            if let Err(b) = self.config.network.check(&ip.to_string(), ip) {
                return fail(ErrorKind::Blocked, b.to_string(), None);
            }
        }

        let mut headers = HeaderMap::with_capacity(6);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
        headers.insert(
            "webhook-id",
            HeaderValue::from_str(id).expect("an event id is a valid header"),
        );
        headers.insert("webhook-timestamp", HeaderValue::from(timestamp));
        if let Some(sig) = signature {
            headers.insert(
                "webhook-signature",
                HeaderValue::from_str(sig).expect("base64 is a valid header"),
            );
        }
        let deadline = start + self.config.request_timeout;
        let sent = timeout_at(deadline, self.http.post(parsed).headers(headers).body(body).send()).await;
        let mut resp = match sent {
            Err(_) => return fail(ErrorKind::Timeout, timeout_message(&self.config), None),
            Ok(Err(e)) => {
                let (kind, message) = classify(&e);
                return fail(kind, message, None);
            }
            Ok(Ok(r)) => r,
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| parse_retry_after(v, resp.headers().get(DATE)));
        // The status decides the outcome (SPEC §6): once a 2xx has arrived the
        // event is delivered, whatever its body does next (too long, stalled,
        // cut off). The body is read only for the record, at most 64 KiB of it.
        let accepted = (200..=299).contains(&status);
        let mut buf: Vec<u8> = Vec::new();
        let mut over_limit = resp
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .is_some_and(|n| n > MAX_RESPONSE_BYTES as u64);
        // A body declared too long is not read unless it is kept (a 2xx's first 4 KiB).
        let mut reading = !over_limit || accepted;
        while reading {
            match timeout_at(deadline, resp.chunk()).await {
                Err(_) if accepted => break,
                Err(_) => {
                    let mut r = fail(ErrorKind::Timeout, timeout_message(&self.config), Some(status));
                    r.body = Some(stored_text(&buf));
                    r.retry_after = retry_after;
                    return r;
                }
                Ok(Err(_)) if accepted => break,
                Ok(Err(e)) => {
                    let (kind, message) = classify(&e);
                    let mut r = fail(kind, format!("reading the response: {message}"), Some(status));
                    r.retry_after = retry_after;
                    return r;
                }
                Ok(Ok(None)) => reading = false,
                Ok(Ok(Some(chunk))) => {
                    let room = MAX_RESPONSE_BYTES - buf.len();
                    buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    if chunk.len() > room {
                        over_limit = true;
                    }
                    // A 2xx needs no more than what is stored.
                    reading = !(over_limit || accepted && buf.len() >= STORED_RESPONSE_BYTES);
                }
            }
        }
        if over_limit && !accepted {
            let mut r = fail(
                ErrorKind::BodyTooLarge,
                format!("HTTP {status} with a response body over {MAX_RESPONSE_BYTES} bytes (not read further)"),
                Some(status),
            );
            r.body = (!buf.is_empty()).then(|| stored_text(&buf));
            r.retry_after = retry_after;
            return r;
        }
        let (error, message) = match status {
            200..=299 => (None, None),
            300..=399 => {
                let to = resp
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                (
                    Some(ErrorKind::Redirect),
                    Some(format!("HTTP {status} redirect to {to:.200} (not followed)")),
                )
            }
            _ => (Some(ErrorKind::HttpStatus), Some(format!("HTTP {status}"))),
        };
        Response {
            status: Some(status),
            error,
            message,
            body: (!buf.is_empty()).then(|| stored_text(&buf)),
            retry_after,
            elapsed: start.elapsed(),
        }
    }
}

fn timeout_message(c: &ClientConfig) -> String {
    format!(
        "no complete response within {}",
        humantime::format_duration(c.request_timeout)
    )
}

/// The first 4 KiB of a body as text, cut on a character boundary.
fn stored_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(STORED_RESPONSE_BYTES)]);
    let mut s = text.into_owned();
    while s.len() > STORED_RESPONSE_BYTES {
        s.pop();
    }
    s.retain(|c| c != '\0');
    s
}

/// Maps a reqwest error to an error kind and a message, looking through its
/// sources for the guard's refusal and TLS failures.
fn classify(e: &reqwest::Error) -> (ErrorKind, String) {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut chain = Vec::new();
    let mut kind = None;
    while let Some(s) = source {
        if let Some(b) = s.downcast_ref::<Blocked>() {
            return (ErrorKind::Blocked, b.to_string());
        }
        if s.downcast_ref::<rustls::Error>().is_some() {
            kind = kind.or(Some(ErrorKind::Tls));
        }
        let text = s.to_string();
        if !chain.iter().any(|c: &String| c.contains(&text)) {
            chain.push(text);
        }
        source = s.source();
    }
    let message = chain.join(": ");
    let kind = kind.unwrap_or(if e.is_timeout() {
        ErrorKind::Timeout
    } else if message.contains("certificate") || message.contains("tls") || message.contains("TLS") {
        ErrorKind::Tls
    } else if e.is_connect() {
        ErrorKind::Connect
    } else {
        ErrorKind::Other
    });
    (kind, message)
}

/// `Retry-After` in seconds or as an HTTP date. A date is measured against
/// the response's own `Date` header when there is one, so the worker's
/// clock does not matter.
pub fn parse_retry_after(value: &HeaderValue, date: Option<&HeaderValue>) -> Option<Duration> {
    let s = value.to_str().ok()?.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(s).ok()?;
    let now = date
        .and_then(|d| httpdate::parse_http_date(d.to_str().ok()?).ok())
        .unwrap_or_else(SystemTime::now);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let v = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(parse_retry_after(&v("120"), None), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_retry_after(
                &v("Wed, 21 Oct 2015 07:28:30 GMT"),
                Some(&v("Wed, 21 Oct 2015 07:28:00 GMT"))
            ),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after(
                &v("Wed, 21 Oct 2015 07:28:00 GMT"),
                Some(&v("Wed, 21 Oct 2015 07:28:30 GMT"))
            ),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after(&v("soon"), None), None);
    }

    #[test]
    fn stored_body_is_cut_on_a_char_boundary() {
        let body = "é".repeat(3000);
        let s = stored_text(body.as_bytes());
        assert!(s.len() <= STORED_RESPONSE_BYTES);
        assert!(s.chars().all(|c| c == 'é' || c == '\u{fffd}'));
    }
}
