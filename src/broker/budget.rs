//! Lock-free reads of what the request path needs from Postgres but may hold for up to a TTL:
//! the seal budget (seals reserved under the active master-key version) and TTL'd values such as
//! the destroyed master-key versions. Requests decrement an atomic or load an `Arc`; one refiller
//! at a time goes to Postgres, ahead of need, and requests wait on it only when nothing usable is
//! left. Knows nothing of HTTP and issues no query itself (the caller's [`Reserve`] or [`Load`]
//! does).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use tokio::sync::Notify;

use crate::crypto::MasterKeyVersion;
use crate::store::{Store, StoreError};

/// Bounds of the adaptive seal reservation block.
pub(super) const MIN_SEAL_BLOCK: u64 = 16;
pub(super) const MAX_SEAL_BLOCK: u64 = 65_536;
/// How many refills a request waits for before it reserves for itself alone: enough for a
/// burst after an idle spell to be served by a few growing blocks, few enough that a refill that
/// keeps failing answers every waiter with its own error soon.
const WAITS: usize = 3;
/// `fetched` when the grant must not be used any more (none yet, or expired on purpose).
const EXPIRED: u64 = u64::MAX;

/// Reserves seals in Postgres: hands back `unused` seals under a version, then reserves `want`
/// seals under the active version, which it returns.
pub(super) trait Reserve: Send + Sync + 'static {
    fn reserve(
        &self,
        unused: Option<(MasterKeyVersion, u64)>,
        want: u64,
    ) -> impl Future<Output = Result<MasterKeyVersion, StoreError>> + Send;
}

impl Reserve for Store {
    fn reserve(
        &self,
        unused: Option<(MasterKeyVersion, u64)>,
        want: u64,
    ) -> impl Future<Output = Result<MasterKeyVersion, StoreError>> + Send {
        self.reserve_seals(unused, want)
    }
}

/// At most one refill in flight; waiters are woken when it lands, whether it worked or not.
#[derive(Default)]
struct SingleFlight {
    busy: AtomicBool,
    landed: Notify,
}

impl SingleFlight {
    /// The right to refill, if nobody holds it. Dropping it (the refill ended, failed or was
    /// cancelled with its request) frees it and wakes the waiters.
    fn start(self: &Arc<Self>) -> Option<Landing> {
        self.busy
            .compare_exchange(false, true, SeqCst, SeqCst)
            .is_ok()
            .then(|| Landing(Arc::clone(self)))
    }
}

struct Landing(Arc<SingleFlight>);

impl Drop for Landing {
    fn drop(&mut self) {
        self.0.busy.store(false, SeqCst);
        self.0.landed.notify_waiters();
    }
}

/// The seals this broker may still do under the active master-key version, reserved in Postgres
/// in blocks so that counting them costs one query per block or per TTL, not one per request.
///
/// The version and the remaining count share one atomic word, so a request takes its seals with
/// one compare-and-swap and a refill replaces the grant with one swap that also tells exactly how
/// many of the old grant's seals went unused (handed back at the next reservation): the count in
/// Postgres stays an upper bound of the seals done. A refill starts when the grant falls below
/// half or reaches three quarters of the TTL, so under steady traffic no request waits; the block
/// doubles when it drained that early and halves when it aged out mostly unused.
pub(super) struct SealBudget<R> {
    reserver: R,
    ttl: Duration,
    /// Origin of `fetched`.
    base: Instant,
    /// `version << 32 | remaining`; version 0 is none.
    state: AtomicU64,
    /// When the reservation behind `state` started, in nanoseconds since `base`, or [`EXPIRED`].
    fetched: AtomicU64,
    /// Size of the grant in `state` when it was published.
    granted: AtomicU64,
    block: AtomicU64,
    /// Bumped by [`SealBudget::expire`], so a refill that started before it publishes expired.
    epoch: AtomicU64,
    /// Seals of a replaced grant not yet handed back. Touched by the refiller only, never
    /// across a query.
    unused: Mutex<Option<(MasterKeyVersion, u64)>>,
    flight: Arc<SingleFlight>,
}

