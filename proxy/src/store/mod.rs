//! The shared cache (L2) in Redis: one client, its deadlines and breaker, and the entries.
//!
//! Redis is an accelerator, never a dependency (docs/architecture.md, invariant 5): every command has a
//! short deadline, a [`Breaker`] stops paying that deadline while Redis keeps failing, the
//! client reconnects by itself, and any failure is a [`StoreError`] after which the caller
//! carries on without Redis. fred's defaults would wait forever across a Redis restart, hence
//! the explicit settings. On a single server (`redis://` or `rediss://`) the hit path's read
//! goes over a connection of its own, [`ReadPipeline`], held to the same deadline and breaker.
//! Where Redis is and how to reach it (URL schemes, TLS, a password given apart) is
//! [`endpoint`]; Redis refusing us (TLS, login), said once and seen by readiness, [`refusals`].
//!
//! The store speaks in entries: sealing and opening happen here ([`sealing`]), and callers
//! get tokens. Key layout (docs/architecture.md, "Redis layout"), all in one Redis Cluster slot
//! per entry thanks to the `{...}` hash tag: `tp:{<base64url of the cache key's first 128
//! bits>}` holds the sealed entry, `tp:{...}:lock` the single-flight lock
//! ([`crate::cluster_flight`]). Flight outcomes are announced on [`CHANNEL`], purges on
//! [`PURGE_CHANNEL`]; each replica holds one subscription to both. The purge hash and its
//! scripts are in [`purges`], the quota's counters in [`counters`].

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::config::UnresponsiveConfig;
use fred::types::scripts::Script;
use shared::keys::CacheKey;
use tokio::sync::{Notify, broadcast};

use crate::breaker::Breaker;
use crate::entry::{CachedToken, Freshness};
use crate::metrics::{BreakerState, Metrics};
use crate::read_pipeline::{MAX_VALUE, ReadError, ReadPipeline, Target};
use crate::redis_clock::RedisTime;

mod counters;
mod endpoint;
mod purges;
mod refusals;
pub mod sealing;

pub use counters::{AuthCounters, Verdict};
pub use endpoint::{Endpoint, EndpointError, SCHEMES, Scheme, Topology, client_config};
pub use purges::{EPOCHS_KEY, PurgeState};
pub use refusals::Refusal;
use refusals::{Link, Refusals};
pub use sealing::Sealing;

/// The channel every replica subscribes to for flight outcomes.
pub const CHANNEL: &str = "tp:flights";
/// The channel on which purges are announced (the message is the purged field).
pub const PURGE_CHANNEL: &str = "tp:purge";

/// The largest value an entry may have: a sealed token response is a few KiB (the upstream's
/// body is bounded, and Cognito's tokens are about 1 KiB). A larger value was planted: it is a
/// miss for its key, never read whole.
pub const MAX_ENTRY_BYTES: usize = MAX_VALUE;

/// Lua shared by the scripts that read an entry: `entry(limit)` returns its value (`false` if
/// absent or unusable), its PTTL, and 1 if it was there but unusable (not a string, or larger
/// than `limit` bytes), so that one planted key is that key's miss, never a script error.
/// `now` is Redis's clock (see [`crate::redis_clock`]).
pub(crate) const ENTRY_LUA: &str = r"
local function entry(limit)
  local kind = redis.call('TYPE', KEYS[1]).ok
  if kind == 'none' then return false, -2, 0 end
  if kind ~= 'string' or redis.call('STRLEN', KEYS[1]) > tonumber(limit) then return false, -2, 1 end
  return redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1]), 0
end
local now = redis.call('TIME')
";

/// The hit read through fred (Sentinel, Cluster): an entry and Redis's clock in one step.
/// KEYS: entry. ARGV: the size limit. Returns {value or '', seconds, µs, unusable}.
const READ_LUA: &str = r"
local v, _, bad = entry(ARGV[1])
return {v or '', now[1], now[2], bad}
";

