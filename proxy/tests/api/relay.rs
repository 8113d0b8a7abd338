//! Invariant 8: the upstream's body reaches the client byte for byte except `expires_in`, on
//! every path (MISS, L1 HIT, Redis HIT, COALESCED across replicas, STALE). Bodies that are not
//! plainly one token response are relayed and never cached; a compressed answer is never taken
//! for JSON; a lifetime above `TOKEN_PROXY_MAX_TOKEN_LIFETIME` is capped.
//!
//! The upstream is a small scripted token endpoint written here, so that the exact bytes of its
//! answer (odd spacing, duplicated keys, huge integers) are under the test's control.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use fred::prelude::KeysInterface as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::helpers::*;

/// What the scripted endpoint answers.
#[derive(Clone)]
struct Script {
    status: u16,
    /// Extra header lines, each ending in CRLF.
    headers: String,
    body: Vec<u8>,
    latency: Duration,
    /// This many next calls get a 503 instead.
    fail_next: usize,
}

/// A token endpoint on loopback answering every POST with its [`Script`], byte for byte.
struct ScriptedUpstream {
    url: String,
    script: Arc<Mutex<Script>>,
    calls: Arc<AtomicUsize>,
    /// The head of the last request received.
    last_head: Arc<Mutex<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl ScriptedUpstream {
    async fn start(body: &[u8]) -> ScriptedUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/oauth2/token", listener.local_addr().unwrap());
        let script = Arc::new(Mutex::new(Script {
            status: 200,
            headers: String::new(),
            body: body.to_vec(),
            latency: Duration::ZERO,
            fail_next: 0,
        }));
        let (calls, last_head) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(String::new())));
        let (s, c, h) = (Arc::clone(&script), Arc::clone(&calls), Arc::clone(&last_head));
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (s, c, h) = (Arc::clone(&s), Arc::clone(&c), Arc::clone(&h));
                // Bounded: a connection that does not finish in time is dropped.
                tokio::spawn(tokio::time::timeout(Duration::from_secs(10), answer(stream, s, c, h)));
            }
        });
        ScriptedUpstream { url, script, calls, last_head, task }
    }

    fn set(&self, change: impl FnOnce(&mut Script)) {
        change(&mut self.script.lock().unwrap());
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Drop for ScriptedUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request (head and Content-Length body) and writes the scripted answer, then closes.
async fn answer(
    mut stream: TcpStream,
    script: Arc<Mutex<Script>>,
    calls: Arc<AtomicUsize>,
    last_head: Arc<Mutex<String>>,
) -> std::io::Result<()> {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        received.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&received[..head_end]).to_ascii_lowercase();
    let length: usize =
        head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    while received.len() < head_end + length {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        received.extend_from_slice(&buf[..n]);
    }
    *last_head.lock().unwrap() = head;
    calls.fetch_add(1, Ordering::SeqCst);
    let mut script = {
        let mut current = script.lock().unwrap();
        let now = current.clone();
        current.fail_next = current.fail_next.saturating_sub(1);
        now
    };
    if script.fail_next > 0 {
        script = Script {
            status: 503,
            headers: String::new(),
            body: br#"{"error":"temporarily_unavailable"}"#.to_vec(),
            ..script
        };
    }
    tokio::time::sleep(script.latency).await;
    let mut out = format!(
        "HTTP/1.1 {} Scripted\r\nContent-Type: application/json;charset=UTF-8\r\nContent-Length: {}\r\n\
         Connection: close\r\n{}\r\n",
        script.status,
        script.body.len(),
        script.headers
    )
    .into_bytes();
    out.extend_from_slice(&script.body);
    stream.write_all(&out).await?;
    stream.shutdown().await
}

