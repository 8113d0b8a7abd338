//! Invariant 2: never serve a token with less than the minimum left; `expires_in` is the
//! time actually left; the Redis TTL ends before the token does.

use std::time::{Duration, Instant};

use crate::helpers::*;

#[tokio::test]
async fn expires_in_counts_down_and_no_token_is_served_under_the_minimum() {
    // Tokens live 6 s; entries end 1 s early, and nothing under 2 s is served: so a token is
    // served for 4 s, then a new one is fetched.
    let app = TestApp::with_redis(
        vec![client("app", SECRET)],
        &[("TOKEN_PROXY_EXPIRY_MARGIN", "1s"), ("TOKEN_PROXY_MIN_TOKEN_TTL", "2s"), ("TOKEN_PROXY_L1_MAX_AGE", "1s")],
    )
    .await;
    app.idp.idp.set_token_lifetime(Duration::from_secs(6));
    let first = app.post_basic("app", SECRET, None).await;
    assert!(first.expires_in() <= 6);
    let mut previous = (first.access_token().to_owned(), first.expires_in());
    let mut seen_expires_in = vec![first.expires_in()];
    let started = Instant::now();
    let mut tokens = 1;
    while started.elapsed() < Duration::from_millis(5_500) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let reply = app.post_basic("app", SECRET, None).await;
        assert_eq!(reply.status, 200);
        assert!(reply.expires_in() >= 2, "served a token with {} s left", reply.expires_in());
        if reply.access_token() == previous.0 {
            assert!(reply.expires_in() <= previous.1, "expires_in went up for the same token");
        } else {
            tokens += 1;
        }
        seen_expires_in.push(reply.expires_in());
        previous = (reply.access_token().to_owned(), reply.expires_in());
    }
    assert!(seen_expires_in.windows(2).any(|w| w[1] < w[0]), "expires_in never decreased: {seen_expires_in:?}");
    assert_eq!(tokens, 2, "expected exactly one refresh in 5.5 s");
    assert_eq!(app.issued(), 2);
}

/// Entries stay in Redis until the token has `MIN_TOKEN_TTL` left (the stale window after
/// `EXPIRY_MARGIN` serves only when the upstream fails).
#[tokio::test]
async fn the_redis_ttl_ends_before_the_token() {
    let app = TestApp::with_redis(
        vec![client("app", SECRET)],
        &[("TOKEN_PROXY_EXPIRY_MARGIN", "90s"), ("TOKEN_PROXY_MIN_TOKEN_TTL", "60s")],
    )
    .await;
    app.idp.idp.set_token_lifetime(Duration::from_secs(300));
    app.post_basic("app", SECRET, None).await;
    let redis = app.redis().client().await;
    let dump = app.redis().dump().await;
    assert_eq!(dump.len(), 1);
    let pttl: i64 = fred::prelude::KeysInterface::pttl(&redis, dump[0].0.clone()).await.unwrap();
    assert!(pttl > 230_000 && pttl <= 240_000, "pttl {pttl} ms, expected at most 300 s - 60 s");
}

#[tokio::test]
async fn tokens_too_short_lived_to_cache_are_relayed_but_not_cached() {
    let app = TestApp::with_redis(vec![client("app", SECRET)], &[]).await;
    app.idp.idp.set_token_lifetime(Duration::from_secs(30));
    let first = app.post_basic("app", SECRET, None).await;
    let second = app.post_basic("app", SECRET, None).await;
    assert_eq!((first.status, first.x_cache()), (200, "MISS"));
    assert_eq!(second.x_cache(), "MISS");
    assert!(first.expires_in() <= 30);
    assert_eq!(app.issued(), 2);
    assert!(app.redis().dump().await.is_empty());
}