impl<R: Reserve> SealBudget<R> {
    pub(super) fn new(reserver: R, ttl: Duration) -> Self {
        Self {
            reserver,
            ttl,
            base: Instant::now(),
            state: AtomicU64::new(0),
            fetched: AtomicU64::new(EXPIRED),
            granted: AtomicU64::new(0),
            block: AtomicU64::new(MIN_SEAL_BLOCK),
            epoch: AtomicU64::new(0),
            unused: Mutex::new(None),
            flight: Arc::default(),
        }
    }

    /// Reserves `n` seals and returns the version to seal under. `now` is the request's time.
    ///
    /// # Errors
    /// [`StoreError::NoActiveMasterKey`] or a database failure, when no seals were left and the
    /// reservation failed.
    pub(super) async fn reserve(
        self: &Arc<Self>,
        n: u64,
        now: Instant,
    ) -> Result<MasterKeyVersion, StoreError> {
        for _ in 0..WAITS {
            // Registered before looking, so a refill landing in between still wakes us.
            let landed = self.flight.landed.notified();
            tokio::pin!(landed);
            landed.as_mut().enable();
            if let Some(version) = self.try_take(n, now) {
                return Ok(version);
            }
            if let Some(landing) = self.flight.start() {
                // Nothing usable and nobody refilling: we refill, our own seals on top.
                if let Some(version) = self.try_take(n, now) {
                    return Ok(version);
                }
                return self.refill(landing, n, now).await;
            }
            landed.await;
        }
        // Others drained every refill we waited for (or they failed): just our own seals.
        self.reserver.reserve(None, n).await
    }

    /// Seal under the version active from now on: the next request reserves afresh.
    pub(super) fn expire(&self) {
        self.epoch.fetch_add(1, SeqCst);
        self.fetched.store(EXPIRED, SeqCst);
    }

    /// Takes `n` seals from the grant when it is fresh and holds enough; starts a refill in the
    /// background when the grant runs low or old.
    fn try_take(self: &Arc<Self>, n: u64, now: Instant) -> Option<MasterKeyVersion> {
        let mut current = self.state.load(SeqCst);
        loop {
            let (version, remaining) = unpack(current);
            let version = version?;
            let age = self.age(now)?;
            if age >= self.ttl || remaining < n {
                return None;
            }
            match self.state.compare_exchange_weak(
                current,
                pack(Some(version), remaining - n),
                SeqCst,
                SeqCst,
            ) {
                Ok(_) => {
                    if remaining - n < self.granted.load(SeqCst) / 2 || age >= self.ttl * 3 / 4 {
                        self.refill_ahead(now);
                    }
                    return Some(version);
                }
                Err(actual) => current = actual,
            }
        }
    }

    fn refill_ahead(self: &Arc<Self>, now: Instant) {
        let Some(landing) = self.flight.start() else {
            return;
        };
        let budget = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(e) = budget.refill(landing, 0, now).await {
                // The requests that find the grant empty will try again and answer the error.
                tracing::warn!(target: "keybroker::broker", error = %e, "seal reservation ahead of need failed");
            }
        });
    }

    /// Reserves a block (plus `n` seals for the caller, not published) and publishes it.
    async fn refill(
        &self,
        landing: Landing,
        n: u64,
        now: Instant,
    ) -> Result<MasterKeyVersion, StoreError> {
        let _landing = landing;
        let epoch = self.epoch.load(SeqCst);
        let (version, remaining) = unpack(self.state.load(SeqCst));
        let drained = remaining < self.granted.load(SeqCst) / 2;
        let young = self.age(now).is_some_and(|age| age < self.ttl * 3 / 4);
        let block = self.block.load(SeqCst);
        let block = match version {
            Some(_) if drained && young => (block * 2).min(MAX_SEAL_BLOCK),
            Some(_) if !drained => (block / 2).max(MIN_SEAL_BLOCK),
            _ => block,
        };
        let unused = lock(&self.unused).take();
        // Cancelled here (the request went away), the unused seals and the new block stay
        // reserved: an over-count, never an under-count.
        let reserved = match self.reserver.reserve(unused, block + n).await {
            Ok(version) => version,
            Err(e) => {
                if let Some(unused) = unused {
                    lock(&self.unused).get_or_insert(unused);
                }
                return Err(e);
            }
        };
        self.block.store(block, SeqCst);
        self.granted.store(block, SeqCst);
        self.fetched.store(self.stamp(now), SeqCst);
        let old = self.state.swap(pack(Some(reserved), block), SeqCst);
        if self.epoch.load(SeqCst) != epoch {
            // A local rotation committed while we reserved: the version we got may be the old one.
            self.fetched.store(EXPIRED, SeqCst);
        }
        if let (Some(old_version), old_remaining) = unpack(old)
            && old_remaining > 0
        {
            *lock(&self.unused) = Some((old_version, old_remaining));
        }
        Ok(reserved)
    }

    /// How old the grant is; `None` when it must not be used.
    fn age(&self, now: Instant) -> Option<Duration> {
        let fetched = self.fetched.load(SeqCst);
        (fetched != EXPIRED).then(|| Duration::from_nanos(self.stamp(now).saturating_sub(fetched)))
    }

    fn stamp(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos())
            .unwrap_or(EXPIRED - 1)
            .min(EXPIRED - 1)
    }
}

