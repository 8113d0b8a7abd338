//! The admin listener: `/healthz`, `/readyz`, `/metrics`, and, when `TOKEN_PROXY_ADMIN_TOKEN`
//! is set, the admin API (`POST /admin/purge`) behind that bearer token. Keep the listener off
//! the public network either way. It is served by the same accept loop as the client listener
//! (header-read timeout, a connection cap; see [`crate::listener`]).

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use shared::canonical::Scope;

use crate::metrics::BreakerState;
use crate::purge::{Covers, MAX_CLIENT_ID_BYTES, PurgeError, PurgeTarget};
use crate::response::{ErrorCode, oauth_json};
use crate::state::AppState;
use crate::upstreams::Upstreams;

pub fn admin_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/admin/purge", post(purge))
        .with_state(state)
}

/// The process is alive.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready to serve. A replica whose Redis is down still serves (degraded, from L1 and the
/// upstream), so it stays ready: taking it out of the load balancer would only shed capacity.
/// Shutdown makes it unready, so the load balancer drains it first; so does a listener that
/// cannot accept connections (out of file descriptors), while it cannot.
async fn readyz(State(state): State<AppState>) -> Response {
    let (redis, breaker, refusal, shards) = match state.upstreams.store() {
        None => ("disabled", BreakerState::Closed, None, None),
        Some(store) => (store.health().label(), store.breaker_state(), store.refusal(), store.shards_health()),
    };
    let degraded = !matches!(redis, "up" | "disabled")
        || breaker != BreakerState::Closed
        || shards.is_some_and(|shards| shards.failing > 0);
    let mode = if degraded { "degraded" } else { "normal" };
    // Until the purge epochs are read, Redis's entries are not used (see `crate::purge`).
    let purges = if state.upstreams.purges_synced() { "synced" } else { "pending" };
    let mut body = json!({ "ready": true, "redis": redis, "breaker": breaker.label(), "mode": mode, "purges": purges });
    if let Some(shards) = shards {
        // On a Redis Cluster, hit reads are judged per primary: how many this replica knows
        // from the cluster map, and how many of those fail reads now. Locks and writes are
        // still judged for the whole cluster ("redis", "breaker").
        body["shards"] = json!({ "primaries": shards.primaries, "reads_failing": shards.failing });
    }
    if let Some(refusal) = refusal {
        // Why Redis is down when it refuses us (TLS, login): the cause, never a secret.
        body["redis_refusal"] = refusal.to_string().into();
    }
    let reason = if state.is_shutting_down() {
        Some("shutting down".to_owned())
    } else {
        state.accept_failures.failing().map(|listener| {
            format!("the {} listener cannot accept connections (out of file descriptors?)", listener.label())
        })
    };
    let Some(reason) = reason else { return (StatusCode::OK, Json(body)).into_response() };
    body["ready"] = false.into();
    body["reason"] = reason.into();
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

/// `token-proxy --health`: asks the admin listener at `address` for `/healthz` over plain
/// HTTP/1.1, the whole exchange within `timeout`. Blocking: it runs before any runtime.
pub fn probe_healthz(address: std::net::SocketAddr, timeout: std::time::Duration) -> Result<(), String> {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + timeout;
    let left =
        || deadline.saturating_duration_since(std::time::Instant::now()).max(std::time::Duration::from_millis(1));
    let mut stream = std::net::TcpStream::connect_timeout(&address, timeout)
        .map_err(|e| format!("cannot connect to the admin listener at {address}: {e}"))?;
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream
        .set_write_timeout(Some(left()))
        .and_then(|()| stream.write_all(request.as_bytes()))
        .map_err(|e| format!("{address}: {e}"))?;
    // The status line is all that matters; the answer is a few bytes.
    let mut answer = Vec::new();
    let mut buffer = [0u8; 256];
    while !answer.contains(&b'\n') && answer.len() < 4096 {
        stream.set_read_timeout(Some(left())).map_err(|e| format!("{address}: {e}"))?;
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buffer[..n]),
            Err(e) => return Err(format!("no answer from {address}: {e}")),
        }
    }
    let status_line = String::from_utf8_lossy(&answer);
    let status_line = status_line.lines().next().unwrap_or("").trim();
    match status_line.split(' ').nth(1) {
        Some("200") => Ok(()),
        _ if status_line.is_empty() => Err(format!("{address} closed the connection without answering")),
        _ => Err(format!("{address}/healthz answered {status_line:?}")),
    }
}

/// SHA-256 of an admin token. Comparing digests keeps the comparison's time independent of
/// where, or whether, the presented token differs, and of its length.
pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn authorized(headers: &HeaderMap, expected: &[u8; 32]) -> bool {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|token| digest(token.trim()));
    let Some(presented) = presented else { return false };
    presented.iter().zip(expected).fold(0u8, |diff, (a, b)| diff | (a ^ b)) == 0
}

fn admin_error(status: StatusCode, error: ErrorCode, description: &str) -> Response {
    oauth_json(status, error, description)
}

