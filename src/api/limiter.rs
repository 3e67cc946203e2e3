//! The rate limiter: limits per source address and per client (governor's GCRA keyed
//! limiters), blocking of sources that keep going over, sources an officer blocked with a
//! lockdown (for a while), and the throttle on failed authentications at the token endpoint (per
//! source and per source and client id). Settings come from Postgres through the broker and are
//! re-read every few seconds by [`Limiter::refresh`], so a change takes effect on every broker
//! without a restart: a changed quota builds a new keyed limiter, swapped in whole. Time is a
//! parameter (the clock is injected, and governor reads it too). `tower-governor` is not used:
//! its quota is fixed when the layer is built and it answers refusals itself, while ours change
//! at run time and feed the blocking of repeated violators and the coalesced audit events. It
//! knows no HTTP: `limits` applies its verdicts to requests.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::state::keyed::{HashMapStateStore, ShrinkableKeyedStateStore};
use governor::{Quota, RateLimiter};
use ipnet::IpNet;
use uuid::Uuid;

use crate::broker::{Broker, BrokerError, MAX_BURST, MAX_RATE, MIN_RATE, SecuritySettings};

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

/// Shards of the per-source state. A check locks one shard for a map lookup, so requests from
/// different sources rarely meet on a lock, and no lock is ever held across I/O.
const SHARDS: usize = 64;

/// Our clock as governor reads it: the time since the Unix epoch. Governor only ever subtracts
/// two readings, so the epoch does not matter; a clock that steps back reads as no time passed.
#[derive(Clone)]
struct GovernorClock(Clock);

impl governor::clock::Clock for GovernorClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        Duration::from_millis(u64::try_from((self.0)()).unwrap_or(0))
    }
}

/// Governor's per-key state (one atomic per source), split over shards each behind its own
/// short lock. Governor's `DashMapStateStore` is the same idea, but dashmap would bring a second
/// copy of hashbrown into the build; its plain `HashMapStateStore` is one mutex for everyone.
struct ShardedStore {
    shards: Box<[HashMapStateStore<Source>]>,
    hasher: RandomState,
}

impl ShardedStore {
    fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| HashMapStateStore::default()).collect(),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, key: &Source) -> &HashMapStateStore<Source> {
        // The remainder is below the length, so the index is in range.
        &self.shards[shard_index(&self.hasher, key, self.shards.len())]
    }
}

impl StateStore for ShardedStore {
    type Key = Source;

    fn measure_and_replace<T, F, E>(&self, key: &Source, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.shard(key).measure_and_replace(key, f)
    }
}

impl ShrinkableKeyedStateStore<Source> for ShardedStore {
    fn retain_recent(&self, drop_below: Nanos) {
        for shard in &self.shards {
            shard.retain_recent(drop_below);
        }
    }

    fn shrink_to_fit(&self) {
        for shard in &self.shards {
            ShrinkableKeyedStateStore::shrink_to_fit(shard);
        }
    }

    fn len(&self) -> usize {
        self.shards.iter().map(ShrinkableKeyedStateStore::len).sum()
    }

    fn is_empty(&self) -> bool {
        self.shards.iter().all(ShrinkableKeyedStateStore::is_empty)
    }
}

fn shard_index(hasher: &RandomState, key: &Source, len: usize) -> usize {
    // Truncating the hash is fine: any bits pick a shard evenly.
    (hasher.hash_one(key) as usize) % len
}

/// One GCRA limiter for one kind of source (addresses, or clients).
type KeyedLimiter = RateLimiter<Source, ShardedStore, GovernorClock, NoOpMiddleware<Duration>>;

fn keyed_limiter(per_second: f64, burst: u32, clock: &Clock) -> KeyedLimiter {
    RateLimiter::new(
        quota(per_second, burst),
        ShardedStore::new(),
        GovernorClock(clock.clone()),
    )
}

