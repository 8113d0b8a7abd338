//! HTTP: one shared client, token requests to any URL, and their answers read whole (and
//! checked for leaks).

use std::sync::OnceLock;
use std::time::Duration;

use super::leak_checks::check_no_leak;

/// The one client every request of the suite goes through (30 s timeout).
pub fn http() -> reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            token_proxy::install_tls_provider();
            // Idle pooled connections are dropped before a replica closes them (it closes idle
            // keep-alive connections after its header-read timeout, 5 s by default, the admin
            // listener too): reusing one just as the server closes it fails the request.
            reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .pool_idle_timeout(Duration::from_millis(800))
                .build()
                .unwrap()
        })
        .clone()
}

/// A token endpoint answer, read whole.
#[derive(Debug)]
pub struct TokenReply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: serde_json::Value,
    pub raw: String,
}

impl TokenReply {
    pub fn x_cache(&self) -> &str {
        self.headers.get("x-cache").map(|v| v.to_str().unwrap()).unwrap_or("")
    }

    pub fn access_token(&self) -> &str {
        self.body["access_token"].as_str().unwrap_or_else(|| panic!("no token in {}", self.raw))
    }

    pub fn expires_in(&self) -> u64 {
        self.body["expires_in"].as_u64().unwrap_or_else(|| panic!("no expires_in in {}", self.raw))
    }

    pub fn error(&self) -> &str {
        self.body["error"].as_str().unwrap_or_else(|| panic!("no error in {}", self.raw))
    }
}

/// Reads an answer whole and checks its headers and body for leaks.
pub async fn read(response: reqwest::Response) -> TokenReply {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let raw = response.text().await.unwrap();
    let body = serde_json::from_str(&raw).unwrap_or(serde_json::Value::Null);
    let reply = TokenReply { status, headers, body, raw };
    check_reply(&reply);
    reply
}

/// Scans a response's headers and body. A successful token response may of course hold its own
/// token; nothing else.
fn check_reply(reply: &TokenReply) {
    let mut headers = Vec::new();
    for (name, value) in &reply.headers {
        headers.extend_from_slice(name.as_str().as_bytes());
        headers.extend_from_slice(b": ");
        headers.extend_from_slice(value.as_bytes());
        headers.push(b'\n');
    }
    check_no_leak(&format!("the headers of a {} response", reply.status), &headers);
    let body = match reply.body["access_token"].as_str() {
        Some(token) if (200..300).contains(&reply.status) => reply.raw.replace(token, "[its own token]"),
        _ => reply.raw.clone(),
    };
    check_no_leak(&format!("the body of a {} response", reply.status), body.as_bytes());
}

/// client_secret_basic.
pub async fn post_basic(url: &str, id: &str, secret: &str, scope: Option<&str>) -> TokenReply {
    let mut body = "grant_type=client_credentials".to_owned();
    if let Some(scope) = scope {
        body.push_str("&scope=");
        shared::form::encode_component(scope, &mut body);
    }
    let response = http()
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("authorization", shared::basic::encode(id, secret))
        .body(body)
        .send()
        .await
        .unwrap();
    read(response).await
}

/// client_secret_post.
pub async fn post_body(url: &str, id: &str, secret: &str, scope: Option<&str>) -> TokenReply {
    let mut pairs = vec![("grant_type", "client_credentials"), ("client_id", id), ("client_secret", secret)];
    if let Some(scope) = scope {
        pairs.push(("scope", scope));
    }
    post_form(url, &shared::form::encode_pairs(pairs)).await
}

/// A form body as given.
pub async fn post_form(url: &str, body: &str) -> TokenReply {
    let response = http()
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    read(response).await
}

/// GETs a JSON document.
pub async fn get_json(url: &str) -> serde_json::Value {
    let text = http().get(url).send().await.unwrap().text().await.unwrap();
    check_no_leak(&format!("the answer to GET {url}"), text.as_bytes());
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

/// A Basic token request with extra form parameters.
pub async fn post_basic_with(url: &str, id: &str, secret: &str, extra: &[(&str, &str)]) -> TokenReply {
    let mut pairs = vec![("grant_type", "client_credentials")];
    pairs.extend_from_slice(extra);
    let response = http()
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("authorization", shared::basic::encode(id, secret))
        .body(shared::form::encode_pairs(pairs))
        .send()
        .await
        .unwrap();
    read(response).await
}
