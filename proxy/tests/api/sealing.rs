//! Invariant 4: nothing readable at rest; a moved, truncated or altered value is a miss.

use bytes::Bytes;
use fred::prelude::*;

use crate::helpers::*;

const NO_L1: &[(&str, &str)] = &[("TOKEN_PROXY_L1_CAPACITY", "0")];

/// Warms entries for clients a and b and returns the Redis key of each.
async fn two_entries(app: &TestApp) -> (Bytes, Bytes, String, String) {
    let a = app.post_basic("a", "secret-for-a", None).await.access_token().to_owned();
    let key_a = app.redis().dump().await[0].0.clone();
    let b = app.post_basic("b", "secret-for-b", None).await.access_token().to_owned();
    let key_b = app.redis().dump().await.into_iter().map(|(k, _)| k).find(|k| *k != key_a).unwrap();
    (key_a, key_b, a, b)
}

#[tokio::test]
async fn a_value_moved_to_another_key_is_a_miss() {
    let app = TestApp::with_redis(vec![client("a", "secret-for-a"), client("b", "secret-for-b")], NO_L1).await;
    let (key_a, key_b, token_a, _) = two_entries(&app).await;
    let redis = app.redis().client().await;
    let value_a: Bytes = redis.get(key_a).await.unwrap();
    let () = redis.set(key_b, value_a, Some(Expiration::EX(300)), None, false).await.unwrap();
    let reply = app.post_basic("b", "secret-for-b", None).await;
    assert_eq!((reply.status, reply.x_cache()), (200, "MISS"));
    assert_ne!(reply.access_token(), token_a, "client b was served client a's token");
    assert_eq!(app.issued(), 3);
}

#[tokio::test]
async fn truncated_flipped_or_garbage_values_are_misses_and_the_request_succeeds() {
    let app = TestApp::with_redis(vec![client("a", "secret-for-a"), client("b", "secret-for-b")], NO_L1).await;
    let (key_a, _, _, _) = two_entries(&app).await;
    let redis = app.redis().client().await;
    let original: Bytes = redis.get(key_a.clone()).await.unwrap();
    let mut flipped = original.to_vec();
    let last = flipped.len() - 1;
    flipped[last / 2] ^= 0x01;
    let tampered: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", original[..original.len() - 1].to_vec()),
        ("cut to the header", original[..5].to_vec()),
        ("bit flipped", flipped),
        ("empty", vec![]),
        ("garbage", b"not a sealed value at all".to_vec()),
    ];
    let mut issued = app.issued();
    for (what, value) in tampered {
        let () = redis.set(key_a.clone(), value, Some(Expiration::EX(300)), None, false).await.unwrap();
        let reply = app.post_basic("a", "secret-for-a", None).await;
        assert_eq!((reply.status, reply.x_cache()), (200, "MISS"), "{what}");
        issued += 1;
        assert_eq!(app.issued(), issued, "{what}");
    }
}

#[tokio::test]
async fn redis_holds_nothing_readable() {
    let app = TestApp::with_redis(vec![client("visible-client-id", "visible-client-secret")], NO_L1).await;
    let mut tokens = Vec::new();
    for scope in [None, Some("api/read"), Some("api/write")] {
        let reply = app.post_basic("visible-client-id", "visible-client-secret", scope).await;
        tokens.push(reply.access_token().to_owned());
    }
    let dump = app.redis().dump().await;
    assert_eq!(dump.len(), 3);
    for (key, value) in dump {
        let key = String::from_utf8_lossy(&key).into_owned();
        assert!(key.starts_with("tp:{") && key.ends_with('}'), "{key}");
        for needle in ["visible-client-id", "visible-client-secret", "api/read", "Bearer", "access_token"] {
            assert!(!key.contains(needle), "key {key} contains {needle}");
            assert!(!contains(&value, needle.as_bytes()), "a value contains {needle}");
        }
        for token in &tokens {
            // Any 16-byte window of the token (its signature, its claims) would be a leak.
            for window in token.as_bytes().chunks_exact(16) {
                assert!(!contains(&value, window), "a value contains part of a token");
            }
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
