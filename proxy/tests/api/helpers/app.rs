//! mock-idp and token-proxy: `spawn_idp`, `proxy_config`, one replica (`TestProxy`), and a
//! replica in front of its own mock-idp, with or without Redis (`TestApp`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mock_idp::{ClientConfig, RunningMockIdp};
use token_proxy::app::Application;
use token_proxy::config::Config;
use token_proxy::metrics::Metrics;

use super::ROOT_SECRET;
use super::http::{TokenReply, http, post_basic, post_body, post_form};
use super::leak_checks::{check_logs, check_no_leak, register_secret, registry};
use super::logs::capture;
use super::redis::RedisServer;

/// A mock-idp client; its secret becomes a canary (if at least [`MIN_CANARY_LEN`] long).
pub fn client(id: &str, secret: &str) -> ClientConfig {
    register_secret(id, secret);
    ClientConfig::new(id, secret, &["api/read", "api/write"])
}

/// A mock-idp for these clients, whose secrets and every token it issues become canaries.
pub async fn spawn_idp(clients: Vec<ClientConfig>) -> RunningMockIdp {
    spawn_pool(clients, &mock_idp::Config::for_tests(Vec::new()).issuer).await
}

/// [`spawn_idp`] as one user pool among several: its tokens carry `issuer` as their `iss`.
pub async fn spawn_pool(clients: Vec<ClientConfig>, issuer: &str) -> RunningMockIdp {
    for client in &clients {
        register_secret(&client.client_id, &client.client_secret);
    }
    let config =
        mock_idp::Config { record_tokens: true, issuer: issuer.to_owned(), ..mock_idp::Config::for_tests(clients) };
    let idp = mock_idp::spawn(config).await.expect("mock-idp starts");
    // Before anyone knows its address, so before it has issued anything.
    registry().idps.push((idp.idp.clone(), 0));
    idp
}

/// Settings whose value is a secret, and so a canary: the root secret(s), the admin token.
fn is_secret_setting(name: &str) -> bool {
    (name.contains("SECRET") || name.contains("ADMIN_TOKEN")) && !name.ends_with("_FILE")
}

/// Builds a proxy config: loopback port 0, the given upstream, no drain delay, then the overrides.
pub fn proxy_config(upstream: &str, overrides: &[(&str, &str)]) -> Config {
    let mut all = vec![("TOKEN_PROXY_UPSTREAM_URL", upstream)];
    all.extend_from_slice(overrides);
    config_with(&all)
}

/// Builds a proxy config: loopback port 0, no drain delay, then `overrides` (which name the
/// upstream, or a configuration file with `[upstreams.NAME]` tables).
pub fn config_with(overrides: &[(&str, &str)]) -> Config {
    let mut vars: HashMap<String, String> = HashMap::from([
        ("TOKEN_PROXY_LISTEN".into(), "127.0.0.1:0".into()),
        ("TOKEN_PROXY_ADMIN_LISTEN".into(), "127.0.0.1:0".into()),
        // Stopping a test replica need not wait for a load balancer: binary.rs tests the delay.
        ("TOKEN_PROXY_DRAIN_DELAY".into(), "0".into()),
        // On in every test, so the whole suite's leak checks scan the access log's lines too.
        ("TOKEN_PROXY_ACCESS_LOG".into(), "true".into()),
    ]);
    for (name, value) in overrides {
        if is_secret_setting(name) {
            registry().secret((*name).to_owned(), value, |names| format!("the value of `{names}`"));
        }
        vars.insert((*name).to_owned(), (*value).to_owned());
    }
    Config::from_lookup(|name| vars.get(name).cloned()).expect("valid test config")
}

/// A running proxy replica. When it stops or is dropped, its metrics and the logs are scanned
/// for canaries.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    /// What `/metrics` renders, readable without the listener (which stops with the replica).
    registry: Arc<Metrics>,
    checked: bool,
}

impl TestProxy {
    pub async fn spawn(config: Config) -> TestProxy {
        capture();
        token_proxy::install_tls_provider();
        let app = Application::build(config).await.expect("proxy starts");
        let (addr, admin) = (app.client_addr(), app.admin_addr());
        let registry = Arc::clone(&app.state().metrics);
        // With Redis, a replica uses it once it has read the purge epochs (at start): wait
        // for that, so tests see the cluster behaviour from the first request (bounded: Redis
        // may be down on purpose).
        let upstreams = app.state().upstreams.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        let deadline = Instant::now() + Duration::from_secs(2);
        while !upstreams.purges_synced() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        TestProxy { addr, admin, stop: Some(stop), task, registry, checked: false }
    }

