//! Injected faults: latency, failures, hangs and dropped connections.

use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::helpers::{FORM, SHORT_TIMEOUT, TestApp, http_client, read, spawn_app};

const BODY: &str = "grant_type=client_credentials&client_id=client-a&client_secret=secret-a";

/// Sends a valid token request with its own client and timeout; the raw result.
async fn send(app: &TestApp, client: &reqwest::Client, timeout: Duration) -> reqwest::Result<reqwest::Response> {
    app.token_request(client, &[("content-type", FORM)], BODY).timeout(timeout).send().await
}

#[tokio::test]
async fn fail_next_answers_each_status_with_an_oauth_error() {
    let app = spawn_app().await;
    let expected = [
        (400, "invalid_request", None),
        (429, "too_many_requests", Some("1")),
        (500, "server_error", None),
        (503, "temporarily_unavailable", Some("1")),
    ];
    for (status, error, retry_after) in expected {
        app.server.idp.fail_next(1, status);
        let reply = app.token_post("client-a", "secret-a", "").await;
        assert_eq!(reply.status.as_u16(), status);
        assert_eq!(reply.error(), error);
        assert_eq!(reply.header("content-type"), Some("application/json"));
        assert_eq!(reply.header("retry-after"), retry_after, "status {status}");
    }
    assert_eq!(app.server.idp.requests_total(), 4);
    assert_eq!(app.server.idp.issued_total(), 0);
}

#[tokio::test]
async fn fail_next_applies_to_exactly_count_requests() {
    let app = spawn_app().await;
    app.server.idp.fail_next(2, 503);
    assert_eq!(app.token_post("client-a", "secret-a", "").await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(app.token_basic("client-b", "secret-b", "").await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(app.token_post("client-a", "secret-a", "").await.status, StatusCode::OK);
    assert_eq!((app.server.idp.requests_total(), app.server.idp.issued_total()), (3, 1));
}

#[tokio::test]
async fn faults_apply_even_to_requests_that_would_be_refused() {
    let app = spawn_app().await;
    app.server.idp.fail_next(1, 500);
    let reply = app.post_token(&[], "garbage").await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test]
async fn latency_delays_every_token_request() {
    let app = spawn_app().await;
    app.server.idp.set_latency(Duration::from_millis(300));
    for _ in 0..2 {
        let started = Instant::now();
        let reply = app.token_post("client-a", "secret-a", "").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(started.elapsed() >= Duration::from_millis(300), "{:?}", started.elapsed());
    }
    // Latency comes before the fault.
    app.server.idp.fail_next(1, 429);
    let started = Instant::now();
    assert_eq!(app.token_post("client-a", "secret-a", "").await.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn latency_comes_from_the_config_too() {
    let mut config = mock_idp::Config::for_tests(vec![mock_idp::ClientConfig::new("client-a", "secret-a", &[])]);
    config.latency = Duration::from_millis(200);
    let app = TestApp { server: mock_idp::spawn(config).await.unwrap(), http: http_client() };
    let started = Instant::now();
    assert_eq!(app.token_post("client-a", "secret-a", "").await.status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn a_hung_request_makes_the_client_time_out() {
    let app = spawn_app().await;
    app.server.idp.hang_next(1);
    let err = send(&app, &app.http, SHORT_TIMEOUT).await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    // Only one request hangs.
    let reply = read(send(&app, &app.http, Duration::from_secs(10)).await.unwrap()).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!((app.server.idp.requests_total(), app.server.idp.issued_total()), (2, 1));
}

#[tokio::test]
async fn a_dropped_connection_is_an_error_for_the_client() {
    let app = spawn_app().await;
    app.server.idp.drop_next(1);
    // `send` itself fails: not even a status line came back (hyper: "connection closed
    // before message completed").
    let err = send(&app, &app.http, Duration::from_secs(10)).await.unwrap_err();
    assert!(err.is_request() && !err.is_timeout(), "{err:?}");
    // The next request gets a token.
    let reply = read(send(&app, &app.http, Duration::from_secs(10)).await.unwrap()).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(!reply.access_token().is_empty());
    assert_eq!((app.server.idp.requests_total(), app.server.idp.issued_total()), (2, 1));
}

#[tokio::test]
async fn a_drop_on_a_kept_alive_connection_fails_the_request_itself() {
    let app = spawn_app().await;
    // Warm up the pool so the faulted request reuses a connection: the client must not be
    // able to retry it transparently, and `send` itself must fail (no status line was sent).
    let client = http_client();
    assert_eq!(send(&app, &client, Duration::from_secs(10)).await.unwrap().status(), StatusCode::OK);
    app.server.idp.drop_next(3);
    for _ in 0..3 {
        let err = send(&app, &client, Duration::from_secs(10)).await.unwrap_err();
        assert!(!err.is_timeout(), "{err:?}");
    }
    assert_eq!(send(&app, &client, Duration::from_secs(10)).await.unwrap().status(), StatusCode::OK);
    assert_eq!((app.server.idp.requests_total(), app.server.idp.issued_total()), (5, 2));
}

#[tokio::test]
async fn pending_faults_are_taken_fail_then_hang_then_drop() {
    let app = spawn_app().await;
    app.server.idp.drop_next(1);
    app.server.idp.hang_next(1);
    app.server.idp.fail_next(1, 500);
    let first = send(&app, &app.http, SHORT_TIMEOUT).await.unwrap();
    assert_eq!(first.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(send(&app, &app.http, SHORT_TIMEOUT).await.unwrap_err().is_timeout());
    let dropped = send(&app, &app.http, Duration::from_secs(10)).await.unwrap_err();
    assert!(!dropped.is_timeout(), "{dropped:?}");
    assert_eq!(send(&app, &app.http, SHORT_TIMEOUT).await.unwrap().status(), StatusCode::OK);
}

#[tokio::test]
async fn shutting_down_ends_hung_requests() {
    let app = spawn_app().await;
    app.server.idp.hang_next(1);
    let request = app.token_request(&app.http, &[("content-type", FORM)], BODY).timeout(Duration::from_secs(30)).send();
    let TestApp { server, .. } = app;
    let idp = server.idp.clone();
    let shutdown = async {
        // Shut down only once the request is hanging inside the server.
        while idp.requests_total() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let started = Instant::now();
        server.shutdown().await.unwrap();
        started.elapsed()
    };
    let (result, took) = tokio::join!(request, shutdown);
    let err = result.unwrap_err();
    assert!(!err.is_timeout(), "{err:?}");
    assert!(took < Duration::from_secs(30), "shutdown waited for the hung request: {took:?}");
}
