//! The in-process cache (L1): bounded, and each entry lives no longer than its token may be
//! served (stale entries stay, as a fallback for when the upstream fails).
//!
//! With Redis behind it, an entry is *current* for at most `max_age`; after that it must be
//! revalidated against Redis, so that a token refreshed elsewhere in the cluster is picked up
//! soon. An entry past `max_age` is not thrown away: if Redis cannot answer, it still serves.
//! Without Redis, L1 is the only cache and entries are current as long as they live.

use std::hash::Hasher as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shared::canonical::{CanonicalRequest, PurgeEpochs};
use siphasher::sip128::{Hasher128 as _, SipHasher24};

use crate::entry::{CachedToken, Freshness};

/// The name of an L1 entry: SipHash-2-4 (128 bits) of the canonical request under a random
/// per-process key. It is what makes a hit cheap: a tenth of the cost of the HMAC cache key,
/// which is computed only when Redis must be asked. It never leaves the process, so nobody can
/// observe one, let alone aim a request at a 2^-128 collision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct L1Key(u128);

/// Computes [`L1Key`]s.
#[derive(Clone)]
pub struct L1Hasher {
    key: [u8; 16],
}

impl std::fmt::Debug for L1Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("L1Hasher(..)")
    }
}

impl Default for L1Hasher {
    fn default() -> Self {
        let mut key = [0u8; 16];
        getrandom::fill(&mut key).expect("the OS random source is available");
        L1Hasher { key }
    }
}

impl L1Hasher {
    pub fn key(&self, upstream: &str, request: &CanonicalRequest, epochs: PurgeEpochs) -> L1Key {
        // One write of the whole encoding: SipHash pays a fixed cost per write call.
        let mut encoded = Vec::with_capacity(256);
        request.encode_with(upstream, epochs, &mut encoded);
        let mut hasher = SipHasher24::new_with_key(&self.key);
        hasher.write(&encoded);
        L1Key(hasher.finish128().as_u128())
    }
}

#[derive(Clone)]
struct Slot {
    token: Arc<CachedToken>,
    /// After this the slot is ignored (and eventually evicted).
    until: Instant,
    /// After this the slot must be revalidated against Redis before it is served as a hit.
    current_until: Instant,
}

/// An entry found in L1.
#[derive(Debug, Clone)]
pub struct Found {
    pub token: Arc<CachedToken>,
    /// False once the entry is older than the max age: ask Redis before serving it.
    pub current: bool,
}

/// Entries kept with capacity 0 and Redis: never served as hits, only as this replica's own
/// token while Redis cannot answer (see [`L1::is_fallback_only`]), so that an outage costs one
/// upstream call per key per replica rather than one per request (issue 12).
pub const FALLBACK_CAPACITY: usize = 1024;

/// The in-process cache. Capacity 0 disables its hits; with Redis it still keeps a small
/// fallback ([`FALLBACK_CAPACITY`]) whose entries are never current.
pub struct L1 {
    cache: Option<quick_cache::sync::Cache<L1Key, Slot>>,
    max_age: Option<Duration>,
    /// Capacity 0 with Redis: the fallback only.
    fallback_only: bool,
}

impl std::fmt::Debug for L1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L1")
            .field("len", &self.cache.as_ref().map_or(0, |c| c.len()))
            .field("max_age", &self.max_age)
            .finish()
    }
}

impl L1 {
    /// `max_age` caps each entry's life; `None` lets entries live as long as their token allows.
    /// `max_age` is `Some` with Redis: then capacity 0 keeps the fallback, whose entries are
    /// never current (every request reads Redis, as capacity 0 promises).
    pub fn new(capacity: usize, max_age: Option<Duration>) -> L1 {
        match (capacity, max_age) {
            (0, None) => L1 { cache: None, max_age, fallback_only: false },
            (0, Some(_)) => L1 {
                cache: Some(quick_cache::sync::Cache::new(FALLBACK_CAPACITY)),
                max_age: Some(Duration::ZERO),
                fallback_only: true,
            },
            (capacity, max_age) => {
                L1 { cache: Some(quick_cache::sync::Cache::new(capacity)), max_age, fallback_only: false }
            }
        }
    }

