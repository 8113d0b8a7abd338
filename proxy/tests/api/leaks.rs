//! Invariant 4: secrets and tokens never appear in logs, panics, metrics, error bodies or Redis.
//!
//! The harness (helpers/leak_checks.rs) checks every test of the suite for every client secret and token
//! it registered. This module tests those checks themselves, and walks one canary secret full
//! of URL-special characters through every flow, asserting explicitly at the end.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};

use crate::helpers::*;

const ID: &str = "canary-client";
/// Every character that URL encoding changes, and some that base64 alignment makes interesting.
const CANARY: &str = "Canary s3cret+/=&?%:~#\"x9Q";
const ADMIN_TOKEN: &str = "canary-admin-token-5e2c81f04b";

/// A JWT-shaped token for `client_id`, as mock-idp would issue (the signature is made up).
fn fake_token(client_id: &str) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","typ":"JWT"}"#);
    let claims = URL_SAFE_NO_PAD.encode(format!(r#"{{"client_id":"{client_id}","jti":"0f1e2d3c"}}"#));
    let seed = client_id.len() as u8;
    let signature = URL_SAFE_NO_PAD.encode((0u8..=255).map(|i| i.wrapping_mul(37) ^ seed).collect::<Vec<u8>>());
    format!("{header}.{claims}.{signature}")
}

fn canaries_for(secret: &str) -> Canaries {
    let mut canaries = Canaries::new();
    canaries.add_secret(ID, secret).expect("long enough to scan for");
    canaries
}

#[test]
fn a_secret_is_found_at_every_base64_alignment_in_both_alphabets_and_in_basic_headers() {
    let canaries = canaries_for(CANARY);
    let mut form_encoded = String::new();
    shared::form::encode_component(CANARY, &mut form_encoded);
    for offset in 0..3 {
        for value in [CANARY, form_encoded.as_str()] {
            let mut embedded = b"xyz"[..offset].to_vec();
            embedded.extend_from_slice(value.as_bytes());
            embedded.extend_from_slice(b" and what follows");
            for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
                let text = format!("log line: data={} end", engine.encode(&embedded));
                assert!(
                    !canaries.find_all(text.as_bytes()).is_empty(),
                    "offset {offset}: {}",
                    canaries.redact(text.as_bytes())
                );
            }
        }
    }
    // A Basic header carries base64(form(id):form(secret)); ids of every length mod 3.
    for id in ["a", "ab", "abc", "abcd", ID] {
        let header = format!("authorization: {}", shared::basic::encode(id, CANARY));
        let found = canaries.find_all(header.as_bytes());
        assert!(!found.is_empty(), "the Basic header of `{id}`");
        assert!(canaries.canary(found[0].canary).what.contains(ID));
    }
    // Raw, URL-encoded in a form body, percent-encoded in a query, escaped in JSON.
    let body = shared::form::encode_pairs([("grant_type", "client_credentials"), ("client_secret", CANARY)]);
    let json = serde_json::json!({ "secret": CANARY }).to_string();
    for text in [format!("secret={CANARY};"), body, format!("GET /x?client_secret={}", percent(CANARY)), json] {
        assert!(!canaries.find_all(text.as_bytes()).is_empty(), "{}", canaries.redact(text.as_bytes()));
    }
    // Only the canary: a secret one character off, encoded the same ways, is not it.
    let other = CANARY.replace('9', "8");
    for id in ["a", "ab", "abc"] {
        let header = shared::basic::encode(id, &other);
        assert!(canaries.find_all(header.as_bytes()).is_empty(), "{id}");
    }
    assert!(canaries.find_all(STANDARD.encode(&other).as_bytes()).is_empty());
    assert!(canaries.find_all(other.as_bytes()).is_empty());
}

