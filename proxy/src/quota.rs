//! Protecting the upstream's quota: every upstream call costs money and counts against a rate
//! limit shared by the whole fleet.
//!
//! - **Failed-authentication throttling.** Credentials that match a cached entry never reach
//!   this code: a caller whose secret is right keeps being served while its client_id is under
//!   attack. Only calls made for credentials nobody has proven yet are counted, per client_id
//!   and source address and per client_id alone: failures (`invalid_client`), and calls in
//!   flight. Failures at a limit refuse further attempts until the window ends. Failures plus
//!   calls in flight at the per-client limit (or at the per-source limit, once that source has
//!   failed) make further attempts wait for one to settle. So a concurrent burst of guesses
//!   cannot overshoot the per-client limit while the first guesses are being answered, and an
//!   honest burst of many new keys is at most slowed to that limit's concurrency, not refused.
//!   Requests of other grants that present a client secret are counted the same way (nothing
//!   of theirs is cached, so they are never proven): the upstream checks their secret too.
//! - **Upstream rate cap.** At most N calls per second for the whole cluster; a call over the cap
//!   waits briefly for the next second, then gives up with 429.
//!
//! Both count in Redis, so the limits hold for the cluster. While Redis is unavailable each
//! replica counts on its own: the limits then hold per replica.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::StatusCode;
use shared::keys::{KeyHasher, Tag};

use crate::entry::unit_random;
use crate::error_code::ErrorCode;
use crate::metrics::{Metrics, Throttle};
use crate::outcome::{BUDGET_SPENT, RATE_CAPPED, Refused, THROTTLED};
use crate::store::{AuthCounters, RedisStore, Verdict};

/// Most (client, source) and client counters one replica tracks on its own. Beyond it, new
/// unproven credentials are refused until old windows end: under an attack that large, the
/// upstream quota matters more than a new client's first token.
const LOCAL_COUNTERS: usize = 65_536;
/// Queued calls start the next window spread over this much, not all in its first millisecond.
const QUEUE_JITTER: Duration = Duration::from_millis(50);
/// How often an attempt waiting for calls in flight to settle looks again.
const BUSY_POLL: Duration = Duration::from_millis(20);

/// The quota guards of one replica.
#[derive(Debug)]
pub struct Quota {
    settings: QuotaSettings,
    /// The named upstream these guards are for (`None`: the one upstream of a deployment
    /// without names): each upstream has its own counters and rate cap.
    upstream: Option<String>,
    local_auth: Mutex<LocalCounters>,
    local_rate: Mutex<RateWindow>,
    /// The calls of each client's budget while Redis is down: their instants, oldest first.
    local_budgets: Mutex<HashMap<Tag, VecDeque<Instant>>>,
}

/// One call counted against a client's budget, to give back if it was not the client's.
#[derive(Debug)]
pub struct BudgetCall {
    tag: Tag,
    charged: Charged,
}

/// Where a budget call was counted.
#[derive(Debug)]
enum Charged {
    /// In Redis's sorted set, under this member.
    Redis(String),
    /// On this replica, at this instant.
    Local(Instant),
}

/// Clients whose budgets a replica tracks alone (while Redis is down) before it forgets those
/// with no call in the window.
const MAX_LOCAL_BUDGETS: usize = 10_000;

/// Thresholds of failed-authentication throttling, counted over `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthFailureLimits {
    /// Per client_id and source address; 0 = off. Default 5.
    pub per_source: u32,
    /// Per client_id, from all sources; 0 = off. Default 50.
    pub per_client: u32,
    /// Default 60 s.
    pub window: Duration,
}

/// Settings of [`Quota`].
#[derive(Debug, Clone, Copy)]
pub struct QuotaSettings {
    pub auth: AuthFailureLimits,
    /// Longest an attempt waits for calls in flight to settle (one upstream exchange should do).
    pub busy_wait: Duration,
    pub rate_per_second: u32,
    pub queue_timeout: Duration,
    /// Upstream calls per client per `budget_window`; 0 = no budget.
    pub budget: u32,
    pub budget_window: Duration,
}

/// An authentication attempt that was counted, to be settled once its outcome is known.
#[derive(Debug)]
pub struct Attempt {
    counters: Counted,
}

#[derive(Debug)]
enum Counted {
    Nothing,
    Redis(AuthCounters),
    Local([CounterName; 2]),
}

type CounterName = [u8; 16];

