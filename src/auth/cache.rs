//! The node-local cache of what authenticating a request reads from Postgres: each client's
//! state, parsed scopes and address policy, and the revoked token ids. It is kept coherent by
//! Postgres `LISTEN/NOTIFY` (every broker hears each change when it commits; this process's own
//! changes are applied before the write returns), re-read in the background so that nothing in
//! it is older than its maximum age, and it fails closed: while the listener is down, or the
//! last re-read is older than the maximum age, every request reads Postgres as before, until
//! the listener is back and everything was reloaded. It reaches Postgres only through `store`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use uuid::Uuid;

use super::{AuthError, Client};
use crate::store::{AuthChange, AuthChangeSink, AuthListener, Store, StoreError};

/// The default maximum age (the architecture's 1 s backstop).
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(1);
/// Shards of the client map, so that concurrent requests rarely meet on one lock.
const SHARDS: usize = 16;
/// Clients one shard remembers before it starts afresh (memory stays bounded).
const SHARD_CAPACITY: usize = 4096;
/// How long to wait before listening again after the listener failed.
const RELISTEN_DELAY: Duration = Duration::from_millis(250);

/// What a request needs to know about the caller's client, and whether its token is revoked.
pub(super) struct ClientState {
    /// The client, as last read (`None`: it does not exist).
    pub client: Option<Arc<Client>>,
    /// Whether the token's `jti` is revoked.
    pub revoked: bool,
}

/// A client map shard: `None` remembers that no such client exists.
type Shard = RwLock<HashMap<Uuid, Option<Arc<Client>>>>;

/// See the module documentation.
pub struct AuthCache {
    store: Store,
    max_age: Duration,
    /// The zero of `refreshed_ms`.
    started: Instant,
    /// True while the listener is connected and everything was reloaded after it connected.
    listening: AtomicBool,
    /// When the last complete re-read finished, in ms since `started`.
    refreshed_ms: AtomicU64,
    /// Bumped whenever a change drops an entry: a read-through that began before a bump is not
    /// kept, since it may hold what the change replaced.
    changes: AtomicU64,
    clients: [Shard; SHARDS],
    /// Revoked `jti`s, read without a lock by every request; replaced whole by its writers.
    revoked: ArcSwap<HashSet<Uuid>>,
    /// Serialises the writers of `revoked`, and counts the revocations applied one by one, so
    /// that a re-read that began before one of them merges with it instead of dropping it.
    revocations: Mutex<u64>,
    /// Bumped on every change of the security settings or the blocked sources.
    limits: watch::Sender<u64>,
}

impl AuthCache {
    /// A cache over `store`, not used until its listener has connected and loaded (see
    /// [`AuthCache::spawn_listener`]); until then every request reads Postgres.
    pub fn new(store: Store, max_age: Duration) -> Arc<Self> {
        let cache = Arc::new(Self {
            store: store.clone(),
            max_age: max_age.max(Duration::from_millis(10)),
            started: Instant::now(),
            listening: AtomicBool::new(false),
            refreshed_ms: AtomicU64::new(0),
            changes: AtomicU64::new(0),
            clients: std::array::from_fn(|_| RwLock::new(HashMap::new())),
            revoked: ArcSwap::default(),
            revocations: Mutex::new(0),
            limits: watch::channel(0).0,
        });
        let sink: Weak<dyn AuthChangeSink> = Arc::downgrade(&cache) as Weak<dyn AuthChangeSink>;
        store.subscribe_auth_changes(sink);
        cache
    }

    /// Starts the task that listens for changes and re-reads the cache; it ends when the cache
    /// is dropped.
    pub fn spawn_listener(self: &Arc<Self>) {
        tokio::spawn(listen(Arc::downgrade(self)));
    }

    /// Changes whenever the security settings or blocked sources changed (on any broker), or
    /// may have while the listener was down.
    pub fn limits_changes(&self) -> watch::Receiver<u64> {
        self.limits.subscribe()
    }

    /// Whether requests are answered from memory now (listener up, re-read recent enough).
    pub fn is_live(&self) -> bool {
        self.listening.load(Ordering::Acquire)
            && self
                .now_ms()
                .saturating_sub(self.refreshed_ms.load(Ordering::Acquire))
                <= duration_ms(self.max_age)
    }

    /// The caller's client and whether the token is revoked: from memory while the cache is
    /// live, else from Postgres.
    pub(super) async fn client_state(
        &self,
        client_id: Uuid,
        jti: Uuid,
    ) -> Result<ClientState, AuthError> {
        if !self.is_live() {
            return self.read_through(client_id, jti).await;
        }
        let revoked = self.revoked.load().contains(&jti);
        if let Some(client) = read(self.shard(client_id)).get(&client_id) {
            return Ok(ClientState {
                client: client.clone(),
                revoked,
            });
        }
        let seen = self.changes.load(Ordering::Acquire);
        let client = self.load_client(client_id).await?;
        if self.changes.load(Ordering::Acquire) == seen && self.is_live() {
            let mut shard = write(self.shard(client_id));
            if shard.len() >= SHARD_CAPACITY {
                shard.clear();
            }
            shard.insert(client_id, client.clone());
        }
        Ok(ClientState { client, revoked })
    }

