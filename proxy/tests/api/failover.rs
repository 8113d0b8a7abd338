//! Production topologies (issue 12): a Redis Cluster with replicas and a Sentinel setup, through
//! redirects, resharding and failovers, on real servers on loopback.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::helpers::*;

/// A fleet of replicas in front of one mock-idp, on a Redis given by URL.
struct Fleet {
    idp: mock_idp::RunningMockIdp,
    replicas: Vec<TestProxy>,
    /// The purge-everything epoch, part of every entry's name (set again if Redis lost it).
    all: AtomicU64,
}

impl Fleet {
    /// `purge_all` reads the purge-everything epoch once the replicas have set it.
    async fn start(n: usize, redis_url: &str, overrides: &[(&str, &str)], purge_all: impl Fn() -> u64) -> Fleet {
        let idp = spawn_idp(vec![client("app", SECRET)]).await;
        let mut replicas = Vec::new();
        for _ in 0..n {
            replicas.push(TestCluster::replica(redis_url, &idp, overrides).await);
        }
        Fleet { idp, replicas, all: AtomicU64::new(purge_all()) }
    }

    fn urls(&self) -> Vec<String> {
        self.replicas.iter().map(TestProxy::token_url).collect()
    }

    /// The entry name of the request for key `n`.
    fn entry(&self, n: &str) -> String {
        entry_key(&self.idp.token_url(), "app", SECRET, &[("n", n)], self.all.load(Ordering::Relaxed))
    }

    async fn post(&self, replica: usize, n: &str) -> TokenReply {
        post_basic_with(&self.replicas[replica].token_url(), "app", SECRET, &[("n", n)]).await
    }

    async fn metric_sum(&self, series: &str) -> f64 {
        let mut sum = 0.0;
        for replica in &self.replicas {
            sum += replica.metric(series).await;
        }
        sum
    }

    async fn readyz(&self, replica: usize) -> serde_json::Value {
        get_json(&format!("http://{}/readyz", self.replicas[replica].admin)).await
    }
}

/// Every request reads Redis (no L1), so that what Redis does shows in every answer.
const NO_L1: &[(&str, &str)] = &[("TOKEN_PROXY_L1_CAPACITY", "0"), ("TOKEN_PROXY_REDIS_TIMEOUT", "500ms")];

/// A key `n` whose entry lives on master `on` (found by trying names).
fn key_on(cluster: &RedisCluster, fleet: &Fleet, on: usize, prefix: &str) -> String {
    (0..10_000)
        .map(|i| format!("{prefix}-{i}"))
        .find(|n| cluster.owner_of(slot_of(&fleet.entry(n))) == on)
        .expect("some key lands on every master")
}

/// Issue 12, defect 1: one ASK redirect (a slot being migrated, as during any online reshard)
/// killed fred's command task for good (`max_command_attempts = 1`), while `/readyz` kept
/// saying "up": every later command, for every key, failed. fred 10.1 still cannot complete an
/// ASK (its `ASKING` step gives up and its task ends; see the README's limits): the command
/// that met it fails, and the task is started again at once, so every other key keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ask_redirect_no_longer_kills_the_command_client() {
    let cluster = RedisCluster::start(&[]).await;
    let fleet = Fleet::start(1, &cluster.url(), NO_L1, || cluster.purge_all()).await;
    let masters = cluster.masters();
    let (source, target) = (masters[0], masters[1]);
    let warm: Vec<String> = masters.iter().map(|m| key_on(&cluster, &fleet, *m, "warm")).collect();
    for key in &warm {
        assert_eq!(fleet.post(0, key).await.x_cache(), "MISS");
        assert_eq!(fleet.post(0, key).await.x_cache(), "HIT");
    }

    // The slot of a cold key is being migrated from `source` to `target`: its keys that are
    // not on `source` (all of them: it is cold) are answered with ASK.
    let cold = key_on(&cluster, &fleet, source, "cold");
    let slot = slot_of(&fleet.entry(&cold)).to_string();
    let (source_id, target_id) = (cluster.id(source), cluster.id(target));
    cluster.command(target, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &source_id]);
    cluster.command(source, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &target_id]);
    let first = fleet.post(0, &cold).await;
    assert_eq!(first.status, 200, "{}", first.raw);

    // Every other key, on every master, is still read from Redis.
    eventually(Duration::from_secs(5), "the command client to work again", async || {
        fleet.post(0, &warm[0]).await.x_cache() == "HIT"
    })
    .await;
    for round in 0..3 {
        for key in &warm {
            assert_eq!(fleet.post(0, key).await.x_cache(), "HIT", "round {round}: the client died after the ASK");
        }
    }
    assert_eq!(fleet.idp.idp.issued_total(), warm.len() as u64 + 1, "one call for the cold key, none for the others");
    eventually(Duration::from_secs(5), "/readyz to say up", async || fleet.readyz(0).await["redis"] == "up").await;
    assert!(captured_logs().contains("the Redis connection task ended; starting it again"));
}

