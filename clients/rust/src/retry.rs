//! When to retry and how long to wait: exponential backoff with jitter, and the broker's
//! `Retry-After`. Pure functions of their inputs (the jitter and the clock are parameters), so
//! the unit tests pin them down exactly.

use std::time::{Duration, SystemTime};

/// The backoff policy of a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first retry waits about this long; each further one about twice as long.
    pub base: Duration,
    /// No wait is longer, not even one the broker asks for with `Retry-After`.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(200),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The wait before retry number `retry` (0 for the first), with `jitter` in `[0, 1)`:
    /// "equal jitter", half of the exponential step fixed and half random, so waits still grow
    /// while clients that failed together spread out. A `Retry-After` from the broker is a
    /// floor; `max` caps everything, because a caller's latency bound beats the server's hint
    /// (a retry sent before the hint's time may be refused again, and then counts as a retry).
    #[must_use]
    pub fn delay(&self, retry: u32, jitter: f64, retry_after: Option<Duration>) -> Duration {
        let step = self
            .base
            .checked_mul(2u32.saturating_pow(retry.min(31)))
            .unwrap_or(self.max)
            .min(self.max);
        let jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let backoff = step / 2 + step.div_f64(2.0).mul_f64(jitter);
        backoff.max(retry_after.unwrap_or_default()).min(self.max)
    }
}

/// A uniform number in `[0, 1)` from the operating system, for jitter; 0.5 if it fails (jitter
/// is not a security property).
pub(crate) fn jitter() -> f64 {
    let mut bytes = [0u8; 8];
    if getrandom::getrandom(&mut bytes).is_err() {
        return 0.5;
    }
    // 53 random bits make every f64 in [0, 1) of that spacing equally likely.
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

/// `Retry-After` (RFC 9110 §10.2.3): whole seconds, or an HTTP date (then the time until it,
/// seen from `now`; a date in the past means no wait). Anything else is ignored.
#[must_use]
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // A number too long for u64 is still "a long time".
        return Some(Duration::from_secs(
            value.parse::<u64>().unwrap_or(u64::MAX),
        ));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// Whether a status is worth retrying: 503 (the HSM or the database is away for a moment) and
/// 429 (rate limited). Every call of this library is safe to repeat.
#[must_use]
pub(crate) fn retryable(status: u16) -> bool {
    status == 503 || status == 429
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn backoff_doubles_with_half_of_each_step_random_and_stops_at_the_cap() {
        let b = Backoff {
            base: MS(100),
            max: MS(1000),
        };
        assert_eq!(b.delay(0, 0.0, None), MS(50));
        assert_eq!(b.delay(0, 1.0, None), MS(100));
        assert_eq!(b.delay(1, 0.0, None), MS(100));
        assert_eq!(b.delay(1, 0.5, None), MS(150));
        assert_eq!(b.delay(2, 0.0, None), MS(200));
        assert_eq!(b.delay(3, 1.0, None), MS(800));
        // 1600 ms is over the cap: the step is the cap.
        assert_eq!(b.delay(4, 0.0, None), MS(500));
        assert_eq!(b.delay(4, 1.0, None), MS(1000));
        assert_eq!(b.delay(u32::MAX, 1.0, None), MS(1000));
        // Nonsense jitter does not poison the wait.
        assert_eq!(b.delay(0, f64::NAN, None), MS(50));
        assert_eq!(b.delay(0, 7.0, None), MS(100));
    }

    #[test]
    fn retry_after_is_a_floor_under_the_cap() {
        let b = Backoff {
            base: MS(100),
            max: Duration::from_secs(5),
        };
        assert_eq!(
            b.delay(0, 0.0, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
        // A shorter hint than the backoff does not shorten it.
        assert_eq!(b.delay(3, 0.0, Some(MS(1))), MS(400));
        // A longer hint than the cap is cut to the cap.
        assert_eq!(
            b.delay(0, 0.0, Some(Duration::from_secs(1000))),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn jitter_is_in_the_unit_interval() {
        for _ in 0..1000 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j), "{j}");
        }
    }

    #[test]
    fn retry_after_parses_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480); // 2015-10-21 07:28:00 UTC
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        // A date already past: retry now.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        for bad in ["", "-1", "1.5", "soon", "7 s"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
    }

    #[test]
    fn only_503_and_429_are_retried() {
        assert!(retryable(503));
        assert!(retryable(429));
        for status in [400, 401, 403, 404, 422, 500, 502] {
            assert!(!retryable(status), "{status}");
        }
    }
}
