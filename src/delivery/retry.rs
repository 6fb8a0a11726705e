//! The decision after one attempt: one pure function from the response to
//! what happens to the event next and whether its endpoint pauses. The
//! store writes the [`Decision`] as it is (`postbox.record`).

use std::time::Duration;

use super::{ErrorKind, Response};

/// How failed attempts are retried.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Delay after the 1st, 2nd, 3rd… failure; the last entry repeats when an
    /// event allows more attempts than the schedule has entries.
    pub schedule: Vec<Duration>,
    /// Jitter as a fraction (0.0–0.2): a delay grows by up to this much, never shrinks.
    pub jitter: f64,
    /// Longest delay a receiver's `Retry-After` may ask for.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            schedule: vec![Duration::from_secs(4), Duration::from_secs(8), Duration::from_secs(10)],
            jitter: 0.0,
            max_retry_after: Duration::from_secs(600),
        }
    }
}

/// What happens to the event next.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Next {
    /// Delivered: done.
    Delivered,
    /// Try again after this delay (from database `now()`).
    Retry {
        /// The delay.
        after: Duration,
    },
    /// Attempts exhausted, or retrying cannot help (a blocked destination).
    Failed,
    /// 410 Gone: disable the endpoint and keep the event pending until it is re-enabled.
    Gone,
}

impl Next {
    /// The outcome's name in `postbox.record`'s `kinds` argument.
    pub fn as_str(self) -> &'static str {
        match self {
            Next::Delivered => "delivered",
            Next::Retry { .. } => "retry",
            Next::Failed => "failed",
            Next::Gone => "gone",
        }
    }
}

/// Everything decided after one attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// What happens to this event.
    pub next: Next,
    /// Back-pressure: a 429 or 503 with `Retry-After` pauses the whole
    /// endpoint this long (capped), whatever happens to this event; such a
    /// response is not a failure for the circuit breaker.
    pub pause: Option<Duration>,
}

impl RetryPolicy {
    /// The scheduled delay after failed attempt number `attempt` (1-based).
    pub fn base_delay(&self, attempt: i32) -> Duration {
        delay_in(&self.schedule, attempt)
    }

    /// Decides after attempt `attempt` of `max_attempts` answered `resp`.
    /// `unit` is a number in [0, 1) that scales the jitter (random in
    /// production, fixed in tests).
    pub fn decide(&self, attempt: i32, max_attempts: i32, resp: &Response, unit: f64) -> Decision {
        self.decide_with(None, attempt, max_attempts, resp, unit)
    }

    /// [`RetryPolicy::decide`] with an endpoint's own schedule, when it has
    /// one, in place of this policy's (jitter and the Retry-After cap stay).
    pub fn decide_with(
        &self,
        schedule: Option<&[Duration]>,
        attempt: i32,
        max_attempts: i32,
        resp: &Response,
        unit: f64,
    ) -> Decision {
        let asked = match (resp.status, resp.retry_after) {
            (Some(429 | 503), Some(d)) if !d.is_zero() => Some(d.min(self.max_retry_after)),
            _ => None,
        };
        let next = match resp.error {
            None => Next::Delivered,
            Some(ErrorKind::Blocked) => Next::Failed,
            _ if resp.status == Some(410) => Next::Gone,
            _ if attempt >= max_attempts => Next::Failed,
            _ => {
                let base = delay_in(schedule.unwrap_or(&self.schedule), attempt);
                let jittered = base.mul_f64(1.0 + self.jitter.clamp(0.0, 0.2) * unit.clamp(0.0, 1.0));
                Next::Retry {
                    after: asked.map_or(jittered, |a| jittered.max(a)),
                }
            }
        };
        Decision { next, pause: asked }
    }
}

