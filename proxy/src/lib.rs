//! token-proxy: a horizontally scaled caching proxy for OAuth2 client-credentials token
//! endpoints, above all Amazon Cognito's `/oauth2/token`.
//!
//! # Layout
//!
//! The request flow reads top to bottom:
//!
//! - [`config`]: settings from `TOKEN_PROXY_*` variables, flags or a TOML file, validated up
//!   front, in sections that build the parts they configure.
//! - [`app`]: builds a replica from its config, binds both listeners, runs until shutdown.
//! - [`listener`]: both listeners' accept loop: source networks, connection caps, TLS (reloaded,
//!   optional mTLS), timeouts, accept failures.
//! - [`handler`]: the client-facing HTTP surface (`POST /oauth2/token`).
//!   - [`admission`]: how many token requests may be in flight, and for how long.
//!   - [`state`]: what the handlers of both listeners share (built by [`app`]).
//! - [`source`]: the caller's source address (behind trusted load balancers too), the allowlist.
//! - [`normalize`]: HTTP request → [`normalize::TokenRequest`], or a 4xx rejection.
//! - [`token_service`]: L1 → Redis read → in-process flight → cluster flight → upstream
//!   (orchestration only; [`outcome`]: what a fetch produced).
//!   - [`l1`]: the bounded in-process cache.
//!   - [`local_flight`]: one Redis read and one fetch per key per replica.
//!   - [`cluster_flight`]: one upstream call per key across replicas: the lock as a guard,
//!     following, and [`cluster_flight::plan`], the pure decision of what to do next.
//!   - [`store`]: Redis: entries (sealed and opened there), purge epochs, quota counters.
//!   - [`redis_clock`]: entries carry their expiry on Redis's own clock.
//!   - [`breaker`]: stops paying Redis timeouts while Redis keeps failing.
//!   - [`flight_message`]: what a leader announces to followers on other replicas.
//!   - [`upstream`]: the token endpoint client.
//! - [`upstreams`]: the named upstreams of a deployment and the route to each.
//!   - [`quota`]: failed-authentication throttling and the upstream rate cap.
//!   - [`entry`]: a cached token: freshness, refresh point, `expires_in` rewriting.
//! - [`response`]: the one place where outcomes and errors become HTTP responses
//!   ([`error_code`]: the OAuth error codes).
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics` and the authenticated admin API.
//! - [`purge`]: purge epochs: how an operator drops a client's cached tokens everywhere.
//! - [`metrics`], [`telemetry`], [`shutdown`]: operations.
//!
//! Cache keys and sealing live in the `shared` crate (`shared::keys`, `shared::seal`).

#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod admission;
pub mod app;
pub mod breaker;
pub mod cluster_flight;
pub mod config;
pub mod entry;
pub mod error_code;
pub mod flight_message;
pub mod handler;
pub mod l1;
pub mod listener;
pub mod local_flight;
pub mod metrics;
pub mod normalize;
pub mod outcome;
pub mod process_metrics;
pub mod purge;
pub mod quota;
pub mod read_pipeline;
pub mod redis_clock;
pub mod response;
pub mod shutdown;
pub mod source;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod token_service;
pub mod upstream;
pub mod upstreams;

/// Installs ring as the process-wide TLS provider (the one provider of the workspace).
/// Idempotent: a provider installed earlier stays.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
