//! The token service: answers a normalized request from the caches or the upstream.
//!
//! Lookup order for a cacheable request (docs/architecture.md):
//!
//! 1. **L1**, the in-process cache. A fresh token is a HIT; past its refresh point the hit
//!    also starts one background refresh, so hot keys never wait at expiry.
//! 2. **In-process single flight**: one fetch per key per replica, run as its own task so a
//!    caller that disconnects cannot cancel what its followers wait for.
//! 3. **Redis**: one script reads the entry or, if there is no fresh one, takes the key's lock.
//! 4. The lock holder (**leader**) calls the upstream, then one script stores the sealed entry,
//!    releases its own lock and announces the outcome. Everyone else (**followers**, on any
//!    replica) waits for that announcement, looks again periodically in case it was lost
//!    (pub/sub delivers at most once), and takes the lock over if it expires.
//!
//! The lock only saves work: when Redis fails, the fetch goes straight to the upstream
//! (at most one call per replica per key, thanks to step 2). When the upstream fails and an
//! older token is still servable, that token is served (STALE). Only a well-formed 200 is
//! cached. This module knows nothing of axum: it takes a [`TokenRequest`], returns a [`Reply`].

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use http::header::HeaderValue;
use secrecy::ExposeSecret;
use shared::basic;
use shared::canonical::{AuthMethod, CanonicalRequest, PurgeEpochs};
use shared::form;
use shared::keys::{CacheKey, Keys};

use crate::entry::{CachedToken, Freshness};
use crate::flight_message::{self, FlightMessage};
use crate::l1::{L1, L1Hasher, L1Key};
use crate::metrics::Metrics;
use crate::normalize::{PassThrough, TokenRequest};
use crate::purge::{self, Epochs, Look, PurgeError, PurgeTarget};
use crate::quota::{self, Quota, Refused};
use crate::redis_clock::{self, RedisClock};
use crate::response::{Answer, CacheStatus, ProxyError, Reply, UpstreamFailure};
use crate::single_flight::{Flights, Role, SharedReads};
use crate::store::{LockOwner, Lookup, RedisStore, StoredValue, Waiter};
use crate::upstream::{Upstream, UpstreamError, UpstreamResponse};

/// Every how many purge looks (about one a second) the whole purge hash is read.
const WHOLE_PURGE_LOOK_EVERY: u64 = 10;
/// How often a follower looks at Redis itself, in case the announcement was lost.
const BACKSTOP_INTERVAL: Duration = Duration::from_millis(200);
/// A refresh accepts an entry in Redis as the successor of its token when the entry outlives
/// that token by at least this much (the token's own entry differs by milliseconds).
const SUCCESSOR_MARGIN: Duration = Duration::from_secs(1);

/// Where a fetch's answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// An entry in Redis (or the token a refresh found still current).
    Cache,
    /// This replica called the upstream.
    Upstream,
    /// Another replica called the upstream and announced the outcome.
    Peer,
    /// The upstream failed; an older, still servable token stands in.
    Stale,
}

/// What one fetch produced; shared by every caller of the flight on this replica.
#[derive(Debug, Clone)]
struct Fetched {
    source: Source,
    outcome: Outcome,
}

#[derive(Debug, Clone)]
enum Outcome {
    Token(Arc<CachedToken>),
    /// The upstream's answer, relayed as is (never cached).
    Relayed(UpstreamResponse),
    Failed(UpstreamFailure),
    /// The quota's guards refused the call: no upstream call was made.
    Refused(Refused),
}

impl Outcome {
    /// Failures after which a still-servable older token is served instead (stale-if-error).
    fn is_upstream_trouble(&self) -> bool {
        match self {
            Outcome::Failed(_) | Outcome::Refused(_) => true,
            Outcome::Relayed(response) => response.status == StatusCode::TOO_MANY_REQUESTS,
            Outcome::Token(_) => false,
        }
    }
}

/// Why a fetch runs.
#[derive(Debug, Clone, Copy)]
enum Purpose {
    /// A request from `source` found no fresh token.
    Miss { source: IpAddr },
    /// A hit passed its refresh point: fetch a successor unless someone else already is.
    Refresh,
}

/// What L1 can do for a request.
#[derive(Debug)]
enum L1Lookup {
    Hit(Reply),
    Miss(L1Miss),
}

