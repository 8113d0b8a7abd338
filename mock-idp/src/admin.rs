//! The admin API: counters and fault controls over HTTP, for runs where the test cannot hold
//! a [`MockIdp`] (docker compose, the load-test runner).
//!
//! - `GET /admin/stats`: `{"requests_total": N, "issued_total": N, "issued": {"client": n}}`
//! - `GET /admin/faults`: the current settings.
//! - `POST /admin/faults`: change the fields given, e.g. `{"fail_next": {"count": 2, "status": 503}}`;
//!   answers with the settings after the change.
//! - `POST /admin/reset`: back to the start-up state (counters, faults, latency, lifetime).

use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use shared::wire::OAuthError;

use crate::faults;
use crate::idp::MockIdp;

pub(crate) fn routes() -> Router<MockIdp> {
    Router::new()
        .route("/admin/stats", get(stats))
        .route("/admin/faults", get(faults).post(set_faults))
        .route("/admin/reset", post(reset))
}

/// A change of fault settings: only the fields present change.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultsUpdate {
    latency_ms: Option<u64>,
    fail_next: Option<FailNext>,
    hang_next: Option<u32>,
    drop_next: Option<u32>,
    token_lifetime_secs: Option<u64>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct FailNext {
    count: u32,
    status: u16,
}

/// The settings in force, in the same shape as [`FaultsUpdate`].
#[derive(Debug, Serialize)]
struct FaultSettings {
    latency_ms: u64,
    fail_next: Option<FailNext>,
    hang_next: u32,
    drop_next: u32,
    token_lifetime_secs: u64,
}

impl FaultSettings {
    fn of(idp: &MockIdp) -> FaultSettings {
        let pending = idp.pending_faults();
        FaultSettings {
            latency_ms: u64::try_from(idp.latency().as_millis()).unwrap_or(u64::MAX),
            fail_next: pending.fail.map(|(count, status)| FailNext { count, status }),
            hang_next: pending.hang,
            drop_next: pending.drop,
            token_lifetime_secs: idp.token_lifetime().as_secs(),
        }
    }
}

async fn stats(State(idp): State<MockIdp>) -> Response {
    Json(idp.stats()).into_response()
}

async fn faults(State(idp): State<MockIdp>) -> Response {
    Json(FaultSettings::of(&idp)).into_response()
}

async fn set_faults(State(idp): State<MockIdp>, body: Bytes) -> Response {
    // Parsed by hand rather than with the `Json` extractor, so that mistakes get the same
    // OAuth-style JSON error as everything else, and no content type is required of curl users.
    let update: FaultsUpdate = match serde_json::from_slice(&body) {
        Ok(update) => update,
        Err(err) => return bad_request(format!("expected a JSON object of fault settings: {err}")),
    };
    // Validate everything before changing anything.
    if let Some(status) = update.fail_next.map(|f| f.status).filter(|s| !faults::is_injectable(*s)) {
        return bad_request(format!("fail_next.status must be a 4xx or 5xx status, not {status}"));
    }

    if let Some(ms) = update.latency_ms {
        idp.set_latency(Duration::from_millis(ms));
    }
    if let Some(FailNext { count, status }) = update.fail_next {
        idp.fail_next(count, status);
    }
    if let Some(count) = update.hang_next {
        idp.hang_next(count);
    }
    if let Some(count) = update.drop_next {
        idp.drop_next(count);
    }
    if let Some(secs) = update.token_lifetime_secs {
        idp.set_token_lifetime(Duration::from_secs(secs));
    }
    let settings = FaultSettings::of(&idp);
    tracing::info!(?settings, "fault settings changed");
    Json(settings).into_response()
}

async fn reset(State(idp): State<MockIdp>) -> StatusCode {
    idp.reset();
    tracing::info!("counters and faults reset");
    StatusCode::NO_CONTENT
}

fn bad_request(description: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(OAuthError::new("invalid_request", description))).into_response()
}
