//! Quotas: failed-authentication throttling and the cluster-wide upstream rate cap.

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

/// What a caller may cost the token endpoint.
#[derive(Debug, Clone)]
pub struct QuotaSettings {
    /// Failed-authentication throttling.
    pub auth_failures: AuthFailureLimits,
    /// Upstream calls per second for the whole cluster; 0 = no cap.
    pub upstream_rate_limit: u32,
    /// How long a call over the rate cap waits for a slot. Default 1 s.
    pub upstream_queue_timeout: Duration,
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
        })
    }
}
