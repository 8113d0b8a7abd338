//! [`MockIdp`]: the shared state of one mock identity provider (clients, key, counters,
//! faults) and the in-process control API tests use.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use shared::wire::TokenResponse;
use tokio::sync::watch;

use crate::config::{self, Config, ConfigError};
use crate::faults::{self, Fault, Faults, Pending};
use crate::stats::{Snapshot, Stats};
use crate::token::{self, TokenError, TokenRequest, TokenService};

/// A Cognito-compatible token endpoint for tests. Cloning is cheap and every clone controls
/// the same server: keep one in the test while the router serves another.
#[derive(Clone)]
pub struct MockIdp {
    inner: Arc<Inner>,
}

struct Inner {
    tokens: TokenService,
    stats: Stats,
    faults: Faults,
    /// `expires_in` and `exp - iat` of the next tokens, in seconds; changeable at run time.
    token_lifetime_secs: AtomicU64,
    /// The configured values, which [`MockIdp::reset`] restores.
    initial_latency: Duration,
    initial_token_lifetime_secs: u64,
    /// Headers of the most recent `POST /oauth2/token`, so tests can check exactly what a
    /// proxy forwarded.
    last_request_headers: Mutex<Option<HeaderMap>>,
    /// Like an AWS WAF rule in front of the pool: when set, a token request must carry this
    /// header with one of these values, or it is refused with 403 before anything else.
    origin_verify: Mutex<Option<(http::HeaderName, Vec<String>)>>,
    /// Every access token issued, oldest first, when the configuration records them.
    issued_tokens: Option<Mutex<Vec<String>>>,
    /// Becomes `true` when the server shuts down: hung requests then end (by dropping their
    /// connection) instead of holding up graceful shutdown forever.
    released: watch::Sender<bool>,
}

/// What happened to one token request; the HTTP layer turns it into a response.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// A token, and the value of the `XSRF-TOKEN` cookie Cognito sets next to it.
    Issued { response: TokenResponse, xsrf_token: String },
    /// Refused by Cognito's rules (or our own failure).
    Rejected(TokenError),
    /// An injected failure with this status.
    Failed(u16),
    /// The connection must be closed without a response (an injected drop, or a hang that
    /// ended because the server is shutting down).
    Dropped,
}

impl MockIdp {
    /// Builds the provider. Fails if the client list is inconsistent (an empty id or secret,
    /// a scope with spaces, a client_id twice).
    pub fn new(config: Config) -> Result<MockIdp, ConfigError> {
        config::check_clients(&config.clients).map_err(ConfigError::Clients)?;
        let lifetime = config.token_lifetime.as_secs();
        let inner = Inner {
            tokens: TokenService::new(&config.clients, config.signing_key, config.issuer),
            stats: Stats::new(config.clients.iter().map(|c| c.client_id.as_str())),
            faults: Faults::new(config.latency),
            token_lifetime_secs: AtomicU64::new(lifetime),
            initial_latency: config.latency,
            initial_token_lifetime_secs: lifetime,
            last_request_headers: Mutex::new(None),
            origin_verify: Mutex::new(None),
            issued_tokens: config.record_tokens.then(Mutex::default),
            released: watch::Sender::new(false),
        };
        Ok(MockIdp { inner: Arc::new(inner) })
    }

    /// The HTTP routes: the token endpoint, the JWKS, `/healthz` and the admin API.
    ///
    /// `drop_next` needs the connection-level hooks that [`crate::serve`] and [`crate::spawn`]
    /// install; under another server a drop fault is answered with a 500 instead.
    pub fn router(&self) -> axum::Router {
        crate::handlers::router(self.clone())
    }

    /// Tokens issued to `client_id` (200 responses only).
    pub fn issued(&self, client_id: &str) -> u64 {
        self.inner.stats.issued(client_id)
    }

    /// Tokens issued to all clients.
    pub fn issued_total(&self) -> u64 {
        self.inner.stats.issued_total()
    }

