//! The token service: answers a normalized request from the caches or the upstream.
//!
//! Lookup order for a cacheable request (DESIGN.md §5): L1 (in-process) → in-process single
//! flight (one fetch per key per replica) → L2 (Redis) → upstream. A fetch runs as its own task,
//! so a caller that disconnects cannot cancel the work its followers are waiting for. Only a
//! well-formed 200 is cached; every other answer is handed to the waiting callers and forgotten.
//!
//! This module knows nothing of axum: it takes a [`TokenRequest`] and returns a [`Reply`].

use std::sync::Arc;
use std::time::Instant;

use http::StatusCode;
use http::header::HeaderValue;
use secrecy::ExposeSecret;
use shared::basic;
use shared::canonical::{AuthMethod, CanonicalRequest};
use shared::form;
use shared::keys::{CacheKey, Keys};

use crate::entry::{CachedToken, Freshness};
use crate::l1::L1;
use crate::metrics::Metrics;
use crate::normalize::{PassThrough, TokenRequest};
use crate::response::{Answer, CacheStatus, ProxyError, Reply, UpstreamFailure};
use crate::single_flight::{Flights, Role};
use crate::store::RedisStore;
use crate::upstream::{Upstream, UpstreamResponse};

/// What one fetch produced; shared by every caller of the flight.
#[derive(Debug, Clone)]
enum Fetched {
    /// Found in Redis.
    Stored(Arc<CachedToken>),
    /// A token the upstream just issued.
    Issued(Arc<CachedToken>),
    /// The upstream's answer, relayed as is (never cached).
    Relayed(UpstreamResponse),
    Failed(UpstreamFailure),
}

/// The parts the service is built from.
#[derive(Debug)]
pub struct Parts {
    pub upstream: Upstream,
    pub store: Option<RedisStore>,
    pub keys: Keys,
    pub freshness: Freshness,
    pub l1: L1,
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
    flights: Arc<Flights<Fetched>>,
}

impl TokenService {
    pub fn new(parts: Parts) -> TokenService {
        let upstream_id = parts.upstream.url().as_str().to_owned();
        TokenService { inner: Arc::new(Inner { parts, upstream_id, flights: Arc::default() }) }
    }

    /// Whether a Redis store is configured.
    pub fn store(&self) -> Option<&RedisStore> {
        self.inner.parts.store.as_ref()
    }

    /// Answers one request.
    pub async fn handle(&self, request: TokenRequest) -> Reply {
        match request {
            TokenRequest::Cacheable(request) => self.cacheable(request).await,
            TokenRequest::PassThrough(request) => self.pass_through(request).await,
        }
    }

    async fn cacheable(&self, request: CanonicalRequest) -> Reply {
        let inner = &self.inner;
        let key = inner.parts.keys.hasher.cache_key(&inner.upstream_id, &request);
        let now = Instant::now();
        if let Some(body) = inner.parts.l1.get(&key, now).and_then(|t| t.render(now, &inner.parts.freshness)) {
            return Reply { cache: CacheStatus::Hit, answer: Ok(Answer::Token(body)) };
        }

        let fetcher = Arc::clone(inner);
        let flight = inner.flights.join(key, move || fetcher.fetch(key, request));
        let role = flight.role;
        if role == Role::Follower {
            inner.parts.metrics.coalesced_waiter();
        }
        let Some(fetched) = flight.outcome().await else {
            return Reply { cache: CacheStatus::Miss, answer: Err(ProxyError::Internal) };
        };
        let now = Instant::now();
        let (cache, answer) = match fetched {
            Fetched::Stored(token) => (CacheStatus::Hit, Ok(Answer::Token(token.render_unchecked(now)))),
            Fetched::Issued(token) => (CacheStatus::Miss, Ok(Answer::Token(token.render_unchecked(now)))),
            Fetched::Relayed(response) => (CacheStatus::Miss, Ok(Answer::Relayed(response))),
            Fetched::Failed(failure) => (CacheStatus::Miss, Err(ProxyError::Upstream(failure))),
        };
        let cache = if role == Role::Follower { CacheStatus::Coalesced } else { cache };
        Reply { cache, answer }
    }

