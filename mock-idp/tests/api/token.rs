//! The token endpoint: Cognito's rules for client credentials.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{FORM, claims, spawn_app};

#[tokio::test]
async fn basic_auth_gets_a_bearer_token_with_cognitos_headers() {
    let app = spawn_app().await;
    let reply = app.token_basic("client-a", "secret-a", "").await;

    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.header("cache-control"), Some("no-store"));
    let cookie = reply.header("set-cookie").unwrap();
    let value = cookie.strip_prefix("XSRF-TOKEN=").unwrap();
    assert!(value.ends_with("; Path=/; Secure; HttpOnly; SameSite=Lax"), "{cookie}");
    assert!(value.len() > "; Path=/; Secure; HttpOnly; SameSite=Lax".len() + 16, "{cookie}");

    let body = reply.body.as_object().unwrap();
    assert_eq!(body.len(), 3, "{body:?}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(reply.access_token().split('.').count(), 3);
}

#[tokio::test]
async fn body_credentials_get_a_token_too() {
    let app = spawn_app().await;
    let reply = app.token_post("client-b", "secret-b", "").await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(claims(reply.access_token())["client_id"], "client-b");
}

#[tokio::test]
async fn each_token_is_new_and_sets_a_new_cookie() {
    let app = spawn_app().await;
    let first = app.token_basic("client-a", "secret-a", "").await;
    let second = app.token_basic("client-a", "secret-a", "").await;
    assert_ne!(first.access_token(), second.access_token());
    assert_ne!(first.header("set-cookie"), second.header("set-cookie"));
}

#[tokio::test]
async fn a_wrong_secret_or_unknown_client_is_invalid_client() {
    let app = spawn_app().await;
    for reply in [
        app.token_basic("client-a", "secret-b", "").await,
        app.token_post("client-a", "nope", "").await,
        app.token_basic("nobody", "secret-a", "").await,
    ] {
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        assert_eq!(reply.header("content-type"), Some("application/json"));
        assert_eq!(reply.body, json!({"error": "invalid_client"}));
    }
}

#[tokio::test]
async fn an_omitted_scope_means_all_of_the_clients_scopes() {
    let app = spawn_app().await;
    let reply = app.token_basic("client-a", "secret-a", "").await;
    assert_eq!(claims(reply.access_token())["scope"], "api/read api/write");
    let reply = app.token_basic("client-a", "secret-a", "&scope=").await;
    assert_eq!(claims(reply.access_token())["scope"], "api/read api/write");
}

#[tokio::test]
async fn a_requested_scope_narrows_the_grant() {
    let app = spawn_app().await;
    let reply = app.token_basic("client-a", "secret-a", "&scope=api%2Fwrite").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(claims(reply.access_token())["scope"], "api/write");
}

#[tokio::test]
async fn a_scope_the_client_lacks_is_invalid_scope() {
    let app = spawn_app().await;
    let reply = app.token_basic("client-b", "secret-b", "&scope=api/read+api/write").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.error(), "invalid_scope");
    assert_eq!(app.server.idp.issued_total(), 0);
}

#[tokio::test]
async fn other_grants_are_unsupported_and_a_missing_grant_is_invalid() {
    let app = spawn_app().await;
    let authorization = shared::basic::encode("client-a", "secret-a");
    let headers = [("content-type", FORM), ("authorization", authorization.as_str())];

    let reply = app.post_token(&headers, "grant_type=authorization_code&code=x").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.error(), "unsupported_grant_type");

    let reply = app.post_token(&headers, "scope=api/read").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.error(), "invalid_request");
}

#[tokio::test]
async fn only_form_bodies_are_accepted() {
    let app = spawn_app().await;
    let body = "grant_type=client_credentials&client_id=client-a&client_secret=secret-a";
    for headers in [&[("content-type", "application/json")][..], &[], &[("content-type", "text/plain")]] {
        let reply = app.post_token(headers, body).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{headers:?}");
        assert_eq!(reply.error(), "invalid_request");
    }
    let reply = app.post_token(&[("content-type", "application/x-www-form-urlencoded; charset=UTF-8")], body).await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn repeated_or_malformed_parameters_are_invalid_request() {
    let app = spawn_app().await;
    let base = "grant_type=client_credentials&client_id=client-a&client_secret=secret-a";
    for body in
        [format!("{base}&scope=api/read&scope=api/write"), format!("{base}&grant_type="), format!("{base}&x=%zz")]
    {
        let reply = app.post_token(&[("content-type", FORM)], &body).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(reply.error(), "invalid_request", "{body}");
    }
}

#[tokio::test]
async fn one_authentication_method_per_request() {
    let app = spawn_app().await;
    let authorization = shared::basic::encode("client-a", "secret-a");
    let headers = [("content-type", FORM), ("authorization", authorization.as_str())];

    let reply = app.post_token(&headers, "grant_type=client_credentials&client_secret=secret-a").await;
    assert_eq!((reply.status, reply.error()), (StatusCode::BAD_REQUEST, "invalid_request"));

    let reply = app.post_token(&headers, "grant_type=client_credentials&client_id=client-b").await;
    assert_eq!((reply.status, reply.error()), (StatusCode::BAD_REQUEST, "invalid_request"));

    // The same client_id in both places is not a second method.
    let reply = app.post_token(&headers, "grant_type=client_credentials&client_id=client-a").await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn unknown_parameters_are_ignored() {
    let app = spawn_app().await;
    let reply = app.token_basic("client-a", "secret-a", "&foo=bar&audience=x").await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn counters_count_issued_tokens_per_client_and_every_request() {
    let app = spawn_app().await;
    let idp = &app.server.idp;
    app.token_basic("client-a", "secret-a", "").await;
    app.token_post("client-a", "secret-a", "").await;
    app.token_basic("client-b", "secret-b", "").await;
    app.token_basic("client-b", "wrong", "").await;
    app.post_token(&[], "").await;

    assert_eq!(idp.issued("client-a"), 2);
    assert_eq!(idp.issued("client-b"), 1);
    assert_eq!(idp.issued("nobody"), 0);
    assert_eq!(idp.issued_total(), 3);
    assert_eq!(idp.requests_total(), 5);
}

#[tokio::test]
async fn only_post_on_the_token_path_is_a_token_request() {
    let app = spawn_app().await;
    let reply = app.get("/oauth2/token").await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    let response = app.http.post(app.url("/oauth2/token/")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(app.server.idp.requests_total(), 0);
}

#[tokio::test]
async fn the_last_request_headers_are_kept() {
    let app = spawn_app().await;
    assert!(app.server.idp.last_request_headers().is_none());
    let authorization = shared::basic::encode("client-a", "secret-a");
    app.post_token(
        &[("content-type", FORM), ("authorization", &authorization), ("x-forwarded-by", "proxy-1")],
        "grant_type=client_credentials",
    )
    .await;
    let headers = app.server.idp.last_request_headers().unwrap();
    assert_eq!(headers["x-forwarded-by"], "proxy-1");
    assert_eq!(headers["authorization"], authorization.as_str());
    assert_eq!(headers["content-type"], FORM);
}

#[tokio::test]
async fn healthz_answers() {
    let app = spawn_app().await;
    let response = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}
