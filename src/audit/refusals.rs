//! Refusals made before authentication succeeds (a missing, malformed, badly signed, expired or
//! revoked bearer token; a disabled client's token; a token request naming no client at all),
//! counted in memory per source address and recorded as one coalesced `auth.refused` event per
//! source per window (a minute by default), with the count and the reasons. A flood of garbage
//! tokens therefore costs no Postgres round trip and no wait on the audit chain's lock on the
//! request path, and adds at most one row per source per window.
//!
//! Refusals that the automatic response counts (denied unwraps, address mismatches with valid
//! credentials) are not kept here: they are recorded one by one, as before. Nor are failed
//! authentications at the token endpoint that name a client id, registered or not: answering
//! an unregistered id faster would tell a guesser which ids exist, and the endpoint's throttle
//! (a doubling delay per source) already bounds them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use uuid::Uuid;

use crate::store::{AuditMeta, NewAuditEvent, Store};

/// Independent locks: refusals from different sources rarely wait on each other.
const SHARDS: usize = 16;
/// Sources remembered per shard within one window; refusals from further sources are counted
/// together (an address spray must not grow memory without bound).
const SOURCES_PER_SHARD: usize = 4096;
/// Client ids named per event, at most.
const CLIENTS_PER_EVENT: usize = 16;

/// What one source was refused within its window.
#[derive(Debug, Default, Clone, PartialEq)]
struct Pending {
    /// When the window opened (unix ms).
    since_ms: i64,
    count: u64,
    reasons: BTreeMap<&'static str, u64>,
    /// Clients whose genuinely signed tokens were refused (revoked, disabled, …).
    clients: BTreeSet<Uuid>,
}

impl Pending {
    fn add(&mut self, reason: &'static str, client: Option<Uuid>, n: u64) {
        self.count += n;
        *self.reasons.entry(reason).or_default() += n;
        if let Some(client) = client
            && self.clients.len() < CLIENTS_PER_EVENT
        {
            self.clients.insert(client);
        }
    }

    fn merge(&mut self, other: Pending) {
        self.since_ms = self.since_ms.min(other.since_ms);
        self.count += other.count;
        for (reason, n) in other.reasons {
            *self.reasons.entry(reason).or_default() += n;
        }
        for client in other.clients {
            if self.clients.len() < CLIENTS_PER_EVENT {
                self.clients.insert(client);
            }
        }
    }
}

/// `None`: the sources past [`SOURCES_PER_SHARD`], together.
type Key = Option<IpAddr>;

/// The tally of one broker. Time is a parameter (unix ms), so tests need no clock.
pub struct RefusalTally {
    shards: Vec<Mutex<HashMap<Key, Pending>>>,
    hasher: RandomState,
    window_ms: i64,
}

impl RefusalTally {
    /// A tally writing one event per source per `window`.
    pub fn new(window: Duration) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            window_ms: i64::try_from(window.as_millis()).unwrap_or(i64::MAX).max(1),
        }
    }

    /// The window, for the flusher's tick.
    pub fn window(&self) -> Duration {
        Duration::from_millis(u64::try_from(self.window_ms).unwrap_or(u64::MAX))
    }

    fn shard(&self, ip: IpAddr) -> &Mutex<HashMap<Key, Pending>> {
        let index = usize::try_from(self.hasher.hash_one(ip)).unwrap_or(0) % SHARDS;
        &self.shards[index]
    }

    /// Counts one refusal of `source` at `now_ms`, and the client its token genuinely names,
    /// if any.
    pub fn count(&self, source: IpAddr, reason: &'static str, client: Option<Uuid>, now_ms: i64) {
        let source = source.to_canonical();
        let mut shard = lock(self.shard(source));
        let key = if shard.len() < SOURCES_PER_SHARD || shard.contains_key(&Some(source)) {
            Some(source)
        } else {
            None
        };
        shard
            .entry(key)
            .or_insert_with(|| Pending {
                since_ms: now_ms,
                ..Pending::default()
            })
            .add(reason, client, 1);
    }

    /// Takes every source whose window has closed at `now_ms` (or every source, with `all`).
    fn take_due(&self, now_ms: i64, all: bool) -> Vec<(Key, Pending)> {
        let mut due = Vec::new();
        for shard in &self.shards {
            let mut shard = lock(shard);
            let keys: Vec<Key> = shard
                .iter()
                .filter(|(_, p)| all || now_ms - p.since_ms >= self.window_ms)
                .map(|(k, _)| *k)
                .collect();
            for key in keys {
                if let Some(pending) = shard.remove(&key) {
                    due.push((key, pending));
                }
            }
        }
        due
    }

    fn put_back(&self, key: Key, pending: Pending) {
        let shard = match key {
            Some(ip) => self.shard(ip),
            None => &self.shards[0],
        };
        lock(shard)
            .entry(key)
            .and_modify(|p| p.merge(pending.clone()))
            .or_insert(pending);
    }

    /// Writes one `auth.refused` event for each source whose window has closed (every source,
    /// with `all`: at shutdown). What cannot be written (Postgres down) stays counted and is
    /// written at a later call. Returns how many events were written.
    pub async fn flush(&self, store: &Store, now_ms: i64, all: bool) -> usize {
        let mut written = 0;
        for (key, pending) in self.take_due(now_ms, all) {
            let (event, meta) = event_of(key, &pending, now_ms);
            match store.audit(&meta, &[event]).await {
                Ok(()) => written += 1,
                Err(e) => {
                    tracing::warn!(target: "keybroker::audit", error = %e,
                        "coalesced refusals not audited yet; kept for the next attempt");
                    self.put_back(key, pending);
                }
            }
        }
        written
    }

    /// Sources with refusals not yet written.
    pub fn pending_sources(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }
}