/// A Redis failure; the request goes on without Redis.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    #[error("redis returned an unexpected reply")]
    UnexpectedReply,
    #[error("redis circuit breaker is open")]
    BreakerOpen,
    #[error("redis read: {0}")]
    Read(#[from] ReadError),
    #[error("redis read timed out")]
    Timeout,
    /// Redis refuses this replica (TLS, login): logged once by [`refusals`], not per command.
    #[error("redis refuses this replica's connections")]
    Refused,
}

/// Why the store could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreSetupError(String);

impl From<EndpointError> for StoreSetupError {
    fn from(error: EndpointError) -> StoreSetupError {
        StoreSetupError(error.to_string())
    }
}

/// Store settings.
#[derive(Debug, Clone, Copy)]
pub struct StoreSettings {
    pub command_timeout: Duration,
    pub breaker_threshold: u32,
    pub breaker_cooldown: Duration,
    /// Hit-path reads on their own pipelined connection when the server allows it (a single
    /// server, with or without TLS); `false` reads through fred always (tests compare the two).
    pub pipelined_reads: bool,
}

/// A sealed value, and Redis's clock when it was read (see [`crate::redis_clock`]).
#[derive(Debug, Clone)]
pub struct StoredValue {
    pub sealed: Bytes,
    pub now: RedisTime,
}

/// The Redis-backed shared cache and flight coordination.
#[derive(Clone)]
pub struct RedisStore {
    client: Client,
    /// The hit path's reads, for a single server; `None` reads through `client`.
    reads: Option<Arc<ReadPipeline>>,
    command_timeout: Duration,
    subscriber: SubscriberClient,
    /// Woken when a purge is announced.
    purged: Arc<Notify>,
    breaker: Arc<Breaker>,
    /// What Redis refuses, if anything (TLS, login): commands fail at once meanwhile.
    refusals: Arc<Refusals>,
    sealing: Arc<Sealing>,
    metrics: Arc<Metrics>,
}

static READ: LazyLock<Script> = LazyLock::new(|| Script::from_lua(format!("{ENTRY_LUA}{READ_LUA}")));

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("connected", &self.is_connected())
            .field("breaker", &self.breaker.state())
            .finish()
    }
}

impl RedisStore {
    /// [`RedisStore::connect_to`] a URL alone (over TLS, trusting the system's roots).
    pub fn connect(
        url: &str,
        settings: StoreSettings,
        sealing: Sealing,
        metrics: Arc<Metrics>,
    ) -> Result<RedisStore, StoreSetupError> {
        RedisStore::connect_to(&Endpoint::from_url(url)?, settings, sealing, metrics)
    }

