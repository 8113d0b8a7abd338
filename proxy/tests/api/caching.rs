//! Invariant 1 (isolation) and the basic cache contract.

use std::time::Duration;

use fred::prelude::ClientLike as _;

use crate::fault_proxy::FaultProxy;
use crate::helpers::*;

#[tokio::test]
async fn a_miss_then_hits_make_one_upstream_call_with_redis() {
    let app = TestApp::with_redis(vec![client("app", SECRET)], &[]).await;
    let first = app.post_basic("app", SECRET, None).await;
    assert_eq!((first.status, first.x_cache()), (200, "MISS"), "{}", first.raw);
    for _ in 0..20 {
        let hit = app.post_basic("app", SECRET, None).await;
        assert_eq!((hit.status, hit.x_cache()), (200, "HIT"));
        assert_eq!(hit.access_token(), first.access_token());
        assert_eq!(hit.headers["cache-control"], "no-store");
        assert_eq!(hit.headers["pragma"], "no-cache");
    }
    assert_eq!(app.issued(), 1);
}

#[tokio::test]
async fn a_miss_then_hits_make_one_upstream_call_without_redis() {
    let app = TestApp::embedded(vec![client("app", SECRET)], &[]).await;
    let first = app.post_body("app", SECRET, Some("api/read")).await;
    assert_eq!(first.x_cache(), "MISS");
    for _ in 0..20 {
        let hit = app.post_body("app", SECRET, Some("api/read")).await;
        assert_eq!(hit.x_cache(), "HIT");
        assert_eq!(hit.access_token(), first.access_token());
    }
    assert_eq!(app.issued(), 1);
}

#[tokio::test]
async fn hits_come_from_redis_when_l1_is_off() {
    let app = TestApp::with_redis(vec![client("app", SECRET)], &[("TOKEN_PROXY_L1_CAPACITY", "0")]).await;
    let first = app.post_basic("app", SECRET, None).await;
    assert_eq!(first.x_cache(), "MISS");
    let hit = app.post_basic("app", SECRET, None).await;
    assert_eq!((hit.x_cache(), hit.access_token()), ("HIT", first.access_token()));
    assert_eq!(app.issued(), 1);
    assert_eq!(app.redis().dump().await.len(), 1);
}

#[tokio::test]
async fn basic_and_body_credentials_share_one_entry() {
    let app = TestApp::with_redis(vec![client("app", "s3:cr+t%/=& long")], &[]).await;
    let basic = app.post_basic("app", "s3:cr+t%/=& long", Some("api/read")).await;
    assert_eq!((basic.status, basic.x_cache()), (200, "MISS"), "{}", basic.raw);
    let body = app.post_body("app", "s3:cr+t%/=& long", Some("api/read")).await;
    assert_eq!((body.x_cache(), body.access_token()), ("HIT", basic.access_token()));
    assert_eq!(app.issued(), 1);
}

#[tokio::test]
async fn scope_order_and_duplicates_share_one_entry_but_omitted_scope_is_its_own() {
    let app = TestApp::with_redis(vec![client("app", SECRET)], &[]).await;
    let first = app.post_basic("app", SECRET, Some("api/read api/write")).await;
    assert_eq!(first.x_cache(), "MISS");
    for scope in ["api/write api/read", "api/read  api/write api/read", " api/write api/write api/read "] {
        let again = app.post_basic("app", SECRET, Some(scope)).await;
        assert_eq!((again.x_cache(), again.access_token()), ("HIT", first.access_token()), "{scope}");
    }
    let omitted = app.post_basic("app", SECRET, None).await;
    assert_eq!(omitted.x_cache(), "MISS");
    assert_ne!(omitted.access_token(), first.access_token());
    let narrower = app.post_basic("app", SECRET, Some("api/read")).await;
    assert_eq!(narrower.x_cache(), "MISS");
    assert_eq!(app.issued(), 3);
}

