//! The optional data-key cache, after the AWS Encryption SDK's caching materials manager:
//! encryption reuses one data key per context until it is too old or has sealed too many
//! messages or bytes; decryption keeps unwrapped keys by (wrapped key, context). Keys are held
//! in zeroizing buffers, so they are wiped when evicted, replaced or dropped with the cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use crate::envelope::KEY_LEN;

/// A data key's bytes; wiped on drop.
pub(crate) type Dek = Zeroizing<[u8; KEY_LEN]>;

/// Bounds of a [`DataKeyCache`], shared by its clones. Set them with the builder methods of
/// [`DataKeyCache`]; the defaults are the AWS Encryption SDK's limits for AES-GCM (2^32
/// messages per key) with a five-minute age and 100 entries.
#[derive(Clone)]
pub struct DataKeyCache {
    max_age: Duration,
    max_messages: u64,
    max_bytes: u64,
    capacity: usize,
    entries: Arc<Mutex<Entries>>,
}

impl std::fmt::Debug for DataKeyCache {
    // The bounds and the fill, never the keys.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKeyCache")
            .field("max_age", &self.max_age)
            .field("max_messages", &self.max_messages)
            .field("max_bytes", &self.max_bytes)
            .field("capacity", &self.capacity)
            .field("len", &self.len())
            .finish()
    }
}

impl Default for DataKeyCache {
    fn default() -> Self {
        Self::new()
    }
}

/// Which use an entry serves.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Slot {
    /// Encryption under this context (its envelope encoding).
    Encrypt(Vec<u8>),
    /// Decryption of this wrapped key under this context.
    Decrypt(String, Vec<u8>),
}

struct Entry {
    dek: Dek,
    /// The wrapped form of `dek` (for encryption entries: what the envelope carries).
    wrapped: String,
    created: Instant,
    /// Last use, for least-recently-used eviction.
    used: u64,
    messages: u64,
    bytes: u64,
}

#[derive(Default)]
struct Entries {
    map: HashMap<Slot, Entry>,
    tick: u64,
}

impl DataKeyCache {
    /// A cache with the default bounds.
    #[must_use]
    pub fn new() -> Self {
        Self {
            max_age: Duration::from_secs(300),
            max_messages: 1 << 32,
            max_bytes: u64::MAX,
            capacity: 100,
            entries: Arc::default(),
        }
    }

    /// A key is not used after it is this old.
    #[must_use]
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }

    /// An encryption key seals at most this many messages.
    #[must_use]
    pub fn max_messages(mut self, max_messages: u64) -> Self {
        self.max_messages = max_messages.max(1);
        self
    }

    /// An encryption key seals at most this many plaintext bytes in all; a single message
    /// larger than this gets a key of its own that is not cached.
    #[must_use]
    pub fn max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// At most this many keys (encryption and decryption together); the least recently used
    /// goes first.
    #[must_use]
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// Keys held now.
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether no key is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops (and wipes) every key.
    pub fn clear(&self) {
        self.lock().map.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // A panic elsewhere while holding the lock leaves the map consistent (every change is
        // one insert or remove), so a poisoned lock is still usable.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A key for encrypting `len` bytes under `context` (its encoding), with the use counted,
    /// or none when there is none or the one there would go over a bound (it is evicted then).
    pub(crate) fn take_for_encrypt(
        &self,
        context: &[u8],
        len: u64,
        now: Instant,
    ) -> Option<(Dek, String)> {
        let slot = Slot::Encrypt(context.to_vec());
        let mut entries = self.lock();
        let tick = entries.next_tick();
        let entry = entries.map.get_mut(&slot)?;
        let spent = self.too_old(entry, now)
            || entry.messages >= self.max_messages
            || entry.bytes.saturating_add(len) > self.max_bytes;
        if spent {
            entries.map.remove(&slot);
            return None;
        }
        entry.messages += 1;
        entry.bytes += len;
        entry.used = tick;
        Some((entry.dek.clone(), entry.wrapped.clone()))
    }

    /// Keeps a fresh encryption key that has just sealed its first message of `len` bytes.
    pub(crate) fn put_for_encrypt(
        &self,
        context: &[u8],
        dek: &Dek,
        wrapped: &str,
        len: u64,
        now: Instant,
    ) {
        if len > self.max_bytes {
            return;
        }
        self.insert(Slot::Encrypt(context.to_vec()), dek, wrapped, 1, len, now);
    }

    /// The unwrapped key of `wrapped` under `context`, if held and not too old.
    pub(crate) fn get_for_decrypt(
        &self,
        wrapped: &str,
        context: &[u8],
        now: Instant,
    ) -> Option<Dek> {
        let slot = Slot::Decrypt(wrapped.to_owned(), context.to_vec());
        let mut entries = self.lock();
        let tick = entries.next_tick();
        let entry = entries.map.get_mut(&slot)?;
        if self.too_old(entry, now) {
            entries.map.remove(&slot);
            return None;
        }
        entry.used = tick;
        Some(entry.dek.clone())
    }

    /// Keeps the unwrapped key of `wrapped` under `context`.
    pub(crate) fn put_for_decrypt(&self, wrapped: &str, context: &[u8], dek: &Dek, now: Instant) {
        let slot = Slot::Decrypt(wrapped.to_owned(), context.to_vec());
        self.insert(slot, dek, wrapped, 0, 0, now);
    }

    fn insert(
        &self,
        slot: Slot,
        dek: &Dek,
        wrapped: &str,
        messages: u64,
        bytes: u64,
        now: Instant,
    ) {
        let mut entries = self.lock();
        let used = entries.next_tick();
        // Expired entries go first, then the least recently used while over capacity.
        entries.map.retain(|_, e| !self.too_old(e, now));
        if !entries.map.contains_key(&slot) {
            while entries.map.len() >= self.capacity {
                let oldest = entries
                    .map
                    .iter()
                    .min_by_key(|(_, e)| e.used)
                    .map(|(s, _)| s.clone());
                match oldest {
                    Some(s) => entries.map.remove(&s),
                    None => break,
                };
            }
        }
        entries.map.insert(
            slot,
            Entry {
                dek: dek.clone(),
                wrapped: wrapped.to_owned(),
                created: now,
                used,
                messages,
                bytes,
            },
        );
    }

    fn too_old(&self, entry: &Entry, now: Instant) -> bool {
        now.saturating_duration_since(entry.created) >= self.max_age
    }
}

