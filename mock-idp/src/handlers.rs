//! The HTTP surface: routes, and the one place where an [`Outcome`] becomes a response.

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use http::header::{CACHE_CONTROL, CONTENT_TYPE, PRAGMA, RETRY_AFTER, SET_COOKIE};
use http::{HeaderMap, HeaderValue, StatusCode};
use shared::wire::OAuthError;

use crate::connection::Connection;
use crate::faults;
use crate::idp::{MockIdp, Outcome};
use crate::token::TokenError;

/// Largest token request body read. Real ones are a few hundred bytes; the bound keeps a
/// misbehaving load test from making mock-idp buffer megabytes.
const MAX_BODY_BYTES: usize = 64 * 1024;

pub(crate) fn router(idp: MockIdp) -> Router {
    Router::new()
        .route("/oauth2/token", post(token))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/healthz", get(healthz))
        .merge(crate::admin::routes())
        .with_state(idp)
}

async fn token(
    State(idp): State<MockIdp>,
    connection: Option<Extension<ConnectInfo<Connection>>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = axum::body::to_bytes(body, MAX_BODY_BYTES).await;
    let body = body.as_ref().map(Bytes::as_ref).map_err(|_| {
        TokenError::InvalidRequest(format!("the body is unreadable or larger than {MAX_BODY_BYTES} bytes"))
    });
    match idp.token(headers, body).await {
        Outcome::Issued { response, xsrf_token } => {
            let mut reply = json(StatusCode::OK, &response);
            // Real Cognito sets this cookie on token responses; it is here so tests can check
            // that the proxy never relays it.
            let cookie = format!("XSRF-TOKEN={xsrf_token}; Path=/; Secure; HttpOnly; SameSite=Lax");
            if let Ok(cookie) = HeaderValue::from_str(&cookie) {
                reply.headers_mut().insert(SET_COOKIE, cookie);
            }
            reply
        }
        Outcome::Rejected(err) => {
            let status =
                if err.is_client_error() { StatusCode::BAD_REQUEST } else { StatusCode::INTERNAL_SERVER_ERROR };
            json(status, &err.body())
        }
        Outcome::Failed(status) => injected_failure(status),
        Outcome::Dropped => match connection {
            Some(Extension(ConnectInfo(connection))) => {
                connection.cut();
                // Never sent: the first write on the cut connection fails.
                StatusCode::INTERNAL_SERVER_ERROR.into_response()
            }
            None => {
                tracing::warn!("drop fault without a cuttable connection: serve with mock_idp::serve or spawn");
                let body = OAuthError::new("server_error", "mock-idp could not drop this connection");
                json(StatusCode::INTERNAL_SERVER_ERROR, &body)
            }
        },
    }
}

/// The answer to a `fail_next` fault: the status, an OAuth error body, and `Retry-After` where
/// a real server would send one.
fn injected_failure(status: u16) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = OAuthError::new(faults::error_code(status.as_u16()), "injected by mock-idp fail_next");
    let mut reply = json(status, &body);
    if matches!(status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE) {
        reply.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    reply
}

/// A JSON token-endpoint response; none of them may be cached (RFC 6749 §5.1).
fn json(status: StatusCode, body: &impl serde::Serialize) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| br#"{"error":"server_error"}"#.to_vec());
    let mut reply = (status, bytes).into_response();
    let headers = reply.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
    reply
}

async fn jwks(State(idp): State<MockIdp>) -> Json<serde_json::Value> {
    Json(idp.jwks())
}

async fn healthz() -> &'static str {
    "ok\n"
}