#[tokio::test]
async fn token_affecting_parameters_are_part_of_the_key() {
    let app = TestApp::with_redis(vec![client("app", SECRET)], &[]).await;
    let base = format!("grant_type=client_credentials&client_id=app&client_secret={SECRET}");
    let plain = app.post_form(&base).await;
    let with_a = app.post_form(&format!("{base}&aws_client_metadata=%7B%22t%22%3A%22a%22%7D")).await;
    let with_b = app.post_form(&format!("{base}&aws_client_metadata=%7B%22t%22%3A%22b%22%7D")).await;
    let with_a_again = app.post_form(&format!("{base}&aws_client_metadata=%7B%22t%22%3A%22a%22%7D")).await;
    assert_eq!([plain.x_cache(), with_a.x_cache(), with_b.x_cache()], ["MISS"; 3]);
    assert_eq!((with_a_again.x_cache(), with_a_again.access_token()), ("HIT", with_a.access_token()));
    assert_eq!(app.issued(), 3);
}

#[tokio::test]
async fn a_wrong_secret_never_receives_a_cached_token() {
    // Every guess must reach the upstream here: throttling (abuse.rs) would answer most with 429.
    let no_throttle = [("TOKEN_PROXY_AUTH_FAILURE_LIMIT", "0"), ("TOKEN_PROXY_AUTH_FAILURE_CLIENT_LIMIT", "0")];
    let app =
        TestApp::with_redis(vec![client("app", "correct-secret"), client("other", "other-secret")], &no_throttle).await;
    let good = app.post_basic("app", "correct-secret", None).await;
    assert_eq!(good.status, 200);
    let token = good.access_token().to_owned();
    let mut wrong: Vec<String> = vec![
        "correct-secreT".into(),
        "correct-secret ".into(),
        " correct-secret".into(),
        "correct-secre".into(),
        "correct-secrett".into(),
        "CORRECT-SECRET".into(),
        "other-secret".into(),
        "correct%2Dsecret".into(),
    ];
    wrong.extend((0..120).map(|i| format!("guess-{i}")));
    for (i, secret) in wrong.iter().enumerate() {
        let reply = if i % 2 == 0 {
            app.post_basic("app", secret, None).await
        } else {
            app.post_body("app", secret, None).await
        };
        assert_ne!(reply.status, 200, "wrong secret {secret:?} was accepted");
        assert!(!reply.raw.contains(&token), "wrong secret {secret:?} received the cached token");
        assert_eq!(reply.error(), "invalid_client");
    }
    // The right secret still hits.
    assert_eq!(app.post_body("app", "correct-secret", None).await.x_cache(), "HIT");
    assert_eq!(app.issued(), 1);
}

#[tokio::test]
async fn different_clients_never_share_entries() {
    let app = TestApp::embedded(vec![client("a", SECRET), client("b", SECRET)], &[]).await;
    let a = app.post_basic("a", SECRET, None).await;
    let b = app.post_basic("b", SECRET, None).await;
    assert_eq!((a.x_cache(), b.x_cache()), ("MISS", "MISS"));
    assert_ne!(a.access_token(), b.access_token());
}

#[tokio::test]
async fn client_cache_directives_are_ignored() {
    let app = TestApp::embedded(vec![client("app", SECRET)], &[]).await;
    let url = app.proxy.token_url();
    post_basic(&url, "app", SECRET, None).await;
    let reply = read(
        http()
            .post(&url)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("authorization", shared::basic::encode("app", SECRET))
            .header("cache-control", "no-cache, max-age=0")
            .header("pragma", "no-cache")
            .body("grant_type=client_credentials")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(reply.x_cache(), "HIT");
    assert_eq!(app.issued(), 1);
}

#[tokio::test]
async fn concurrent_misses_on_one_replica_make_one_upstream_call() {
    let app = TestApp::with_redis(vec![client("app", SECRET)], &[]).await;
    app.idp.idp.set_latency(std::time::Duration::from_millis(200));
    let url = app.proxy.token_url();
    let replies = futures_join_all((0..50).map(|_| {
        let url = url.clone();
        async move { post_basic(&url, "app", SECRET, None).await }
    }))
    .await;
    let token = replies[0].access_token().to_owned();
    assert!(replies.iter().all(|r| r.status == 200 && r.access_token() == token));
    let misses = replies.iter().filter(|r| r.x_cache() == "MISS").count();
    let coalesced = replies.iter().filter(|r| r.x_cache() == "COALESCED").count();
    assert_eq!(misses, 1);
    assert_eq!(misses + coalesced, 50);
    assert_eq!(app.issued(), 1);
    assert_eq!(app.proxy.metric("token_proxy_coalesced_waiters_total").await, 49.0);
}

/// `join_all` without pulling in the futures crate: spawn and await each.
pub async fn futures_join_all<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.unwrap());
    }
    out
}