impl Entries {
    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn dek(b: u8) -> Dek {
        Zeroizing::new([b; KEY_LEN])
    }

    #[test]
    fn an_encryption_key_serves_until_max_messages() {
        let cache = DataKeyCache::new().max_messages(3);
        let t = Instant::now();
        assert!(cache.take_for_encrypt(b"ctx", 1, t).is_none());
        cache.put_for_encrypt(b"ctx", &dek(1), "w1", 1, t);
        // The first message was the put; two more fit.
        assert_eq!(
            *cache.take_for_encrypt(b"ctx", 1, t).unwrap().0,
            [1; KEY_LEN]
        );
        assert_eq!(cache.take_for_encrypt(b"ctx", 1, t).unwrap().1, "w1");
        assert!(cache.take_for_encrypt(b"ctx", 1, t).is_none());
        // The spent key is gone, not kept.
        assert!(cache.is_empty());
    }

    #[test]
    fn an_encryption_key_serves_until_max_bytes() {
        let cache = DataKeyCache::new().max_bytes(100);
        let t = Instant::now();
        cache.put_for_encrypt(b"ctx", &dek(1), "w1", 60, t);
        assert!(cache.take_for_encrypt(b"ctx", 40, t).is_some());
        assert!(cache.take_for_encrypt(b"ctx", 1, t).is_none());
        // A message larger than the bound alone is never cached.
        cache.put_for_encrypt(b"ctx", &dek(2), "w2", 101, t);
        assert!(cache.is_empty());
    }

    #[test]
    fn keys_expire_at_max_age() {
        let cache = DataKeyCache::new().max_age(Duration::from_secs(10));
        let t = Instant::now();
        cache.put_for_encrypt(b"ctx", &dek(1), "w1", 1, t);
        cache.put_for_decrypt("w1", b"ctx", &dek(1), t);
        let later = t + Duration::from_secs(9);
        assert!(cache.take_for_encrypt(b"ctx", 1, later).is_some());
        assert!(cache.get_for_decrypt("w1", b"ctx", later).is_some());
        let expired = t + Duration::from_secs(10);
        assert!(cache.take_for_encrypt(b"ctx", 1, expired).is_none());
        assert!(cache.get_for_decrypt("w1", b"ctx", expired).is_none());
        assert!(cache.is_empty());
    }

    #[test]
    fn contexts_and_wrapped_keys_are_kept_apart() {
        let cache = DataKeyCache::new();
        let t = Instant::now();
        cache.put_for_encrypt(b"a", &dek(1), "wa", 1, t);
        assert!(cache.take_for_encrypt(b"b", 1, t).is_none());
        cache.put_for_decrypt("wa", b"a", &dek(1), t);
        assert!(cache.get_for_decrypt("wa", b"b", t).is_none());
        assert!(cache.get_for_decrypt("wb", b"a", t).is_none());
        assert_eq!(*cache.get_for_decrypt("wa", b"a", t).unwrap(), [1; KEY_LEN]);
    }

    #[test]
    fn capacity_evicts_the_least_recently_used() {
        let cache = DataKeyCache::new().capacity(2);
        let t = Instant::now();
        cache.put_for_decrypt("w1", b"", &dek(1), t);
        cache.put_for_decrypt("w2", b"", &dek(2), t);
        // w1 used after w2: w2 is the least recently used.
        assert!(cache.get_for_decrypt("w1", b"", t).is_some());
        cache.put_for_decrypt("w3", b"", &dek(3), t);
        assert_eq!(cache.len(), 2);
        assert!(cache.get_for_decrypt("w2", b"", t).is_none());
        assert!(cache.get_for_decrypt("w1", b"", t).is_some());
        assert!(cache.get_for_decrypt("w3", b"", t).is_some());
    }

    #[test]
    fn debug_shows_bounds_not_keys() {
        let cache = DataKeyCache::new();
        cache.put_for_decrypt("w1", b"", &dek(0xab), Instant::now());
        let text = format!("{cache:?}");
        assert!(text.contains("len: 1"), "{text}");
        assert!(!text.contains("171"), "{text}");
    }
}
