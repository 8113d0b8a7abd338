//! Test harness: real `redis-server` processes on free ports, `mock-idp` in-process as the
//! upstream, and token-proxy replicas on port 0, all over loopback HTTP.

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fred::prelude::*;
use mock_idp::{ClientConfig, RunningMockIdp};
use token_proxy::app::Application;
use token_proxy::config::Config;

/// Base64 of the 32 bytes "0123456789abcdef0123456789abcdef".
pub const ROOT_SECRET: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

// ---------------------------------------------------------------------------------------------
// Captured logs: every test process logs at TRACE into one buffer that leak tests scan.

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture() -> &'static Capture {
    static CAPTURE: OnceLock<Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture = Capture(Arc::default());
        let writer = capture.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("trace")
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .try_init();
        capture
    })
}

/// Everything logged so far by this test process.
pub fn captured_logs() -> String {
    String::from_utf8_lossy(&capture().0.lock().unwrap()).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Redis

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `redis-server` owned by one test; killed (by pid) when dropped.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: std::path::PathBuf,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("tp-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = RedisServer { port, child: None, dir };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (the README's test command installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start on port {}", self.port);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill").args([signal, &pid.to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// SIGKILL: the server vanishes without a goodbye.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (empty: it keeps nothing on disk).
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// SIGSTOP: the server freezes with its connections open.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// A fresh client for inspecting and tampering with what the proxy stored.
    pub async fn client(&self) -> Client {
        let client = Client::new(fred::prelude::Config::from_url(&self.url()).unwrap(), None, None, None);
        client.init().await.unwrap();
        client
    }

    /// Every key and its value.
    pub async fn dump(&self) -> Vec<(Bytes, Bytes)> {
        let client = self.client().await;
        let keys: Vec<Bytes> = client.custom(fred::cmd!("KEYS"), vec!["*"]).await.unwrap();
        let mut out = Vec::new();
        for key in keys {
            let value: Option<Bytes> = client.get(key.clone()).await.unwrap();
            out.push((key, value.unwrap_or_default()));
        }
        out
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// mock-idp and token-proxy

pub fn client(id: &str, secret: &str) -> ClientConfig {
    ClientConfig::new(id, secret, &["api/read", "api/write"])
}

pub async fn spawn_idp(clients: Vec<ClientConfig>) -> RunningMockIdp {
    mock_idp::spawn(mock_idp::Config::for_tests(clients)).await.expect("mock-idp starts")
}

/// Builds a proxy config: loopback port 0, the given upstream, then the overrides.
pub fn proxy_config(upstream: &str, overrides: &[(&str, &str)]) -> Config {
    let mut vars: HashMap<String, String> = HashMap::from([
        ("TOKEN_PROXY_UPSTREAM_URL".into(), upstream.to_owned()),
        ("TOKEN_PROXY_LISTEN".into(), "127.0.0.1:0".into()),
        ("TOKEN_PROXY_ADMIN_LISTEN".into(), "127.0.0.1:0".into()),
    ]);
    for (name, value) in overrides {
        vars.insert((*name).to_owned(), (*value).to_owned());
    }
    Config::from_lookup(|name| vars.get(name).cloned()).expect("valid test config")
}

/// A running proxy replica.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestProxy {
    pub async fn spawn(config: Config) -> TestProxy {
        capture();
        token_proxy::install_tls_provider();
        let app = Application::build(config).await.expect("proxy starts");
        let (addr, admin) = (app.client_addr(), app.admin_addr());
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        TestProxy { addr, admin, stop: Some(stop), task }
    }

    pub fn token_url(&self) -> String {
        format!("http://{}/oauth2/token", self.addr)
    }

    /// Stops the replica and waits until it has drained.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }

    pub async fn metrics(&self) -> String {
        http().get(format!("http://{}/metrics", self.admin)).send().await.unwrap().text().await.unwrap()
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
}

// ---------------------------------------------------------------------------------------------
// HTTP

pub fn http() -> reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            token_proxy::install_tls_provider();
            reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
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

pub async fn read(response: reqwest::Response) -> TokenReply {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let raw = response.text().await.unwrap();
    let body = serde_json::from_str(&raw).unwrap_or(serde_json::Value::Null);
    TokenReply { status, headers, body, raw }
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
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

/// Waits until `condition` holds, polling; panics after `timeout`.
pub async fn eventually(timeout: Duration, what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Clusters: several replicas sharing one Redis and one secret.

/// `n` replicas in front of one mock-idp, sharing one redis-server. Each replica is a separate
/// app instance with its own connections, L1 and single-flight state.
pub struct TestCluster {
    pub redis: RedisServer,
    pub idp: RunningMockIdp,
    pub replicas: Vec<TestProxy>,
}

impl TestCluster {
    pub async fn start(n: usize, clients: Vec<ClientConfig>, overrides: &[(&str, &str)]) -> TestCluster {
        let redis = RedisServer::start().await;
        let idp = spawn_idp(clients).await;
        let mut replicas = Vec::new();
        for _ in 0..n {
            replicas.push(TestCluster::replica(&redis.url(), &idp, overrides).await);
        }
        TestCluster { redis, idp, replicas }
    }

    /// A replica of this cluster's configuration, against `redis_url` (e.g. a fault proxy).
    pub async fn replica(redis_url: &str, idp: &RunningMockIdp, overrides: &[(&str, &str)]) -> TestProxy {
        let mut all = vec![("TOKEN_PROXY_REDIS_URL", redis_url), ("TOKEN_PROXY_SECRET", ROOT_SECRET)];
        all.extend_from_slice(overrides);
        TestProxy::spawn(proxy_config(&idp.token_url(), &all)).await
    }

    /// Token URLs of the replicas, to spread requests over.
    pub fn urls(&self) -> Vec<String> {
        self.replicas.iter().map(TestProxy::token_url).collect()
    }

    /// Sum of one metric over all replicas.
    pub async fn metric_sum(&self, series: &str) -> f64 {
        let mut sum = 0.0;
        for replica in &self.replicas {
            sum += replica.metric(series).await;
        }
        sum
    }

    /// The Redis lock key the proxy uses for a Basic request of `id`/`secret` with `extra`.
    pub fn lock_key(&self, id: &str, secret: &str, extra: &[(&str, &str)]) -> String {
        use base64::Engine as _;
        use shared::canonical::{AuthMethod, CanonicalRequest, Scope};
        let root = base64::engine::general_purpose::STANDARD.decode(ROOT_SECRET).unwrap();
        let keys = shared::keys::Keys::derive(&root).unwrap();
        let request = CanonicalRequest {
            client_id: id.into(),
            client_secret: secret.into(),
            auth_method: AuthMethod::Basic,
            grant_type: "client_credentials".into(),
            scope: Scope::Omitted,
            extra: extra.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
        };
        let key = keys.hasher.cache_key(&self.idp.token_url(), &request);
        format!("{}:lock", token_proxy::store::RedisStore::entry_key(&key))
    }
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

/// Runs `count` copies of a request concurrently, spread round-robin over `urls`.
pub async fn burst(urls: &[String], count: usize, id: &str, secret: &str, extra: &[(&str, &str)]) -> Vec<TokenReply> {
    let handles: Vec<_> = (0..count)
        .map(|i| {
            let url = urls[i % urls.len()].clone();
            let (id, secret) = (id.to_owned(), secret.to_owned());
            let extra: Vec<(String, String)> = extra.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
            tokio::spawn(async move {
                let extra: Vec<(&str, &str)> = extra.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
                post_basic_with(&url, &id, &secret, &extra).await
            })
        })
        .collect();
    let mut replies = Vec::with_capacity(count);
    for handle in handles {
        replies.push(handle.await.unwrap());
    }
    replies
}

/// What a stretch of steady load saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub requests: usize,
    /// Answers by status code.
    pub statuses: std::collections::BTreeMap<u16, usize>,
    /// Answers by X-Cache value.
    pub cache: std::collections::BTreeMap<String, usize>,
    pub slowest: Duration,
}

impl LoadReport {
    pub fn server_errors(&self) -> usize {
        self.statuses.iter().filter(|(s, _)| **s >= 500).map(|(_, n)| n).sum()
    }
}

/// Steady load for `duration`: `workers` loops, each sending requests for one of `keys` keys
/// (the `n` parameter of the form) to the replicas in turn, as fast as answers come.
pub async fn steady_load(
    urls: Vec<String>,
    duration: Duration,
    workers: usize,
    keys: usize,
    id: &str,
    secret: &str,
) -> LoadReport {
    let stop_at = Instant::now() + duration;
    let report = Arc::new(Mutex::new(LoadReport::default()));
    let mut handles = Vec::new();
    for w in 0..workers {
        let (urls, report, id, secret) = (urls.clone(), Arc::clone(&report), id.to_owned(), secret.to_owned());
        handles.push(tokio::spawn(async move {
            let mut i = w;
            while Instant::now() < stop_at {
                let n = (i % keys).to_string();
                let started = Instant::now();
                let reply = post_basic_with(&urls[i % urls.len()], &id, &secret, &[("n", &n)]).await;
                let elapsed = started.elapsed();
                let mut r = report.lock().unwrap();
                r.requests += 1;
                *r.statuses.entry(reply.status).or_default() += 1;
                *r.cache.entry(reply.x_cache().to_owned()).or_default() += 1;
                r.slowest = r.slowest.max(elapsed);
                i += workers;
            }
        }));
    }
    for handle in handles {
        handle.await.unwrap();
    }
    Arc::try_unwrap(report).unwrap().into_inner().unwrap()
}
