//! The shared cache (L2) and the cluster-wide single-flight primitives, in Redis.
//!
//! Redis is an accelerator, never a dependency (docs/architecture.md, invariant 5): every command has a
//! short deadline, a [`Breaker`] stops paying that deadline while Redis keeps failing, the
//! client reconnects by itself, and any failure is a [`StoreError`] after which the caller
//! carries on without Redis. fred's defaults would wait forever across a Redis restart, hence
//! the explicit settings. On a plain `redis://` server the hit path's read goes over a
//! connection of its own, [`ReadPipeline`], held to the same deadline and breaker.
//!
//! Key layout, all in one Redis Cluster slot per entry thanks to the `{...}` hash tag:
//! `tp:{<base64url of the cache key's first 128 bits>}` holds the sealed entry, `tp:{...}:lock` the single-flight lock
//! (`SET NX PX` with a random owner). Outcomes are announced on one channel, [`CHANNEL`], as
//! `cache key ‖ sealed message`; each replica holds one subscription and routes messages to the
//! local [`Waiter`] of that key.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::config::UnresponsiveConfig;
use fred::types::scripts::Script;
use shared::keys::{CacheKey, Tag};
use tokio::sync::{Notify, mpsc};

use crate::breaker::Breaker;
use crate::metrics::{BreakerState, Metrics};
use crate::read_pipeline::{MAX_VALUE, ReadError, ReadPipeline, Target};
use crate::redis_clock::{RedisClock, RedisTime};

/// The channel every replica subscribes to for flight outcomes.
pub const CHANNEL: &str = "tp:flights";
/// The channel on which purges are announced (the message is the purged field).
pub const PURGE_CHANNEL: &str = "tp:purge";

/// Lua helpers of the purge scripts (see [`crate::purge`]): Redis's clock in µs, exact as a Lua
/// number until the year 2255; epochs written as integers, never in exponent form; epochs that
/// are not plain digit strings below 2^53 (where adding one stops changing a Lua number) count
/// as absent, exactly as the replicas' parser sees them; and the repair of a lost or damaged hash (absent, another type, an unusable `all`):
/// `all` anew from the clock, so entries keyed before the loss stay out of reach, and a version
/// where there is none (a hash written by an earlier release).
const PURGE_LUA_COMMON: &str = r"
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function int(n) return string.format('%.0f', n) end
local function sane(value)
  if type(value) ~= 'string' or not value:match('^%d+$') then return nil end
  local n = tonumber(value)
  if n < 9007199254740992 then return n end
  return nil
end
local function epoch(field) return sane(redis.call('HGET', KEYS[1], field)) or 0 end
local function changed(now)
  redis.call('HSET', KEYS[1], 'v', int(math.max(epoch('v') + 1, now)))
end
local now = now_us()
local kind = redis.call('TYPE', KEYS[1]).ok
if kind ~= 'hash' and kind ~= 'none' then redis.call('DEL', KEYS[1]) end
if not sane(redis.call('HGET', KEYS[1], 'all')) then
  redis.call('HSET', KEYS[1], 'all', int(math.max(epoch('all') + 1, now)))
  changed(now)
elseif not sane(redis.call('HGET', KEYS[1], 'v')) then
  changed(now)
end
";

/// Bumps one purge epoch and announces it. KEYS: epochs hash. ARGV: field, channel, retention
/// (µs), the most tagged fields. A new tagged field first drops the fields older than the
/// retention (or unusable); past the bound it is refused. Returns the new epoch, or -1 when
/// refused.
const PURGE_LUA: &str = r"
local field = ARGV[1]
if field ~= 'all' and redis.call('HEXISTS', KEYS[1], field) == 0 then
  local flat = redis.call('HGETALL', KEYS[1])
  local kept = 0
  for i = 1, #flat, 2 do
    if flat[i] ~= 'all' and flat[i] ~= 'v' then
      if (sane(flat[i + 1]) or 0) < now - tonumber(ARGV[3]) then redis.call('HDEL', KEYS[1], flat[i])
      else kept = kept + 1 end
    end
  end
  if kept >= tonumber(ARGV[4]) then return -1 end
end
local new = math.max(epoch(field) + 1, now)
redis.call('HSET', KEYS[1], field, int(new))
changed(now)
redis.call('PUBLISH', ARGV[2], field)
return new
";

/// The purge hash if its version differs from the caller's. KEYS: epochs hash. ARGV: the
/// version the caller has ('' for none: always the hash). Returns the hash (flat), or an
/// empty array.
const PURGE_STATE_LUA: &str = r"
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'v') == ARGV[1] then return {} end
return redis.call('HGETALL', KEYS[1])
";

