//! Invariant 6 and the relay contract: upstream errors pass through or are mapped, never cached.

use std::time::Duration;

use crate::helpers::*;

#[tokio::test]
async fn upstream_4xx_passes_through_exactly_and_is_not_cached() {
    let app = TestApp::with_redis(vec![client("app", SECRET)], &[]).await;
    for _ in 0..3 {
        let reply = app.post_basic("app", SECRET, Some("admin/everything")).await;
        assert_eq!(reply.status, 400);
        assert_eq!(reply.error(), "invalid_scope");
        assert_eq!(reply.x_cache(), "MISS");
    }
    assert_eq!(app.upstream_requests(), 3);
    assert!(app.redis().dump().await.is_empty());
}

#[tokio::test]
async fn upstream_400_body_is_relayed_byte_for_byte() {
    let app = TestApp::embedded(vec![client("app", SECRET)], &[]).await;
    app.idp.idp.fail_next(1, 400);
    let direct = post_body(&app.idp.token_url(), "app", SECRET, None).await;
    app.idp.idp.fail_next(1, 400);
    let proxied = app.post_body("app", SECRET, None).await;
    assert_eq!(proxied.status, 400);
    assert_eq!(proxied.status, direct.status);
    assert_eq!(proxied.raw, direct.raw);
}

#[tokio::test]
async fn upstream_500_becomes_502_and_is_not_cached() {
    let app = TestApp::with_redis(vec![client("app", SECRET)], &[]).await;
    app.idp.idp.fail_next(1, 500);
    let failed = app.post_basic("app", SECRET, None).await;
    assert_eq!((failed.status, failed.error()), (502, "server_error"));
    assert_eq!(failed.headers["cache-control"], "no-store");
    let next = app.post_basic("app", SECRET, None).await;
    assert_eq!((next.status, next.x_cache()), (200, "MISS"));
    assert_eq!(app.issued(), 1);
    assert_eq!(app.proxy.metric("token_proxy_upstream_requests_total{status_class=\"5xx\"}").await, 1.0);
    assert_eq!(app.proxy.metric("token_proxy_requests_total{outcome=\"error\"}").await, 1.0);
}

#[tokio::test]
async fn upstream_503_and_429_keep_retry_after() {
    let app = TestApp::embedded(vec![client("app", SECRET)], &[]).await;
    app.idp.idp.fail_next(1, 503);
    let unavailable = app.post_basic("app", SECRET, None).await;
    assert_eq!((unavailable.status, unavailable.error()), (503, "temporarily_unavailable"));
    assert_eq!(unavailable.headers["retry-after"], "1");
    app.idp.idp.fail_next(1, 429);
    let throttled = app.post_basic("app", SECRET, None).await;
    assert_eq!(throttled.status, 429);
    assert_eq!(throttled.headers["retry-after"], "1");
    assert_eq!(app.issued(), 0);
}

#[tokio::test]
async fn a_hanging_upstream_becomes_504() {
    let app = TestApp::embedded(vec![client("app", SECRET)], &[("TOKEN_PROXY_UPSTREAM_TIMEOUT", "300ms")]).await;
    app.idp.idp.hang_next(1);
    let started = std::time::Instant::now();
    let reply = app.post_basic("app", SECRET, None).await;
    assert_eq!((reply.status, reply.error()), (504, "temporarily_unavailable"));
    assert!(started.elapsed() < Duration::from_secs(5));
    let next = app.post_basic("app", SECRET, None).await;
    assert_eq!((next.status, next.x_cache()), (200, "MISS"));
    assert_eq!(app.proxy.metric("token_proxy_upstream_requests_total{status_class=\"timeout\"}").await, 1.0);
}

#[tokio::test]
async fn a_dropped_or_refused_connection_becomes_502() {
    let app = TestApp::embedded(vec![client("app", SECRET)], &[]).await;
    app.idp.idp.drop_next(1);
    let dropped = app.post_basic("app", SECRET, None).await;
    assert_eq!((dropped.status, dropped.error()), (502, "server_error"), "{}", dropped.raw);

    let closed = format!("http://127.0.0.1:{}/oauth2/token", free_port());
    let proxy = TestProxy::spawn(proxy_config(&closed, &[])).await;
    let refused = proxy.post_basic("app", SECRET, None).await;
    assert_eq!((refused.status, refused.error()), (502, "server_error"));
}

#[tokio::test]
async fn upstream_cookies_and_other_headers_are_never_relayed() {
    let app = TestApp::embedded(vec![client("app", SECRET)], &[]).await;
    let direct = post_body(&app.idp.token_url(), "app", SECRET, None).await;
    assert!(direct.headers.contains_key("set-cookie"), "mock-idp should set a cookie like Cognito");
    for _ in 0..2 {
        let reply = app.post_basic("app", SECRET, None).await;
        assert!(!reply.headers.contains_key("set-cookie"));
        let names: Vec<&str> = reply.headers.keys().map(|k| k.as_str()).collect();
        for name in &names {
            assert!(
                ["content-type", "content-length", "cache-control", "pragma", "x-cache", "date"].contains(name),
                "unexpected response header {name}"
            );
        }
    }
}

#[tokio::test]
async fn other_grants_are_forwarded_unchanged_and_never_cached() {
    let app = TestApp::with_redis(vec![client("app", SECRET)], &[]).await;
    let body = &format!("grant_type=refresh_token&refresh_token=abc&client_id=app&client_secret={SECRET}");
    for _ in 0..2 {
        let reply = app.post_form(body).await;
        assert_eq!(reply.x_cache(), "BYPASS");
        assert_eq!((reply.status, reply.error()), (400, "unsupported_grant_type"));
    }
    assert_eq!(app.upstream_requests(), 2);
    assert!(app.redis().dump().await.is_empty());
}

