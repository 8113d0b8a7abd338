//! A circuit breaker in front of Redis.
//!
//! While Redis is healthy every command goes through. After `threshold` failures in a row the
//! breaker opens: commands fail at once, so requests stop paying the Redis deadline and run on
//! L1, in-process single flight and the upstream (degraded mode). After `cooldown` one probe
//! command is let through; its success closes the breaker, its failure opens it again.

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
    metrics: Arc<Metrics>,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration, metrics: Arc<Metrics>) -> Breaker {
        Breaker { state: Mutex::new(State::Closed { failures: 0 }), threshold: threshold.max(1), cooldown, metrics }
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
                self.metrics.breaker_transition(BreakerState::HalfOpen);
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
                self.metrics.breaker_transition(BreakerState::Closed);
                tracing::info!("redis is back: circuit breaker closed");
                State::Closed { failures: 0 }
            }
            (State::Closed { failures }, false) if failures + 1 < self.threshold => {
                State::Closed { failures: failures + 1 }
            }
            (State::Closed { .. } | State::Probing, false) => {
                if !matches!(*state, State::Probing) {
                    tracing::warn!(cooldown = ?self.cooldown, "redis keeps failing: circuit breaker open, running degraded");
                }
                self.metrics.breaker_transition(BreakerState::Open);
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
            self.metrics.breaker_transition(BreakerState::Closed);
            tracing::info!("redis answers again: circuit breaker closed");
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
}
