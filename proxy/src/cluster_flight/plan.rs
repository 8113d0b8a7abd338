//! What a flight does next: a pure function of what it has seen (docs/architecture.md, "The
//! lock protocol"). No sockets and no clock of its own: [`Plan::next`] takes the time, so the
//! whole protocol is tested as a table below.
//!
//! The lock only saves work: when Redis cannot be used the flight goes to the upstream (or
//! serves this replica's own fresh token); when the upstream fails and an older token is still
//! servable, that token is served (STALE).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::entry::{CachedToken, Freshness};
use crate::outcome::{Fetched, Outcome, Source};

/// How often a follower looks at Redis itself, in case the announcement was lost (pub/sub
/// delivers at most once).
pub const BACKSTOP_INTERVAL: Duration = Duration::from_millis(200);
/// A refresh accepts an entry in Redis as the successor of its token when the entry outlives
/// that token by at least this much (the token's own entry differs by milliseconds).
const SUCCESSOR_MARGIN: Duration = Duration::from_secs(1);

/// Why a fetch runs.
#[derive(Debug, Clone, Copy)]
pub enum Purpose {
    /// A request from `source` found no fresh token.
    Miss { source: IpAddr },
    /// A hit passed its refresh point: fetch a successor unless someone else already is.
    Refresh,
}

/// Timing of the cluster-wide single flight.
#[derive(Debug, Clone, Copy)]
pub struct FlightSettings {
    /// How long a leader's lock lasts before followers may take it over.
    pub lock_ttl: Duration,
    /// The upstream's own deadline; bounds how long a follower waits in all.
    pub upstream_timeout: Duration,
}

/// What the flight has just seen. `P` is the lock a lookup took (a guard that owns it; any
/// value in the tests).
#[derive(Debug)]
pub enum Seen<P> {
    /// No Redis is configured.
    NoRedis,
    /// Redis cannot be used for this flight: it failed, or the purge epochs are not known yet.
    RedisDown,
    /// The lookup found a fresh entry: its token, or `None` if it did not open or is not
    /// fresh after all.
    Fresh(Option<Arc<CachedToken>>),
    /// The lookup took the lock; `stale` is the entry Redis still had, if servable.
    Acquired { permit: P, stale: Option<Arc<CachedToken>> },
    /// Another flight holds the lock for `lock_ttl` more.
    Held { lock_ttl: Duration, stale: Option<Arc<CachedToken>> },
    /// The wait for the holder's announcement ended: its outcome, or `None` (nothing in time).
    Announced(Option<Outcome>),
    /// This replica's upstream call ended.
    Called(Outcome),
}

/// What to do next.
#[derive(Debug)]
pub enum Step<P> {
    /// Done: answer with this.
    Serve(Served),
    /// Look the key up in Redis (again), with [`Plan::fresh_ttl`].
    LookUp,
    /// Wait this long for the lock holder's announcement.
    Follow(Duration),
    /// Call the upstream, holding the key's lock (then complete it with what is served) or not.
    Call(Option<P>),
    /// Redis lost the entry but this replica holds a fresh token: store it again under the
    /// lock (completing it) instead of calling the upstream, and serve it.
    PutBack(P, Served),
}

/// A flight's answer.
#[derive(Debug, Clone)]
pub struct Served {
    pub fetched: Fetched,
    /// Whether the token goes into L1 as current (not for this replica's own token served as
    /// it was, nor for a stale one).
    pub keep_locally: bool,
}

impl Served {
    fn new(source: Source, outcome: Outcome, keep_locally: bool) -> Served {
        let keep_locally = keep_locally && matches!(outcome, Outcome::Token(_));
        Served { fetched: Fetched::new(source, outcome), keep_locally }
    }
}