/// A request L1 could not answer, with what L1 had for it.
#[derive(Debug)]
struct L1Miss {
    keys: EntryKeys,
    epochs: PurgeEpochs,
    request: CanonicalRequest,
    /// A servable token L1 holds for the key (due for revalidation, or no longer fresh).
    local: Option<Arc<CachedToken>>,
}

/// What the hit path's Redis read found.
#[derive(Debug, Clone)]
enum Read {
    Hit(Arc<CachedToken>),
    Miss,
    /// Redis did not answer (or the breaker is open).
    Unavailable,
}

/// Whether a fetch may still use Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Redis {
    Use,
    Skip,
}

/// Timing of the cluster-wide single flight.
#[derive(Debug, Clone, Copy)]
pub struct FlightSettings {
    /// How long a leader's lock lasts before followers may take it over.
    pub lock_ttl: Duration,
    /// The upstream's own deadline; bounds how long a follower waits in all.
    pub upstream_timeout: Duration,
}

/// The parts the service is built from.
#[derive(Debug)]
pub struct Parts {
    pub upstream: Upstream,
    pub store: Option<RedisStore>,
    /// Keys of the current root secret: every entry is named and sealed with them.
    pub keys: Keys,
    /// Keys of earlier root secrets (`TOKEN_PROXY_PREVIOUS_SECRETS`): their entries are still
    /// read, so a rotation costs no upstream calls, but never written.
    pub previous_keys: Vec<Keys>,
    pub freshness: Freshness,
    pub flight: FlightSettings,
    pub l1: L1,
    pub quota: Quota,
    pub metrics: Arc<Metrics>,
}

/// Answers token requests. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TokenService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    parts: Parts,
    /// The upstream URL as part of every cache key: entries never cross token endpoints.
    upstream_id: String,
    l1_hasher: L1Hasher,
    /// Purge epochs, part of every key.
    epochs: Epochs,
    /// Redis reads under way: identical concurrent requests share one.
    reads: SharedReads<Read>,
    flights: Arc<Flights<Fetched>>,
}

/// The lock of a key this replica's flight holds, and Redis's clock as the lock script read it
/// (where the entry the flight writes is placed in time).
#[derive(Debug)]
struct HeldLock {
    owner: LockOwner,
    clock: RedisClock,
}

/// The two names of one entry: in L1 (cheap, process-local) and in Redis (keyed HMAC).
#[derive(Debug, Clone, Copy)]
struct EntryKeys {
    cache: CacheKey,
    l1: L1Key,
}

impl TokenService {
    pub fn new(parts: Parts) -> TokenService {
        let upstream_id = parts.upstream.url().as_str().to_owned();
        let inner = Arc::new(Inner {
            parts,
            upstream_id,
            l1_hasher: L1Hasher::default(),
            epochs: Epochs::default(),
            reads: SharedReads::default(),
            flights: Arc::default(),
        });
        if inner.parts.store.is_some() {
            tokio::spawn(follow_purges(Arc::downgrade(&inner)));
        }
        TokenService { inner }
    }

    /// Drops the cached tokens `target` covers, on every replica (L1 included): bumps its purge
    /// epoch in Redis and announces it; without Redis, here only. Returns the new epoch.
    pub async fn purge(&self, target: &PurgeTarget) -> Result<u64, PurgeError> {
        let inner = &self.inner;
        let field = target.field(&inner.parts.keys.hasher);
        let Some(store) = &inner.parts.store else { return Ok(inner.epochs.bump_local(&field)) };
        let epoch =
            store.purge(&field, inner.purge_retention(), purge::MAX_PURGED).await?.ok_or(PurgeError::TooMany)?;
        // Apply it here at once rather than on the announcement.
        purge::sync(&inner.epochs, store, inner.purge_retention(), Look::IfChanged).await?;
        tracing::info!(epoch, "purged");
        Ok(epoch)
    }

    /// Whether this replica knows the purge epochs (read once from Redis), or needs none.
    pub fn purges_synced(&self) -> bool {
        self.inner.parts.store.is_none() || self.inner.epochs.is_synced()
    }

    /// The Redis store, if one is configured.
    pub fn store(&self) -> Option<&RedisStore> {
        self.inner.parts.store.as_ref()
    }