/// Writes back epochs a replica remembers that Redis lost or holds older, unless older than
/// the retention, and announces it so that every replica reads the hash at once. KEYS: epochs
/// hash. ARGV: retention (µs), channel, then field, epoch pairs. Returns the hash (flat).
const RESTORE_PURGES_LUA: &str = r"
local wrote = false
for i = 3, #ARGV, 2 do
  local field, want = ARGV[i], sane(ARGV[i + 1])
  if want and want > epoch(field) and (field == 'all' or want >= now - tonumber(ARGV[1])) then
    redis.call('HSET', KEYS[1], field, int(want))
    wrote = true
  end
end
if wrote then
  changed(now)
  redis.call('PUBLISH', ARGV[2], 'restored')
end
return redis.call('HGETALL', KEYS[1])
";

/// The largest value an entry may have: a sealed token response is a few KiB (the upstream's
/// body is bounded, and Cognito's tokens are about 1 KiB). A larger value was planted: it is a
/// miss for its key, never read whole.
pub const MAX_ENTRY_BYTES: usize = MAX_VALUE;

/// The Redis hash of purge epochs (see [`crate::purge`]): field `all`, field `v` (the
/// version), and one field per purged tag (hex).
pub const EPOCHS_KEY: &str = "tp:purge";
/// The field of the purge hash that changes with every change of it.
const VERSION_FIELD: &str = "v";

/// The purge hash as Redis holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PurgeState {
    /// Changes with every change of the hash.
    pub version: String,
    /// `field → epoch`, without the version.
    pub fields: HashMap<String, u64>,
}

/// Lua shared by the scripts that read an entry: `entry(limit)` returns its value (`false` if
/// absent or unusable), its PTTL, and 1 if it was there but unusable (not a string, or larger
/// than `limit` bytes), so that one planted key is that key's miss, never a script error.
/// `now` is Redis's clock (see [`crate::redis_clock`]).
const ENTRY_LUA: &str = r"
local function entry(limit)
  local kind = redis.call('TYPE', KEYS[1]).ok
  if kind == 'none' then return false, -2, 0 end
  if kind ~= 'string' or redis.call('STRLEN', KEYS[1]) > tonumber(limit) then return false, -2, 1 end
  return redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1]), 0
end
local now = redis.call('TIME')
";

/// The hit read through fred (TLS, Sentinel, Cluster): an entry and Redis's clock in one step.
/// KEYS: entry. ARGV: the size limit. Returns {value or '', seconds, µs, unusable}.
const READ_LUA: &str = r"
local v, _, bad = entry(ARGV[1])
return {v or '', now[1], now[2], bad}
";

/// Looks up an entry, or takes the lock when there is no fresh one, in one round trip.
/// KEYS: entry, lock. ARGV: owner, lock TTL (ms), the entry TTL (ms) above which it is fresh,
/// the size limit. Every reply starts {code, seconds, µs, unusable} (Redis's clock, and whether
/// an unusable value was found), then for code 0 (fresh) the value; 1 (locked by us) the value
/// or '' (a stale value comes along as a fallback); 2 (locked by someone else) the value or ''
/// and the lock's TTL. A lock without a TTL, or with more than ours (a crashed writer, an
/// operator, another configuration), gets ours: no key waits longer than one lock TTL.
const LOOKUP_LUA: &str = r"
local v, t, bad = entry(ARGV[4])
if v and t > tonumber(ARGV[3]) then return {0, now[1], now[2], bad, v} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1, now[1], now[2], bad, v or ''} end
local lock_ttl = redis.call('PTTL', KEYS[2])
if lock_ttl < 0 or lock_ttl > tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  lock_ttl = tonumber(ARGV[2])
end
return {2, now[1], now[2], bad, v or '', lock_ttl}
";

/// Finishes a flight: stores the value (if any), releases the lock only if it is still ours
/// (compare-and-delete, so a late leader never frees its successor's lock), and announces the
/// outcome. KEYS: entry, lock. ARGV: owner, value or '', value TTL (ms), channel, message.
/// Returns 1 if the lock was still ours.
const COMPLETE_LUA: &str = r"
if ARGV[2] ~= '' then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
local mine = 0
if redis.call('TYPE', KEYS[2]).ok == 'string' and redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
  mine = 1
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return mine
";

