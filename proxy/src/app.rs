//! One replica: built from its [`Config`], bound to its two listeners, run until shutdown.
//!
//! [`Application::build`] binds before returning, so callers (and tests using port 0) can read
//! the real addresses; [`Application::run_until`] serves until the given future resolves, then
//! drains: `/readyz` turns 503 while both listeners keep serving for the drain delay, so load
//! balancers stop routing here first; then the listeners stop accepting and in-flight requests
//! finish.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::admin::admin_router;
use crate::config::{Config, ConfigError};
use crate::handler::ClientService;
use crate::listener::{self, AcceptFailures, Inbound};
use crate::metrics::Metrics;
use crate::purge::Epochs;
use crate::state::AppState;
use crate::store::Sealing;
use crate::token_service::{self, TokenService};
use crate::upstreams::Upstreams;

/// How often histogram buffers are drained between scrapes.
const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Why a replica could not start: always a setting that cannot be used (a file that does not
/// load, an address that cannot be bound), named in one line.
pub type StartError = ConfigError;

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
    /// Each section of the configuration builds its part; only the listeners touch the network.
    /// An error names the setting at fault (the file and the key when the file set it).
    pub async fn build(config: Config) -> Result<Application, StartError> {
        let origins = config.origins();
        Application::assemble(config).await.map_err(|e| origins.locate(e))
    }

    async fn assemble(config: Config) -> Result<Application, StartError> {
        let metrics = Arc::new(Metrics::new());
        let (keys, previous_keys) = config.secrets.keys()?;
        let sealing = Sealing::new(&keys, &previous_keys);
        let store = config.redis.as_ref().map(|redis| redis.store(sealing, Arc::clone(&metrics))).transpose()?;
        let previous_hashers: Vec<_> = previous_keys.into_iter().map(|k| k.hasher).collect();
        // Shared by every upstream's service: the upstream is part of their keys.
        let l1 = Arc::new(config.cache.l1(store.is_some()));
        let epochs = Arc::new(Epochs::default());
        // One retention for the shared epochs: the longest any upstream caches a token.
        let purge_retention =
            config.endpoints.iter().map(|e| e.cache.freshness().max_lifetime).max().unwrap_or_default();
        let mut services = BTreeMap::new();
        for (index, endpoint) in config.endpoints.iter().enumerate() {
            let scoped = match &endpoint.name {
                Some(name) => Arc::new(metrics.for_upstream(name)),
                None => Arc::clone(&metrics),
            };
            let upstream = endpoint.upstream.client(Arc::clone(&scoped)).map_err(|e| endpoint.origins.locate(e))?;
            let service = TokenService::new(token_service::Parts {
                name: endpoint.name.clone(),
                upstream,
                store: store.clone(),
                hasher: keys.hasher.clone(),
                previous_hashers: previous_hashers.clone(),
                freshness: endpoint.cache.freshness(),
                flight: endpoint.cache.flight(endpoint.upstream.timeout),
                l1: Arc::clone(&l1),
                quota: endpoint.quota.quota(endpoint.upstream.timeout).at_upstream(endpoint.name.clone()),
                metrics: scoped,
                epochs: Arc::clone(&epochs),
                purge_retention,
                follows_purges: index == 0,
            });
            services.insert(endpoint.name.clone(), service);
        }
        let upstreams = match services.remove(&None) {
            Some(service) => Upstreams::single(service),
            None => Upstreams::named(
                services.into_iter().filter_map(|(name, service)| Some((name?, service))).collect(),
                config.default_upstream.as_deref(),
                config.endpoints.iter().flat_map(|endpoint| {
                    let name = endpoint.name.clone().unwrap_or_default();
                    endpoint.hosts.iter().map(move |host| (host.clone(), name.clone()))
                }),
            ),
        };
        let sources = Arc::new(config.inbound.sources());
        let accept_failures = Arc::new(AcceptFailures::default());
        let inbound = config.inbound.client_inbound(Arc::clone(&sources), Arc::clone(&accept_failures))?;
        let admin_inbound = config.inbound.admin_inbound(Arc::clone(&accept_failures));
        config.inbound.warn_if_descriptors_short();
        let (client_listener, admin_listener) = config.listeners.bind().await?;
        let state = AppState {
            upstreams,
            metrics,
            limits: Arc::new(config.inbound.limits()),
            admin_token_digest: config.admin.token_digest(),
            sources,
            admission: Arc::new(config.inbound.admission()),
            accept_failures,
            access_log: config.log.access_log,
            shutting_down: Arc::default(),
        };
        let drain = Drain { delay: config.listeners.drain_delay, in_flight_bound: config.inbound.request_timeout };
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
            redis = state.upstreams.store().is_some(),
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
        let client_service = ClientService::new(state.clone());
        let client = listener::serve(client_listener, client_service, inbound, Arc::clone(&state.metrics), stopped());
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
        if let Some(store) = state.upstreams.store() {
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