    /// Answers one request.
    ///
    /// An L1 hit is answered without awaiting anything. Everything else runs in a boxed future:
    /// the slow path's state (Redis calls, flights) is kilobytes, and keeping it out of this
    /// future keeps the hit path from copying it around.
    /// `source` is the caller's address, for failed-authentication throttling.
    pub async fn handle(&self, request: TokenRequest, source: IpAddr) -> Reply {
        match request {
            TokenRequest::Cacheable(request) => match self.l1_lookup(request) {
                L1Lookup::Hit(reply) => reply,
                L1Lookup::Miss(miss) => Box::pin(self.cacheable(miss, source)).await,
            },
            TokenRequest::PassThrough(request) => Box::pin(self.pass_through(request, source)).await,
        }
    }

    /// Answers from L1 when it holds a current, fresh token.
    fn l1_lookup(&self, request: CanonicalRequest) -> L1Lookup {
        let inner = &self.inner;
        let freshness = &inner.parts.freshness;
        let hasher = &inner.parts.keys.hasher;
        let epochs = inner.epochs.for_request(hasher, &request);
        let l1 = inner.l1_hasher.key(&inner.upstream_id, &request, epochs);
        let now = Instant::now();
        let found = inner.parts.l1.get(&l1, now);
        if let Some(found) = found.as_ref().filter(|f| f.current && f.token.is_fresh(now, freshness)) {
            if found.token.claim_refresh(now) {
                let keys = EntryKeys { cache: hasher.cache_key_with(&inner.upstream_id, &request, epochs), l1 };
                inner.start_refresh(keys, request, Arc::clone(&found.token));
            }
            return L1Lookup::Hit(Reply {
                cache: Some(CacheStatus::Hit),
                answer: Ok(Answer::Token(found.token.render(now))),
            });
        }
        // Not current (to be revalidated) or no longer fresh: still useful if Redis or the
        // upstream cannot answer.
        let local = found.map(|f| f.token).filter(|t| t.is_servable(now, freshness));
        let keys = EntryKeys { cache: hasher.cache_key_with(&inner.upstream_id, &request, epochs), l1 };
        L1Lookup::Miss(L1Miss { keys, epochs, request, local })
    }

    async fn cacheable(&self, miss: L1Miss, source: IpAddr) -> Reply {
        let inner = &self.inner;
        let L1Miss { keys, epochs, request, local } = miss;

        // The L2 hit path: one read, inline and shared with identical requests arriving
        // meanwhile, no task. Only a miss pays for the flight machinery.
        let read = inner.reads.read(keys.cache, || inner.read_fresh(keys, epochs, &request)).await;
        let redis = match read {
            Read::Hit(token) => {
                if token.claim_refresh(Instant::now()) {
                    inner.start_refresh(keys, request.clone(), Arc::clone(&token));
                }
                let answer = Ok(Answer::Token(token.render(Instant::now())));
                return Reply { cache: Some(CacheStatus::Hit), answer };
            }
            Read::Miss => Redis::Use,
            // Already paid one Redis deadline: the flight goes on without Redis.
            Read::Unavailable => Redis::Skip,
        };

        let fetcher = Arc::clone(inner);
        let refresh_request = request.clone();
        let flight = inner
            .flights
            .join(keys.cache, move || fetcher.fetch(keys, request, Purpose::Miss { source }, redis, local));
        let role = flight.role;
        if role == Role::Follower {
            inner.parts.metrics.coalesced_waiter();
        }
        let Some(fetched) = flight.outcome().await else {
            return Reply { cache: Some(CacheStatus::Miss), answer: Err(ProxyError::Internal) };
        };
        let now = Instant::now();
        let cache = match (role, fetched.source) {
            (Role::Follower, _) | (_, Source::Peer) => CacheStatus::Coalesced,
            (_, Source::Cache) => CacheStatus::Hit,
            (_, Source::Upstream) => CacheStatus::Miss,
            (_, Source::Stale) => CacheStatus::Stale,
        };
        let answer = match fetched.outcome {
            Outcome::Token(token) => {
                if fetched.source == Source::Cache && token.claim_refresh(now) {
                    inner.start_refresh(keys, refresh_request, Arc::clone(&token));
                }
                Ok(Answer::Token(token.render(now)))
            }
            Outcome::Relayed(response) => Ok(Answer::Relayed(response)),
            Outcome::Failed(failure) => Err(ProxyError::Upstream(failure)),
            // Nothing went upstream, so X-Cache has nothing true to say (not even MISS).
            Outcome::Refused(refused) => return Reply { cache: None, answer: Err(ProxyError::Refused(refused)) },
        };
        Reply { cache: Some(cache), answer }
    }