/// The delay after failed attempt `attempt` (1-based) in `schedule`; the
/// last entry repeats.
fn delay_in(schedule: &[Duration], attempt: i32) -> Duration {
    let i = usize::try_from(attempt.max(1) - 1).unwrap_or(0);
    schedule.get(i).or(schedule.last()).copied().unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: Option<u16>, error: Option<ErrorKind>, retry_after: Option<u64>) -> Response {
        Response {
            status,
            error,
            message: None,
            body: None,
            retry_after: retry_after.map(Duration::from_secs),
            elapsed: Duration::ZERO,
        }
    }

    fn failed(status: Option<u16>, kind: ErrorKind, retry_after: Option<u64>) -> Response {
        response(status, Some(kind), retry_after)
    }

    fn secs(d: Decision) -> f64 {
        match d.next {
            Next::Retry { after } => after.as_secs_f64(),
            other => panic!("expected a retry, got {other:?}"),
        }
    }

    #[test]
    fn follows_the_seed_schedule_then_fails() {
        let p = RetryPolicy::default();
        let r = failed(Some(500), ErrorKind::HttpStatus, None);
        assert_eq!(secs(p.decide(1, 4, &r, 0.5)), 4.0);
        assert_eq!(secs(p.decide(2, 4, &r, 0.5)), 8.0);
        assert_eq!(secs(p.decide(3, 4, &r, 0.5)), 10.0);
        assert_eq!(p.decide(4, 4, &r, 0.5).next, Next::Failed);
        // More attempts than schedule entries: the last delay repeats.
        assert_eq!(secs(p.decide(5, 9, &r, 0.0)), 10.0);
    }

    #[test]
    fn an_endpoint_schedule_replaces_the_workers() {
        let p = RetryPolicy::default();
        let r = failed(Some(500), ErrorKind::HttpStatus, None);
        let own = [Duration::from_secs(60), Duration::from_secs(3600)];
        let at = |attempt| secs(p.decide_with(Some(&own), attempt, 10, &r, 0.0));
        assert_eq!(at(1), 60.0);
        assert_eq!(at(2), 3600.0);
        assert_eq!(at(7), 3600.0);
        assert_eq!(secs(p.decide_with(None, 1, 10, &r, 0.0)), 4.0);
        // A Retry-After longer than the endpoint's delay still wins.
        let busy = failed(Some(429), ErrorKind::HttpStatus, Some(120));
        assert_eq!(secs(p.decide_with(Some(&own), 1, 10, &busy, 0.0)), 120.0);
    }

    #[test]
    fn success_and_gone_and_blocked() {
        let p = RetryPolicy::default();
        let ok = response(Some(204), None, None);
        assert_eq!(p.decide(4, 4, &ok, 0.0).next, Next::Delivered);
        assert_eq!(
            p.decide(1, 4, &failed(Some(410), ErrorKind::HttpStatus, None), 0.0)
                .next,
            Next::Gone
        );
        assert_eq!(
            p.decide(1, 4, &failed(None, ErrorKind::Blocked, None), 0.0).next,
            Next::Failed
        );
    }

    #[test]
    fn jitter_only_lengthens_by_at_most_a_fifth() {
        let p = RetryPolicy {
            jitter: 0.5,
            ..RetryPolicy::default()
        };
        let r = failed(None, ErrorKind::Timeout, None);
        assert_eq!(secs(p.decide(1, 4, &r, 0.0)), 4.0);
        assert!((secs(p.decide(1, 4, &r, 1.0)) - 4.8).abs() < 1e-9);
    }

    #[test]
    fn retry_after_is_honoured_never_shorter_and_capped() {
        let p = RetryPolicy {
            max_retry_after: Duration::from_secs(60),
            ..RetryPolicy::default()
        };
        assert_eq!(
            secs(p.decide(1, 4, &failed(Some(429), ErrorKind::HttpStatus, Some(30)), 0.0)),
            30.0
        );
        assert_eq!(
            secs(p.decide(1, 4, &failed(Some(503), ErrorKind::HttpStatus, Some(1)), 0.0)),
            4.0
        );
        assert_eq!(
            secs(p.decide(1, 4, &failed(Some(429), ErrorKind::HttpStatus, Some(3600)), 0.0)),
            60.0
        );
        // Only 429 and 503 carry a meaningful Retry-After.
        assert_eq!(
            secs(p.decide(1, 4, &failed(Some(500), ErrorKind::HttpStatus, Some(30)), 0.0)),
            4.0
        );
    }

    #[test]
    fn a_retry_after_pauses_the_endpoint_whatever_happens_to_the_event() {
        let p = RetryPolicy {
            max_retry_after: Duration::from_secs(60),
            ..RetryPolicy::default()
        };
        let busy = failed(Some(503), ErrorKind::HttpStatus, Some(3600));
        // On the last attempt the event fails, and the endpoint still pauses (capped).
        let d = p.decide(4, 4, &busy, 0.0);
        assert_eq!(d.next, Next::Failed);
        assert_eq!(d.pause, Some(Duration::from_secs(60)));
        // A 500 with Retry-After, or a 429 without one, pauses nothing.
        assert_eq!(
            p.decide(1, 4, &failed(Some(500), ErrorKind::HttpStatus, Some(30)), 0.0)
                .pause,
            None
        );
        assert_eq!(
            p.decide(1, 4, &failed(Some(429), ErrorKind::HttpStatus, None), 0.0)
                .pause,
            None
        );
        assert_eq!(
            p.decide(1, 4, &failed(Some(429), ErrorKind::HttpStatus, Some(0)), 0.0)
                .pause,
            None
        );
    }
}
