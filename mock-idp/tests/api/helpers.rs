//! `spawn_app()` starts a mock-idp with two clients and returns typed helpers around it.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use mock_idp::{ClientConfig, Config, RunningMockIdp};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::Value;

pub const FORM: &str = "application/x-www-form-urlencoded";

pub struct TestApp {
    pub server: RunningMockIdp,
    pub http: reqwest::Client,
}

/// An HTTP answer, read in full.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    pub fn error(&self) -> &str {
        self.body["error"].as_str().unwrap_or_else(|| panic!("no error in {}", self.body))
    }

    pub fn access_token(&self) -> &str {
        self.body["access_token"].as_str().unwrap_or_else(|| panic!("no token in {}", self.body))
    }
}

pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // No proxy from the environment: these requests must go straight to loopback.
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// `client-a` may have `api/read api/write`, `client-b` only `api/read`.
pub async fn spawn_app() -> TestApp {
    let clients = vec![
        ClientConfig::new("client-a", "secret-a", &["api/read", "api/write"]),
        ClientConfig::new("client-b", "secret-b", &["api/read"]),
    ];
    let server = mock_idp::spawn(Config::for_tests(clients)).await.unwrap();
    TestApp { server, http: http_client() }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.base_url())
    }

    /// A token request with the given headers and raw body, sent with `client`.
    pub fn token_request(
        &self,
        client: &reqwest::Client,
        headers: &[(&str, &str)],
        body: &str,
    ) -> reqwest::RequestBuilder {
        let mut request = client.post(self.server.token_url()).body(body.to_owned());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request
    }

    pub async fn post_token(&self, headers: &[(&str, &str)], body: &str) -> Reply {
        read(self.token_request(&self.http, headers, body).send().await.unwrap()).await
    }

    /// client_secret_basic, with `extra` appended to `grant_type=client_credentials`.
    pub async fn token_basic(&self, id: &str, secret: &str, extra: &str) -> Reply {
        let authorization = shared::basic::encode(id, secret);
        let body = format!("grant_type=client_credentials{extra}");
        self.post_token(&[("content-type", FORM), ("authorization", &authorization)], &body).await
    }

    /// client_secret_post, with `extra` appended.
    pub async fn token_post(&self, id: &str, secret: &str, extra: &str) -> Reply {
        let body = format!("grant_type=client_credentials&client_id={id}&client_secret={secret}{extra}");
        self.post_token(&[("content-type", FORM)], &body).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        read(self.http.get(self.url(path)).send().await.unwrap()).await
    }

    pub async fn post_json(&self, path: &str, body: &str) -> Reply {
        read(self.http.post(self.url(path)).body(body.to_owned()).send().await.unwrap()).await
    }
}

pub async fn read(response: reqwest::Response) -> Reply {
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.unwrap();
    let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
    Reply { status, headers, body }
}

/// The claims of a JWT, without verifying it.
pub fn claims(token: &str) -> Value {
    let part = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

/// A client timeout long enough for loopback, short enough to keep the suite fast.
pub const SHORT_TIMEOUT: Duration = Duration::from_millis(500);