    /// Forwards a request of another grant, uncached. When it presents a client secret, the
    /// upstream's verdict on that secret counts against the failed-authentication throttle,
    /// as on the cacheable path: `invalid_client` or not would otherwise tell right secrets
    /// from wrong ones, unthrottled. Runs as its own task, like a fetch, so a caller that
    /// disconnects cannot leave its attempt counted as in flight.
    async fn pass_through(&self, request: PassThrough, source: IpAddr) -> Reply {
        let inner = Arc::clone(&self.inner);
        let task = tokio::spawn(async move {
            let (quota, store, metrics) = (&inner.parts.quota, inner.parts.store.as_ref(), &inner.parts.metrics);
            let attempt = match &request.client_id {
                Some(client_id) => {
                    match quota.attempt(store, &inner.parts.keys.hasher, client_id, source, metrics).await {
                        Ok(attempt) => Some(attempt),
                        Err(refused) => return Outcome::Refused(refused),
                    }
                }
                None => None,
            };
            let called = inner.exchange(request.form_body, request.authorization).await;
            if let Some(attempt) = attempt {
                let failed = matches!(&called, Ok(Ok(r)) if quota::is_failed_authentication(r.status, &r.body));
                quota.settle(store, attempt, failed, metrics).await;
            }
            match called {
                Ok(result) => classify(result),
                Err(refused) => Outcome::Refused(refused),
            }
        });
        let answer = match task.await {
            Ok(Outcome::Relayed(response)) => Ok(Answer::Relayed(response)),
            Ok(Outcome::Failed(failure)) => Err(ProxyError::Upstream(failure)),
            Ok(Outcome::Refused(refused)) => return Reply { cache: None, answer: Err(ProxyError::Refused(refused)) },
            Ok(Outcome::Token(_)) => unreachable!("classify never builds a token"),
            Err(_) => Err(ProxyError::Internal),
        };
        Reply { cache: Some(CacheStatus::Bypass), answer }
    }
}

