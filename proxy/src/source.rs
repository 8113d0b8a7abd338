//! Who is calling: the source address of a request, for the network allowlist and for
//! failed-authentication throttling.
//!
//! The source is the TCP peer, unless the peer is one of the operator's load balancers
//! (`TOKEN_PROXY_TRUSTED_PROXIES`): then it is the nearest `X-Forwarded-For` hop that is not
//! itself a trusted proxy. Anyone else's `X-Forwarded-For` is ignored, so a client cannot pick
//! its own source address.

use std::net::{IpAddr, Ipv6Addr};

use http::HeaderMap;
use ipnet::IpNet;

const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// Where requests come from and which sources may call.
#[derive(Debug, Clone, Default)]
pub struct SourcePolicy {
    /// Networks allowed to call; empty = any.
    pub allowed: Vec<IpNet>,
    /// Load balancers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
}

impl SourcePolicy {
    /// The source address of a request that arrived from `peer`.
    pub fn source(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !contains(&self.trusted_proxies, peer) {
            return peer;
        }
        // Walk the hops from the nearest: each trusted proxy appended the address it saw.
        let mut source = peer;
        for value in headers.get_all(X_FORWARDED_FOR).iter().rev() {
            let Ok(value) = value.to_str() else { return source };
            for hop in value.rsplit(',') {
                let Ok(hop) = hop.trim().parse::<IpAddr>() else { return source };
                source = canonical(hop);
                if !contains(&self.trusted_proxies, source) {
                    return source;
                }
            }
        }
        source
    }

    /// Whether `source` may call at all.
    pub fn allows(&self, source: IpAddr) -> bool {
        self.allowed.is_empty() || contains(&self.allowed, canonical(source))
    }

    /// Whether a connection from `peer` may be served: an allowed source, or a trusted proxy
    /// (whose clients are checked request by request).
    pub fn admits_connection(&self, peer: IpAddr) -> bool {
        self.allows(peer) || contains(&self.trusted_proxies, canonical(peer))
    }

    /// What a connection from `peer` counts against for the per-source connection cap: the peer
    /// itself, with an IPv6 peer's whole /64 as one source (one host commonly holds a /64); or
    /// `None` for a trusted proxy, whose connections carry the requests of many sources.
    pub fn connection_source(&self, peer: IpAddr) -> Option<IpAddr> {
        let peer = canonical(peer);
        if contains(&self.trusted_proxies, peer) {
            return None;
        }
        Some(match peer {
            IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !((1u128 << 64) - 1))),
            v4 => v4,
        })
    }
}

fn contains(networks: &[IpNet], address: IpAddr) -> bool {
    networks.iter().any(|net| net.contains(&address))
}

/// IPv4-mapped IPv6 (`::ffff:10.0.0.1`, what a dual-stack listener reports) as plain IPv4, so
/// IPv4 networks match it.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(X_FORWARDED_FOR, v.parse().unwrap());
        }
        headers
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_for_is_ignored_unless_the_peer_is_a_trusted_proxy() {
        let policy = SourcePolicy { allowed: vec![], trusted_proxies: nets(&["10.0.0.0/24"]) };
        let spoofed = xff(&["203.0.113.9"]);
        assert_eq!(policy.source(ip("192.0.2.1"), &spoofed), ip("192.0.2.1"));
        assert_eq!(policy.source(ip("10.0.0.5"), &spoofed), ip("203.0.113.9"));
        assert_eq!(policy.source(ip("10.0.0.5"), &HeaderMap::new()), ip("10.0.0.5"));
    }

    #[test]
    fn the_nearest_untrusted_hop_is_the_source() {
        let policy = SourcePolicy { allowed: vec![], trusted_proxies: nets(&["10.0.0.0/24"]) };
        // The client wrote "1.1.1.1" itself; the proxies appended what they saw.
        let headers = xff(&["1.1.1.1, 198.51.100.7", "10.0.0.9"]);
        assert_eq!(policy.source(ip("10.0.0.5"), &headers), ip("198.51.100.7"));
        // A malformed hop stops the walk at the last address a trusted proxy vouched for.
        let headers = xff(&["198.51.100.7, garbage, 10.0.0.9"]);
        assert_eq!(policy.source(ip("10.0.0.5"), &headers), ip("10.0.0.9"));
    }

    #[test]
    fn the_allowlist_matches_mapped_ipv4_and_admits_trusted_proxies() {
        let policy = SourcePolicy { allowed: nets(&["192.168.0.0/16"]), trusted_proxies: nets(&["10.0.0.1/32"]) };
        assert!(policy.allows(ip("192.168.3.4")));
        assert!(policy.allows(ip("::ffff:192.168.3.4")));
        assert!(!policy.allows(ip("172.16.0.1")));
        assert!(policy.admits_connection(ip("10.0.0.1")));
        assert!(!policy.allows(ip("10.0.0.1")));
        assert!(!policy.admits_connection(ip("172.16.0.1")));
        assert!(SourcePolicy::default().allows(ip("172.16.0.1")));
    }

    #[test]
    fn connections_count_against_the_peer_its_ipv6_64_or_nothing_for_a_trusted_proxy() {
        let policy = SourcePolicy { allowed: vec![], trusted_proxies: nets(&["10.0.0.0/24"]) };
        assert_eq!(policy.connection_source(ip("192.0.2.7")), Some(ip("192.0.2.7")));
        assert_eq!(policy.connection_source(ip("::ffff:192.0.2.7")), Some(ip("192.0.2.7")));
        assert_eq!(policy.connection_source(ip("2001:db8:1:2:aaaa::1")), Some(ip("2001:db8:1:2::")));
        assert_eq!(policy.connection_source(ip("2001:db8:1:2:ffff::9")), Some(ip("2001:db8:1:2::")));
        assert_eq!(policy.connection_source(ip("10.0.0.5")), None);
    }
}