/// `burst` requests at once, then one every `1 / per_second` s (GCRA: a bucket of `burst` cells
/// that refills continuously at the rate).
fn quota(per_second: f64, burst: u32) -> Quota {
    // Within the validated ranges whatever is stored (a row edited by hand): beyond them the
    // limiter's horizon, burst / rate, would overflow its nanosecond clock.
    let per_second = per_second.clamp(MIN_RATE, MAX_RATE);
    let burst = NonZeroU32::new(burst.min(MAX_BURST)).unwrap_or(NonZeroU32::MIN);
    let period = Duration::try_from_secs_f64(1.0 / per_second).ok();
    match period.and_then(Quota::with_period) {
        Some(quota) => quota.allow_burst(burst),
        // Settings are validated before they are stored (rates above 0 and at most a million a
        // second), so this only meets a row edited by hand: the default rate, never no limit.
        None => quota(SecuritySettings::default().per_ip_per_second, burst.get()),
    }
}

/// The settings in force and the limiters built from them, swapped in whole on a change.
struct Policy {
    settings: Arc<SecuritySettings>,
    per_ip: Arc<KeyedLimiter>,
    per_client: Arc<KeyedLimiter>,
}

impl Policy {
    fn limiter(&self, source: &Source) -> &KeyedLimiter {
        match source {
            Source::Ip(_) => &self.per_ip,
            Source::Client(_) => &self.per_client,
        }
    }
}

/// What is remembered of the sources that went over: only refusals touch it (and a check while
/// some source is blocked), so an allowed request normally never locks it.
#[derive(Debug, Default)]
struct Books {
    /// Violations in the current window: (count, window start).
    violations: HashMap<Source, (u32, i64)>,
    /// Blocked until (ms).
    blocked: HashMap<Source, i64>,
    /// When a `rate_limit_exceeded` event was last recorded for the source (coalescing).
    last_audit: HashMap<Source, i64>,
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
    policy: RwLock<Arc<Policy>>,
    blocked_cidrs: RwLock<Vec<IpNet>>,
    /// Violations, blocks and audit notes, sharded by source like governor's state.
    books: Box<[Mutex<Books>]>,
    books_hasher: RandomState,
    /// How many sources are blocked (entries in `books`, ended or not): while none is, a check
    /// skips the books altogether.
    blocks: AtomicUsize,
    /// Failed authentications at the token endpoint (not the hot path: one lock is fine).
    auth_failures: Mutex<HashMap<AuthKey, Failures>>,
    clock: Clock,
}

impl Limiter {
    /// A limiter with the given settings and clock.
    pub fn new(settings: SecuritySettings, clock: Clock) -> Self {
        let policy = Policy {
            per_ip: Arc::new(keyed_limiter(
                settings.per_ip_per_second,
                settings.per_ip_burst,
                &clock,
            )),
            per_client: Arc::new(keyed_limiter(
                settings.per_client_per_second,
                settings.per_client_burst,
                &clock,
            )),
            settings: Arc::new(settings),
        };
        Self {
            policy: RwLock::new(Arc::new(policy)),
            blocked_cidrs: RwLock::new(Vec::new()),
            books: (0..SHARDS).map(|_| Mutex::default()).collect(),
            books_hasher: RandomState::new(),
            blocks: AtomicUsize::new(0),
            auth_failures: Mutex::default(),
            clock,
        }
    }

    fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<SecuritySettings> {
        self.policy().settings.clone()
    }

    /// Re-reads the settings and the blocked sources from Postgres (every broker does this every
    /// few seconds), and forgets idle sources so memory stays bounded.
    ///
    /// # Errors
    /// An outage (the previous settings stay in force).
    pub async fn refresh(&self, broker: &Broker) -> Result<(), BrokerError> {
        let settings = broker.security_settings().await?;
        let now_s = (self.clock)() / 1000;
        let cidrs: Vec<IpNet> = broker
            .blocked_sources(now_s)
            .await?
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect();
        *self
            .blocked_cidrs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = cidrs;
        self.apply(settings);
        self.forget_idle();
        Ok(())
    }

    /// Puts `settings` in force. A limiter whose quota changed is replaced by a new one, so
    /// every source of that kind starts with the new burst; the other keeps its state (a new
    /// per-client rate does not hand every address a fresh burst).
    fn apply(&self, settings: SecuritySettings) {
        // The usual case (every 2 s, nothing changed) takes no write lock.
        if *self.settings() == settings {
            return;
        }
        let mut policy = self
            .policy
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *policy.settings == settings {
            return;
        }
        let old = &policy.settings;
        // The limiter in force if its quota (rate, burst) is unchanged, else a new one.
        let kept_or_new = |current: &Arc<KeyedLimiter>, was: (f64, u32), now: (f64, u32)| {
            if was == now {
                current.clone()
            } else {
                Arc::new(keyed_limiter(now.0, now.1, &self.clock))
            }
        };
        let per_ip = kept_or_new(
            &policy.per_ip,
            (old.per_ip_per_second, old.per_ip_burst),
            (settings.per_ip_per_second, settings.per_ip_burst),
        );
        let per_client = kept_or_new(
            &policy.per_client,
            (old.per_client_per_second, old.per_client_burst),
            (settings.per_client_per_second, settings.per_client_burst),
        );
        *policy = Arc::new(Policy {
            settings: Arc::new(settings),
            per_ip,
            per_client,
        });
    }

