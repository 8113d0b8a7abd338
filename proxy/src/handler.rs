//! The client-facing HTTP surface: `POST /oauth2/token` (the default upstream) and
//! `POST /NAME/oauth2/token` (a named one, see [`crate::upstreams`]), and OAuth-style JSON for
//! everything else. The handler only turns HTTP into a
//! [`TokenRequest`](crate::normalize::TokenRequest) (or a rejection), makes one call into the
//! upstream's token service, and records the outcome.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use hyper::body::Incoming;

use crate::access_log::{self, AccessEntry};
use crate::listener::{self, Occupancy};
use crate::metrics::{Metrics, Outcome, Throttle};
use crate::normalize::{TokenRequest, body_too_large, check_head, normalize};
use crate::response::{CacheStatus, ErrorCode, ProxyError, Rejection, Reply};
use crate::state::AppState;
use crate::token_service::TokenService;

/// The client listener's requests. A token request in its plain form (`POST /oauth2/token`,
/// `POST /NAME/oauth2/token` with nothing to percent-decode in NAME) goes straight to
/// [`serve`]: axum's router, with its extractors, boxed services and middleware, cost about
/// 6,000 instructions a request, 15 % of an L1 hit (bench/README.md). Everything else goes
/// through [`client_router`], which routes token requests the same way and answers the rest.
#[derive(Debug, Clone)]
pub struct ClientService {
    state: Arc<AppState>,
    router: Router,
}

impl ClientService {
    pub fn new(state: AppState) -> ClientService {
        ClientService { router: client_router(state.clone()), state: Arc::new(state) }
    }
}

