//! Invariant 5: Redis down, frozen or restarted never fails a token request.

use std::time::{Duration, Instant};

use crate::helpers::*;

#[tokio::test]
async fn requests_succeed_while_redis_is_killed_and_redis_is_used_again_after_restart() {
    let mut app = TestApp::with_redis(
        vec![client("app", SECRET)],
        &[("TOKEN_PROXY_L1_CAPACITY", "0"), ("TOKEN_PROXY_REDIS_TIMEOUT", "200ms")],
    )
    .await;
    let url = app.proxy.token_url();
    assert_eq!(post_basic(&url, "app", SECRET, None).await.x_cache(), "MISS");
    assert_eq!(post_basic(&url, "app", SECRET, None).await.x_cache(), "HIT");

    app.redis_mut().kill();
    for i in 0..20 {
        let started = Instant::now();
        let reply = post_basic(&url, "app", SECRET, None).await;
        assert_eq!(reply.status, 200, "request {i} failed with Redis down: {}", reply.raw);
        assert!(started.elapsed() < Duration::from_secs(2), "request {i} took {:?}", started.elapsed());
    }
    assert!(app.proxy.metric("token_proxy_redis_errors_total").await >= 1.0);
    let readyz = http().get(format!("http://{}/readyz", app.proxy.admin)).send().await.unwrap();
    assert_eq!(readyz.status(), 200, "a replica with Redis down keeps serving, so it stays ready");
    let readyz: serde_json::Value = serde_json::from_str(&readyz.text().await.unwrap()).unwrap();
    assert_eq!((readyz["redis"].as_str(), readyz["mode"].as_str()), (Some("down"), Some("degraded")));

    app.redis_mut().restart().await;
    let redis = app.redis.as_ref().unwrap();
    eventually(Duration::from_secs(10), "entries written to the restarted Redis", async || {
        post_basic(&url, "app", SECRET, Some("api/read")).await;
        !redis.dump().await.is_empty()
    })
    .await;
    assert_eq!(post_basic(&url, "app", SECRET, Some("api/read")).await.x_cache(), "HIT");
}

#[tokio::test]
async fn a_frozen_redis_costs_at_most_its_deadline() {
    let app = TestApp::with_redis(
        vec![client("app", SECRET)],
        &[("TOKEN_PROXY_L1_CAPACITY", "0"), ("TOKEN_PROXY_REDIS_TIMEOUT", "150ms")],
    )
    .await;
    let url = app.proxy.token_url();
    assert_eq!(post_basic(&url, "app", SECRET, None).await.status, 200);
    app.redis().pause();
    for i in 0..5 {
        let started = Instant::now();
        let reply = post_basic(&url, "app", SECRET, None).await;
        let elapsed = started.elapsed();
        assert_eq!(reply.status, 200, "request {i}: {}", reply.raw);
        // A read and a write, each bounded by the deadline, plus the upstream call.
        assert!(elapsed < Duration::from_millis(1500), "request {i} took {elapsed:?}");
    }
    app.redis().resume();
}

#[tokio::test]
async fn a_replica_starts_and_serves_when_redis_is_down() {
    let port = free_port();
    let idp = spawn_idp(vec![client("app", SECRET)]).await;
    let redis_url = format!("redis://127.0.0.1:{port}");
    let proxy = TestProxy::spawn(proxy_config(
        &idp.token_url(),
        &[("TOKEN_PROXY_REDIS_URL", &redis_url), ("TOKEN_PROXY_SECRET", ROOT_SECRET)],
    ))
    .await;
    let first = post_basic(&proxy.token_url(), "app", SECRET, None).await;
    assert_eq!((first.status, first.x_cache()), (200, "MISS"));
    // L1 still serves.
    assert_eq!(post_basic(&proxy.token_url(), "app", SECRET, None).await.x_cache(), "HIT");
    assert_eq!(idp.idp.issued_total(), 1);
}
