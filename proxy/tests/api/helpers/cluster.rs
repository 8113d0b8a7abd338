//! Clusters: several replicas sharing one Redis and one secret, and load spread over them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mock_idp::{ClientConfig, RunningMockIdp};

use super::ROOT_SECRET;
use super::app::{TestProxy, proxy_config, spawn_idp};
use super::http::{TokenReply, post_basic_with};
use super::redis::{RedisServer, RespConnection};

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
        // The purge-everything epoch is part of every key (see `token_proxy::purge`).
        let all = RespConnection::open(self.redis.port).unwrap().call(&[b"HGET", b"tp:purge", b"all"]).unwrap();
        let all = all.flatten().concat();
        let all = std::str::from_utf8(&all).unwrap().parse().unwrap_or(0);
        format!("{}:lock", entry_key(&self.idp.token_url(), id, secret, extra, all))
    }
}

/// The Redis entry key the proxy uses for a Basic request of `id`/`secret` with `extra` to the
/// upstream `token_url`, under the purge-everything epoch `all` (0 until a purge of all).
pub fn entry_key(token_url: &str, id: &str, secret: &str, extra: &[(&str, &str)], all: u64) -> String {
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
    let epochs = shared::canonical::PurgeEpochs { all, ..Default::default() };
    token_proxy::store::RedisStore::entry_key(&keys.hasher.cache_key_with(token_url, &request, epochs))
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