/// A TOKEN_PROXY_UPSTREAM_HEADERS_FILE holding `contents`, in a directory of its own (removed by
/// the test).
fn headers_file(contents: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("tp-headers-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("headers");
    std::fs::write(&file, contents).unwrap();
    (dir, file)
}

#[tokio::test]
async fn the_upstream_receives_only_allowlisted_headers() {
    let (dir, file) = headers_file("X-Origin-Verify: first-value\n");
    let file_str = file.to_str().unwrap().to_owned();
    let app = TestApp::embedded(vec![client("app", SECRET)], &[("TOKEN_PROXY_UPSTREAM_HEADERS_FILE", &file_str)]).await;
    let reply = read(
        http()
            .post(app.proxy.token_url())
            .header("content-type", "application/x-www-form-urlencoded")
            .header("authorization", shared::basic::encode("app", SECRET))
            .header("x-forwarded-for", "10.9.8.7")
            .header("cookie", "session=1")
            .header("x-custom", "1")
            .body("grant_type=client_credentials")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200);
    let seen = app.idp.idp.last_request_headers().unwrap();
    let mut names: Vec<&str> = seen.keys().map(|k| k.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "accept",
            "accept-encoding",
            "authorization",
            "content-length",
            "content-type",
            "host",
            "user-agent",
            "x-origin-verify"
        ]
    );
    assert_eq!(seen["x-origin-verify"], "first-value");

    // Rotating the file takes effect without a restart.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::write(&file, "X-Origin-Verify: second-value\n").unwrap();
    let idp = app.idp.idp.clone();
    let mut attempt = 0;
    eventually(Duration::from_secs(5), "the new header value", async || {
        // A new cache key each time, so each attempt reaches the upstream.
        attempt += 1;
        app.post_form(&format!("grant_type=client_credentials&client_id=app&client_secret={SECRET}&n={attempt}")).await;
        idp.last_request_headers().unwrap()["x-origin-verify"] == "second-value"
    })
    .await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The origin-verify header rotation of the README (AWS WAF in front of the pool): the rule
/// accepts old and new, the headers file switches while requests flow, then the rule drops the
/// old value. Not one request is refused at any step, and no replica restarts.
#[tokio::test]
async fn the_origin_verify_header_rotates_without_refusing_a_request() {
    let (dir, file) = headers_file("X-Origin-Verify: old-origin-secret-0001\n");
    let file_str = file.to_str().unwrap().to_owned();
    // L1 off and a new key per request: every request reaches the upstream, and its WAF rule.
    let app = TestApp::with_redis(
        vec![client("app", SECRET)],
        &[("TOKEN_PROXY_UPSTREAM_HEADERS_FILE", &file_str), ("TOKEN_PROXY_L1_CAPACITY", "0")],
    )
    .await;
    let idp = app.idp.idp.clone();
    let url = app.proxy.token_url();
    let mut n = 0;
    let mut request = async || {
        n += 1;
        post_basic_with(&url, "app", SECRET, &[("n", &n.to_string())]).await.status
    };
    idp.set_origin_verify(Some(("x-origin-verify", &["old-origin-secret-0001"])));
    assert_eq!(request().await, 200);
    // 1. The rule accepts either value.
    idp.set_origin_verify(Some(("x-origin-verify", &["old-origin-secret-0001", "new-origin-secret-0002"])));
    // 2. The new value goes into the file; requests keep flowing while replicas pick it up.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::write(&file, "X-Origin-Verify: new-origin-secret-0002\n").unwrap();
    let switch_started = std::time::Instant::now();
    while idp.last_request_headers().unwrap()["x-origin-verify"] != "new-origin-secret-0002" {
        assert_eq!(request().await, 200, "refused during the switch");
        assert!(switch_started.elapsed() < Duration::from_secs(5), "the new value was never sent");
    }
    // 3. The rule drops the old value: still nothing refused.
    idp.set_origin_verify(Some(("x-origin-verify", &["new-origin-secret-0002"])));
    for _ in 0..5 {
        assert_eq!(request().await, 200);
    }
    // The rule is real: a request with the old value would now be refused.
    std::fs::write(&file, "X-Origin-Verify: old-origin-secret-0001\n").unwrap();
    let refused_after = std::time::Instant::now();
    loop {
        let status = request().await;
        if status != 200 {
            assert_eq!(status, 403, "the WAF's 403 is relayed as the upstream's own 4xx");
            break;
        }
        assert!(refused_after.elapsed() < Duration::from_secs(5), "the old value was never refused");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The environment form of the extra headers (issue 14): for platforms such as ECS, which hand
/// secrets to a task only as environment variables.
#[tokio::test]
async fn the_environment_form_of_the_headers_reaches_the_upstream() {
    let origin_secret = "env-origin-verify-secret-0003";
    register_secret("the origin-verify header", origin_secret);
    let headers = format!("# the WAF's origin verify\nX-Origin-Verify: {origin_secret}\n\nX-Team: orders\n");
    let app = TestApp::embedded(vec![client("app", SECRET)], &[("TOKEN_PROXY_UPSTREAM_HEADERS", &headers)]).await;
    let reply = app.post_basic("app", SECRET, None).await;
    assert_eq!(reply.status, 200, "{}", reply.raw);
    let seen = app.idp.idp.last_request_headers().unwrap();
    assert_eq!(seen["x-origin-verify"], origin_secret);
    assert_eq!(seen["x-team"], "orders");
}