    /// Every access token issued so far, oldest first, if the configuration records them
    /// ([`Config::record_tokens`], on in [`Config::for_tests`]); empty otherwise. Leak tests
    /// look for them in places they must never be, including tokens the test never saw (issued
    /// to another replica, or to a background refresh). [`MockIdp::reset`] keeps them: they
    /// are still out there.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.issued_tokens_since(0)
    }

    /// The recorded tokens from the `from`-th on (counting from 0): what a caller that already
    /// holds the first `from` of them is missing. Empty if there are no more, or no record.
    pub fn issued_tokens_since(&self, from: usize) -> Vec<String> {
        self.inner.issued_tokens.as_ref().map_or_else(Vec::new, |tokens| {
            let tokens = tokens.lock().unwrap_or_else(PoisonError::into_inner);
            tokens.get(from..).map(<[String]>::to_vec).unwrap_or_default()
        })
    }

    /// Every `POST /oauth2/token` received: issued, refused or faulted.
    pub fn requests_total(&self) -> u64 {
        self.inner.stats.requests_total()
    }

    /// Delay added before every token request (and before its faults).
    pub fn set_latency(&self, latency: Duration) {
        self.inner.faults.set_latency(latency);
    }

    /// The current added latency.
    pub fn latency(&self) -> Duration {
        self.inner.faults.latency()
    }

    /// Lifetime of the tokens issued from now on, in whole seconds (sub-second parts are
    /// dropped).
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.inner.token_lifetime_secs.store(lifetime.as_secs(), Ordering::Relaxed);
    }

    /// The current token lifetime.
    pub fn token_lifetime(&self) -> Duration {
        Duration::from_secs(self.inner.token_lifetime_secs.load(Ordering::Relaxed))
    }

    /// The next `count` token requests get `status` (usually 400, 429, 500 or 503) with an
    /// OAuth JSON body; 429 and 503 carry `Retry-After: 1`. Replaces any pending failures.
    ///
    /// # Panics
    ///
    /// If `status` is not a 4xx or 5xx status: that is a mistake in the test, not a fault.
    pub fn fail_next(&self, count: u32, status: u16) {
        assert!(faults::is_injectable(status), "fail_next needs a 4xx or 5xx status, not {status}");
        self.inner.faults.fail_next(count, status);
    }

    /// The next `count` token requests never get an answer (until the server shuts down), so
    /// the client has to time out. Replaces any pending count.
    pub fn hang_next(&self, count: u32) {
        self.inner.faults.hang_next(count);
    }

    /// The next `count` token requests have their connection closed without a response.
    /// Replaces any pending count.
    pub fn drop_next(&self, count: u32) {
        self.inner.faults.drop_next(count);
    }

    /// Back to the state at start-up: counters zeroed, faults cleared, latency and token
    /// lifetime as configured, no last request.
    pub fn reset(&self) {
        self.inner.stats.reset();
        self.inner.faults.clear(self.inner.initial_latency);
        self.inner.token_lifetime_secs.store(self.inner.initial_token_lifetime_secs, Ordering::Relaxed);
        *self.last_headers() = None;
    }

    /// Requires header `name` to be one of `accepted` on every token request (403 otherwise),
    /// as the AWS WAF rule of an origin-verify secret does; `None` lifts the requirement.
    /// Accepting two values at once is how such a secret is rotated without refusing anyone.
    pub fn set_origin_verify(&self, rule: Option<(&str, &[&str])>) {
        let rule = rule.map(|(name, accepted)| {
            let name = http::HeaderName::from_bytes(name.as_bytes()).expect("a valid header name");
            (name, accepted.iter().map(|v| (*v).to_owned()).collect())
        });
        *self.inner.origin_verify.lock().unwrap_or_else(PoisonError::into_inner) = rule;
    }

    /// The headers of the most recent `POST /oauth2/token`, if any.
    pub fn last_request_headers(&self) -> Option<HeaderMap> {
        self.last_headers().clone()
    }

    /// The JWKS document served at `/.well-known/jwks.json`.
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({ "keys": [self.inner.tokens.key().jwk()] })
    }

    /// The key id of the signing key.
    pub fn kid(&self) -> &str {
        self.inner.tokens.key().kid()
    }

    /// Handles one `POST /oauth2/token`: count it, wait the configured latency, apply a
    /// pending fault if any, else authenticate and issue. `body` is `Err` when the body could
    /// not be read in full.
    pub(crate) async fn token(&self, headers: HeaderMap, body: Result<&[u8], TokenError>) -> Outcome {
        self.inner.stats.count_request();
        *self.last_headers() = Some(headers.clone());

        if !self.origin_verified(&headers) {
            tracing::debug!("origin verification failed");
            return Outcome::Failed(403);
        }
        let latency = self.inner.faults.latency();
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        match self.inner.faults.take() {
            None => {}
            Some(Fault::Fail(status)) => {
                tracing::debug!(status, "injected failure");
                return Outcome::Failed(status);
            }
            Some(Fault::Hang) => {
                tracing::debug!("injected hang");
                let mut released = self.inner.released.subscribe();
                // `Err` only if the sender is gone, which cannot happen while `self` lives.
                let _ = released.wait_for(|released| *released).await;
                return Outcome::Dropped;
            }
            Some(Fault::Drop) => {
                tracing::debug!("injected connection drop");
                return Outcome::Dropped;
            }
        }

        match self.issue(&headers, body) {
            Ok(outcome) => outcome,
            Err(err) => {
                tracing::debug!(error = %err, "token request refused");
                Outcome::Rejected(err)
            }
        }
    }

    fn issue(&self, headers: &HeaderMap, body: Result<&[u8], TokenError>) -> Result<Outcome, TokenError> {
        let request = TokenRequest::from_http(headers, body?)?;
        let grant = self.inner.tokens.authorize(request)?;
        let lifetime = self.inner.token_lifetime_secs.load(Ordering::Relaxed);
        let access_token = self.inner.tokens.mint(&grant, lifetime, unix_now())?;
        let xsrf_token = token::random_id()?;
        if let Some(tokens) = &self.inner.issued_tokens {
            // Recorded before anyone else can see the token, so no log line can mention it first.
            tokens.lock().unwrap_or_else(PoisonError::into_inner).push(access_token.clone());
        }
        self.inner.stats.count_issued(&grant.client_id);
        tracing::debug!(client_id = %grant.client_id, scope = %grant.scope, "token issued");
        let response = TokenResponse {
            access_token,
            token_type: "Bearer".to_owned(),
            expires_in: lifetime,
            other: serde_json::Map::new(),
        };
        Ok(Outcome::Issued { response, xsrf_token })
    }

    fn origin_verified(&self, headers: &HeaderMap) -> bool {
        let rule = self.inner.origin_verify.lock().unwrap_or_else(PoisonError::into_inner);
        let Some((name, accepted)) = rule.as_ref() else { return true };
        headers.get(name).and_then(|v| v.to_str().ok()).is_some_and(|v| accepted.iter().any(|a| a == v))
    }

    pub(crate) fn stats(&self) -> Snapshot {
        self.inner.stats.snapshot()
    }

    pub(crate) fn pending_faults(&self) -> Pending {
        self.inner.faults.pending()
    }

    /// Ends every hung request, now and for good: called when the server shuts down.
    pub(crate) fn release_hung_requests(&self) {
        self.inner.released.send_replace(true);
    }

    fn last_headers(&self) -> MutexGuard<'_, Option<HeaderMap>> {
        // A header map is valid whatever a panicking holder was doing.
        self.inner.last_request_headers.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for MockIdp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockIdp")
            .field("kid", &self.kid())
            .field("requests_total", &self.requests_total())
            .field("issued_total", &self.issued_total())
            .finish_non_exhaustive()
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;
    use http::header::{AUTHORIZATION, CONTENT_TYPE};

    use super::*;
    use crate::config::ClientConfig;

    fn request(idp: &MockIdp, secret: &str) -> Result<Outcome, TokenError> {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/x-www-form-urlencoded"));
        headers.insert(AUTHORIZATION, HeaderValue::from_str(&shared::basic::encode("app", secret)).unwrap());
        idp.issue(&headers, Ok(b"grant_type=client_credentials"))
    }

    fn token_of(outcome: Result<Outcome, TokenError>) -> String {
        match outcome {
            Ok(Outcome::Issued { response, .. }) => response.access_token,
            other => panic!("expected a token, got {other:?}"),
        }
    }

    #[test]
    fn records_every_issued_token_in_order_and_keeps_them_across_reset() {
        let idp = MockIdp::new(Config::for_tests(vec![ClientConfig::new("app", "s3cret", &["api/read"])])).unwrap();
        assert!(idp.issued_tokens().is_empty());
        let first = token_of(request(&idp, "s3cret"));
        assert!(request(&idp, "wrong").is_err(), "a refused request issues nothing");
        let second = token_of(request(&idp, "s3cret"));
        assert_eq!(idp.issued_tokens(), vec![first.clone(), second.clone()]);
        assert_eq!(idp.issued_tokens_since(1), vec![second.clone()]);
        assert!(idp.issued_tokens_since(2).is_empty());
        assert!(idp.issued_tokens_since(9).is_empty());
        idp.reset();
        assert_eq!(idp.issued_tokens(), vec![first, second]);
    }

    #[test]
    fn records_nothing_unless_configured_to() {
        let config = Config {
            record_tokens: false,
            ..Config::for_tests(vec![ClientConfig::new("app", "s3cret", &["api/read"])])
        };
        let idp = MockIdp::new(config).unwrap();
        token_of(request(&idp, "s3cret"));
        assert_eq!(idp.issued_total(), 1);
        assert!(idp.issued_tokens().is_empty());
    }
}
