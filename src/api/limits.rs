//! Rate limits per source address and per client (token buckets with burst), blocking of
//! sources that keep going over, sources an officer blocked with a lockdown (for a while), and
//! the throttle on failed authentications at the token endpoint (per source and per source and
//! client id). Settings
//! come from Postgres and are re-read every few seconds by [`Limiter::refresh`], so a change
//! takes effect on every broker without a restart. Time is a parameter (the clock is injected).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ipnet::IpNet;
use uuid::Uuid;

use super::{ApiError, AppState, request_source};
use crate::auth::SecuritySettings;
use crate::store::{NewAuditEvent, Store, StoreError};

/// Unix milliseconds now; tests replace it.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| crate::audit::now_us() / 1000)
}

/// Who is limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// A source address.
    Ip(IpAddr),
    /// A client.
    Client(Uuid),
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last_ms: i64,
}

#[derive(Debug, Default)]
struct Books {
    buckets: HashMap<Source, Bucket>,
    /// Violations in the current window: (count, window start).
    violations: HashMap<Source, (u32, i64)>,
    /// Blocked until (ms).
    blocked: HashMap<Source, i64>,
    /// When a `rate_limit_exceeded` event was last recorded for the source (coalescing).
    last_audit: HashMap<Source, i64>,
    /// Failed authentications at the token endpoint.
    auth_failures: HashMap<AuthKey, Failures>,
}

/// Whose failed authentications are counted: a source address, and a source address trying one
/// client id (`None` for ids that are not UUIDs). Never the client id alone: anyone may claim
/// an id, and the client's own addresses must stay unaffected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum AuthKey {
    Source(IpAddr),
    SourceClient(IpAddr, Option<Uuid>),
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last_ms: i64,
    delayed_until_ms: i64,
}

/// Failures are forgotten this long after the last one (when no delay is running).
const AUTH_FAILURE_MEMORY_MS: i64 = 15 * 60 * 1000;

/// What a check decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead.
    Allowed,
    /// Over the limit; retry after this many seconds. `audit` when this is the first refusal of
    /// the source for a minute (recorded once, so a flood does not flood the audit trail).
    Limited {
        /// Seconds.
        retry_after: u64,
        /// Record it.
        audit: bool,
    },
    /// Blocked for repeated violations; retry after this many seconds. `newly` on the refusal
    /// that caused the block.
    Blocked {
        /// Seconds.
        retry_after: u64,
        /// Just blocked.
        newly: bool,
    },
}

/// The limiter state of one broker.
pub struct Limiter {
    settings: RwLock<Arc<SecuritySettings>>,
    blocked_cidrs: RwLock<Vec<IpNet>>,
    books: Mutex<Books>,
    clock: Clock,
}

