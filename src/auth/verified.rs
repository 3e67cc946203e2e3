//! The verified-token cache: access tokens whose signature and standard claims verified,
//! by SHA-256 of the token, bounded and sharded. It holds no state that can change (client
//! state, revocation, address and scope are checked on every request regardless, against
//! `AuthCache`), so it needs no coherence between brokers. No I/O.

use std::sync::RwLock;

use super::{AccessClaims, read};

/// How many verified tokens [`Authenticator`](super::Authenticator) remembers before it starts
/// afresh.
const VERIFIED_CACHE_SIZE: usize = 16_384;

/// How many shards [`VerifiedCache`] splits its entries over (a power of two, at most 256).
const VERIFIED_SHARDS: usize = 64;

/// Verified access tokens by SHA-256 of the token, sharded by the digest's first byte so that
/// requests with different tokens never wait on one lock, and hits (read locks) never wait on
/// each other. Each shard starts afresh at its share of [`VERIFIED_CACHE_SIZE`].
pub(super) struct VerifiedCache {
    shards: [RwLock<std::collections::HashMap<[u8; 32], AccessClaims>>; VERIFIED_SHARDS],
}

impl Default for VerifiedCache {
    fn default() -> Self {
        Self {
            shards: std::array::from_fn(|_| RwLock::default()),
        }
    }
}

impl VerifiedCache {
    fn shard(
        &self,
        digest: &[u8; 32],
    ) -> &RwLock<std::collections::HashMap<[u8; 32], AccessClaims>> {
        &self.shards[usize::from(digest[0]) % VERIFIED_SHARDS]
    }

    fn write(
        &self,
        digest: &[u8; 32],
    ) -> std::sync::RwLockWriteGuard<'_, std::collections::HashMap<[u8; 32], AccessClaims>> {
        self.shard(digest)
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The claims, expiry not checked (the refusal path only wants to know whose token it is).
    pub(super) fn get(&self, digest: &[u8; 32]) -> Option<AccessClaims> {
        read(self.shard(digest)).get(digest).cloned()
    }

    /// The claims if the token is still valid at `now` (leeway already subtracted); an expired
    /// entry is dropped.
    pub(super) fn live(&self, digest: &[u8; 32], now: i64) -> VerifiedHit {
        match self.get(digest) {
            Some(claims) if claims.exp > now => VerifiedHit::Live(claims),
            Some(_) => {
                self.write(digest).remove(digest);
                VerifiedHit::Expired
            }
            None => VerifiedHit::Missing,
        }
    }

    pub(super) fn insert(&self, digest: [u8; 32], claims: AccessClaims) {
        let mut shard = self.write(&digest);
        if shard.len() >= VERIFIED_CACHE_SIZE / VERIFIED_SHARDS {
            shard.clear();
        }
        shard.insert(digest, claims);
    }

    pub(super) fn clear(&self) {
        for shard in &self.shards {
            shard
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clear();
        }
    }
}

/// What [`VerifiedCache::live`] found.
pub(super) enum VerifiedHit {
    Live(AccessClaims),
    Expired,
    Missing,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use std::sync::Arc;

    use sha2::{Digest, Sha256};
    use uuid::Uuid;

    use super::*;

    fn cached_claims(exp: i64) -> AccessClaims {
        AccessClaims {
            iss: "iss".into(),
            sub: Uuid::new_v4().to_string(),
            aud: "aud".into(),
            iat: 0,
            nbf: 0,
            exp,
            jti: Uuid::new_v4().to_string(),
            scope: "datakey".into(),
        }
    }

    fn cache_digest(n: u32) -> [u8; 32] {
        Sha256::digest(n.to_be_bytes()).into()
    }

    #[test]
    fn the_verified_cache_stays_bounded_and_spreads_over_its_shards() {
        let cache = VerifiedCache::default();
        for n in 0..(VERIFIED_CACHE_SIZE as u32 * 3) {
            cache.insert(cache_digest(n), cached_claims(100));
        }
        let sizes: Vec<usize> = cache.shards.iter().map(|s| read(s).len()).collect();
        assert!(
            sizes.iter().sum::<usize>() <= VERIFIED_CACHE_SIZE,
            "{sizes:?}"
        );
        assert!(
            sizes
                .iter()
                .all(|&n| n > 0 && n <= VERIFIED_CACHE_SIZE / VERIFIED_SHARDS),
            "{sizes:?}"
        );
        // The latest entry is always there (a full shard starts afresh before inserting).
        let last = cache_digest(VERIFIED_CACHE_SIZE as u32 * 3 - 1);
        assert!(cache.get(&last).is_some());
        cache.clear();
        assert!(cache.shards.iter().all(|s| read(s).is_empty()));
    }

    #[test]
    fn a_verified_cache_hit_is_checked_for_expiry_every_time() {
        let cache = VerifiedCache::default();
        let digest = cache_digest(7);
        cache.insert(digest, cached_claims(100));
        assert!(matches!(cache.live(&digest, 99), VerifiedHit::Live(c) if c.exp == 100));
        assert!(matches!(cache.live(&digest, 99), VerifiedHit::Live(_)));
        // Expired: refused, and gone from the cache.
        assert!(matches!(cache.live(&digest, 100), VerifiedHit::Expired));
        assert!(matches!(cache.live(&digest, 0), VerifiedHit::Missing));
        assert!(cache.get(&digest).is_none());
    }

    #[test]
    fn the_verified_cache_answers_many_threads_at_once() {
        let cache = Arc::new(VerifiedCache::default());
        let threads: Vec<_> = (0..8_u32)
            .map(|t| {
                let cache = cache.clone();
                std::thread::spawn(move || {
                    for n in 0..2_000 {
                        let digest = cache_digest(t * 10_000 + n);
                        cache.insert(digest, cached_claims(100));
                        // Another thread may have filled the shard since: live or gone.
                        assert!(!matches!(cache.live(&digest, 0), VerifiedHit::Expired));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let total: usize = cache.shards.iter().map(|s| read(s).len()).sum();
        assert!(total <= VERIFIED_CACHE_SIZE);
    }
}