/// Everything a flight knows so far: the one struct its values travel in.
#[derive(Debug)]
pub struct Plan {
    purpose: Purpose,
    freshness: Freshness,
    /// This replica's own token for the key, while fresh.
    local_fresh: Option<Arc<CachedToken>>,
    /// An older token to serve if the upstream fails: this replica's own, else Redis's.
    stale: Option<Arc<CachedToken>>,
    /// Whether another flight was seen holding the lock.
    following: bool,
    /// Past this a follower stops waiting for the holder and calls the upstream itself.
    give_up_at: Instant,
    /// Entries with more than this TTL left in Redis may be fresh (`None`: ignore entries).
    fresh_ttl: Option<Duration>,
}

impl Plan {
    /// A flight for `purpose`, with this replica's own servable token for the key, if any (the
    /// token being refreshed, or an L1 entry due for revalidation).
    pub fn new(
        purpose: Purpose,
        local: Option<Arc<CachedToken>>,
        settings: FlightSettings,
        freshness: Freshness,
        now: Instant,
    ) -> Plan {
        let local_fresh = local.clone().filter(|t| t.is_fresh(now, &freshness));
        // Only a hint for the lookup script: the sealed expiry decides (see `redis_clock`).
        // Entries are kept until their token has `min_token_ttl` left (`CachedToken::keep_for`).
        // A refresh wants a successor: only an entry that outlives the token being refreshed.
        let fresh_ttl = match (&purpose, &local_fresh) {
            (Purpose::Refresh, Some(current)) => {
                Some(current.keep_for(now, &freshness).unwrap_or_default() + SUCCESSOR_MARGIN)
            }
            (Purpose::Refresh, None) => None,
            (Purpose::Miss { .. }, _) => Some(freshness.fresh_cutoff().saturating_sub(freshness.min_token_ttl)),
        };
        Plan {
            purpose,
            freshness,
            local_fresh,
            stale: local,
            following: false,
            give_up_at: now + settings.lock_ttl + settings.upstream_timeout,
            fresh_ttl,
        }
    }

    /// The lookup's freshness hint: see [`Seen::Fresh`].
    pub fn fresh_ttl(&self) -> Option<Duration> {
        self.fresh_ttl
    }

    /// Whether another flight was seen holding the lock (a lock taken now is a takeover).
    pub fn is_following(&self) -> bool {
        self.following
    }

    /// The next step after seeing `seen` at `now`.
    pub fn next<P>(&mut self, seen: Seen<P>, now: Instant) -> Step<P> {
        match seen {
            Seen::NoRedis => Step::Call(None),
            // Redis is failing: this replica goes on its own, from its own fresh token if it has
            // one, else to the upstream (at most one call per key per replica: the local flight).
            Seen::RedisDown => match self.local_fresh.take() {
                Some(token) => Step::Serve(Served::new(Source::Cache, Outcome::Token(token), true)),
                None => Step::Call(None),
            },
            Seen::Fresh(Some(token)) if token.is_fresh(now, &self.freshness) => {
                let source = if self.following { Source::Peer } else { Source::Cache };
                Step::Serve(Served::new(source, Outcome::Token(token), true))
            }
            // Unreadable (tampered, foreign) or not fresh after all: replace it.
            Seen::Fresh(_) => {
                self.fresh_ttl = None;
                Step::LookUp
            }
            Seen::Acquired { permit, stale } => {
                self.keep_as_stale(stale);
                match (self.purpose, self.local_fresh.take()) {
                    (Purpose::Miss { .. }, Some(token)) => {
                        Step::PutBack(permit, Served::new(Source::Cache, Outcome::Token(token), false))
                    }
                    _ => Step::Call(Some(permit)),
                }
            }
            Seen::Held { lock_ttl, stale } => {
                self.keep_as_stale(stale);
                if let Purpose::Refresh = self.purpose {
                    // Someone else is refreshing this key already.
                    return match self.stale.take() {
                        Some(token) => Step::Serve(Served::new(Source::Cache, Outcome::Token(token), false)),
                        None => Step::Call(None),
                    };
                }
                // This replica's own token is still fresh (an L1 entry due for revalidation):
                // serve it rather than wait for the holder, who may never announce (its store
                // can fail, and then its lock lives out its TTL). The next request looks again.
                if let Some(token) = self.local_fresh.take() {
                    return Step::Serve(Served::new(Source::Cache, Outcome::Token(token), false));
                }
                self.following = true;
                if now >= self.give_up_at {
                    tracing::warn!("gave up waiting for the lock holder; calling the upstream directly");
                    return Step::Call(None);
                }
                Step::Follow(lock_ttl.min(BACKSTOP_INTERVAL))
            }
            Seen::Announced(None) => Step::LookUp,
            Seen::Announced(Some(outcome)) => Step::Serve(self.unless_trouble(Source::Peer, outcome, now)),
            Seen::Called(outcome) => Step::Serve(self.unless_trouble(Source::Upstream, outcome, now)),
        }
    }

