//! The cluster-wide single flight: a burst of misses for one key, across all replicas, costs
//! one upstream call (docs/architecture.md, "The lock protocol").
//!
//! One script reads the key's entry or, when there is no fresh one, takes its lock
//! ([`ClusterFlight::lock`]). Taking it yields a [`WritePermit`] that owns the lock: completing
//! it consumes it (stores the entry, releases the lock, announces the outcome, in one script);
//! dropping it without completing releases the lock, best effort. Everyone else follows: the
//! [`ClusterFlight`] registered for the key's announcements before its first look, waits for
//! the holder's, looks again periodically in case it was lost (pub/sub delivers at most once),
//! and takes the lock over if it expires. What to do at each point is decided by [`plan`], a
//! pure function; [`fly`] carries it out.
//!
//! The in-process half (one flight per key per replica) is [`crate::local_flight`].

pub mod plan;
mod waiters;

use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fred::prelude::*;
use fred::types::scripts::Script;
use shared::keys::CacheKey;

use crate::entry::{CachedToken, Freshness};
use crate::metrics::Metrics;
use crate::outcome::{Fetched, Outcome, Source};
use crate::redis_clock::RedisClock;
use crate::store::sealing::Announcement;
use crate::store::{
    CHANNEL, ENTRY_LUA, Found, MAX_ENTRY_BYTES, RedisStore, StoreError, StoredValue, bytes_of, millis, redis_time,
};
pub use plan::{FlightSettings, Plan, Purpose, Seen, Served, Step};
use waiters::{Waiter, Waiters};

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

/// Releases the lock only if it is still ours (compare-and-delete, so a late leader never
/// frees its successor's lock); tolerates a lock of another type. KEYS: lock. ARGV: owner.
/// Returns 1 if the lock was still ours.
const RELEASE_LUA: &str = r"
if redis.call('TYPE', KEYS[1]).ok == 'string' and redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
";

/// Finishes a flight: stores the value (if any), releases the lock as [`RELEASE_LUA`] does,
/// and announces the outcome. KEYS: entry, lock. ARGV: owner, value or '', value TTL (ms),
/// channel, message. Returns 1 if the lock was still ours.
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

static LOOKUP: LazyLock<Script> = LazyLock::new(|| Script::from_lua(format!("{ENTRY_LUA}{LOOKUP_LUA}")));
static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::from_lua(RELEASE_LUA));
static COMPLETE: LazyLock<Script> = LazyLock::new(|| Script::from_lua(COMPLETE_LUA));

/// Where a flight may look for the key.
#[derive(Debug, Clone, Copy)]
pub enum Redis<'a> {
    /// No Redis is configured.
    None,
    /// Redis cannot be used for this flight (it failed, or the purge epochs are not known).
    Down,
    Up(&'a ClusterFlights),
}

/// This replica's side of the cluster flights: the store, and the followers waiting here.
#[derive(Debug, Clone)]
pub struct ClusterFlights {
    store: RedisStore,
    waiters: Arc<Waiters>,
    settings: FlightSettings,
    /// The freshness rules of the upstream these flights are for.
    freshness: Freshness,
    metrics: Arc<Metrics>,
}

impl ClusterFlights {
    /// Starts routing the announcements the store receives to this replica's followers.
    pub fn new(
        store: RedisStore,
        settings: FlightSettings,
        freshness: Freshness,
        metrics: Arc<Metrics>,
    ) -> ClusterFlights {
        let waiters = Arc::new(Waiters::default());
        tokio::spawn(waiters::route(store.messages(), Arc::downgrade(&waiters)));
        ClusterFlights { store, waiters, settings, freshness, metrics }
    }

    /// Begins a flight for `key` (sealed with the client's `secret`): registers for its
    /// announcements now, before the first look, so that none published after it is missed.
    pub fn begin<'a>(&'a self, key: CacheKey, secret: &'a [u8]) -> ClusterFlight<'a> {
        let waiter = self.waiters.register(key);
        ClusterFlight { flights: self, key, secret, owner: LockOwner::random(), waiter, clock: None }
    }
}

