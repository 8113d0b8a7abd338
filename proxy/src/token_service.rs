//! The token service: answers a normalized request from the caches or the upstream. It
//! orchestrates; the parts it drives do the work (docs/architecture.md, "A cold miss").
//!
//! Lookup order for a cacheable request:
//!
//! 1. **L1**, the in-process cache. A fresh token is a HIT; past its refresh point the hit
//!    also starts one background refresh, so hot keys never wait at expiry.
//! 2. **Redis**: one read, shared by identical concurrent requests ([`SharedReads`]).
//! 3. **In-process single flight** ([`crate::local_flight`]): one fetch per key per replica,
//!    run as its own task so a caller that disconnects cannot cancel what its followers wait
//!    for, within the failed-authentication guard ([`Quota`]).
//! 4. **Cluster single flight** ([`crate::cluster_flight`]): one upstream call per key across
//!    the replicas; it decides when to lead, follow, go without Redis or serve stale, and
//!    calls back here for the upstream call itself.
//!
//! Sealing and opening are the store's ([`crate::store`]): this module sees tokens only. It
//! knows nothing of axum either: it takes a [`TokenRequest`], returns a [`Reply`].

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use http::header::HeaderValue;
use secrecy::ExposeSecret;
use shared::basic;
use shared::canonical::{AuthMethod, CanonicalRequest, PurgeEpochs};
use shared::form;
use shared::keys::{CacheKey, KeyHasher};

use crate::cluster_flight::{self, ClusterFlights, FlightSettings, Plan, Purpose, Redis};
use crate::entry::{CachedToken, Freshness};
use crate::l1::{L1, L1Hasher, L1Key};
use crate::local_flight::{Flights, Role, SharedReads};
use crate::metrics::Metrics;
use crate::normalize::{PassThrough, TokenRequest};
use crate::outcome::{Fetched, Outcome, Refused, Source};
use crate::purge::{self, Epochs, Look, PurgeError, PurgeTarget};
use crate::quota::{self, Quota};
use crate::response::{Answer, CacheStatus, ProxyError, Reply};
use crate::store::RedisStore;
use crate::upstream::{Upstream, UpstreamError, UpstreamResponse};

/// Every how many purge looks (about one a second) the whole purge hash is read.
const WHOLE_PURGE_LOOK_EVERY: u64 = 10;

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

/// The parts the service is built from.
#[derive(Debug)]
pub struct Parts {
    /// The upstream's name in a deployment with several (`None`: the one upstream, named by
    /// `TOKEN_PROXY_UPSTREAM_URL` alone).
    pub name: Option<String>,
    pub upstream: Upstream,
    /// Redis, which seals and opens the entries it holds (see [`crate::store::Sealing`]).
    pub store: Option<RedisStore>,
    /// Names every entry: the current root secret's keyed hash.
    pub hasher: KeyHasher,
    /// The hashers of earlier root secrets (`TOKEN_PROXY_PREVIOUS_SECRETS`): their entries are
    /// still read, so a rotation costs no upstream calls, but never written.
    pub previous_hashers: Vec<KeyHasher>,
    pub freshness: Freshness,
    pub flight: FlightSettings,
    /// Shared by the services of every upstream: its keys name the upstream.
    pub l1: Arc<L1>,
    pub quota: Quota,
    pub metrics: Arc<Metrics>,
    /// The purge epochs, shared by the services of every upstream.
    pub epochs: Arc<Epochs>,
    /// How long a purge epoch must be kept: the longest any upstream's tokens are cached
    /// (`TOKEN_PROXY_MAX_TOKEN_LIFETIME`, or an upstream's longer one), after which the entries
    /// it hid have expired (see [`crate::purge`]).
    pub purge_retention: Duration,
    /// Whether this service keeps `epochs` in step with Redis (one service per replica does).
    pub follows_purges: bool,
}

/// Answers token requests. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TokenService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    parts: Parts,
    /// The upstream as part of every cache key: entries never cross token endpoints. Its URL
    /// for the one upstream of a deployment without names (the keys of earlier releases), its
    /// name otherwise.
    upstream_id: String,
    l1_hasher: L1Hasher,
    /// Purge epochs, part of every key.
    epochs: Arc<Epochs>,
    /// Redis reads under way: identical concurrent requests share one.
    reads: SharedReads<Read>,
    local_flights: Arc<Flights<Fetched>>,
    /// The cluster-wide half of the single flight, when there is a Redis.
    cluster: Option<ClusterFlights>,
}

/// One fetch's values, as they travel from an L1 miss to the flight.
#[derive(Debug)]
struct Fetch {
    keys: EntryKeys,
    request: CanonicalRequest,
    purpose: Purpose,
    /// This replica's own servable token for the key: the token being refreshed, or an L1
    /// entry due for revalidation.
    local: Option<Arc<CachedToken>>,
    /// Whether the flight may use Redis (the hit read may have found it failing already).
    redis: RedisUse,
}

