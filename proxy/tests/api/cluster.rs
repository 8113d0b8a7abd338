//! Invariant 3: exactly one upstream call per cold key across replicas; and invariants 5 and 6
//! under load: Redis killed or frozen, upstream failing.

use std::time::{Duration, Instant};

use fred::prelude::*;

use crate::fault_proxy::FaultProxy;
use crate::helpers::*;

const LATENCY: Duration = Duration::from_millis(200);
/// The exactly-one-call tests are about healthy replicas: a Redis deadline that a starved CI
/// machine cannot trip keeps a slow command from turning a replica degraded (which would
/// rightly cost one extra call, see the Redis fault tests).
const HEALTHY: &[(&str, &str)] = &[("TOKEN_PROXY_REDIS_TIMEOUT", "2s")];

/// True when every reply is a 200 with the same token; prints the odd ones out otherwise.
fn same_token(replies: &[TokenReply]) -> bool {
    let Some(first) = replies.iter().find(|r| r.status == 200).map(TokenReply::access_token) else {
        eprintln!("no 200 at all; first reply: {:?}", replies[0].raw);
        return false;
    };
    let odd: Vec<_> = replies
        .iter()
        .filter(|r| r.status != 200 || r.access_token() != first)
        .map(|r| (r.status, r.x_cache().to_owned(), r.raw.clone()))
        .collect();
    if !odd.is_empty() {
        eprintln!("{} odd replies, e.g. {:?}", odd.len(), &odd[..odd.len().min(3)]);
    }
    odd.is_empty()
}

#[tokio::test]
async fn a_thousand_concurrent_requests_over_three_replicas_make_one_upstream_call_per_round() {
    let cluster = TestCluster::start(3, vec![client("app", SECRET)], HEALTHY).await;
    cluster.idp.idp.set_latency(LATENCY);
    let urls = cluster.urls();
    for round in 0..20 {
        // A new cold key each round: a parameter that is part of the key.
        let round_id = format!("round-{round}");
        let replies = burst(&urls, 1000, "app", SECRET, &[("aws_client_metadata", &round_id)]).await;
        let redis_errors = cluster.metric_sum("token_proxy_redis_errors_total").await;
        assert!(
            same_token(&replies),
            "round {round}: not every caller got the one token ({redis_errors} Redis errors)"
        );
        assert_eq!(cluster.idp.idp.issued_total(), round + 1, "round {round}: more than one upstream call");
        let misses = replies.iter().filter(|r| r.x_cache() == "MISS").count();
        assert_eq!(misses, 1, "round {round}: exactly one caller went upstream");
    }
    // Followers on the other replicas were woken by the announcement, not by polling.
    assert!(cluster.metric_sum("token_proxy_notification_misses_total").await <= 2.0);
    assert_eq!(cluster.metric_sum("token_proxy_lock_acquisitions_total").await, 20.0);
}

#[tokio::test]
async fn fifty_cold_keys_with_twenty_requests_each_make_fifty_upstream_calls() {
    let cluster = TestCluster::start(3, vec![client("app", SECRET)], HEALTHY).await;
    cluster.idp.idp.set_latency(LATENCY);
    let urls = cluster.urls();
    let handles: Vec<_> = (0..50)
        .map(|key| {
            let urls = urls.clone();
            tokio::spawn(async move { burst(&urls, 20, "app", SECRET, &[("n", &key.to_string())]).await })
        })
        .collect();
    let mut tokens = std::collections::HashSet::new();
    for handle in handles {
        let replies = handle.await.unwrap();
        assert!(same_token(&replies));
        tokens.insert(replies[0].access_token().to_owned());
    }
    assert_eq!(tokens.len(), 50);
    assert_eq!(cluster.idp.idp.issued_total(), 50);
}