/// Admits one authentication attempt against a client's counters (hashes with fields `f`,
/// failures, and `p`, attempts in flight), per source and per client. Refused when failures
/// reached a limit. Busy when failures plus attempts in flight fill the per-client limit, or
/// the per-source limit once that source has failed: a concurrent burst of guesses cannot
/// overshoot while its first calls are being answered, and an honest source (no failures)
/// is slowed only by the per-client limit. Else counted as in flight.
/// KEYS: per-source hash, per-client hash. ARGV: their limits (0 = none), window (ms).
/// Returns {0} counted, {1, ms left in the window} refused, {2} busy.
const AUTH_ATTEMPT_LUA: &str = r"
local f, p = {}, {}
for i = 1, 2 do
  f[i] = tonumber(redis.call('HGET', KEYS[i], 'f') or '0')
  p[i] = tonumber(redis.call('HGET', KEYS[i], 'p') or '0')
  local limit = tonumber(ARGV[i])
  if limit > 0 and f[i] >= limit then return {1, math.max(redis.call('PTTL', KEYS[i]), 1)} end
end
if tonumber(ARGV[1]) > 0 and f[1] > 0 and f[1] + p[1] >= tonumber(ARGV[1]) then return {2} end
if tonumber(ARGV[2]) > 0 and f[2] + p[2] >= tonumber(ARGV[2]) then return {2} end
for i = 1, 2 do
  if tonumber(ARGV[i]) > 0 then
    redis.call('HINCRBY', KEYS[i], 'p', 1)
    if redis.call('PTTL', KEYS[i]) < 0 then redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
  end
end
return {0}
";

/// Settles an attempt admitted by [`AUTH_ATTEMPT_LUA`]: no longer in flight, and a failure
/// if it failed. A counter left with nothing is deleted, so successful calls leave no trace.
/// KEYS: as for the attempt. ARGV: 1 if it failed else 0, window (ms), the two limits.
const AUTH_SETTLE_LUA: &str = r"
for i = 1, 2 do
  if tonumber(ARGV[i + 2]) > 0 then
    local p = redis.call('HINCRBY', KEYS[i], 'p', -1)
    if p < 0 then redis.call('HSET', KEYS[i], 'p', 0) end
    if ARGV[1] == '1' then redis.call('HINCRBY', KEYS[i], 'f', 1) end
    if redis.call('PTTL', KEYS[i]) < 0 then redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
    if p <= 0 and tonumber(redis.call('HGET', KEYS[i], 'f') or '0') == 0 then redis.call('DEL', KEYS[i]) end
  end
end
return 0
";

/// Takes one slot of the cluster-wide upstream rate cap, in windows of one second of Redis's
/// own clock (no replica's clock is involved). KEYS: the counter hash. ARGV: calls per second.
/// Returns 0 when a slot was taken, else the ms until the next window.
const RATE_SLOT_LUA: &str = r"
local now = redis.call('TIME')
if redis.call('HGET', KEYS[1], 'w') ~= now[1] then
  redis.call('HSET', KEYS[1], 'w', now[1], 'n', 0)
  redis.call('PEXPIRE', KEYS[1], 2000)
end
if redis.call('HINCRBY', KEYS[1], 'n', 1) <= tonumber(ARGV[1]) then return 0 end
return math.max(1000 - math.floor(tonumber(now[2]) / 1000), 1)
";

/// The hash that counts this second's upstream calls.
const RATE_KEY: &str = "tp:rate";

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
}

/// Why the store could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreSetupError(String);

/// Store settings.
#[derive(Debug, Clone, Copy)]
pub struct StoreSettings {
    pub command_timeout: Duration,
    pub breaker_threshold: u32,
    pub breaker_cooldown: Duration,
    /// Hit-path reads on their own pipelined connection when the server allows it (plain
    /// `redis://`); `false` reads through fred always (tests compare the two).
    pub pipelined_reads: bool,
}

/// A sealed value, and Redis's clock when it was read (see [`crate::redis_clock`]).
#[derive(Debug, Clone)]
pub struct StoredValue {
    pub sealed: Bytes,
    pub now: RedisTime,
}

/// What [`RedisStore::lookup`] found.
#[derive(Debug)]
pub enum Lookup {
    /// A fresh entry.
    Fresh(StoredValue),
    /// No fresh entry; we hold the lock now. A stale entry, if any, is a fallback. `clock`
    /// places the entry this flight will write on Redis's clock.
    Acquired { stale: Option<StoredValue>, clock: RedisClock },
    /// No fresh entry; another flight holds the lock for `lock_ttl` more. `clock` reads the
    /// leader's announcement (see [`crate::flight_message`]).
    Held { lock_ttl: Duration, stale: Option<StoredValue>, clock: RedisClock },
}

