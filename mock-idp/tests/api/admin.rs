//! The admin API over HTTP: stats, fault settings and reset.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::spawn_app;

#[tokio::test]
async fn stats_show_requests_and_tokens_per_client() {
    let app = spawn_app().await;
    app.token_basic("client-a", "secret-a", "").await;
    app.token_basic("client-a", "secret-a", "").await;
    app.token_basic("client-b", "bad", "").await;
    let reply = app.get("/admin/stats").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, json!({"requests_total": 3, "issued_total": 2, "issued": {"client-a": 2}}));
}

#[tokio::test]
async fn faults_set_over_http_apply_to_token_requests() {
    let app = spawn_app().await;
    let reply = app.post_json("/admin/faults", r#"{"fail_next": {"count": 1, "status": 503}}"#).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["fail_next"], json!({"count": 1, "status": 503}));

    let faulted = app.token_basic("client-a", "secret-a", "").await;
    assert_eq!(faulted.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(faulted.header("retry-after"), Some("1"));
    assert_eq!(app.token_basic("client-a", "secret-a", "").await.status, StatusCode::OK);
    assert_eq!(app.get("/admin/faults").await.body["fail_next"], json!(null));
}

#[tokio::test]
async fn only_the_given_fields_change() {
    let app = spawn_app().await;
    app.post_json("/admin/faults", r#"{"latency_ms": 40, "hang_next": 2, "drop_next": 3}"#).await;
    let reply = app.post_json("/admin/faults", r#"{"token_lifetime_secs": 60}"#).await;
    assert_eq!(
        reply.body,
        json!({"latency_ms": 40, "fail_next": null, "hang_next": 2, "drop_next": 3, "token_lifetime_secs": 60})
    );
    assert_eq!(app.server.idp.latency(), Duration::from_millis(40));
    assert_eq!(app.server.idp.token_lifetime(), Duration::from_secs(60));
    assert_eq!(app.get("/admin/faults").await.body, reply.body);
}

#[tokio::test]
async fn the_token_lifetime_set_over_http_is_used() {
    let app = spawn_app().await;
    app.post_json("/admin/faults", r#"{"token_lifetime_secs": 7}"#).await;
    assert_eq!(app.token_basic("client-a", "secret-a", "").await.body["expires_in"], 7);
}

#[tokio::test]
async fn a_drop_set_over_http_drops_the_connection() {
    let app = spawn_app().await;
    app.post_json("/admin/faults", r#"{"drop_next": 1}"#).await;
    let result = app
        .token_request(&app.http, &[("content-type", crate::helpers::FORM)], "grant_type=client_credentials")
        .send()
        .await;
    assert!(result.is_err(), "{result:?}");
}

#[tokio::test]
async fn bad_fault_settings_are_refused_and_change_nothing() {
    let app = spawn_app().await;
    for body in [
        "not json",
        r#"{"latency_ms": 10, "fail_next": {"count": 1, "status": 200}}"#,
        r#"{"latency_ms": 10, "fail_next": {"count": 1}}"#,
        r#"{"latency_ms": 10, "hang": 1}"#,
        r#"{"latency_ms": -1}"#,
    ] {
        let reply = app.post_json("/admin/faults", body).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(reply.error(), "invalid_request", "{body}");
    }
    assert_eq!(app.server.idp.latency(), Duration::ZERO);
    assert_eq!(app.token_basic("client-a", "secret-a", "").await.status, StatusCode::OK);
}

#[tokio::test]
async fn reset_zeroes_counters_and_clears_faults() {
    let app = spawn_app().await;
    app.token_basic("client-a", "secret-a", "").await;
    app.server.idp.fail_next(5, 500);
    app.server.idp.set_latency(Duration::from_millis(50));
    app.server.idp.set_token_lifetime(Duration::from_secs(9));

    let response = app.http.post(app.url("/admin/reset")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);

    assert_eq!(app.get("/admin/stats").await.body, json!({"requests_total": 0, "issued_total": 0, "issued": {}}));
    assert_eq!(app.server.idp.latency(), Duration::ZERO);
    assert!(app.server.idp.last_request_headers().is_none());
    let reply = app.token_basic("client-a", "secret-a", "").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["expires_in"], 3600);
    assert_eq!(app.server.idp.issued("client-a"), 1);
}

#[tokio::test]
async fn reset_in_process_matches_reset_over_http() {
    let app = spawn_app().await;
    app.token_basic("client-a", "secret-a", "").await;
    app.server.idp.hang_next(1);
    app.server.idp.reset();
    assert_eq!((app.server.idp.requests_total(), app.server.idp.issued("client-a")), (0, 0));
    assert_eq!(app.get("/admin/faults").await.body["hang_next"], 0);
}