#[tokio::test]
async fn waiters_take_over_a_lock_left_by_a_dead_holder() {
    let lock_ttl = Duration::from_millis(1500);
    let cluster = TestCluster::start(3, vec![client("app", SECRET)], &[("TOKEN_PROXY_LOCK_TTL", "1500ms")]).await;
    cluster.idp.idp.set_latency(LATENCY);
    // A holder that took the lock and died: nobody will release it or announce anything.
    let redis = cluster.redis.client().await;
    let lock = cluster.lock_key("app", SECRET, &[]);
    let () = redis.set(&lock, "dead-owner", Some(Expiration::PX(1500)), None, false).await.unwrap();

    let started = Instant::now();
    let replies = burst(&cluster.urls(), 60, "app", SECRET, &[]).await;
    let elapsed = started.elapsed();
    assert!(same_token(&replies));
    assert_eq!(cluster.idp.idp.issued_total(), 1, "at most one call after the takeover");
    assert!(elapsed >= Duration::from_millis(1200), "finished before the dead lock expired: {elapsed:?}");
    let bound = lock_ttl + LATENCY + Duration::from_millis(800);
    assert!(elapsed < bound, "waiters took {elapsed:?}, more than the lock TTL plus one upstream call");
    assert_eq!(cluster.metric_sum("token_proxy_lock_takeovers_total").await, 1.0);
}

#[tokio::test]
async fn a_leader_slower_than_the_lock_costs_at_most_two_calls_and_never_frees_the_new_lock() {
    let cluster = TestCluster::start(2, vec![client("app", SECRET)], &[("TOKEN_PROXY_LOCK_TTL", "500ms")]).await;
    cluster.idp.idp.set_latency(Duration::from_millis(900));
    let urls = cluster.urls();
    let slow = tokio::spawn({
        let url = urls[0].clone();
        async move { post_basic(&url, "app", SECRET, None).await }
    });
    // The first leader's lock expires at 500 ms; the second replica takes over at ~600 ms and
    // holds its own lock until ~1100 ms, while the first leader finishes at ~900 ms.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let second = tokio::spawn({
        let url = urls[1].clone();
        async move { post_basic(&url, "app", SECRET, None).await }
    });
    let first = slow.await.unwrap();
    assert_eq!(first.status, 200);
    let redis = cluster.redis.client().await;
    let holder: Option<String> = redis.get(cluster.lock_key("app", SECRET, &[])).await.unwrap();
    assert!(holder.is_some(), "the late leader's release deleted its successor's lock");
    assert_eq!(second.await.unwrap().status, 200);
    assert_eq!(cluster.idp.idp.issued_total(), 2);
}