/// What the failed-authentication counters say about one more attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Counted as in flight: go ahead.
    Counted,
    /// Too many failures: refused for the rest of the window.
    Refused(Duration),
    /// Failures plus attempts in flight fill a limit: wait for one to settle.
    Busy,
}

/// The Redis names of one client's failed-authentication counters: per source, per client.
/// Keyed-hash tags, hash-tagged by client so both live in one Redis Cluster slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthCounters {
    per_source: String,
    per_client: String,
}

impl AuthCounters {
    pub fn new(client: Tag, source: Tag) -> AuthCounters {
        let client = hex::encode(client);
        AuthCounters {
            per_source: format!("tp:auth:{{{client}}}:{}", hex::encode(source)),
            per_client: format!("tp:auth:{{{client}}}"),
        }
    }

    fn names(&self) -> Vec<&str> {
        vec![self.per_source.as_str(), self.per_client.as_str()]
    }
}

/// The random identity of one lock holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockOwner(String);

impl LockOwner {
    pub fn random() -> LockOwner {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).expect("the OS random source is available");
        LockOwner(hex::encode(bytes))
    }
}

/// The Redis-backed shared cache and flight coordination.
#[derive(Clone)]
pub struct RedisStore {
    client: Client,
    /// The hit path's reads, for plain `redis://` servers; `None` reads through `client`.
    reads: Option<Arc<ReadPipeline>>,
    command_timeout: Duration,
    subscriber: SubscriberClient,
    read_script: Arc<Script>,
    lookup_script: Arc<Script>,
    complete_script: Arc<Script>,
    purge_script: Arc<Script>,
    purge_state_script: Arc<Script>,
    restore_purges_script: Arc<Script>,
    auth_attempt_script: Arc<Script>,
    auth_settle_script: Arc<Script>,
    rate_slot_script: Arc<Script>,
    /// Woken when a purge is announced.
    purged: Arc<Notify>,
    breaker: Arc<Breaker>,
    waiters: Arc<Waiters>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("connected", &self.is_connected())
            .field("breaker", &self.breaker.state())
            .finish()
    }
}

impl RedisStore {
    /// Creates the clients and starts connecting in the background. Start-up does not wait
    /// for Redis: a replica whose Redis is down still serves, from L1 and the upstream.
    pub fn connect(url: &str, settings: StoreSettings, metrics: Arc<Metrics>) -> Result<RedisStore, StoreSetupError> {
        // fred's parse errors may quote the URL, which may hold a password: keep only the kind.
        let config =
            Config::from_url(url).map_err(|e| StoreSetupError(format!("invalid Redis URL ({:?})", e.kind())))?;
        let timeout = settings.command_timeout;
        let unresponsive = (timeout * 4).max(Duration::from_secs(1));
        let reads = plain_tcp_target(&config)
            .filter(|_| settings.pipelined_reads)
            .map(|target| Arc::new(ReadPipeline::start(target, Duration::from_secs(1).max(timeout), unresponsive)));
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
        // The handles are not needed: the connection tasks live as long as the clients.
        drop(client.connect());
        drop(subscriber.connect());
        drop(subscriber.manage_subscriptions());

        let waiters = Arc::new(Waiters::default());
        let purged = Arc::new(Notify::new());
        tokio::spawn(subscribe(subscriber.clone()));
        tokio::spawn(route_messages(subscriber.clone(), Arc::clone(&waiters), Arc::clone(&purged)));
        let breaker =
            Arc::new(Breaker::new(settings.breaker_threshold, settings.breaker_cooldown, Arc::clone(&metrics)));
        Ok(RedisStore {
            client,
            reads,
            command_timeout: timeout,
            subscriber,
            read_script: Arc::new(Script::from_lua(format!("{ENTRY_LUA}{READ_LUA}"))),
            lookup_script: Arc::new(Script::from_lua(format!("{ENTRY_LUA}{LOOKUP_LUA}"))),
            complete_script: Arc::new(Script::from_lua(COMPLETE_LUA)),
            purge_script: Arc::new(Script::from_lua(format!("{PURGE_LUA_COMMON}{PURGE_LUA}"))),
            purge_state_script: Arc::new(Script::from_lua(format!("{PURGE_LUA_COMMON}{PURGE_STATE_LUA}"))),
            restore_purges_script: Arc::new(Script::from_lua(format!("{PURGE_LUA_COMMON}{RESTORE_PURGES_LUA}"))),
            auth_attempt_script: Arc::new(Script::from_lua(AUTH_ATTEMPT_LUA)),
            auth_settle_script: Arc::new(Script::from_lua(AUTH_SETTLE_LUA)),
            rate_slot_script: Arc::new(Script::from_lua(RATE_SLOT_LUA)),
            purged,
            breaker,
            waiters,
            metrics,
        })
    }

