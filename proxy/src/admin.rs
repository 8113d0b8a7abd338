//! The admin listener: `/healthz`, `/readyz` and `/metrics`. Keep it off the public network.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use http::{StatusCode, header};
use serde_json::json;

use crate::app::AppState;
use crate::breaker::BreakerState;

pub fn admin_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// The process is alive.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready to serve. A replica whose Redis is down still serves (degraded, from L1 and the
/// upstream), so it stays ready: taking it out of the load balancer would only shed capacity.
/// Only shutdown makes it unready, so the load balancer drains it first.
async fn readyz(State(state): State<AppState>) -> Response {
    let (redis, breaker) = match state.service.store() {
        None => ("disabled", BreakerState::Closed),
        Some(store) => (if store.is_connected() { "up" } else { "down" }, store.breaker_state()),
    };
    let ready = !state.is_shutting_down();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let degraded = redis == "down" || breaker != BreakerState::Closed;
    let mode = if degraded { "degraded" } else { "normal" };
    (status, Json(json!({ "ready": ready, "redis": redis, "breaker": breaker.label(), "mode": mode }))).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}