/// A refused admin request: `(status, error, description)`.
type Refusal = (StatusCode, ErrorCode, String);

/// What to purge: `{"client_id": "..."}`, optionally with `"scope"`, or `{"all": true}`; at
/// every upstream, or at one with `"upstream": "NAME"` (alone: that upstream's every entry).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeRequest {
    upstream: Option<String>,
    client_id: Option<String>,
    scope: Option<String>,
    #[serde(default)]
    all: bool,
}

impl PurgeRequest {
    fn target(mut self, upstreams: &Upstreams) -> Result<PurgeTarget, Refusal> {
        let upstream = self.upstream.take();
        if let Some(name) = &upstream {
            if !upstreams.is_named(name) {
                return Err((StatusCode::NOT_FOUND, ErrorCode::NotFound, "no upstream has that name".into()));
            }
        }
        let all_of_upstream = upstream.is_some() && self.client_id.is_none() && self.scope.is_none();
        let covers = if all_of_upstream { Ok(Covers::All) } else { self.covers() }?;
        Ok(PurgeTarget { upstream, covers })
    }

    fn covers(self) -> Result<Covers, Refusal> {
        match self {
            PurgeRequest { all: true, client_id: None, scope: None, .. } => Ok(Covers::All),
            PurgeRequest { all: false, client_id: Some(id), .. } if id.len() > MAX_CLIENT_ID_BYTES => Err((
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidRequest,
                format!("client_id is longer than {MAX_CLIENT_ID_BYTES} bytes"),
            )),
            PurgeRequest { all: false, client_id: Some(id), scope, .. } if !id.is_empty() => match scope {
                None => Ok(Covers::Client(id)),
                Some(scope) => Scope::parse(Some(&scope))
                    .map(|scope| Covers::ClientScope(id, scope))
                    .map_err(|e| (StatusCode::BAD_REQUEST, ErrorCode::InvalidScope, e.to_string())),
            },
            _ => Err((
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidRequest,
                "give client_id (and optionally scope), all, or upstream".into(),
            )),
        }
    }
}

/// Largest purge request body read. A purge names one client and scope; anything bigger is no
/// purge request.
const MAX_PURGE_BODY_BYTES: usize = 64 * 1024;

/// Drops the covered cached tokens on every replica (see [`crate::purge`]). The bearer token is
/// checked before a byte of the body is read: a caller without it can make the replica read
/// nothing, let alone a huge or never-ending body.
async fn purge(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let Some(expected) = &state.admin_token_digest else {
        let description = format!("the admin API is off (set {})", crate::config::admin::ADMIN_TOKEN.name);
        return admin_error(StatusCode::NOT_FOUND, ErrorCode::NotFound, &description);
    };
    if !authorized(&headers, expected) {
        let mut response =
            admin_error(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, "a valid admin bearer token is required");
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    let body = match tokio::time::timeout(
        state.admission.body_timeout,
        axum::body::to_bytes(body, MAX_PURGE_BODY_BYTES),
    )
    .await
    {
        Ok(Ok(body)) => body,
        Ok(Err(_)) => {
            return admin_error(StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::InvalidRequest, "the body is too large");
        }
        Err(_) => return admin_error(StatusCode::REQUEST_TIMEOUT, ErrorCode::InvalidRequest, "the body took too long"),
    };
    let Ok(request) = serde_json::from_slice::<PurgeRequest>(&body) else {
        return admin_error(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            r#"expected {"client_id": "..."} or {"all": true}"#,
        );
    };
    let target = match request.target(&state.upstreams) {
        Ok(target) => target,
        Err((status, error, description)) => return admin_error(status, error, &description),
    };
    let what = match (&target.upstream, &target.covers) {
        (None, Covers::All) => "all",
        (Some(_), Covers::All) => "upstream",
        (_, Covers::Client(_)) => "client",
        (_, Covers::ClientScope(..)) => "client_scope",
    };
    match state.upstreams.purge(&target).await {
        Ok(epoch) => (StatusCode::OK, Json(json!({ "purged": what, "epoch": epoch }))).into_response(),
        Err(error @ PurgeError::TooMany) => {
            tracing::warn!(%error, "purge refused");
            admin_error(StatusCode::CONFLICT, ErrorCode::TooManyPurges, &error.to_string())
        }
        Err(error) => {
            tracing::error!(%error, "purge failed");
            admin_error(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::TemporarilyUnavailable,
                "Redis did not take the purge; retry",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_token_is_authorized() {
        let expected = digest("the-admin-token-0123");
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            authorized(&headers, &expected)
        };
        assert!(with("Bearer the-admin-token-0123"));
        assert!(!with("Bearer the-admin-token-012"));
        assert!(!with("Bearer the-admin-token-01234"));
        assert!(!with("Basic the-admin-token-0123"));
        assert!(!with("the-admin-token-0123"));
        assert!(!authorized(&HeaderMap::new(), &expected));
    }
}