/// Runs one flight to its end: looks, follows, takes over, and leads through `call` (the
/// upstream call; the plan makes it at most once), each step as `plan` decides.
pub async fn fly<F: Future<Output = Outcome>>(
    redis: Redis<'_>,
    key: CacheKey,
    secret: &[u8],
    mut plan: Plan,
    mut call: impl FnMut() -> F,
) -> Served {
    let (mut flight, mut step) = match redis {
        Redis::None => (None, plan.next(Seen::NoRedis, Instant::now())),
        Redis::Down => (None, plan.next(Seen::RedisDown, Instant::now())),
        Redis::Up(flights) => (Some(flights.begin(key, secret)), Step::LookUp),
    };
    loop {
        step = match step {
            Step::Serve(served) => return served,
            Step::LookUp => match flight.as_mut() {
                Some(flight) => flight.look(&mut plan).await,
                None => plan.next(Seen::RedisDown, Instant::now()),
            },
            Step::Follow(wait) => {
                let announced = match flight.as_mut() {
                    Some(flight) => flight.wait(wait).await,
                    None => None,
                };
                plan.next(Seen::Announced(announced), Instant::now())
            }
            Step::Call(permit) => {
                let outcome = call().await;
                let step = plan.next(Seen::Called(outcome), Instant::now());
                if let (Some(permit), Step::Serve(served)) = (permit, &step) {
                    permit.complete(&served.fetched).await;
                }
                step
            }
            Step::PutBack(permit, served) => {
                permit.complete(&served.fetched).await;
                return served;
            }
        };
    }
}

/// One replica's flight for one key. A follower waits on it for the holder's announcement.
pub struct ClusterFlight<'a> {
    flights: &'a ClusterFlights,
    key: CacheKey,
    secret: &'a [u8],
    /// Who this flight is, should it take the lock.
    owner: LockOwner,
    waiter: Waiter,
    /// Redis's clock from the lookup that found the key locked: how announcements are read.
    clock: Option<RedisClock>,
}

/// What [`ClusterFlight::lock`] found.
#[derive(Debug)]
pub enum Locked<'a> {
    /// A fresh entry: its token, or `None` if it does not open.
    Fresh(Option<Arc<CachedToken>>),
    /// No fresh entry, and this flight holds the lock now; `stale` is the entry Redis still
    /// had, if it may still be served.
    Write { permit: WritePermit<'a>, stale: Option<Arc<CachedToken>> },
    /// No fresh entry; another flight holds the lock for `lock_ttl` more.
    Read { lock_ttl: Duration, stale: Option<Arc<CachedToken>> },
}

impl<'a> ClusterFlight<'a> {
    /// Reads the entry, or takes the lock if there is no fresh one, in one round trip (see
    /// [`LOOKUP_LUA`]). An entry is fresh while its TTL exceeds `fresh_ttl`; `None` ignores
    /// entries (a refresh, or after an entry that would not open).
    pub async fn lock(&mut self, fresh_ttl: Option<Duration>) -> Result<Locked<'a>, StoreError> {
        let store = &self.flights.store;
        let keys = vec![RedisStore::entry_key(&self.key), RedisStore::lock_key(&self.key)];
        let fresh_ms = fresh_ttl.map_or(i64::MAX, millis);
        let args: Vec<Value> = vec![
            self.owner.0.as_str().into(),
            millis(self.flights.settings.lock_ttl).into(),
            fresh_ms.into(),
            (MAX_ENTRY_BYTES as i64).into(),
        ];
        let reply: Vec<Value> = store.eval(&LOOKUP, keys, args).await?;
        let (lookup, unusable) = parse_lookup(reply, Instant::now()).ok_or(StoreError::UnexpectedReply)?;
        if unusable {
            store.usable(Found::Unusable);
        }
        let (sealing, freshness) = (store.sealing(), &self.flights.freshness);
        let stale = |value| sealing.open_servable(&self.key, self.secret, value, freshness);
        Ok(match lookup {
            Lookup::Fresh(value) => Locked::Fresh(sealing.open_entry(0, &self.key, self.secret, &value, freshness)),
            Lookup::Acquired { stale: value, clock } => Locked::Write {
                stale: stale(value),
                permit: WritePermit {
                    flights: self.flights,
                    key: self.key,
                    secret: self.secret,
                    owner: self.owner.clone(),
                    clock,
                    completed: false,
                },
            },
            Lookup::Held { lock_ttl, stale: value, clock } => {
                self.clock = Some(clock);
                Locked::Read { lock_ttl, stale: stale(value) }
            }
        })
    }

    /// One lookup, seen by `plan`, counted in the metrics.
    async fn look(&mut self, plan: &mut Plan) -> Step<WritePermit<'a>> {
        let metrics = &self.flights.metrics;
        let following = plan.is_following();
        let seen = match self.lock(plan.fresh_ttl()).await {
            Err(_) => Seen::RedisDown,
            Ok(Locked::Fresh(token)) => Seen::Fresh(token),
            Ok(Locked::Write { permit, stale }) => {
                metrics.lock_acquired();
                if following {
                    metrics.lock_takeover();
                }
                Seen::Acquired { permit, stale }
            }
            Ok(Locked::Read { lock_ttl, stale }) => Seen::Held { lock_ttl, stale },
        };
        let found_entry = matches!(seen, Seen::Fresh(_));
        let step = plan.next(seen, Instant::now());
        if found_entry && following && matches!(step, Step::Serve(_)) {
            // The holder stored its token but its announcement never reached us.
            metrics.notification_miss();
        }
        step
    }

    /// The holder's announcement, if one arrives within `wait`. Announcements that are not
    /// for us, and tokens announced again after they expired, are skipped.
    pub async fn wait(&mut self, wait: Duration) -> Option<Outcome> {
        let clock = self.clock?;
        let sealing = self.flights.store.sealing();
        let deadline = Instant::now() + wait;
        while let Some(message) = self.waiter.next(deadline.saturating_duration_since(Instant::now())).await {
            match sealing.open_announcement(&self.key, self.secret, &message, &clock, &self.flights.freshness) {
                Announcement::Foreign | Announcement::Expired => continue,
                Announcement::Malformed => return None,
                Announcement::Outcome(outcome) => return Some(outcome),
            }
        }
        None
    }
}

