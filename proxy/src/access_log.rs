//! The access log (`TOKEN_PROXY_ACCESS_LOG=true`): one JSON line per token request, on stdout
//! with the other logs but written by a layer of its own (see [`crate::telemetry`]), so it is
//! JSON whatever `TOKEN_PROXY_LOG_FORMAT` says and shows whatever `TOKEN_PROXY_LOG` filters.
//!
//! A line says who asked (`client_id`, `source`), where (`upstream`, for a named one), what
//! happened (`outcome`: the `X-Cache` value in lower case, or `rejected` / `error` / `aborted`
//! when the client hung up first, with status 499), what the
//! client got (`status`), what the upstream said when this request called it
//! (`upstream_status`) and how long it took (`latency_ms`). Never a secret nor a token: the
//! client id is the only part of the request it repeats. No other log line carries a client
//! id together with an outcome and a status.

use std::net::IpAddr;
use std::time::Duration;

use crate::metrics::Outcome;
use crate::outcome::UpstreamFailure;
use crate::response::{Answer, CacheStatus, ProxyError, Reply};

/// The tracing target of access log events; only the access log's layer shows them.
pub const TARGET: &str = "token_proxy::access";

/// One token request, as the access log tells it.
#[derive(Debug, Default)]
pub struct AccessEntry {
    /// The client the request named, once it was read and well formed.
    pub client_id: Option<String>,
    /// A named upstream; `None` for the one upstream of a deployment without names.
    pub upstream: Option<String>,
    /// The caller (behind trusted proxies, the address they forwarded).
    pub source: Option<IpAddr>,
    /// What this request's own upstream call answered, if it made one.
    pub upstream_status: Option<u16>,
}

impl AccessEntry {
    /// Writes the line.
    pub fn write(&self, outcome: Outcome, status: u16, latency: Duration) {
        tracing::info!(
            target: TARGET,
            client_id = self.client_id.as_deref(),
            upstream = self.upstream.as_deref(),
            outcome = outcome.label(),
            status,
            upstream_status = self.upstream_status,
            // Milliseconds with microseconds: hits take a fraction of one.
            latency_ms = (latency.as_secs_f64() * 1e6).round() / 1e3,
            source = self.source.map(tracing::field::display),
            "token request"
        );
    }
}

/// The status of the upstream call this request made itself (a MISS or a BYPASS), if any: a
/// HIT or a COALESCED request called nobody, and a STALE one hides the failure it stood in for.
pub fn upstream_status(reply: &Reply) -> Option<u16> {
    if !matches!(reply.cache, Some(CacheStatus::Miss | CacheStatus::Bypass)) {
        return None;
    }
    match &reply.answer {
        Ok(Answer::Token(_)) => Some(200),
        Ok(Answer::Relayed(response)) => Some(response.status.as_u16()),
        Err(ProxyError::Upstream(UpstreamFailure::BadStatus(response))) => Some(response.status.as_u16()),
        Err(_) => None,
    }
}
