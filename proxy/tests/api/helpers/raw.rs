//! Raw sockets: reading what a replica sends on a connection the test drives byte by byte.

use std::time::{Duration, Instant};

/// Reads until the peer closes the connection (EOF or reset), at most `limit`. Returns what was
/// received and how long it took, or `None` if the connection was still open at `limit`.
pub async fn read_until_closed(stream: &mut tokio::net::TcpStream, limit: Duration) -> Option<(Vec<u8>, Duration)> {
    let started = Instant::now();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.checked_sub(started.elapsed())?;
        match tokio::time::timeout(left, tokio::io::AsyncReadExt::read(stream, &mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some((received, started.elapsed())),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
}

/// Reads one whole response (head plus Content-Length body) and returns it as text.
pub async fn read_one_response(stream: &mut tokio::net::TcpStream) -> String {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = String::from_utf8_lossy(&received).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse::<usize>().ok())?
                })
                .expect("a Content-Length");
            if received.len() >= end + 4 + length {
                return text;
            }
        }
        let left = deadline.checked_duration_since(Instant::now()).expect("a whole response within 5 s");
        let n = tokio::time::timeout(left, tokio::io::AsyncReadExt::read(stream, &mut buf))
            .await
            .expect("a response within 5 s")
            .unwrap();
        assert!(n > 0, "connection closed mid-response: {text}");
        received.extend_from_slice(&buf[..n]);
    }
}

/// Sends one body byte every `every` until the peer closes the connection, at most `limit`.
/// Returns what was received, or `None` if the connection was still open at `limit`.
pub async fn trickle_until_closed(
    stream: &mut tokio::net::TcpStream,
    every: Duration,
    limit: Duration,
) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut received = Vec::new();
    let read = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 1024];
        loop {
            tokio::select! {
                n = stream.read(&mut buf) => match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => received.extend_from_slice(&buf[..n]),
                },
                () = tokio::time::sleep(every) => {
                    let _ = stream.write_all(b"x").await;
                }
            }
        }
    })
    .await;
    read.ok().map(|()| String::from_utf8_lossy(&received).into_owned())
}
