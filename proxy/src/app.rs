//! One replica: built from its [`Config`], bound to its two listeners, run until shutdown.
//!
//! [`Application::build`] binds before returning, so callers (and tests using port 0) can read
//! the real addresses; [`Application::run_until`] serves until the given future resolves, then
//! drains: `/readyz` turns 503 while both listeners keep serving for the drain delay, so load
//! balancers stop routing here first; then the listeners stop accepting and in-flight requests
//! finish.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::response::Response;
use http::{HeaderValue, header};
use secrecy::ExposeSecret;
use shared::keys::Keys;
use tokio::net::TcpListener;

use crate::admin::admin_router;
use crate::admission::Admission;
use crate::config::Config;
use crate::entry::Freshness;
use crate::handler::client_router;
use crate::l1::L1;
use crate::listener::{self, AcceptFailures, Inbound, TlsSetupError};
use crate::metrics::Metrics;
use crate::normalize::RequestLimits;
use crate::quota::{Quota, QuotaSettings};
use crate::source::SourcePolicy;
use crate::state::AppState;
use crate::store::{RedisStore, StoreSettings, StoreSetupError};
use crate::token_service::{self, FlightSettings, TokenService};
use crate::upstream::{Upstream, UpstreamSetupError};

/// How often histogram buffers are drained between scrapes.
const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Why a replica could not start. `Display` is one line.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Upstream(#[from] UpstreamSetupError),
    #[error("{0}")]
    Store(#[from] StoreSetupError),
    #[error("TOKEN_PROXY_SECRET: {0}")]
    Secret(#[from] shared::keys::RootSecretTooShort),
    #[error("{0}")]
    Tls(#[from] TlsSetupError),
    #[error("cannot listen on {address} ({variable}): {source}")]
    Bind { variable: &'static str, address: SocketAddr, source: std::io::Error },
}

/// A built, bound replica.
#[derive(Debug)]
pub struct Application {
    client_listener: TcpListener,
    admin_listener: TcpListener,
    inbound: Inbound,
    admin_inbound: Inbound,
    state: AppState,
    drain: Drain,
}

impl Application {
    pub async fn build(config: Config) -> Result<Application, StartError> {
        let metrics = Arc::new(Metrics::new());
        let keys = match config.secret_bytes() {
            Some(secret) => Keys::derive(secret)?,
            None => Keys::random(),
        };
        let previous_keys =
            config.previous_secrets.iter().map(|s| Keys::derive(s.expose_secret())).collect::<Result<_, _>>()?;
        let store = match &config.redis_url {
            Some(url) => {
                let settings = StoreSettings {
                    command_timeout: config.redis_timeout,
                    breaker_threshold: config.redis_breaker_threshold,
                    breaker_cooldown: config.redis_breaker_cooldown,
                    pipelined_reads: true,
                };
                Some(RedisStore::connect(url, settings, Arc::clone(&metrics))?)
            }
            None => None,
        };
        let upstream = Upstream::new(
            config.upstream_url.clone(),
            config.upstream_connect_timeout,
            config.upstream_timeout,
            config.upstream_headers_file.clone(),
            Arc::clone(&metrics),
        )?;
        // Alone, L1 is the cache; with Redis it is a short-lived front for it.
        let l1_max_age = store.as_ref().map(|_| config.l1_max_age);
        let service = TokenService::new(token_service::Parts {
            upstream,
            store,
            keys,
            previous_keys,
            freshness: Freshness {
                expiry_margin: config.expiry_margin,
                min_token_ttl: config.min_token_ttl,
                refresh_at: config.refresh_at,
                max_lifetime: config.max_token_lifetime,
            },
            flight: FlightSettings { lock_ttl: config.lock_ttl, upstream_timeout: config.upstream_timeout },
            l1: L1::new(config.l1_capacity, l1_max_age),
            quota: Quota::new(QuotaSettings {
                auth: config.auth_failures,
                busy_wait: config.upstream_timeout,
                rate_per_second: config.upstream_rate_limit,
                queue_timeout: config.upstream_queue_timeout,
            }),
            metrics: Arc::clone(&metrics),
        });
        let limits = Arc::new(RequestLimits {
            max_header_bytes: config.max_header_bytes,
            max_body_bytes: config.max_body_bytes,
            allow_query_params: config.allow_query_params,
        });
        let sources = Arc::new(SourcePolicy {
            allowed: config.allowed_networks.clone(),
            trusted_proxies: config.trusted_proxies.clone(),
        });
        let accept_failures = Arc::new(AcceptFailures::default());
        let inbound = Inbound::client(&config, Arc::clone(&sources), Arc::clone(&accept_failures))?;
        let admin_inbound = Inbound::admin(&config, Arc::clone(&accept_failures));
        listener::warn_if_descriptors_short(&config);
        let bind = |variable, address| async move {
            TcpListener::bind(address).await.map_err(|source| StartError::Bind { variable, address, source })
        };
        let client_listener = bind("TOKEN_PROXY_LISTEN", config.listen).await?;
        let admin_listener = bind("TOKEN_PROXY_ADMIN_LISTEN", config.admin_listen).await?;
        let admin_token_digest = config.admin_token.as_ref().map(|t| crate::admin::digest(t.expose_secret()));
        let admission = Arc::new(Admission::new(
            config.max_concurrent_requests,
            config.request_timeout,
            config.body_timeout,
            config.max_connections_per_source,
        ));
        let state = AppState {
            service,
            metrics,
            limits,
            admin_token_digest,
            sources,
            admission,
            accept_failures,
            shutting_down: Arc::default(),
        };
        let drain = Drain { delay: config.drain_delay, in_flight_bound: config.request_timeout };
        Ok(Application { client_listener, admin_listener, inbound, admin_inbound, state, drain })
    }

    pub fn client_addr(&self) -> SocketAddr {
        self.client_listener.local_addr().expect("a bound listener has an address")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener.local_addr().expect("a bound listener has an address")
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves both listeners until `shutdown` resolves, then drains (see [`Drain`]).
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        let Application { client_listener, admin_listener, inbound, admin_inbound, state, drain } = self;
        tracing::info!(
            client = %client_listener.local_addr()?,
            admin = %admin_listener.local_addr()?,
            redis = state.service.store().is_some(),
            "token-proxy listening"
        );
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|stop| *stop).await;
            }
        };
        let upkeep = tokio::spawn({
            let metrics = Arc::clone(&state.metrics);
            async move {
                let mut tick = tokio::time::interval(METRICS_UPKEEP_INTERVAL);
                loop {
                    tick.tick().await;
                    metrics.upkeep();
                }
            }
        });
        let client_router = client_router(state.clone())
            .layer(axum::middleware::map_response_with_state(Arc::clone(&state.shutting_down), close_while_draining));
        let client = listener::serve(client_listener, client_router, inbound, Arc::clone(&state.metrics), stopped());
        let admin = listener::serve(
            admin_listener,
            admin_router(state.clone()),
            admin_inbound,
            Arc::clone(&state.metrics),
            stopped(),
        );
        let serving = async {
            let (client, admin) = tokio::join!(client, admin);
            client.and(admin)
        };
        // Resolves only if requests are still in flight once their bound has passed.
        let draining = {
            let state = state.clone();
            async move {
                shutdown.await;
                state.shutting_down.store(true, Ordering::Relaxed);
                tracing::info!(delay = ?drain.delay, "shutting down: /readyz answers 503; still serving for the drain delay");
                tokio::time::sleep(drain.delay).await;
                tracing::info!("draining: no new connections; finishing the requests in flight");
                let _ = stop_tx.send(true);
                tokio::time::sleep(drain.in_flight_bound).await;
            }
        };
        let result = tokio::select! {
            result = serving => result,
            () = draining => {
                tracing::warn!(bound = ?drain.in_flight_bound, "requests still in flight after the drain bound; abandoning them");
                Ok(())
            }
        };
        upkeep.abort();
        if let Some(store) = state.service.store() {
            store.quit().await;
        }
        result
    }
}

/// How a replica stops, so that a rolling deploy fails no request: on the shutdown signal
/// `/readyz` answers 503 at once while both listeners keep serving for `delay`, long enough
/// for load balancers' health checks to take the replica out; only then do the listeners stop
/// accepting, and requests in flight get up to `in_flight_bound` to finish.
#[derive(Debug, Clone, Copy)]
struct Drain {
    /// `TOKEN_PROXY_DRAIN_DELAY`.
    delay: Duration,
    /// `TOKEN_PROXY_REQUEST_TIMEOUT`: no token request may take longer.
    in_flight_bound: Duration,
}

/// While draining, every client answer closes its connection: a keep-alive client then opens
/// its next connection through the load balancer, to a replica that stays, instead of racing
/// the close of its idle connection when the listener stops.
async fn close_while_draining(State(draining): State<Arc<AtomicBool>>, mut response: Response) -> Response {
    if draining.load(Ordering::Relaxed) {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}
