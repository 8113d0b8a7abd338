//! Production Redis: TLS with a private CA and mTLS, a password from a file, the URL schemes;
//! Redis refusing this replica (a certificate not trusted, no client certificate, a wrong
//! password) said once with its cause while `/readyz` says Redis is down and requests are still
//! served from the upstream; the hit reads over TLS; a TLS Redis Cluster behind three replicas;
//! and the least-privilege ACL of the README.

use std::sync::Arc;
use std::time::Duration;

use fred::prelude::KeysInterface as _;
use mock_idp::RunningMockIdp;
use token_proxy::read_pipeline::{ReadError, ReadPipeline, Target};
use token_proxy::store::{Endpoint, client_config};

use crate::helpers::*;

const BIN: &str = env!("CARGO_BIN_EXE_token-proxy");

/// A replica on `url` with `settings`, in front of `idp`.
async fn replica(idp: &RunningMockIdp, url: &str, settings: &[(&str, String)]) -> TestProxy {
    let settings: Vec<(&str, &str)> = settings.iter().map(|(name, value)| (*name, value.as_str())).collect();
    TestCluster::replica(url, idp, &settings).await
}

async fn readyz(proxy: &TestProxy) -> serde_json::Value {
    get_json(&format!("http://{}/readyz", proxy.admin)).await
}

async fn wait_until_redis_is_up(proxy: &TestProxy) {
    eventually(Duration::from_secs(10), "Redis up in /readyz", async || readyz(proxy).await["redis"] == "up").await;
}

/// The log lines saying that the Redis on `port` refuses this replica.
fn refusal_lines(port: u16) -> Vec<String> {
    let server = format!("127.0.0.1:{port}");
    captured_logs()
        .lines()
        .filter(|line| line.contains("Redis refuses this replica") && line.contains(&server))
        .map(str::to_owned)
        .collect()
}

/// Asserts what a replica refused by its Redis shows: one log line with the cause (`cause`),
/// `/readyz` saying Redis is down with the cause, and requests still answered, from the
/// upstream (three keys, three calls).
async fn assert_refused_yet_served(proxy: &TestProxy, idp: &RunningMockIdp, port: u16, cause: &str) {
    eventually(Duration::from_secs(10), "the refusal in the log", async || !refusal_lines(port).is_empty()).await;
    let ready = readyz(proxy).await;
    assert_eq!((ready["ready"].as_bool(), ready["redis"].as_str()), (Some(true), Some("down")), "{ready}");
    assert!(ready["redis_refusal"].as_str().is_some_and(|r| r.contains(cause)), "{ready}");
    for scope in [None, Some("api/read"), Some("api/write")] {
        let reply = proxy.post_basic("app", SECRET, scope).await;
        assert_eq!((reply.status, reply.x_cache()), (200, "MISS"), "{}", reply.raw);
    }
    assert_eq!(idp.idp.issued_total(), 3);
    // Requests keep failing over to the upstream without a word more, and readiness holds.
    assert_eq!(readyz(proxy).await["redis"], "down");
    let lines = refusal_lines(port);
    eprintln!("the refusal, as logged: {}", lines[0]);
    assert_eq!(lines.len(), 1, "said once: {lines:#?}");
    assert!(lines[0].contains(cause), "{}", lines[0]);
}

// ---------------------------------------------------------------------------------------------
// TLS, mTLS and a password file that work