#[derive(Debug, Default)]
struct LocalCounters(HashMap<CounterName, Window>);

#[derive(Debug, Clone, Copy)]
struct Window {
    failures: u32,
    in_flight: u32,
    ends: Instant,
}

#[derive(Debug)]
struct RateWindow {
    /// `None` until the first call.
    started: Option<Instant>,
    count: u32,
}

impl Quota {
    pub fn new(settings: QuotaSettings) -> Quota {
        Quota {
            settings,
            upstream: None,
            local_auth: Mutex::default(),
            local_rate: Mutex::new(RateWindow { started: None, count: 0 }),
            local_budgets: Mutex::default(),
        }
    }

    /// The same guards for the named upstream `name`.
    pub fn at_upstream(self, name: Option<String>) -> Quota {
        Quota { upstream: name, ..self }
    }

    /// Admits one upstream call for credentials nobody has proven yet: counted as in flight,
    /// after waiting (up to the busy wait) while calls in flight fill a limit, or refused when
    /// `client_id` has failed too often (from `source`, or from everywhere).
    pub async fn attempt(
        &self,
        store: Option<&RedisStore>,
        hasher: &KeyHasher,
        client_id: &str,
        source: IpAddr,
        metrics: &Metrics,
    ) -> Result<Attempt, Refused> {
        let limits = self.limits();
        if limits == [0, 0] {
            return Ok(Attempt { counters: Counted::Nothing });
        }
        let (client, per_source) = hasher.throttle_tags_at(self.upstream.as_deref(), client_id, &address_bytes(source));
        let give_up_at = Instant::now() + self.settings.busy_wait;
        loop {
            let (verdict, counters) = match store {
                Some(store) => {
                    let counters = AuthCounters::new(client, per_source);
                    match store.auth_attempt(&counters, limits, self.settings.auth.window).await {
                        Ok(verdict) => (verdict, Counted::Redis(counters)),
                        // Redis is failing: count here instead.
                        Err(_) => self.local_attempt([per_source, client], limits),
                    }
                }
                None => self.local_attempt([per_source, client], limits),
            };
            match verdict {
                Verdict::Counted => return Ok(Attempt { counters }),
                Verdict::Refused(left) => return Err(self.throttled(client_id, left, metrics)),
                Verdict::Busy if Instant::now() + BUSY_POLL > give_up_at => {
                    return Err(self.throttled(client_id, Duration::from_secs(1), metrics));
                }
                Verdict::Busy => tokio::time::sleep(BUSY_POLL).await,
            }
        }
    }

    fn local_attempt(&self, names: [CounterName; 2], limits: [u32; 2]) -> (Verdict, Counted) {
        let verdict = self.lock_auth().attempt(names, limits, self.settings.auth.window, Instant::now());
        (verdict, Counted::Local(names))
    }

    /// Settles an admitted attempt: no longer in flight, and a failure if the upstream said
    /// `invalid_client`.
    pub async fn settle(
        &self,
        store: Option<&RedisStore>,
        attempt: Attempt,
        failed_authentication: bool,
        metrics: &Metrics,
    ) {
        if failed_authentication {
            metrics.auth_failure();
        }
        let limits = self.limits();
        match (attempt.counters, store) {
            (Counted::Nothing, _) | (Counted::Redis(_), None) => {}
            (Counted::Redis(counters), Some(store)) => {
                // If Redis fails now, the attempt stays in flight until its window ends.
                let _ = store.auth_settle(&counters, failed_authentication, limits, self.settings.auth.window).await;
            }
            (Counted::Local(names), _) => {
                self.lock_auth().settle(
                    names,
                    failed_authentication,
                    limits,
                    self.settings.auth.window,
                    Instant::now(),
                );
            }
        }
    }

