//! The hit path's pipelined Redis reads against real `redis-server`s: each read gets its own
//! entry under concurrency, AUTH and SELECT work, failures are fast and recovery is automatic
//! (kill and restart, a partition), and the store answers the same through the pipeline as
//! through fred.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::prelude::*;
use shared::keys::CacheKey;
use token_proxy::read_pipeline::{EntryReply, MAX_VALUE, ReadError, ReadPipeline, Target};
use token_proxy::store::{RedisStore, StoreSettings};

use crate::fault_proxy::FaultProxy;
use crate::helpers::*;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

fn target(port: u16) -> Target {
    Target {
        host: "127.0.0.1".into(),
        port,
        username: None,
        password: None,
        database: None,
        tls: None,
        credentials: None,
        max_age: None,
    }
}

async fn set(client: &Client, key: &str, value: &str, ttl_ms: i64) {
    let () = client.set(key, value, Some(Expiration::PX(ttl_ms)), None, false).await.unwrap();
}

/// A read with a deadline, as the store makes it.
async fn read(pipeline: &ReadPipeline, key: &str, deadline: Duration) -> Result<EntryReply, ReadError> {
    tokio::time::timeout(deadline, pipeline.read(key.as_bytes())).await.unwrap_or(Err(ReadError::Unresponsive))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_each_get_their_own_entry() {
    let redis = RedisServer::start().await;
    let client = redis.client().await;
    for i in 0..200 {
        set(&client, &format!("k{i}"), &format!("value-{i}"), 60_000 + i).await;
    }
    // A planted value far larger than any token response is its key's business only.
    let planted = "x".repeat(2 << 20);
    set(&client, "k7", &planted, 60_000).await;
    let pipeline = Arc::new(ReadPipeline::start(target(redis.port), CONNECT_TIMEOUT, Duration::from_secs(2)));
    // 250 keys, the last 50 absent, read 2,000 times at once.
    let reads = (0..2000).map(|n| {
        let pipeline = Arc::clone(&pipeline);
        tokio::spawn(async move {
            let i = n % 250;
            (i, pipeline.read(format!("k{i}").as_bytes()).await)
        })
    });
    for read in reads {
        let (i, reply) = tokio::time::timeout(Duration::from_secs(10), read).await.expect("answered").unwrap();
        let reply = reply.unwrap_or_else(|error| panic!("read of k{i}: {error}"));
        // Redis's clock comes with every read (after 2020, before 2100).
        assert!((1_600_000_000_000_000..4_100_000_000_000_000).contains(&reply.now.0), "k{i}: {:?}", reply.now);
        if i == 7 {
            // Read only up to one byte past the bound: the caller sees it is too large.
            assert_eq!(reply.value.as_deref(), Some(&planted.as_bytes()[..MAX_VALUE + 1]));
        } else if i < 200 {
            assert_eq!(reply.value.as_deref(), Some(format!("value-{i}").as_bytes()), "k{i}");
        } else {
            assert_eq!(reply.value, None, "k{i} is absent");
        }
    }
    assert!(!pipeline.is_down());
}

#[tokio::test]
async fn reads_log_in_and_select_the_database() {
    let mut redis = RedisServer::start_with(&["--requirepass", "pipeline-pass"]).await;
    let url = format!("redis://:pipeline-pass@127.0.0.1:{}/3", redis.port);
    let client = Client::new(Config::from_url(&url).unwrap(), None, None, None);
    client.init().await.unwrap();
    set(&client, "in-db-3", "three", 60_000).await;

    let login = |password: Option<&str>, database: Option<u8>| Target {
        password: password.map(str::to_owned),
        database,
        ..target(redis.port)
    };
    let logged_in = ReadPipeline::start(login(Some("pipeline-pass"), Some(3)), CONNECT_TIMEOUT, Duration::from_secs(2));
    let reply = read(&logged_in, "in-db-3", Duration::from_secs(2)).await.unwrap();
    assert_eq!(reply.value.as_deref(), Some(&b"three"[..]));

    let other_database =
        ReadPipeline::start(login(Some("pipeline-pass"), None), CONNECT_TIMEOUT, Duration::from_secs(2));
    assert_eq!(read(&other_database, "in-db-3", Duration::from_secs(2)).await.unwrap().value, None);

    let wrong = ReadPipeline::start(login(Some("not-the-password"), None), CONNECT_TIMEOUT, Duration::from_secs(2));
    assert_eq!(read(&wrong, "in-db-3", Duration::from_secs(2)).await, Err(ReadError::Server("WRONGPASS".into())));
    assert!(wrong.is_down(), "a refused login counts as a failed connection");

    let anonymous = ReadPipeline::start(login(None, None), CONNECT_TIMEOUT, Duration::from_secs(2));
    assert_eq!(read(&anonymous, "in-db-3", Duration::from_secs(2)).await, Err(ReadError::Server("NOAUTH".into())));

    // The drop-time leak check cannot log in: these values are no canaries.
    client.quit().await.unwrap();
    redis.kill();
}

#[tokio::test]
async fn a_killed_server_fails_reads_at_once_and_a_restarted_one_is_read_again() {
    let mut redis = RedisServer::start().await;
    let pipeline = ReadPipeline::start(target(redis.port), CONNECT_TIMEOUT, Duration::from_secs(2));
    set(&redis.client().await, "k", "v", 60_000).await;
    assert_eq!(read(&pipeline, "k", Duration::from_secs(2)).await.unwrap().value.as_deref(), Some(&b"v"[..]));

    redis.kill();
    for i in 0..20 {
        let started = Instant::now();
        let reply = read(&pipeline, "k", Duration::from_secs(5)).await;
        assert!(reply.is_err(), "read {i} after the kill: {reply:?}");
        assert!(started.elapsed() < CONNECT_TIMEOUT, "read {i} took {:?}", started.elapsed());
    }
    assert!(pipeline.is_down());

    redis.restart().await;
    set(&redis.client().await, "k", "again", 60_000).await;
    eventually(Duration::from_secs(5), "reads from the restarted server", async || {
        read(&pipeline, "k", Duration::from_millis(500)).await.is_ok_and(|r| r.value.as_deref() == Some(&b"again"[..]))
    })
    .await;
    assert!(!pipeline.is_down());
}

#[tokio::test]
async fn a_partitioned_connection_is_given_up_and_made_again() {
    let redis = RedisServer::start().await;
    let client = redis.client().await;
    for key in ["k", "k1", "k2", "k3"] {
        set(&client, key, &format!("{key}-value"), 60_000).await;
    }
    let network = FaultProxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    let unresponsive = Duration::from_millis(400);
    let pipeline = Arc::new(ReadPipeline::start(target(network.addr.port()), CONNECT_TIMEOUT, unresponsive));
    assert!(read(&pipeline, "k", Duration::from_secs(2)).await.is_ok());
    assert_eq!(network.connections(), 1);

    // The partition swallows the requests and holds the connection open: only the watchdog
    // can tell.
    network.set_blackhole(true);
    let started = Instant::now();
    while started.elapsed() < unresponsive * 3 {
        assert!(read(&pipeline, "k", Duration::from_millis(100)).await.is_err());
    }
    assert!(network.connections() >= 2, "the watchdog gave the silent connection up and made another");
    network.set_blackhole(false);
    // Bytes lost in the partition never come back: without a new connection every later
    // read would wait forever (or be paired with another's reply).
    eventually(Duration::from_secs(5), "reads after the partition", async || {
        read(&pipeline, "k", Duration::from_millis(200))
            .await
            .is_ok_and(|r| r.value.as_deref() == Some(&b"k-value"[..]))
    })
    .await;
    let reads: Vec<_> = (0..60)
        .map(|i| {
            let key = ["k1", "k2", "k3"][i % 3];
            let pipeline = Arc::clone(&pipeline);
            tokio::spawn(async move { (key, read(&pipeline, key, Duration::from_secs(1)).await) })
        })
        .collect();
    for read in reads {
        let (key, reply) = read.await.unwrap();
        assert_eq!(reply.unwrap().value.as_deref(), Some(format!("{key}-value").as_bytes()), "{key}'s own reply");
    }
}

#[tokio::test]
async fn a_user_without_echo_reads_without_markers() {
    let mut redis =
        RedisServer::start_with(&["--user", "reader", "on", ">reader-pass", "~*", "+getrange", "+time"]).await;
    set(&redis.client().await, "k", "v", 60_000).await;
    let reader = Target { username: Some("reader".into()), password: Some("reader-pass".into()), ..target(redis.port) };
    let pipeline = ReadPipeline::start(reader, CONNECT_TIMEOUT, Duration::from_secs(2));
    for _ in 0..3 {
        assert_eq!(read(&pipeline, "k", Duration::from_secs(2)).await.unwrap().value.as_deref(), Some(&b"v"[..]));
    }
    assert_eq!(read(&pipeline, "absent", Duration::from_secs(2)).await.unwrap().value, None);
    redis.kill();
}

#[tokio::test]
async fn a_connection_closed_when_idle_is_made_again_without_failing_anything() {
    let redis = RedisServer::start_with(&["--timeout", "1"]).await;
    set(&redis.client().await, "k", "v", 60_000).await;
    // The pipeline's connection: the one whose last command was a batch's ECHO marker.
    let pipeline_connection = async || -> Option<String> {
        let clients: String = redis.client().await.custom(fred::cmd!("CLIENT"), vec!["LIST"]).await.unwrap();
        let line = clients.lines().find(|line| line.contains(" cmd=echo "))?;
        line.split(' ').find_map(|field| field.strip_prefix("id=")).map(str::to_owned)
    };
    let pipeline = ReadPipeline::start(target(redis.port), CONNECT_TIMEOUT, Duration::from_secs(2));
    assert!(read(&pipeline, "k", Duration::from_secs(2)).await.is_ok());
    let first = pipeline_connection().await.expect("the pipeline's connection");
    // Redis closes clients idle for a second (checked about every 100 ms).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!pipeline.is_down(), "an idle close is no failure");
    let reply = read(&pipeline, "k", Duration::from_secs(1)).await;
    assert_eq!(reply.unwrap().value.as_deref(), Some(&b"v"[..]));
    let second = pipeline_connection().await.expect("the pipeline's connection");
    assert_ne!(first, second, "Redis closed the idle connection and the pipeline made another");
}

#[tokio::test]
async fn the_store_reads_the_same_through_the_pipeline_as_through_fred() {
    let redis = RedisServer::start().await;
    let store = |pipelined_reads| {
        crate::helpers::connect_store(&redis.url(), store_settings(pipelined_reads), &shared::keys::Keys::random())
    };
    assert_the_store_reads_the_same(&redis, store(true), store(false)).await;
}

/// A store's settings for [`assert_the_store_reads_the_same`].
pub(crate) fn store_settings(pipelined_reads: bool) -> StoreSettings {
    StoreSettings {
        command_timeout: Duration::from_millis(500),
        breaker_threshold: 5,
        breaker_cooldown: Duration::from_secs(1),
        pipelined_reads,
    }
}

/// Two stores on `redis` (however they reach it: plain or TLS), one reading through the
/// pipeline and one through fred, read the same values, misses and bad keys, and a planted
/// huge value is never read whole.
pub(crate) async fn assert_the_store_reads_the_same(
    redis: &RedisServer,
    pipelined: RedisStore,
    through_fred: RedisStore,
) {
    let client = redis.client().await;
    let present = CacheKey::from_bytes([7; 32]);
    let without_ttl = CacheKey::from_bytes([8; 32]);
    let absent = CacheKey::from_bytes([9; 32]);
    let wrong_type = CacheKey::from_bytes([10; 32]);
    let oversized = CacheKey::from_bytes([11; 32]);
    let _: i64 = client
        .custom(fred::cmd!("HSET"), vec![RedisStore::entry_key(&wrong_type), "f".into(), "v".into()])
        .await
        .unwrap();
    let huge = vec![b'x'; 3 << 20];
    let () = client.set(RedisStore::entry_key(&oversized), &huge[..], None, None, false).await.unwrap();
    let () = client
        .set(RedisStore::entry_key(&present), &[0u8, 1, 2, 255][..], Some(Expiration::PX(30_000)), None, false)
        .await
        .unwrap();
    let () = client.set(RedisStore::entry_key(&without_ttl), "x", None, None, false).await.unwrap();

    eventually(Duration::from_secs(5), "both stores connected", async || {
        pipelined.read_value(&absent).await.is_ok() && through_fred.read_value(&absent).await.is_ok()
    })
    .await;
    let sent_before: u64 = net_output_bytes(&client).await;
    let mut clocks = Vec::new();
    for store in [&pipelined, &through_fred] {
        let value = store.read_value(&present).await.unwrap().expect("the entry");
        assert_eq!(&value.sealed[..], &[0u8, 1, 2, 255][..]);
        clocks.push(value.now);
        // Its sealed expiry, not a TTL, decides whether a value is served.
        assert!(store.read_value(&without_ttl).await.unwrap().is_some());
        assert!(store.read_value(&absent).await.unwrap().is_none());
        // Issue 10, defect 3: one key's bad data is that key's miss, not a Redis failure, and
        // a planted huge value is never read whole.
        for _ in 0..10 {
            assert!(store.read_value(&wrong_type).await.unwrap().is_none(), "a hash at an entry's name");
            assert!(store.read_value(&oversized).await.unwrap().is_none(), "a 3 MiB value");
        }
        assert_eq!(store.breaker_state(), token_proxy::metrics::BreakerState::Closed);
    }
    let sent = net_output_bytes(&client).await - sent_before;
    assert!(sent < 2 << 20, "Redis sent {sent} bytes for 20 reads of a 3 MiB value: it was read whole");
    let apart = clocks[0].until(clocks[1]);
    assert!(apart < Duration::from_secs(5), "both read Redis's clock: {clocks:?}");
}

/// Redis's count of bytes it sent to clients.
async fn net_output_bytes(client: &Client) -> u64 {
    let info: String = client.custom(fred::cmd!("INFO"), vec!["stats"]).await.unwrap();
    let line = info.lines().find_map(|l| l.strip_prefix("total_net_output_bytes:")).expect("INFO stats");
    line.trim().parse().unwrap()
}

/// A connection with a maximum age (IAM: AWS closes connections after 12 hours) is made again
/// when it reaches it, asking its credential provider for the login each time, and no read
/// fails for it: those written are answered first, those queued go out on the next connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_its_maximum_age_is_replaced_without_failing_a_read() {
    #[derive(Debug)]
    struct Logins(std::sync::atomic::AtomicUsize);
    impl fred::types::config::CredentialProvider for Logins {
        fn fetch<'a, 'b, 'c>(
            &'a self,
            _server: Option<&'b fred::types::config::Server>,
        ) -> std::pin::Pin<
            Box<dyn Future<Output = Result<(Option<String>, Option<String>), fred::error::Error>> + Send + 'c>,
        >
        where
            'a: 'c,
            'b: 'c,
            Self: 'c,
        {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async { Ok((Some("aged".to_owned()), Some("aged-password-0042".to_owned()))) })
        }
    }
    let redis = RedisServer::start().await;
    redis.call(&["ACL", "SETUSER", "aged", "on", ">aged-password-0042", "~*", "&*", "+@all"]).unwrap();
    set(&redis.client().await, "aged-key", "aged-value", 60_000).await;
    let logins = Arc::new(Logins(std::sync::atomic::AtomicUsize::new(0)));
    let target = Target {
        credentials: Some(Arc::clone(&logins) as Arc<dyn fred::types::config::CredentialProvider>),
        max_age: Some(Duration::from_millis(200)),
        ..target(redis.port)
    };
    let pipeline = Arc::new(ReadPipeline::start(target, CONNECT_TIMEOUT, Duration::from_secs(2)));
    // Until three connections were made (bounded: each lives 200 ms), every read succeeds.
    for _ in 0..3_000 {
        if logins.0.load(std::sync::atomic::Ordering::SeqCst) >= 3 {
            break;
        }
        let reads = (0..20).map(|_| {
            let pipeline = Arc::clone(&pipeline);
            tokio::spawn(async move { pipeline.read(b"aged-key").await })
        });
        for read in reads {
            let reply = tokio::time::timeout(Duration::from_secs(5), read).await.expect("answered").unwrap();
            assert_eq!(reply.expect("no read fails").value.as_deref(), Some(&b"aged-value"[..]));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let made = logins.0.load(std::sync::atomic::Ordering::SeqCst);
    assert!(made >= 3, "connections made again with a fresh login: {made}");
}