    /// The Redis key of an entry: the first 128 bits of the cache key. Shorter names save
    /// Redis memory, and isolation does not rest on them: a sealed value is bound to the full
    /// 256-bit key, so even a colliding name could only ever be a miss.
    pub fn entry_key(key: &CacheKey) -> String {
        String::from_utf8(entry_name(key).to_vec()).expect("entry names are ASCII")
    }

    fn lock_key(key: &CacheKey) -> String {
        format!("{}:lock", RedisStore::entry_key(key))
    }

    /// Runs one command through the breaker, counting failures.
    async fn guarded<T>(&self, command: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        if !self.breaker.allow() {
            return Err(StoreError::BreakerOpen);
        }
        // fred's command futures are large: boxed once here, every await above moves a pointer
        // instead of copying them.
        let result = Box::pin(command).await;
        self.breaker.record(result.is_ok());
        if let Err(error) = &result {
            self.metrics.redis_error();
            tracing::warn!(%error, "redis command failed; continuing without it");
        }
        result
    }

    /// Reads an entry and Redis's clock, one round trip, no lock: the hit path. On a plain
    /// `redis://` server through the [`ReadPipeline`] (GETRANGE and TIME, several times cheaper
    /// for Redis than a script), else through fred ([`READ_LUA`]: TIME must come from the
    /// entry's own node in a cluster). A key holding something else, or more than
    /// [`MAX_ENTRY_BYTES`], is that key's miss (and a metric), never a Redis failure.
    pub async fn read(&self, key: &CacheKey) -> Result<Option<StoredValue>, StoreError> {
        let name = entry_name(key);
        let found = self
            .guarded(async {
                if let Some(reads) = &self.reads {
                    let read = tokio::time::timeout(self.command_timeout, reads.read(&name));
                    return match read.await.map_err(|_| StoreError::Timeout)? {
                        Ok(reply) => Ok(Found::of(reply.value, reply.now)),
                        Err(ReadError::Server(code)) if code == "WRONGTYPE" => Ok(Found::Unusable),
                        Err(error) => Err(error.into()),
                    };
                }
                let reply: Vec<Value> =
                    self.read_script.evalsha_with_reload(&self.client, vec![&name[..]], MAX_ENTRY_BYTES as i64).await?;
                parse_read(reply).ok_or(StoreError::UnexpectedReply)
            })
            .await?;
        Ok(self.usable(found))
    }