/// The hit path reads an entry's value, then Redis's clock: the time left is computed from a
/// clock reading no earlier than the value's, so it can only be understated. Redis's MONITOR
/// shows the order in which it ran them.
#[tokio::test]
async fn a_hit_from_redis_reads_the_value_before_the_clock() {
    use tokio::io::AsyncBufReadExt;
    let app = TestApp::with_redis(vec![client("app", SECRET)], &[("TOKEN_PROXY_L1_CAPACITY", "0")]).await;
    assert_eq!(app.post_basic("app", SECRET, None).await.x_cache(), "MISS");

    let mut monitor = tokio::process::Command::new("redis-cli")
        .args(["-p", &app.redis().port.to_string(), "monitor"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-cli runs");
    let mut lines = tokio::io::BufReader::new(monitor.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await.unwrap().unwrap();
    assert_eq!(ready.as_deref(), Some("OK"));

    assert_eq!(app.post_basic("app", SECRET, None).await.x_cache(), "HIT");
    let mut reads = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while reads.len() < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = tokio::time::timeout(left, lines.next_line()).await.expect("both reads within 5 s").unwrap();
        let line = line.expect("MONITOR ended early").to_ascii_uppercase();
        // Entries only (`"tp:{...}"`, no `:lock`) and the clock, not the purge epochs or locks.
        if line.contains("\"TP:{") && !line.contains(":LOCK\"") && line.contains("\"GETRANGE\"") {
            reads.push("\"GETRANGE\"");
        } else if line.ends_with("\"TIME\"") && !reads.is_empty() {
            reads.push("\"TIME\"");
        }
    }
    assert_eq!(reads, ["\"GETRANGE\"", "\"TIME\""], "the value must be read first");
}

/// Issue 10, defect 2: the time left came from the Redis TTL alone, so `PEXPIRE` on an entry
/// served its token past its expiry (once with `expires_in` 31,535,862).
#[tokio::test]
async fn a_stretched_ttl_in_redis_never_serves_a_token_past_its_expiry() {
    let app = TestApp::with_redis(
        vec![client("app", SECRET)],
        &[("TOKEN_PROXY_L1_CAPACITY", "0"), ("TOKEN_PROXY_EXPIRY_MARGIN", "1s"), ("TOKEN_PROXY_MIN_TOKEN_TTL", "1s")],
    )
    .await;
    app.idp.idp.set_token_lifetime(Duration::from_secs(4));
    let issued_at = Instant::now();
    let first = app.post_basic("app", SECRET, None).await.access_token().to_owned();
    let redis = app.redis().client().await;
    let (entry, _) = app.redis().dump().await.into_iter().next().expect("the entry");
    let stretched: bool =
        fred::prelude::KeysInterface::pexpire(&redis, entry, 365 * 24 * 3600 * 1000, None).await.unwrap();
    assert!(stretched);
    while issued_at.elapsed() < Duration::from_secs(6) {
        let reply = app.post_basic("app", SECRET, None).await;
        assert_eq!(reply.status, 200);
        assert!(reply.expires_in() <= 4, "expires_in {} for a 4 s token", reply.expires_in());
        if reply.access_token() == first {
            assert!(
                issued_at.elapsed() < Duration::from_secs(3),
                "served {:?} after issue, with {} s left",
                issued_at.elapsed(),
                reply.expires_in()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(app.issued() >= 2, "the stretched entry was never replaced");
}

/// Issue 10, defect 2: an old sealed value written back under its own key, with a long TTL,
/// is not served once its token has expired.
#[tokio::test]
async fn an_old_sealed_value_written_back_is_not_served() {
    let app = TestApp::with_redis(
        vec![client("app", SECRET)],
        &[("TOKEN_PROXY_L1_CAPACITY", "0"), ("TOKEN_PROXY_EXPIRY_MARGIN", "1s"), ("TOKEN_PROXY_MIN_TOKEN_TTL", "1s")],
    )
    .await;
    app.idp.idp.set_token_lifetime(Duration::from_secs(3));
    let old = app.post_basic("app", SECRET, None).await.access_token().to_owned();
    let (entry, sealed) = app.redis().dump().await.into_iter().next().expect("the entry");
    tokio::time::sleep(Duration::from_millis(3_200)).await;
    let redis = app.redis().client().await;
    let _: () = fred::prelude::KeysInterface::set(
        &redis,
        entry,
        sealed,
        Some(fred::types::Expiration::PX(365 * 24 * 3600 * 1000)),
        None,
        false,
    )
    .await
    .unwrap();
    for _ in 0..3 {
        let reply = app.post_basic("app", SECRET, None).await;
        assert_eq!(reply.status, 200);
        assert_ne!(reply.access_token(), old, "an expired token came back from an old value");
        assert!(reply.expires_in() <= 3);
    }
}