fn pack(version: Option<MasterKeyVersion>, remaining: u64) -> u64 {
    // A grant is at most a block plus a batch; clamping could only leave seals reserved unused.
    (u64::from(version.map_or(0, MasterKeyVersion::get)) << 32) | remaining.min(u64::from(u32::MAX))
}

fn unpack(state: u64) -> (Option<MasterKeyVersion>, u64) {
    let version = u32::try_from(state >> 32)
        .ok()
        .and_then(MasterKeyVersion::new);
    (version, state & u64::from(u32::MAX))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reads a value from Postgres (or through it).
pub(super) trait Load: Send + Sync + 'static {
    type Value: Send + Sync + 'static;
    fn load(&self) -> impl Future<Output = Result<Self::Value, StoreError>> + Send;
}

struct Stamped<T> {
    at: Instant,
    value: Arc<T>,
}

/// A value re-read at most every TTL, read without a lock: a request loads an `Arc`; one
/// refresher re-reads it from three quarters of the TTL on, in the background; requests wait
/// only when the value is older than the TTL (or was never read).
pub(super) struct Refreshed<S: Load> {
    source: S,
    ttl: Duration,
    value: ArcSwapOption<Stamped<S::Value>>,
    flight: Arc<SingleFlight>,
}

impl<S: Load> Refreshed<S> {
    pub(super) fn new(source: S, ttl: Duration) -> Self {
        Self {
            source,
            ttl,
            value: ArcSwapOption::empty(),
            flight: Arc::default(),
        }
    }

    /// The value, read at most a TTL before `now`.
    ///
    /// # Errors
    /// A database failure, when the value had to be read again.
    pub(super) async fn get(self: &Arc<Self>, now: Instant) -> Result<Arc<S::Value>, StoreError> {
        for _ in 0..WAITS {
            let landed = self.flight.landed.notified();
            tokio::pin!(landed);
            landed.as_mut().enable();
            if let Some(value) = self.fresh(now) {
                return Ok(value);
            }
            if let Some(landing) = self.flight.start() {
                if let Some(value) = self.fresh(now) {
                    return Ok(value);
                }
                return self.refresh(landing, now).await;
            }
            landed.await;
        }
        Ok(Arc::new(self.source.load().await?))
    }

    fn fresh(self: &Arc<Self>, now: Instant) -> Option<Arc<S::Value>> {
        let guard = self.value.load();
        let stamped = guard.as_ref()?;
        let age = now.saturating_duration_since(stamped.at);
        if age >= self.ttl {
            return None;
        }
        if age >= self.ttl * 3 / 4
            && let Some(landing) = self.flight.start()
        {
            let this = Arc::clone(self);
            tokio::spawn(async move {
                if let Err(e) = this.refresh(landing, now).await {
                    tracing::warn!(target: "keybroker::broker", error = %e, "refresh ahead of need failed");
                }
            });
        }
        Some(Arc::clone(&stamped.value))
    }

    /// Reads the value; stamped with `at`, a time before the read began.
    async fn refresh(&self, landing: Landing, at: Instant) -> Result<Arc<S::Value>, StoreError> {
        let _landing = landing;
        let value = Arc::new(self.source.load().await?);
        self.value.store(Some(Arc::new(Stamped {
            at,
            value: Arc::clone(&value),
        })));
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU32, AtomicUsize};

    use tokio::sync::watch;