/// Whether a fetch may still use Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RedisUse {
    Use,
    Skip,
}

/// The two names of one entry: in L1 (cheap, process-local) and in Redis (keyed HMAC).
#[derive(Debug, Clone, Copy)]
struct EntryKeys {
    cache: CacheKey,
    l1: L1Key,
}

impl TokenService {
    pub fn new(parts: Parts) -> TokenService {
        let upstream_id = match &parts.name {
            None => parts.upstream.url().as_str().to_owned(),
            Some(name) => format!("upstream:{name}"),
        };
        let epochs = Arc::clone(&parts.epochs);
        let cluster = parts
            .store
            .clone()
            .map(|store| ClusterFlights::new(store, parts.flight, parts.freshness, Arc::clone(&parts.metrics)));
        let inner = Arc::new(Inner {
            cluster,
            parts,
            upstream_id,
            l1_hasher: L1Hasher::default(),
            epochs,
            reads: SharedReads::default(),
            local_flights: Arc::default(),
        });
        if inner.parts.store.is_some() && inner.parts.follows_purges {
            tokio::spawn(follow_purges(Arc::downgrade(&inner)));
        }
        TokenService { inner }
    }

    /// Drops the cached tokens `target` covers, on every replica (L1 included): bumps its purge
    /// epoch in Redis and announces it; without Redis, here only. Returns the new epoch.
    pub async fn purge(&self, target: &PurgeTarget) -> Result<u64, PurgeError> {
        let inner = &self.inner;
        let field = target.field(&inner.parts.hasher);
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

    /// The upstream's name; `None` for the one upstream of a deployment without names.
    pub fn name(&self) -> Option<&str> {
        self.inner.parts.name.as_deref()
    }

    /// Where this upstream's requests and calls are counted.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.parts.metrics
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
        let hasher = &inner.parts.hasher;
        let epochs = inner.epochs.for_request(hasher, inner.parts.name.as_deref(), &request);
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
            Read::Miss => RedisUse::Use,
            // Already paid one Redis deadline: the flight goes on without Redis.
            Read::Unavailable => RedisUse::Skip,
        };
        // Without L1 (capacity 0) this replica's own token is a fallback for while Redis
        // fails only: when Redis answered, its miss is the truth.
        let local = local.filter(|_| redis == RedisUse::Skip || !inner.parts.l1.is_fallback_only());