    fn keep_as_stale(&mut self, from_redis: Option<Arc<CachedToken>>) {
        if self.stale.is_none() {
            self.stale = from_redis;
        }
    }

    /// `outcome`, unless it is upstream trouble and an older token may still be served
    /// (stale-if-error): then that token.
    fn unless_trouble(&mut self, source: Source, outcome: Outcome, now: Instant) -> Served {
        if outcome.is_upstream_trouble() {
            if let Some(token) = self.stale.take().filter(|t| t.is_servable(now, &self.freshness)) {
                tracing::info!("upstream failed; serving a still-valid token (stale-if-error)");
                return Served::new(Source::Stale, Outcome::Token(token), false);
            }
        }
        Served::new(source, outcome, true)
    }
}

#[cfg(test)]
mod tests {
    //! One test per row of the decision table, under tokio's paused clock: time moves only
    //! when a test advances it.

    use bytes::Bytes;
    use http::StatusCode;
    use tokio::time::advance;

    use super::*;
    use crate::outcome::{REFUSAL_REASONS, Refused, UpstreamFailure};
    use crate::upstream::{UpstreamError, UpstreamResponse};

    const FRESHNESS: Freshness = Freshness {
        expiry_margin: Duration::from_secs(60),
        min_token_ttl: Duration::from_secs(30),
        refresh_at: 0.75,
        max_lifetime: Duration::from_secs(86_400),
    };
    const SETTINGS: FlightSettings =
        FlightSettings { lock_ttl: Duration::from_secs(5), upstream_timeout: Duration::from_secs(10) };
    const MISS: Purpose = Purpose::Miss { source: IpAddr::V4(std::net::Ipv4Addr::LOCALHOST) };
    /// The lock a lookup took, as the plan sees it: an opaque value it hands back.
    const PERMIT: &str = "permit";

    fn now() -> Instant {
        tokio::time::Instant::now().into_std()
    }

