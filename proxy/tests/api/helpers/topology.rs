//! Redis topologies that fail over: a Redis Cluster of three masters and three replicas, and a
//! Sentinel setup of one master, one replica and three sentinels. Every process listens on
//! 127.0.0.1 on a free port, is bounded in time (each wait below has a deadline) and is killed
//! by pid when the test ends (the data nodes are [`RedisServer`]s, scanned for canaries on drop).
//! `extra_args` go to every data node, so a TLS variant adds its `--tls-*` settings there.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;
use super::redis::{RedisServer, Reply, RespConnection};
use super::tls_redis::RedisTls;

/// How long a topology may take to form or to converge after a change.
const CONVERGE: Duration = Duration::from_secs(20);

/// One blocking command to the node on `port` (short: loopback, a small reply).
fn call(port: u16, args: &[&str]) -> std::io::Result<Reply> {
    let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    RespConnection::open(port)?.call(&args)
}

/// The reply as text (a bulk string or status), or "" for anything else.
fn text(reply: Reply) -> String {
    String::from_utf8_lossy(&reply.flatten().concat()).into_owned()
}

/// Runs `redis-cli` with `args`, bounded by `timeout`; panics with its output if it fails.
async fn redis_cli(args: &[String], timeout: Duration) {
    let child = tokio::process::Command::new("redis-cli")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-cli must be installed with redis-server");
    let output = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("redis-cli {args:?} took more than {timeout:?}"))
        .unwrap();
    assert!(
        output.status.success(),
        "redis-cli {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Polls `condition` every 50 ms until it holds; panics after `timeout`.
async fn until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One node as `CLUSTER NODES` describes it.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    pub id: String,
    pub port: u16,
    pub master: bool,
    /// The master's id, for a replica.
    pub master_id: Option<String>,
    pub failed: bool,
    /// Slot ranges (inclusive) it serves, for a master.
    pub slots: Vec<(u16, u16)>,
}