    /// Takes a slot of the upstream rate cap, waiting up to the queue timeout for one.
    pub async fn upstream_slot(&self, store: Option<&RedisStore>, metrics: &Metrics) -> Result<(), Refused> {
        if self.settings.rate_per_second == 0 {
            return Ok(());
        }
        let give_up_at = Instant::now() + self.settings.queue_timeout;
        loop {
            let remote = match store {
                Some(store) => store.rate_slot(self.upstream.as_deref(), self.settings.rate_per_second).await.ok(),
                None => None,
            };
            let wait = match remote {
                Some(wait) => wait,
                None => self.local_rate_slot(Instant::now()),
            };
            let Some(wait) = wait else { return Ok(()) };
            let wait = wait + QUEUE_JITTER.mul_f64(unit_random());
            if Instant::now() + wait > give_up_at {
                metrics.throttled(Throttle::RateCap);
                return Err(Refused { reason: RATE_CAPPED, retry_after: Duration::from_secs(1) });
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Takes one upstream call of `client_id`'s budget at this upstream, over a sliding window:
    /// counted cluster-wide in Redis, per replica while Redis is down. Spent: refused, retry
    /// when the oldest call leaves the window. Only calls that go upstream are counted: take
    /// it just before the call, and [`Quota::budget_refund`] it if the upstream refused the
    /// credentials. `None`: no budget.
    pub async fn budget_call(
        &self,
        store: Option<&RedisStore>,
        hasher: &KeyHasher,
        client_id: &str,
        metrics: &Metrics,
    ) -> Result<Option<BudgetCall>, Refused> {
        let (budget, window) = (self.settings.budget, self.settings.budget_window);
        if budget == 0 {
            return Ok(None);
        }
        let tag = hasher.budget_tag(self.upstream.as_deref(), client_id);
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).expect("the OS random source is available");
        let id = hex::encode(id);
        let remote = match store {
            Some(store) => store.budget_call(tag, &id, budget, window).await.ok(),
            None => None,
        };
        let (wait, call) = match remote {
            Some(wait) => (wait, BudgetCall { tag, charged: Charged::Redis(id) }),
            None => {
                let now = Instant::now();
                (self.local_budget_call(tag, now), BudgetCall { tag, charged: Charged::Local(now) })
            }
        };
        match wait {
            None => Ok(Some(call)),
            Some(wait) => {
                metrics.throttled(Throttle::ClientBudget);
                tracing::info!(client_id, ?wait, "client call budget spent; refusing the upstream call");
                Err(Refused { reason: BUDGET_SPENT, retry_after: wait })
            }
        }
    }

    /// Gives back a call taken by [`Quota::budget_call`]: the upstream refused the credentials,
    /// so it was not the client's call (else anyone knowing a client_id could spend its budget
    /// with wrong secrets).
    pub async fn budget_refund(&self, store: Option<&RedisStore>, call: BudgetCall) {
        match (call.charged, store) {
            (Charged::Redis(id), Some(store)) => {
                let _ = store.budget_refund(call.tag, &id).await;
            }
            (Charged::Redis(_), None) => {}
            (Charged::Local(at), _) => {
                let mut budgets = self.local_budgets.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(calls) = budgets.get_mut(&call.tag) {
                    if let Some(i) = calls.iter().position(|c| *c == at) {
                        calls.remove(i);
                    }
                }
            }
        }
    }

    /// [`Quota::budget_call`] on this replica alone: `Some(wait)` when spent.
    fn local_budget_call(&self, tag: Tag, now: Instant) -> Option<Duration> {
        let window = self.settings.budget_window;
        let mut budgets = self.local_budgets.lock().unwrap_or_else(|p| p.into_inner());
        if budgets.len() >= MAX_LOCAL_BUDGETS {
            budgets.retain(|_, calls| calls.back().is_some_and(|last| now.saturating_duration_since(*last) < window));
        }
        let calls = budgets.entry(tag).or_default();
        while calls.front().is_some_and(|first| now.saturating_duration_since(*first) >= window) {
            calls.pop_front();
        }
        if calls.len() < usize::try_from(self.settings.budget).unwrap_or(usize::MAX) {
            calls.push_back(now);
            return None;
        }
        let frees_at = *calls.front().expect("a spent budget has calls") + window;
        Some(frees_at.saturating_duration_since(now).max(Duration::from_millis(1)))
    }

    fn throttled(&self, client_id: &str, wait: Duration, metrics: &Metrics) -> Refused {
        metrics.throttled(Throttle::AuthFailures);
        tracing::warn!(client_id, ?wait, "too many failed authentications; throttling unproven credentials");
        Refused { reason: THROTTLED, retry_after: wait }
    }

    /// The failed-authentication limits, per source and per client (the counters' order).
    fn limits(&self) -> [u32; 2] {
        [self.settings.auth.per_source, self.settings.auth.per_client]
    }

    fn lock_auth(&self) -> std::sync::MutexGuard<'_, LocalCounters> {
        self.local_auth.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The per-replica rate window: `Some(wait)` when this second's calls are used up.
    fn local_rate_slot(&self, now: Instant) -> Option<Duration> {
        let mut window = self.local_rate.lock().unwrap_or_else(|p| p.into_inner());
        let current = window.started.filter(|s| now.saturating_duration_since(*s) < Duration::from_secs(1));
        if current.is_none() {
            *window = RateWindow { started: Some(now), count: 0 };
        }
        let elapsed = now.saturating_duration_since(window.started.unwrap_or(now));
        if window.count < self.settings.rate_per_second {
            window.count += 1;
            return None;
        }
        Some(Duration::from_secs(1).saturating_sub(elapsed))
    }
}

impl LocalCounters {
    /// The same rule as the Redis script: refused at a limit of failures; busy at the
    /// per-client limit of failures plus calls in flight, or at the per-source one once that
    /// source failed; else counted as in flight. `names` and `limits`: per source, per client.
    fn attempt(&mut self, names: [CounterName; 2], limits: [u32; 2], window: Duration, now: Instant) -> Verdict {
        let current = |name: &CounterName| self.0.get(name).filter(|w| w.ends > now).copied();
        for (name, limit) in names.iter().zip(limits) {
            if let Some(w) = current(name).filter(|w| limit > 0 && w.failures >= limit) {
                return Verdict::Refused(w.ends - now);
            }
        }
        let full = |w: Window, limit: u32| limit > 0 && w.failures + w.in_flight >= limit;
        let source_full = current(&names[0]).is_some_and(|w| w.failures > 0 && full(w, limits[0]));
        let client_full = current(&names[1]).is_some_and(|w| full(w, limits[1]));
        if source_full || client_full {
            return Verdict::Busy;
        }
        if self.0.len() + 2 > LOCAL_COUNTERS {
            self.0.retain(|_, w| w.ends > now);
            if self.0.len() + 2 > LOCAL_COUNTERS {
                return Verdict::Refused(window);
            }
        }
        for (name, limit) in names.into_iter().zip(limits) {
            if limit > 0 {
                self.window(name, window, now).in_flight += 1;
            }
        }
        Verdict::Counted
    }

    fn settle(&mut self, names: [CounterName; 2], failed: bool, limits: [u32; 2], window: Duration, now: Instant) {
        for (name, limit) in names.into_iter().zip(limits) {
            if limit == 0 {
                continue;
            }
            let w = self.window(name, window, now);
            w.in_flight = w.in_flight.saturating_sub(1);
            if failed {
                w.failures += 1;
            }
            if w.failures == 0 && w.in_flight == 0 {
                self.0.remove(&name);
            }
        }
    }

    /// The current window of `name`, a new one if it has none or its last one ended.
    fn window(&mut self, name: CounterName, window: Duration, now: Instant) -> &mut Window {
        let w = self.0.entry(name).or_insert(Window { failures: 0, in_flight: 0, ends: now + window });
        if w.ends <= now {
            *w = Window { failures: 0, in_flight: 0, ends: now + window };
        }
        w
    }
}

/// Whether an upstream answer says the client's credentials are wrong (RFC 6749 §5.2).
pub fn is_failed_authentication(status: StatusCode, body: &[u8]) -> bool {
    if !matches!(status, StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED) {
        return false;
    }
    #[derive(serde::Deserialize)]
    struct ErrorBody<'a> {
        #[serde(borrow)]
        error: std::borrow::Cow<'a, str>,
    }
    serde_json::from_slice::<ErrorBody<'_>>(body).is_ok_and(|b| b.error == ErrorCode::InvalidClient.as_str())
}

fn address_bytes(address: IpAddr) -> Vec<u8> {
    match address {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(60);

    #[test]
    fn local_counters_refuse_at_the_failure_limit_and_wait_while_calls_are_in_flight() {
        let mut counters = LocalCounters::default();
        let now = Instant::now();
        let (a, b, client) = ([1; 16], [2; 16], [9; 16]);
        let limits = [2, 4];
        // A source without failures is held only by the per-client limit of calls in flight.
        for _ in 0..4 {
            assert_eq!(counters.attempt([a, client], limits, WINDOW, now), Verdict::Counted);
        }
        assert_eq!(counters.attempt([b, client], limits, WINDOW, now), Verdict::Busy);
        // Successes free their slots and leave nothing behind.
        for _ in 0..3 {
            counters.settle([a, client], false, limits, WINDOW, now);
        }
        // One failure from a: from now on a's calls in flight count against its own limit too.
        counters.settle([a, client], true, limits, WINDOW, now);
        assert_eq!(counters.attempt([a, client], limits, WINDOW, now), Verdict::Counted);
        assert_eq!(counters.attempt([a, client], limits, WINDOW, now), Verdict::Busy);
        assert_eq!(counters.attempt([b, client], limits, WINDOW, now), Verdict::Counted);
        // a's second failure reaches its limit: refused for the window's rest, not merely busy.
        counters.settle([a, client], true, limits, WINDOW, now);
        let later = now + Duration::from_secs(10);
        assert_eq!(
            counters.attempt([a, client], limits, WINDOW, later),
            Verdict::Refused(WINDOW - Duration::from_secs(10))
        );
        // b fails twice too: the client's 4 failures refuse every source.
        counters.settle([b, client], true, limits, WINDOW, now);
        assert_eq!(counters.attempt([b, client], limits, WINDOW, later), Verdict::Counted);
        counters.settle([b, client], true, limits, WINDOW, now);
        assert!(matches!(counters.attempt([[3; 16], client], limits, WINDOW, later), Verdict::Refused(_)));
        // The window's end forgets everything.
        assert_eq!(counters.attempt([a, client], limits, WINDOW, now + WINDOW), Verdict::Counted);
    }

    #[test]
    fn a_zero_limit_is_no_limit() {
        let mut counters = LocalCounters::default();
        let now = Instant::now();
        for _ in 0..100 {
            assert_eq!(counters.attempt([[1; 16], [9; 16]], [0, 1000], WINDOW, now), Verdict::Counted);
        }
        assert_eq!(counters.0.len(), 1, "no per-source counter is kept when its limit is off");
    }

    /// No throttle, no rate cap, no budget.
    fn unthrottled() -> QuotaSettings {
        QuotaSettings {
            auth: AuthFailureLimits { per_source: 0, per_client: 0, window: WINDOW },
            busy_wait: Duration::ZERO,
            rate_per_second: 0,
            queue_timeout: Duration::ZERO,
            budget: 0,
            budget_window: Duration::from_secs(3600),
        }
    }

    #[test]
    fn the_local_rate_window_allows_n_per_second() {
        let quota = Quota::new(QuotaSettings { rate_per_second: 3, ..unthrottled() });
        let start = Instant::now();
        for _ in 0..3 {
            assert_eq!(quota.local_rate_slot(start), None);
        }
        let wait = quota.local_rate_slot(start + Duration::from_millis(400)).unwrap();
        assert_eq!(wait, Duration::from_millis(600));
        assert_eq!(quota.local_rate_slot(start + Duration::from_secs(1)), None);
    }

    #[test]
    fn the_local_budget_is_a_sliding_window_per_client() {
        let quota = Quota::new(QuotaSettings { budget: 2, budget_window: Duration::from_secs(60), ..unthrottled() });
        let (a, b) = ([1; 16], [2; 16]);
        let start = Instant::now();
        assert_eq!(quota.local_budget_call(a, start), None);
        assert_eq!(quota.local_budget_call(a, start + Duration::from_secs(10)), None);
        // Spent: free again when the first call leaves the window, 60 s after it.
        assert_eq!(quota.local_budget_call(a, start + Duration::from_secs(20)), Some(Duration::from_secs(40)));
        assert_eq!(quota.local_budget_call(b, start + Duration::from_secs(20)), None, "another client's own budget");
        assert_eq!(quota.local_budget_call(a, start + Duration::from_secs(60)), None, "sliding, not a calendar window");
        assert_eq!(quota.local_budget_call(a, start + Duration::from_secs(61)), Some(Duration::from_secs(9)));
    }

    #[test]
    fn only_invalid_client_is_a_failed_authentication() {
        let invalid = br#"{"error":"invalid_client"}"#;
        assert!(is_failed_authentication(StatusCode::BAD_REQUEST, invalid));
        assert!(is_failed_authentication(StatusCode::UNAUTHORIZED, invalid));
        assert!(!is_failed_authentication(StatusCode::BAD_REQUEST, br#"{"error":"invalid_scope"}"#));
        assert!(!is_failed_authentication(StatusCode::INTERNAL_SERVER_ERROR, invalid));
        assert!(!is_failed_authentication(StatusCode::BAD_REQUEST, b"not json"));
    }
}