#[tokio::test]
async fn waiters_whose_announcement_is_lost_finish_through_the_periodic_look() {
    let cluster = TestCluster::start(1, vec![client("app", SECRET)], &[]).await;
    cluster.idp.idp.set_latency(Duration::from_millis(400));
    // A second replica reaches Redis through a fault proxy that drops every pub/sub push.
    let redis_addr = format!("127.0.0.1:{}", cluster.redis.port).parse().unwrap();
    let faults = FaultProxy::start(redis_addr).await;
    faults.set_drop_downstream_matching(Some(b"message".to_vec()));
    let deaf = TestCluster::replica(&format!("redis://{}", faults.addr), &cluster.idp, &[]).await;

    // The first replica leads; the deaf one's requests arrive while the flight is under way.
    let leader = tokio::spawn({
        let url = cluster.urls()[0].clone();
        async move { post_basic(&url, "app", SECRET, None).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let followers = burst(&[deaf.token_url()], 20, "app", SECRET, &[]).await;
    let elapsed = started.elapsed();
    let leader = leader.await.unwrap();
    assert!(followers.iter().all(|r| r.status == 200 && r.access_token() == leader.access_token()));
    assert_eq!(cluster.idp.idp.issued_total(), 1);
    assert!(faults.dropped_chunks() >= 1, "the announcement was not dropped: the test proves nothing");
    assert_eq!(deaf.metric("token_proxy_notification_misses_total").await, 1.0);
    // The leader answers ~300 ms after the burst starts; the periodic look comes within 200 ms.
    assert!(elapsed < Duration::from_millis(300 + 200 + 400), "followers took {elapsed:?}");
}

#[tokio::test]
async fn an_upstream_error_during_a_burst_costs_one_call_and_reaches_every_waiter() {
    let cluster = TestCluster::start(3, vec![client("app", SECRET)], &[]).await;
    cluster.idp.idp.set_latency(LATENCY);
    cluster.idp.idp.fail_next(1, 500);
    let replies = burst(&cluster.urls(), 300, "app", SECRET, &[]).await;
    assert!(replies.iter().all(|r| r.status == 502 && r.error() == "server_error"), "every waiter gets the error");
    assert_eq!(cluster.idp.idp.requests_total(), 1, "one upstream call for the whole burst");
    let next = post_basic(&cluster.urls()[1], "app", SECRET, None).await;
    assert_eq!((next.status, next.x_cache()), (200, "MISS"), "the next request after the flight calls anew");
    assert_eq!(cluster.idp.idp.requests_total(), 2);
}

#[tokio::test]
async fn an_upstream_4xx_reaches_every_waiter_unchanged() {
    let cluster = TestCluster::start(3, vec![client("app", SECRET)], &[]).await;
    cluster.idp.idp.set_latency(LATENCY);
    let replies = burst(&cluster.urls(), 90, "app", "wrong-secret", &[]).await;
    assert!(replies.iter().all(|r| r.status == 400 && r.error() == "invalid_client"));
    assert_eq!(cluster.idp.idp.requests_total(), 1);
}

#[tokio::test]
async fn stale_tokens_are_served_while_the_upstream_fails() {
    // Tokens live 10 s and are fresh while more than 8 s are left: after 2 s they need
    // replacing, but may be served until 1 s is left if the upstream fails.
    let cluster = TestCluster::start(
        2,
        vec![client("app", SECRET)],
        &[("TOKEN_PROXY_EXPIRY_MARGIN", "8s"), ("TOKEN_PROXY_MIN_TOKEN_TTL", "1s"), ("TOKEN_PROXY_REFRESH_AT", "1")],
    )
    .await;
    cluster.idp.idp.set_token_lifetime(Duration::from_secs(10));
    let urls = cluster.urls();
    let first = post_basic(&urls[0], "app", SECRET, None).await;
    tokio::time::sleep(Duration::from_millis(2300)).await;
    cluster.idp.idp.fail_next(10, 503);
    for url in &urls {
        let reply = post_basic(url, "app", SECRET, None).await;
        assert_eq!((reply.status, reply.x_cache()), (200, "STALE"), "{}", reply.raw);
        assert_eq!(reply.access_token(), first.access_token());
        assert!(reply.expires_in() >= 1 && reply.expires_in() <= 8);
    }
    assert_eq!(cluster.metric_sum("token_proxy_requests_total{outcome=\"stale\"}").await, 2.0);
}

#[tokio::test]
async fn a_429_with_retry_after_holds_further_calls_back() {
    let app = TestApp::embedded(vec![client("app", SECRET)], &[]).await;
    app.idp.idp.fail_next(1, 429);
    let throttled = app.post_basic("app", SECRET, None).await;
    assert_eq!((throttled.status, throttled.headers["retry-after"].to_str().unwrap()), (429, "1"));
    // Another key, within the pause: answered 429 without calling the upstream.
    let held = app.post_basic("app", SECRET, Some("api/read")).await;
    assert_eq!(held.status, 429);
    assert!(held.headers.contains_key("retry-after"));
    assert_eq!(app.upstream_requests(), 1);
    assert_eq!(app.proxy.metric("token_proxy_upstream_held_back_total").await, 1.0);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(app.post_basic("app", SECRET, Some("api/read")).await.status, 200);
}

#[tokio::test]
async fn refresh_ahead_keeps_hot_keys_from_ever_missing() {
    // 6 s tokens refreshed after 40-50 % of their life; fresh while more than 1 s is left.
    let cluster = TestCluster::start(
        3,
        vec![client("app", SECRET)],
        &[
            ("TOKEN_PROXY_REFRESH_AT", "0.5"),
            ("TOKEN_PROXY_EXPIRY_MARGIN", "1s"),
            ("TOKEN_PROXY_MIN_TOKEN_TTL", "1s"),
            ("TOKEN_PROXY_L1_MAX_AGE", "500ms"),
        ],
    )
    .await;
    cluster.idp.idp.set_token_lifetime(Duration::from_secs(6));
    cluster.idp.idp.set_latency(Duration::from_millis(50));
    let urls = cluster.urls();
    let warm = post_basic_with(&urls[0], "app", SECRET, &[("n", "0")]).await;
    assert_eq!(warm.x_cache(), "MISS");
    let report = steady_load(urls, Duration::from_secs(14), 6, 1, "app", SECRET).await;
    assert_eq!(report.server_errors(), 0);
    assert_eq!(report.statuses.get(&200), Some(&report.requests), "{report:?}");
    assert!(!report.cache.contains_key("MISS"), "a request missed after warm-up: {report:?}");
    // One token per refresh period (2.4-3 s) over 14 s, plus the first: 5 to 7.
    let issued = cluster.idp.idp.issued_total();
    assert!((5..=7).contains(&issued), "issued {issued} tokens in 14 s: {report:?}");
    assert!(cluster.metric_sum("token_proxy_refreshes_total").await >= 4.0);
}

/// Steady load on 40 keys over three replicas for `duration`, with `fault` done to Redis
/// 1.5 s in.
async fn survive(duration: Duration, fault: impl AsyncFnOnce(&mut TestCluster)) -> (TestCluster, LoadReport) {
    let mut cluster = TestCluster::start(
        3,
        vec![client("app", SECRET)],
        &[("TOKEN_PROXY_REDIS_TIMEOUT", "200ms"), ("TOKEN_PROXY_L1_MAX_AGE", "1s")],
    )
    .await;
    cluster.idp.idp.set_latency(Duration::from_millis(50));
    let load = tokio::spawn(steady_load(cluster.urls(), duration, 8, 40, "app", SECRET));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    fault(&mut cluster).await;
    let report = load.await.unwrap();
    (cluster, report)
}

/// Redis is used again (breaker closed, entries written) within a few seconds of returning.
async fn assert_recovers(cluster: &TestCluster) {
    let urls = cluster.urls();
    let mut attempt = 0;
    eventually(Duration::from_secs(10), "Redis to be used again by every replica", async || {
        attempt += 1;
        let probe = format!("after-{attempt}");
        for url in &urls {
            post_basic_with(url, "app", SECRET, &[("probe", &probe)]).await;
        }
        let mut closed = true;
        for replica in &cluster.replicas {
            let ready = get_json(&format!("http://{}/readyz", replica.admin)).await;
            closed &= ready["breaker"] == "closed" && ready["redis"] == "up";
        }
        closed && cluster.redis.dump().await.iter().any(|(k, _)| !k.ends_with(b":lock"))
    })
    .await;
}

#[tokio::test]
async fn redis_killed_and_restarted_under_load_fails_no_request() {
    let (cluster, report) = survive(Duration::from_secs(8), async |cluster| {
        cluster.redis.kill();
        tokio::time::sleep(Duration::from_secs(2)).await;
        cluster.redis.restart().await;
    })
    .await;
    assert_eq!(report.server_errors(), 0, "{report:?}");
    // The Redis deadline plus the upstream's latency, with room for a loaded 2-core machine.
    assert!(report.slowest < Duration::from_millis(200 + 50 + 750), "slowest {:?}: {report:?}", report.slowest);
    // Without Redis each replica may call once per key: never more.
    let issued = cluster.idp.idp.issued_total();
    assert!(issued <= 3 * 40, "issued {issued} tokens for 40 keys on 3 replicas");
    assert_recovers(&cluster).await;
}

#[tokio::test]
async fn redis_frozen_for_ten_seconds_under_load_fails_no_request() {
    let (cluster, report) = survive(Duration::from_secs(13), async |cluster| {
        cluster.redis.pause();
        tokio::time::sleep(Duration::from_secs(10)).await;
        cluster.redis.resume();
    })
    .await;
    assert_eq!(report.server_errors(), 0, "{report:?}");
    assert!(report.slowest < Duration::from_millis(200 + 50 + 750), "slowest {:?}: {report:?}", report.slowest);
    assert!(cluster.idp.idp.issued_total() <= 3 * 40);
    // Every replica stopped paying the deadline: its breaker opened.
    assert!(cluster.metric_sum("token_proxy_redis_breaker_transitions_total{to=\"open\"}").await >= 3.0);
    assert_recovers(&cluster).await;
}