/// The key's lock, held by this flight. Consumed by [`WritePermit::complete`]; dropped
/// without completing, it releases the lock (best effort: else it expires after its TTL).
pub struct WritePermit<'a> {
    flights: &'a ClusterFlights,
    key: CacheKey,
    secret: &'a [u8],
    owner: LockOwner,
    /// Redis's clock as the lock script read it: where the entry this flight writes is placed
    /// in time (see [`crate::redis_clock`]).
    clock: RedisClock,
    completed: bool,
}

// Not derived: both hold the client's secret.
impl std::fmt::Debug for ClusterFlight<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterFlight").field("key", &self.key).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for WritePermit<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WritePermit")
            .field("key", &self.key)
            .field("completed", &self.completed)
            .finish_non_exhaustive()
    }
}

impl WritePermit<'_> {
    /// Ends the flight: stores a token from the upstream (or put back from L1; never a stale
    /// one or a peer's), releases the lock and announces the outcome, in one step.
    pub async fn complete(mut self, fetched: &Fetched) {
        self.completed = true;
        let (store, freshness) = (&self.flights.store, &self.flights.freshness);
        let sealing = store.sealing();
        let entry = match (fetched.source, &fetched.outcome) {
            (Source::Upstream | Source::Cache, Outcome::Token(token)) => {
                sealing.seal_entry(&self.key, self.secret, token, &self.clock, freshness)
            }
            _ => None,
        };
        let message = sealing.seal_announcement(&self.key, self.secret, &fetched.outcome, &self.clock);
        let (value, ttl) = entry.unwrap_or_default();
        let mut announcement = Vec::with_capacity(32 + message.len());
        announcement.extend_from_slice(self.key.as_bytes());
        announcement.extend_from_slice(&message);
        let args: Vec<Value> = vec![
            self.owner.0.as_str().into(),
            Bytes::from(value).into(),
            millis(ttl).max(1).into(),
            CHANNEL.into(),
            Bytes::from(announcement).into(),
        ];
        let keys = vec![RedisStore::entry_key(&self.key), RedisStore::lock_key(&self.key)];
        if let Ok(0) = store.eval::<i64>(&COMPLETE, keys, args).await {
            tracing::info!(key = ?self.key, "the lock expired before the flight ended; another flight may have run");
        }
    }
}

impl Drop for WritePermit<'_> {
    fn drop(&mut self) {
        if self.completed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (store, key, owner) = (self.flights.store.clone(), self.key, self.owner.clone());
        runtime.spawn(async move {
            let released = store.eval::<i64>(&RELEASE, vec![RedisStore::lock_key(&key)], vec![owner.0.into()]).await;
            tracing::debug!(?key, ?released, "a flight ended without completing; its lock released");
        });
    }
}

/// The random identity of one lock holder.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LockOwner(String);

impl LockOwner {
    fn random() -> LockOwner {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).expect("the OS random source is available");
        LockOwner(hex::encode(bytes))
    }
}

/// What [`LOOKUP_LUA`] found, still sealed.
#[derive(Debug)]
enum Lookup {
    Fresh(StoredValue),
    Acquired { stale: Option<StoredValue>, clock: RedisClock },
    Held { lock_ttl: Duration, stale: Option<StoredValue>, clock: RedisClock },
}

/// [`LOOKUP_LUA`]'s reply, which arrived at `arrived`, and whether it found an unusable value.
fn parse_lookup(reply: Vec<Value>, arrived: Instant) -> Option<(Lookup, bool)> {
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
