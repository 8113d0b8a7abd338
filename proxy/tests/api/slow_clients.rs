//! Slow clients: a body trickling in has a deadline of its own, holds no admission slot while
//! it arrives, and one source cannot open more than its share of connections. The flood comes
//! from 127.0.0.1; the honest client binds 127.0.0.2 (loopback is all of 127.0.0.0/8).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

const ID: &str = "honest-client";
const HONEST: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// A request head announcing a 200-byte body, and the first bytes of it.
const SLOW_HEAD: &str = "POST /oauth2/token HTTP/1.1\r\nhost: proxy\r\n\
                         content-type: application/x-www-form-urlencoded\r\ncontent-length: 200\r\n\r\ngrant_type=";

/// What one slow connection ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlowEnd {
    /// Closed before any answer: refused at the door.
    ClosedUnanswered,
    /// An answer with this status (408 when the body deadline struck).
    Status(u16),
    /// Still open when the flood ended.
    StillOpen,
}

/// Sends [`SLOW_HEAD`], then one body byte every `every`, until the proxy answers or closes
/// the connection or `until` comes.
async fn trickle(addr: SocketAddr, every: Duration, until: Instant) -> SlowEnd {
    let Ok(mut socket) = TcpStream::connect(addr).await else { return SlowEnd::ClosedUnanswered };
    if socket.write_all(SLOW_HEAD.as_bytes()).await.is_err() {
        return SlowEnd::ClosedUnanswered;
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        tokio::select! {
            read = socket.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            },
            () = tokio::time::sleep(every) => {
                if Instant::now() >= until {
                    return SlowEnd::StillOpen;
                }
                // The proxy may have hung up already: the read says so next.
                let _ = socket.write_all(b"x").await;
            }
        }
    }
    let text = String::from_utf8_lossy(&answer);
    match text.strip_prefix("HTTP/1.1 ").and_then(|rest| rest.get(..3)).and_then(|s| s.parse().ok()) {
        Some(status) => SlowEnd::Status(status),
        None => SlowEnd::ClosedUnanswered,
    }
}

#[tokio::test]
async fn a_body_trickling_in_gets_408_at_the_body_timeout() {
    let app = TestApp::embedded(vec![client(ID, SECRET)], &[("TOKEN_PROXY_BODY_TIMEOUT", "1s")]).await;
    let mut socket = TcpStream::connect(app.proxy.addr).await.unwrap();
    socket.write_all(SLOW_HEAD.as_bytes()).await.unwrap();
    let started = Instant::now();
    // The request timeout is 30 s: only a deadline for the body itself answers within 5 s.
    let answer = trickle_until_closed(&mut socket, Duration::from_millis(200), Duration::from_secs(5))
        .await
        .expect("the connection was still open after 5 s");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"error\":\"invalid_request\""), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(800), "cut off early: {:?}", started.elapsed());
    assert_eq!(app.upstream_requests(), 0);
    assert_eq!(app.proxy.metric("token_proxy_throttled_total{reason=\"body_timeout\"}").await, 1.0);
}

#[tokio::test]
async fn connections_past_the_per_source_cap_are_closed_at_once() {
    let app = TestApp::embedded(
        vec![client(ID, SECRET)],
        &[("TOKEN_PROXY_MAX_CONNECTIONS_PER_SOURCE", "4"), ("TOKEN_PROXY_HEADER_READ_TIMEOUT", "20s")],
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(app.proxy.addr).await.unwrap());
    }
    let mut fifth = TcpStream::connect(app.proxy.addr).await.unwrap();
    let (received, _) = read_until_closed(&mut fifth, Duration::from_secs(3)).await.expect("the fifth is closed");
    assert!(received.is_empty(), "{:?}", String::from_utf8_lossy(&received));

    // Another source is not affected.
    let honest = reqwest::Client::builder().local_address(HONEST).build().unwrap();
    let reply = read(
        honest
            .post(app.proxy.token_url())
            .header("content-type", "application/x-www-form-urlencoded")
            .header("authorization", shared::basic::encode(ID, SECRET))
            .body("grant_type=client_credentials")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.raw);

    // A closed connection frees its place.
    drop(held.pop());
    eventually(Duration::from_secs(5), "a place to free up", async || {
        let mut again = TcpStream::connect(app.proxy.addr).await.unwrap();
        let open = read_until_closed(&mut again, Duration::from_millis(300)).await.is_none();
        if open {
            held.push(again);
        }
        open
    })
    .await;
    let refused = "token_proxy_connections_refused_total{listener=\"client\",reason=\"per_source\"}";
    assert!(app.proxy.metric(refused).await >= 1.0);
}

