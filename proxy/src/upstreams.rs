//! The token endpoints one deployment serves, and which one a request reaches (README,
//! "Several user pools or IdPs").
//!
//! Without names (`TOKEN_PROXY_UPSTREAM_URL` alone) there is one upstream, at `/oauth2/token`.
//! With `[upstreams.NAME]` tables in the configuration file, `/NAME/oauth2/token` reaches `NAME`
//! and `/oauth2/token` the `default_upstream`, if one is set; it is the same service, so the two
//! routes share their entries. A table's `hosts` route `/oauth2/token` by the request's `Host`
//! (for clients that cannot change their path): a listed host reaches that upstream, any other
//! the default. Each upstream has a [`TokenService`] of its own (its client,
//! freshness, flight timing, throttle and rate cap); they share the store, L1 and the purge
//! epochs, and the upstream is part of every key they use, so entries never cross.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::purge::{PurgeError, PurgeTarget};
use crate::store::RedisStore;
use crate::token_service::TokenService;

/// Longest upstream name: it appears in paths, metrics and Redis key names.
pub const MAX_NAME_LEN: usize = 64;

/// Whether `name` may name an upstream: letters, digits, `-` and `_`, at most
/// [`MAX_NAME_LEN`] bytes.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `host` as a `hosts` entry: lower case, without a trailing dot; `None` unless it is a DNS
/// name (letters, digits, `-` and `.`, no empty label, at most 253 bytes). No port.
pub fn host_name(host: &str) -> Option<String> {
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty() && label.len() <= 63 && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    valid.then_some(host)
}

/// A request's host (`Host`, or the HTTP/2 authority) as a `hosts` entry: without its port.
fn requested_host(authority: &str) -> Option<String> {
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    };
    host_name(host)
}

/// The upstreams of a replica. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Upstreams {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    by_name: BTreeMap<String, TokenService>,
    /// What `/oauth2/token` reaches.
    default: Option<TokenService>,
    /// What `/oauth2/token` reaches for a listed `Host` (normalized, see [`host_name`]).
    by_host: HashMap<String, TokenService>,
    /// Any one service: the holder of what they share (the store, the purge epochs).
    first: TokenService,
}

impl Upstreams {
    /// One upstream without a name, at `/oauth2/token`.
    pub fn single(service: TokenService) -> Upstreams {
        let inner =
            Inner { by_name: BTreeMap::new(), default: Some(service.clone()), by_host: HashMap::new(), first: service };
        Upstreams { inner: Arc::new(inner) }
    }

    /// Named upstreams (at least one); `default` names the one `/oauth2/token` reaches, and
    /// `hosts` (host name, upstream name) the ones it reaches for those hosts.
    pub fn named(
        by_name: BTreeMap<String, TokenService>,
        default: Option<&str>,
        hosts: impl IntoIterator<Item = (String, String)>,
    ) -> Upstreams {
        let first = by_name.values().next().expect("at least one upstream").clone();
        let default = default.and_then(|name| by_name.get(name)).cloned();
        let by_host = hosts
            .into_iter()
            .map(|(host, name)| (host, by_name.get(&name).expect("a host routes to a configured upstream").clone()))
            .collect();
        Upstreams { inner: Arc::new(Inner { by_name, default, by_host, first }) }
    }

    /// The service `/oauth2/token` reaches for a request to `host` (its `Host` header or
    /// authority, port included or not): the upstream that lists it, or the default, if any.
    pub fn default_service(&self, host: Option<&str>) -> Option<&TokenService> {
        if !self.inner.by_host.is_empty() {
            if let Some(service) = host.and_then(requested_host).and_then(|h| self.inner.by_host.get(&h)) {
                return Some(service);
            }
        }
        self.inner.default.as_ref()
    }

    /// The service `/NAME/oauth2/token` reaches, if `NAME` is configured.
    pub fn named_service(&self, name: &str) -> Option<&TokenService> {
        self.inner.by_name.get(name)
    }

    /// Whether `name` is a configured upstream.
    pub fn is_named(&self, name: &str) -> bool {
        self.inner.by_name.contains_key(name)
    }

    /// The Redis store, if one is configured (shared by every upstream).
    pub fn store(&self) -> Option<&RedisStore> {
        self.inner.first.store()
    }

    /// Whether this replica knows the purge epochs (shared by every upstream).
    pub fn purges_synced(&self) -> bool {
        self.inner.first.purges_synced()
    }

    /// Purges `target` on every replica: see [`TokenService::purge`]. The epochs are shared,
    /// so any one service applies a purge for all.
    pub async fn purge(&self, target: &PurgeTarget) -> Result<u64, PurgeError> {
        self.inner.first.purge(target).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_dns_names_compared_without_case_trailing_dot_or_port() {
        assert_eq!(host_name("Auth.Example.COM.").as_deref(), Some("auth.example.com"));
        assert_eq!(host_name("localhost").as_deref(), Some("localhost"));
        for bad in ["", ".", "a..b", "a b", "a:80", "*.example.com", "a_b.example", &"a".repeat(64), "[::1]"] {
            assert_eq!(host_name(bad), None, "{bad:?}");
        }
        assert_eq!(requested_host("Auth.Example.com:8443").as_deref(), Some("auth.example.com"));
        assert_eq!(requested_host("auth.example.com").as_deref(), Some("auth.example.com"));
        assert_eq!(requested_host("[::1]:8080"), None);
        assert_eq!(requested_host("a:b"), None);
    }

    #[test]
    fn names_are_letters_digits_dashes_and_underscores() {
        for good in ["orders-prod", "partners", "eu_west_1", "A1", &"x".repeat(MAX_NAME_LEN)] {
            assert!(is_valid_name(good), "{good}");
        }
        for bad in ["", "orders prod", "a/b", "oauth2.token", "é", "a%2Fb", &"x".repeat(MAX_NAME_LEN + 1)] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
    }
}
