//! Delivering one webhook: the HTTP client, signatures, the SSRF guard and
//! the retry decision.

pub mod client;
pub mod guard;
pub mod retry;
pub mod sign;

pub use client::{Client, ClientConfig, ClientError, Response};
pub use guard::{Blocked, NetworkPolicy};
pub use retry::{Decision, Next, RetryPolicy};
pub use sign::Secrets;

/// Why an attempt failed: the `error_kind` column of `postbox.attempts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// No complete response within the request timeout.
    Timeout,
    /// The connection could not be made (refused, reset, DNS failure).
    Connect,
    /// TLS failed: bad, expired, self-signed or wrong-host certificate.
    Tls,
    /// A response came with a status other than 2xx or 3xx.
    HttpStatus,
    /// The destination is not allowed (SSRF guard, or http:// not allowed).
    Blocked,
    /// A 3xx response: redirects are never followed.
    Redirect,
    /// A non-2xx response whose body was larger than the limit (a 2xx is
    /// delivered whatever its body).
    BodyTooLarge,
    /// Anything else.
    Other,
}

impl ErrorKind {
    /// The value stored in `postbox.attempts.error_kind` and used as the
    /// `result` label of `postbox_attempts_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::Connect => "connect",
            ErrorKind::Tls => "tls",
            ErrorKind::HttpStatus => "http_status",
            ErrorKind::Blocked => "blocked",
            ErrorKind::Redirect => "redirect",
            ErrorKind::BodyTooLarge => "body_too_large",
            ErrorKind::Other => "other",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
