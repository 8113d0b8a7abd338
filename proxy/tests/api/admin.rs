//! The admin listener.

use crate::helpers::*;

#[tokio::test]
async fn health_readiness_and_metrics() {
    let app = TestApp::with_redis(vec![client("app", SECRET)], &[]).await;
    let admin = format!("http://{}", app.proxy.admin);
    assert_eq!(http().get(format!("{admin}/healthz")).send().await.unwrap().status(), 200);
    let url = app.proxy.token_url();
    let idp = app.idp.idp.clone();
    eventually(std::time::Duration::from_secs(5), "Redis connected", async || {
        let ready = get_json(&format!("{admin}/readyz")).await;
        ready["redis"] == "up" && ready["ready"] == true
    })
    .await;
    post_basic(&url, "app", SECRET, None).await;
    post_basic(&url, "app", SECRET, None).await;
    post_basic(&url, "app", SECRET, None).await;
    assert_eq!(idp.issued_total(), 1);
    assert_eq!(app.proxy.metric("token_proxy_requests_total{outcome=\"miss\"}").await, 1.0);
    assert_eq!(app.proxy.metric("token_proxy_requests_total{outcome=\"hit\"}").await, 2.0);
    assert_eq!(app.proxy.metric("token_proxy_upstream_calls_avoided_total").await, 2.0);
    assert_eq!(app.proxy.metric("token_proxy_upstream_requests_total{status_class=\"2xx\"}").await, 1.0);
    assert_eq!(app.proxy.metric("token_proxy_request_duration_seconds_count{outcome=\"hit\"}").await, 2.0);
    assert_eq!(app.proxy.metric("token_proxy_upstream_request_duration_seconds_count").await, 1.0);
    assert_eq!(app.proxy.metric("token_proxy_redis_errors_total").await, 0.0);
}

#[tokio::test]
async fn a_stopped_replica_closes_its_listeners() {
    let idp = spawn_idp(vec![client("app", SECRET)]).await;
    let proxy = TestProxy::spawn(proxy_config(&idp.token_url(), &[])).await;
    let admin = format!("http://{}/readyz", proxy.admin);
    let ready = get_json(&admin).await;
    assert_eq!(ready["redis"], "disabled");
    proxy.stop().await;
    assert!(http().get(&admin).send().await.is_err(), "the admin listener closes after draining");
}