/// RFC 3986 percent-encoding, as a URL builder writes a query.
fn percent(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[test]
fn a_token_is_found_whole_by_its_signature_and_base64_encoded() {
    let token = fake_token(ID);
    let mut canaries = Canaries::new();
    canaries.add_token(&token);
    let signature = token.rsplit('.').next().unwrap();
    for text in [
        format!("{{\"access_token\":\"{token}\"}}"),
        format!("authorization: Bearer {token}"),
        format!("sig={signature}"),
        format!("sealed? {}", STANDARD.encode(format!("Bearer {token}"))),
        format!("sealed? {}", URL_SAFE_NO_PAD.encode(format!("xy{token}z"))),
    ] {
        let found = canaries.find_all(text.as_bytes());
        assert!(!found.is_empty(), "{}", canaries.redact(text.as_bytes()));
        assert!(canaries.canary(found[0].canary).what.contains("issued to `canary-client`"));
    }
    assert!(
        canaries.find_all(fake_token("another-client").as_bytes()).is_empty(),
        "the header and claims are no secret"
    );
}

#[test]
fn a_planted_canary_fails_the_checks_with_a_message_that_names_it_without_showing_it() {
    let canaries = canaries_for(CANARY);
    let mut encoded = String::new();
    shared::form::encode_component(CANARY, &mut encoded);
    let logs = format!(
        "2026-01-01T00:00:00Z DEBUG token_proxy: request accepted\n\
         2026-01-01T00:00:01Z TRACE token_proxy::upstream: sending body=client_id=x&client_secret={encoded}&scope=a\n\
         2026-01-01T00:00:02Z DEBUG token_proxy: done\n"
    );
    let message = canaries.check("the planted logs", logs.as_bytes(), true).expect_err("the plant is found");
    assert!(message.contains("the planted logs") && message.contains("`canary-client`"), "{message}");
    assert!(message.contains("form-urlencoded") && message.contains("client_secret=[CANARY]&scope=a"), "{message}");
    assert!(canaries.find_all(message.as_bytes()).is_empty(), "the message shows the canary: {message}");
    assert!(!message.contains("done"), "the excerpt is the line of the finding only: {message}");

    // The Basic header of the canary in a binary blob (an RDB file, say).
    let mut blob = vec![0u8, 255, 17];
    blob.extend_from_slice(shared::basic::encode(ID, CANARY).as_bytes());
    blob.extend_from_slice(&[0, 1, 2]);
    let message = canaries.check("the planted blob", &blob, false).expect_err("the plant is found");
    assert!(message.contains("base64") && canaries.find_all(message.as_bytes()).is_empty(), "{message}");

    let panicked = std::panic::catch_unwind(|| canaries.assert_clean("the planted logs", logs.as_bytes()));
    assert!(panicked.is_err(), "assert_clean must fail on a plant");
    canaries.assert_clean("clean text", b"client_id=canary-client&client_secret=[redacted] and nothing else");

    // The process-wide registry the harness checks with catches it too.
    register_secret(ID, CANARY);
    let panicked = std::panic::catch_unwind(|| check_no_leak("the planted logs", logs.as_bytes()));
    let payload = panicked.expect_err("check_no_leak must fail on a plant");
    let message = payload.downcast_ref::<String>().expect("a formatted message");
    assert!(message.starts_with("LEAK: the planted logs contains the client secret of `"), "{message}");
    assert!(canaries.find_all(message.as_bytes()).is_empty(), "the message shows the canary: {message}");
}

#[test]
fn short_secrets_are_not_scanned_for_and_forms_are_long_enough() {
    assert!(Canaries::new().add_secret("app", "secret").is_none());
    for forms in [leak_forms("abcdefghijkl"), leak_forms(CANARY), token_forms(&fake_token(ID))] {
        assert!(forms.iter().all(|(_, bytes)| bytes.len() >= MIN_CANARY_LEN));
        let mut distinct: Vec<&Vec<u8>> = forms.iter().map(|(_, bytes)| bytes).collect();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), forms.len(), "forms are distinct");
    }
    let names: Vec<String> = leak_forms(CANARY).into_iter().map(|(name, _)| name).collect();
    for expected in ["raw", "form-urlencoded", "percent-encoded", "JSON-escaped", "base64 (URL-safe, unpadded)"] {
        assert!(names.iter().any(|n| n.starts_with(expected)), "no {expected} form in {names:?}");
    }
    assert!(token_forms(&fake_token(ID)).iter().any(|(name, _)| name.contains("signature")));
}