    /// A token issued now that lives `seconds`.
    fn token(seconds: u64) -> Arc<CachedToken> {
        let body = format!(r#"{{"access_token":"t{seconds}","token_type":"Bearer","expires_in":{seconds}}}"#);
        Arc::new(CachedToken::from_upstream(body.as_bytes(), now(), &FRESHNESS).expect("a token"))
    }

    fn new_plan(purpose: Purpose, local: Option<&Arc<CachedToken>>) -> Plan {
        Plan::new(purpose, local.cloned(), SETTINGS, FRESHNESS, now())
    }

    fn failed() -> Outcome {
        Outcome::Failed(UpstreamFailure::Unreachable(UpstreamError::Timeout))
    }

    fn next(plan: &mut Plan, seen: Seen<&'static str>) -> Step<&'static str> {
        plan.next(seen, now())
    }

    /// The served token, its source and whether it goes into L1; panics on any other step.
    fn served(step: Step<&'static str>) -> (Source, Option<Arc<CachedToken>>, bool) {
        let Step::Serve(served) = step else { panic!("expected Serve, got {step:?}") };
        (served.fetched.source, served.fetched.token().cloned(), served.keep_locally)
    }

    fn same(a: Option<Arc<CachedToken>>, b: &Arc<CachedToken>) -> bool {
        a.is_some_and(|a| Arc::ptr_eq(&a, b))
    }

    #[tokio::test(start_paused = true)]
    async fn without_redis_the_flight_calls_the_upstream() {
        assert!(matches!(next(&mut new_plan(MISS, None), Seen::NoRedis), Step::Call(None)));
    }

    #[tokio::test(start_paused = true)]
    async fn redis_down_serves_the_replicas_own_fresh_token_into_l1() {
        let own = token(3600);
        let (source, token, keep) = served(next(&mut new_plan(MISS, Some(&own)), Seen::RedisDown));
        assert_eq!((source, keep), (Source::Cache, true));
        assert!(same(token, &own));
    }

    #[tokio::test(start_paused = true)]
    async fn redis_down_without_a_fresh_token_calls_the_upstream_without_a_lock() {
        let own = token(3600);
        // Past its freshness (60 s margin) but still servable (30 s minimum).
        advance(Duration::from_secs(3600 - 45)).await;
        let mut plan = new_plan(MISS, Some(&own));
        assert!(matches!(next(&mut plan, Seen::RedisDown), Step::Call(None)));
        let (source, token, keep) = served(next(&mut plan, Seen::Called(failed())));
        assert_eq!((source, keep), (Source::Stale, false));
        assert!(same(token, &own));
    }

    #[tokio::test(start_paused = true)]
    async fn a_fresh_entry_is_served_as_a_hit_and_kept_in_l1() {
        let entry = token(3600);
        let (source, token, keep) = served(next(&mut new_plan(MISS, None), Seen::Fresh(Some(entry.clone()))));
        assert_eq!((source, keep), (Source::Cache, true));
        assert!(same(token, &entry));
    }

    #[tokio::test(start_paused = true)]
    async fn a_fresh_entry_found_while_following_came_from_a_peer() {
        let mut plan = new_plan(MISS, None);
        assert!(matches!(next(&mut plan, Seen::Held { lock_ttl: SETTINGS.lock_ttl, stale: None }), Step::Follow(_)));
        assert!(matches!(next(&mut plan, Seen::Announced(None)), Step::LookUp), "the announcement was lost");
        let (source, _, keep) = served(next(&mut plan, Seen::Fresh(Some(token(3600)))));
        assert_eq!((source, keep), (Source::Peer, true));
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_that_does_not_open_or_is_not_fresh_is_replaced() {
        for found in [None, Some(token(70))] {
            let mut plan = new_plan(MISS, None);
            advance(Duration::from_secs(20)).await;
            assert!(matches!(next(&mut plan, Seen::Fresh(found)), Step::LookUp));
            assert_eq!(plan.fresh_ttl(), None, "the next lookup ignores entries and takes the lock");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_miss_that_takes_the_lock_leads_with_it() {
        let mut plan = new_plan(MISS, None);
        assert_eq!(plan.fresh_ttl(), Some(Duration::from_secs(30)));
        assert!(matches!(next(&mut plan, Seen::Acquired { permit: PERMIT, stale: None }), Step::Call(Some(PERMIT))));
        let fresh = token(3600);
        let (source, token, keep) = served(next(&mut plan, Seen::Called(Outcome::Token(fresh.clone()))));
        assert_eq!((source, keep), (Source::Upstream, true));
        assert!(same(token, &fresh));
    }

    #[tokio::test(start_paused = true)]
    async fn a_miss_with_its_own_fresh_token_puts_it_back_instead_of_calling() {
        let own = token(3600);
        let step = next(&mut new_plan(MISS, Some(&own)), Seen::Acquired { permit: PERMIT, stale: None });
        let Step::PutBack(PERMIT, served) = step else { panic!("{step:?}") };
        assert_eq!((served.fetched.source, served.keep_locally), (Source::Cache, false));
        assert!(same(served.fetched.token().cloned(), &own));
    }

    #[tokio::test(start_paused = true)]
    async fn a_miss_with_its_own_fresh_token_serves_it_instead_of_following() {
        let own = token(3600);
        let held = Seen::Held { lock_ttl: SETTINGS.lock_ttl, stale: None };
        let (source, token, keep) = served(next(&mut new_plan(MISS, Some(&own)), held));
        assert_eq!((source, keep), (Source::Cache, false), "served as it was: still due for revalidation");
        assert!(same(token, &own));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lock_held_elsewhere_is_followed_checking_redis_between_waits() {
        let mut plan = new_plan(MISS, None);
        assert!(matches!(
            next(&mut plan, Seen::Held { lock_ttl: SETTINGS.lock_ttl, stale: None }),
            Step::Follow(wait) if wait == BACKSTOP_INTERVAL
        ));
        assert!(plan.is_following());
        assert!(matches!(
            next(&mut plan, Seen::Held { lock_ttl: Duration::from_millis(50), stale: None }),
            Step::Follow(wait) if wait == Duration::from_millis(50)
        ));
        let announced = token(3600);
        let (source, token, keep) = served(next(&mut plan, Seen::Announced(Some(Outcome::Token(announced.clone())))));
        assert_eq!((source, keep), (Source::Peer, true));
        assert!(same(token, &announced));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lock_lost_by_its_holder_is_taken_over() {
        let mut plan = new_plan(MISS, None);
        let redis_stale = token(100);
        let held = Seen::Held { lock_ttl: SETTINGS.lock_ttl, stale: Some(redis_stale.clone()) };
        assert!(matches!(next(&mut plan, held), Step::Follow(_)));
        assert!(matches!(next(&mut plan, Seen::Announced(None)), Step::LookUp));
        // The holder's lock expired without an announcement: the lookup takes it.
        assert!(matches!(next(&mut plan, Seen::Acquired { permit: PERMIT, stale: None }), Step::Call(Some(PERMIT))));
        assert!(plan.is_following(), "counted as a takeover");
        // The stale entry seen while following still stands in for a failed call.
        let (source, token, keep) = served(next(&mut plan, Seen::Called(failed())));
        assert_eq!((source, keep), (Source::Stale, false));
        assert!(same(token, &redis_stale));
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_gives_up_on_a_silent_holder_after_lock_ttl_and_upstream_timeout() {
        let mut plan = new_plan(MISS, None);
        let held = || Seen::Held { lock_ttl: SETTINGS.lock_ttl, stale: None };
        assert!(matches!(next(&mut plan, held()), Step::Follow(_)));
        advance(SETTINGS.lock_ttl + SETTINGS.upstream_timeout - Duration::from_millis(1)).await;
        assert!(matches!(next(&mut plan, held()), Step::Follow(_)));
        advance(Duration::from_millis(1)).await;
        assert!(matches!(next(&mut plan, held()), Step::Call(None)));
    }

    #[tokio::test(start_paused = true)]
    async fn upstream_failed_with_a_stale_token_serves_it() {
        let own = token(100);
        // 50 s left: no longer fresh (60 s margin), still servable (30 s minimum).
        advance(Duration::from_secs(50)).await;
        let refused = Refused { reason: REFUSAL_REASONS[0], retry_after: Duration::from_secs(1) };
        let too_many = Outcome::Relayed(UpstreamResponse {
            status: StatusCode::TOO_MANY_REQUESTS,
            body: Bytes::new(),
            content_type: None,
            retry_after: None,
            www_authenticate: None,
        });
        for trouble in [failed(), Outcome::Refused(refused), too_many] {
            let mut plan = Plan::new(MISS, Some(own.clone()), SETTINGS, FRESHNESS, now());
            assert!(matches!(next(&mut plan, Seen::Acquired { permit: PERMIT, stale: None }), Step::Call(Some(_))));
            let (source, token, keep) = served(next(&mut plan, Seen::Called(trouble)));
            assert_eq!((source, keep), (Source::Stale, false));
            assert!(same(token, &own));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn upstream_failed_without_a_servable_token_passes_the_failure_on() {
        let own = token(100);
        // 50 s left: not fresh, so the flight calls the upstream with the lock.
        advance(Duration::from_secs(50)).await;
        let mut plan = new_plan(MISS, Some(&own));
        assert!(matches!(next(&mut plan, Seen::Acquired { permit: PERMIT, stale: None }), Step::Call(Some(_))));
        // The call takes 21 s: 29 s left, under the 30 s minimum, so not even stale is served.
        advance(Duration::from_secs(21)).await;
        let step = next(&mut plan, Seen::Called(failed()));
        let Step::Serve(served) = step else { panic!("{step:?}") };
        assert_eq!((served.fetched.source, served.keep_locally), (Source::Upstream, false));
        assert!(matches!(served.fetched.outcome, Outcome::Failed(_)));
        let mut without = new_plan(MISS, None);
        assert!(matches!(next(&mut without, Seen::Acquired { permit: PERMIT, stale: None }), Step::Call(Some(_))));
        assert!(
            matches!(next(&mut without, Seen::Called(failed())), Step::Serve(s) if s.fetched.source == Source::Upstream)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_announced_failure_is_replaced_by_the_followers_stale_token() {
        let mut plan = new_plan(MISS, None);
        let redis_stale = token(100);
        let held = Seen::Held { lock_ttl: SETTINGS.lock_ttl, stale: Some(redis_stale.clone()) };
        assert!(matches!(next(&mut plan, held), Step::Follow(_)));
        let (source, token, _) = served(next(&mut plan, Seen::Announced(Some(failed()))));
        assert_eq!(source, Source::Stale);
        assert!(same(token, &redis_stale));
        // Without one, the leader's failure is the answer.
        let mut plan = new_plan(MISS, None);
        assert!(matches!(next(&mut plan, Seen::Held { lock_ttl: SETTINGS.lock_ttl, stale: None }), Step::Follow(_)));
        let step = next(&mut plan, Seen::Announced(Some(failed())));
        assert!(
            matches!(step, Step::Serve(s) if s.fetched.source == Source::Peer && matches!(s.fetched.outcome, Outcome::Failed(_)))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_looks_only_for_a_successor_and_leads_with_the_lock() {
        let current = token(1000);
        advance(Duration::from_secs(800)).await;
        let mut plan = new_plan(Purpose::Refresh, Some(&current));
        // Kept in Redis until 30 s are left: 170 s; a successor outlives that by a second.
        assert_eq!(plan.fresh_ttl(), Some(Duration::from_secs(171)));
        assert!(matches!(next(&mut plan, Seen::Acquired { permit: PERMIT, stale: None }), Step::Call(Some(PERMIT))));
        let (source, _, keep) = served(next(&mut plan, Seen::Called(Outcome::Token(token(3600)))));
        assert_eq!((source, keep), (Source::Upstream, true));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_finding_another_refresh_under_way_keeps_the_current_token() {
        let current = token(1000);
        let mut plan = new_plan(Purpose::Refresh, Some(&current));
        let (source, token, keep) = served(next(&mut plan, Seen::Held { lock_ttl: SETTINGS.lock_ttl, stale: None }));
        assert_eq!((source, keep), (Source::Cache, false));
        assert!(same(token, &current));
        assert!(!plan.is_following(), "a refresh never waits");
        // Without a token of its own it calls the upstream, without the lock.
        let mut plan = new_plan(Purpose::Refresh, None);
        assert!(matches!(next(&mut plan, Seen::Held { lock_ttl: SETTINGS.lock_ttl, stale: None }), Step::Call(None)));
        assert_eq!(plan.fresh_ttl(), None);
    }
}
