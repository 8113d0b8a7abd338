//! Quotas: failed-authentication throttling, the cluster-wide upstream rate cap and the
//! per-client call budgets.

use std::time::Duration;

use super::{ConfigError, Setting, Source};
use crate::quota::{AuthFailureLimits, Quota};

pub static AUTH_FAILURE_LIMIT: Setting = Setting {
    name: "TOKEN_PROXY_AUTH_FAILURE_LIMIT",
    default: Some("5"),
    help: "failed authentications (invalid_client) per client_id and source address in a window before 429; 0 = off",
};
pub static AUTH_FAILURE_CLIENT_LIMIT: Setting = Setting {
    name: "TOKEN_PROXY_AUTH_FAILURE_CLIENT_LIMIT",
    default: Some("50"),
    help: "failed authentications per client_id from all sources in a window before 429; 0 = off",
};
pub static AUTH_FAILURE_WINDOW: Setting = Setting {
    name: "TOKEN_PROXY_AUTH_FAILURE_WINDOW",
    default: Some("60s"),
    help: "the window in which failed authentications are counted",
};
pub static UPSTREAM_RATE_LIMIT: Setting = Setting {
    name: "TOKEN_PROXY_UPSTREAM_RATE_LIMIT",
    default: Some("0"),
    help: "upstream calls per second for the whole cluster (per replica when Redis is down); 0 = no cap",
};
pub static UPSTREAM_QUEUE_TIMEOUT: Setting = Setting {
    name: "TOKEN_PROXY_UPSTREAM_QUEUE_TIMEOUT",
    default: Some("1s"),
    help: "how long a call over the upstream rate cap waits for a slot before 429",
};

pub static CLIENT_CALL_BUDGET: Setting = Setting {
    name: "TOKEN_PROXY_CLIENT_CALL_BUDGET",
    default: Some("0"),
    help: "upstream calls per client_id (all its scopes) per budget window, for the whole cluster (per replica when Redis is down); 0 = no budget",
};
pub static CLIENT_CALL_BUDGET_WINDOW: Setting = Setting {
    name: "TOKEN_PROXY_CLIENT_CALL_BUDGET_WINDOW",
    default: Some("1h"),
    help: "the sliding window of the client call budget",
};

/// What a caller may cost the token endpoint.
#[derive(Debug, Clone)]
pub struct QuotaSettings {
    /// Failed-authentication throttling.
    pub auth_failures: AuthFailureLimits,
    /// Upstream calls per second for the whole cluster; 0 = no cap.
    pub upstream_rate_limit: u32,
    /// How long a call over the rate cap waits for a slot. Default 1 s.
    pub upstream_queue_timeout: Duration,
    /// Upstream calls per client per window; 0 = no budget.
    pub client_call_budget: u32,
    pub client_call_budget_window: Duration,
}

impl QuotaSettings {
    pub(super) fn parse(source: &Source) -> Result<QuotaSettings, ConfigError> {
        let auth_failures = AuthFailureLimits {
            per_source: source.parse(&AUTH_FAILURE_LIMIT, "a whole number")?,
            per_client: source.parse(&AUTH_FAILURE_CLIENT_LIMIT, "a whole number")?,
            window: source.duration(&AUTH_FAILURE_WINDOW)?,
        };
        if auth_failures.window.is_zero() {
            return Err(source.error(&AUTH_FAILURE_WINDOW, "must be more than zero"));
        }
        Ok(QuotaSettings {
            auth_failures,
            upstream_rate_limit: source.parse(&UPSTREAM_RATE_LIMIT, "a whole number")?,
            upstream_queue_timeout: source.duration(&UPSTREAM_QUEUE_TIMEOUT)?,
            client_call_budget: source.parse(&CLIENT_CALL_BUDGET, "a whole number")?,
            client_call_budget_window: match source.duration(&CLIENT_CALL_BUDGET_WINDOW)? {
                window if window < Duration::from_secs(1) => {
                    return Err(source.error(&CLIENT_CALL_BUDGET_WINDOW, "must be at least 1s"));
                }
                window => window,
            },
        })
    }

    /// The quota; `busy_wait` bounds how long an attempt waits for calls in flight to settle
    /// (one upstream exchange should do).
    pub fn quota(&self, busy_wait: Duration) -> Quota {
        Quota::new(crate::quota::QuotaSettings {
            auth: self.auth_failures,
            busy_wait,
            rate_per_second: self.upstream_rate_limit,
            queue_timeout: self.upstream_queue_timeout,
            budget: self.client_call_budget,
            budget_window: self.client_call_budget_window,
        })
    }
}