        let fetcher = Arc::clone(inner);
        let refresh_request = request.clone();
        let fetch = Fetch { keys, request, purpose: Purpose::Miss { source }, local, redis };
        let flight = inner.local_flights.join(keys.cache, move || fetcher.fetch(fetch));
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
                Some(client_id) => match quota.attempt(store, &inner.parts.hasher, client_id, source, metrics).await {
                    Ok(attempt) => Some(attempt),
                    Err(refused) => return Outcome::Refused(refused),
                },
                None => None,
            };
            let called = inner.exchange(request.client_id.as_deref(), request.form_body, request.authorization).await;
            if let Some(attempt) = attempt {
                let failed = matches!(&called, Ok(Ok(r)) if quota::is_failed_authentication(r.status, &r.body));
                quota.settle(store, attempt, failed, metrics).await;
            }
            match called {
                Ok(result) => Outcome::classify(result),
                Err(refused) => Outcome::Refused(refused),
            }
        });
        let answer = match task.await {
            Ok(Outcome::Relayed(response)) => Ok(Answer::Relayed(response)),
            Ok(Outcome::Failed(failure)) => Err(ProxyError::Upstream(failure)),
            Ok(Outcome::Refused(refused)) => return Reply { cache: None, answer: Err(ProxyError::Refused(refused)) },
            Ok(Outcome::Token(_)) => unreachable!("Outcome::classify never builds a token"),
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

impl Inner {
    fn purge_retention(&self) -> Duration {
        self.parts.purge_retention
    }

    /// Starts one background refresh of `key`, single-flighted on this replica and, through
    /// the lock, across the cluster.
    fn start_refresh(self: &Arc<Self>, keys: EntryKeys, request: CanonicalRequest, current: Arc<CachedToken>) {
        let fetcher = Arc::clone(self);
        let fetch = Fetch { keys, request, purpose: Purpose::Refresh, local: Some(current), redis: RedisUse::Use };
        // The flight runs on its own; nobody waits for it here.
        drop(self.local_flights.join(keys.cache, move || fetcher.fetch(fetch)));
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
        let rotated: Vec<CacheKey>;
        let names = if self.parts.previous_hashers.is_empty() {
            std::slice::from_ref(&keys.cache)
        } else {
            // After a rotation: the names of the entry under each previous secret too.
            let previous =
                self.parts.previous_hashers.iter().map(|h| h.cache_key_with(&self.upstream_id, request, epochs));
            rotated = std::iter::once(keys.cache).chain(previous).collect();
            &rotated
        };
        match store.read_entry(names, secret, &self.parts.freshness).await {
            Ok(Some(token)) if token.is_fresh(Instant::now(), &self.parts.freshness) => {
                self.remember_locally(keys.l1, &token);
                Read::Hit(token)
            }
            Ok(_) => Read::Miss,
            Err(_) => Read::Unavailable,
        }
    }

    /// One fetch, run as its own task, within the failed-authentication guard.
    ///
    /// Credentials are proven when this replica holds a token for exactly them (a refresh, or
    /// an L1 entry due for revalidation): only unproven ones are admitted by [`Quota::attempt`],
    /// before any lock is taken (waiting there never holds a key's lock), and settled by what
    /// the fetch brought: a failed authentication only if this replica's own call got one.
    async fn fetch(self: Arc<Self>, fetch: Fetch) -> Fetched {
        let (quota, metrics) = (&self.parts.quota, &self.parts.metrics);
        let store = self.parts.store.as_ref().filter(|_| fetch.redis == RedisUse::Use);
        let unproven_from = match fetch.purpose {
            Purpose::Miss { source } if fetch.local.is_none() => Some(source),
            _ => None,
        };
        let attempt = match unproven_from {
            Some(source) => {
                match quota.attempt(store, &self.parts.hasher, &fetch.request.client_id, source, metrics).await {
                    Ok(attempt) => Some(attempt),
                    Err(refused) => return Fetched::new(Source::Upstream, Outcome::Refused(refused)),
                }
            }
            None => None,
        };
        let fetched = self.fly(&fetch).await;
        if let Some(attempt) = attempt {
            let failed = fetched.source == Source::Upstream
                && matches!(&fetched.outcome, Outcome::Relayed(r) if quota::is_failed_authentication(r.status, &r.body));
            quota.settle(store, attempt, failed, metrics).await;
        }
        fetched
    }

    /// The flight proper, once admitted: the cluster flight decides, this replica's upstream
    /// call is made here, and what it brings is kept in L1.
    async fn fly(&self, fetch: &Fetch) -> Fetched {
        let redis = match (&self.cluster, fetch.redis) {
            (None, _) => Redis::None,
            // Keys built before the purge epochs are known could find a purged token.
            (Some(_), RedisUse::Use) if !self.epochs.is_synced() => Redis::Down,
            (Some(flights), RedisUse::Use) => Redis::Up(flights),
            (Some(_), RedisUse::Skip) => Redis::Down,
        };
        let (freshness, settings) = (self.parts.freshness, self.parts.flight);
        let plan = Plan::new(fetch.purpose, fetch.local.clone(), settings, freshness, Instant::now());
        let secret = fetch.request.client_secret.expose_secret().as_bytes();
        let call = || self.call_upstream(&fetch.request, fetch.purpose);
        let served = cluster_flight::fly(redis, fetch.keys.cache, secret, plan, call).await;
        if let (true, Some(token)) = (served.keep_locally, served.fetched.token()) {
            self.remember_locally(fetch.keys.l1, token);
        }
        served.fetched
    }

    /// This replica's call to the upstream for `request`.
    async fn call_upstream(&self, request: &CanonicalRequest, purpose: Purpose) -> Outcome {
        if let Purpose::Refresh = purpose {
            self.parts.metrics.refresh();
        }
        let sent_at = Instant::now();
        let (form_body, authorization) = upstream_request(request);
        match self.exchange(Some(&request.client_id), form_body, authorization).await {
            Ok(result) => self.outcome_of(result, sent_at),
            Err(refused) => Outcome::Refused(refused),
        }
    }

    /// Calls the upstream within the rate cap and the client's call budget; a call refused
    /// there never reaches it. A call whose credentials the upstream refused is given back to
    /// the budget: it was not the client's.
    async fn exchange(
        &self,
        client_id: Option<&str>,
        form_body: String,
        authorization: Option<HeaderValue>,
    ) -> Result<Result<UpstreamResponse, UpstreamError>, Refused> {
        let (quota, store, metrics) = (&self.parts.quota, self.parts.store.as_ref(), &self.parts.metrics);
        // The rate slot first: a budget call is worth a window, a rate slot one second.
        quota.upstream_slot(store, metrics).await?;
        let budget_call = match client_id {
            Some(client_id) => quota.budget_call(store, &self.parts.hasher, client_id, metrics).await?,
            None => None,
        };
        let result = self.parts.upstream.exchange(form_body, authorization).await;
        if let (Some(call), Ok(response)) = (budget_call, &result) {
            if quota::is_failed_authentication(response.status, &response.body) {
                quota.budget_refund(store, call).await;
            }
        }
        Ok(result)
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
            other => Outcome::classify(other),
        }
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
