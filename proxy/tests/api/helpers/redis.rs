//! Redis: a `redis-server` per test on a free port, and a blocking RESP2 connection for the
//! checks that run in `Drop`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fred::prelude::*;

use super::free_port;
use super::leak_checks::{check_logs, registry};

/// A `redis-server` owned by one test; killed (by pid) when dropped. It runs with
/// `rdbcompression no` and its own directory, so that a `SAVE`d RDB file holds every key and
/// value as raw bytes: on drop (unless killed, or the test is failing already) the harness
/// saves one and scans it, and every key and value, for canaries.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: std::path::PathBuf,
    /// More `redis-server` arguments, e.g. `--requirepass`.
    extra_args: Vec<String>,
}

/// The freshness rules of flights run directly (not through a proxy).
pub const STORE_FRESHNESS: token_proxy::entry::Freshness = token_proxy::entry::Freshness {
    expiry_margin: Duration::from_secs(60),
    min_token_ttl: Duration::from_secs(30),
    refresh_at: 0.75,
    max_lifetime: Duration::from_secs(86_400),
};

/// A store on `url` used directly, sealing with `keys`.
pub fn connect_store(
    url: &str,
    settings: token_proxy::store::StoreSettings,
    keys: &shared::keys::Keys,
) -> token_proxy::store::RedisStore {
    let endpoint = token_proxy::store::Endpoint::from_url(url).expect("a valid Redis URL");
    connect_store_to(&endpoint, settings, keys)
}