/// Issue 12: every MOVED cost one failed command (one extra upstream call per replica): a slot
/// moved with its keys is now followed within the same command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_slot_is_followed_without_a_failed_command() {
    let cluster = RedisCluster::start(&[]).await;
    let fleet = Fleet::start(3, &cluster.url(), NO_L1, || cluster.purge_all()).await;
    let masters = cluster.masters();
    let keys: Vec<String> = (0..3).map(|i| key_on(&cluster, &fleet, masters[0], &format!("moved{i}"))).collect();
    for key in &keys {
        assert_eq!(fleet.post(0, key).await.x_cache(), "MISS");
        for replica in 0..3 {
            assert_eq!(fleet.post(replica, key).await.x_cache(), "HIT");
        }
    }
    // Every slot of master 0 that holds one of these keys moves to master 1, keys and all.
    let slots: std::collections::BTreeSet<u16> = keys.iter().map(|k| slot_of(&fleet.entry(k))).collect();
    for slot in slots {
        cluster.move_slot(slot, masters[0], masters[1]).await;
    }
    cluster.wait_converged().await;
    for key in &keys {
        for replica in 0..3 {
            let reply = fleet.post(replica, key).await;
            assert_eq!((reply.status, reply.x_cache()), (200, "HIT"), "{key} on replica {replica}");
        }
    }
    // Every read above was a HIT: the commands that met MOVED succeeded. (A background command
    // may still time out on a busy machine, so Redis errors are not counted here.)
    assert_eq!(fleet.idp.idp.issued_total(), keys.len() as u64, "no extra upstream call");
}

/// Issue 12, defect 4: a `redis://` URL naming one node of a cluster reported ready while two
/// thirds of the keys failed with MOVED. It is said once in the log and in `/readyz`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_url_on_a_cluster_is_reported_as_misconfigured() {
    let cluster = RedisCluster::start(&[]).await;
    let masters = cluster.masters();
    let fleet = Fleet::start(1, &cluster.node_url(masters[0]), NO_L1, || cluster.purge_all()).await;
    let here = key_on(&cluster, &fleet, masters[0], "here");
    let elsewhere = key_on(&cluster, &fleet, masters[1], "elsewhere");
    // Nothing fails a request, whichever node holds the key (the purge hash's own node decides
    // whether Redis's entries are used at all: see `token_proxy::purge`).
    assert_eq!(fleet.post(0, &here).await.status, 200);
    let reply = fleet.post(0, &elsewhere).await;
    assert_eq!(reply.status, 200, "a MOVED never fails a request: {}", reply.raw);
    let ready = fleet.readyz(0).await;
    assert_eq!((ready["redis"].as_str(), ready["mode"].as_str()), (Some("misconfigured"), Some("degraded")), "{ready}");
    assert_eq!(ready["ready"], true, "the replica still serves");
    let said = captured_logs().matches("the Redis URL names one node of a Redis Cluster").count();
    assert!(said >= 1, "no log line says what is wrong");
    fleet.post(0, &elsewhere).await;
    let again = captured_logs().matches("the Redis URL names one node of a Redis Cluster").count();
    assert_eq!(again, said, "said once, not on every MOVED");
}

/// Load settings: a Redis deadline a busy machine does not trip, L1 revalidated every second
/// (so that Redis is read all along), a 20 ms upstream.
const UNDER_LOAD: &[(&str, &str)] = &[("TOKEN_PROXY_REDIS_TIMEOUT", "300ms"), ("TOKEN_PROXY_L1_MAX_AGE", "1s")];
const WARM_KEYS: usize = 30;