impl listener::Handler for ClientService {
    fn call(
        &self,
        request: http::Request<Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = Response> + Send + 'static {
        let state = Arc::clone(&self.state);
        let routed = match token_route(request.method(), request.uri().path()) {
            Some(route) => Ok((route, request)),
            None => Err(listener::Handler::call(&self.router, request, peer)),
        };
        async move {
            let mut response = match routed {
                Ok((TokenRoute::Default, request)) => token(&state, peer, request.map(Body::new)).await,
                Ok((TokenRoute::Named(name), request)) => {
                    let name = request.uri().path()[name].to_owned();
                    token_at(&state, peer, &name, request.map(Body::new)).await
                }
                Err(routed) => routed.await,
            };
            // While draining, every answer closes its connection: a keep-alive client then
            // opens its next connection through the load balancer, to a replica that stays,
            // instead of racing the close of its idle connection when the listener stops.
            if state.is_shutting_down() {
                response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
    }
}

/// Which token route a request takes without the router, if any.
enum TokenRoute {
    Default,
    /// Where NAME lies in the path.
    Named(Range<usize>),
}

/// `POST /oauth2/token` or `POST /NAME/oauth2/token`, NAME one segment with no `%`; `None`
/// leaves the request to the router (which decodes NAME, and refuses methods and paths).
fn token_route(method: &Method, path: &str) -> Option<TokenRoute> {
    const TOKEN_PATH: &str = "/oauth2/token";
    if method != Method::POST {
        return None;
    }
    if path == TOKEN_PATH {
        return Some(TokenRoute::Default);
    }
    let name = path.strip_suffix(TOKEN_PATH)?.strip_prefix('/')?;
    let plain = !name.is_empty() && !name.bytes().any(|b| b == b'/' || b == b'%');
    plain.then(|| TokenRoute::Named(1..1 + name.len()))
}

/// The client listener's router.
fn client_router(state: AppState) -> Router {
    Router::new()
        .route(
            "/oauth2/token",
            post(
                async |State(state): State<AppState>, ConnectInfo(peer): ConnectInfo<SocketAddr>, request: Request| {
                    token(&state, peer, request).await
                },
            )
            .fallback(method_not_allowed),
        )
        .route(
            "/{upstream}/oauth2/token",
            post(
                async |State(state): State<AppState>,
                       ConnectInfo(peer): ConnectInfo<SocketAddr>,
                       Path(name): Path<String>,
                       request: Request| { token_at(&state, peer, &name, request).await },
            )
            .fallback(method_not_allowed),
        )
        .fallback(not_found)
        .with_state(state)
}

/// Why a token request got no reply from the token service.
enum Refused {
    Rejected(Rejection),
    /// All slots taken (503).
    Overloaded,
    /// The source already has its share of unfinished requests (429).
    SourceBusy,
}

impl From<Rejection> for Refused {
    fn from(rejection: Rejection) -> Refused {
        Refused::Rejected(rejection)
    }
}

/// `POST /oauth2/token`: the upstream whose `hosts` list the request's host, or the default.
async fn token(state: &AppState, peer: SocketAddr, request: Request) -> Response {
    // HTTP/1.1 names the host in `Host`, HTTP/2 in the authority.
    let host = request
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| request.headers().get(axum::http::header::HOST).and_then(|value| value.to_str().ok()));
    let Some(service) = state.upstreams.default_service(host) else {
        return unknown_upstream(
            state,
            peer,
            request.headers(),
            "no default upstream is configured; use /NAME/oauth2/token",
        );
    };
    serve(state, service, peer, request).await
}

/// `POST /NAME/oauth2/token`: the named upstream `NAME`.
async fn token_at(state: &AppState, peer: SocketAddr, name: &str, request: Request) -> Response {
    let Some(service) = state.upstreams.named_service(name) else {
        return unknown_upstream(state, peer, request.headers(), "no upstream has that name");
    };
    serve(state, service, peer, request).await
}

/// 404 for a route to no upstream: nothing is read or forwarded.
fn unknown_upstream(state: &AppState, peer: SocketAddr, headers: &HeaderMap, description: &'static str) -> Response {
    refuse_unrouted(state, peer, headers, Rejection::new(StatusCode::NOT_FOUND, ErrorCode::InvalidRequest, description))
}

/// A request no upstream's token service sees (a wrong route or method): counted as rejected
/// and, with the access log on, one `rejected` line with its source and status. The route is
/// the caller's: it is not repeated in the log.
fn refuse_unrouted(state: &AppState, peer: SocketAddr, headers: &HeaderMap, rejection: Rejection) -> Response {
    state.metrics.request(Outcome::Rejected, Duration::ZERO);
    if state.access_log {
        let source = Some(state.sources.source(peer.ip(), headers));
        AccessEntry { source, ..AccessEntry::default() }.write(
            Outcome::Rejected,
            rejection.status.as_u16(),
            Duration::ZERO,
        );
    }
    ProxyError::Rejected(rejection).into_response()
}

async fn serve(state: &AppState, service: &TokenService, peer: SocketAddr, request: Request) -> Response {
    // Filled in as the request is read, for the access log; `None` when it is off.
    let entry =
        state.access_log.then(|| AccessEntry { upstream: service.name().map(str::to_owned), ..AccessEntry::default() });
    // Counted per upstream when the deployment names them.
    let mut record = Record { metrics: service.metrics(), started: Instant::now(), entry, done: false };
    let metrics = record.metrics;
    let timeout = state.admission.request_timeout;
    let answered =
        tokio::time::timeout(timeout, answer(state, service, peer.ip(), request, record.entry.as_mut())).await;
    let (outcome, response) = match answered {
        Ok(Ok(reply)) => {
            if let Some(entry) = record.entry.as_mut() {
                entry.upstream_status = access_log::upstream_status(&reply);
            }
            (outcome_of(&reply), reply.into_response())
        }
        Ok(Err(Refused::Rejected(rejection))) => (Outcome::Rejected, ProxyError::Rejected(rejection).into_response()),
        Ok(Err(Refused::Overloaded)) => {
            metrics.throttled(Throttle::Overload);
            let rejection = Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::TemporarilyUnavailable,
                "the proxy is overloaded; retry shortly",
            );
            (Outcome::Rejected, retry_shortly(rejection))
        }
        Ok(Err(Refused::SourceBusy)) => {
            metrics.throttled(Throttle::PerSource);
            // Its body was not read: where the next request starts is unknown.
            let rejection = Rejection {
                close: true,
                ..Rejection::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    ErrorCode::TemporarilyUnavailable,
                    "too many unfinished requests from this source; retry shortly",
                )
            };
            (Outcome::Rejected, retry_shortly(rejection))
        }
        Err(_) => {
            metrics.throttled(Throttle::Timeout);
            let rejection = Rejection {
                close: true,
                ..Rejection::new(StatusCode::REQUEST_TIMEOUT, ErrorCode::InvalidRequest, "the request took too long")
            };
            (Outcome::Rejected, ProxyError::Rejected(rejection).into_response())
        }
    };
    record.finish(outcome, response.status().as_u16());
    response
}

/// One token request's count in the metrics and its access log line, made exactly once: by
/// [`serve`] with its answer, or on drop when hyper dropped the request's future first (the
/// client hung up: `aborted`, 499 as nginx logs it) or a panic unwound through it (`error`,
/// 500). With the access log off this is the same count as before, nothing more.
struct Record<'a> {
    metrics: &'a Metrics,
    started: Instant,
    entry: Option<AccessEntry>,
    done: bool,
}

impl Record<'_> {
    fn finish(&mut self, outcome: Outcome, status: u16) {
        self.done = true;
        let elapsed = self.started.elapsed();
        self.metrics.request(outcome, elapsed);
        if let Some(entry) = &self.entry {
            entry.write(outcome, status, elapsed);
        }
    }
}

impl Drop for Record<'_> {
    fn drop(&mut self) {
        if !self.done {
            let (outcome, status) =
                if std::thread::panicking() { (Outcome::Error, 500) } else { (Outcome::Aborted, 499) };
            self.finish(outcome, status);
        }
    }
}

