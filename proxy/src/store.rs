//! The shared cache (L2): sealed entries in Redis under keyed-hash names.
//!
//! Redis is an accelerator, never a dependency (DESIGN.md invariant 5): every command has a
//! short deadline, the client reconnects by itself in the background, and any failure is
//! reported as a [`StoreError`] that the caller counts and then carries on without Redis.
//! fred's defaults would wait forever across a Redis restart, hence the explicit settings.
//!
//! Key layout: `tp:{<base64url cache key>}`. The braces are a Redis Cluster hash tag, so an
//! entry and anything else later stored beside it (its lock) live in one slot.

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use fred::prelude::*;
use fred::types::config::UnresponsiveConfig;
use shared::keys::CacheKey;

/// A Redis failure; the request goes on without Redis.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    #[error("redis returned an unexpected reply")]
    UnexpectedReply,
}

/// Why the store could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("TOKEN_PROXY_REDIS_URL: {0}")]
pub struct StoreSetupError(String);

/// A sealed value and its remaining time to live.
#[derive(Debug)]
pub struct StoredValue {
    pub sealed: Bytes,
    pub ttl: Duration,
}

/// The Redis-backed shared cache.
#[derive(Clone)]
pub struct RedisStore {
    client: Client,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("connected", &self.client.is_connected()).finish()
    }
}

impl RedisStore {
    /// Creates the client and starts connecting in the background. Start-up does not wait
    /// for Redis: a replica whose Redis is down still serves, from L1 and the upstream.
    pub fn connect(url: &str, command_timeout: Duration) -> Result<RedisStore, StoreSetupError> {
        // fred's parse errors may quote the URL, which may hold a password: keep only the kind.
        let config =
            Config::from_url(url).map_err(|e| StoreSetupError(format!("invalid Redis URL ({:?})", e.kind())))?;
        let client = Builder::from_config(config)
            .with_performance_config(|perf| perf.default_command_timeout = command_timeout)
            .with_connection_config(|conn| {
                conn.connection_timeout = Duration::from_secs(1);
                conn.internal_command_timeout = Duration::from_secs(1);
                // A command that fails is not retried: the caller carries on without Redis.
                conn.max_command_attempts = 1;
                // Detect a frozen server (e.g. SIGSTOP) and reconnect instead of waiting forever.
                conn.unresponsive = UnresponsiveConfig {
                    max_timeout: Some((command_timeout * 4).max(Duration::from_secs(1))),
                    interval: Duration::from_millis(250),
                };
            })
            // Retry forever, 50 ms doubling to 2 s between attempts.
            .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2))
            .build()
            .map_err(|e| StoreSetupError(format!("cannot create the Redis client ({:?})", e.kind())))?;
        // The handle is not needed: the connection task lives as long as the client.
        drop(client.connect());
        Ok(RedisStore { client })
    }

    /// The Redis key of an entry.
    pub fn entry_key(key: &CacheKey) -> String {
        format!("tp:{{{}}}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.as_bytes()))
    }

    /// Reads an entry and its remaining TTL in one round trip (a pipeline of GET and PTTL).
    pub async fn get(&self, key: &CacheKey) -> Result<Option<StoredValue>, StoreError> {
        let name = RedisStore::entry_key(key);
        let pipeline = self.client.pipeline();
        let () = pipeline.get(name.as_str()).await?;
        let () = pipeline.pttl(name.as_str()).await?;
        let (value, pttl): (Option<Bytes>, i64) = pipeline.all().await?;
        match (value, pttl) {
            // Expired between the two commands, or (never written by us) without a TTL.
            (None, _) | (Some(_), ..=0) => Ok(None),
            (Some(sealed), ms) => {
                let ms = u64::try_from(ms).map_err(|_| StoreError::UnexpectedReply)?;
                Ok(Some(StoredValue { sealed, ttl: Duration::from_millis(ms) }))
            }
        }
    }

    /// Writes an entry that Redis drops after `ttl`.
    pub async fn put(&self, key: &CacheKey, sealed: Vec<u8>, ttl: Duration) -> Result<(), StoreError> {
        let ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let () = self
            .client
            .set(RedisStore::entry_key(key), sealed.as_slice(), Some(Expiration::PX(ms)), None, false)
            .await?;
        Ok(())
    }

    /// Whether the connection is up right now.
    pub fn is_connected(&self) -> bool {
        self.client.is_connected()
    }

    /// Closes the connection.
    pub async fn quit(&self) {
        let _ = self.client.quit().await;
    }
}