/// Keeps this replica's purge epochs in step with Redis (see [`purge::sync`]): at once, on every
/// announcement, and once a second in case one was lost or Redis lost its state. Ends with the
/// service.
async fn follow_purges(inner: std::sync::Weak<Inner>) {
    for round in 0u64.. {
        let Some(store) = inner.upgrade().and_then(|i| i.parts.store.clone()) else { return };
        // Registered before the look, so an announcement made meanwhile is not missed.
        let announced = store.purge_announced();
        let look = if round % WHOLE_PURGE_LOOK_EVERY == 0 { Look::Whole } else { Look::IfChanged };
        match inner.upgrade() {
            Some(inner) => {
                let _ = purge::sync(&inner.epochs, &store, inner.purge_retention(), look).await;
            }
            None => return,
        }
        tokio::select! {
            () = announced => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Sorts an upstream result that is not a cacheable token into relayed answers and failures.
fn classify(result: Result<UpstreamResponse, UpstreamError>) -> Outcome {
    match result {
        Err(error) => Outcome::Failed(UpstreamFailure::Unreachable(error)),
        Ok(response) if response.status.is_success() || response.status.is_client_error() => Outcome::Relayed(response),
        Ok(response) => Outcome::Failed(UpstreamFailure::BadStatus(response)),
    }
}

impl Inner {
    /// How long a client's purge epoch must be kept: entries keyed under the epoch before it
    /// live at most this long (see [`crate::purge`]).
    fn purge_retention(&self) -> Duration {
        self.parts.freshness.max_lifetime
    }

    /// Starts one background refresh of `key`, single-flighted on this replica and, through
    /// the lock, across the cluster.
    fn start_refresh(self: &Arc<Self>, keys: EntryKeys, request: CanonicalRequest, current: Arc<CachedToken>) {
        let fetcher = Arc::clone(self);
        // The flight runs on its own; nobody waits for it here.
        drop(
            self.flights
                .join(keys.cache, move || fetcher.fetch(keys, request, Purpose::Refresh, Redis::Use, Some(current))),
        );
    }

    /// A fresh entry read straight from Redis (and put in L1), if there is one. Redis faults
    /// are misses here: the flight that follows copes with them.
    ///
    /// After a key rotation, an entry the current keys do not find is looked for under each
    /// previous secret's name. Such a token is served until its refresh point; the refresh
    /// stores its successor under the current keys.
    async fn read_fresh(&self, keys: EntryKeys, epochs: PurgeEpochs, request: &CanonicalRequest) -> Read {
        let Some(store) = &self.parts.store else { return Read::Miss };
        if !self.epochs.is_synced() {
            // Keys built without the purge epochs could find a purged token: go on without
            // Redis until they are known (the first read happens at start).
            return Read::Unavailable;
        }
        let secret = request.client_secret.expose_secret().as_bytes();
        let current = (&self.parts.keys, keys.cache);
        let previous =
            self.parts.previous_keys.iter().map(|k| (k, k.hasher.cache_key_with(&self.upstream_id, request, epochs)));
        for (ring_keys, key) in std::iter::once(current).chain(previous) {
            let stored = match store.read(&key).await {
                Ok(Some(stored)) => stored,
                Ok(None) => continue,
                Err(_) => return Read::Unavailable,
            };
            return match self.open_with(ring_keys, &key, secret, &stored) {
                Some(token) if token.is_fresh(Instant::now(), &self.parts.freshness) => {
                    self.remember_locally(keys.l1, &token);
                    Read::Hit(token)
                }
                _ => Read::Miss,
            };
        }
        Read::Miss
    }

    /// One fetch for `key`, run as its own task, within the failed-authentication guard.
    ///
    /// Credentials are proven when this replica holds a token for exactly them (a refresh, or
    /// an L1 entry due for revalidation): only unproven ones are admitted by [`Quota::attempt`],
    /// before any lock is taken (waiting there never holds a key's lock), and settled by what
    /// the fetch brought: a failed authentication only if this replica's own call got one.
    async fn fetch(
        self: Arc<Self>,
        keys: EntryKeys,
        request: CanonicalRequest,
        purpose: Purpose,
        redis: Redis,
        local: Option<Arc<CachedToken>>,
    ) -> Fetched {
        let (quota, metrics) = (&self.parts.quota, &self.parts.metrics);
        let store = self.parts.store.as_ref().filter(|_| redis == Redis::Use);
        let unproven_from = match purpose {
            Purpose::Miss { source } if local.is_none() => Some(source),
            _ => None,
        };
        let attempt = match unproven_from {
            Some(source) => {
                let hasher = &self.parts.keys.hasher;
                match quota.attempt(store, hasher, &request.client_id, source, metrics).await {
                    Ok(attempt) => Some(attempt),
                    Err(refused) => return Fetched { source: Source::Upstream, outcome: Outcome::Refused(refused) },
                }
            }
            None => None,
        };
        let fetched = Arc::clone(&self).fetch_admitted(keys, request, purpose, redis, local).await;
        if let Some(attempt) = attempt {
            let failed = fetched.source == Source::Upstream
                && matches!(&fetched.outcome, Outcome::Relayed(r) if quota::is_failed_authentication(r.status, &r.body));
            quota.settle(store, attempt, failed, metrics).await;
        }
        fetched
    }

    /// One fetch for `key`, once admitted: Redis (lead or follow), else the upstream. `local` is this
    /// replica's own token for the key, if it has one that is still servable: the token being
    /// refreshed, or an L1 entry due for revalidation.
    async fn fetch_admitted(
        self: Arc<Self>,
        keys: EntryKeys,
        request: CanonicalRequest,
        purpose: Purpose,
        redis: Redis,
        local: Option<Arc<CachedToken>>,
    ) -> Fetched {
        let key = keys.cache;
        let secret = request.client_secret.expose_secret().as_bytes();
        let freshness = &self.parts.freshness;
        let now = Instant::now();
        let local_fresh = local.as_ref().filter(|t| t.is_fresh(now, freshness)).cloned();
        let mut stale = local;
        let store = match (&self.parts.store, redis) {
            // Keys built before the purge epochs are known could find a purged token.
            (Some(_), Redis::Use) if !self.epochs.is_synced() => {
                return self.degraded(keys, &request, purpose, local_fresh, stale).await;
            }
            (Some(store), Redis::Use) => store,
            (None, _) => return self.lead(keys, &request, None, purpose, stale).await,
            (Some(_), Redis::Skip) => return self.degraded(keys, &request, purpose, local_fresh, stale).await,
        };
        let settings = self.parts.flight;
        let owner = LockOwner::random();
        // Register before the first look, so no announcement published after it is missed.
        let mut waiter = store.subscribe(key);
        // Entries with more than this TTL left in Redis may be fresh: entries are kept until
        // their token has `min_token_ttl` left (`CachedToken::keep_for`). Only a hint for the
        // lookup script: the sealed expiry decides (see `redis_clock`).
        // A refresh wants a successor: only an entry that outlives the token being refreshed.
        let mut fresh_ttl = match (&purpose, &local_fresh) {
            (Purpose::Refresh, Some(current)) => {
                Some(current.keep_for(now, freshness).unwrap_or_default() + SUCCESSOR_MARGIN)
            }
            (Purpose::Refresh, None) => None,
            (Purpose::Miss { .. }, _) => Some(freshness.fresh_cutoff().saturating_sub(freshness.min_token_ttl)),
        };
        let mut seen_held = false;
        let give_up_at = now + settings.lock_ttl + settings.upstream_timeout;
        loop {
            let lookup = match store.lookup(&key, &owner, settings.lock_ttl, fresh_ttl).await {
                Ok(lookup) => lookup,
                Err(_) => return self.degraded(keys, &request, purpose, local_fresh, stale).await,
            };
            match lookup {
                Lookup::Fresh(value) => match self.open_entry(&key, secret, &value) {
                    Some(token) if token.is_fresh(Instant::now(), freshness) => {
                        if seen_held {
                            self.parts.metrics.notification_miss();
                        }
                        self.remember_locally(keys.l1, &token);
                        let source = if seen_held { Source::Peer } else { Source::Cache };
                        return Fetched { source, outcome: Outcome::Token(token) };
                    }
                    // Unreadable (tampered, foreign) or not fresh after all: replace it.
                    _ => fresh_ttl = None,
                },
                Lookup::Acquired { stale: old, clock } => {
                    let lock = HeldLock { owner, clock };
                    stale = stale.or_else(|| self.servable(&key, secret, old));
                    self.parts.metrics.lock_acquired();
                    if seen_held {
                        self.parts.metrics.lock_takeover();
                    }
                    if let (Purpose::Miss { .. }, Some(token)) = (&purpose, local_fresh) {
                        // Redis lost the entry (e.g. it restarted empty) but this replica still
                        // holds a fresh token: put it back instead of calling the upstream.
                        let fetched = Fetched { source: Source::Cache, outcome: Outcome::Token(token) };
                        self.complete(store, key, secret, &lock, &fetched).await;
                        return fetched;
                    }
                    return self.lead(keys, &request, Some(lock), purpose, stale).await;
                }
                Lookup::Held { lock_ttl, stale: old, clock } => {
                    stale = stale.or_else(|| self.servable(&key, secret, old));
                    if let Purpose::Refresh = purpose {
                        // Someone else is refreshing this key already.
                        return match stale {
                            Some(token) => Fetched { source: Source::Cache, outcome: Outcome::Token(token) },
                            None => self.lead(keys, &request, None, purpose, None).await,
                        };
                    }
                    seen_held = true;
                    if Instant::now() >= give_up_at {
                        tracing::warn!(?key, "gave up waiting for the lock holder; calling the upstream directly");
                        return self.lead(keys, &request, None, purpose, stale).await;
                    }
                    if let Some(fetched) =
                        self.follow(keys, secret, &mut waiter, lock_ttl.min(BACKSTOP_INTERVAL), &clock).await
                    {
                        // The leader's upstream failed or was refused: this replica's own
                        // still-valid token stands in, as it would for a leader (stale-if-error).
                        if fetched.outcome.is_upstream_trouble() {
                            if let Some(token) = stale.filter(|t| t.is_servable(Instant::now(), freshness)) {
                                return Fetched { source: Source::Stale, outcome: Outcome::Token(token) };
                            }
                        }
                        return fetched;
                    }
                }
            }
        }
    }

    /// Redis is failing, so this replica goes on its own: from its own fresh token if it has
    /// one, else to the upstream (at most one call per key per replica: the in-process flight).
    async fn degraded(
        &self,
        keys: EntryKeys,
        request: &CanonicalRequest,
        purpose: Purpose,
        local_fresh: Option<Arc<CachedToken>>,
        stale: Option<Arc<CachedToken>>,
    ) -> Fetched {
        match local_fresh {
            Some(token) => {
                self.remember_locally(keys.l1, &token);
                Fetched { source: Source::Cache, outcome: Outcome::Token(token) }
            }
            None => self.lead(keys, request, None, purpose, stale).await,
        }
    }

    /// Waits up to `wait` for the leader's announcement; `clock` is from the lookup that found
    /// the key locked.
    async fn follow(
        &self,
        keys: EntryKeys,
        secret: &[u8],
        waiter: &mut Waiter,
        wait: Duration,
        clock: &RedisClock,
    ) -> Option<Fetched> {
        let key = &keys.cache;
        let deadline = Instant::now() + wait;
        while let Some(message) = waiter.next(deadline.saturating_duration_since(Instant::now())).await {
            let Ok(plain) = self.parts.keys.sealer.open(key, secret, &message) else { continue };
            let now = Instant::now();
            let outcome = match flight_message::decode(&plain, now, clock, &self.parts.freshness)? {
                // An announcement published again after its token expired: not an answer.
                FlightMessage::Token(token) if !token.is_servable(now, &self.parts.freshness) => continue,
                FlightMessage::Token(token) => {
                    let token = Arc::new(token);
                    self.remember_locally(keys.l1, &token);
                    Outcome::Token(token)
                }
                FlightMessage::Relayed(response) => Outcome::Relayed(response),
                FlightMessage::Failed(failure) => Outcome::Failed(failure),
                FlightMessage::Refused(refused) => Outcome::Refused(refused),
            };
            return Some(Fetched { source: Source::Peer, outcome });
        }
        None
    }

    /// Calls the upstream. With `lock`, this replica holds the key's lock: it then stores the
    /// entry, releases the lock and announces the outcome. Without, it only fills L1.
    async fn lead(
        &self,
        keys: EntryKeys,
        request: &CanonicalRequest,
        lock: Option<HeldLock>,
        purpose: Purpose,
        stale: Option<Arc<CachedToken>>,
    ) -> Fetched {
        let key = keys.cache;
        if let Purpose::Refresh = purpose {
            self.parts.metrics.refresh();
        }
        let secret = request.client_secret.expose_secret().as_bytes();
        let sent_at = Instant::now();
        let (form_body, authorization) = upstream_request(request);
        let outcome = match self.exchange(form_body, authorization).await {
            Ok(result) => self.outcome_of(result, sent_at),
            Err(refused) => Outcome::Refused(refused),
        };
        let mut fetched = Fetched { source: Source::Upstream, outcome };
        let now = Instant::now();
        if fetched.outcome.is_upstream_trouble() {
            if let Some(token) = stale.filter(|t| t.is_servable(now, &self.parts.freshness)) {
                tracing::info!(?key, "upstream failed; serving a still-valid token (stale-if-error)");
                fetched = Fetched { source: Source::Stale, outcome: Outcome::Token(token) };
            }
        }
        if let (Source::Upstream, Outcome::Token(token)) = (&fetched.source, &fetched.outcome) {
            self.remember_locally(keys.l1, token);
        }
        if let (Some(store), Some(lock)) = (&self.parts.store, lock) {
            self.complete(store, key, secret, &lock, &fetched).await;
        }
        fetched
    }

    /// Ends a flight this replica led: stores a new token, releases the lock, announces the
    /// outcome. Only a token from the upstream or put back from L1 is stored; never a stale one.
    async fn complete(&self, store: &RedisStore, key: CacheKey, secret: &[u8], lock: &HeldLock, fetched: &Fetched) {
        let now = Instant::now();
        let sealer = &self.parts.keys.sealer;
        let (entry, message) = match &fetched.outcome {
            Outcome::Token(token) => {
                let entry = match fetched.source {
                    Source::Upstream | Source::Cache => token.keep_for(now, &self.parts.freshness).map(|ttl| {
                        let expires = lock.clock.at(now + token.remaining(now));
                        (sealer.seal(&key, secret, &redis_clock::encode_entry(expires, &token.to_stored())), ttl)
                    }),
                    Source::Stale | Source::Peer => None,
                };
                (entry, flight_message::encode_token(token, now, &lock.clock))
            }
            Outcome::Relayed(response) => (None, flight_message::encode_relayed(response)),
            Outcome::Failed(failure) => (None, flight_message::encode_failure(failure)),
            Outcome::Refused(refused) => (None, flight_message::encode_refused(refused)),
        };
        let sealed_message = sealer.seal(&key, secret, &message);
        if let Ok(false) = store.complete(&key, &lock.owner, entry, sealed_message).await {
            tracing::info!(?key, "the lock expired before the flight ended; another flight may have run");
        }
    }

    /// Calls the upstream within the rate cap; a call refused there never reaches it.
    async fn exchange(
        &self,
        form_body: String,
        authorization: Option<HeaderValue>,
    ) -> Result<Result<UpstreamResponse, UpstreamError>, Refused> {
        self.parts.quota.upstream_slot(self.parts.store.as_ref(), &self.parts.metrics).await?;
        Ok(self.parts.upstream.exchange(form_body, authorization).await)
    }

    fn outcome_of(&self, result: Result<UpstreamResponse, UpstreamError>, sent_at: Instant) -> Outcome {
        match result {
            Ok(response) if response.status == StatusCode::OK => {
                match CachedToken::from_upstream(&response.body, sent_at, &self.parts.freshness) {
                    Some(token) => Outcome::Token(Arc::new(token)),
                    None => {
                        tracing::warn!("upstream 200 is not a cacheable token response; relayed without caching");
                        Outcome::Relayed(response)
                    }
                }
            }
            other => classify(other),
        }
    }

    /// Opens an entry read from Redis; a value that does not open is treated as absent.
    fn open_entry(&self, key: &CacheKey, secret: &[u8], value: &StoredValue) -> Option<Arc<CachedToken>> {
        self.open_with(&self.parts.keys, key, secret, value)
    }

    /// Opens an entry named and sealed with `keys` (the current ones or a previous secret's).
    fn open_with(&self, keys: &Keys, key: &CacheKey, secret: &[u8], value: &StoredValue) -> Option<Arc<CachedToken>> {
        let plaintext = match keys.sealer.open(key, secret, &value.sealed) {
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
        CachedToken::from_stored(token, remaining, Instant::now(), &self.parts.freshness).map(Arc::new)
    }

    /// A stale entry from Redis, if it opens and may still be served.
    fn servable(&self, key: &CacheKey, secret: &[u8], value: Option<StoredValue>) -> Option<Arc<CachedToken>> {
        self.open_entry(key, secret, &value?).filter(|t| t.is_servable(Instant::now(), &self.parts.freshness))
    }

    fn remember_locally(&self, key: L1Key, token: &Arc<CachedToken>) {
        self.parts.l1.insert(key, Arc::clone(token), Instant::now(), &self.parts.freshness);
    }
}

/// The upstream request for a cacheable request: built from exactly the keyed values, with
/// the credentials sent the way the client sent them.
fn upstream_request(request: &CanonicalRequest) -> (String, Option<HeaderValue>) {
    let scope = request.scope.to_param();
    let secret = request.client_secret.expose_secret();
    let mut pairs: Vec<(&str, &str)> = vec![("grant_type", request.grant_type.as_str())];
    if let Some(scope) = &scope {
        pairs.push(("scope", scope));
    }
    let authorization = match request.auth_method {
        AuthMethod::Basic => {
            let mut value = HeaderValue::from_str(&basic::encode(&request.client_id, secret))
                .expect("base64 is a valid header value");
            value.set_sensitive(true);
            Some(value)
        }
        AuthMethod::Body => {
            pairs.push(("client_id", &request.client_id));
            pairs.push(("client_secret", secret));
            None
        }
    };
    pairs.extend(request.extra.iter().map(|(n, v)| (n.as_str(), v.as_str())));
    (form::encode_pairs(pairs), authorization)
}
