//! The ceiling for the throughput benchmark (`bench/throughput.sh`): the smallest axum server
//! that answers `POST /oauth2/token` with a fixed token response of the same shape, size and
//! headers as a cache hit on token-proxy. It parses nothing, caches nothing and logs nothing.
//!
//! `cargo run --release -p token-proxy --example baseline -- 127.0.0.1:8000`

use std::net::SocketAddr;
use std::process::ExitCode;

use axum::Router;
use axum::routing::post;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};

/// The headers token-proxy sends with a cache hit.
const HEADERS: [(HeaderName, HeaderValue); 4] = [
    (header::CONTENT_TYPE, HeaderValue::from_static("application/json;charset=UTF-8")),
    (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
    (header::PRAGMA, HeaderValue::from_static("no-cache")),
    (HeaderName::from_static("x-cache"), HeaderValue::from_static("HIT")),
];

/// A token response exactly as mock-idp issues it (an RS256 JWT: header, claims, a 256-byte
/// signature, base64url), 764 bytes, with the field order of token-proxy's hits.
fn token_body() -> Bytes {
    let header = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImJiM2NhMmJiMDIzNDI0ZjMiLCJ0eXAiOiJKV1QifQ";
    let claims = "eyJzdWIiOiJkZW1vLWNsaWVudCIsImNsaWVudF9pZCI6ImRlbW8tY2xpZW50IiwidG9rZW5fdXNlIjoiYWNjZXNzIiwic2Nv\
                  cGUiOiJhcGkvcmVhZCBhcGkvd3JpdGUiLCJpc3MiOiJodHRwOi8vbG9jYWxob3N0L21vY2staWRwIiwiaWF0IjoxNzk1MjQy\
                  NDY0LCJleHAiOjE3OTUyNDYwNjQsImp0aSI6IjM5YWJiY2FjODJiMjc4MDNiMmE1YTgyNjdhNzQ1OWE2IiwidmVyc2lvbiI6\
                  Mn0";
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let signature: String = (0..342).map(|i| char::from(alphabet[i * 37 % 64])).collect();
    let body =
        format!("{{\"access_token\":\"{header}.{claims}.{signature}\",\"token_type\":\"Bearer\",\"expires_in\":3600}}");
    Bytes::from(body)
}

fn main() -> ExitCode {
    let Some(addr) = std::env::args().nth(1) else {
        eprintln!("usage: baseline IP:PORT");
        return ExitCode::from(2);
    };
    let addr: SocketAddr = match addr.parse() {
        Ok(addr) => addr,
        Err(_) => {
            eprintln!("baseline: `{addr}` is not an IP:port address");
            return ExitCode::from(2);
        }
    };
    let body = token_body();
    // Reading the request body is part of the minimum: without it hyper closes the connection
    // after every response (no keep-alive), which would make this ceiling artificially low.
    let app =
        Router::new().route("/oauth2/token", post(move |_request: Bytes| std::future::ready((HEADERS, body.clone()))));

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => listener,
            Err(err) => {
                eprintln!("baseline: cannot listen on {addr}: {err}");
                return ExitCode::FAILURE;
            }
        };
        eprintln!("baseline: listening on {addr}");
        match axum::serve(listener, app).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("baseline: {err}");
                ExitCode::FAILURE
            }
        }
    })
}