    /// Creates the clients and starts connecting in the background. Start-up does not wait
    /// for Redis: a replica whose Redis is down still serves, from L1 and the upstream.
    pub fn connect_to(
        endpoint: &Endpoint,
        settings: StoreSettings,
        sealing: Sealing,
        metrics: Arc<Metrics>,
    ) -> Result<RedisStore, StoreSetupError> {
        let config = endpoint.fred_config()?;
        let server = config.server.hosts().first().map(ToString::to_string).unwrap_or_default();
        let refusals = Arc::new(Refusals::new(server));
        let timeout = settings.command_timeout;
        let unresponsive = (timeout * 4).max(Duration::from_secs(1));
        let reads = pipeline_target(&config, endpoint.tls())
            .filter(|_| settings.pipelined_reads)
            .map(|target| Arc::new(ReadPipeline::start(target, Duration::from_secs(1).max(timeout), unresponsive)));
        if let Some(reads) = &reads {
            tokio::spawn(watch_reads(reads.failures(), Arc::clone(&refusals)));
        }
        let mut builder = Builder::from_config(config);
        builder
            .with_performance_config(|perf| perf.default_command_timeout = timeout)
            .with_connection_config(|conn| {
                conn.connection_timeout = Duration::from_secs(1);
                conn.internal_command_timeout = Duration::from_secs(1);
                // A command that fails is not retried: the caller carries on without Redis.
                conn.max_command_attempts = 1;
                // Detect a frozen server (e.g. SIGSTOP) and reconnect instead of waiting forever.
                conn.unresponsive =
                    UnresponsiveConfig { max_timeout: Some(unresponsive), interval: Duration::from_millis(250) };
            })
            // Retry forever, 50 ms doubling to 2 s between attempts.
            .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2));
        let setup = |e: fred::error::Error| StoreSetupError(format!("cannot create the Redis client ({:?})", e.kind()));
        let client = builder.build().map_err(setup)?;
        let subscriber = builder.build_subscriber_client().map_err(setup)?;
        // Before connecting, so that no refusal goes unseen.
        let tls = endpoint.tls().is_some();
        watch_connections(&client, Link::Commands, tls, Arc::clone(&refusals));
        watch_connections(&subscriber, Link::Subscription, tls, Arc::clone(&refusals));
        // The handles are not needed: the connection tasks live as long as the clients.
        drop(client.connect());
        drop(subscriber.connect());
        drop(subscriber.manage_subscriptions());

        let purged = Arc::new(Notify::new());
        tokio::spawn(subscribe(subscriber.clone()));
        tokio::spawn(watch_purges(subscriber.clone(), Arc::clone(&purged)));
        let breaker =
            Arc::new(Breaker::new(settings.breaker_threshold, settings.breaker_cooldown, Arc::clone(&metrics)));
        Ok(RedisStore {
            client,
            reads,
            command_timeout: timeout,
            subscriber,
            purged,
            breaker,
            refusals,
            sealing: Arc::new(sealing),
            metrics,
        })
    }

    /// The Redis key of an entry: the first 128 bits of the cache key. Shorter names save
    /// Redis memory, and isolation does not rest on them: a sealed value is bound to the full
    /// 256-bit key, so even a colliding name could only ever be a miss.
    pub fn entry_key(key: &CacheKey) -> String {
        String::from_utf8(entry_name(key).to_vec()).expect("entry names are ASCII")
    }

    pub(crate) fn lock_key(key: &CacheKey) -> String {
        format!("{}:lock", RedisStore::entry_key(key))
    }

    /// Runs one command of the command connection through the breaker, counting failures.
    async fn guarded<T>(&self, command: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        self.guarded_on(Link::Commands, command).await
    }

    /// Runs one command of `link` through the breaker, counting failures. While Redis refuses
    /// the command connection, its commands fail at once (they would only time out).
    async fn guarded_on<T>(
        &self,
        link: Link,
        command: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        if !self.breaker.allow() {
            return Err(StoreError::BreakerOpen);
        }
        if link == Link::Commands && self.refusals.refuses_commands() {
            self.breaker.record(false);
            self.metrics.redis_error();
            return Err(StoreError::Refused);
        }
        // fred's command futures are large: boxed once here, every await above moves a pointer
        // instead of copying them.
        let result = Box::pin(command).await;
        self.breaker.record(result.is_ok());
        if let Err(error) = &result {
            self.metrics.redis_error();
            if self.refusals.any() {
                // Said once, with its cause, when it began (see `refusals`).
                tracing::debug!(%error, "redis command failed (redis refuses this replica); continuing without it");
            } else {
                tracing::warn!(%error, "redis command failed; continuing without it");
            }
        }
        result
    }

    /// Runs `script` through the breaker (for the scripts of [`crate::cluster_flight`]).
    pub(crate) async fn eval<R: FromValue>(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> Result<R, StoreError> {
        self.guarded(async { Ok(script.evalsha_with_reload(&self.client, keys, args).await?) }).await
    }

    /// How entries and announcements are sealed.
    pub(crate) fn sealing(&self) -> &Sealing {
        &self.sealing
    }

    /// The announcements on [`CHANNEL`] and [`PURGE_CHANNEL`] from now on.
    pub(crate) fn messages(&self) -> broadcast::Receiver<fred::types::Message> {
        self.subscriber.message_rx()
    }

    /// The token of the first entry found for a request, or `None`: `names[i]` is its cache
    /// key under the `i`-th secret (the current one first, see [`Sealing`]). An entry that does
    /// not open is a miss: older secrets are looked at only where newer ones have no entry.
    pub async fn read_entry(
        &self,
        names: &[CacheKey],
        secret: &[u8],
        freshness: &Freshness,
    ) -> Result<Option<Arc<CachedToken>>, StoreError> {
        for (generation, key) in names.iter().enumerate().take(self.sealing.generations()) {
            if let Some(value) = self.read_value(key).await? {
                return Ok(self.sealing.open_entry(generation, key, secret, &value, freshness));
            }
        }
        Ok(None)
    }

    /// Reads an entry and Redis's clock, one round trip, no lock: the hit path. On a single
    /// server through the [`ReadPipeline`] (GETRANGE and TIME, several times cheaper
    /// for Redis than a script), else through fred ([`READ_LUA`]: TIME must come from the
    /// entry's own node in a cluster). A key holding something else, or more than
    /// [`MAX_ENTRY_BYTES`], is that key's miss (and a metric), never a Redis failure.
    pub async fn read_value(&self, key: &CacheKey) -> Result<Option<StoredValue>, StoreError> {
        let name = entry_name(key);
        let link = if self.reads.is_some() { Link::Reads } else { Link::Commands };
        let found = self
            .guarded_on(link, async {
                if let Some(reads) = &self.reads {
                    let read = tokio::time::timeout(self.command_timeout, reads.read(&name));
                    return match read.await.map_err(|_| StoreError::Timeout)? {
                        Ok(reply) => Ok(Found::of(reply.value, reply.now)),
                        Err(ReadError::Server(code)) if code == "WRONGTYPE" => Ok(Found::Unusable),
                        Err(error) => Err(error.into()),
                    };
                }
                let reply: Vec<Value> =
                    READ.evalsha_with_reload(&self.client, vec![&name[..]], MAX_ENTRY_BYTES as i64).await?;
                parse_read(reply).ok_or(StoreError::UnexpectedReply)
            })
            .await?;
        Ok(self.usable(found))
    }

    /// The value found, if usable; an unusable one is counted.
    pub(crate) fn usable(&self, found: Found) -> Option<StoredValue> {
        match found {
            Found::Value(value) => Some(value),
            Found::Absent => None,
            Found::Unusable => {
                self.metrics.redis_bad_entry();
                tracing::warn!("a cache entry in Redis is of the wrong type or too large; treated as a miss");
                None
            }
        }
    }

    /// Resolves when a purge is announced after this call (not after its first poll).
    pub fn purge_announced(&self) -> tokio::sync::futures::Notified<'_> {
        self.purged.notified()
    }

    /// Whether the command connection, and the read connection if there is one, are up, and
    /// Redis does not refuse any of them.
    pub fn is_connected(&self) -> bool {
        self.client.is_connected() && !self.reads.as_ref().is_some_and(|reads| reads.is_down()) && !self.refusals.any()
    }

    /// What Redis refuses (TLS, login), if anything: for readiness.
    pub fn refusal(&self) -> Option<Refusal> {
        self.refusals.current()
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// Closes the connections.
    pub async fn quit(&self) {
        let _ = self.subscriber.quit().await;
        let _ = self.client.quit().await;
    }
}