impl Limiter {
    /// A limiter with the given settings and clock.
    pub fn new(settings: SecuritySettings, clock: Clock) -> Self {
        Self {
            settings: RwLock::new(Arc::new(settings)),
            blocked_cidrs: RwLock::new(Vec::new()),
            books: Mutex::new(Books::default()),
            clock,
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<SecuritySettings> {
        self.settings
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Re-reads the settings and the blocked sources from Postgres (every broker does this every
    /// few seconds), and forgets idle buckets so memory stays bounded.
    ///
    /// # Errors
    /// An outage (the previous settings stay in force).
    pub async fn refresh(&self, store: &Store) -> Result<(), StoreError> {
        let settings = SecuritySettings::load(store).await?;
        let now_s = (self.clock)() / 1000;
        let cidrs: Vec<IpNet> = store
            .blocked_sources(now_s)
            .await?
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect();
        *self
            .blocked_cidrs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = cidrs;
        let changed = *self.settings() != settings;
        *self
            .settings
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(settings);
        if changed {
            // New rates: start every bucket afresh.
            self.lock().buckets.clear();
        }
        self.forget_idle();
        Ok(())
    }

    /// Forgets what no longer decides anything: full buckets, ended blocks, violation windows
    /// that have passed and audit notes older than the coalescing minute. Each is what a new
    /// entry would be, so this changes no verdict; it keeps memory bounded by the sources seen
    /// recently, not by every source ever refused.
    fn forget_idle(&self) {
        let now = (self.clock)();
        let settings = self.settings();
        let window_ms = i64::try_from(settings.violation_window_secs)
            .unwrap_or(i64::MAX / 2)
            .saturating_mul(1000);
        let mut books = self.lock();
        books.blocked.retain(|_, until| *until > now);
        books.buckets.retain(|s, b| {
            let (rate, burst) = rate_of(s, &settings);
            b.tokens + (now - b.last_ms) as f64 / 1000.0 * rate < f64::from(burst)
        });
        books
            .violations
            .retain(|_, (_, start)| now - *start < window_ms);
        books.last_audit.retain(|_, last| now - *last < 60_000);
        books
            .auth_failures
            .retain(|_, f| f.delayed_until_ms > now || now - f.last_ms < AUTH_FAILURE_MEMORY_MS);
    }

    fn auth_keys(ip: IpAddr, client: Option<Uuid>) -> [AuthKey; 2] {
        let ip = ip.to_canonical();
        [AuthKey::Source(ip), AuthKey::SourceClient(ip, client)]
    }

    /// Whether the token endpoint must refuse `ip` trying `client` for now, and for how many
    /// seconds: after too many failed authentications from that source for that id, or from
    /// that source at all. Checked before the credentials, so a delayed guess costs nothing
    /// and learns nothing.
    pub fn auth_delay(&self, ip: IpAddr, client: Option<Uuid>) -> Option<u64> {
        let now = (self.clock)();
        let books = self.lock();
        Self::auth_keys(ip, client)
            .iter()
            .filter_map(|k| books.auth_failures.get(k))
            .filter(|f| f.delayed_until_ms > now)
            .map(|f| seconds_until(now, f.delayed_until_ms))
            .max()
    }

    /// Counts a failed authentication of `client` from `ip`. Past the free failures, each one
    /// doubles the delay (1 s, 2 s, 4 s, … up to `auth_delay_max_secs`). Returns the delay it
    /// started, if any.
    pub fn auth_failed(&self, ip: IpAddr, client: Option<Uuid>) -> Option<u64> {
        let settings = self.settings();
        let now = (self.clock)();
        let mut books = self.lock();
        let mut started = None;
        for key in Self::auth_keys(ip, client) {
            let free = match key {
                AuthKey::Source(_) => settings.auth_failures_per_source,
                AuthKey::SourceClient(..) => settings.auth_failures_per_client,
            };
            let entry = books.auth_failures.entry(key).or_insert(Failures {
                count: 0,
                last_ms: now,
                delayed_until_ms: 0,
            });
            if entry.delayed_until_ms <= now && now - entry.last_ms >= AUTH_FAILURE_MEMORY_MS {
                entry.count = 0;
            }
            entry.count = entry.count.saturating_add(1);
            entry.last_ms = now;
            if entry.count > free {
                let secs = 1u64
                    .checked_shl(entry.count - free - 1)
                    .unwrap_or(u64::MAX)
                    .min(settings.auth_delay_max_secs);
                let ms = i64::try_from(secs)
                    .unwrap_or(i64::MAX / 2)
                    .saturating_mul(1000);
                entry.delayed_until_ms = entry.delayed_until_ms.max(now.saturating_add(ms));
                started = started.max(Some(secs));
            }
        }
        started
    }

    /// A successful authentication of `client` from `ip` clears that pair's failures (not the
    /// source's: one good client behind an address does not vouch for the other guesses).
    pub fn auth_succeeded(&self, ip: IpAddr, client: Option<Uuid>) {
        let [_, pair] = Self::auth_keys(ip, client);
        self.lock().auth_failures.remove(&pair);
    }

    /// Whether `ip` is blocked outright (lockdown).
    pub fn is_blocked_source(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.blocked_cidrs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .any(|n| n.contains(&ip))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Books> {
        self.books
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes one request from `source`'s bucket.
    pub fn check(&self, source: Source) -> Verdict {
        let settings = self.settings();
        let now = (self.clock)();
        let mut books = self.lock();
        if let Some(until) = books.blocked.get(&source).copied() {
            if until > now {
                return Verdict::Blocked {
                    retry_after: seconds_until(now, until),
                    newly: false,
                };
            }
            books.blocked.remove(&source);
        }
        let (rate, burst) = rate_of(&source, &settings);
        let bucket = books.buckets.entry(source).or_insert(Bucket {
            tokens: f64::from(burst),
            last_ms: now,
        });
        bucket.tokens = (bucket.tokens + (now - bucket.last_ms).max(0) as f64 / 1000.0 * rate)
            .min(f64::from(burst));
        bucket.last_ms = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Verdict::Allowed;
        }
        let retry_after = ((1.0 - bucket.tokens) / rate).ceil().max(1.0) as u64;
        // Count the violation; too many within the window block the source.
        let window_ms = i64::try_from(settings.violation_window_secs)
            .unwrap_or(i64::MAX / 2)
            .saturating_mul(1000);
        let entry = books.violations.entry(source).or_insert((0, now));
        if now - entry.1 >= window_ms {
            *entry = (0, now);
        }
        entry.0 += 1;
        if entry.0 >= settings.block_after_violations {
            books.violations.remove(&source);
            let block_ms = i64::try_from(settings.block_secs)
                .unwrap_or(i64::MAX / 2)
                .saturating_mul(1000);
            books.blocked.insert(source, now + block_ms);
            return Verdict::Blocked {
                retry_after: settings.block_secs,
                newly: true,
            };
        }
        let audit = books
            .last_audit
            .get(&source)
            .is_none_or(|last| now - last >= 60_000);
        if audit {
            books.last_audit.insert(source, now);
        }
        Verdict::Limited { retry_after, audit }
    }
}

fn rate_of(source: &Source, s: &SecuritySettings) -> (f64, u32) {
    match source {
        Source::Ip(_) => (s.per_ip_per_second, s.per_ip_burst),
        Source::Client(_) => (s.per_client_per_second, s.per_client_burst),
    }
}

fn seconds_until(now: i64, until: i64) -> u64 {
    u64::try_from((until - now + 999) / 1000)
        .unwrap_or(0)
        .max(1)
}

/// Applies a verdict: nothing when allowed; otherwise the 429 and, once a minute per source
/// (or on a new block), an audit event written off the request path.
pub(super) fn enforce(state: &AppState, source: Source, verdict: Verdict) -> Result<(), ApiError> {
    let (event, error) = match verdict {
        Verdict::Allowed => return Ok(()),
        Verdict::Limited { retry_after, audit } => (
            audit.then_some("rate_limit_exceeded"),
            ApiError::RateLimited { retry_after },
        ),
        Verdict::Blocked { retry_after, newly } => (
            newly.then_some("source_blocked"),
            ApiError::SourceBlocked {
                retry_after: Some(retry_after),
            },
        ),
    };
    if let Some(name) = event {
        let mut event = NewAuditEvent::info(name).severity("warning");
        event = match source {
            Source::Ip(ip) => event.subject(ip.to_string()),
            Source::Client(id) => event.client(id).subject(id.to_string()),
        };
        let meta = crate::audit::meta();
        let store = state.broker.store().clone();
        tokio::spawn(async move {
            if let Err(e) = store.audit(&meta, &[event]).await {
                tracing::warn!(target: "keybroker::audit", error = %e, "rate-limit event not audited");
            }
        });
    }
    Err(error)
}

/// Refuses blocked source addresses and applies the per-address limit, before anything else.
pub(super) async fn limit_by_source(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    // Health checks are neither blocked nor limited: a load balancer probing must not be refused
    // (it would take the node out of service for everyone behind the same address).
    if matches!(parts.uri.path(), "/healthz" | "/readyz") {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let ip = request_source(&parts, &state);
    if state.limiter.is_blocked_source(ip) {
        return ApiError::SourceBlocked { retry_after: None }.into_response();
    }
    if let Err(e) = enforce(&state, Source::Ip(ip), state.limiter.check(Source::Ip(ip))) {
        return e.into_response();
    }
    next.run(Request::from_parts(parts, body)).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::atomic::{AtomicI64, Ordering};

    use super::*;

    fn limiter(settings: SecuritySettings) -> (Limiter, Arc<AtomicI64>) {
        let now = Arc::new(AtomicI64::new(1_000_000));
        let clock = now.clone();
        (
            Limiter::new(settings, Arc::new(move || clock.load(Ordering::SeqCst))),
            now,
        )
    }

    #[test]
    fn refuses_exactly_past_the_burst_and_refills_at_the_rate() {
        let (l, now) = limiter(SecuritySettings {
            per_client_per_second: 2.0,
            per_client_burst: 5,
            ..SecuritySettings::default()
        });
        let c = Source::Client(Uuid::nil());
        for _ in 0..5 {
            assert_eq!(l.check(c), Verdict::Allowed);
        }
        assert!(matches!(
            l.check(c),
            Verdict::Limited {
                retry_after: 1,
                audit: true
            }
        ));
        assert!(matches!(l.check(c), Verdict::Limited { audit: false, .. }));
        now.fetch_add(499, Ordering::SeqCst);
        assert!(matches!(l.check(c), Verdict::Limited { .. }));
        now.fetch_add(1, Ordering::SeqCst);
        assert_eq!(l.check(c), Verdict::Allowed);
        // Another source has its own bucket.
        assert_eq!(
            l.check(Source::Client(Uuid::from_u128(1))),
            Verdict::Allowed
        );
    }

    #[test]
    fn repeated_violations_block_for_the_period() {
        let (l, now) = limiter(SecuritySettings {
            per_ip_per_second: 1.0,
            per_ip_burst: 1,
            block_after_violations: 3,
            violation_window_secs: 60,
            block_secs: 900,
            ..SecuritySettings::default()
        });
        let ip = Source::Ip("192.0.2.1".parse().unwrap());
        assert_eq!(l.check(ip), Verdict::Allowed);
        assert!(matches!(l.check(ip), Verdict::Limited { .. }));
        assert!(matches!(l.check(ip), Verdict::Limited { .. }));
        assert_eq!(
            l.check(ip),
            Verdict::Blocked {
                retry_after: 900,
                newly: true
            }
        );
        // Blocked even though the bucket has refilled, until the period ends.
        now.fetch_add(899_000, Ordering::SeqCst);
        assert_eq!(
            l.check(ip),
            Verdict::Blocked {
                retry_after: 1,
                newly: false
            }
        );
        now.fetch_add(1_000, Ordering::SeqCst);
        assert_eq!(l.check(ip), Verdict::Allowed);
    }

    #[test]
    fn idle_sources_are_forgotten_and_busy_ones_kept() {
        let (l, now) = limiter(SecuritySettings {
            per_ip_per_second: 1.0,
            per_ip_burst: 1,
            block_after_violations: 3,
            violation_window_secs: 60,
            block_secs: 900,
            ..SecuritySettings::default()
        });
        // A thousand sources, each refused once: a bucket, a violation and an audit note each.
        for n in 0..1000u32 {
            let ip = Source::Ip(std::net::Ipv4Addr::from(0xc000_0200 + n).into());
            assert_eq!(l.check(ip), Verdict::Allowed);
            assert!(matches!(l.check(ip), Verdict::Limited { .. }));
        }
        l.forget_idle();
        assert_eq!(l.lock().violations.len(), 1000, "inside the window: kept");
        // Past the window, the minute and the refill, and one source busy again.
        now.fetch_add(61_000, Ordering::SeqCst);
        let busy = Source::Ip("198.51.100.7".parse().unwrap());
        assert_eq!(l.check(busy), Verdict::Allowed);
        assert!(matches!(
            l.check(busy),
            Verdict::Limited { audit: true, .. }
        ));
        l.forget_idle();
        let books = l.lock();
        assert_eq!(
            (
                books.buckets.len(),
                books.violations.len(),
                books.last_audit.len(),
                books.blocked.len()
            ),
            (1, 1, 1, 0)
        );
        assert!(books.violations.contains_key(&busy));
    }

    #[test]
    fn failed_authentications_delay_the_pair_then_the_source_with_a_doubling_capped_delay() {
        let (l, now) = limiter(SecuritySettings {
            auth_failures_per_client: 3,
            auth_failures_per_source: 10,
            auth_delay_max_secs: 8,
            ..SecuritySettings::default()
        });
        let (ip, other_ip): (IpAddr, IpAddr) =
            ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let victim = Some(Uuid::from_u128(1));
        // Three free failures, then 1 s, 2 s, 4 s, 8 s, 8 s.
        for _ in 0..3 {
            assert_eq!(l.auth_delay(ip, victim), None);
            assert_eq!(l.auth_failed(ip, victim), None);
        }
        let mut delays = Vec::new();
        for _ in 0..5 {
            delays.push(l.auth_failed(ip, victim).unwrap());
            assert_eq!(l.auth_delay(ip, victim), delays.last().copied());
            now.fetch_add(
                i64::try_from(*delays.last().unwrap()).unwrap() * 1000,
                Ordering::SeqCst,
            );
            assert_eq!(l.auth_delay(ip, victim), None);
        }
        assert_eq!(delays, [1, 2, 4, 8, 8]);
        // The same id from another address, and another id from this one, are not delayed.
        assert_eq!(l.auth_delay(other_ip, victim), None);
        assert_eq!(l.auth_delay(ip, Some(Uuid::from_u128(2))), None);
        // A success clears the pair; the source keeps its count.
        l.auth_succeeded(ip, victim);
        assert_eq!(l.auth_failed(ip, victim), None);
        // Nine so far from this source; its tenth is free, the eleventh delays every id.
        assert_eq!(l.auth_failed(ip, None), None);
        assert_eq!(l.auth_failed(ip, None), Some(1));
        assert!(l.auth_delay(ip, Some(Uuid::from_u128(3))).is_some());
        // A mapped IPv6 form of the address is the same source.
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert!(l.auth_delay(mapped, Some(Uuid::from_u128(3))).is_some());
        // Quiet for the memory period: forgotten.
        now.fetch_add(AUTH_FAILURE_MEMORY_MS + 10_000, Ordering::SeqCst);
        l.forget_idle();
        assert!(l.lock().auth_failures.is_empty());
        assert_eq!(l.auth_failed(ip, victim), None);
    }
}