    use super::*;

    /// Postgres as far as reservations go: seals reserved (net of hand-backs) per version.
    struct FakeStore {
        active: AtomicU32,
        reserved: Mutex<HashMap<u32, u64>>,
        calls: AtomicUsize,
        fail: AtomicBool,
        /// Reservations wait while this is false.
        open: watch::Sender<bool>,
    }

    impl FakeStore {
        fn new() -> Arc<Self> {
            Arc::new(Self {
                active: AtomicU32::new(1),
                reserved: Mutex::default(),
                calls: AtomicUsize::new(0),
                fail: AtomicBool::new(false),
                open: watch::channel(true).0,
            })
        }

        fn reserved(&self, version: u32) -> u64 {
            lock(&self.reserved).get(&version).copied().unwrap_or(0)
        }
    }

    impl Reserve for Arc<FakeStore> {
        async fn reserve(
            &self,
            unused: Option<(MasterKeyVersion, u64)>,
            want: u64,
        ) -> Result<MasterKeyVersion, StoreError> {
            let _ = self.open.subscribe().wait_for(|open| *open).await;
            self.calls.fetch_add(1, SeqCst);
            if self.fail.load(SeqCst) {
                return Err(StoreError::NoActiveMasterKey);
            }
            let mut reserved = lock(&self.reserved);
            if let Some((version, count)) = unused {
                *reserved.entry(version.get()).or_default() -= count;
            }
            let active = self.active.load(SeqCst);
            *reserved.entry(active).or_default() += want;
            Ok(MasterKeyVersion::new(active).unwrap())
        }
    }

    const LONG: Duration = Duration::from_secs(3600);