fn retry_shortly(rejection: Rejection) -> Response {
    let mut response = ProxyError::Rejected(rejection).into_response();
    response.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
    response
}

/// `entry`, when the access log is on, learns the source and the client as they are known.
async fn answer(
    state: &AppState,
    service: &TokenService,
    peer: IpAddr,
    request: Request,
    mut entry: Option<&mut AccessEntry>,
) -> Result<Reply, Refused> {
    let (parts, body) = request.into_parts();
    let source = state.sources.source(peer, &parts.headers);
    if let Some(entry) = entry.as_deref_mut() {
        entry.source = Some(source);
    }
    if !state.sources.allows(source) {
        return Err(
            Rejection::new(StatusCode::FORBIDDEN, ErrorCode::AccessDenied, "this source address may not call").into()
        );
    }
    // Direct peers are capped per connection by the listener already; a trusted proxy's
    // connections are counted by no source, so their requests are, by the source they name.
    let behind_proxy = state.sources.connection_source(peer).is_none();
    let _unfinished = if behind_proxy {
        let source = state.sources.connection_source(source);
        Some(Occupancy::enter(&state.admission.forwarded, source).map_err(|_| Refused::SourceBusy)?)
    } else {
        None
    };
    check_head(&parts.headers, &state.limits)?;
    let body = match tokio::time::timeout(
        state.admission.body_timeout,
        axum::body::to_bytes(body, state.limits.max_body_bytes),
    )
    .await
    {
        Ok(Ok(body)) => body,
        Ok(Err(_)) => return Err(body_too_large().into()),
        Err(_) => {
            service.metrics().throttled(Throttle::BodyTimeout);
            // The rest of the body may still come: where the next request starts is unknown.
            return Err(Rejection {
                close: true,
                ..Rejection::new(
                    StatusCode::REQUEST_TIMEOUT,
                    ErrorCode::InvalidRequest,
                    "the request body took too long",
                )
            }
            .into());
        }
    };
    let request = normalize(parts.uri.query(), &parts.headers, &body, &state.limits)?;
    if let Some(entry) = entry {
        entry.client_id = match &request {
            TokenRequest::Cacheable(request) => Some(request.client_id.clone()),
            TokenRequest::PassThrough(request) => request.client_id.clone(),
        };
    }
    let Some(_slot) = state.admission.try_admit() else { return Err(Refused::Overloaded) };
    Ok(service.handle(request, source).await)
}

fn outcome_of(reply: &Reply) -> Outcome {
    match (&reply.answer, reply.cache) {
        // Refused by the quota's guards: no upstream call, like a rejected request.
        (Err(ProxyError::Refused(_)), _) | (Ok(_), None) => Outcome::Rejected,
        (Err(_), _) => Outcome::Error,
        (Ok(_), Some(CacheStatus::Hit)) => Outcome::Hit,
        (Ok(_), Some(CacheStatus::Miss)) => Outcome::Miss,
        (Ok(_), Some(CacheStatus::Coalesced)) => Outcome::Coalesced,
        (Ok(_), Some(CacheStatus::Stale)) => Outcome::Stale,
        (Ok(_), Some(CacheStatus::Bypass)) => Outcome::Bypass,
    }
}

async fn method_not_allowed(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let rejection = Rejection::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::InvalidRequest,
        "the token endpoint accepts POST only",
    );
    let mut response = refuse_unrouted(&state, peer, &headers, rejection);
    response.headers_mut().insert(http::header::ALLOW, http::HeaderValue::from_static("POST"));
    response
}

async fn not_found(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    _body: Body,
) -> Response {
    let rejection = Rejection::new(
        StatusCode::NOT_FOUND,
        ErrorCode::InvalidRequest,
        "the token endpoint is /oauth2/token (or /NAME/oauth2/token for a named upstream)",
    );
    refuse_unrouted(&state, peer, &headers, rejection)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(method: Method, path: &str) -> Option<String> {
        token_route(&method, path).map(|route| match route {
            TokenRoute::Default => "default".to_owned(),
            TokenRoute::Named(range) => path[range].to_owned(),
        })
    }

    #[test]
    fn only_plain_token_posts_skip_the_router() {
        assert_eq!(route(Method::POST, "/oauth2/token").as_deref(), Some("default"));
        assert_eq!(route(Method::POST, "/orders/oauth2/token").as_deref(), Some("orders"));
        // The router (matchit) takes `oauth2` as NAME here too.
        assert_eq!(route(Method::POST, "/oauth2/oauth2/token").as_deref(), Some("oauth2"));
        for path in
            ["/ord%65rs/oauth2/token", "//oauth2/token", "/a/b/oauth2/token", "/oauth2/token/", "/x/oauth2/tokens"]
        {
            assert_eq!(route(Method::POST, path), None, "{path}");
        }
        assert_eq!(route(Method::GET, "/oauth2/token"), None);
        assert_eq!(route(Method::PUT, "/orders/oauth2/token"), None);
    }
}
