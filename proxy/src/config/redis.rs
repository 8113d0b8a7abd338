//! The shared cache, and the store that talks to it.

use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use super::{ConfigError, Setting, Source};
use crate::metrics::Metrics;
use crate::store::{RedisStore, Sealing, StoreSettings};

pub static REDIS_URL: Setting = Setting {
    name: "TOKEN_PROXY_REDIS_URL",
    default: None,
    help: "redis://, rediss://, redis-sentinel:// or redis-cluster:// URL; unset = in-process cache only",
};
pub static REDIS_TIMEOUT: Setting = Setting {
    name: "TOKEN_PROXY_REDIS_TIMEOUT",
    default: Some("250ms"),
    help: "deadline of one Redis command; past it the request carries on without Redis",
};
pub static REDIS_BREAKER_THRESHOLD: Setting = Setting {
    name: "TOKEN_PROXY_REDIS_BREAKER_THRESHOLD",
    default: Some("5"),
    help: "consecutive Redis failures that open the circuit breaker (degraded mode)",
};
pub static REDIS_BREAKER_COOLDOWN: Setting = Setting {
    name: "TOKEN_PROXY_REDIS_BREAKER_COOLDOWN",
    default: Some("2s"),
    help: "time the breaker stays open before one probe command is let through",
};

/// The shared cache. Absent, one replica runs alone on its in-process cache.
#[derive(Debug)]
pub struct RedisSettings {
    /// A secret: the URL may carry a password (`redis://:PASSWORD@host`).
    pub url: SecretString,
    /// Deadline of one command. Default 250 ms.
    pub timeout: Duration,
    /// Consecutive failures that open the breaker. Default 5.
    pub breaker_threshold: u32,
    /// Time the breaker stays open before a probe. Default 2 s.
    pub breaker_cooldown: Duration,
}

impl RedisSettings {
    /// The timing settings are checked even without a URL, so that a typo is not found only
    /// on the day Redis is added.
    pub(super) fn parse(source: &Source) -> Result<Option<RedisSettings>, ConfigError> {
        let timeout = source.duration(&REDIS_TIMEOUT)?;
        if timeout.is_zero() {
            return Err(source.error(&REDIS_TIMEOUT, "must be more than zero"));
        }
        let breaker_threshold: u32 = source.parse(&REDIS_BREAKER_THRESHOLD, "a whole number")?;
        if breaker_threshold == 0 {
            return Err(source.error(&REDIS_BREAKER_THRESHOLD, "must be at least 1"));
        }
        let breaker_cooldown = source.duration(&REDIS_BREAKER_COOLDOWN)?;
        let Some(url) = source.get(&REDIS_URL) else { return Ok(None) };
        let scheme = url.split_once("://").map(|(s, _)| s);
        // Never echo the URL, nor fred's parse error (it may quote it): it may carry a password.
        if !matches!(scheme, Some("redis" | "rediss" | "redis-sentinel" | "redis-cluster")) {
            return Err(
                source.error(&REDIS_URL, "must start with redis://, rediss://, redis-sentinel:// or redis-cluster://")
            );
        }
        if let Err(e) = fred::prelude::Config::from_url(&url) {
            return Err(source.error(&REDIS_URL, format!("invalid Redis URL ({:?})", e.kind())));
        }
        Ok(Some(RedisSettings { url: SecretString::from(url), timeout, breaker_threshold, breaker_cooldown }))
    }

    /// The store, sealing its entries with `sealing`: its clients start connecting in the
    /// background.
    pub fn store(&self, sealing: Sealing, metrics: Arc<Metrics>) -> Result<RedisStore, ConfigError> {
        let settings = StoreSettings {
            command_timeout: self.timeout,
            breaker_threshold: self.breaker_threshold,
            breaker_cooldown: self.breaker_cooldown,
            pipelined_reads: true,
        };
        RedisStore::connect(self.url.expose_secret(), settings, sealing, metrics)
            .map_err(|e| REDIS_URL.error(e.to_string()))
    }
}