#[tokio::test]
async fn a_canary_secret_and_its_tokens_never_leak_through_any_flow() {
    let mut cluster = TestCluster::start(
        2,
        vec![client(ID, CANARY), client("bystander", "bystander-secret-77c1")],
        &[("TOKEN_PROXY_ADMIN_TOKEN", ADMIN_TOKEN), ("TOKEN_PROXY_REDIS_TIMEOUT", "300ms")],
    )
    .await;
    let urls = cluster.urls();
    let mut replies = Vec::new();

    // MISS, HIT, and the same entry through body credentials on the other replica.
    let miss = post_basic(&urls[0], ID, CANARY, None).await;
    assert_eq!((miss.status, miss.x_cache()), (200, "MISS"), "{}", miss.raw);
    let hit = post_basic(&urls[0], ID, CANARY, None).await;
    assert_eq!((hit.x_cache(), hit.access_token()), ("HIT", miss.access_token()));
    let body = post_body(&urls[1], ID, CANARY, None).await;
    assert_eq!(body.access_token(), miss.access_token());
    replies.extend([miss, hit, body]);
    replies.push(post_basic(&urls[1], "bystander", "bystander-secret-77c1", None).await);

    // A burst on a cold key over both replicas: one call upstream, the others coalesce.
    cluster.idp.idp.set_latency(Duration::from_millis(300));
    let burst = burst(&urls, 20, ID, CANARY, &[("scope", "api/read")]).await;
    cluster.idp.idp.set_latency(Duration::ZERO);
    assert!(burst.iter().all(|r| r.status == 200), "{:?}", burst.iter().map(|r| r.status).collect::<Vec<_>>());
    assert!(
        burst.iter().any(|r| r.x_cache() == "COALESCED"),
        "{:?}",
        burst.iter().map(TokenReply::x_cache).collect::<Vec<_>>()
    );
    replies.extend(burst);

    // Wrong secrets, Basic and body.
    for reply in
        [post_basic(&urls[0], ID, &format!("{CANARY}x"), None).await, post_body(&urls[1], ID, &CANARY[1..], None).await]
    {
        // Cognito (and mock-idp, passed through) answers 400; the proxy itself 401.
        assert!(matches!(reply.status, 400 | 401) && reply.error() == "invalid_client", "{}", reply.raw);
        replies.push(reply);
    }

    // Upstream failures: a 500 (the caller gets a 5xx) and a 400 (passed through).
    cluster.idp.idp.fail_next(1, 500);
    let failed = post_basic(&urls[0], ID, CANARY, Some("api/write")).await;
    assert!(failed.status >= 500, "{} {}", failed.status, failed.raw);
    cluster.idp.idp.fail_next(1, 400);
    let refused = post_body(&urls[1], ID, CANARY, Some("api/write")).await;
    assert_eq!(refused.status, 400, "{}", refused.raw);
    replies.extend([failed, refused]);

    // Rejected requests that carry the secret: repeated, next to Basic, in the query.
    let mut encoded = String::new();
    shared::form::encode_component(CANARY, &mut encoded);
    let repeated =
        format!("grant_type=client_credentials&client_id={ID}&client_secret={encoded}&client_secret={encoded}");
    for reply in [
        post_form(&urls[0], &repeated).await,
        post_basic_with(&urls[1], ID, CANARY, &[("client_secret", CANARY)]).await,
        post_form(&format!("{}?client_id={ID}&client_secret={encoded}", urls[0]), "grant_type=client_credentials")
            .await,
    ] {
        assert_eq!((reply.status, reply.error()), (400, "invalid_request"), "{}", reply.raw);
        replies.push(reply);
    }
    assert!(cluster.idp.idp.requests_total() >= 4);

    // A purge through the admin API: the next request is a new token.
    let before = post_basic(&urls[1], ID, CANARY, None).await;
    assert_eq!(cluster.replicas[0].purge(Some(ADMIN_TOKEN), &format!(r#"{{"client_id": "{ID}"}}"#)).await.0, 200);
    let old = before.access_token().to_owned();
    replies.push(before);
    let url = urls[1].clone();
    eventually(Duration::from_secs(2), "the purge", async || {
        post_basic(&url, ID, CANARY, None).await.access_token() != old
    })
    .await;

    // Redis killed: requests carry on; restarted: it is written to again.
    cluster.redis.kill();
    let degraded = post_basic(&urls[0], ID, CANARY, Some("api/read api/write")).await;
    assert_eq!(degraded.status, 200, "{}", degraded.raw);
    replies.push(degraded);
    cluster.redis.restart().await;
    let redis = &cluster.redis;
    let mut n = 0;
    eventually(Duration::from_secs(10), "entries in the restarted Redis", async || {
        n += 1;
        post_basic_with(&url, ID, CANARY, &[("aws_client_metadata", &format!("after-restart-{n}"))]).await;
        !redis.contents().is_empty()
    })
    .await;

    // Now explicitly, over everything: the canary secret and every token mock-idp issued.
    let tokens = cluster.idp.idp.issued_tokens();
    assert!(tokens.len() >= 6, "only {} tokens issued", tokens.len());
    let mut canaries = canaries_for(CANARY);
    for token in &tokens {
        canaries.add_token(token);
    }
    let logs = captured_log_bytes();
    let logged = |needle: &str| logs.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(logged(ID) && logged("token_proxy"), "the proxy's and mock-idp's logs were not captured");
    // The access log is on (helpers/app.rs): its lines for the canary client are scanned too.
    let text = String::from_utf8_lossy(&logs);
    let access = text.lines().filter(|l| l.contains("token_proxy::access") && l.contains(ID)).count();
    assert!(access >= replies.len() - 4, "only {access} access log lines for `{ID}`");
    canaries.assert_clean("the captured logs", &logs);
    for replica in &cluster.replicas {
        let metrics = replica.metrics().await;
        canaries.assert_clean("the metrics", metrics.as_bytes());
        assert!(!metrics.contains(ID), "metrics carry the client id as a label");
    }
    let errors = replies.iter().filter(|r| r.status != 200).count();
    assert!(errors >= 7, "only {errors} error answers");
    for reply in &replies {
        let body = match reply.status {
            200 => reply.raw.replace(reply.access_token(), ""),
            _ => reply.raw.clone(),
        };
        canaries.assert_clean(&format!("a {} body", reply.status), body.as_bytes());
        let headers: String =
            reply.headers.iter().map(|(n, v)| format!("{n}: {}\n", v.to_str().unwrap_or(""))).collect();
        canaries.assert_clean(&format!("the headers of a {} answer", reply.status), headers.as_bytes());
    }
    let rdb = cluster.redis.rdb();
    let contents = cluster.redis.contents();
    assert!(rdb.starts_with(b"REDIS") && !contents.is_empty());
    for (key, values) in &contents {
        // Uncompressed: what is in Redis is in the file as is, so scanning the file means something.
        assert!(rdb.windows(key.len()).any(|w| w == key.as_slice()), "a key is not in the RDB file as is");
        canaries.assert_clean("a Redis key", key);
        for value in values {
            canaries.assert_clean("a Redis value", value);
        }
    }
    canaries.assert_clean("the RDB file", &rdb);

    let stats = canary_stats();
    eprintln!(
        "canaries so far in this process: {} secrets and {} tokens, {} checks over {} bytes; too short to scan: {:?}",
        stats.secrets, stats.tokens, stats.checks, stats.bytes_scanned, stats.short
    );
}