#[tokio::test]
async fn a_tls_redis_with_a_private_ca_mtls_and_a_password_file_serves_hits_to_every_replica() {
    let tls = RedisTls::new("mtls");
    let password = "redis-password-canary-0042";
    register_secret("the Redis user proxy", password);
    let redis = TlsRedis::start(&tls, "yes", &[]).await;
    redis.server.call(&["ACL", "SETUSER", "proxy", "on", &format!(">{password}"), "~*", "&*", "+@all"]).unwrap();
    let idp = spawn_idp(vec![client("app", SECRET)]).await;
    let url = format!("rediss://proxy@127.0.0.1:{}", redis.tls_port);
    let mut settings = tls.proxy_settings(true);
    settings.push(("TOKEN_PROXY_REDIS_PASSWORD_FILE", tls.dir.write("redis-password", &format!("{password}\n"))));
    let (a, b) = (replica(&idp, &url, &settings).await, replica(&idp, &url, &settings).await);
    wait_until_redis_is_up(&a).await;
    wait_until_redis_is_up(&b).await;

    let first = a.post_basic("app", SECRET, None).await;
    assert_eq!((first.status, first.x_cache()), (200, "MISS"));
    // The other replica's L1 is empty: its HIT came from Redis, over TLS.
    let second = b.post_basic("app", SECRET, None).await;
    assert_eq!((second.status, second.x_cache()), (200, "HIT"));
    assert_eq!(second.access_token(), first.access_token());
    assert_eq!(idp.idp.issued_total(), 1);
    assert!(redis.server.dump().await.iter().any(|(key, _)| key.starts_with(b"tp:{")), "the entry is in Redis");
    assert_eq!(
        a.metric("token_proxy_redis_errors_total").await + b.metric("token_proxy_redis_errors_total").await,
        0.0
    );
    assert!(refusal_lines(redis.tls_port).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Redis refusing us: said once, with the cause; /readyz down; requests served

#[tokio::test]
async fn an_untrusted_server_certificate_is_said_once_and_requests_are_served_without_redis() {
    let (tls, other) = (RedisTls::new("untrusted"), RedisTls::new("other-ca"));
    let redis = TlsRedis::start(&tls, "no", &[]).await;
    let idp = spawn_idp(vec![client("app", SECRET)]).await;
    // The proxy trusts another CA than the one that signed the server's certificate.
    let proxy = replica(&idp, &redis.url(), &other.proxy_settings(false)).await;
    assert_refused_yet_served(&proxy, &idp, redis.tls_port, "not signed by a CA this replica trusts").await;
}

#[tokio::test]
async fn a_server_that_requires_a_client_certificate_is_said_once_and_requests_are_served_without_redis() {
    let tls = RedisTls::new("mtls-required");
    let redis = TlsRedis::start(&tls, "yes", &[]).await;
    let idp = spawn_idp(vec![client("app", SECRET)]).await;
    let proxy = replica(&idp, &redis.url(), &tls.proxy_settings(false)).await;
    assert_refused_yet_served(&proxy, &idp, redis.tls_port, "client certificate").await;
}

#[tokio::test]
async fn a_wrong_password_is_said_once_and_requests_are_served_without_redis() {
    let redis = RedisServer::start().await;
    redis.call(&["ACL", "SETUSER", "proxy", "on", ">the-right-password", "~*", "&*", "+@all"]).unwrap();
    let dir = TempDir::new("wrong-password");
    let password_file = dir.write("password", "not-the-password\n");
    let idp = spawn_idp(vec![client("app", SECRET)]).await;
    // Plain TCP: the command client, the subscription and the hit reads are all refused.
    let url = format!("redis://proxy@127.0.0.1:{}", redis.port);
    let proxy = replica(&idp, &url, &[("TOKEN_PROXY_REDIS_PASSWORD_FILE", password_file)]).await;
    assert_refused_yet_served(&proxy, &idp, redis.port, "WRONGPASS").await;
}

/// A refusal that starts while the replica runs (its password changed under it, and its
/// hit-read connection dropped) is said once, however often that connection tries again, and so
/// is its end: once Redis accepts the replica again, it is used again. (The first version held
/// every read back while anything was refused, so a refused hit-read connection never tried
/// again: the replica stayed "down" for good.)
#[tokio::test]
async fn a_password_changed_under_a_running_replica_is_said_once_and_so_is_its_end() {
    let redis = RedisServer::start().await;
    redis.call(&["ACL", "SETUSER", "proxy", "on", ">first-password", "~*", "&*", "+@all"]).unwrap();
    let dir = TempDir::new("rotated-password");
    let idp = spawn_idp(vec![client("app", SECRET)]).await;
    let url = format!("redis://proxy@127.0.0.1:{}", redis.port);
    let settings = [
        ("TOKEN_PROXY_REDIS_PASSWORD_FILE", dir.write("password", "first-password")),
        // Every hit is a Redis read.
        ("TOKEN_PROXY_L1_CAPACITY", "0".to_owned()),
    ];
    let proxy = replica(&idp, &url, &settings).await;
    wait_until_redis_is_up(&proxy).await;
    assert_eq!(proxy.post_basic("app", SECRET, None).await.x_cache(), "MISS");
    assert_eq!(proxy.post_basic("app", SECRET, None).await.x_cache(), "HIT");

    // The password changes and the hit-read connection (the one whose last command was a
    // batch's ECHO marker) is dropped: its every reconnection fails.
    redis.call(&["ACL", "SETUSER", "proxy", "resetpass", ">second-password"]).unwrap();
    let clients = String::from_utf8(redis.call(&["CLIENT", "LIST"]).unwrap().concat()).unwrap();
    let reads =
        clients.lines().find(|l| l.contains(" user=proxy ") && l.contains(" cmd=echo ")).expect("the hit reads");
    let id = reads.split(' ').find_map(|field| field.strip_prefix("id=")).unwrap();
    redis.call(&["CLIENT", "KILL", "ID", id]).unwrap();
    // The next read finds out.
    eventually(Duration::from_secs(10), "the refusal in the log", async || {
        assert_eq!(proxy.post_basic("app", SECRET, None).await.status, 200);
        refusal_lines(redis.port).len() == 1
    })
    .await;
    assert_eq!(readyz(&proxy).await["redis"], "down");
    // More reads, more attempts (after the connection's backoff), all refused, none said again.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(proxy.post_basic("app", SECRET, Some("api/write")).await.status, 200);
    }
    assert_eq!(refusal_lines(redis.port).len(), 1, "said once");

    // The old password is accepted again.
    redis.call(&["ACL", "SETUSER", "proxy", ">first-password"]).unwrap();
    eventually(Duration::from_secs(15), "Redis used again", async || {
        proxy.post_basic("app", SECRET, None).await.x_cache() == "HIT" && readyz(&proxy).await["redis"] == "up"
    })
    .await;
    let server = format!("server=127.0.0.1:{}", redis.port);
    let logs = captured_logs();
    let accepted: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("Redis accepts this replica's connections again") && l.contains(&server))
        .collect();
    assert_eq!(accepted.len(), 1, "{accepted:#?}");
    assert_eq!(refusal_lines(redis.port).len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Configuration

/// Unusable TLS or password files stop `--check` (and start-up) with one line naming the
/// setting, never blaming the URL.
#[tokio::test]
async fn unusable_redis_files_fail_check_with_one_line_naming_the_setting() {
    let tls = RedisTls::new("check");
    let dir = TempDir::new("check-files");
    let not_pem = dir.write("not.pem", "not a certificate");
    let empty = dir.write("empty", "");
    let missing = dir.path("missing.pem").display().to_string();
    let other = RedisTls::new("check-other");
    let base = [
        ("TOKEN_PROXY_UPSTREAM_URL", "http://127.0.0.1:1/oauth2/token"),
        ("TOKEN_PROXY_SECRET", ROOT_SECRET),
        ("TOKEN_PROXY_REDIS_URL", "rediss-cluster://127.0.0.1:7000?node=127.0.0.1:7001"),
        // Not the system's roots: a test machine may have none.
        ("TOKEN_PROXY_REDIS_CA_FILE", tls.ca_file.as_str()),
    ];
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![("TOKEN_PROXY_REDIS_CA_FILE", &missing)], "TOKEN_PROXY_REDIS_CA_FILE"),
        (vec![("TOKEN_PROXY_REDIS_CA_FILE", &not_pem)], "TOKEN_PROXY_REDIS_CA_FILE"),
        (
            vec![("TOKEN_PROXY_REDIS_CA_FILE", &tls.ca_file), ("TOKEN_PROXY_REDIS_CLIENT_CERT_FILE", &tls.client_cert)],
            "TOKEN_PROXY_REDIS_CLIENT_CERT_FILE",
        ),
        (
            vec![
                ("TOKEN_PROXY_REDIS_CA_FILE", &tls.ca_file),
                ("TOKEN_PROXY_REDIS_CLIENT_CERT_FILE", &tls.client_cert),
                ("TOKEN_PROXY_REDIS_CLIENT_KEY_FILE", &other.client_key),
            ],
            "TOKEN_PROXY_REDIS_CLIENT_KEY_FILE",
        ),
        (
            vec![
                ("TOKEN_PROXY_REDIS_CA_FILE", &tls.ca_file),
                ("TOKEN_PROXY_REDIS_CLIENT_CERT_FILE", &tls.client_cert),
                ("TOKEN_PROXY_REDIS_CLIENT_KEY_FILE", &not_pem),
            ],
            "TOKEN_PROXY_REDIS_CLIENT_KEY_FILE",
        ),
        (vec![("TOKEN_PROXY_REDIS_PASSWORD_FILE", &missing)], "TOKEN_PROXY_REDIS_PASSWORD_FILE"),
        (vec![("TOKEN_PROXY_REDIS_PASSWORD_FILE", &empty)], "TOKEN_PROXY_REDIS_PASSWORD_FILE"),
        (
            vec![
                ("TOKEN_PROXY_REDIS_URL", "rediss://:url-password-canary@127.0.0.1:6380"),
                ("TOKEN_PROXY_REDIS_PASSWORD_FILE", &tls.ca_file),
            ],
            "TOKEN_PROXY_REDIS_PASSWORD_FILE",
        ),
        (vec![("TOKEN_PROXY_REDIS_URL", "redis://127.0.0.1:6379")], "TOKEN_PROXY_REDIS_CA_FILE"),
        (vec![("TOKEN_PROXY_REDIS_URL", "rediss-proxy://127.0.0.1:6379")], "TOKEN_PROXY_REDIS_URL"),
    ];
    for (vars, setting) in cases {
        let mut all: Vec<(&str, &str)> = base.to_vec();
        all.retain(|(name, _)| !vars.iter().any(|(n, _)| n == name));
        all.extend(vars.iter().copied());
        let output = tokio::process::Command::new(BIN).env_clear().envs(all).arg("--check").output().await.unwrap();
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(output.status.code(), Some(2), "{setting}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with(&format!("token-proxy: {setting}: ")), "{setting}: {stderr}");
        assert!(!stderr.contains("url-password-canary"), "{stderr}");
    }
    // Every scheme, with the TLS settings where they apply.
    for url in [
        "redis://127.0.0.1:6379",
        "valkey://127.0.0.1:6379/1",
        "redis-cluster://127.0.0.1:7000?node=127.0.0.1:7001",
        "redis-sentinel://127.0.0.1:26379?sentinelServiceName=main",
        "rediss://proxy@127.0.0.1:6380",
        "valkeys://127.0.0.1:6380",
        "rediss-cluster://127.0.0.1:7000",
        "rediss-sentinel://127.0.0.1:26379?sentinelServiceName=main",
    ] {
        let mut vars = vec![base[0], base[1], ("TOKEN_PROXY_REDIS_URL", url)];
        if url.starts_with("rediss") || url.starts_with("valkeys") {
            vars.extend([
                ("TOKEN_PROXY_REDIS_CA_FILE", tls.ca_file.as_str()),
                ("TOKEN_PROXY_REDIS_CLIENT_CERT_FILE", tls.client_cert.as_str()),
                ("TOKEN_PROXY_REDIS_CLIENT_KEY_FILE", tls.client_key.as_str()),
            ]);
        }
        let output = tokio::process::Command::new(BIN).env_clear().envs(vars).arg("--check").output().await.unwrap();
        assert_eq!(output.status.code(), Some(0), "{url}: {}", String::from_utf8_lossy(&output.stderr));
    }
}

// ---------------------------------------------------------------------------------------------
// The hit reads over TLS

/// The store on a single `rediss://` server reads through its own pipelined TLS connection,
/// and reads the same as through fred.
#[tokio::test]
async fn the_store_reads_the_same_through_the_tls_pipeline_as_through_fred() {
    let tls = RedisTls::new("pipeline");
    let redis = TlsRedis::start(&tls, "yes", &[]).await;
    let client_tls = |_| Arc::new(client_config(Some(tls.roots()), Some(tls.identity())).unwrap());
    // valkeys:// is rediss://.
    let url = format!("valkeys://127.0.0.1:{}", redis.tls_port);
    let store = |pipelined| {
        let endpoint = Endpoint::new(&url, None, Some(client_tls(()))).unwrap();
        connect_store_to(&endpoint, crate::read_pipeline::store_settings(pipelined), &shared::keys::Keys::random())
    };
    crate::read_pipeline::assert_the_store_reads_the_same(&redis.server, store(true), store(false)).await;
    // The pipeline's connection (its last command a batch's ECHO marker) is on the TLS port.
    let clients = String::from_utf8(redis.server.call(&["CLIENT", "LIST"]).unwrap().concat()).unwrap();
    let tls_port = format!("laddr=127.0.0.1:{} ", redis.tls_port);
    assert!(clients.lines().any(|l| l.contains(" cmd=echo ") && l.contains(&tls_port)), "{clients}");

    // Straight on the pipeline: concurrent reads each get their own value; an untrusted
    // server is a TLS error, at once.
    let client = redis.server.client().await;
    for i in 0..50 {
        let () = client.set(format!("k{i}"), format!("v{i}"), None, None, false).await.unwrap();
    }
    let target = Target {
        host: "127.0.0.1".into(),
        port: redis.tls_port,
        username: None,
        password: None,
        database: None,
        tls: Some(client_tls(())),
        credentials: None,
        max_age: None,
    };
    let pipeline = Arc::new(ReadPipeline::start(target.clone(), Duration::from_secs(1), Duration::from_secs(2)));
    let reads: Vec<_> = (0..500)
        .map(|n| {
            let pipeline = Arc::clone(&pipeline);
            tokio::spawn(async move { (n % 50, pipeline.read(format!("k{}", n % 50).as_bytes()).await) })
        })
        .collect();
    for read in reads {
        let (i, reply) = read.await.unwrap();
        assert_eq!(reply.unwrap().value.as_deref(), Some(format!("v{i}").as_bytes()));
    }
    let other = RedisTls::new("pipeline-other");
    let untrusted = Target { tls: Some(Arc::new(client_config(Some(other.roots()), None).unwrap())), ..target };
    let untrusted = ReadPipeline::start(untrusted, Duration::from_secs(1), Duration::from_secs(2));
    match untrusted.read(b"k1").await {
        Err(ReadError::Tls(cause)) => assert!(cause.contains("UnknownIssuer"), "{cause}"),
        other => panic!("{other:?}"),
    }
    assert!(untrusted.is_down());
}

// ---------------------------------------------------------------------------------------------
// A TLS Redis Cluster

/// Three replicas on `rediss-cluster://` (three masters, three replicas, a private CA): one
/// upstream call for 1,000 concurrent cold requests of one key, and one per key for 50 cold keys
/// of 20 requests each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_behind_three_replicas_makes_one_upstream_call_per_cold_key() {
    let cluster = TlsRedisCluster::start("cluster").await;
    let idp = spawn_idp(vec![client("app", SECRET)]).await;
    idp.idp.set_latency(Duration::from_millis(200));
    let mut settings = cluster.tls.proxy_settings(false);
    // A deadline a starved machine cannot trip (the exactly-one tests are about healthy replicas).
    settings.push(("TOKEN_PROXY_REDIS_TIMEOUT", "2s".to_owned()));
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(replica(&idp, &cluster.url(), &settings).await);
    }
    for replica in &replicas {
        wait_until_redis_is_up(replica).await;
    }
    let urls: Vec<String> = replicas.iter().map(TestProxy::token_url).collect();
    // fred may send the start-up's first command before it has the cluster's routing table
    // ("Missing cluster routing state"): not counted here, the bursts are.
    let mut errors_before = 0.0;
    for replica in &replicas {
        errors_before += replica.metric("token_proxy_redis_errors_total").await;
    }

    let replies = burst(&urls, 1000, "app", SECRET, &[("aws_client_metadata", "one-cold-key")]).await;
    let token = replies[0].access_token().to_owned();
    assert!(replies.iter().all(|r| r.status == 200 && r.access_token() == token), "every caller got the one token");
    assert_eq!(idp.idp.issued_total(), 1, "one upstream call for 1,000 requests");
    assert_eq!(replies.iter().filter(|r| r.x_cache() == "MISS").count(), 1);

    let bursts: Vec<_> = (0..50)
        .map(|key| {
            let urls = urls.clone();
            tokio::spawn(async move { burst(&urls, 20, "app", SECRET, &[("n", &key.to_string())]).await })
        })
        .collect();
    let mut tokens = std::collections::HashSet::new();
    for handle in bursts {
        let replies = handle.await.unwrap();
        let token = replies[0].access_token().to_owned();
        assert!(replies.iter().all(|r| r.status == 200 && r.access_token() == token));
        tokens.insert(token);
    }
    assert_eq!(tokens.len(), 50);
    assert_eq!(idp.idp.issued_total(), 51, "one upstream call per cold key");
    let mut redis_errors = 0.0;
    for replica in &replicas {
        redis_errors += replica.metric("token_proxy_redis_errors_total").await;
    }
    assert_eq!(redis_errors, errors_before, "no Redis command failed during the bursts");
    // The entries are spread over the cluster's masters (and copied to their replicas).
    let counts = cluster.key_counts();
    assert!(counts.iter().filter(|&&n| n > 0).count() >= 3, "{counts:?}");
    // Hit reads go to each primary over TLS on connections of their own, named as fred names
    // the node (issue 12, "health judged per shard").
    for replica in &replicas {
        for key in 0..6 {
            let reply = post_basic_with(&replica.token_url(), "app", SECRET, &[("n", &key.to_string())]).await;
            assert_eq!(reply.x_cache(), "HIT");
        }
        let ready = get_json(&format!("http://{}/readyz", replica.admin)).await;
        assert_eq!(ready["shards"], serde_json::json!({"primaries": 3, "reads_failing": 0}), "{ready}");
    }
}