    async fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "never happened: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn landed<R>(budget: &SealBudget<R>) -> bool {
        !budget.flight.busy.load(SeqCst)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_reservations_never_hand_out_more_than_reserved() {
        let store = FakeStore::new();
        let budget = Arc::new(SealBudget::new(store.clone(), LONG));
        let handed: Arc<Mutex<HashMap<u32, u64>>> = Arc::default();
        let tasks: Vec<_> = (0..16_u64)
            .map(|t| {
                let (budget, handed, store) = (budget.clone(), handed.clone(), store.clone());
                tokio::spawn(async move {
                    for i in 0..1_500_u64 {
                        let n = 1 + (i + t) % 5;
                        let version = budget.reserve(n, Instant::now()).await.unwrap();
                        *lock(&handed).entry(version.get()).or_default() += n;
                        // Rotations (on "another node", and local ones) in the middle of it all.
                        if t == 0 && i % 300 == 299 {
                            store.active.fetch_add(1, SeqCst);
                            if i % 600 == 599 {
                                budget.expire();
                            }
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        until("the last refill landed", || landed(&budget)).await;
        let handed = lock(&handed).clone();
        let (current, remaining) = unpack(budget.state.load(SeqCst));
        let unused = *lock(&budget.unused);
        assert!(handed.len() > 1, "no rotation was picked up: {handed:?}");
        for version in 1..=store.active.load(SeqCst) {
            let done = handed.get(&version).copied().unwrap_or(0);
            let reserved = store.reserved(version);
            assert!(
                done <= reserved,
                "v{version}: {done} sealed, {reserved} reserved"
            );
            // Exactly: what is reserved and not done is still held here, to be used or given back.
            let held = if current.map(MasterKeyVersion::get) == Some(version) {
                remaining
            } else {
                0
            } + unused
                .filter(|(v, _)| v.get() == version)
                .map_or(0, |(_, n)| n);
            assert_eq!(reserved - done, held, "v{version}");
        }
        assert_eq!(
            handed.values().sum::<u64>(),
            (0..16_u64)
                .map(|t| (0..1_500_u64).map(|i| 1 + (i + t) % 5).sum::<u64>())
                .sum::<u64>()
        );
    }

    #[tokio::test]
    async fn the_budget_is_refilled_before_it_runs_out() {
        let store = FakeStore::new();
        let budget = Arc::new(SealBudget::new(store.clone(), LONG));
        let now = Instant::now();
        budget.reserve(1, now).await.unwrap();
        assert_eq!(unpack(budget.state.load(SeqCst)).1, MIN_SEAL_BLOCK);
        // Postgres stalls: requests keep sealing from what is left while the refill waits.
        store.open.send_replace(false);
        let half = MIN_SEAL_BLOCK / 2;
        for _ in 0..=half {
            assert!(budget.try_take(1, now).is_some());
        }
        assert!(!landed(&budget), "no refill started below half a block");
        for _ in 0..half - 1 {
            assert!(budget.try_take(1, now).is_some(), "a request waited");
        }
        assert!(budget.try_take(1, now).is_none());
        store.open.send_replace(true);
        until("the refill landed", || landed(&budget)).await;
        assert_eq!(store.calls.load(SeqCst), 2);
        // Drained early: the next block is twice as large.
        assert_eq!(unpack(budget.state.load(SeqCst)).1, 2 * MIN_SEAL_BLOCK);
        assert_eq!(store.reserved(1), 1 + MIN_SEAL_BLOCK + 2 * MIN_SEAL_BLOCK);
    }

    #[tokio::test]
    async fn another_nodes_rotation_is_picked_up_within_the_ttl_and_unused_seals_go_back() {
        let store = FakeStore::new();
        let ttl = Duration::from_secs(1);
        let budget = Arc::new(SealBudget::new(store.clone(), ttl));
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(budget.reserve(1, at(0)).await.unwrap().get(), 1);
        store.active.store(2, SeqCst);
        assert_eq!(budget.reserve(1, at(500)).await.unwrap().get(), 1);
        assert_eq!(
            store.calls.load(SeqCst),
            1,
            "a fresh grant went to Postgres"
        );
        // Three quarters of the TTL: still the old grant, and a refill in the background.
        assert_eq!(budget.reserve(1, at(800)).await.unwrap().get(), 1);
        until("the refill landed", || {
            store.calls.load(SeqCst) == 2 && landed(&budget)
        })
        .await;
        assert_eq!(budget.reserve(1, at(800)).await.unwrap().get(), 2);
        // Past the TTL nothing old is used: the request reserves afresh.
        store.active.store(3, SeqCst);
        assert_eq!(budget.reserve(1, at(2_000)).await.unwrap().get(), 3);
        // v1's unused seals went back with the v3 reservation; v2's wait for the next one.
        assert_eq!(store.reserved(1), 3);
        assert_eq!(store.reserved(2), MIN_SEAL_BLOCK);
        budget.expire();
        assert_eq!(budget.reserve(1, at(2_000)).await.unwrap().get(), 3);
        assert_eq!(store.reserved(2), 1);
    }

    #[tokio::test]
    async fn a_failed_refill_is_answered_and_leaves_nobody_waiting() {
        let store = FakeStore::new();
        let budget = Arc::new(SealBudget::new(store.clone(), LONG));
        store.fail.store(true, SeqCst);
        let err = budget.reserve(1, Instant::now()).await.unwrap_err();
        assert!(matches!(err, StoreError::NoActiveMasterKey), "{err:?}");
        assert!(landed(&budget));
        store.fail.store(false, SeqCst);
        assert_eq!(budget.reserve(1, Instant::now()).await.unwrap().get(), 1);
    }

    struct Counting(Arc<AtomicUsize>);

    impl Load for Counting {
        type Value = usize;

        async fn load(&self) -> Result<usize, StoreError> {
            Ok(self.0.fetch_add(1, SeqCst) + 1)
        }
    }

    #[tokio::test]
    async fn a_refreshed_value_is_read_again_ahead_of_its_ttl_and_never_used_past_it() {
        let loads = Arc::new(AtomicUsize::new(0));
        let value = Arc::new(Refreshed::new(
            Counting(loads.clone()),
            Duration::from_secs(1),
        ));
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(*value.get(at(0)).await.unwrap(), 1);
        assert_eq!(*value.get(at(500)).await.unwrap(), 1);
        assert_eq!(*value.get(at(800)).await.unwrap(), 1);
        until("the refresh landed", || {
            loads.load(SeqCst) == 2 && !value.flight.busy.load(SeqCst)
        })
        .await;
        assert_eq!(*value.get(at(800)).await.unwrap(), 2);
        // Stamped when its read began (800 ms): stale at 1,800 ms.
        assert_eq!(*value.get(at(1_800)).await.unwrap(), 3);
    }
}