#[tokio::test]
async fn a_slow_body_flood_from_one_source_does_not_deny_service_to_another() {
    const FLOOD: usize = 300;
    const FLOOD_FOR: Duration = Duration::from_secs(10);
    let app = TestApp::embedded(
        vec![client(ID, SECRET)],
        &[
            // Fewer slots than flood connections: before the fix the flood took them all.
            ("TOKEN_PROXY_MAX_CONCURRENT_REQUESTS", "64"),
            ("TOKEN_PROXY_MAX_CONNECTIONS_PER_SOURCE", "100"),
            ("TOKEN_PROXY_BODY_TIMEOUT", "2s"),
        ],
    )
    .await;
    let addr = app.proxy.addr;
    let honest = reqwest::Client::builder().local_address(HONEST).timeout(Duration::from_secs(10)).build().unwrap();
    let post = || {
        honest
            .post(app.proxy.token_url())
            .header("content-type", "application/x-www-form-urlencoded")
            .header("authorization", shared::basic::encode(ID, SECRET))
            .body("grant_type=client_credentials")
            .send()
    };
    assert_eq!(read(post().await.unwrap()).await.status, 200, "warm-up");

    // The flood: each task keeps one slow connection going, reconnecting when it is closed.
    let until = Instant::now() + FLOOD_FOR;
    let ends: Arc<[AtomicUsize; 4]> = Arc::default();
    let flood: Vec<_> = (0..FLOOD)
        .map(|_| {
            let ends = Arc::clone(&ends);
            tokio::spawn(async move {
                while Instant::now() < until {
                    let end = trickle(addr, Duration::from_secs(1), until).await;
                    let i = match end {
                        SlowEnd::ClosedUnanswered => 0,
                        SlowEnd::Status(408) => 1,
                        SlowEnd::Status(_) => 2,
                        SlowEnd::StillOpen => 3,
                    };
                    ends[i].fetch_add(1, Ordering::Relaxed);
                    if end != SlowEnd::StillOpen {
                        // Bounded: a refused task retries twice a second, not in a busy loop.
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            })
        })
        .collect();

    // The honest client, from another address, while the flood is on.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut latencies = Vec::new();
    let mut statuses = std::collections::BTreeMap::<String, usize>::new();
    while Instant::now() + Duration::from_millis(500) < until {
        let started = Instant::now();
        let status = match post().await {
            Ok(response) => read(response).await.status.to_string(),
            Err(error) => format!("transport error: {error}"),
        };
        latencies.push(started.elapsed());
        *statuses.entry(status).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for task in flood {
        task.await.unwrap();
    }

    latencies.sort();
    let total = latencies.len();
    let ok = statuses.get("200").copied().unwrap_or(0);
    let p99 = latencies[(total * 99).div_ceil(100) - 1];
    let ends: Vec<usize> = ends.iter().map(|n| n.load(Ordering::Relaxed)).collect();
    eprintln!(
        "slow-body flood ({FLOOD} connections from 127.0.0.1, 1 byte/s): the honest client got {ok}/{total} 200s \
         ({:.2} %), p99 {p99:?}, statuses {statuses:?}; flood connections: {} closed unanswered, {} got 408, \
         {} other answers, {} still open at the end",
        100.0 * ok as f64 / total as f64,
        ends[0],
        ends[1],
        ends[2],
        ends[3],
    );
    assert!(total >= 20, "only {total} honest requests in {FLOOD_FOR:?}");
    assert!(ok * 100 >= total * 99, "{ok}/{total} succeeded: {statuses:?}");
    assert!(ends[1] > 0, "no flood connection met the body deadline");
    let refused = "token_proxy_connections_refused_total{listener=\"client\",reason=\"per_source\"}";
    assert!(app.proxy.metric(refused).await > 0.0, "the per-source cap never struck");
}

#[tokio::test]
async fn behind_a_trusted_proxy_one_source_gets_no_more_than_its_share_of_unfinished_requests() {
    let app = TestApp::embedded(
        vec![client(ID, SECRET)],
        &[
            ("TOKEN_PROXY_TRUSTED_PROXIES", "127.0.0.1"),
            ("TOKEN_PROXY_MAX_CONNECTIONS_PER_SOURCE", "4"),
            ("TOKEN_PROXY_BODY_TIMEOUT", "20s"),
        ],
    )
    .await;
    // A load balancer that does not buffer bodies relays four slow requests of one client.
    let slow_head = |source: &str| SLOW_HEAD.replacen("\r\n\r\n", &format!("\r\nx-forwarded-for: {source}\r\n\r\n"), 1);
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut socket = TcpStream::connect(app.proxy.addr).await.unwrap();
        socket.write_all(slow_head("192.0.2.66").as_bytes()).await.unwrap();
        held.push(socket);
    }
    // The handler counts a request once its head is in: wait until all four are.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut fifth = TcpStream::connect(app.proxy.addr).await.unwrap();
    fifth.write_all(slow_head("192.0.2.66").as_bytes()).await.unwrap();
    let (received, _) = read_until_closed(&mut fifth, Duration::from_secs(3)).await.expect("answered and closed");
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 429"), "{text}");
    assert!(text.contains("\"error\":\"temporarily_unavailable\""), "{text}");
    assert!(text.to_ascii_lowercase().contains("retry-after: 1"), "{text}");

    // Another client behind the same balancer is served.
    let reply = read(
        http()
            .post(app.proxy.token_url())
            .header("content-type", "application/x-www-form-urlencoded")
            .header("authorization", shared::basic::encode(ID, SECRET))
            .header("x-forwarded-for", "192.0.2.77")
            .body("grant_type=client_credentials")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.raw);
    assert_eq!(app.proxy.metric("token_proxy_throttled_total{reason=\"per_source\"}").await, 1.0);
    drop(held);
}
