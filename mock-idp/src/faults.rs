//! Fault injection for token requests: added latency, then one-shot failures, hangs and
//! dropped connections, so the proxy's handling of a misbehaving upstream can be tested for
//! real.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// What happens to one token request instead of normal processing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Answer with this 4xx/5xx status and an OAuth error body.
    Fail(u16),
    /// Never answer (until the server shuts down); the client has to time out.
    Hang,
    /// Close the connection without a response.
    Drop,
}

/// The pending one-shot faults, as reported by the admin API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Pending {
    /// `(count, status)`: the next `count` requests fail with `status`.
    pub fail: Option<(u32, u16)>,
    pub hang: u32,
    pub drop: u32,
}

/// The fault settings of one mock-idp. Cheap on the no-fault path: one atomic load and one
/// uncontended lock per request.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    /// Delay added before every token request, in nanoseconds (atomic so the hot path never
    /// locks for it).
    latency_nanos: AtomicU64,
    /// One lock for all counters, so that taking "the next fault" is a single decision even
    /// when requests race.
    pending: Mutex<Pending>,
}

/// Whether `status` can be injected with [`Faults::fail_next`]: an error status, 4xx or 5xx.
pub(crate) fn is_injectable(status: u16) -> bool {
    (400..=599).contains(&status)
}

/// The OAuth `error` code sent with an injected failure of `status`.
pub(crate) fn error_code(status: u16) -> &'static str {
    match status {
        401 => "invalid_client",
        429 => "too_many_requests",
        503 => "temporarily_unavailable",
        500..=599 => "server_error",
        _ => "invalid_request",
    }
}

impl Faults {
    pub(crate) fn new(latency: Duration) -> Faults {
        let faults = Faults::default();
        faults.set_latency(latency);
        faults
    }

    pub(crate) fn latency(&self) -> Duration {
        Duration::from_nanos(self.latency_nanos.load(Ordering::Relaxed))
    }

    pub(crate) fn set_latency(&self, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.latency_nanos.store(nanos, Ordering::Relaxed);
    }

    /// The next `count` requests fail with `status` (replacing any pending failures).
    pub(crate) fn fail_next(&self, count: u32, status: u16) {
        self.lock().fail = (count > 0).then_some((count, status));
    }

    /// The next `count` requests hang (replacing any pending count).
    pub(crate) fn hang_next(&self, count: u32) {
        self.lock().hang = count;
    }

    /// The next `count` requests have their connection dropped (replacing any pending count).
    pub(crate) fn drop_next(&self, count: u32) {
        self.lock().drop = count;
    }

    /// Takes the fault for the request at hand, if any: failures first, then hangs, then drops.
    pub(crate) fn take(&self) -> Option<Fault> {
        let mut pending = self.lock();
        if let Some((count, status)) = pending.fail {
            pending.fail = (count > 1).then_some((count - 1, status));
            return Some(Fault::Fail(status));
        }
        if pending.hang > 0 {
            pending.hang -= 1;
            return Some(Fault::Hang);
        }
        if pending.drop > 0 {
            pending.drop -= 1;
            return Some(Fault::Drop);
        }
        None
    }

    pub(crate) fn pending(&self) -> Pending {
        *self.lock()
    }

    /// Clears every pending fault and sets the latency back to `latency`.
    pub(crate) fn clear(&self, latency: Duration) {
        *self.lock() = Pending::default();
        self.set_latency(latency);
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        // The guarded data is plain counters, valid whatever a panicking holder did.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_taken_in_order_and_counted_down() {
        let faults = Faults::default();
        faults.drop_next(1);
        faults.hang_next(1);
        faults.fail_next(2, 503);
        let taken: Vec<_> = std::iter::from_fn(|| faults.take()).collect();
        assert_eq!(taken, [Fault::Fail(503), Fault::Fail(503), Fault::Hang, Fault::Drop]);
        assert_eq!(faults.pending(), Pending::default());
    }

    #[test]
    fn setting_a_count_replaces_the_pending_one() {
        let faults = Faults::default();
        faults.fail_next(5, 500);
        faults.fail_next(1, 429);
        assert_eq!(faults.take(), Some(Fault::Fail(429)));
        assert_eq!(faults.take(), None);
        faults.hang_next(3);
        faults.hang_next(0);
        assert_eq!(faults.take(), None);
    }

    #[test]
    fn clear_resets_counts_and_latency() {
        let faults = Faults::new(Duration::from_millis(5));
        faults.set_latency(Duration::from_secs(1));
        faults.drop_next(4);
        faults.clear(Duration::from_millis(5));
        assert_eq!(faults.latency(), Duration::from_millis(5));
        assert_eq!(faults.take(), None);
    }

    #[test]
    fn error_codes_follow_the_status() {
        assert_eq!(error_code(400), "invalid_request");
        assert_eq!(error_code(429), "too_many_requests");
        assert_eq!(error_code(500), "server_error");
        assert_eq!(error_code(503), "temporarily_unavailable");
        assert!(is_injectable(400) && is_injectable(599));
        assert!(!is_injectable(200) && !is_injectable(600) && !is_injectable(399));
    }
}
