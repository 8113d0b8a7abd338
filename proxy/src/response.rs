//! Every answer of the token endpoint is built here, and only here.
//!
//! Faults are sorted by where they lie: the caller's request ([`Rejection`], a 4xx that cost no
//! upstream call), the upstream ([`UpstreamFailure`], 502/503/504, or the upstream's own 4xx
//! relayed unchanged), or the proxy itself (500, opaque). Every response carries
//! `Cache-Control: no-store` and `Pragma: no-cache` (RFC 6749 §5.1), and `X-Cache` whenever the
//! request reached the cache layer. Bodies never quote a secret or a token from the request.

use std::borrow::Cow;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::StatusCode;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use shared::wire::OAuthError;

pub use crate::error_code::ErrorCode;
use crate::outcome::{Refused, UpstreamFailure};
use crate::upstream::{UpstreamError, UpstreamResponse};

const JSON: HeaderValue = HeaderValue::from_static("application/json;charset=UTF-8");
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// What the cache did for a request. Says no more than the caller could know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Served from a cache without waiting for anyone.
    Hit,
    /// This request went upstream.
    Miss,
    /// This request waited for an identical request that went upstream.
    Coalesced,
    /// The upstream failed; a cached token that is still valid was served instead.
    Stale,
    /// Not cacheable (a grant other than client_credentials): forwarded as is.
    Bypass,
}

impl CacheStatus {
    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Coalesced => "COALESCED",
            CacheStatus::Stale => "STALE",
            CacheStatus::Bypass => "BYPASS",
        })
    }
}

/// A successful answer.
#[derive(Debug, Clone)]
pub enum Answer {
    /// A token response body, `expires_in` already set to the time left.
    Token(Bytes),
    /// The upstream's own answer, relayed as it came (its 4xx errors, or a 200 we would not
    /// cache), minus every header but `Content-Type`, `Retry-After` and `WWW-Authenticate`.
    Relayed(UpstreamResponse),
}

/// A request refused before it reached the cache or the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: StatusCode,
    /// The OAuth error code (RFC 6749 §5.2).
    pub error: ErrorCode,
    pub description: Cow<'static, str>,
    /// Close the connection after answering: its framing can no longer be trusted.
    pub close: bool,
}

impl Rejection {
    pub fn invalid_request(description: impl Into<Cow<'static, str>>) -> Rejection {
        Rejection::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidRequest, description)
    }

    pub fn new(status: StatusCode, error: ErrorCode, description: impl Into<Cow<'static, str>>) -> Rejection {
        Rejection { status, error, description: description.into(), close: false }
    }

    /// A request whose body framing is ambiguous (the start of request smuggling): answered,
    /// then the connection is closed, since where the next request starts is unknown.
    pub fn ambiguous_framing() -> Rejection {
        Rejection { close: true, ..Rejection::invalid_request("ambiguous message framing") }
    }
}

/// Everything that is not a successful answer.
#[derive(Debug, Clone)]
pub enum ProxyError {
    Rejected(Rejection),
    /// The guards of the upstream's quota (failed-authentication throttle, rate cap) refused
    /// the call: 429, and no upstream call was made.
    Refused(Refused),
    Upstream(UpstreamFailure),
    /// A bug: the fetch task died. Opaque to the caller.
    Internal,
}

/// The token service's reply to one request.
#[derive(Debug, Clone)]
pub struct Reply {
    /// `None` when the request never got as far as a cache decision worth telling (refused).
    pub cache: Option<CacheStatus>,
    pub answer: Result<Answer, ProxyError>,
}