// ---------------------------------------------------------------------------------------------
// The least-privilege ACL

/// The README's ACL for the proxy's Redis user: the `ACL SETUSER` line of its "Redis ACL"
/// section, with the password put in.
fn readme_acl(password: &str) -> Vec<String> {
    let readme = include_str!("../../../README.md");
    let line = readme.lines().find(|l| l.starts_with("ACL SETUSER token-proxy ")).expect("the README's ACL line");
    line.split_whitespace()
        .map(|word| if word == ">PASSWORD" { format!(">{password}") } else { word.to_owned() })
        .collect()
}

/// Under the least-privilege user the proxy does everything it does: misses, hits from Redis
/// (through the pipeline and through fred), the lock under a burst, purges, the failed-
/// authentication throttle, the upstream rate cap and the client call budget; Redis refuses none
/// of its commands.
#[tokio::test]
async fn the_proxy_works_under_the_least_privilege_acl_of_the_readme() {
    let redis = RedisServer::start().await;
    let password = "acl-password-canary-0042";
    register_secret("the Redis user token-proxy", password);
    let acl = readme_acl(password);
    assert!(acl.contains(&"-@all".to_owned()) && acl.contains(&"~tp:*".to_owned()), "{acl:?}");
    redis.call(&acl.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    let dir = TempDir::new("acl");
    let admin = "acl-admin-token-0042";
    let settings = [
        ("TOKEN_PROXY_REDIS_PASSWORD_FILE", dir.write("password", password)),
        ("TOKEN_PROXY_ADMIN_TOKEN", admin.to_owned()),
        ("TOKEN_PROXY_L1_CAPACITY", "0".to_owned()),
        ("TOKEN_PROXY_UPSTREAM_RATE_LIMIT", "1000".to_owned()),
        ("TOKEN_PROXY_CLIENT_CALL_BUDGET", "100".to_owned()),
    ];
    let idp = spawn_idp(vec![client("app", SECRET)]).await;
    let url = format!("redis://token-proxy@127.0.0.1:{}", redis.port);
    let (a, b) = (replica(&idp, &url, &settings).await, replica(&idp, &url, &settings).await);
    wait_until_redis_is_up(&a).await;
    wait_until_redis_is_up(&b).await;

    assert_eq!(a.post_basic("app", SECRET, None).await.x_cache(), "MISS");
    assert_eq!(b.post_basic("app", SECRET, None).await.x_cache(), "HIT", "read from Redis (no L1)");
    let replies = burst(&[a.token_url(), b.token_url()], 40, "app", SECRET, &[("n", "burst")]).await;
    assert!(replies.iter().all(|r| r.status == 200));
    assert_eq!(idp.idp.issued_total(), 2, "the lock held under the ACL");
    for _ in 0..3 {
        assert_eq!(a.post_basic("app", "a-wrong-secret", None).await.error(), "invalid_client");
    }
    let (status, _) = a.purge(Some(admin), r#"{"client_id":"app"}"#).await;
    assert_eq!(status, 200);
    eventually(Duration::from_secs(5), "the purge on the other replica", async || {
        b.post_basic("app", SECRET, None).await.x_cache() == "MISS"
    })
    .await;
    let (status, _) = b.purge(Some(admin), r#"{"all":true}"#).await;
    assert_eq!(status, 200);

    let denied = redis.call(&["ACL", "LOG"]).unwrap();
    assert!(denied.is_empty(), "Redis refused commands of the proxy: {:?}", String::from_utf8_lossy(&denied.concat()));
    assert_eq!(
        a.metric("token_proxy_redis_errors_total").await + b.metric("token_proxy_redis_errors_total").await,
        0.0
    );
    // And the user is really held to its keys and commands.
    for denied in
        [&["ACL", "DRYRUN", "token-proxy", "GET", "other:key"][..], &["ACL", "DRYRUN", "token-proxy", "FLUSHALL"]]
    {
        let answer = String::from_utf8(redis.call(denied).unwrap().concat()).unwrap();
        assert!(answer.contains("has no permissions"), "{denied:?}: {answer}");
    }
    let allowed = String::from_utf8(
        redis.call(&["ACL", "DRYRUN", "token-proxy", "GETRANGE", "tp:{x}", "0", "1"]).unwrap().concat(),
    )
    .unwrap();
    assert_eq!(allowed, "OK");
}
