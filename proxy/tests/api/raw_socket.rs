//! Requests no HTTP library would send, written byte by byte: ambiguous framing (request
//! smuggling), broken header lines, spoofed forwarding headers. Each gets a 400 or a closed
//! connection and never reaches the upstream.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

const BODY: &str = "grant_type=client_credentials";

fn request(extra_headers: &str, body: &str) -> String {
    let basic = shared::basic::encode("app", SECRET);
    format!(
        "POST /oauth2/token HTTP/1.1\r\nHost: proxy\r\nAuthorization: {basic}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\n{extra_headers}\r\n{body}"
    )
}

fn chunked(body: &str) -> String {
    format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len())
}

/// Sends raw bytes and reads until the server closes or 2 s pass. Returns the status code
/// (None if the connection closed without one) and whether the connection was closed.
async fn send_raw(addr: std::net::SocketAddr, raw: &str) -> (Option<u16>, bool) {
    let (text, closed) = exchange_raw(addr, raw).await;
    let status = text.strip_prefix("HTTP/1.1 ").and_then(|rest| rest.get(..3)).and_then(|code| code.parse().ok());
    (status, closed)
}

/// Sends raw bytes; returns everything read until the server closed or 2 s passed, and
/// whether it closed.
async fn exchange_raw(addr: std::net::SocketAddr, raw: &str) -> (String, bool) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&received).into_owned(), closed)
}

#[tokio::test]
async fn ambiguous_or_broken_requests_get_400_or_a_closed_connection() {
    let app = TestApp::embedded(vec![client("app", SECRET)], &[]).await;
    let n = BODY.len();
    let cases = [
        (
            "two different Content-Lengths",
            request(&format!("Content-Length: {n}\r\nContent-Length: {}\r\n", n + 1), BODY),
        ),
        ("obfuscated Transfer-Encoding", request("Transfer-Encoding: xchunked\r\n", &chunked(BODY))),
        ("Transfer-Encoding with a space before the colon", request("Transfer-Encoding : chunked\r\n", &chunked(BODY))),
        (
            "two Transfer-Encodings",
            request("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", &chunked(BODY)),
        ),
        ("Transfer-Encoding list", request("Transfer-Encoding: chunked, identity\r\n", &chunked(BODY))),
        ("CR inside a header line", request(&format!("X-A: a\rX-B: b\r\nContent-Length: {n}\r\n"), BODY)),
        ("folded header line", request(&format!("X-A: a\r\n  folded\r\nContent-Length: {n}\r\n"), BODY)),
        ("NUL in a header value", request(&format!("X-A: a\0b\r\nContent-Length: {n}\r\n"), BODY)),
    ];
    for (name, raw) in &cases {
        let (status, closed) = send_raw(app.proxy.addr, raw).await;
        assert!(status == Some(400) || (status.is_none() && closed), "{name}: got {status:?}, closed {closed}");
        if status == Some(400) && name.contains("Length") {
            assert!(closed, "{name}: the connection must not be reused after ambiguous framing");
        }
    }
    assert_eq!(app.upstream_requests(), 0, "an ambiguous request reached the upstream");
}

