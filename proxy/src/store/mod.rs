//! The shared cache (L2) in Redis: one client, its deadlines and breaker, and the entries.
//!
//! Redis is an accelerator, never a dependency (docs/architecture.md, invariant 5): every command has a
//! short deadline, a [`Breaker`] stops paying that deadline while Redis keeps failing, the
//! client reconnects by itself, and any failure is a [`StoreError`] after which the caller
//! carries on without Redis. fred's defaults would wait forever across a Redis restart, hence
//! the explicit settings. On a single server (`redis://` or `rediss://`) the hit path's read
//! goes over a connection of its own, [`ReadPipeline`], held to the same deadline and breaker;
//! on a Redis Cluster over one such connection per primary, each with a breaker of its own
//! ([`shards`]), so that one dead master does not stop the reads of the others (fred's cluster
//! client serves no shard until the dead one is replaced).
//! Where Redis is and how to reach it (URL schemes, TLS, a password given apart) is
//! [`endpoint`]; ElastiCache and MemoryDB IAM tokens in place of a password, [`iam`]; Redis
//! refusing us (TLS, login, no IAM credentials), said once and seen by readiness, [`refusals`].
//!
//! The store speaks in entries: sealing and opening happen here ([`sealing`]), and callers
//! get tokens. Key layout (docs/architecture.md, "Redis layout"), all in one Redis Cluster slot
//! per entry thanks to the `{...}` hash tag: `tp:{<base64url of the cache key's first 128
//! bits>}` holds the sealed entry, `tp:{...}:lock` the single-flight lock
//! ([`crate::cluster_flight`]). Flight outcomes are announced on [`CHANNEL`], purges on
//! [`PURGE_CHANNEL`]; each replica holds one subscription to both. The purge hash and its
//! scripts are in [`purges`], the quota's counters in [`counters`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Weak};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::ConnectHandle;
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
pub mod iam;
mod purges;
mod refusals;
pub mod sealing;
mod shards;

pub use counters::{AuthCounters, Verdict};
pub use endpoint::{Endpoint, EndpointError, SCHEMES, Scheme, Topology, client_config};
use iam::IamAuth;
pub use purges::{EPOCHS_KEY, PurgeState};
pub use refusals::Refusal;
use refusals::{Link, Refusals};
pub use sealing::Sealing;
use secrecy::ExposeSecret;
use shards::ShardReads;
pub use shards::ShardsHealth;

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

/// The hit read through fred (Sentinel; on a Cluster when a read is redirected, or before
/// fred has the map, or with pipelined reads off): an entry and Redis's clock in one step.
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
    #[error("redis command timed out")]
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
    /// server, or one per master of a Redis Cluster, with or without TLS); `false` reads through
    /// fred always (tests compare the two).
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
    /// The hit path's reads on a Redis Cluster, per primary; `None` reads through `client`.
    shards: Option<Arc<ShardReads>>,
    command_timeout: Duration,
    subscriber: SubscriberClient,
    /// Woken when a purge is announced.
    purged: Arc<Notify>,
    breaker: Arc<Breaker>,
    /// What Redis refuses, if anything (TLS, login): commands fail at once meanwhile.
    refusals: Arc<Refusals>,
    sealing: Arc<Sealing>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// What this replica knows of Redis beyond "connected": whether commands get answers.
#[derive(Debug, Default)]
struct Health {
    /// The last periodic `PING` through the command client was answered in time.
    answering: AtomicBool,
    /// The URL names one server, and it answered MOVED: it is one node of a Redis Cluster.
    one_node_of_a_cluster: AtomicBool,
    /// Set by [`RedisStore::quit`]: the connection tasks end for good.
    quitting: AtomicBool,
    /// The URL names one server (not a cluster, not sentinels).
    single_server: bool,
    /// On Sentinel: one subscription per sentinel, to `+switch-master`.
    sentinels: std::sync::OnceLock<Vec<SubscriberClient>>,
}

/// How often the command client is pinged to tell readiness whether commands are answered.
const PING_EVERY: Duration = Duration::from_secs(1);

