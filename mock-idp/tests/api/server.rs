//! Starting and stopping a background mock-idp.

use std::time::Duration;

use mock_idp::{ClientConfig, Config};
use reqwest::StatusCode;

use crate::helpers::{http_client, spawn_app};

#[tokio::test]
async fn spawn_binds_a_free_port_and_reports_it() {
    let first = spawn_app().await;
    let second = spawn_app().await;
    assert_ne!(first.server.addr.port(), 0);
    assert_ne!(first.server.addr, second.server.addr);
    assert_eq!(first.server.token_url(), format!("http://{}/oauth2/token", first.server.addr));
    let response = first.http.get(first.server.jwks_url()).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn dropping_the_server_closes_its_port() {
    let app = spawn_app().await;
    let url = app.url("/healthz");
    drop(app.server);
    // The listener closes as soon as the server task sees the signal.
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(url.trim_start_matches("http://").trim_end_matches("/healthz")).await.is_err()
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "the port still accepts connections");
}

#[tokio::test]
async fn shutdown_waits_for_the_server_to_finish() {
    let app = spawn_app().await;
    let addr = app.server.addr;
    assert_eq!(app.token_basic("client-a", "secret-a", "").await.status, StatusCode::OK);
    app.server.shutdown().await.unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn an_invalid_client_list_is_refused_at_spawn() {
    let twice = vec![ClientConfig::new("a", "s", &[]), ClientConfig::new("a", "t", &[])];
    let err = mock_idp::spawn(Config::for_tests(twice)).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("`a`"), "{err}");
}

#[tokio::test]
async fn a_mock_without_clients_refuses_everyone() {
    let server = mock_idp::spawn(Config::for_tests(Vec::new())).await.unwrap();
    let response = http_client()
        .post(server.token_url())
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials&client_id=demo-client&client_secret=demo-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}