/// Length of an entry's name: `tp:{`, 22 base64url characters (128 bits), `}`.
const ENTRY_NAME_LEN: usize = 27;

/// The name of an entry in Redis (see [`RedisStore::entry_key`]), built on the stack: the hit
/// path needs it on every request.
fn entry_name(key: &CacheKey) -> [u8; ENTRY_NAME_LEN] {
    let mut name = [0u8; ENTRY_NAME_LEN];
    name[..4].copy_from_slice(b"tp:{");
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode_slice(&key.as_bytes()[..16], &mut name[4..ENTRY_NAME_LEN - 1])
        .expect("16 bytes are 22 base64 characters");
    name[ENTRY_NAME_LEN - 1] = b'}';
    name
}

/// Where the [`ReadPipeline`] connects: a single server, over TLS when `tls` is given, or
/// `None` for Sentinel and Cluster, whose reads go through fred.
fn pipeline_target(config: &Config, tls: Option<&Arc<rustls::ClientConfig>>) -> Option<Target> {
    let ServerConfig::Centralized { server } = &config.server else { return None };
    Some(Target {
        // fred keeps a URL's IPv6 literal in its brackets, which a socket address has not.
        host: server.host.trim_start_matches('[').trim_end_matches(']').to_owned(),
        port: server.port,
        username: config.username.clone(),
        password: config.password.clone(),
        database: config.database,
        tls: tls.cloned(),
    })
}

