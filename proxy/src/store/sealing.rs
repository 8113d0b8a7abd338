//! What the store seals and opens: entries and flight announcements, bound to their cache key
//! and to the client's secret (`shared::seal`), so that Redis at rest and pub/sub traffic are
//! unreadable without both. Everything above the store deals in tokens and outcomes, never in
//! ciphertext (docs/architecture.md, "Code map").

use std::sync::Arc;
use std::time::{Duration, Instant};

use shared::keys::{CacheKey, Keys};
use shared::seal::Sealer;

use super::StoredValue;
use crate::entry::{CachedToken, Freshness};
use crate::flight_message;
use crate::outcome::Outcome;
use crate::redis_clock::{self, RedisClock};

/// The seal keys of the current root secret and of the earlier ones still read.
#[derive(Debug, Clone)]
pub struct Sealing {
    /// The current secret's sealer first (the only one that seals), then the previous ones'
    /// (`TOKEN_PROXY_PREVIOUS_SECRETS`): a rotation costs no upstream calls.
    sealers: Vec<Sealer>,
}

/// Which root secret named and sealed an entry: 0 is the current one, `i` the `i`-th previous.
pub type Generation = usize;

/// What a sealed announcement turned out to be.
#[derive(Debug)]
pub enum Announcement {
    /// Not sealed for this key and secret (another client's, or tampered): not for us.
    Foreign,
    /// Sealed for us but not a message we can read: the wait ends.
    Malformed,
    /// A token announced again after it expired: not an answer.
    Expired,
    Outcome(Outcome),
}

impl Sealing {
    pub fn new(current: &Keys, previous: &[Keys]) -> Sealing {
        let sealers = std::iter::once(current).chain(previous).map(|keys| keys.sealer.clone()).collect();
        Sealing { sealers }
    }

    /// How many secrets' entries are read: the current one and the previous ones.
    pub fn generations(&self) -> usize {
        self.sealers.len()
    }

    /// Opens an entry read from Redis; one that does not open, or is of an earlier layout, is
    /// treated as absent.
    pub fn open_entry(
        &self,
        generation: Generation,
        key: &CacheKey,
        secret: &[u8],
        value: &StoredValue,
        freshness: &Freshness,
    ) -> Option<Arc<CachedToken>> {
        let plaintext = match self.sealers.get(generation)?.open(key, secret, &value.sealed) {
            Ok(plaintext) => plaintext,
            Err(error) => {
                tracing::warn!(?key, %error, "unreadable cache entry treated as a miss");
                return None;
            }
        };
        let Some((remaining, token)) = redis_clock::decode_entry(&plaintext, value.now) else {
            tracing::warn!(?key, "cache entry of an earlier layout treated as a miss");
            return None;
        };
        CachedToken::from_stored(token, remaining, Instant::now(), freshness).map(Arc::new)
    }

    /// A stale entry from a lookup, if it opens and may still be served.
    pub fn open_servable(
        &self,
        key: &CacheKey,
        secret: &[u8],
        value: Option<StoredValue>,
        freshness: &Freshness,
    ) -> Option<Arc<CachedToken>> {
        self.open_entry(0, key, secret, &value?, freshness).filter(|t| t.is_servable(Instant::now(), freshness))
    }

    /// `token` sealed as an entry with its TTL, placed on Redis's clock through `clock`; `None`
    /// when too little of it is left to be worth keeping.
    pub fn seal_entry(
        &self,
        key: &CacheKey,
        secret: &[u8],
        token: &CachedToken,
        clock: &RedisClock,
        freshness: &Freshness,
    ) -> Option<(Vec<u8>, Duration)> {
        let now = Instant::now();
        let ttl = token.keep_for(now, freshness)?;
        let expires = clock.at(now + token.remaining(now));
        Some((self.current().seal(key, secret, &redis_clock::encode_entry(expires, &token.to_stored())), ttl))
    }

    /// `outcome` sealed as an announcement to the followers of `key`.
    pub fn seal_announcement(&self, key: &CacheKey, secret: &[u8], outcome: &Outcome, clock: &RedisClock) -> Vec<u8> {
        let message = flight_message::encode(outcome, Instant::now(), clock);
        self.current().seal(key, secret, &message)
    }

    /// Opens an announcement; `clock` is from the follower's last lookup.
    pub fn open_announcement(
        &self,
        key: &CacheKey,
        secret: &[u8],
        sealed: &[u8],
        clock: &RedisClock,
        freshness: &Freshness,
    ) -> Announcement {
        let Ok(plain) = self.current().open(key, secret, sealed) else { return Announcement::Foreign };
        let now = Instant::now();
        match flight_message::decode(&plain, now, clock, freshness) {
            None => Announcement::Malformed,
            Some(Outcome::Token(token)) if !token.is_servable(now, freshness) => Announcement::Expired,
            Some(outcome) => Announcement::Outcome(outcome),
        }
    }

    fn current(&self) -> &Sealer {
        &self.sealers[0]
    }
}