    /// Forgets what no longer decides anything: sources whose GCRA state has fully refilled
    /// (governor's `retain_recent`), ended blocks, violation windows that have passed and
    /// audit notes older than the coalescing minute. Each is what a new entry would be, so this
    /// changes no verdict; it keeps memory bounded by the sources seen recently, not by every
    /// source ever refused.
    fn forget_idle(&self) {
        let now = (self.clock)();
        let policy = self.policy();
        for limiter in [&policy.per_ip, &policy.per_client] {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        let window_ms = i64::try_from(policy.settings.violation_window_secs)
            .unwrap_or(i64::MAX / 2)
            .saturating_mul(1000);
        for shard in &self.books {
            let mut books = lock(shard);
            let before = books.blocked.len();
            books.blocked.retain(|_, until| *until > now);
            self.blocks
                .fetch_sub(before - books.blocked.len(), Ordering::Release);
            books
                .violations
                .retain(|_, (_, start)| now - *start < window_ms);
            books.last_audit.retain(|_, last| now - *last < 60_000);
        }
        lock(&self.auth_failures)
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
        let failures = lock(&self.auth_failures);
        Self::auth_keys(ip, client)
            .iter()
            .filter_map(|k| failures.get(k))
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
        let mut failures = lock(&self.auth_failures);
        let mut started = None;
        for key in Self::auth_keys(ip, client) {
            let free = match key {
                AuthKey::Source(_) => settings.auth_failures_per_source,
                AuthKey::SourceClient(..) => settings.auth_failures_per_client,
            };
            let entry = failures.entry(key).or_insert(Failures {
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
        lock(&self.auth_failures).remove(&pair);
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

    fn books_of(&self, source: &Source) -> std::sync::MutexGuard<'_, Books> {
        // The remainder is below the length, so the index is in range.
        lock(&self.books[shard_index(&self.books_hasher, source, self.books.len())])
    }

    /// Takes one request from `source`'s allowance.
    pub fn check(&self, source: Source) -> Verdict {
        let policy = self.policy();
        if self.blocks.load(Ordering::Acquire) > 0 {
            let now = (self.clock)();
            let mut books = self.books_of(&source);
            if let Some(until) = books.blocked.get(&source).copied() {
                if until > now {
                    return Verdict::Blocked {
                        retry_after: seconds_until(now, until),
                        newly: false,
                    };
                }
                books.blocked.remove(&source);
                self.blocks.fetch_sub(1, Ordering::Release);
            }
        }
        let limiter = policy.limiter(&source);
        let not_until = match limiter.check_key(&source) {
            Ok(()) => return Verdict::Allowed,
            Err(not_until) => not_until,
        };
        // From a reading taken after governor's, so the wait is never overstated.
        let now = (self.clock)();
        let wait = not_until.wait_time_from(governor::clock::Clock::now(limiter.clock()));
        let retry_after = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
        self.violation(source, now, &policy.settings, retry_after)
    }

    /// Counts a refusal of `source`; too many within the window block it.
    fn violation(
        &self,
        source: Source,
        now: i64,
        settings: &SecuritySettings,
        retry_after: u64,
    ) -> Verdict {
        let window_ms = i64::try_from(settings.violation_window_secs)
            .unwrap_or(i64::MAX / 2)
            .saturating_mul(1000);
        let mut books = self.books_of(&source);
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
            if books.blocked.insert(source, now + block_ms).is_none() {
                self.blocks.fetch_add(1, Ordering::Release);
            }
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn seconds_until(now: i64, until: i64) -> u64 {
    u64::try_from((until - now + 999) / 1000)
        .unwrap_or(0)
        .max(1)
}

#[cfg(test)]
mod tests;