/// A JWT-shaped token (so the stored form is the compacted one), registered as a canary.
fn jwt() -> String {
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let token = format!(
        "{}.{}.{}",
        b64(r#"{"alg":"RS256","kid":"relay-test"}"#),
        b64(r#"{"sub":"relay-test-client","scope":"api/read"}"#),
        b64("relay-test-signature-bytes-0123456789")
    );
    register_secret("the scripted upstream's token", &token);
    token
}

/// Everything before and after the `expires_in` value of an awkward but valid token response:
/// the access token not first, spaces, tabs and newlines, an integer beyond f64, a float in
/// exponent form, a duplicated extra field, escapes (unicode, a surrogate pair, a slash), nested
/// values in an unsorted order, and a newline after the closing brace.
fn awkward_body(token: &str) -> (String, String) {
    let head = format!(
        "{{ \"token_type\" : \"Bearer\",\n  \"access_token\":\"{token}\",\"big\":12345678901234567890123,\
         \"dup\":1,\"dup\":\"two\",\"esc\":\"caf\\u00e9 \\ud83d\\ude00 a\\/b\",\"float\":1.50E+2,\
         \"nested\":{{\"b\":1,\"a\":[1, 2.0]}},\t\"expires_in\" :\t"
    );
    (head, " , \"zz\":null }\n".to_owned())
}

/// Asserts `reply` is the scripted body exactly, but for `expires_in`, which must be in (0, max].
fn assert_relayed(reply: &TokenReply, cache: &str, (head, tail): &(String, String), max: u64) {
    assert_eq!((reply.status, reply.x_cache()), (200, cache), "{}", reply.raw);
    let seconds = reply
        .raw
        .strip_prefix(head.as_str())
        .and_then(|rest| rest.strip_suffix(tail.as_str()))
        .unwrap_or_else(|| panic!("{cache}: not relayed byte for byte:\n{}", reply.raw));
    let seconds: u64 = seconds.parse().unwrap_or_else(|_| panic!("{cache}: expires_in is {seconds:?}"));
    assert!(seconds > 0 && seconds <= max, "{cache}: expires_in {seconds}, at most {max} expected");
}

fn redis_overrides(redis: &RedisServer) -> Vec<(&'static str, String)> {
    vec![("TOKEN_PROXY_REDIS_URL", redis.url()), ("TOKEN_PROXY_SECRET", ROOT_SECRET.to_owned())]
}

async fn replica(upstream: &ScriptedUpstream, redis: &RedisServer, overrides: &[(&str, &str)]) -> TestProxy {
    let base = redis_overrides(redis);
    let mut all: Vec<(&str, &str)> = base.iter().map(|(n, v)| (*n, v.as_str())).collect();
    all.extend_from_slice(overrides);
    TestProxy::spawn(proxy_config(&upstream.url, &all)).await
}

#[tokio::test]
async fn the_upstreams_json_reaches_the_client_byte_for_byte_on_miss_hits_and_coalesced() {
    let token = jwt();
    let body = awkward_body(&token);
    let upstream = ScriptedUpstream::start(format!("{}3600{}", body.0, body.1).as_bytes()).await;
    let redis = RedisServer::start().await;
    let with_l1 = replica(&upstream, &redis, &[]).await;
    let without_l1 = replica(&upstream, &redis, &[("TOKEN_PROXY_L1_CAPACITY", "0")]).await;

    assert_relayed(&with_l1.post_basic("app", SECRET, None).await, "MISS", &body, 3600);
    assert_relayed(&with_l1.post_basic("app", SECRET, None).await, "HIT", &body, 3600);
    // No L1 on this replica: the hit is the sealed value read from Redis.
    assert_relayed(&without_l1.post_basic("app", SECRET, None).await, "HIT", &body, 3600);
    assert_eq!(upstream.calls(), 1);

    // A cold key (another extra parameter) asked on both replicas at once: one replica calls,
    // the other's requests get the outcome as a flight message.
    upstream.set(|s| s.latency = Duration::from_millis(500));
    let calls_before = [
        with_l1.metric("token_proxy_upstream_requests_total{status_class=\"2xx\"}").await,
        without_l1.metric("token_proxy_upstream_requests_total{status_class=\"2xx\"}").await,
    ];
    let urls = [with_l1.token_url(), without_l1.token_url()];
    let replies = burst(&urls, 20, "app", SECRET, &[("n", "2")]).await;
    assert_eq!(upstream.calls(), 2, "one upstream call for the burst");
    let calls_after = [
        with_l1.metric("token_proxy_upstream_requests_total{status_class=\"2xx\"}").await,
        without_l1.metric("token_proxy_upstream_requests_total{status_class=\"2xx\"}").await,
    ];
    let follower = (0..2).find(|&i| calls_after[i] == calls_before[i]).expect("one replica did not call");
    for (i, reply) in replies.iter().enumerate() {
        let cache = if i % 2 == follower { "COALESCED" } else { reply.x_cache() };
        assert_relayed(reply, cache, &body, 3600);
    }
}

#[tokio::test]
async fn the_upstreams_json_reaches_the_client_byte_for_byte_when_stale() {
    let token = jwt();
    let body = awkward_body(&token);
    let upstream = ScriptedUpstream::start(format!("{}3600{}", body.0, body.1).as_bytes()).await;
    let redis = RedisServer::start().await;
    // A margin longer than the token's life: never fresh, so every request asks the upstream,
    // yet servable as a stale fallback until the last 30 s.
    let never_fresh = [("TOKEN_PROXY_EXPIRY_MARGIN", "3700s"), ("TOKEN_PROXY_REFRESH_AT", "1")];
    let first = replica(&upstream, &redis, &never_fresh).await;
    let mut all = never_fresh.to_vec();
    all.push(("TOKEN_PROXY_L1_CAPACITY", "0"));
    let second = replica(&upstream, &redis, &all).await;
    assert_relayed(&first.post_basic("app", SECRET, None).await, "MISS", &body, 3600);
    upstream.set(|s| s.fail_next = 10);
    assert_relayed(&first.post_basic("app", SECRET, None).await, "STALE", &body, 3600);
    // From the value in Redis (no L1 there).
    assert_relayed(&second.post_basic("app", SECRET, None).await, "STALE", &body, 3600);
}

#[tokio::test]
async fn a_200_that_is_not_plainly_one_token_response_is_relayed_as_is_and_never_cached() {
    let token = jwt();
    let upstream = ScriptedUpstream::start(b"").await;
    let redis = RedisServer::start().await;
    let proxy = replica(&upstream, &redis, &[]).await;
    let bodies = [
        format!(r#"{{"access_token":"{token}","expires_in":3600,"token_type":"Bearer","error":"invalid_client"}}"#),
        format!(r#"{{"access_token":"{token}","expires_in":3600,"token_type":"Bearer","expires_in":60}}"#),
        // (The canary check takes the last one for the reply's own token.)
        format!(r#"{{"access_token":"other","expires_in":3600,"token_type":"Bearer","access_token":"{token}"}}"#),
        // The same key written with an escape is still the same key.
        format!(r#"{{"access_token":"{token}","expires_in":3600,"token_type":"Bearer","token\u005ftype":"mac"}}"#),
        // (Not the canary: the reply has no top-level token of its own.)
        r#"[{"access_token":"not-an-object","expires_in":3600,"token_type":"Bearer"}]"#.to_owned(),
        format!(r#"{{"access_token":"{token}","expires_in":3600.5,"token_type":"Bearer"}}"#),
    ];
    for (n, body) in bodies.iter().enumerate() {
        upstream.set(|s| s.body = body.clone().into_bytes());
        for _ in 0..2 {
            let reply = post_basic_with(&proxy.token_url(), "app", SECRET, &[("n", &n.to_string())]).await;
            assert_eq!((reply.status, reply.x_cache()), (200, "MISS"), "{body}");
            assert_eq!(&reply.raw, body);
        }
    }
    assert_eq!(upstream.calls(), 2 * bodies.len(), "nothing was cached");
    assert!(redis.dump().await.is_empty(), "nothing was stored");
}

#[tokio::test]
async fn a_compressed_answer_is_never_taken_for_json_nor_cached() {
    let token = jwt();
    let json = format!(r#"{{"access_token":"{token}","expires_in":3600,"token_type":"Bearer"}}"#);
    let upstream = ScriptedUpstream::start(json.as_bytes()).await;
    let redis = RedisServer::start().await;
    let proxy = replica(&upstream, &redis, &[]).await;
    let plain = proxy.post_basic("app", SECRET, None).await;
    assert_eq!((plain.status, plain.x_cache()), (200, "MISS"));
    assert!(upstream.last_head.lock().unwrap().contains("\r\naccept-encoding: identity\r\n"));

    // The endpoint ignores `Accept-Encoding: identity`: whatever the bytes look like (here
    // gzip's magic, and JSON text), a body in an encoding is not a token response.
    let gzip = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xab\x56\x4a\x4c\x4e".to_vec();
    for (n, body) in [gzip, json.into_bytes()].into_iter().enumerate() {
        upstream.set(|s| (s.headers, s.body) = ("Content-Encoding: gzip\r\n".to_owned(), body));
        for _ in 0..2 {
            let reply = post_basic_with(&proxy.token_url(), "app", SECRET, &[("n", &n.to_string())]).await;
            assert_eq!((reply.status, reply.error()), (502, "server_error"), "{}", reply.raw);
            assert!(!reply.headers.contains_key("content-encoding"));
        }
    }
    assert_eq!(upstream.calls(), 5, "nothing compressed was cached");
    assert_eq!(redis.dump().await.len(), 1, "only the plain token was stored");
    assert_eq!(proxy.metric("token_proxy_upstream_requests_total{status_class=\"error\"}").await, 4.0);
}

#[tokio::test]
async fn a_lifetime_above_the_maximum_is_capped_for_caching() {
    let token = jwt();
    // A year, as a misconfigured or hostile endpoint might say.
    let json = format!(r#"{{"access_token":"{token}","expires_in":31536000,"token_type":"Bearer"}}"#);
    let upstream = ScriptedUpstream::start(json.as_bytes()).await;
    let redis = RedisServer::start().await;
    let capped = replica(&upstream, &redis, &[("TOKEN_PROXY_MAX_TOKEN_LIFETIME", "120s")]).await;
    let miss = capped.post_basic("app", SECRET, None).await;
    assert_eq!(miss.x_cache(), "MISS");
    assert!(miss.expires_in() <= 120 && miss.expires_in() >= 119, "{}", miss.raw);
    let hit = capped.post_basic("app", SECRET, None).await;
    assert_eq!(hit.x_cache(), "HIT");
    assert!(hit.expires_in() <= 120, "{}", hit.raw);
    // Kept until the minimum (30 s) is left of the capped lifetime.
    let dump = redis.dump().await;
    assert_eq!(dump.len(), 1);
    let pttl: i64 = redis.client().await.pttl(dump[0].0.clone()).await.unwrap();
    assert!(pttl > 0 && pttl <= 90_000, "pttl {pttl} ms, expected at most 120 s - 30 s");

    // The default maximum is one day.
    let default = replica(&upstream, &redis, &[]).await;
    let other = post_basic_with(&default.token_url(), "app", SECRET, &[("n", "1")]).await;
    assert_eq!(other.x_cache(), "MISS");
    assert!(other.expires_in() <= 86_400 && other.expires_in() >= 86_399, "{}", other.raw);
}
