//! Counters of what mock-idp received and issued: how tests and load tests check how many
//! upstream calls the proxy really made.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Lock-free counters. The per-client map is built once from the configured clients and never
/// changes shape, so counting a token is a hash lookup and an atomic add.
#[derive(Debug)]
pub(crate) struct Stats {
    /// Every `POST /oauth2/token` received, whatever its outcome.
    requests_total: AtomicU64,
    /// Tokens issued (200 responses), all clients.
    issued_total: AtomicU64,
    /// Tokens issued per configured client_id.
    issued: HashMap<String, AtomicU64>,
}

/// The counters at one moment, as `GET /admin/stats` shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Snapshot {
    pub requests_total: u64,
    pub issued_total: u64,
    /// Only clients that were issued at least one token: with thousands of generated load-test
    /// clients, listing the zeros would drown the answer.
    pub issued: BTreeMap<String, u64>,
}

impl Stats {
    pub(crate) fn new<'a>(client_ids: impl IntoIterator<Item = &'a str>) -> Stats {
        Stats {
            requests_total: AtomicU64::new(0),
            issued_total: AtomicU64::new(0),
            issued: client_ids.into_iter().map(|id| (id.to_owned(), AtomicU64::new(0))).collect(),
        }
    }

    pub(crate) fn count_request(&self) {
        self.requests_total.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_issued(&self, client_id: &str) {
        self.issued_total.fetch_add(1, Ordering::Relaxed);
        if let Some(counter) = self.issued.get(client_id) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn requests_total(&self) -> u64 {
        self.requests_total.load(Ordering::Relaxed)
    }

    pub(crate) fn issued_total(&self) -> u64 {
        self.issued_total.load(Ordering::Relaxed)
    }

    /// Tokens issued to `client_id`; 0 for a client that is not configured.
    pub(crate) fn issued(&self, client_id: &str) -> u64 {
        self.issued.get(client_id).map_or(0, |counter| counter.load(Ordering::Relaxed))
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot {
            requests_total: self.requests_total(),
            issued_total: self.issued_total(),
            issued: self
                .issued
                .iter()
                .map(|(id, counter)| (id.clone(), counter.load(Ordering::Relaxed)))
                .filter(|(_, count)| *count > 0)
                .collect(),
        }
    }

    pub(crate) fn reset(&self) {
        self.requests_total.store(0, Ordering::Relaxed);
        self.issued_total.store(0, Ordering::Relaxed);
        for counter in self.issued.values() {
            counter.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_client_and_in_total() {
        let stats = Stats::new(["a", "b"]);
        stats.count_request();
        stats.count_request();
        stats.count_issued("a");
        assert_eq!((stats.requests_total(), stats.issued_total()), (2, 1));
        assert_eq!((stats.issued("a"), stats.issued("b"), stats.issued("zz")), (1, 0, 0));
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.issued, BTreeMap::from([("a".to_owned(), 1)]));
        stats.reset();
        assert_eq!(stats.snapshot(), Snapshot { requests_total: 0, issued_total: 0, issued: BTreeMap::new() });
    }
}