    /// The value found, if usable; an unusable one is counted.
    fn usable(&self, found: Found) -> Option<StoredValue> {
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

    /// Reads the entry, or takes the lock if there is no fresh entry: see [`LOOKUP_LUA`].
    /// An entry is fresh while its TTL exceeds `fresh_ttl`; pass `None` to ignore entries
    /// (a refresh, or after an entry that would not open).
    pub async fn lookup(
        &self,
        key: &CacheKey,
        owner: &LockOwner,
        lock_ttl: Duration,
        fresh_ttl: Option<Duration>,
    ) -> Result<Lookup, StoreError> {
        let keys = vec![RedisStore::entry_key(key), RedisStore::lock_key(key)];
        let fresh_ms = fresh_ttl.map_or(i64::MAX, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let args: Vec<Value> =
            vec![owner.0.as_str().into(), millis(lock_ttl).into(), fresh_ms.into(), (MAX_ENTRY_BYTES as i64).into()];
        let reply: Vec<Value> =
            self.guarded(async { Ok(self.lookup_script.evalsha_with_reload(&self.client, keys, args).await?) }).await?;
        let arrived = std::time::Instant::now();
        let (lookup, unusable) = parse_lookup(reply, arrived).ok_or(StoreError::UnexpectedReply)?;
        if unusable {
            self.usable(Found::Unusable);
        }
        Ok(lookup)
    }

    /// Announces a flight's outcome: see [`COMPLETE_LUA`]. `value` is stored with its TTL when
    /// given. Returns whether the lock was still ours.
    pub async fn complete(
        &self,
        key: &CacheKey,
        owner: &LockOwner,
        value: Option<(Vec<u8>, Duration)>,
        message: Vec<u8>,
    ) -> Result<bool, StoreError> {
        let keys = vec![RedisStore::entry_key(key), RedisStore::lock_key(key)];
        let (value, ttl) = value.unwrap_or_default();
        let mut announcement = Vec::with_capacity(32 + message.len());
        announcement.extend_from_slice(key.as_bytes());
        announcement.extend_from_slice(&message);
        let args: Vec<Value> = vec![
            owner.0.as_str().into(),
            Bytes::from(value).into(),
            millis(ttl).max(1).into(),
            CHANNEL.into(),
            Bytes::from(announcement).into(),
        ];
        let mine: i64 = self
            .guarded(async { Ok(self.complete_script.evalsha_with_reload(&self.client, keys, args).await?) })
            .await?;
        Ok(mine == 1)
    }

    /// Bumps the purge epoch `field` and announces it to every replica: see [`PURGE_LUA`].
    /// Returns the new epoch, or `None` when `max_tagged` fields are in use already.
    pub async fn purge(&self, field: &str, retention: Duration, max_tagged: usize) -> Result<Option<u64>, StoreError> {
        let args: Vec<Value> = vec![
            field.into(),
            PURGE_CHANNEL.into(),
            micros(retention).into(),
            i64::try_from(max_tagged).unwrap_or(i64::MAX).into(),
        ];
        let epoch: i64 = self
            .guarded(async { Ok(self.purge_script.evalsha_with_reload(&self.client, vec![EPOCHS_KEY], args).await?) })
            .await?;
        if epoch == -1 {
            return Ok(None);
        }
        u64::try_from(epoch).map(Some).map_err(|_| StoreError::UnexpectedReply)
    }

    /// The purge hash, unless its version is `known`: see [`PURGE_STATE_LUA`].
    pub async fn purge_state(&self, known: Option<&str>) -> Result<Option<PurgeState>, StoreError> {
        let args: Vec<Value> = vec![known.unwrap_or("").into()];
        let flat: Vec<Value> = self
            .guarded(async {
                Ok(self.purge_state_script.evalsha_with_reload(&self.client, vec![EPOCHS_KEY], args).await?)
            })
            .await?;
        if flat.is_empty() {
            return Ok(None);
        }
        parse_purge_state(flat).map(Some)
    }

    /// Writes back the epochs in `fields` that Redis lost or holds older: see
    /// [`RESTORE_PURGES_LUA`]. Returns the hash afterwards.
    pub async fn restore_purges(
        &self,
        fields: &[(String, u64)],
        retention: Duration,
    ) -> Result<PurgeState, StoreError> {
        let mut args: Vec<Value> = vec![micros(retention).into(), PURGE_CHANNEL.into()];
        for (field, epoch) in fields {
            args.push(field.as_str().into());
            args.push(epoch.to_string().into());
        }
        let flat: Vec<Value> = self
            .guarded(async {
                Ok(self.restore_purges_script.evalsha_with_reload(&self.client, vec![EPOCHS_KEY], args).await?)
            })
            .await?;
        parse_purge_state(flat)
    }

    /// Admits an authentication attempt against `counters`: see [`AUTH_ATTEMPT_LUA`].
    pub async fn auth_attempt(
        &self,
        counters: &AuthCounters,
        limits: [u32; 2],
        window: Duration,
    ) -> Result<Verdict, StoreError> {
        let args: Vec<Value> = vec![limits[0].into(), limits[1].into(), millis(window).into()];
        let reply: Vec<i64> = self
            .guarded(async {
                Ok(self.auth_attempt_script.evalsha_with_reload(&self.client, counters.names(), args).await?)
            })
            .await?;
        match reply.as_slice() {
            [0] => Ok(Verdict::Counted),
            [1, left] => Ok(Verdict::Refused(Duration::from_millis(left.unsigned_abs()))),
            [2] => Ok(Verdict::Busy),
            _ => Err(StoreError::UnexpectedReply),
        }
    }

    /// Settles an attempt [`RedisStore::auth_attempt`] counted: see [`AUTH_SETTLE_LUA`].
    pub async fn auth_settle(
        &self,
        counters: &AuthCounters,
        failed: bool,
        limits: [u32; 2],
        window: Duration,
    ) -> Result<(), StoreError> {
        let args: Vec<Value> =
            vec![i64::from(failed).into(), millis(window).into(), limits[0].into(), limits[1].into()];
        self.guarded(async {
            Ok(self.auth_settle_script.evalsha_with_reload(&self.client, counters.names(), args).await?)
        })
        .await
    }

    /// Takes a slot of the cluster-wide upstream rate cap: see [`RATE_SLOT_LUA`]. `Some(wait)` =
    /// none left before the next window, `wait` from now.
    pub async fn rate_slot(&self, per_second: u32) -> Result<Option<Duration>, StoreError> {
        let wait: i64 = self
            .guarded(async {
                Ok(self.rate_slot_script.evalsha_with_reload(&self.client, vec![RATE_KEY], per_second).await?)
            })
            .await?;
        Ok((wait > 0).then(|| Duration::from_millis(wait.unsigned_abs())))
    }

    /// Resolves when a purge is announced after this call (not after its first poll).
    pub fn purge_announced(&self) -> tokio::sync::futures::Notified<'_> {
        self.purged.notified()
    }

    /// Registers for the outcome messages of `key`. Register *before* looking the key up,
    /// so that no message published after the look can be missed.
    pub fn subscribe(&self, key: CacheKey) -> Waiter {
        self.waiters.register(key)
    }

    /// Whether the command connection, and the read connection if there is one, are up.
    pub fn is_connected(&self) -> bool {
        self.client.is_connected() && !self.reads.as_ref().is_some_and(|reads| reads.is_down())
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

/// Where the [`ReadPipeline`] connects: a single server over plain TCP, or `None` for TLS,
/// Sentinel and Cluster, whose reads go through fred.
fn plain_tcp_target(config: &Config) -> Option<Target> {
    let ServerConfig::Centralized { server } = &config.server else { return None };
    if config.tls.is_some() {
        return None;
    }
    Some(Target {
        // fred keeps a URL's IPv6 literal in its brackets, which a socket address has not.
        host: server.host.trim_start_matches('[').trim_end_matches(']').to_owned(),
        port: server.port,
        username: config.username.clone(),
        password: config.password.clone(),
        database: config.database,
    })
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// The purge hash from HGETALL's flat reply; fields that are not `name → integer` are skipped.
fn parse_purge_state(flat: Vec<Value>) -> Result<PurgeState, StoreError> {
    let mut state = PurgeState::default();
    let mut flat = flat.into_iter();
    while let (Some(field), Some(value)) = (flat.next(), flat.next()) {
        let field = bytes_of(field).and_then(|b| String::from_utf8(b.to_vec()).ok());
        let value = bytes_of(value).and_then(|b| String::from_utf8(b.to_vec()).ok());
        let (Some(field), Some(value)) = (field, value) else { continue };
        if field == VERSION_FIELD {
            state.version = value;
        } else if let Some(epoch) =
            value.bytes().all(|b| b.is_ascii_digit()).then(|| value.parse::<u64>().ok()).flatten()
        {
            // The scripts count larger values as absent (see PURGE_LUA_COMMON): so does this
            // replica, which then never writes one back.
            if epoch < 1 << 53 {
                state.fields.insert(field, epoch);
            }
        }
    }
    if state.version.is_empty() {
        return Err(StoreError::UnexpectedReply);
    }
    Ok(state)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn bytes_of(value: Value) -> Option<Bytes> {
    match value {
        Value::Bytes(b) => Some(b),
        Value::String(s) => Some(s.into_inner()),
        _ => None,
    }
}

/// What a read found at an entry's name.
#[derive(Debug)]
enum Found {
    Absent,
    /// Something that cannot be an entry: another type, or more than [`MAX_ENTRY_BYTES`].
    Unusable,
    Value(StoredValue),
}

impl Found {
    /// A read value (empty = absent) with Redis's clock.
    fn of(value: Option<Bytes>, now: RedisTime) -> Found {
        match value {
            None => Found::Absent,
            Some(sealed) if sealed.is_empty() => Found::Absent,
            Some(sealed) if sealed.len() > MAX_ENTRY_BYTES => Found::Unusable,
            Some(sealed) => Found::Value(StoredValue { sealed, now }),
        }
    }
}

/// Redis's clock from `TIME`'s two fields, as a script passes them on.
fn redis_time(seconds: Value, micros: Value) -> Option<RedisTime> {
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

/// [`LOOKUP_LUA`]'s reply, which arrived at `arrived`, and whether it found an unusable value.
fn parse_lookup(reply: Vec<Value>, arrived: std::time::Instant) -> Option<(Lookup, bool)> {
    let mut reply = reply.into_iter();
    let code = reply.next()?.as_i64()?;
    let now = redis_time(reply.next()?, reply.next()?)?;
    let unusable = reply.next()?.as_i64()? == 1;
    let mut value = || match Found::of(bytes_of(reply.next()?), now) {
        Found::Value(value) => Some(value),
        Found::Absent | Found::Unusable => None,
    };
    let lookup = match code {
        0 => Lookup::Fresh(value()?),
        1 => Lookup::Acquired { stale: value(), clock: RedisClock::new(now, arrived) },
        2 => {
            let stale = value();
            let lock_ttl = reply.next()?.as_i64()?;
            let lock_ttl = Duration::from_millis(lock_ttl.max(1).unsigned_abs());
            Lookup::Held { lock_ttl, stale, clock: RedisClock::new(now, arrived) }
        }
        _ => return None,
    };
    Some((lookup, unusable))
}

/// Subscribes to [`CHANNEL`], retrying until Redis answers; after that fred re-subscribes on
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

/// Routes each outcome message to the waiter of its key on this replica, if any, and wakes
/// the purge watcher on a purge announcement.
async fn route_messages(subscriber: SubscriberClient, waiters: Arc<Waiters>, purged: Arc<Notify>) {
    let mut messages = subscriber.message_rx();
    loop {
        match messages.recv().await {
            Ok(message) if &*message.channel == PURGE_CHANNEL => purged.notify_waiters(),
            Ok(message) => {
                let Some(payload) = bytes_of(message.value) else { continue };
                if payload.len() < 32 {
                    continue;
                }
                let key = CacheKey::from_bytes(payload[..32].try_into().expect("32 bytes"));
                waiters.deliver(&key, payload.slice(32..));
            }
            // Messages were dropped for a slow reader: the followers' periodic check covers it.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// The senders of one key's local waiters, each with its id.
type KeyWaiters = Vec<(u64, mpsc::Sender<Bytes>)>;

/// The local waiters, by key.
#[derive(Debug, Default)]
struct Waiters {
    by_key: Mutex<HashMap<CacheKey, KeyWaiters>>,
    next_id: AtomicU64,
}

impl Waiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CacheKey, KeyWaiters>> {
        self.by_key.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(self: &Arc<Self>, key: CacheKey) -> Waiter {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = mpsc::channel(4);
        self.lock().entry(key).or_default().push((id, sender));
        Waiter { key, id, receiver, waiters: Arc::clone(self) }
    }

    fn deliver(&self, key: &CacheKey, payload: Bytes) {
        if let Some(senders) = self.lock().get(key) {
            for (_, sender) in senders {
                let _ = sender.try_send(payload.clone());
            }
        }
    }

    fn remove(&self, key: &CacheKey, id: u64) {
        let mut by_key = self.lock();
        if let Some(senders) = by_key.get_mut(key) {
            senders.retain(|(i, _)| *i != id);
            if senders.is_empty() {
                by_key.remove(key);
            }
        }
    }
}

/// Receives the outcome messages of one key until dropped.
#[derive(Debug)]
pub struct Waiter {
    key: CacheKey,
    id: u64,
    receiver: mpsc::Receiver<Bytes>,
    waiters: Arc<Waiters>,
}

impl Waiter {
    /// The next message, or `None` after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<Bytes> {
        tokio::time::timeout(timeout, self.receiver.recv()).await.ok().flatten()
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.waiters.remove(&self.key, self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_single_plain_server_is_read_through_the_pipeline() {
        let target = |url: &str| plain_tcp_target(&Config::from_url(url).unwrap());
        let plain = target("redis://proxy:pw@cache.internal:6380/2").expect("a plain server");
        assert_eq!((plain.host.as_str(), plain.port, plain.database), ("cache.internal", 6380, Some(2)));
        assert_eq!((plain.username.as_deref(), plain.password.as_deref()), (Some("proxy"), Some("pw")));
        let password_only = target("redis://:pw@127.0.0.1:6379").expect("a plain server");
        assert_eq!((password_only.username.as_deref(), password_only.password.as_deref()), (None, Some("pw")));
        assert_eq!(target("redis://127.0.0.1").map(|t| (t.port, t.password, t.database)), Some((6379, None, None)));
        assert_eq!(target("redis://[fd00::1]:6390").map(|t| (t.host, t.port)), Some(("fd00::1".to_owned(), 6390)));
        for through_fred in [
            "rediss://cache.internal:6380",
            "redis-cluster://a:6379?node=b:6379",
            "redis-sentinel://s1:26379?sentinelServiceName=main",
        ] {
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