/// What hyper would take first-wins, or with a transfer coding ignored, is refused with an
/// OAuth 400 before any upstream call: another hop may read it otherwise.
#[tokio::test]
async fn repeated_credentials_or_content_types_and_unknown_transfer_codings_get_an_oauth_400() {
    let app = TestApp::embedded(vec![client("app", SECRET), client("other", SECRET)], &[]).await;
    let n = BODY.len();
    let other = shared::basic::encode("other", SECRET);
    let cases = [
        ("two Authorization headers", request(&format!("Authorization: {other}\r\nContent-Length: {n}\r\n"), BODY)),
        (
            "two Content-Type headers",
            request(&format!("Content-Type: application/json\r\nContent-Length: {n}\r\n"), BODY),
        ),
        (
            "two identical Content-Type headers",
            request(&format!("Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {n}\r\n"), BODY),
        ),
        ("gzip, then chunked", request("Transfer-Encoding: gzip, chunked\r\n", &chunked(BODY))),
        ("deflate, then chunked", request("Transfer-Encoding: deflate,chunked\r\n", &chunked(BODY))),
    ];
    let mut accepted = Vec::new();
    for (name, raw) in &cases {
        let (answer, closed) = exchange_raw(app.proxy.addr, raw).await;
        if !(answer.starts_with("HTTP/1.1 400 ") && answer.contains(r#""error":"invalid_request""#)) {
            accepted.push(format!("{name}: {}", answer.lines().next().unwrap_or("no answer")));
            continue;
        }
        assert!(answer.contains("no-store"), "{name}: {answer}");
        if name.contains("chunked") {
            assert!(closed, "{name}: the connection must not be reused after ambiguous framing");
        }
    }
    assert!(accepted.is_empty(), "not refused with an OAuth 400: {accepted:#?}");
    assert_eq!(app.upstream_requests(), 0, "an ambiguous request reached the upstream");
    // Exactly chunked, in any letter case, is not ambiguous.
    let (status, _) = send_raw(app.proxy.addr, &request("Transfer-Encoding: Chunked\r\n", &chunked(BODY))).await;
    assert_eq!(status, Some(200));
}

/// hyper handles this one itself, as RFC 9112 §6.1 requires: Transfer-Encoding wins, the
/// Content-Length is dropped before the request reaches the proxy, and the connection is
/// closed after the response, so nothing can be smuggled behind the request.
#[tokio::test]
async fn content_length_with_transfer_encoding_closes_the_connection() {
    let app = TestApp::embedded(vec![client("app", SECRET)], &[]).await;
    let smuggled = format!("{}GET /admin HTTP/1.1\r\nHost: proxy\r\n\r\n", chunked(BODY));
    let raw = request(&format!("Content-Length: {}\r\nTransfer-Encoding: chunked\r\n", BODY.len()), &smuggled);
    let mut stream = TcpStream::connect(app.proxy.addr).await.unwrap();
    stream.write_all(raw.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut received)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&received);
    // Exactly one response, then the close: the trailing request was never read as one.
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
    assert!(text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.1 400"), "{text}");
}

#[tokio::test]
async fn plain_chunked_and_content_length_requests_still_work() {
    let app = TestApp::embedded(vec![client("app", SECRET)], &[]).await;
    let (status, _) = send_raw(app.proxy.addr, &request("Transfer-Encoding: chunked\r\n", &chunked(BODY))).await;
    assert_eq!(status, Some(200));
    let (status, _) = send_raw(app.proxy.addr, &request(&format!("Content-Length: {}\r\n", BODY.len()), BODY)).await;
    assert_eq!(status, Some(200));
    // Identical duplicates are one length, not an ambiguity (RFC 9110 §8.6); hyper merges them.
    let n = BODY.len();
    let (status, _) =
        send_raw(app.proxy.addr, &request(&format!("Content-Length: {n}\r\nContent-Length: {n}\r\n"), BODY)).await;
    assert_eq!(status, Some(200));
}

#[tokio::test]
async fn spoofed_forwarding_headers_never_reach_the_upstream() {
    let app = TestApp::embedded(vec![client("app", SECRET)], &[]).await;
    let spoof = "X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Host: idp.example\r\nX-Forwarded-Proto: http\r\n\
                 Forwarded: for=10.0.0.1\r\nX-Real-IP: 10.0.0.1\r\nX-Amzn-Trace-Id: Root=1\r\n";
    let raw = request(&format!("{spoof}Content-Length: {}\r\n", BODY.len()), BODY);
    let (status, _) = send_raw(app.proxy.addr, &raw).await;
    assert_eq!(status, Some(200));
    let seen = app.idp.idp.last_request_headers().unwrap();
    let mut names: Vec<&str> = seen.keys().map(|k| k.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        ["accept", "accept-encoding", "authorization", "content-length", "content-type", "host", "user-agent"]
    );
}
