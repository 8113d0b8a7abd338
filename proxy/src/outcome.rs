//! What a fetch produced and where it came from: the vocabulary shared by the token service,
//! the cluster flight (which announces it to followers, see [`crate::flight_message`]) and the
//! response mapping (which turns it into `X-Cache` and a body, see [`crate::response`]). It
//! imports nothing that does I/O, so every layer may name an outcome.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

use crate::entry::CachedToken;
use crate::upstream::{UpstreamError, UpstreamResponse};

/// The upstream gave no usable answer.
#[derive(Debug, Clone)]
pub enum UpstreamFailure {
    Unreachable(UpstreamError),
    /// A 5xx (or another status a token endpoint must not send).
    BadStatus(UpstreamResponse),
}

/// A call the guards refused before it reached the upstream: answered 429 with `Retry-After`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Why, for the caller (never names a secret).
    pub reason: &'static str,
    pub retry_after: Duration,
}

/// Why the failed-authentication throttle refused a call.
pub const THROTTLED: &str = "too many failed authentications for this client; retry later";
/// Why the upstream rate cap refused a call.
pub const RATE_CAPPED: &str = "the token endpoint's rate cap is reached; retry later";
/// Why the client's call budget refused a call.
pub const BUDGET_SPENT: &str = "this client's upstream call budget is spent; retry later";
/// Every reason a call may be refused for (an announcement names one by its place here: new
/// reasons go at the end).
pub const REFUSAL_REASONS: [&str; 3] = [THROTTLED, RATE_CAPPED, BUDGET_SPENT];

/// What a fetch (or an announcement) carries.
#[derive(Debug, Clone)]
pub enum Outcome {
    Token(Arc<CachedToken>),
    /// The upstream's answer, relayed as is (never cached).
    Relayed(UpstreamResponse),
    Failed(UpstreamFailure),
    /// The quota's guards refused the call: no upstream call was made.
    Refused(Refused),
}

impl Outcome {
    /// An upstream result that is not a cacheable token, sorted into relayed answers (2xx and
    /// 4xx: the client's business) and failures (5xx, no answer).
    pub fn classify(result: Result<UpstreamResponse, UpstreamError>) -> Outcome {
        match result {
            Err(error) => Outcome::Failed(UpstreamFailure::Unreachable(error)),
            Ok(response) if response.status.is_success() || response.status.is_client_error() => {
                Outcome::Relayed(response)
            }
            Ok(response) => Outcome::Failed(UpstreamFailure::BadStatus(response)),
        }
    }

    /// Failures after which a still-servable older token is served instead (stale-if-error).
    pub fn is_upstream_trouble(&self) -> bool {
        match self {
            Outcome::Failed(_) | Outcome::Refused(_) => true,
            Outcome::Relayed(response) => response.status == StatusCode::TOO_MANY_REQUESTS,
            Outcome::Token(_) => false,
        }
    }
}

/// Where a fetch's answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// An entry in Redis, or this replica's own token (put back, or served while Redis is down).
    Cache,
    /// This replica called the upstream.
    Upstream,
    /// Another replica called the upstream and announced the outcome.
    Peer,
    /// The upstream failed; an older, still servable token stands in.
    Stale,
}

/// What one fetch produced; shared by every caller of the flight on this replica.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub source: Source,
    pub outcome: Outcome,
}

impl Fetched {
    pub fn new(source: Source, outcome: Outcome) -> Fetched {
        Fetched { source, outcome }
    }

    /// The token, if the fetch produced one.
    pub fn token(&self) -> Option<&Arc<CachedToken>> {
        match &self.outcome {
            Outcome::Token(token) => Some(token),
            _ => None,
        }
    }
}