/// The lookup order (docs/architecture.md): L1, then in-process coalescing, then Redis. With L1 off and a
/// slow link to Redis, a burst of identical requests on one replica shares a handful of reads.
#[tokio::test]
async fn identical_concurrent_requests_on_one_replica_share_one_redis_read() {
    let redis = RedisServer::start().await;
    let link = FaultProxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    let idp = spawn_idp(vec![client("app", SECRET)]).await;
    let overrides = [("TOKEN_PROXY_L1_CAPACITY", "0"), ("TOKEN_PROXY_REDIS_TIMEOUT", "3s")];
    let replica = TestCluster::replica(&format!("redis://{}", link.addr), &idp, &overrides).await;
    let url = replica.token_url();
    assert_eq!(post_basic(&url, "app", SECRET, None).await.x_cache(), "MISS");
    assert_eq!(post_basic(&url, "app", SECRET, None).await.x_cache(), "HIT");

    let inspector = redis.client().await;
    let gets = async || -> u64 {
        let stats: String = inspector.custom(fred::cmd!("INFO"), vec!["commandstats"]).await.unwrap();
        let line = stats.lines().find(|l| l.starts_with("cmdstat_get:")).expect("GET was called");
        line["cmdstat_get:calls=".len()..].split(',').next().unwrap().parse().unwrap()
    };
    // Each read now takes at least 200 ms (100 ms each way): the burst arrives within one.
    link.set_latency(Duration::from_millis(100));
    let before = gets().await;
    let replies = burst(&[url], 200, "app", SECRET, &[]).await;
    let reads = gets().await - before;
    assert!(replies.iter().all(|r| (r.status, r.x_cache()) == (200, "HIT")), "every request is a hit");
    assert!(reads <= 10, "200 identical requests made {reads} Redis reads");
    assert_eq!(idp.idp.issued_total(), 1);
}

/// Invariant 1 under shared reads: concurrent requests for different keys (another client,
/// another scope, a wrong secret) never share a Redis read, however much they overlap.
#[tokio::test]
async fn concurrent_requests_for_different_keys_never_share_a_redis_read() {
    const OTHER_SECRET: &str = "other-shared-read-secret-7731";
    let redis = RedisServer::start().await;
    let link = FaultProxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    let idp = spawn_idp(vec![client("app", SECRET), client("other", OTHER_SECRET)]).await;
    let overrides = [("TOKEN_PROXY_L1_CAPACITY", "0"), ("TOKEN_PROXY_REDIS_TIMEOUT", "3s")];
    let replica = TestCluster::replica(&format!("redis://{}", link.addr), &idp, &overrides).await;
    let url = replica.token_url();
    let callers = [("app", SECRET, None), ("other", OTHER_SECRET, None), ("app", SECRET, Some("api/read"))];
    let mut tokens = Vec::new();
    for (id, secret, scope) in callers {
        tokens.push(post_basic(&url, id, secret, scope).await.access_token().to_owned());
    }

    // Every read takes at least 200 ms: the burst's requests all overlap.
    link.set_latency(Duration::from_millis(100));
    let requests: Vec<_> = (0..60)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                if i % 20 == 0 {
                    return (None, post_basic(&url, "app", "not-the-secret", None).await);
                }
                let which = i % 3;
                let (id, secret, scope) = callers[which];
                (Some(which), post_basic(&url, id, secret, scope).await)
            })
        })
        .collect();
    for request in requests {
        match request.await.unwrap() {
            (Some(which), reply) => {
                assert_eq!((reply.status, reply.x_cache()), (200, "HIT"), "{}", reply.raw);
                assert_eq!(reply.access_token(), tokens[which], "caller {which} got its own token");
            }
            (None, reply) => assert_eq!(reply.status, 400, "a wrong secret is never served: {}", reply.raw),
        }
    }
    assert_eq!(idp.idp.issued_total(), 3);
}