    pub fn get(&self, key: &L1Key, now: Instant) -> Option<Found> {
        let slot = self.cache.as_ref()?.get(key)?;
        (now < slot.until).then(|| Found { token: slot.token, current: now < slot.current_until })
    }

    pub fn insert(&self, key: L1Key, token: Arc<CachedToken>, now: Instant, freshness: &Freshness) {
        let Some(cache) = &self.cache else { return };
        let Some(keep) = token.keep_for(now, freshness) else { return };
        let current = self.max_age.map_or(keep, |max| keep.min(max));
        cache.insert(key, Slot { token, until: now + keep, current_until: now + current });
    }

    /// Capacity 0 with Redis: entries only serve while Redis cannot answer.
    pub fn is_fallback_only(&self) -> bool {
        self.fallback_only
    }

    pub fn len(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRESH: Freshness = Freshness {
        expiry_margin: Duration::from_secs(10),
        min_token_ttl: Duration::from_secs(5),
        refresh_at: 0.75,
        max_lifetime: Duration::from_secs(86_400),
    };

    fn token(t0: Instant, expires_in: u64) -> Arc<CachedToken> {
        let body = format!(r#"{{"access_token":"x","expires_in":{expires_in},"token_type":"Bearer"}}"#);
        Arc::new(CachedToken::from_upstream(body.as_bytes(), t0, &FRESH).unwrap())
    }

    #[test]
    fn entries_live_until_their_token_reaches_the_minimum() {
        let t0 = Instant::now();
        let l1 = L1::new(10, None);
        let key = L1Key(1);
        l1.insert(key, token(t0, 60), t0, &FRESH);
        assert!(l1.get(&key, t0 + Duration::from_secs(54)).is_some());
        assert!(l1.get(&key, t0 + Duration::from_secs(55)).is_none());
    }

    #[test]
    fn max_age_asks_for_revalidation_but_keeps_the_entry() {
        let t0 = Instant::now();
        let l1 = L1::new(10, Some(Duration::from_secs(2)));
        let key = L1Key(1);
        l1.insert(key, token(t0, 3600), t0, &FRESH);
        assert!(l1.get(&key, t0 + Duration::from_secs(1)).unwrap().current);
        assert!(!l1.get(&key, t0 + Duration::from_secs(2)).unwrap().current);
        assert!(l1.get(&key, t0 + Duration::from_secs(3594)).is_some());
        assert!(l1.get(&key, t0 + Duration::from_secs(3595)).is_none());
    }

    #[test]
    fn unusable_tokens_are_not_stored_and_capacity_bounds_size() {
        let t0 = Instant::now();
        let l1 = L1::new(100, None);
        l1.insert(L1Key(0), token(t0, 5), t0, &FRESH);
        assert!(l1.is_empty());
        for i in 0..1000u128 {
            l1.insert(L1Key(i), token(t0, 3600), t0, &FRESH);
        }
        assert!(l1.len() <= 100, "len {}", l1.len());
    }

    #[test]
    fn zero_capacity_disables() {
        let t0 = Instant::now();
        let l1 = L1::new(0, None);
        let key = L1Key(1);
        l1.insert(key, token(t0, 3600), t0, &FRESH);
        assert!(l1.get(&key, t0).is_none());
    }

    #[test]
    fn zero_capacity_with_redis_keeps_a_fallback_that_is_never_current() {
        let t0 = Instant::now();
        let l1 = L1::new(0, Some(Duration::from_secs(10)));
        let key = L1Key(1);
        l1.insert(key, token(t0, 3600), t0, &FRESH);
        let found = l1.get(&key, t0).expect("kept as a fallback");
        assert!(!found.current, "never a hit: every request reads Redis");
        assert!(l1.is_fallback_only() && !L1::new(10, Some(Duration::from_secs(10))).is_fallback_only());
        for i in 0..5000u128 {
            l1.insert(L1Key(i), token(t0, 3600), t0, &FRESH);
        }
        assert!(l1.len() <= FALLBACK_CAPACITY, "len {}", l1.len());
    }
}
