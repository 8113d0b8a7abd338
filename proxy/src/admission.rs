//! Admission control of token requests: how many may be in flight, how long each may take.
//! Its own module so that the shared state can hold it without depending on the handler.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::listener::Occupancy;

/// Admission control of token requests: past the concurrency limit a request is shed at once
/// with 503 (a fast answer the load balancer can retry elsewhere, instead of a queue that grows
/// until memory runs out), and no request may take longer than the request timeout. A request
/// is admitted only once its body has arrived, within a body timeout of its own: a client
/// trickling its body holds its own connection, never one of the slots every client shares. A
/// counter, not a semaphore: releasing a tokio semaphore permit takes a lock, on every request.
///
/// The listener caps open connections per source. Connections from a trusted proxy carry many
/// sources, so for them the cap applies here instead, to the unfinished requests of each
/// source the proxy names: a load balancer that does not buffer bodies cannot pass one
/// client's slow flood on to fill the listener.
#[derive(Debug)]
pub struct Admission {
    in_flight: AtomicUsize,
    limit: usize,
    pub request_timeout: Duration,
    pub body_timeout: Duration,
    /// Unfinished requests per source named by a trusted proxy (see above).
    pub(crate) forwarded: Arc<Occupancy>,
}

impl Admission {
    pub fn new(limit: usize, request_timeout: Duration, body_timeout: Duration, per_source: usize) -> Admission {
        let forwarded = Arc::new(Occupancy::new(usize::MAX, per_source));
        Admission { in_flight: AtomicUsize::new(0), limit, request_timeout, body_timeout, forwarded }
    }

    /// A slot for one request, held until dropped; `None` when all are taken.
    pub(crate) fn try_admit(&self) -> Option<Slot<'_>> {
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= self.limit {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(self))
    }
}

pub(crate) struct Slot<'a>(&'a Admission);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}