/// An OAuth-style JSON error response.
pub fn oauth_json(status: StatusCode, error: ErrorCode, description: impl Into<String>) -> Response {
    let body = OAuthError::new(error.as_str(), description).to_json();
    (status, [(header::CONTENT_TYPE, JSON)], body).into_response()
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let mut response = match self {
            ProxyError::Rejected(r) => {
                let mut response = oauth_json(r.status, r.error, r.description);
                if r.close {
                    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                response
            }
            ProxyError::Refused(refused) => {
                let mut response =
                    oauth_json(StatusCode::TOO_MANY_REQUESTS, ErrorCode::TemporarilyUnavailable, refused.reason);
                let seconds = refused.retry_after.as_secs_f64().ceil().max(1.0) as u64;
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
                response
            }
            ProxyError::Upstream(UpstreamFailure::Unreachable(e @ UpstreamError::Timeout)) => {
                oauth_json(StatusCode::GATEWAY_TIMEOUT, ErrorCode::TemporarilyUnavailable, e.to_string())
            }
            ProxyError::Upstream(UpstreamFailure::Unreachable(e)) => {
                oauth_json(StatusCode::BAD_GATEWAY, ErrorCode::ServerError, e.to_string())
            }
            ProxyError::Upstream(UpstreamFailure::BadStatus(upstream)) => {
                let description = format!("the token endpoint answered {}", upstream.status.as_u16());
                let mut response = if upstream.status == StatusCode::SERVICE_UNAVAILABLE {
                    oauth_json(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::TemporarilyUnavailable, description)
                } else {
                    oauth_json(StatusCode::BAD_GATEWAY, ErrorCode::ServerError, description)
                };
                if let Some(retry_after) = upstream.retry_after {
                    response.headers_mut().insert(header::RETRY_AFTER, retry_after);
                }
                response
            }
            ProxyError::Internal => {
                oauth_json(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::ServerError, "internal error")
            }
        };
        no_store(&mut response);
        response
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        match self {
            Answer::Token(body) => (StatusCode::OK, [(header::CONTENT_TYPE, JSON)], body).into_response(),
            Answer::Relayed(upstream) => {
                let mut response = Response::new(Body::from(upstream.body));
                *response.status_mut() = upstream.status;
                let headers = response.headers_mut();
                headers.insert(header::CONTENT_TYPE, upstream.content_type.unwrap_or(JSON));
                if let Some(v) = upstream.retry_after {
                    headers.insert(header::RETRY_AFTER, v);
                }
                if let Some(v) = upstream.www_authenticate {
                    headers.insert(header::WWW_AUTHENTICATE, v);
                }
                response
            }
        }
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut response = match self.answer {
            Ok(Answer::Token(body)) => return token_response(body, self.cache),
            Ok(answer) => answer.into_response(),
            Err(error) => error.into_response(),
        };
        no_store(&mut response);
        if let Some(cache) = self.cache {
            response.headers_mut().insert(X_CACHE, cache.header_value());
        }
        response
    }
}

/// A token, the answer to every hit: its headers written straight into a map sized for them,
/// rather than through axum's tuple response, then [`no_store`] and `X-Cache` (the hit path's
/// cost, bench/README.md).
fn token_response(body: Bytes, cache: Option<CacheStatus>) -> Response {
    let mut headers = HeaderMap::with_capacity(4);
    headers.insert(header::CONTENT_TYPE, JSON);
    headers.insert(header::CACHE_CONTROL, NO_STORE);
    headers.insert(header::PRAGMA, NO_CACHE);
    if let Some(cache) = cache {
        headers.insert(X_CACHE, cache.header_value());
    }
    let mut response = Response::new(Body::from(body));
    *response.headers_mut() = headers;
    response
}

const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");
const NO_CACHE: HeaderValue = HeaderValue::from_static("no-cache");

/// RFC 6749 §5.1: token responses must not be cached by anyone but us.
fn no_store(response: &mut Response) {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, NO_STORE);
    headers.insert(header::PRAGMA, NO_CACHE);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_the_names_clients_match_on() {
        let codes = [
            (ErrorCode::InvalidRequest, "invalid_request"),
            (ErrorCode::InvalidClient, "invalid_client"),
            (ErrorCode::InvalidScope, "invalid_scope"),
            (ErrorCode::AccessDenied, "access_denied"),
            (ErrorCode::ServerError, "server_error"),
            (ErrorCode::TemporarilyUnavailable, "temporarily_unavailable"),
            (ErrorCode::Unauthorized, "unauthorized"),
            (ErrorCode::NotFound, "not_found"),
            (ErrorCode::TooManyPurges, "too_many_purges"),
        ];
        for (code, name) in codes {
            assert_eq!(code.as_str(), name);
        }
    }

    #[test]
    fn a_token_carries_the_headers_of_every_answer_and_no_others() {
        let body = Bytes::from_static(br#"{"access_token":"x","token_type":"Bearer","expires_in":60}"#);
        let response = Reply { cache: Some(CacheStatus::Hit), answer: Ok(Answer::Token(body)) }.into_response();
        assert_eq!(response.status(), StatusCode::OK);
        let headers = response.headers();
        assert_eq!(headers[header::CONTENT_TYPE], "application/json;charset=UTF-8");
        assert_eq!(headers[header::CACHE_CONTROL], "no-store");
        assert_eq!(headers[header::PRAGMA], "no-cache");
        assert_eq!(headers[X_CACHE], "HIT");
        assert_eq!(headers.len(), 4);
    }

    #[test]
    fn a_refusal_is_a_429_with_retry_after_and_no_x_cache() {
        let refused = Refused { reason: "slow down", retry_after: std::time::Duration::from_millis(1_200) };
        let response = Reply { cache: None, answer: Err(ProxyError::Refused(refused)) }.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        assert!(response.headers().get(X_CACHE).is_none());
        assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
    }
}
