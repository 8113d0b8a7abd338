//! A circuit breaker in front of Redis.
//!
//! While Redis is healthy every command goes through. After `threshold` failures in a row the
//! breaker opens: commands fail at once, so requests stop paying the Redis deadline and run on
//! L1, in-process single flight and the upstream (degraded mode). After `cooldown` one probe
//! command is let through; its success closes the breaker, its failure opens it again.
//!
//! The store has one breaker for everything that goes through fred, reported in metrics and
//! `/readyz`; on a Redis Cluster each primary's hit reads have a breaker of their own
//! ([`Breaker::for_shard`]), so that one dead master does not stop the reads of the others.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// The state's vocabulary is a metrics label, so metrics owns it.
use crate::metrics::{BreakerState, Metrics};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is in flight; everyone else is refused until it reports.
    Probing,
}

#[derive(Debug)]
pub struct Breaker {
    state: Mutex<State>,
    threshold: u32,
    cooldown: Duration,
    /// Where the state is reported (`token_proxy_redis_breaker_*`); `None` for a shard's read
    /// breaker, which must not make the store's own gauge say open.
    metrics: Option<Arc<Metrics>>,
    /// The shard (`host:port`) a read breaker guards, for its log lines.
    shard: Option<String>,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration, metrics: Arc<Metrics>) -> Breaker {
        Breaker {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold: threshold.max(1),
            cooldown,
            metrics: Some(metrics),
            shard: None,
        }
    }

    /// The breaker of one Redis Cluster primary's hit reads: logged with the shard's address,
    /// and not reported in the store's breaker metrics.
    pub fn for_shard(threshold: u32, cooldown: Duration, shard: String) -> Breaker {
        Breaker {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold: threshold.max(1),
            cooldown,
            metrics: None,
            shard: Some(shard),
        }
    }

    fn transition(&self, to: BreakerState) {
        if let Some(metrics) = &self.metrics {
            metrics.breaker_transition(to);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a command may go to Redis now.
    pub fn allow(&self) -> bool {
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => true,
            State::Open { until } if Instant::now() >= until => {
                *state = State::Probing;
                self.transition(BreakerState::HalfOpen);
                true
            }
            State::Open { .. } | State::Probing => false,
        }
    }

    /// Reports the result of a command that [`Breaker::allow`] let through.
    pub fn record(&self, ok: bool) {
        let mut state = self.lock();
        let next = match (*state, ok) {
            (State::Closed { .. }, true) => State::Closed { failures: 0 },
            (State::Probing, true) => {
                self.transition(BreakerState::Closed);
                match &self.shard {
                    Some(shard) => tracing::info!(%shard, "redis shard answers reads again: its read breaker closed"),
                    None => tracing::info!("redis is back: circuit breaker closed"),
                }
                State::Closed { failures: 0 }
            }
            (State::Closed { failures }, false) if failures + 1 < self.threshold => {
                State::Closed { failures: failures + 1 }
            }
            (State::Closed { .. } | State::Probing, false) => {
                if !matches!(*state, State::Probing) {
                    match &self.shard {
                        Some(shard) => tracing::warn!(
                            %shard, cooldown = ?self.cooldown,
                            "reads from one redis shard keep failing: its read breaker is open (other shards unaffected)"
                        ),
                        None => tracing::warn!(
                            cooldown = ?self.cooldown,
                            "redis keeps failing: circuit breaker open, running degraded"
                        ),
                    }
                }
                self.transition(BreakerState::Open);
                State::Open { until: Instant::now() + self.cooldown }
            }
            // A slow command finishing after the breaker opened changes nothing.
            (open @ State::Open { .. }, _) => open,
        };
        *state = next;
    }

    /// Redis answers again after it did not (a failover completed, a restart): an open
    /// breaker closes now rather than after its cooldown and probe, so that a failover costs
    /// no more degraded time than it lasts.
    pub fn recovered(&self) {
        let mut state = self.lock();
        if !matches!(*state, State::Closed { .. }) {
            self.transition(BreakerState::Closed);
            match &self.shard {
                Some(shard) => tracing::info!(%shard, "redis answers again: the shard's read breaker closed"),
                None => tracing::info!("redis answers again: circuit breaker closed"),
            }
        }
        *state = State::Closed { failures: 0 };
    }

    pub fn state(&self) -> BreakerState {
        match *self.lock() {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::Probing => BreakerState::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(cooldown: Duration) -> Breaker {
        Breaker::new(3, cooldown, Arc::new(Metrics::new()))
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let b = breaker(Duration::from_secs(60));
        for _ in 0..5 {
            b.record(false);
            b.record(false);
            b.record(true);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        b.record(false);
        b.record(false);
        b.record(false);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.allow());
    }

    #[test]
    fn probes_after_cooldown_and_closes_on_success() {
        let b = breaker(Duration::ZERO);
        (0..3).for_each(|_| b.record(false));
        assert!(b.allow(), "the probe goes through");
        assert!(!b.allow(), "only one probe at a time");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.record(true);
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.allow());
    }

    #[test]
    fn a_failed_probe_opens_again() {
        let b = breaker(Duration::ZERO);
        (0..3).for_each(|_| b.record(false));
        assert!(b.allow());
        b.record(false);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn recovery_closes_an_open_breaker_at_once() {
        let b = breaker(Duration::from_secs(60));
        (0..3).for_each(|_| b.record(false));
        assert!(!b.allow());
        b.recovered();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.allow());
        b.record(false);
        b.record(false);
        assert_eq!(b.state(), BreakerState::Closed, "the failure count started again");
    }

    #[test]
    fn transitions_are_counted() {
        let metrics = Arc::new(Metrics::new());
        let b = Breaker::new(1, Duration::ZERO, Arc::clone(&metrics));
        b.record(false);
        assert!(b.allow());
        b.record(true);
        let text = metrics.render();
        assert!(text.contains("token_proxy_redis_breaker_transitions_total{to=\"open\"} 1"), "{text}");
        assert!(text.contains("token_proxy_redis_breaker_transitions_total{to=\"closed\"} 1"), "{text}");
        assert!(text.contains("token_proxy_redis_breaker_open 0"), "{text}");
    }

    #[test]
    fn a_shard_breaker_works_alike_and_reports_nothing() {
        let b = Breaker::for_shard(2, Duration::from_secs(60), "10.0.0.1:6379".to_owned());
        b.record(false);
        b.record(false);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.allow());
        b.recovered();
        assert!(b.allow());
    }
}