fn event_of(key: Key, pending: &Pending, now_ms: i64) -> (NewAuditEvent, AuditMeta) {
    let event = NewAuditEvent::info("auth.refused")
        .severity("warning")
        .subject(key.map_or_else(|| "many sources".to_owned(), |ip| ip.to_string()))
        .details(serde_json::json!({
            "count": pending.count,
            "reasons": pending.reasons,
            "clients": pending.clients,
            "since_us": pending.since_ms.saturating_mul(1000),
            "until_us": now_ms.saturating_mul(1000),
        }));
    let meta = AuditMeta {
        actor: "anonymous".to_owned(),
        source_ip: key.map(|ip| ip.to_string()),
        request_id: None,
        at_us: now_ms.saturating_mul(1000),
    };
    (event, meta)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn one_entry_per_source_per_window_with_counts_and_reasons() {
        let tally = RefusalTally::new(Duration::from_secs(60));
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        let client = Uuid::from_u128(7);
        for _ in 0..1000 {
            tally.count(a, "not a JWT", None, 1_000);
        }
        tally.count(a, "token revoked", Some(client), 30_000);
        // The mapped IPv6 form is the same source.
        tally.count(ip("::ffff:192.0.2.1"), "not a JWT", None, 40_000);
        tally.count(b, "no bearer token", None, 50_000);
        assert_eq!(tally.pending_sources(), 2);
        // Before a's minute ends: nothing is due.
        assert!(tally.take_due(60_999, false).is_empty());
        let due = tally.take_due(61_000, false);
        assert_eq!(due.len(), 1);
        let (key, pending) = &due[0];
        assert_eq!(*key, Some(a));
        assert_eq!(pending.count, 1002);
        assert_eq!(pending.reasons["not a JWT"], 1001);
        assert_eq!(pending.reasons["token revoked"], 1);
        assert_eq!(pending.clients, BTreeSet::from([client]));
        // a starts a new window with its next refusal; b's closes at its own minute.
        tally.count(a, "not a JWT", None, 70_000);
        let due = tally.take_due(110_000, false);
        assert_eq!(due.iter().map(|(k, _)| *k).collect::<Vec<_>>(), [Some(b)]);
        assert_eq!(
            tally.take_due(110_000, true).len(),
            1,
            "all: a's open window too"
        );
        assert_eq!(tally.pending_sources(), 0);
    }

    #[test]
    fn a_spray_of_sources_is_bounded_and_counted_together() {
        let tally = RefusalTally::new(Duration::from_secs(60));
        let n = u32::try_from(SHARDS * SOURCES_PER_SHARD * 2).unwrap();
        for i in 0..n {
            tally.count(
                std::net::Ipv4Addr::from(0x0a00_0000 + i).into(),
                "x",
                None,
                0,
            );
        }
        assert!(tally.pending_sources() <= SHARDS * (SOURCES_PER_SHARD + 1));
        let due = tally.take_due(60_000, false);
        let total: u64 = due.iter().map(|(_, p)| p.count).sum();
        assert_eq!(total, u64::from(n), "every refusal is counted");
        assert!(due.iter().any(|(k, _)| k.is_none()));
    }

    #[test]
    fn what_could_not_be_written_is_kept_and_merged() {
        let tally = RefusalTally::new(Duration::from_secs(60));
        let a = ip("192.0.2.1");
        tally.count(a, "x", None, 0);
        let (key, pending) = tally.take_due(60_000, false).pop().unwrap();
        tally.count(a, "y", None, 61_000);
        tally.put_back(key, pending);
        let (_, merged) = tally.take_due(200_000, false).pop().unwrap();
        assert_eq!((merged.count, merged.since_ms), (2, 0));
        let (event, meta) = event_of(Some(a), &merged, 200_000);
        assert_eq!(
            event.details["reasons"],
            serde_json::json!({"x": 1, "y": 1})
        );
        assert_eq!(meta.source_ip.as_deref(), Some("192.0.2.1"));
        assert_eq!(meta.actor, "anonymous");
    }
}