/// A store on `endpoint` (e.g. with TLS settings) used directly, sealing with `keys`.
pub fn connect_store_to(
    endpoint: &token_proxy::store::Endpoint,
    settings: token_proxy::store::StoreSettings,
    keys: &shared::keys::Keys,
) -> token_proxy::store::RedisStore {
    let sealing = token_proxy::store::Sealing::new(keys, &[]);
    let metrics = std::sync::Arc::new(token_proxy::metrics::Metrics::new());
    token_proxy::store::RedisStore::connect_to(endpoint, settings, sealing, metrics).expect("a usable endpoint")
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        RedisServer::start_with(&[]).await
    }

    pub async fn start_with(extra_args: &[&str]) -> RedisServer {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("tp-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let extra_args = extra_args.iter().map(|a| (*a).to_owned()).collect();
        let mut server = RedisServer { port, child: None, dir, extra_args };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        // A restarted server starts empty, whatever a leak check saved before.
        let _ = std::fs::remove_file(self.rdb_path());
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--rdbcompression", "no", "--dbfilename", "dump.rdb"])
            .args(&self.extra_args)
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

    /// One command on the plain port as the default user (e.g. `ACL SETUSER`, `ACL LOG`): every
    /// string of its reply, or Redis's error.
    pub fn call(&self, args: &[&str]) -> std::io::Result<Vec<Vec<u8>>> {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        Ok(RespConnection::open(self.port)?.call(&args)?.flatten())
    }

    /// A fresh client for inspecting and tampering with what the proxy stored.
    pub async fn client(&self) -> Client {
        let client = Client::new(fred::prelude::Config::from_url(&self.url()).unwrap(), None, None, None);
        client.init().await.unwrap();
        client
    }

    fn rdb_path(&self) -> std::path::PathBuf {
        self.dir.join("dump.rdb")
    }

    /// `SAVE`, then the RDB file's bytes (uncompressed: every key and value is in it as is).
    pub fn rdb(&self) -> Vec<u8> {
        self.try_rdb().unwrap_or_else(|err| panic!("SAVE on the Redis on port {}: {err}", self.port))
    }

    fn try_rdb(&self) -> std::io::Result<Vec<u8>> {
        RespConnection::open(self.port)?.call(&[b"SAVE"])?;
        std::fs::read(self.rdb_path())
    }

    /// Every key with every value in it (all types: a hash gives its fields and values), read
    /// without the async runtime, so that `Drop` can use it too.
    pub fn contents(&self) -> Vec<RedisEntry> {
        self.try_contents().unwrap_or_else(|err| panic!("reading the Redis on port {}: {err}", self.port))
    }

    fn try_contents(&self) -> std::io::Result<Vec<RedisEntry>> {
        let mut redis = RespConnection::open(self.port)?;
        // A Redis Cluster replica answers reads only after READONLY (an error elsewhere).
        let _ = redis.call(&[b"READONLY"]);
        let mut out = Vec::new();
        for key in redis.call(&[b"KEYS", b"*"])?.flatten() {
            let kind = redis.call(&[b"TYPE", &key])?.flatten().concat();
            let values = match kind.as_slice() {
                b"string" => redis.call(&[b"GET", &key])?,
                b"hash" => redis.call(&[b"HGETALL", &key])?,
                b"list" => redis.call(&[b"LRANGE", &key, b"0", b"-1"])?,
                b"set" => redis.call(&[b"SMEMBERS", &key])?,
                b"zset" => redis.call(&[b"ZRANGE", &key, b"0", b"-1", b"WITHSCORES"])?,
                b"none" => Reply::Nil,
                _ => redis.call(&[b"DUMP", &key])?,
            };
            out.push((key, values.flatten()));
        }
        Ok(out)
    }

    /// The drop-time check: a saved RDB file and every key and value, scanned for canaries.
    fn leak_check(&self) -> Result<(), String> {
        let failed = |err: std::io::Error| format!("the leak check of the Redis on port {}: {err}", self.port);
        let rdb = self.try_rdb().map_err(failed)?;
        let contents = self.try_contents().map_err(failed)?;
        let mut registry = registry();
        registry.check(&format!("the RDB file of the Redis on port {}", self.port), &rdb, false)?;
        for (key, values) in contents {
            registry.check(&format!("a key of the Redis on port {}", self.port), &key, false)?;
            for value in values {
                registry.check(&format!("a value in the Redis on port {}", self.port), &value, false)?;
            }
        }
        Ok(())
    }

    /// Every string key (entries and locks; not the purge hash) and its value.
    pub async fn dump(&self) -> Vec<(Bytes, Bytes)> {
        let client = self.client().await;
        let keys: Vec<Bytes> = client.custom(fred::cmd!("KEYS"), vec!["*"]).await.unwrap();
        let mut out = Vec::new();
        for key in keys {
            let kind: String = client.custom(fred::cmd!("TYPE"), vec![key.clone()]).await.unwrap();
            if kind != "string" {
                continue;
            }
            let value: Option<Bytes> = client.get(key.clone()).await.unwrap();
            out.push((key, value.unwrap_or_default()));
        }
        out
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // Panicking in a drop that runs because of a panic would abort the whole run.
        let checked = if self.child.is_some() && !std::thread::panicking() {
            if let Some(child) = &self.child {
                // A test may have left it frozen.
                let _ = Command::new("kill").args(["-CONT", &child.id().to_string()]).status();
            }
            Some(self.leak_check())
        } else {
            None
        };
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(Err(message)) = checked {
            panic!("{message}");
        }
        if checked.is_some() {
            check_logs();
        }
    }
}

/// A key and every string in its value (one for a string; fields and values for a hash).
pub type RedisEntry = (Vec<u8>, Vec<Vec<u8>>);

/// A blocking RESP2 connection, for the checks that run in `Drop`.
pub(super) struct RespConnection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

/// A RESP2 reply; errors are `Err` of [`RespConnection::call`].
pub(super) enum Reply {
    Nil,
    Integer(i64),
    Bytes(Vec<u8>),
    Array(Vec<Reply>),
}

impl Reply {
    /// Every string in it, depth first.
    pub(super) fn flatten(self) -> Vec<Vec<u8>> {
        match self {
            Reply::Nil => Vec::new(),
            Reply::Integer(n) => vec![n.to_string().into_bytes()],
            Reply::Bytes(bytes) => vec![bytes],
            Reply::Array(items) => items.into_iter().flat_map(Reply::flatten).collect(),
        }
    }
}

impl RespConnection {
    pub(super) fn open(port: u16) -> std::io::Result<RespConnection> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(RespConnection { reader: BufReader::new(stream.try_clone()?), writer: stream })
    }

    pub(super) fn call(&mut self, args: &[&[u8]]) -> std::io::Result<Reply> {
        let mut request = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            request.extend_from_slice(arg);
            request.extend_from_slice(b"\r\n");
        }
        self.writer.write_all(&request)?;
        self.reply()
    }

    fn reply(&mut self) -> std::io::Result<Reply> {
        let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
        let mut line = Vec::new();
        self.reader.read_until(b'\n', &mut line)?;
        let Some(body) = line.strip_suffix(b"\r\n") else { return Err(bad("a reply line without CRLF")) };
        let (&kind, rest) = body.split_first().ok_or_else(|| bad("an empty reply line"))?;
        let text = String::from_utf8_lossy(rest).into_owned();
        let number = || text.parse::<i64>().map_err(|_| bad("a bad length or integer"));
        match kind {
            b'+' => Ok(Reply::Bytes(rest.to_vec())),
            b'-' => Err(std::io::Error::other(format!("Redis said: {text}"))),
            b':' => Ok(Reply::Integer(number()?)),
            b'$' => match usize::try_from(number()?) {
                Err(_) => Ok(Reply::Nil),
                Ok(len) => {
                    let mut bytes = vec![0; len + 2];
                    self.reader.read_exact(&mut bytes)?;
                    bytes.truncate(len);
                    Ok(Reply::Bytes(bytes))
                }
            },
            b'*' => match usize::try_from(number()?) {
                Err(_) => Ok(Reply::Nil),
                Ok(len) => (0..len).map(|_| self.reply()).collect::<std::io::Result<_>>().map(Reply::Array),
            },
            _ => Err(bad("an unknown reply type")),
        }
    }
}
