//! What every handler of both listeners shares. Its own module so that the routers
//! (`handler`, `admin`) and `app`, which builds it and mounts them, do not import each other.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::admission::Admission;
use crate::listener::AcceptFailures;
use crate::metrics::Metrics;
use crate::normalize::RequestLimits;
use crate::source::SourcePolicy;
use crate::upstreams::Upstreams;

/// Shared by every handler of both listeners.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The token endpoints served, and their routes.
    pub upstreams: Upstreams,
    pub metrics: Arc<Metrics>,
    pub limits: Arc<RequestLimits>,
    /// SHA-256 of the admin token; `None` = admin API off. Only the digest is kept, and
    /// compared in constant time.
    pub admin_token_digest: Option<[u8; 32]>,
    /// Which source addresses may call, and how to tell them behind a load balancer.
    pub sources: Arc<SourcePolicy>,
    pub admission: Arc<Admission>,
    /// When each listener last failed to accept a connection; `/readyz` reports it.
    pub accept_failures: Arc<AcceptFailures>,
    /// `TOKEN_PROXY_ACCESS_LOG`: one line per token request (see [`crate::access_log`]).
    pub access_log: bool,
    /// Set when the replica starts draining (`Application::run_until`); `/readyz` and the
    /// client listener's `ClientService` read it.
    pub(crate) shutting_down: Arc<AtomicBool>,
}

impl AppState {
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }
}