    async fn pass_through(&self, request: PassThrough) -> Reply {
        let result = self.inner.parts.upstream.exchange(request.form_body, request.authorization).await;
        let answer = match classify(result) {
            Fetched::Relayed(response) => Ok(Answer::Relayed(response)),
            Fetched::Failed(failure) => Err(ProxyError::Upstream(failure)),
            Fetched::Stored(_) | Fetched::Issued(_) => unreachable!("classify never caches"),
        };
        Reply { cache: CacheStatus::Bypass, answer }
    }
}

/// Sorts an upstream result into relayed answers and failures (nothing is cached here).
fn classify(result: Result<UpstreamResponse, crate::upstream::UpstreamError>) -> Fetched {
    match result {
        Err(error) => Fetched::Failed(UpstreamFailure::Unreachable(error)),
        Ok(response) if response.status.is_success() || response.status.is_client_error() => Fetched::Relayed(response),
        Ok(response) => Fetched::Failed(UpstreamFailure::BadStatus(response)),
    }
}

impl Inner {
    /// One fetch for `key`: Redis, then the upstream. Runs as its own task.
    async fn fetch(self: Arc<Self>, key: CacheKey, request: CanonicalRequest) -> Fetched {
        let secret = request.client_secret.expose_secret().as_bytes();
        if let Some(token) = self.read_store(&key, secret).await {
            return Fetched::Stored(token);
        }
        let (form_body, authorization) = upstream_request(&request);
        let sent_at = Instant::now();
        let result = self.parts.upstream.exchange(form_body, authorization).await;
        match result {
            Ok(response) if response.status == StatusCode::OK => {
                match CachedToken::from_upstream(&response.body, sent_at) {
                    Some(token) => {
                        let token = Arc::new(token);
                        self.remember(key, &token, secret).await;
                        Fetched::Issued(token)
                    }
                    None => {
                        tracing::warn!("upstream 200 is not a cacheable token response; relayed without caching");
                        Fetched::Relayed(response)
                    }
                }
            }
            other => classify(other),
        }
    }

    /// A usable entry from Redis, if there is one. Every Redis fault and every entry that
    /// does not open is a miss.
    async fn read_store(&self, key: &CacheKey, secret: &[u8]) -> Option<Arc<CachedToken>> {
        let store = self.parts.store.as_ref()?;
        let stored = match store.get(key).await {
            Ok(stored) => stored?,
            Err(error) => {
                self.parts.metrics.redis_error();
                tracing::warn!(%error, "redis read failed; continuing without it");
                return None;
            }
        };
        let plaintext = match self.parts.keys.sealer.open(key, secret, &stored.sealed) {
            Ok(plaintext) => plaintext,
            Err(error) => {
                tracing::warn!(?key, %error, "unreadable cache entry treated as a miss");
                return None;
            }
        };
        let now = Instant::now();
        let token = CachedToken::from_stored(&plaintext, stored.ttl, now, &self.parts.freshness)?;
        token.usable_for(now, &self.parts.freshness)?;
        let token = Arc::new(token);
        self.parts.l1.insert(*key, Arc::clone(&token), now, &self.parts.freshness);
        Some(token)
    }

    /// Stores a fresh token in Redis (sealed) and in L1, if it lives long enough to cache.
    async fn remember(&self, key: CacheKey, token: &Arc<CachedToken>, secret: &[u8]) {
        let now = Instant::now();
        let Some(ttl) = token.usable_for(now, &self.parts.freshness) else {
            tracing::debug!(?key, "token too short-lived to cache");
            return;
        };
        if let Some(store) = &self.parts.store {
            let sealed = self.parts.keys.sealer.seal(&key, secret, &token.to_stored());
            if let Err(error) = store.put(&key, sealed, ttl).await {
                self.parts.metrics.redis_error();
                tracing::warn!(%error, "redis write failed; continuing without it");
            }
        }
        self.parts.l1.insert(key, Arc::clone(token), now, &self.parts.freshness);
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