pub(crate) fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

pub(crate) fn bytes_of(value: Value) -> Option<Bytes> {
    match value {
        Value::Bytes(b) => Some(b),
        Value::String(s) => Some(s.into_inner()),
        _ => None,
    }
}

/// What a read found at an entry's name.
#[derive(Debug)]
pub(crate) enum Found {
    Absent,
    /// Something that cannot be an entry: another type, or more than [`MAX_ENTRY_BYTES`].
    Unusable,
    Value(StoredValue),
}

impl Found {
    /// A read value (empty = absent) with Redis's clock.
    pub(crate) fn of(value: Option<Bytes>, now: RedisTime) -> Found {
        match value {
            None => Found::Absent,
            Some(sealed) if sealed.is_empty() => Found::Absent,
            Some(sealed) if sealed.len() > MAX_ENTRY_BYTES => Found::Unusable,
            Some(sealed) => Found::Value(StoredValue { sealed, now }),
        }
    }
}

/// Redis's clock from `TIME`'s two fields, as a script passes them on.
pub(crate) fn redis_time(seconds: Value, micros: Value) -> Option<RedisTime> {
    let field = |v: Value| bytes_of(v).and_then(|b| std::str::from_utf8(&b).ok()?.parse::<u64>().ok());
    RedisTime::from_parts(field(seconds)?, field(micros)?)
}

/// [`READ_LUA`]'s reply.
fn parse_read(reply: Vec<Value>) -> Option<Found> {
    let [value, seconds, micros, unusable] = <[Value; 4]>::try_from(reply).ok()?;
    if unusable.as_i64()? == 1 {
        return Some(Found::Unusable);
    }
    Some(Found::of(bytes_of(value), redis_time(seconds, micros)?))
}

