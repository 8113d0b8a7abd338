//! Caching: when a token is fresh, how long one is kept, the in-process cache and the lock.

use std::time::Duration;

use super::{ConfigError, Setting, Source};
use crate::cluster_flight::FlightSettings;
use crate::entry::Freshness;
use crate::l1::L1;

pub static LOCK_TTL: Setting = Setting {
    name: "TOKEN_PROXY_LOCK_TTL",
    default: Some("5s"),
    help: "lifetime of the per-key lock a leader holds while calling the upstream; waiters take over after it",
};
pub static EXPIRY_MARGIN: Setting = Setting {
    name: "TOKEN_PROXY_EXPIRY_MARGIN",
    default: Some("60s"),
    help: "a token with less than this left is no longer fresh: the next request fetches a new one",
};
pub static MIN_TOKEN_TTL: Setting = Setting {
    name: "TOKEN_PROXY_MIN_TOKEN_TTL",
    default: Some("30s"),
    help: "a token with less than this left is never served, not even when the upstream fails",
};
pub static REFRESH_AT: Setting = Setting {
    name: "TOKEN_PROXY_REFRESH_AT",
    default: Some("0.75"),
    help: "share of a token's lifetime after which a hit starts one background refresh (1 = never)",
};
pub static MAX_TOKEN_LIFETIME: Setting = Setting {
    name: "TOKEN_PROXY_MAX_TOKEN_LIFETIME",
    default: Some("1d"),
    help: "longest lifetime a token is cached with; a larger expires_in is capped (Cognito's longest is 1 day)",
};
pub static L1_CAPACITY: Setting = Setting {
    name: "TOKEN_PROXY_L1_CAPACITY",
    default: Some("10000"),
    help: "entries in the in-process cache; 0 = no in-process hits, every request reads Redis (only with Redis)",
};
pub static L1_MAX_AGE: Setting = Setting {
    name: "TOKEN_PROXY_L1_MAX_AGE",
    default: Some("10s"),
    help: "with Redis: longest an entry stays in the in-process cache before Redis is asked again",
};

/// How tokens are cached.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// Lifetime of a leader's lock. Default 5 s.
    pub lock_ttl: Duration,
    /// A token with less than this left is no longer fresh. Default 60 s.
    pub expiry_margin: Duration,
    /// No token with less than this left is served, even as a stale fallback. Default 30 s.
    pub min_token_ttl: Duration,
    /// Share of a token's lifetime after which hits start a background refresh. Default 0.75.
    pub refresh_at: f64,
    /// Longest lifetime a token is cached with: the entry lives at most this long and its
    /// `expires_in` never says more than what is left of it. Default 1 day (Cognito's longest).
    pub max_token_lifetime: Duration,
    /// Entries in the in-process cache (L1); 0 disables it. Default 10 000.
    pub l1_capacity: usize,
    /// With Redis, the longest an entry lives in L1. Default 10 s.
    pub l1_max_age: Duration,
}

impl CacheSettings {
    pub(super) fn parse(source: &Source) -> Result<CacheSettings, ConfigError> {
        let settings = CacheSettings {
            lock_ttl: source.duration(&LOCK_TTL)?,
            expiry_margin: source.duration(&EXPIRY_MARGIN)?,
            min_token_ttl: source.duration(&MIN_TOKEN_TTL)?,
            refresh_at: source.parse(&REFRESH_AT, "a number in (0, 1]")?,
            max_token_lifetime: source.duration(&MAX_TOKEN_LIFETIME)?,
            l1_capacity: source.parse(&L1_CAPACITY, "a whole number")?,
            l1_max_age: source.duration(&L1_MAX_AGE)?,
        };
        if !(settings.refresh_at > 0.0 && settings.refresh_at <= 1.0) {
            return Err(source.error(&REFRESH_AT, "must be more than 0 and at most 1"));
        }
        // A cap at or below the fresh cutoff would make every token stale on arrival.
        if settings.max_token_lifetime <= settings.expiry_margin.max(settings.min_token_ttl) {
            return Err(source.error(
                &MAX_TOKEN_LIFETIME,
                format!("must be longer than {} and {}", EXPIRY_MARGIN.name, MIN_TOKEN_TTL.name),
            ));
        }
        // Lifetimes are stored as 32-bit seconds.
        if settings.max_token_lifetime.as_secs() > u64::from(u32::MAX) {
            return Err(source.error(&MAX_TOKEN_LIFETIME, "must be at most 4294967295s (about 136 years)"));
        }
        if settings.lock_ttl < Duration::from_millis(100) {
            return Err(source.error(&LOCK_TTL, "must be at least 100ms"));
        }
        Ok(settings)
    }

    pub fn freshness(&self) -> Freshness {
        Freshness {
            expiry_margin: self.expiry_margin,
            min_token_ttl: self.min_token_ttl,
            refresh_at: self.refresh_at,
            max_lifetime: self.max_token_lifetime,
        }
    }

    /// The lock's lifetime, and how long followers wait in all: one upstream exchange.
    pub fn flight(&self, upstream_timeout: Duration) -> FlightSettings {
        FlightSettings { lock_ttl: self.lock_ttl, upstream_timeout }
    }

    /// Alone, L1 is the cache; with Redis it is a short-lived front for it.
    pub fn l1(&self, with_redis: bool) -> L1 {
        L1::new(self.l1_capacity, with_redis.then_some(self.l1_max_age))
    }
}