    /// The leak checks of a stopping replica: its metrics, and everything logged so far.
    fn check_leaks(&mut self) {
        self.checked = true;
        check_no_leak(&format!("the metrics of the replica at {}", self.admin), self.registry.render().as_bytes());
        check_logs();
    }

    pub fn token_url(&self) -> String {
        format!("http://{}/oauth2/token", self.addr)
    }

    /// client_secret_basic to this replica.
    pub async fn post_basic(&self, id: &str, secret: &str, scope: Option<&str>) -> TokenReply {
        post_basic(&self.token_url(), id, secret, scope).await
    }

    /// client_secret_post to this replica.
    pub async fn post_body(&self, id: &str, secret: &str, scope: Option<&str>) -> TokenReply {
        post_body(&self.token_url(), id, secret, scope).await
    }

    /// A form body as given, to this replica.
    pub async fn post_form(&self, body: &str) -> TokenReply {
        post_form(&self.token_url(), body).await
    }

    /// `POST /admin/purge` with `body`, as `bearer` (if any): the status and the JSON answer,
    /// which is checked for canaries.
    pub async fn purge(&self, bearer: Option<&str>, body: &str) -> (u16, serde_json::Value) {
        let mut request = http().post(format!("http://{}/admin/purge", self.admin)).body(body.to_owned());
        if let Some(bearer) = bearer {
            request = request.header("authorization", format!("Bearer {bearer}"));
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        check_no_leak("a purge answer", text.as_bytes());
        (status, serde_json::from_str(&text).unwrap_or_default())
    }

    /// Stops the replica and waits until it has drained.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
        self.check_leaks();
    }

    pub async fn metrics(&self) -> String {
        let text = http().get(format!("http://{}/metrics", self.admin)).send().await.unwrap().text().await.unwrap();
        check_no_leak(&format!("the /metrics of the replica at {}", self.admin), text.as_bytes());
        text
    }

    /// The value of one metric line, e.g. `token_proxy_requests_total{outcome="hit"}`.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Panicking in a drop that runs because of a panic would abort the whole run.
        if !self.checked && !std::thread::panicking() {
            self.check_leaks();
        }
    }
}

/// A proxy in front of a mock-idp, with or without Redis.
pub struct TestApp {
    pub idp: RunningMockIdp,
    pub proxy: TestProxy,
    pub redis: Option<RedisServer>,
}

impl TestApp {
    /// Embedded mode: no Redis.
    pub async fn embedded(clients: Vec<ClientConfig>, overrides: &[(&str, &str)]) -> TestApp {
        let idp = spawn_idp(clients).await;
        let proxy = TestProxy::spawn(proxy_config(&idp.token_url(), overrides)).await;
        TestApp { idp, proxy, redis: None }
    }

    /// With its own redis-server.
    pub async fn with_redis(clients: Vec<ClientConfig>, overrides: &[(&str, &str)]) -> TestApp {
        let redis = RedisServer::start().await;
        let idp = spawn_idp(clients).await;
        let url = redis.url();
        let mut all = vec![("TOKEN_PROXY_REDIS_URL", url.as_str()), ("TOKEN_PROXY_SECRET", ROOT_SECRET)];
        all.extend_from_slice(overrides);
        let proxy = TestProxy::spawn(proxy_config(&idp.token_url(), &all)).await;
        TestApp { idp, proxy, redis: Some(redis) }
    }

    pub fn redis(&self) -> &RedisServer {
        self.redis.as_ref().expect("this app has Redis")
    }

    pub fn redis_mut(&mut self) -> &mut RedisServer {
        self.redis.as_mut().expect("this app has Redis")
    }

    pub fn issued(&self) -> u64 {
        self.idp.idp.issued_total()
    }

    pub fn upstream_requests(&self) -> u64 {
        self.idp.idp.requests_total()
    }

    /// client_secret_basic to the proxy.
    pub async fn post_basic(&self, id: &str, secret: &str, scope: Option<&str>) -> TokenReply {
        self.proxy.post_basic(id, secret, scope).await
    }

    /// client_secret_post to the proxy.
    pub async fn post_body(&self, id: &str, secret: &str, scope: Option<&str>) -> TokenReply {
        self.proxy.post_body(id, secret, scope).await
    }

    /// A form body as given, to the proxy.
    pub async fn post_form(&self, body: &str) -> TokenReply {
        self.proxy.post_form(body).await
    }

    /// `POST /admin/purge` to the proxy (see [`TestProxy::purge`]).
    pub async fn purge(&self, bearer: Option<&str>, body: &str) -> (u16, serde_json::Value) {
        self.proxy.purge(bearer, body).await
    }
}
