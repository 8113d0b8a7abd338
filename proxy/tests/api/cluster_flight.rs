//! The cluster flight's lock as a guard, against a real `redis-server`: completing a permit
//! stores, releases and announces; dropping one releases its lock without waiting for its TTL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shared::keys::{CacheKey, Keys};
use token_proxy::cluster_flight::{ClusterFlight, ClusterFlights, FlightSettings, Locked, WritePermit};
use token_proxy::entry::CachedToken;
use token_proxy::metrics::Metrics;
use token_proxy::outcome::{Fetched, Outcome, Source};
use token_proxy::store::StoreSettings;

use fred::prelude::*;

use crate::helpers::{RedisServer, STORE_FRESHNESS, connect_store, eventually};

/// Long enough that nothing in these tests can be the lock's expiry.
const LOCK_TTL: Duration = Duration::from_secs(30);
const FRESH_TTL: Option<Duration> = Some(Duration::from_secs(30));
const SECRET: &[u8] = b"a client secret";

async fn flights(redis: &RedisServer) -> ClusterFlights {
    let settings = StoreSettings {
        command_timeout: Duration::from_secs(1),
        breaker_threshold: 5,
        breaker_cooldown: Duration::from_secs(1),
        pipelined_reads: true,
    };
    let store = connect_store(&redis.url(), settings, &Keys::random());
    eventually(Duration::from_secs(5), "the store connected", async || {
        store.read_value(&CacheKey::from_bytes([0; 32])).await.is_ok()
    })
    .await;
    let settings = FlightSettings { lock_ttl: LOCK_TTL, upstream_timeout: Duration::from_secs(10) };
    ClusterFlights::new(store, settings, STORE_FRESHNESS, Arc::new(Metrics::new()))
}

fn token() -> Arc<CachedToken> {
    let body = br#"{"access_token":"cluster-flight","token_type":"Bearer","expires_in":3600}"#;
    Arc::new(CachedToken::from_upstream(body, Instant::now(), &STORE_FRESHNESS).expect("a token"))
}

/// The first flight for `key` takes its lock; the second finds it held.
async fn leader_and_follower(flights: &ClusterFlights, key: CacheKey) -> (WritePermit<'_>, ClusterFlight<'_>) {
    let mut leader = flights.begin(key, SECRET);
    let Locked::Write { permit, stale: None } = leader.lock(FRESH_TTL).await.expect("Redis answers") else {
        panic!("the first flight takes the lock")
    };
    let mut follower = flights.begin(key, SECRET);
    assert!(matches!(follower.lock(FRESH_TTL).await, Ok(Locked::Read { .. })), "the lock is held");
    (permit, follower)
}

#[tokio::test]
async fn a_permit_dropped_without_completing_releases_the_lock_at_once() {
    let redis = RedisServer::start().await;
    let flights = flights(&redis).await;
    let key = CacheKey::from_bytes([1; 32]);
    let (permit, mut follower) = leader_and_follower(&flights, key).await;

    // E.g. the leader's task panicked: the lock goes with the permit, not after its 30 s.
    drop(permit);
    let released = Instant::now();
    eventually(Duration::from_secs(2), "the lock released", async || {
        matches!(follower.lock(FRESH_TTL).await, Ok(Locked::Write { .. }))
    })
    .await;
    assert!(released.elapsed() < LOCK_TTL);
}

#[tokio::test]
async fn completing_a_permit_stores_the_entry_releases_the_lock_and_tells_the_followers() {
    let redis = RedisServer::start().await;
    let flights = flights(&redis).await;
    let key = CacheKey::from_bytes([2; 32]);
    let (permit, mut follower) = leader_and_follower(&flights, key).await;

    let issued = token();
    permit.complete(&Fetched::new(Source::Upstream, Outcome::Token(Arc::clone(&issued)))).await;
    let Some(Outcome::Token(announced)) = follower.wait(Duration::from_secs(2)).await else {
        panic!("the follower hears the token")
    };
    assert_eq!(announced.render(Instant::now()), issued.render(Instant::now()));

    // Stored under the key and the lock gone: the next look finds the entry, not a lock.
    let mut later = flights.begin(key, SECRET);
    let Ok(Locked::Fresh(Some(stored))) = later.lock(FRESH_TTL).await else { panic!("a fresh entry") };
    assert_eq!(stored.render(Instant::now()), issued.render(Instant::now()));
    // Sealed for this client's secret only: another secret cannot open it.
    let mut stranger = flights.begin(key, b"another secret");
    assert!(matches!(stranger.lock(FRESH_TTL).await, Ok(Locked::Fresh(None))));
}

#[tokio::test]
async fn a_stale_token_served_by_the_leader_is_announced_but_never_stored() {
    let redis = RedisServer::start().await;
    let flights = flights(&redis).await;
    let key = CacheKey::from_bytes([3; 32]);
    let (permit, mut follower) = leader_and_follower(&flights, key).await;

    permit.complete(&Fetched::new(Source::Stale, Outcome::Token(token()))).await;
    assert!(matches!(follower.wait(Duration::from_secs(2)).await, Some(Outcome::Token(_))));
    let mut later = flights.begin(key, SECRET);
    assert!(
        matches!(later.lock(FRESH_TTL).await, Ok(Locked::Write { stale: None, .. })),
        "no entry was stored, and the lock was released"
    );
}

/// A leader slower than its lock: the lock expired and another flight took it. Neither the late
/// leader's completion nor its dropped permit may free the new holder's lock.
#[tokio::test]
async fn a_late_leader_never_frees_its_successors_lock() {
    let redis = RedisServer::start().await;
    let flights = flights(&redis).await;
    let client = redis.client().await;
    for (n, completes) in [(4u8, true), (5, false)] {
        let key = CacheKey::from_bytes([n; 32]);
        let (late, _follower) = leader_and_follower(&flights, key).await;
        // The lock expires under the late leader (deleted here rather than waited for).
        let lock = format!("{}:lock", token_proxy::store::RedisStore::entry_key(&key));
        let _: i64 = client.del(&lock).await.unwrap();
        let mut successor = flights.begin(key, SECRET);
        let Ok(Locked::Write { permit: successors, .. }) = successor.lock(FRESH_TTL).await else {
            panic!("the successor takes the lock")
        };
        if completes {
            late.complete(&Fetched::new(Source::Upstream, Outcome::Token(token()))).await;
        } else {
            drop(late);
            // The release runs in a task of its own: give it time to run.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut third = flights.begin(key, SECRET);
        let looked = third.lock(None).await;
        assert!(
            matches!(looked, Ok(Locked::Read { .. })),
            "the successor still holds the lock (completes: {completes})"
        );
        drop(successors);
    }
}