/// Three replicas on `url`, every one of [`WARM_KEYS`] keys fetched once and read by every
/// replica.
async fn warm_fleet(url: &str, purge_all: impl Fn() -> u64) -> Fleet {
    let fleet = Fleet::start(3, url, UNDER_LOAD, purge_all).await;
    warm(&fleet).await;
    fleet
}

/// Every one of [`WARM_KEYS`] keys fetched once (a 20 ms upstream) and read by every replica.
async fn warm(fleet: &Fleet) {
    fleet.idp.idp.set_latency(Duration::from_millis(20));
    let before = fleet.idp.idp.issued_total();
    for n in 0..WARM_KEYS {
        let n = n.to_string();
        assert_eq!(fleet.post(n.len() % 3, &n).await.x_cache(), "MISS");
        for replica in 0..3 {
            assert_eq!(fleet.post(replica, &n).await.status, 200);
        }
    }
    assert_eq!(fleet.idp.idp.issued_total() - before, WARM_KEYS as u64);
}

/// Steady load on the warm keys for `duration` while `change` happens 1 s in; then: no answer
/// other than 200, and at most one extra upstream call per warm key.
async fn under_load(fleet: &Fleet, duration: Duration, change: impl AsyncFnOnce()) -> LoadReport {
    let before = fleet.idp.idp.issued_total();
    let load = tokio::spawn(steady_load(fleet.urls(), duration, 6, WARM_KEYS, "app", SECRET));
    tokio::time::sleep(Duration::from_secs(1)).await;
    change().await;
    let report = load.await.unwrap();
    let issued = fleet.idp.idp.issued_total() - before;
    let errors = fleet.metric_sum("token_proxy_redis_errors_total").await;
    eprintln!("{report:?}; {issued} tokens issued under load, {errors} Redis errors");
    assert_eq!(report.statuses.get(&200), Some(&report.requests), "{report:?}");
    assert!(issued <= WARM_KEYS as u64, "{issued} extra upstream calls for {WARM_KEYS} warm keys: {report:?}");
    report
}

