//! Test harness: real `redis-server` processes on free ports, `mock-idp` in-process as the
//! upstream, and token-proxy replicas on port 0, all over loopback HTTP. One file per concern,
//! everything re-exported here so that a test module needs only `use crate::helpers::*`.

use std::net::TcpListener;
use std::time::{Duration, Instant};

mod app;
mod canaries;
mod certs;
mod cluster;
mod http;
mod leak_checks;
mod logs;
mod raw;
mod redis;
mod tls_redis;
mod topology;

pub use app::*;
pub use canaries::*;
pub use certs::*;
pub use cluster::*;
pub use http::*;
pub use leak_checks::*;
pub use logs::*;
pub use raw::*;
pub use redis::*;
pub use tls_redis::*;
pub use topology::*;

/// Base64 of the 32 bytes "0123456789abcdef0123456789abcdef".
pub const ROOT_SECRET: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

/// The client secret most tests use: long enough (see [`MIN_CANARY_LEN`]) to be a canary, and
/// plain enough to write into a form body as is.
pub const SECRET: &str = "shared-test-secret-0042";

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits until `condition` holds, polling; panics after `timeout`.
pub async fn eventually(timeout: Duration, what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