/// A Redis Cluster of three masters and three replicas on loopback.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Three masters, three replicas; `extra_args` to every node.
    pub async fn start(extra_args: &[&str]) -> RedisCluster {
        let mut nodes = Vec::new();
        for _ in 0..6 {
            // The bus port is not the default port + 10000, which may not be free.
            let bus = free_port().to_string();
            let mut args = vec![
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "1000",
                "--cluster-port",
                &bus,
                // A replica may be promoted however long it was cut off from its master.
                "--cluster-replica-validity-factor",
                "0",
            ];
            args.extend_from_slice(extra_args);
            nodes.push(RedisServer::start_with(&args).await);
        }
        let mut create: Vec<String> = vec!["--cluster".into(), "create".into()];
        create.extend(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)));
        create.extend(["--cluster-replicas".into(), "1".into(), "--cluster-yes".into()]);
        redis_cli(&create, CONVERGE).await;
        let cluster = RedisCluster { nodes };
        cluster.wait_converged().await;
        cluster
    }

    /// A `redis-cluster://` URL naming every node.
    pub fn url(&self) -> String {
        let others: Vec<String> = self.nodes[1..].iter().map(|n| format!("node=127.0.0.1:{}", n.port)).collect();
        format!("redis-cluster://127.0.0.1:{}?{}", self.nodes[0].port, others.join("&"))
    }

    /// A single-node `redis://` URL for node `i` (a misconfiguration for a cluster).
    pub fn node_url(&self, i: usize) -> String {
        self.nodes[i].url()
    }

    fn live_port(&self) -> u16 {
        self.nodes
            .iter()
            .map(|n| n.port)
            .find(|port| call(*port, &["PING"]).is_ok())
            .expect("at least one cluster node answers")
    }

    /// The cluster as a live node sees it.
    pub fn topology(&self) -> Vec<ClusterNode> {
        let nodes = text(call(self.live_port(), &["CLUSTER", "NODES"]).unwrap());
        nodes.lines().filter(|l| !l.trim().is_empty()).map(parse_node).collect()
    }

    /// The index in `nodes` of the node listening on `port`.
    pub fn index_of(&self, port: u16) -> usize {
        self.nodes.iter().position(|n| n.port == port).expect("a node of this cluster")
    }

    /// The index of the master that serves `slot`.
    pub fn owner_of(&self, slot: u16) -> usize {
        let topology = self.topology();
        let owner = topology
            .iter()
            .find(|n| n.master && !n.failed && n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .unwrap_or_else(|| panic!("no master serves slot {slot}: {topology:?}"));
        self.index_of(owner.port)
    }

    /// The indexes of the masters serving slots.
    pub fn masters(&self) -> Vec<usize> {
        self.topology()
            .iter()
            .filter(|n| n.master && !n.failed && !n.slots.is_empty())
            .map(|n| self.index_of(n.port))
            .collect()
    }

    /// The index of a live replica of master `master`.
    pub fn replica_of(&self, master: usize) -> usize {
        let topology = self.topology();
        let id = topology.iter().find(|n| n.port == self.nodes[master].port).unwrap().id.clone();
        let replica = topology
            .iter()
            .find(|n| !n.failed && n.master_id.as_deref() == Some(id.as_str()))
            .unwrap_or_else(|| panic!("master {master} has no replica: {topology:?}"));
        self.index_of(replica.port)
    }

    /// The node id of node `i`.
    pub fn id(&self, i: usize) -> String {
        text(call(self.nodes[i].port, &["CLUSTER", "MYID"]).unwrap())
    }

    /// SIGKILLs node `i`.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// `CLUSTER FAILOVER` on replica `replica`: it and its master swap roles, without loss.
    /// Returns once the whole cluster agrees.
    pub async fn failover(&self, replica: usize) {
        let reply = text(call(self.nodes[replica].port, &["CLUSTER", "FAILOVER"]).unwrap());
        assert_eq!(reply, "OK");
        let port = self.nodes[replica].port;
        until(CONVERGE, "the replica to be promoted", || {
            self.topology().iter().any(|n| n.port == port && n.master && !n.slots.is_empty())
        })
        .await;
        self.wait_converged().await;
    }

    /// Waits until a replica of the killed master `master` has taken over its slots.
    pub async fn wait_promoted(&self, master: usize) {
        let dead = self.nodes[master].port;
        until(CONVERGE, "a replica to take over the killed master's slots", || {
            let topology = self.topology();
            topology.iter().filter(|n| n.master && !n.failed && !n.slots.is_empty()).count() == 3
                && topology.iter().all(|n| n.port != dead || n.failed || n.slots.is_empty())
        })
        .await;
    }

    /// Moves `slots` slots from master `from` to master `to` with their keys, online, as an
    /// operator does (`redis-cli --cluster reshard`).
    pub async fn reshard(&self, from: usize, to: usize, slots: usize) {
        let args: Vec<String> = [
            "--cluster",
            "reshard",
            &format!("127.0.0.1:{}", self.nodes[from].port),
            "--cluster-from",
            &self.id(from),
            "--cluster-to",
            &self.id(to),
            "--cluster-slots",
            &slots.to_string(),
            "--cluster-yes",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        redis_cli(&args, Duration::from_secs(40)).await;
        self.wait_converged().await;
    }

    /// Waits until every live node reports the cluster up, sees every live node as a master
    /// with slots or a replica, and all of them see the same slot map.
    pub async fn wait_converged(&self) {
        until(CONVERGE, "the cluster to converge", || {
            let live = self.nodes.iter().filter(|n| call(n.port, &["PING"]).is_ok()).count();
            let mut maps = Vec::new();
            for node in &self.nodes {
                let Ok(info) = call(node.port, &["CLUSTER", "INFO"]) else { continue };
                if !text(info).contains("cluster_state:ok") {
                    return false;
                }
                let Ok(nodes) = call(node.port, &["CLUSTER", "NODES"]) else { return false };
                let view: Vec<ClusterNode> =
                    text(nodes).lines().filter(|l| !l.trim().is_empty()).map(parse_node).collect();
                let placed = view.iter().filter(|n| !n.failed && (!n.master || !n.slots.is_empty())).count();
                if placed != live {
                    return false;
                }
                // A replica is one once it has synced.
                let Ok(replication) = call(node.port, &["INFO", "replication"]) else { return false };
                let replication = text(replication);
                if replication.contains("role:slave") && !replication.contains("master_link_status:up") {
                    return false;
                }
                let mut map: Vec<(u16, Vec<(u16, u16)>)> = view
                    .into_iter()
                    .filter(|n| n.master && !n.failed && !n.slots.is_empty())
                    .map(|n| (n.port, n.slots))
                    .collect();
                map.sort();
                maps.push(map);
            }
            !maps.is_empty() && maps.windows(2).all(|w| w[0] == w[1])
        })
        .await;
    }

    /// One command to node `i`; its reply as text. Panics on an error reply.
    pub fn command(&self, i: usize, args: &[&str]) -> String {
        text(call(self.nodes[i].port, args).unwrap_or_else(|e| panic!("{args:?} on node {i}: {e}")))
    }

    /// Moves one slot from master `from` to master `to` with its keys, the way `redis-cli
    /// --cluster reshard` does it, and tells every master.
    pub async fn move_slot(&self, slot: u16, from: usize, to: usize) {
        let (slot, from_id, to_id) = (slot.to_string(), self.id(from), self.id(to));
        self.command(to, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]);
        self.command(from, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]);
        loop {
            let keys = call(self.nodes[from].port, &["CLUSTER", "GETKEYSINSLOT", &slot, "100"]).unwrap().flatten();
            if keys.is_empty() {
                break;
            }
            let port = self.nodes[to].port.to_string();
            for key in keys {
                let key = String::from_utf8(key).unwrap();
                self.command(from, &["MIGRATE", "127.0.0.1", &port, &key, "0", "5000"]);
            }
        }
        for node in [to, from] {
            self.command(node, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
        }
        for node in self.masters() {
            let _ = call(self.nodes[node].port, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
        }
    }

    /// The purge-everything epoch the replicas set at start (part of every entry's name).
    pub fn purge_all(&self) -> u64 {
        let owner = self.owner_of(slot_of(PURGE_HASH));
        purge_all_on(self.nodes[owner].port)
    }

    /// The string keys (entries and locks) that node `i` holds.
    pub fn keys_on(&self, i: usize) -> Vec<String> {
        let Ok(reply) = call(self.nodes[i].port, &["KEYS", "tp:{*"]) else { return Vec::new() };
        reply.flatten().into_iter().map(|k| String::from_utf8_lossy(&k).into_owned()).collect()
    }
}

/// The purge hash (see `token_proxy::purge`).
const PURGE_HASH: &str = "tp:purge";

/// The `all` field of the purge hash on the node on `port` (0 if absent).
fn purge_all_on(port: u16) -> u64 {
    call(port, &["HGET", PURGE_HASH, "all"]).map(text).ok().and_then(|all| all.parse().ok()).unwrap_or(0)
}

/// The hash slot of a key (CRC16 of its hash tag, mod 16384).
pub fn slot_of(key: &str) -> u16 {
    fred::util::redis_keyslot(key.as_bytes())
}

fn parse_node(line: &str) -> ClusterNode {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let address = fields[1].split('@').next().unwrap();
    let port = address.rsplit(':').next().unwrap().parse().unwrap();
    let flags = fields[2];
    let slots = fields
        .iter()
        .skip(8)
        // Slots being imported or migrated are listed in brackets.
        .filter(|f| !f.starts_with('['))
        .map(|range| match range.split_once('-') {
            Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
            None => (range.parse().unwrap(), range.parse().unwrap()),
        })
        .collect();
    ClusterNode {
        id: fields[0].to_owned(),
        port,
        master: flags.contains("master"),
        master_id: (fields[3] != "-").then(|| fields[3].to_owned()),
        failed: flags.contains("fail") || flags.contains("noaddr"),
        slots,
    }
}

/// A `redis-server --sentinel`, killed by pid when dropped.
pub struct SentinelProcess {
    pub port: u16,
    child: Child,
    dir: PathBuf,
}

impl Drop for SentinelProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The name of the monitored master.
pub const SENTINEL_SERVICE: &str = "tp-main";

/// One master, one replica, three sentinels (quorum 2) on loopback; with TLS, the data nodes
/// replicate and the sentinels talk over TLS, and clients reach both over TLS only (the plain
/// ports stay for the harness's checks).
pub struct SentinelSetup {
    /// The data nodes: `[0]` starts as the master, `[1]` as its replica.
    pub nodes: Vec<RedisServer>,
    pub sentinels: Vec<SentinelProcess>,
    /// The port the sentinels name each data node by (its TLS port with TLS).
    announced: Vec<u16>,
    /// With TLS: the sentinels' TLS ports, which the URL names.
    sentinel_tls_ports: Option<Vec<u16>>,
}

impl SentinelSetup {
    /// `extra_args` to both data nodes.
    pub async fn start(extra_args: &[&str]) -> SentinelSetup {
        SentinelSetup::start_on(extra_args, None).await
    }

    /// Everything over TLS, with `tls`'s CA and server certificate (`rediss-sentinel://`).
    pub async fn start_tls(tls: &RedisTls) -> SentinelSetup {
        SentinelSetup::start_on(&[], Some(tls)).await
    }

    async fn start_on(extra_args: &[&str], tls: Option<&RedisTls>) -> SentinelSetup {
        let tls_ports = [free_port(), free_port()];
        let node_args = |i: usize| -> Vec<String> {
            let mut args: Vec<String> = extra_args.iter().map(|a| (*a).to_owned()).collect();
            if let Some(tls) = tls {
                args.extend(tls.server_args(tls_ports[i], "no"));
                args.extend(["--tls-replication".to_owned(), "yes".to_owned()]);
            }
            args
        };
        let master_args = node_args(0);
        let master = RedisServer::start_with(&master_args.iter().map(String::as_str).collect::<Vec<_>>()).await;
        let master_announced = if tls.is_some() { tls_ports[0] } else { master.port };
        let mut replica_args = vec!["--replicaof".to_owned(), "127.0.0.1".to_owned(), master_announced.to_string()];
        replica_args.extend(node_args(1));
        let replica = RedisServer::start_with(&replica_args.iter().map(String::as_str).collect::<Vec<_>>()).await;
        let announced = if tls.is_some() { tls_ports.to_vec() } else { vec![master.port, replica.port] };
        let mut sentinels = Vec::new();
        let mut sentinel_tls_ports = Vec::new();
        for _ in 0..3 {
            let tls = tls.map(|tls| (tls, free_port()));
            sentinel_tls_ports.extend(tls.map(|(_, port)| port));
            sentinels.push(spawn_sentinel(master_announced, tls).await);
        }
        let sentinel_tls_ports = tls.is_some().then_some(sentinel_tls_ports);
        let setup = SentinelSetup { nodes: vec![master, replica], sentinels, announced, sentinel_tls_ports };
        until(CONVERGE, "the replica to sync and every sentinel to know it and its peers", || {
            let synced = call(setup.nodes[1].port, &["INFO", "replication"])
                .map(text)
                .is_ok_and(|info| info.contains("master_link_status:up"));
            synced
                && setup.sentinels.iter().all(|s| {
                    let known = |what: &str| {
                        call(s.port, &["SENTINEL", what, SENTINEL_SERVICE]).map(|r| match r {
                            Reply::Array(items) => items.len(),
                            _ => 0,
                        })
                    };
                    known("replicas").is_ok_and(|n| n == 1) && known("sentinels").is_ok_and(|n| n == 2)
                })
        })
        .await;
        setup
    }

    /// A `redis-sentinel://` URL naming the three sentinels (`rediss-sentinel://` and their
    /// TLS ports with TLS).
    pub fn url(&self) -> String {
        let (scheme, ports) = match &self.sentinel_tls_ports {
            Some(ports) => ("rediss-sentinel", ports.clone()),
            None => ("redis-sentinel", self.sentinels.iter().map(|s| s.port).collect()),
        };
        let others: Vec<String> = ports[1..].iter().map(|port| format!("node=127.0.0.1:{port}")).collect();
        format!("{scheme}://127.0.0.1:{}?{}&sentinelServiceName={SENTINEL_SERVICE}", ports[0], others.join("&"))
    }

    /// The index of the master as the first sentinel that answers names it.
    pub fn master(&self) -> usize {
        for sentinel in &self.sentinels {
            let Ok(reply) = call(sentinel.port, &["SENTINEL", "get-master-addr-by-name", SENTINEL_SERVICE]) else {
                continue;
            };
            let port: u16 = String::from_utf8_lossy(&reply.flatten()[1]).parse().unwrap();
            return self.announced.iter().position(|&p| p == port).expect("a node of this setup");
        }
        panic!("no sentinel answers");
    }

    /// The purge-everything epoch the replicas set at start (part of every entry's name).
    pub fn purge_all(&self) -> u64 {
        purge_all_on(self.nodes[self.master()].port)
    }

    /// `SENTINEL FAILOVER`: the replica is promoted; returns once the sentinels name it (the
    /// old master may still think it is one for a while: that is the window under test).
    pub async fn failover(&self) -> usize {
        let before = self.master();
        // Refused (NOGOODSLAVE) until the sentinels have fresh news of the replica.
        until(CONVERGE, "a sentinel to accept SENTINEL FAILOVER", || {
            call(self.sentinels[0].port, &["SENTINEL", "FAILOVER", SENTINEL_SERVICE]).is_ok()
        })
        .await;
        until(CONVERGE, "the sentinels to switch to the replica", || self.master() != before).await;
        self.master()
    }
}

/// A sentinel watching the master at `master_port`; with `tls`, it also listens on the given
/// TLS port and speaks TLS to the data nodes and the other sentinels.
async fn spawn_sentinel(master_port: u16, tls: Option<(&RedisTls, u16)>) -> SentinelProcess {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("tp-sentinel-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("sentinel.conf");
    let tls_lines = match tls {
        Some((tls, tls_port)) => format!(
            "tls-port {tls_port}\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n\
             tls-auth-clients no\ntls-replication yes\n",
            tls.server_cert, tls.server_key, tls.ca_file
        ),
        None => String::new(),
    };
    std::fs::write(
        &config,
        format!(
            "port {port}\nbind 127.0.0.1\ndir {dir}\n{tls_lines}\
             sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {master_port} 2\n\
             sentinel down-after-milliseconds {SENTINEL_SERVICE} 1000\n\
             sentinel failover-timeout {SENTINEL_SERVICE} 10000\n\
             sentinel parallel-syncs {SENTINEL_SERVICE} 1\n",
            dir = dir.display()
        ),
    )
    .unwrap();
    let child = Command::new("redis-server")
        .arg(&config)
        .arg("--sentinel")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server must be installed");
    let sentinel = SentinelProcess { port, child, dir };
    until(Duration::from_secs(10), "a sentinel to start", || call(port, &["PING"]).is_ok()).await;
    sentinel
}