/// New keys owned by master `master` are written there within a few seconds.
async fn new_entries_land_on(cluster: &RedisCluster, fleet: &Fleet, master: usize, prefix: &str) {
    // A master killed with the purge hash may take it along (replication is asynchronous): the
    // replicas then start a new purge-everything epoch, and every entry has a new name.
    fleet.all.store(cluster.purge_all(), Ordering::Relaxed);
    for i in 0..3 {
        let n = key_on(cluster, fleet, master, &format!("{prefix}{i}"));
        let entry = fleet.entry(&n);
        eventually(Duration::from_secs(5), "a new entry written to the new master", async || {
            assert_eq!(fleet.post(i % 3, &n).await.status, 200);
            cluster.keys_on(master).contains(&entry)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_under_load_fails_no_request() {
    let mut cluster = RedisCluster::start(&[]).await;
    let fleet = warm_fleet(&cluster.url(), || cluster.purge_all()).await;
    let master = cluster.masters()[0];
    let replica = cluster.replica_of(master);
    under_load(&fleet, Duration::from_secs(8), async || {
        cluster.kill(master);
        cluster.wait_promoted(master).await;
    })
    .await;
    new_entries_land_on(&cluster, &fleet, replica, "after-kill").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_failover_under_load_fails_no_request_and_costs_no_call() {
    let cluster = RedisCluster::start(&[]).await;
    let fleet = warm_fleet(&cluster.url(), || cluster.purge_all()).await;
    let master = cluster.masters()[0];
    let replica = cluster.replica_of(master);
    under_load(&fleet, Duration::from_secs(6), async || cluster.failover(replica).await).await;
    assert!(fleet.idp.idp.issued_total() <= WARM_KEYS as u64 + 3, "a planned failover loses nothing");
    new_entries_land_on(&cluster, &fleet, replica, "after-failover").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_online_reshard_of_a_third_of_the_slots_fails_no_request_and_costs_no_call() {
    let cluster = RedisCluster::start(&[]).await;
    let fleet = warm_fleet(&cluster.url(), || cluster.purge_all()).await;
    let masters = cluster.masters();
    under_load(&fleet, Duration::from_secs(10), async || cluster.reshard(masters[0], masters[1], 5461).await).await;
    assert!(fleet.idp.idp.issued_total() <= WARM_KEYS as u64 + 3, "a reshard costs (nearly) no upstream call");
    new_entries_land_on(&cluster, &fleet, masters[1], "after-reshard").await;
}

/// Issue 12, defect 3: after `SENTINEL FAILOVER` every connection stayed on the demoted master
/// for about 10 s, and entries written there meanwhile were lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_is_followed_at_once() {
    let setup = SentinelSetup::start(&[]).await;
    let fleet = warm_fleet(&setup.url(), || setup.purge_all()).await;
    let mut promoted = None;
    under_load(&fleet, Duration::from_secs(6), async || promoted = Some(setup.failover().await)).await;
    let promoted = promoted.unwrap();
    assert_eq!(promoted, 1);
    // Written after the switch: on the new master, within a second of it (the old one may
    // still take writes, until the sentinels turn it into a replica).
    for i in 0..6 {
        let n = format!("after-switch-{i}");
        assert_eq!(fleet.post(i % 3, &n).await.x_cache(), "MISS");
        let entry = fleet.entry(&n);
        let on_new = setup.nodes[promoted].client().await;
        let found: bool = fred::prelude::KeysInterface::exists(&on_new, entry.as_str()).await.unwrap();
        assert!(found, "key {n} was not written to the new master");
    }
}

/// Issue 12: Sentinel over TLS end to end (`rediss-sentinel://`: sentinels and data nodes
/// reached over TLS, with a private CA). Three replicas: 1,000 concurrent cold requests for one
/// key cost one upstream call, 50 cold keys of 20 requests cost 50; then a `SENTINEL FAILOVER`
/// under steady load: no answer but 200, at most one extra call per warm key, and new entries
/// written to the new master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_sentinel_setup_makes_one_call_per_cold_key_and_follows_a_failover() {
    let tls = RedisTls::new("sentinel");
    let setup = SentinelSetup::start_tls(&tls).await;
    assert!(setup.url().starts_with("rediss-sentinel://"));
    // A deadline a starved machine cannot trip (the exactly-one bursts are about healthy
    // replicas), L1 revalidated every second so that Redis is read all along.
    let overrides = [
        ("TOKEN_PROXY_REDIS_CA_FILE", tls.ca_file.as_str()),
        ("TOKEN_PROXY_REDIS_TIMEOUT", "2s"),
        ("TOKEN_PROXY_L1_MAX_AGE", "1s"),
    ];
    let fleet = Fleet::start(3, &setup.url(), &overrides, || setup.purge_all()).await;
    for replica in 0..3 {
        eventually(Duration::from_secs(10), "Redis up", async || fleet.readyz(replica).await["redis"] == "up").await;
    }
    fleet.idp.idp.set_latency(Duration::from_millis(200));
    let replies = burst(&fleet.urls(), 1000, "app", SECRET, &[("aws_client_metadata", "one-cold-key")]).await;
    let token = replies[0].access_token().to_owned();
    assert!(replies.iter().all(|r| r.status == 200 && r.access_token() == token), "every caller got the one token");
    assert_eq!(fleet.idp.idp.issued_total(), 1, "one upstream call for 1,000 requests");
    let bursts: Vec<_> = (0..50)
        .map(|key| {
            let urls = fleet.urls();
            tokio::spawn(async move {
                burst(&urls, 20, "app", SECRET, &[("aws_client_metadata", &format!("cold-{key}"))]).await
            })
        })
        .collect();
    for handle in bursts {
        let replies = handle.await.unwrap();
        let token = replies[0].access_token().to_owned();
        assert!(replies.iter().all(|r| r.status == 200 && r.access_token() == token));
    }
    assert_eq!(fleet.idp.idp.issued_total(), 51, "one upstream call per cold key");

    warm(&fleet).await;
    let mut promoted = None;
    under_load(&fleet, Duration::from_secs(6), async || promoted = Some(setup.failover().await)).await;
    let promoted = promoted.unwrap();
    assert_eq!(promoted, 1);
    eventually(Duration::from_secs(10), "new entries on the new master", async || {
        let n = format!("after-tls-switch-{}", fleet.idp.idp.issued_total());
        assert_eq!(fleet.post(0, &n).await.status, 200);
        let on_new = setup.nodes[promoted].client().await;
        fred::prelude::KeysInterface::exists::<bool, _>(&on_new, fleet.entry(&n).as_str()).await.unwrap()
    })
    .await;
}

/// Issue 12, defect 2: a failover of one shard opened the breaker for all shards for about 7 s
/// (no coalescing across replicas meanwhile: 3 upstream calls per cold key). Until a replica
/// has taken over the killed master's slots, fred's cluster client serves no shard (see the
/// README's limits: locks and writes wait), while hit reads go per shard (see
/// `while_a_master_is_down_the_other_shards_are_still_read`); once it has, every shard is used
/// again at once, not after a breaker's cooldown (60 s here, for the store's breaker and each
/// shard's read breaker, so that waiting it out cannot pass the test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_a_shard_has_failed_over_every_shard_is_used_again_at_once() {
    let mut cluster = RedisCluster::start(&[]).await;
    let overrides = [
        ("TOKEN_PROXY_L1_CAPACITY", "0"),
        ("TOKEN_PROXY_REDIS_TIMEOUT", "300ms"),
        ("TOKEN_PROXY_REDIS_BREAKER_COOLDOWN", "60s"),
    ];
    let fleet = Fleet::start(3, &cluster.url(), &overrides, || cluster.purge_all()).await;
    let masters = cluster.masters();
    let load = tokio::spawn(steady_load(fleet.urls(), Duration::from_secs(4), 4, 10, "app", SECRET));
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.kill(masters[0]);
    cluster.wait_promoted(masters[0]).await;
    let report = load.await.unwrap();
    assert_eq!(report.statuses.get(&200), Some(&report.requests), "{report:?}");
    // The outage was seen: the dead shard's reads failed. (The store's breaker no longer opens
    // on reads, whose failures are the dead shard's alone; it opens only if commands through
    // fred (locks, writes, purge looks) fail its threshold in a row, which this load may not do.)
    assert!(fleet.metric_sum("token_proxy_redis_errors_total").await >= 1.0);
    eventually(Duration::from_secs(10), "every replica to use Redis again", async || {
        let mut up = true;
        for replica in 0..3 {
            let ready = fleet.readyz(replica).await;
            up &= ready["redis"] == "up"
                && ready["breaker"] == "closed"
                && ready["shards"]["reads_failing"] == 0
                && ready["mode"] == "normal";
        }
        up
    })
    .await;
    // Cold keys on the shards that never failed: one upstream call each, over three replicas.
    let before = fleet.idp.idp.issued_total();
    let mut cold = Vec::new();
    for (i, master) in [masters[1], masters[2]].into_iter().enumerate() {
        for j in 0..3 {
            cold.push(key_on(&cluster, &fleet, master, &format!("cold-{i}-{j}")));
        }
    }
    for n in &cold {
        let replies = burst(&fleet.urls(), 9, "app", SECRET, &[("n", n)]).await;
        assert!(replies.iter().all(|r| r.status == 200));
    }
    assert_eq!(fleet.idp.idp.issued_total() - before, cold.len() as u64, "one call per cold key");
}

/// Issue 12, "health judged per shard": while one master is dead and not yet replaced, fred's
/// cluster client serves no shard (see the README's limits), but hit reads go to each slot's
/// primary on a connection and behind a breaker of that primary's own. A node timeout of 6 s
/// keeps the dead master unreplaced for the 3 s of requests: keys on the two live shards are
/// HITs read from Redis without an upstream call, keys on the dead one are still answered 200
/// (from a replica's own copy, or the upstream: at most one call per key per replica), and
/// `/readyz` counts one shard whose reads fail. Once a replica has taken over, every key is a
/// HIT again.
///
/// Each key is fetched through one replica only: with L1 off a replica still keeps its own
/// tokens as a fallback for while Redis fails, and serves them as HITs, so only a HIT on a
/// replica that never held the token proves a read from Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_a_master_is_down_the_other_shards_are_still_read() {
    const NODE_TIMEOUT: Duration = Duration::from_secs(6);
    const ROUNDS: usize = 6;
    let mut cluster = RedisCluster::start(&["--cluster-node-timeout", "6000"]).await;
    let overrides = [("TOKEN_PROXY_L1_CAPACITY", "0"), ("TOKEN_PROXY_REDIS_TIMEOUT", "300ms")];
    let fleet = Fleet::start(3, &cluster.url(), &overrides, || cluster.purge_all()).await;
    let masters = cluster.masters();
    let (dead, live) = (masters[0], [masters[1], masters[2]]);
    let on_dead: Vec<String> = (0..2).map(|j| key_on(&cluster, &fleet, dead, &format!("dead-{j}"))).collect();
    // Alternating between the two live shards.
    let on_live: Vec<String> =
        (0..6).flat_map(|j| live.map(|m| key_on(&cluster, &fleet, m, &format!("live{m}-{j}")))).collect();
    let owner = |i: usize| i % 3;
    for (i, key) in on_dead.iter().enumerate().chain(on_live.iter().enumerate()) {
        assert_eq!(fleet.post(owner(i), key).await.x_cache(), "MISS");
        assert_eq!(fleet.post(owner(i), key).await.x_cache(), "HIT");
    }
    for replica in 0..3 {
        let ready = fleet.readyz(replica).await;
        assert_eq!(ready["shards"], serde_json::json!({"primaries": 3, "reads_failing": 0}), "{ready}");
    }
    // Every (live key, replica that never held its token), spread over the rounds.
    let unseen: Vec<(usize, usize)> =
        (0..on_live.len()).flat_map(|i| [(i, (owner(i) + 1) % 3), (i, (owner(i) + 2) % 3)]).collect();
    let replica_port = cluster.nodes[cluster.replica_of(dead)].port;
    let issued = fleet.idp.idp.issued_total();
    let hit = "token_proxy_requests_total{outcome=\"hit\"}";
    let hits = fleet.metric_sum(hit).await;

    cluster.kill(dead);
    let killed = std::time::Instant::now();
    // Each round asks for the dead shard's keys first (fred notices the dead master when it
    // writes to it), then for live keys on replicas that never held them.
    for (round, pairs) in unseen.chunks(unseen.len().div_ceil(ROUNDS)).enumerate() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        for replica in 0..3 {
            for key in &on_dead {
                let reply = fleet.post(replica, key).await;
                assert_eq!(reply.status, 200, "round {round}: {key} on replica {replica}: {}", reply.raw);
            }
        }
        for &(i, replica) in pairs {
            let reply = fleet.post(replica, &on_live[i]).await;
            assert_eq!(
                (reply.status, reply.x_cache()),
                (200, "HIT"),
                "round {round}, {:?} after the kill: live key {i} on replica {replica}",
                killed.elapsed()
            );
        }
    }
    let mut failing = Vec::new();
    for replica in 0..3 {
        failing.push(fleet.readyz(replica).await["shards"]["reads_failing"].clone());
    }
    let outage = killed.elapsed();
    // All of the above happened while the dead master was not replaced.
    let topology = cluster.topology();
    assert!(
        !topology.iter().any(|n| n.port == replica_port && n.master),
        "the replica was promoted after {outage:?}: the test did not run during the outage"
    );
    assert!(outage < NODE_TIMEOUT);
    let hits_now = fleet.metric_sum(hit).await;
    let calls = fleet.idp.idp.issued_total() - issued;
    eprintln!("{ROUNDS} rounds in {outage:?} with one master dead: {} hits, {calls} upstream calls", hits_now - hits);
    assert!(hits_now - hits >= unseen.len() as f64, "every live shard's read counted as a hit");
    assert!(calls <= (on_dead.len() * 3) as u64, "{calls} upstream calls: at most one per dead-shard key per replica");
    assert_eq!(failing, vec![serde_json::json!(1); 3], "/readyz counts one shard whose reads fail");
    let gauge = "token_proxy_redis_shard_reads_failing";
    eventually(Duration::from_secs(2), "the metrics to count one failing shard per replica", async || {
        fleet.metric_sum(gauge).await == 3.0
    })
    .await;

    // Once a replica has taken over the dead master's slots, its keys are read there again.
    cluster.wait_promoted(dead).await;
    eventually(Duration::from_secs(10), "every key a HIT again on every replica", async || {
        let mut all = true;
        for replica in 0..3 {
            for key in on_dead.iter().chain(&on_live) {
                all &= fleet.post(replica, key).await.x_cache() == "HIT";
            }
        }
        all
    })
    .await;
    eventually(Duration::from_secs(10), "/readyz to count no failing shard", async || {
        let mut none = true;
        for replica in 0..3 {
            none &= fleet.readyz(replica).await["shards"]["reads_failing"] == 0;
        }
        none && fleet.metric_sum(gauge).await == 0.0
    })
    .await;
}

/// Issue 12, "health judged per shard", at the store: on a cluster the hit read goes to each
/// entry's master on a connection of its own, and reads the same values, misses and bad keys
/// (another type, a 3 MiB value) as fred's read script. A slot moved under it answers MOVED:
/// that read goes through fred, and the next ones to the slot's new master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_store_reads_each_master_as_fred_does_and_follows_a_moved_slot() {
    use shared::keys::CacheKey;
    use token_proxy::store::{RedisStore, ShardsHealth};
    // Logs are captured from the first look on (the redirect is seen in them).
    drop(captured_logs());
    let cluster = RedisCluster::start(&[]).await;
    let keys = shared::keys::Keys::random();
    let store = |pipelined| connect_store(&cluster.url(), crate::read_pipeline::store_settings(pipelined), &keys);
    let (per_shard, through_fred) = (store(true), store(false));
    let masters = cluster.masters();
    let name = |key: &CacheKey| RedisStore::entry_key(key);
    let on = |master: usize, from: u8| -> CacheKey {
        (from..=255)
            .map(|b| CacheKey::from_bytes([b; 32]))
            .find(|key| cluster.owner_of(slot_of(&name(key))) == master)
            .expect("a key on every master")
    };
    // On every master: an entry, a hash at an entry's name, a 3 MiB value.
    let entries: Vec<CacheKey> = masters.iter().map(|&m| on(m, 0)).collect();
    let wrong_types: Vec<CacheKey> = masters.iter().map(|&m| on(m, 100)).collect();
    let oversized: Vec<CacheKey> = masters.iter().map(|&m| on(m, 200)).collect();
    let huge = "x".repeat(3 << 20);
    for (i, &master) in masters.iter().enumerate() {
        cluster.command(master, &["SET", &name(&entries[i]), &format!("value-{i}"), "PX", "60000"]);
        cluster.command(master, &["HSET", &name(&wrong_types[i]), "f", "v"]);
        cluster.command(master, &["SET", &name(&oversized[i]), &huge]);
    }
    let absent = CacheKey::from_bytes(std::array::from_fn(|i| i as u8));
    eventually(Duration::from_secs(5), "both stores connected", async || {
        per_shard.read_value(&absent).await.is_ok() && through_fred.read_value(&absent).await.is_ok()
    })
    .await;
    for store in [&per_shard, &through_fred] {
        for i in 0..masters.len() {
            let value = store.read_value(&entries[i]).await.unwrap().expect("the entry");
            assert_eq!(&value.sealed[..], format!("value-{i}").as_bytes());
            assert!(store.read_value(&wrong_types[i]).await.unwrap().is_none(), "a hash at an entry's name");
            assert!(store.read_value(&oversized[i]).await.unwrap().is_none(), "a 3 MiB value");
        }
        assert!(store.read_value(&absent).await.unwrap().is_none());
        assert_eq!(store.breaker_state(), token_proxy::metrics::BreakerState::Closed);
    }
    assert_eq!(per_shard.shards_health(), Some(ShardsHealth { primaries: 3, failing: 0 }));
    assert_eq!(through_fred.shards_health(), None, "pipelined reads off: every read through fred");

    // The first entry's slot moves, with the entry, to another master.
    let slot = slot_of(&name(&entries[0]));
    cluster.move_slot(slot, masters[0], masters[1]).await;
    cluster.wait_converged().await;
    for round in 0..3 {
        let value = per_shard.read_value(&entries[0]).await.unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(&value.expect("the moved entry").sealed[..], b"value-0", "round {round}");
    }
    assert!(captured_logs().contains("a hit read was redirected; reading through fred"));
    assert_eq!(per_shard.shards_health(), Some(ShardsHealth { primaries: 3, failing: 0 }));
    assert_eq!(per_shard.breaker_state(), token_proxy::metrics::BreakerState::Closed);
}