/// What `/readyz` says of Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisHealth {
    /// Connected, and commands are answered.
    Up,
    /// Not connected, or commands are not answered (or time out).
    Down,
    /// The URL names one node of a Redis Cluster: keys on the other nodes answer MOVED.
    OneNodeOfACluster,
}

impl RedisHealth {
    pub fn label(self) -> &'static str {
        match self {
            RedisHealth::Up => "up",
            RedisHealth::Down => "down",
            RedisHealth::OneNodeOfACluster => "misconfigured",
        }
    }
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
        if let Some(iam) = endpoint.iam() {
            iam.start(Arc::clone(&refusals));
        }
        let timeout = settings.command_timeout;
        let unresponsive = (timeout * 4).max(Duration::from_secs(1));
        let sentinels = sentinel_watch(&config);
        let single_server = matches!(config.server, ServerConfig::Centralized { .. });
        let reads = pipeline_target(&config, endpoint)
            .filter(|_| settings.pipelined_reads)
            .map(|target| Arc::new(ReadPipeline::start(target, Duration::from_secs(1).max(timeout), unresponsive)));
        if let Some(reads) = &reads {
            tokio::spawn(watch_reads(reads.failures(), Arc::clone(&refusals)));
        }
        let shard_template = cluster_template(&config, endpoint).filter(|_| settings.pipelined_reads);
        let mut builder = Builder::from_config(config);
        builder
            .with_performance_config(|perf| perf.default_command_timeout = timeout)
            .with_connection_config(|conn| {
                conn.connection_timeout = Duration::from_secs(1);
                conn.internal_command_timeout = Duration::from_secs(1);
                // A Redis Cluster answers MOVED after a reshard or a failover: fred reads the
                // map again and resends, one write attempt each, while the caller's deadline
                // (`default_command_timeout`, and `guarded`'s) bounds the whole. With a single
                // attempt every MOVED failed its command (issue 12). An ASK fred 10.1 cannot
                // complete whatever the attempts: that command fails and fred's connection
                // task ends, which `keep_connected` starts again.
                conn.max_command_attempts = MAX_COMMAND_ATTEMPTS;
                conn.max_redirections = MAX_COMMAND_ATTEMPTS;
                // Detect a frozen server (e.g. SIGSTOP) and reconnect instead of waiting forever.
                conn.unresponsive =
                    UnresponsiveConfig { max_timeout: Some(unresponsive), interval: Duration::from_millis(250) };
            })
            // Retry forever, 50 ms doubling to 2 s between attempts.
            .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2));
        let setup = |e: fred::error::Error| StoreSetupError(format!("cannot create the Redis client ({:?})", e.kind()));
        let client = builder.build().map_err(setup)?;
        let subscriber = builder.build_subscriber_client().map_err(setup)?;
        let shards = shard_template.map(|template| {
            ShardReads::start(
                client.clone(),
                template,
                (Duration::from_secs(1).max(timeout), unresponsive),
                (settings.breaker_threshold, settings.breaker_cooldown),
                Arc::clone(&refusals),
                Arc::clone(&metrics),
            )
        });
        // Before connecting, so that no refusal goes unseen.
        let tls = endpoint.tls().is_some();
        watch_connections(&client, Link::Commands, tls, Arc::clone(&refusals));
        watch_connections(&subscriber, Link::Subscription, tls, Arc::clone(&refusals));
        let health = Arc::new(Health { single_server, ..Health::default() });
        if let Some(iam) = endpoint.iam() {
            tokio::spawn(reauthenticate(
                (client.clone(), subscriber.clone()),
                Arc::downgrade(iam),
                Arc::downgrade(&health),
                Arc::clone(&refusals),
                tls,
            ));
        }
        // fred's connection task may end (it does on an ASK): it is started again rather than
        // leaving the client dead behind a "connected" state.
        tokio::spawn(keep_connected(client.clone(), client.connect(), "commands", Arc::downgrade(&health), None));
        let task = subscriber.connect();
        tokio::spawn(subscribe(subscriber.clone()));
        tokio::spawn(keep_connected(
            subscriber.clone(),
            task,
            "subscription",
            Arc::downgrade(&health),
            Some(subscriber.clone()),
        ));
        drop(subscriber.manage_subscriptions());

        let sentinels = match sentinels {
            Some((configs, service)) => {
                follow_sentinels(configs, &service, client.clone(), subscriber.clone()).map_err(setup)?
            }
            None => Vec::new(),
        };
        let _ = health.sentinels.set(sentinels);

        let purged = Arc::new(Notify::new());
        tokio::spawn(watch_purges(subscriber.clone(), Arc::clone(&purged)));
        let breaker =
            Arc::new(Breaker::new(settings.breaker_threshold, settings.breaker_cooldown, Arc::clone(&metrics)));
        let shards_weak = shards.as_ref().map(Arc::downgrade);
        tokio::spawn(ping(client.clone(), timeout, Arc::downgrade(&health), Arc::downgrade(&breaker), shards_weak));
        Ok(RedisStore {
            client,
            reads,
            shards,
            command_timeout: timeout,
            subscriber,
            purged,
            breaker,
            refusals,
            sealing: Arc::new(sealing),
            metrics,
            health,
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
        // instead of copying them. One deadline for the whole, redirects and script reloads
        // included.
        let result = match tokio::time::timeout(self.command_timeout, Box::pin(command)).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout),
        };
        self.breaker.record(result.is_ok());
        if let Err(error) = &result {
            self.metrics.redis_error();
            if error.is_moved()
                && self.health.single_server
                && !self.health.one_node_of_a_cluster.swap(true, Ordering::Relaxed)
            {
                tracing::error!(
                    "the Redis URL names one node of a Redis Cluster (it answered MOVED): keys served by the other \
                     nodes fail; use a redis-cluster:// URL"
                );
            }
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
    /// for Redis than a script); on a Redis Cluster through the pipeline of the entry's master
    /// ([`shards`]: TIME must come from the entry's own node, and it is sent on that node's
    /// connection); else through fred ([`READ_LUA`]). A key holding something else, or more than
    /// [`MAX_ENTRY_BYTES`], is that key's miss (and a metric), never a Redis failure.
    pub async fn read_value(&self, key: &CacheKey) -> Result<Option<StoredValue>, StoreError> {
        let name = entry_name(key);
        if let Some(shards) = &self.shards {
            match self.read_on_shard(shards, &name).await? {
                Some(found) => return Ok(self.usable(found)),
                // Redirected (or no map yet): through fred, which follows the redirect and
                // reads the map again; then the shards follow fred's new map.
                None => {
                    // Boxed, as below.
                    let found = Box::pin(self.read_through_fred(&name)).await;
                    shards.look();
                    return Ok(self.usable(found?));
                }
            }
        }
        let found = match &self.reads {
            // `guarded_on` bounds it with the command deadline.
            Some(reads) => {
                self.guarded_on(Link::Reads, async {
                    match reads.read(&name).await {
                        Ok(reply) => Ok(Found::of(reply.value, reply.now)),
                        Err(ReadError::Server(code)) if code == "WRONGTYPE" => Ok(Found::Unusable),
                        Err(error) => Err(error.into()),
                    }
                })
                .await?
            }
            // Boxed: fred's futures are large, and every hit's future would carry their size.
            None => Box::pin(self.read_through_fred(&name)).await?,
        };
        Ok(self.usable(found))
    }

    /// [`READ_LUA`] through fred and the store's breaker.
    async fn read_through_fred(&self, name: &[u8]) -> Result<Found, StoreError> {
        self.guarded(async {
            let reply: Vec<Value> = READ.evalsha_with_reload(&self.client, vec![name], MAX_ENTRY_BYTES as i64).await?;
            parse_read(reply).ok_or(StoreError::UnexpectedReply)
        })
        .await
    }

    /// Reads `name` from its slot's primary on that primary's own connection, under that
    /// primary's breaker (never the store's: a dead master must not stop the reads of the
    /// others). `Ok(None)` when the read must go through fred instead: no cluster map yet, or
    /// the node redirected it (`MOVED`, `ASK`), which is no failure of the node.
    async fn read_on_shard(&self, shards: &ShardReads, name: &[u8]) -> Result<Option<Found>, StoreError> {
        let Some(shard) = shards.shard_for(name) else { return Ok(None) };
        if !shard.breaker.allow() {
            return Err(StoreError::BreakerOpen);
        }
        let read = tokio::time::timeout(self.command_timeout, shard.pipeline.read(name)).await;
        let result = match read {
            Err(_) => Err(StoreError::Timeout),
            Ok(Ok(reply)) => Ok(Found::of(reply.value, reply.now)),
            Ok(Err(ReadError::Server(code))) if code == "WRONGTYPE" => Ok(Found::Unusable),
            Ok(Err(ReadError::Server(code))) if code == "MOVED" || code == "ASK" => {
                shard.breaker.record(true);
                tracing::debug!(shard = %shard.address, %code, "a hit read was redirected; reading through fred");
                return Ok(None);
            }
            // CLUSTERDOWN included: that shard's read failed.
            Ok(Err(error)) => Err(StoreError::Read(error)),
        };
        shard.breaker.record(result.is_ok());
        if let Err(error) = &result {
            self.metrics.redis_error();
            if self.refusals.any() {
                tracing::debug!(shard = %shard.address, %error, "redis read failed (redis refuses this replica)");
            } else {
                tracing::warn!(shard = %shard.address, %error, "redis read failed; continuing without it");
            }
        }
        result.map(Some)
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

    /// Redis as readiness reports it: up only while connected and commands are answered (a
    /// periodic `PING` through the command client), never while commands fail.
    pub fn health(&self) -> RedisHealth {
        if self.health.one_node_of_a_cluster.load(Ordering::Relaxed) {
            RedisHealth::OneNodeOfACluster
        } else if self.is_connected() && self.health.answering.load(Ordering::Relaxed) {
            RedisHealth::Up
        } else {
            RedisHealth::Down
        }
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// On a Redis Cluster read per shard: how many primaries there are, and whose reads fail.
    pub fn shards_health(&self) -> Option<ShardsHealth> {
        self.shards.as_ref().map(|shards| shards.health())
    }

    /// Closes the connections.
    pub async fn quit(&self) {
        self.health.quitting.store(true, Ordering::Relaxed);
        for sentinel in self.health.sentinels.get().into_iter().flatten() {
            let _ = sentinel.quit().await;
        }
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

/// Where the [`ReadPipeline`] connects: a single server, over TLS when the endpoint says so,
/// logging in as fred does (the IAM token included), or `None` for Sentinel (whose reads go
/// through fred) and Cluster (one pipeline per master: [`cluster_template`]).
fn pipeline_target(config: &Config, endpoint: &Endpoint) -> Option<Target> {
    let ServerConfig::Centralized { server } = &config.server else { return None };
    Some(Target {
        // fred keeps a URL's IPv6 literal in its brackets, which a socket address has not.
        host: server.host.trim_start_matches('[').trim_end_matches(']').to_owned(),
        port: server.port,
        ..connection_template(config, endpoint)
    })
}

/// What every primary's read connection of a Redis Cluster shares (TLS, login as fred does,
/// the IAM token included; a cluster has no database), or `None` when `config` is no cluster.
/// The host and port are each primary's, from the cluster map ([`shards`]).
fn cluster_template(config: &Config, endpoint: &Endpoint) -> Option<Target> {
    matches!(config.server, ServerConfig::Clustered { .. })
        .then(|| Target { database: None, ..connection_template(config, endpoint) })
}

/// The connection settings of a read connection, but where it connects.
fn connection_template(config: &Config, endpoint: &Endpoint) -> Target {
    Target {
        host: String::new(),
        port: 0,
        username: config.username.clone(),
        password: config.password.clone(),
        database: config.database,
        tls: endpoint.tls().cloned(),
        credentials: config.credential_provider.clone(),
        max_age: endpoint.iam().map(|iam| iam.connection_max_age),
    }
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

/// Write attempts of one command: the first, and one per redirect or reconnection it meets,
/// all within the command's deadline.
const MAX_COMMAND_ATTEMPTS: u32 = 5;

impl StoreError {
    /// A MOVED redirect reached the caller: on a single-server URL, the server is one node of a
    /// Redis Cluster.
    fn is_moved(&self) -> bool {
        match self {
            StoreError::Redis(error) => error.details().starts_with("MOVED"),
            StoreError::Read(ReadError::Server(code)) => code == "MOVED",
            _ => false,
        }
    }
}

/// Runs `client`'s connection task, and runs it again whenever it ends before
/// [`RedisStore::quit`]: fred ends it on some errors (an ASK it cannot complete), and a
/// client without its task never answers again while it still says it is connected. A
/// subscriber subscribes again on its new task.
async fn keep_connected<C: ClientLike>(
    client: C,
    mut task: ConnectHandle,
    what: &'static str,
    health: std::sync::Weak<Health>,
    subscriber: Option<SubscriberClient>,
) {
    loop {
        let ended = (&mut task).await;
        if health.upgrade().is_none_or(|health| health.quitting.load(Ordering::Relaxed)) {
            return;
        }
        let cause = match &ended {
            Ok(Ok(())) => "closed".to_owned(),
            Ok(Err(error)) => format!("{:?}: {}", error.kind(), error.details()),
            Err(_) => "panicked".to_owned(),
        };
        tracing::warn!(client = what, %cause, "the Redis connection task ended; starting it again");
        tokio::time::sleep(Duration::from_millis(100)).await;
        task = client.connect();
        if let Some(subscriber) = &subscriber {
            tokio::spawn(subscribe(subscriber.clone()));
        }
    }
}

/// Pings Redis through the command client every [`PING_EVERY`], within the command deadline,
/// and records whether it answered; ends with the store. A change is logged once. Redis
/// answering again after it did not (a failover done, a restart) closes the breaker at once:
/// the cooldown is for a Redis that answers but fails commands.
async fn ping(
    client: Client,
    timeout: Duration,
    health: std::sync::Weak<Health>,
    breaker: std::sync::Weak<Breaker>,
    shards: Option<std::sync::Weak<ShardReads>>,
) {
    loop {
        let answered = matches!(
            tokio::time::timeout(timeout.max(Duration::from_millis(100)), client.ping::<Value>(None)).await,
            Ok(Ok(_))
        );
        let Some(health) = health.upgrade() else { return };
        if health.quitting.load(Ordering::Relaxed) {
            return;
        }
        let was = health.answering.swap(answered, Ordering::Relaxed);
        if was && !answered {
            tracing::warn!("redis does not answer PING: reported down until it does");
        } else if !was && answered {
            tracing::info!("redis answers PING");
            if let Some(breaker) = breaker.upgrade() {
                breaker.recovered();
            }
            // fred reached every primary again: so can the shards' reads.
            if let Some(shards) = shards.as_ref().and_then(std::sync::Weak::upgrade) {
                shards.recovered();
            }
        }
        drop(health);
        // While it does not answer, look again sooner: readiness follows recovery quickly.
        tokio::time::sleep(if answered { PING_EVERY } else { PING_EVERY / 4 }).await;
    }
}

/// The sentinels' own connection settings (the data nodes' credentials and TLS, as fred uses
/// them for its sentinel queries) and the service name, when `config` is a Sentinel one.
fn sentinel_watch(config: &Config) -> Option<(Vec<Config>, String)> {
    let ServerConfig::Sentinel { hosts, service_name, .. } = &config.server else { return None };
    let configs = hosts
        .iter()
        .map(|host| Config {
            server: ServerConfig::Centralized { server: host.clone() },
            username: config.username.clone(),
            password: config.password.clone(),
            tls: config.tls.clone(),
            ..Config::default()
        })
        .collect();
    Some((configs, service_name.clone()))
}

/// The sentinel channel announcing a failover: `<service> <old ip> <old port> <new ip> <new port>`.
const SWITCH_MASTER: &str = "+switch-master";

/// Subscribes to [`SWITCH_MASTER`] on every sentinel, and on a switch of `service` makes both
/// clients reconnect at once: fred asks the sentinels for the master again and checks its
/// `ROLE`. Without this they stayed on the demoted master until it was turned into a replica
/// (about 10 s), and the entries written there meanwhile were lost (issue 12). A `READONLY`
/// answer also makes fred reconnect (its `custom-reconnect-errors` feature).
fn follow_sentinels(
    configs: Vec<Config>,
    service: &str,
    client: Client,
    subscriber: SubscriberClient,
) -> Result<Vec<SubscriberClient>, fred::error::Error> {
    let last_switch: Arc<std::sync::Mutex<Option<Bytes>>> = Arc::default();
    let mut watchers = Vec::new();
    for config in configs {
        let watcher = Builder::from_config(config)
            .with_connection_config(|conn| {
                conn.connection_timeout = Duration::from_secs(1);
                conn.internal_command_timeout = Duration::from_secs(1);
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2))
            .build_subscriber_client()?;
        drop(watcher.connect());
        drop(watcher.manage_subscriptions());
        let prefix = format!("{service} ");
        let (client, subscriber, last_switch) = (client.clone(), subscriber.clone(), Arc::clone(&last_switch));
        let mut messages = watcher.message_rx();
        tokio::spawn(subscribe_to(watcher.clone(), vec![SWITCH_MASTER]));
        tokio::spawn(async move {
            loop {
                let message = match messages.recv().await {
                    Ok(message) => message,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let Some(switch) = bytes_of(message.value) else { continue };
                if &*message.channel != SWITCH_MASTER || !switch.starts_with(prefix.as_bytes()) {
                    continue;
                }
                // Every sentinel announces the same switch: follow it once.
                {
                    let mut last = last_switch.lock().unwrap_or_else(|p| p.into_inner());
                    if last.as_ref() == Some(&switch) {
                        continue;
                    }
                    *last = Some(switch);
                }
                tracing::info!("sentinel switched the Redis master: reconnecting to the new one");
                let _ = client.force_reconnection().await;
                let _ = subscriber.force_reconnection().await;
            }
        });
        watchers.push(watcher);
    }
    Ok(watchers)
}

/// Subscribes to [`CHANNEL`] and [`PURGE_CHANNEL`], retrying until Redis answers; after that fred re-subscribes on
/// every reconnect by itself (`manage_subscriptions`).
async fn subscribe(subscriber: SubscriberClient) {
    subscribe_to(subscriber, vec![CHANNEL, PURGE_CHANNEL]).await;
}

/// Subscribes to `channels`, retrying until the server answers.
async fn subscribe_to(subscriber: SubscriberClient, channels: Vec<&'static str>) {
    loop {
        match subscriber.subscribe(channels.clone()).await {
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

/// Sends `AUTH` with a new IAM token on every connection of both fred clients every
/// [`IamAuth::reauth_every`]: AWS closes an IAM connection after 12 hours unless it
/// re-authenticates. Done here rather than by fred's own timer, which tells a refused
/// re-authentication only through the `log` crate, outside this process's log, and never to
/// readiness (issue 12): a refusal here is one line and makes `/readyz` say Redis is down (a new
/// connection could not log in), while the connections, still logged in, go on serving.
async fn reauthenticate(
    (client, subscriber): (Client, SubscriberClient),
    iam: Weak<IamAuth>,
    health: Weak<Health>,
    refusals: Arc<Refusals>,
    tls: bool,
) {
    loop {
        let Some(every) = iam.upgrade().map(|iam| iam.reauth_every) else { return };
        tokio::time::sleep(every).await;
        let (Some(iam), Some(health)) = (iam.upgrade(), health.upgrade()) else { return };
        if health.quitting.load(Ordering::Relaxed) {
            return;
        }
        drop(health);
        let outcomes = [reauthenticate_one(&client, &iam).await, reauthenticate_one(&subscriber, &iam).await];
        let refusal = outcomes.iter().flatten().find_map(|r| r.as_ref().err().and_then(|e| Refusal::of_fred(e, tls)));
        match refusal {
            Some(refusal) => refusals.refused(Link::Reauthentication, refusal),
            None if outcomes.iter().flatten().any(Result::is_ok) => refusals.accepted(Link::Reauthentication),
            None => {}
        }
        for error in outcomes.iter().flatten().filter_map(|r| r.as_ref().err()) {
            tracing::debug!(kind = ?error.kind(), "redis re-authentication failed");
        }
    }
}

/// `AUTH` with a new token on every connection of `client` (all of a cluster's nodes), or
/// `None` when it is not connected (it logs in anew on reconnecting) or no token can be made
/// (the credentials refresher reports that).
async fn reauthenticate_one(client: &impl AuthInterface, iam: &IamAuth) -> Option<Result<(), fred::error::Error>> {
    if !client.is_connected() {
        return None;
    }
    let token = iam.token().await.ok()?;
    Some(client.auth(Some(iam.target().user.clone()), token.expose_secret().to_owned()).await)
}

/// Reports the hit-read connection's refusals and successful connections to `refusals`.
pub(super) async fn watch_reads(
    mut failures: tokio::sync::watch::Receiver<Option<ReadError>>,
    refusals: Arc<Refusals>,
) {
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
            pipeline_target(&endpoint.fred_config().unwrap(), &endpoint)
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
        let apart = pipeline_target(&apart.fred_config().unwrap(), &apart).unwrap();
        assert_eq!((apart.username.as_deref(), apart.password.as_deref()), (Some("proxy"), Some("from-a-file")));
        // Over TLS with the endpoint's own configuration (here: trusting no one).
        let tls = Arc::new(client_config(Some(Vec::new()), None).unwrap());
        let endpoint = Endpoint::new("rediss://cache.internal:6380", None, Some(Arc::clone(&tls))).unwrap();
        let over_tls = pipeline_target(&endpoint.fred_config().unwrap(), &endpoint).expect("a TLS server");
        assert!(over_tls.tls.is_some_and(|t| Arc::ptr_eq(&t, &tls)));
        for through_fred in ["redis-cluster://a:6379?node=b:6379", "redis-sentinel://s1:26379?sentinelServiceName=main"]
        {
            assert!(target(through_fred).is_none(), "{through_fred}");
        }
    }

    #[test]
    fn a_cluster_is_read_per_primary_with_the_endpoints_login_and_tls() {
        let template = |url: &str, tls: Option<Arc<rustls::ClientConfig>>| {
            let endpoint = Endpoint::new(url, None, tls).unwrap();
            cluster_template(&endpoint.fred_config().unwrap(), &endpoint)
        };
        let plain = template("redis-cluster://proxy:pw@a:6379?node=b:6379", None).expect("a cluster");
        assert_eq!((plain.username.as_deref(), plain.password.as_deref()), (Some("proxy"), Some("pw")));
        assert_eq!((plain.database, plain.tls.is_none()), (None, true));
        let tls = Arc::new(client_config(Some(Vec::new()), None).unwrap());
        let over_tls = template("valkeys-cluster://a:6380", Some(Arc::clone(&tls))).expect("a TLS cluster");
        assert!(over_tls.tls.is_some_and(|t| Arc::ptr_eq(&t, &tls)));
        for not_a_cluster in ["redis://a:6379", "rediss://a:6380", "redis-sentinel://s1:26379?sentinelServiceName=main"]
        {
            let tls = not_a_cluster.starts_with("rediss").then(|| Arc::clone(&tls));
            assert!(template(not_a_cluster, tls).is_none(), "{not_a_cluster}");
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