    /// The per-request read of Postgres (the cache's fallback).
    async fn read_through(&self, client_id: Uuid, jti: Uuid) -> Result<ClientState, AuthError> {
        match self.store.client_auth_state(client_id, jti).await? {
            Some(state) => Ok(ClientState {
                client: Some(Arc::new(Client::try_from(state.client)?)),
                revoked: state.revoked,
            }),
            None => Ok(ClientState {
                client: None,
                revoked: false,
            }),
        }
    }

    async fn load_client(&self, client_id: Uuid) -> Result<Option<Arc<Client>>, AuthError> {
        self.store
            .client(client_id)
            .await?
            .map(|row| Client::try_from(row).map(Arc::new))
            .transpose()
    }

    fn shard(&self, id: Uuid) -> &Shard {
        &self.clients[usize::from(id.as_bytes()[15]) % SHARDS]
    }

    fn now_ms(&self) -> u64 {
        duration_ms(self.started.elapsed())
    }

    fn forget_client(&self, id: Uuid) {
        self.changes.fetch_add(1, Ordering::AcqRel);
        write(self.shard(id)).remove(&id);
    }

    fn forget_everything(&self) {
        self.changes.fetch_add(1, Ordering::AcqRel);
        for shard in &self.clients {
            write(shard).clear();
        }
        self.limits.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// After the listener (re)connected: drops every client (each is read again on its next
    /// request) and reloads the revoked ids, then serves from memory again.
    async fn reload(&self) -> Result<(), StoreError> {
        self.forget_everything();
        let seen = *lock(&self.revocations);
        let revoked = self.store.revoked_token_ids().await?;
        self.replace_revoked(revoked, seen);
        self.refreshed_ms.store(self.now_ms(), Ordering::Release);
        self.listening.store(true, Ordering::Release);
        Ok(())
    }

    /// The backstop: re-reads every cached client and the revoked ids. Runs on the listener's
    /// task, so a notification heard meanwhile is applied after it, never overwritten by it.
    ///
    /// A client this process changed meanwhile (its own write, applied at once) is not
    /// overwritten with what was read before it; the re-read then does not count as complete,
    /// and the next one tries again.
    async fn refresh(&self) -> Result<(), StoreError> {
        let started = self.now_ms();
        let seen_changes = self.changes.load(Ordering::Acquire);
        let seen_revocations = *lock(&self.revocations);
        let ids: Vec<Uuid> = self
            .clients
            .iter()
            .flat_map(|shard| read(shard).keys().copied().collect::<Vec<_>>())
            .collect();
        let revoked = self.store.revoked_token_ids().await?;
        let rows = if ids.is_empty() {
            Vec::new()
        } else {
            self.store.clients_by_id(&ids).await?
        };
        let mut fresh: HashMap<Uuid, Option<Arc<Client>>> =
            ids.into_iter().map(|id| (id, None)).collect();
        for row in rows {
            let id = row.id;
            match Client::try_from(row) {
                Ok(client) => {
                    fresh.insert(id, Some(Arc::new(client)));
                }
                // Not kept: its next request reads it again (and fails the same way there).
                Err(_) => {
                    fresh.remove(&id);
                    write(self.shard(id)).remove(&id);
                }
            }
        }
        let mut complete = true;
        for (id, client) in fresh {
            let mut shard = write(self.shard(id));
            // Checked under the shard's lock, which a change takes to drop its entry.
            if self.changes.load(Ordering::Acquire) != seen_changes {
                complete = false;
                break;
            }
            // An entry dropped meanwhile stays dropped; one read since is as fresh as ours.
            if let Some(entry) = shard.get_mut(&id) {
                *entry = client;
            }
        }
        self.replace_revoked(revoked, seen_revocations);
        if complete {
            self.refreshed_ms.store(started, Ordering::Release);
        }
        Ok(())
    }

    /// Applies one revocation at once.
    fn note_revoked(&self, jti: Uuid) {
        let mut applied = lock(&self.revocations);
        let mut set = HashSet::clone(&self.revoked.load());
        set.insert(jti);
        self.revoked.store(Arc::new(set));
        *applied += 1;
    }

    /// Puts in place the revoked ids read from Postgres, merged with any revocation applied
    /// since the read began (`seen` revocations had been applied then): a revocation is never
    /// undone, only forgotten once its token expired, at a later re-read.
    fn replace_revoked(&self, read: Vec<Uuid>, seen: u64) {
        let applied = lock(&self.revocations);
        let mut set: HashSet<Uuid> = read.into_iter().collect();
        if *applied != seen {
            set.extend(self.revoked.load().iter().copied());
        }
        self.revoked.store(Arc::new(set));
    }

    fn lost_listener(&self) {
        self.listening.store(false, Ordering::Release);
    }
}

impl AuthChangeSink for AuthCache {
    fn changed(&self, change: AuthChange) {
        tracing::debug!(target: "keybroker::auth", ?change, "auth cache: change applied");
        match change {
            AuthChange::Client(id) => self.forget_client(id),
            AuthChange::Revoked(jti) => self.note_revoked(jti),
            AuthChange::Settings | AuthChange::Blocks => {
                self.limits.send_modify(|n| *n = n.wrapping_add(1));
            }
            AuthChange::Unknown => self.forget_everything(),
        }
    }
}

/// The listener task: listen, reload, then apply each change as it comes and re-read everything
/// a few times per maximum age; on any failure, fall back to Postgres and start over.
async fn listen(cache: Weak<AuthCache>) {
    let mut lost_logged = false;
    loop {
        let Some((store, interval)) = cache.upgrade().map(|c| (c.store.clone(), c.max_age / 3))
        else {
            return;
        };
        let mut listener = match store.listen_auth_changes().await {
            Ok(listener) => listener,
            Err(e) => {
                if !lost_logged {
                    tracing::warn!(target: "keybroker::auth", error = %e,
                        "auth cache: cannot listen for changes; reading Postgres per request until it can");
                    lost_logged = true;
                }
                tokio::time::sleep(RELISTEN_DELAY).await;
                continue;
            }
        };
        // LISTEN is in place: whatever commits from now on is heard, so what is read now cannot
        // miss a change.
        match cache.upgrade() {
            Some(c) => {
                if let Err(e) = c.reload().await {
                    tracing::warn!(target: "keybroker::auth", error = %e, "auth cache: reload failed");
                    tokio::time::sleep(RELISTEN_DELAY).await;
                    continue;
                }
            }
            None => return,
        }
        tracing::info!(target: "keybroker::auth", "auth cache: listening for changes; cache reloaded");
        match follow(&cache, &mut listener, interval).await {
            Followed::CacheGone => return,
            Followed::Lost(why) => {
                tracing::warn!(target: "keybroker::auth", reason = %why,
                    "auth cache: change listener lost; reading Postgres per request until it is back");
                // Said once per loss, not once per failed attempt to listen again.
                lost_logged = true;
            }
        }
    }
}

enum Followed {
    CacheGone,
    Lost(String),
}

/// Applies changes and re-reads until the listener fails or the cache is dropped.
async fn follow(
    cache: &Weak<AuthCache>,
    listener: &mut AuthListener,
    interval: Duration,
) -> Followed {
    let mut ticks = tokio::time::interval(interval.max(Duration::from_millis(10)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        tokio::select! {
            change = listener.next() => {
                let Some(c) = cache.upgrade() else { return Followed::CacheGone };
                match change {
                    Ok(Some(change)) => c.changed(change),
                    Ok(None) => {
                        c.lost_listener();
                        return Followed::Lost("connection lost".to_owned());
                    }
                    Err(e) => {
                        c.lost_listener();
                        return Followed::Lost(e.to_string());
                    }
                }
            }
            _ = ticks.tick() => {
                let Some(c) = cache.upgrade() else { return Followed::CacheGone };
                // The listener's own connection must still answer: a connection that died
                // without a word would otherwise leave us deaf.
                if let Err(e) = listener.check().await {
                    c.lost_listener();
                    return Followed::Lost(e.to_string());
                }
                if let Err(e) = c.refresh().await {
                    // Not fatal: past the maximum age, requests read Postgres by themselves.
                    tracing::debug!(target: "keybroker::auth", error = %e, "auth cache: re-read failed");
                }
            }
        }
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A cache whose store never connects: these tests touch memory only.
    fn cache() -> Arc<AuthCache> {
        let store = Store::connect_lazy("postgres://nobody@127.0.0.1:1/none", 1).unwrap();
        AuthCache::new(store, DEFAULT_MAX_AGE)
    }

    fn revoked(cache: &AuthCache) -> Vec<Uuid> {
        let mut ids: Vec<Uuid> = cache.revoked.load().iter().copied().collect();
        ids.sort();
        ids
    }

    #[tokio::test]
    async fn a_reread_replaces_the_revoked_ids_but_keeps_a_revocation_applied_meanwhile() {
        let cache = cache();
        let (expired, listed, meanwhile) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        cache.changed(AuthChange::Revoked(expired));
        // A re-read with no revocation applied while it ran: what Postgres listed, no more
        // (the expired token's row was purged there).
        let seen = *lock(&cache.revocations);
        cache.replace_revoked(vec![listed], seen);
        assert_eq!(revoked(&cache), vec![listed]);
        // One began before a revocation this process applied (its own write, or a notification
        // heard by another path): the read cannot hold it, and it must not be lost.
        let seen = *lock(&cache.revocations);
        cache.changed(AuthChange::Revoked(meanwhile));
        cache.replace_revoked(vec![listed], seen);
        let mut want = vec![listed, meanwhile];
        want.sort();
        assert_eq!(revoked(&cache), want);
    }

    #[tokio::test]
    async fn a_cache_is_not_used_before_its_listener_has_loaded_it() {
        let cache = cache();
        assert!(!cache.is_live());
        cache.listening.store(true, Ordering::Release);
        cache.refreshed_ms.store(cache.now_ms(), Ordering::Release);
        assert!(cache.is_live());
        cache.lost_listener();
        assert!(!cache.is_live(), "fails closed once the listener is lost");
    }
}