/// Subscribes to [`CHANNEL`] and [`PURGE_CHANNEL`], retrying until Redis answers; after that fred re-subscribes on
/// every reconnect by itself (`manage_subscriptions`).
async fn subscribe(subscriber: SubscriberClient) {
    loop {
        match subscriber.subscribe(vec![CHANNEL, PURGE_CHANNEL]).await {
            Ok(()) => return,
            Err(error) => {
                tracing::debug!(%error, "cannot subscribe yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Reports a fred client's refused connections and successful ones to `refusals`.
fn watch_connections(client: &impl EventInterface, link: Link, tls: bool, refusals: Arc<Refusals>) {
    let mut errors = client.error_rx();
    let mut connected = client.reconnect_rx();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                error = errors.recv() => match error {
                    Ok((error, _)) => {
                        if let Some(refusal) = Refusal::of_fred(&error, tls) {
                            refusals.refused(link, refusal);
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                server = connected.recv() => match server {
                    Ok(_) => refusals.accepted(link),
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
}

/// Reports the hit-read connection's refusals and successful connections to `refusals`.
async fn watch_reads(mut failures: tokio::sync::watch::Receiver<Option<ReadError>>, refusals: Arc<Refusals>) {
    while failures.changed().await.is_ok() {
        let failure = failures.borrow_and_update().clone();
        match failure {
            None => refusals.accepted(Link::Reads),
            Some(ReadError::Tls(cause)) => refusals.refused(Link::Reads, Refusal::Tls(cause)),
            Some(ReadError::Server(code)) => {
                if let Some(refusal) = Refusal::of_code(&code) {
                    refusals.refused(Link::Reads, refusal);
                }
            }
            Some(_) => {}
        }
    }
}

/// Wakes the purge watcher on every purge announcement (flight announcements are routed by
/// [`crate::cluster_flight`]).
async fn watch_purges(subscriber: SubscriberClient, purged: Arc<Notify>) {
    let mut messages = subscriber.message_rx();
    loop {
        match messages.recv().await {
            Ok(message) if &*message.channel == PURGE_CHANNEL => purged.notify_waiters(),
            Ok(_) => {}
            // Announcements were dropped for a slow reader: the once-a-second look covers it.
            Err(broadcast::error::RecvError::Lagged(_)) => purged.notify_waiters(),
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_single_server_is_read_through_the_pipeline() {
        let target = |url: &str| {
            let endpoint = Endpoint::new(url, None, None).unwrap();
            pipeline_target(&endpoint.fred_config().unwrap(), endpoint.tls())
        };
        let plain = target("redis://proxy:pw@cache.internal:6380/2").expect("a plain server");
        assert_eq!((plain.host.as_str(), plain.port, plain.database), ("cache.internal", 6380, Some(2)));
        assert_eq!((plain.username.as_deref(), plain.password.as_deref()), (Some("proxy"), Some("pw")));
        assert!(plain.tls.is_none());
        let password_only = target("redis://:pw@127.0.0.1:6379").expect("a plain server");
        assert_eq!((password_only.username.as_deref(), password_only.password.as_deref()), (None, Some("pw")));
        assert_eq!(target("redis://127.0.0.1").map(|t| (t.port, t.password, t.database)), Some((6379, None, None)));
        assert_eq!(target("redis://[fd00::1]:6390").map(|t| (t.host, t.port)), Some(("fd00::1".to_owned(), 6390)));
        let apart = Endpoint::new("valkey://proxy@cache:6379", Some("from-a-file".to_owned().into()), None).unwrap();
        let apart = pipeline_target(&apart.fred_config().unwrap(), apart.tls()).unwrap();
        assert_eq!((apart.username.as_deref(), apart.password.as_deref()), (Some("proxy"), Some("from-a-file")));
        // Over TLS with the endpoint's own configuration (here: trusting no one).
        let tls = Arc::new(client_config(Some(Vec::new()), None).unwrap());
        let endpoint = Endpoint::new("rediss://cache.internal:6380", None, Some(Arc::clone(&tls))).unwrap();
        let over_tls = pipeline_target(&endpoint.fred_config().unwrap(), endpoint.tls()).expect("a TLS server");
        assert!(over_tls.tls.is_some_and(|t| Arc::ptr_eq(&t, &tls)));
        for through_fred in ["redis-cluster://a:6379?node=b:6379", "redis-sentinel://s1:26379?sentinelServiceName=main"]
        {
            assert!(target(through_fred).is_none(), "{through_fred}");
        }
    }

    #[test]
    fn entry_names_hash_tag_the_first_128_bits_of_the_key() {
        for bytes in [[0u8; 32], [0x5a; 32], [0xff; 32], std::array::from_fn(|i| i as u8)] {
            let key = CacheKey::from_bytes(bytes);
            let expected = format!("tp:{{{}}}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes[..16]));
            assert_eq!(RedisStore::entry_key(&key), expected);
            assert_eq!(&entry_name(&key)[..], expected.as_bytes());
        }
    }
}
