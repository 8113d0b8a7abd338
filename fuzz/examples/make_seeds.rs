//! Writes the seed corpora under `fuzz/seeds/<target>/`: realistic inputs for each target, in
//! each target's input layout (see the target's doc comment). Run from `fuzz/`:
//! `cargo run --example make_seeds`. Files are rewritten in place; sealed values change on every
//! run (fresh nonces), so only rerun it when a seed needs changing.
//!
//! Every seed is checked against the code it feeds, so a seed that stopped meaning what its name
//! says fails here instead of silently exploring nothing.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use http::header::{self, HeaderMap, HeaderValue};
use shared::basic;
use shared::form::Form;
use shared::keys::{CacheKey, Keys};
use token_proxy::entry::{CachedToken, Freshness};
use token_proxy::flight_message;
use token_proxy::normalize::{self, RequestLimits, TokenRequest};
use token_proxy::response::UpstreamFailure;
use token_proxy::upstream::{UpstreamError, UpstreamResponse};

const SEP: u8 = 0xFF;
/// RFC 6749 §2.3.1's example: client `s6BhdRkqt3`, secret `7Fjfp0ZBr1KtDRbnfVdmIw`.
const RFC_BASIC: &str = "Basic czZCaGRSa3F0Mzo3RmpmcDBaQnIxS3REUmJuZlZkbUl3";
const COGNITO: &str = "https://example-domain.auth.us-east-1.amazoncognito.com/oauth2/token";
const JWT: &str = "eyJraWQiOiJhYmMiLCJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxZXhhbXBsZTIzNDU2Nzg5IiwidG9rZW5fdXNlIjoiYWNjZXNzIiwic2NvcGUiOiJyZXNvdXJjZXNlcnZlci9yZWFkIiwiZXhwIjoxNzAwMDAzNjAwfQ.c2lnbmF0dXJlLWJ5dGVzLWZvci10aGUtc2VlZA";

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = Path::new("seeds").join(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(name), data).unwrap();
}

fn joined(head: &[u8], fields: &[&[u8]]) -> Vec<u8> {
    let mut out = head.to_vec();
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push(SEP);
        }
        out.extend_from_slice(f);
    }
    out
}

fn form_parse() {
    let cognito = "grant_type=client_credentials&client_id=1example23456789&client_secret=abcdef01234567890ghijklmnopqrstuvwxyz&scope=resourceserver%2Fread+resourceserver%2Fwrite";
    let seeds: &[(&str, &str, bool)] = &[
        ("rfc6749-4.4.2", "grant_type=client_credentials", true),
        ("cognito-body-credentials", cognito, true),
        (
            "aws-client-metadata",
            "grant_type=client_credentials&scope=api%2Fread&aws_client_metadata=%7B%22tenant%22%3A%22acme%22%2C%22env%22%3A%22prod%22%7D",
            true,
        ),
        (
            "auth0-audience",
            "grant_type=client_credentials&audience=https%3A%2F%2Fapi.example.com%2F&client_id=abc&client_secret=s%3A3%2Bc%25d",
            true,
        ),
        ("utf8-and-escapes", "client_id=caf%C3%A9+cr%C3%A8me&client_secret=p%40ss%3Aw%2Bord%25&x=%E2%82%AC", true),
        ("empty-values-absent", "grant_type=client_credentials&scope=&flag&&client_id=x", true),
        ("refresh-token", "grant_type=refresh_token&refresh_token=tGzv3JOkF0XG5Qx2TlKWIA&client_id=s6BhdRkqt3", true),
        ("repeated", "grant_type=client_credentials&scope=a&scope=b", false),
        ("repeated-encoded", "a=1&%61=2", false),
        ("repeated-empty", "a=&a=2", false),
        ("bad-percent", "a=%4&b=%zz", false),
        ("not-utf8", "client_secret=%ff%fe", false),
        ("empty-name", "=x&grant_type=client_credentials", false),
    ];
    for (name, body, ok) in seeds {
        assert_eq!(Form::parse(body.as_bytes()).is_ok(), *ok, "{name}");
        write("form_parse", name, body.as_bytes());
    }
    let many: Vec<String> = (0..32).map(|i| format!("p{i}=v{i}")).collect();
    assert!(Form::parse(many.join("&").as_bytes()).is_ok());
    write("form_parse", "32-parameters", many.join("&").as_bytes());
}

fn basic_decode() {
    let seeds: &[(&str, u8, String)] = &[
        ("rfc6749-2.3.1", 10, RFC_BASIC.to_owned()),
        ("rfc-credentials-raw", 10, "s6BhdRkqt3:7Fjfp0ZBr1KtDRbnfVdmIw".to_owned()),
        ("rfc-base64-only", 10, RFC_BASIC["Basic ".len()..].to_owned()),
        ("secret-with-separator", 9, basic::encode("my client", "a:b+c%d")),
        ("utf8-id", 5, basic::encode("caf\u{e9}-client", "s\u{e9}cret\u{20ac}")),
        ("cognito", 26, basic::encode("1example23456789", "abcdef01234567890ghijklmnopqrstuvwxyz")),
        ("lowercase-unpadded", 1, "bAsIc YTpiYw".to_owned()),
        ("empty-secret", 1, "Basic YTo=".to_owned()),
        ("empty-id", 0, "Basic OnNlY3JldA==".to_owned()),
        ("no-separator", 3, "Basic YWJj".to_owned()),
        ("bad-escape", 1, "Basic YTolenp6".to_owned()),
        ("bearer", 0, "Bearer mF_9.B5f-4.1JqM".to_owned()),
        ("bad-base64", 0, "Basic !!!".to_owned()),
    ];
    for (name, split, header) in seeds {
        let mut data = vec![*split];
        data.extend_from_slice(header.as_bytes());
        write("basic_decode", name, &data);
    }
    assert_eq!(basic::decode(RFC_BASIC).unwrap().client_id, "s6BhdRkqt3");
}

fn cache_key() {
    let seeds: &[(&str, u8, &[&str])] = &[
        (
            "cognito-scopes",
            0x01,
            &[
                COGNITO,
                "1example23456789",
                "abcdef0123456789",
                "client_credentials",
                "resourceserver/read resourceserver/write",
            ],
        ),
        (
            "rfc-no-scope",
            0x0a,
            &["https://server.example.com/token", "s6BhdRkqt3", "7Fjfp0ZBr1KtDRbnfVdmIw", "client_credentials"],
        ),
        (
            "metadata-extra",
            0x85,
            &[COGNITO, "app", "s:3+c", "client_credentials", "api/read", "aws_client_metadata={\"tenant\":\"acme\"}"],
        ),
        (
            "audience-extra",
            0x45,
            &[
                "https://tenant.auth0.example/oauth/token",
                "abc",
                "secret",
                "client_credentials",
                "",
                "audience=https://api.example.com/",
                "resource=urn:x",
            ],
        ),
        ("move-id-secret", 0x0e, &["u", "client", "secret", "client_credentials", "b a a"]),
        ("move-upstream-id", 0x06, &["u", "c", "s", "g"]),
        ("duplicated-scopes", 0x44, &[COGNITO, "c", "s", "client_credentials", "z  a a  m"]),
        ("utf8", 0x12, &["https://idp.example/\u{e9}", "caf\u{e9}", "\u{20ac}\u{20ac}", "client_credentials", "x"]),
    ];
    for (name, op, fields) in seeds {
        let fields: Vec<&[u8]> = fields.iter().map(|f| f.as_bytes()).collect();
        write("cache_key", name, &joined(&[*op], &fields));
    }
}

fn unseal() {
    let target = Keys::derive(&[7u8; 32]).unwrap().sealer;
    let other_root = Keys::derive(&[42u8; 32]).unwrap().sealer;
    let entry = token(JWT).to_stored();
    let with_secret = |secret: &[u8], payload: &[u8]| {
        let mut data = vec![u8::try_from(secret.len()).unwrap()];
        data.extend_from_slice(secret);
        data.extend_from_slice(payload);
        data
    };
    // Values really sealed, but for another root, cache key or secret than the target opens with.
    let moved = target.seal(&CacheKey::from_bytes([2u8; 32]), b"secret", &entry);
    let wrong_secret = target.seal(&CacheKey::from_bytes([1u8; 32]), b"another-secret", &entry);
    let foreign = other_root.seal(&CacheKey::from_bytes([1u8; 32]), b"secret", &entry);
    // The known-answer value of shared::seal's tests: root [42; 32], key [1; 32], "secret".
    let known = hex_decode("6f000102030405060708090a0b3e81a5844eff6ad00af404f7f5792d97dd02335d3edc71aa8b0ac3");
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("moved-to-another-key", with_secret(b"secret", &moved)),
        ("sealed-for-another-secret", with_secret(b"secret", &wrong_secret)),
        ("sealed-with-another-root", with_secret(b"secret", &foreign)),
        ("known-answer-other-root", with_secret(b"secret", &known)),
        ("truncated", with_secret(b"secret", &moved[..moved.len() / 2])),
        ("header-only", with_secret(b"s", &moved[..13])),
        ("stored-entry-plaintext", with_secret(b"7Fjfp0ZBr1KtDRbnfVdmIw", &entry)),
        (
            "token-body-plaintext",
            with_secret(b"s", br#"{"access_token":"opaque-token","token_type":"Bearer","expires_in":3600}"#),
        ),
    ];
    for (name, data) in seeds {
        // The target asserts that none of these opens: check it here.
        let n = data[0];
        let (secret, payload) = data[1..].split_at(usize::from(n % 64).min(data.len() - 1));
        for (key, secret) in [([1u8; 32], secret), ([1u8; 32], &b"secret"[..]), ([n; 32], secret)] {
            assert!(target.open(&CacheKey::from_bytes(key), secret, payload).is_err(), "{name} opens");
        }
        write("unseal", name, &data);
    }
    assert!(target.open(&CacheKey::from_bytes([2u8; 32]), b"secret", &moved).is_ok());
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

const FRESH: Freshness = Freshness {
    expiry_margin: Duration::from_secs(60),
    min_token_ttl: Duration::from_secs(30),
    refresh_at: 0.75,
    max_lifetime: Duration::from_secs(86_400),
};

fn token(access_token: &str) -> CachedToken {
    let body = format!(
        r#"{{"access_token":"{access_token}","expires_in":3600,"token_type":"Bearer","scope":"resourceserver/read"}}"#
    );
    CachedToken::from_upstream(body.as_bytes(), Instant::now(), &FRESH).unwrap()
}

fn flight_message() {
    let now = Instant::now();
    let invalid_client = UpstreamResponse {
        status: StatusCode::BAD_REQUEST,
        body: Bytes::from_static(br#"{"error":"invalid_client"}"#),
        content_type: Some(HeaderValue::from_static("application/json;charset=UTF-8")),
        retry_after: None,
        www_authenticate: Some(HeaderValue::from_static("Basic realm=\"token\"")),
    };
    let unavailable = UpstreamResponse {
        status: StatusCode::SERVICE_UNAVAILABLE,
        body: Bytes::from_static(b"<html>busy</html>"),
        content_type: Some(HeaderValue::from_static("text/html")),
        retry_after: Some(HeaderValue::from_static("5")),
        www_authenticate: None,
    };
    // The clock the fuzz target decodes with.
    let clock =
        token_proxy::redis_clock::RedisClock::new(token_proxy::redis_clock::RedisTime(1_700_000_000_000_000), now);
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("token-jwt", flight_message::encode_token(&token(JWT), now, &clock)),
        ("token-opaque", flight_message::encode_token(&token("2YotnFZFEjr1zCsicMWpAA"), now, &clock)),
        ("relayed-invalid-client", flight_message::encode_relayed(&invalid_client)),
        ("bad-status-503", flight_message::encode_failure(&UpstreamFailure::BadStatus(unavailable))),
        ("timeout", flight_message::encode_failure(&UpstreamFailure::Unreachable(UpstreamError::Timeout))),
        ("connect", flight_message::encode_failure(&UpstreamFailure::Unreachable(UpstreamError::Connect))),
        ("bad-response", flight_message::encode_failure(&UpstreamFailure::Unreachable(UpstreamError::BadResponse))),
    ];
    for (name, data) in seeds {
        assert!(flight_message::decode(&data, now, &clock, &FRESH).is_some(), "{name}");
        write("flight_message", name, &data);
    }
}

fn normalize() {
    let limits = |allow| RequestLimits { max_header_bytes: 8192, max_body_bytes: 8192, allow_query_params: allow };
    let cognito_basic = basic::encode("1example23456789", "abcdef01234567890ghijklmnopqrstuvwxyz");
    // (name, flags, query, authorization, body, accepted as cacheable / pass-through / rejected)
    let seeds: &[(&str, u8, &str, &str, &str, &str)] = &[
        ("rfc-basic", 2, "", RFC_BASIC, "grant_type=client_credentials", "cacheable"),
        (
            "cognito-basic-scopes",
            2,
            "",
            &cognito_basic,
            "grant_type=client_credentials&scope=resourceserver%2Fread+resourceserver%2Fwrite",
            "cacheable",
        ),
        (
            "basic-with-body-client-id",
            2,
            "",
            RFC_BASIC,
            "grant_type=client_credentials&client_id=s6BhdRkqt3",
            "cacheable",
        ),
        (
            "body-credentials",
            0,
            "",
            "",
            "grant_type=client_credentials&client_id=s6BhdRkqt3&client_secret=7Fjfp0ZBr1KtDRbnfVdmIw&scope=b+a+a",
            "cacheable",
        ),
        (
            "metadata",
            0,
            "",
            "",
            "grant_type=client_credentials&client_id=app&client_secret=s%3A3%2Bc&aws_client_metadata=%7B%22tenant%22%3A%22acme%22%7D",
            "cacheable",
        ),
        ("query-compat", 5, "client_id=a&client_secret=b", "", "grant_type=client_credentials", "cacheable"),
        ("refresh-token", 0, "", "", "grant_type=refresh_token&refresh_token=tGzv3JOkF0XG5Qx2TlKWIA", "pass-through"),
        (
            "refresh-token-basic-query",
            7,
            "scope=x",
            RFC_BASIC,
            "grant_type=refresh_token&refresh_token=tGzv3JOkF0XG5Qx2TlKWIA",
            "pass-through",
        ),
        (
            "two-methods",
            2,
            "",
            RFC_BASIC,
            "grant_type=client_credentials&client_secret=7Fjfp0ZBr1KtDRbnfVdmIw",
            "rejected",
        ),
        ("other-body-client-id", 2, "", RFC_BASIC, "grant_type=client_credentials&client_id=other", "rejected"),
        ("query-refused", 1, "client_id=a&client_secret=b", "", "grant_type=client_credentials", "rejected"),
        ("bearer", 2, "", "Bearer mF_9.B5f-4.1JqM", "grant_type=client_credentials", "rejected"),
        (
            "bad-scope",
            0,
            "",
            "",
            "grant_type=client_credentials&client_id=a&client_secret=b&scope=caf%C3%A9",
            "rejected",
        ),
        ("no-secret", 0, "", "", "grant_type=client_credentials&client_id=a", "rejected"),
    ];
    for (name, flags, query, auth, body, expected) in seeds {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-www-form-urlencoded"));
        if flags & 2 != 0 {
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        }
        let query = (flags & 1 != 0).then_some(*query);
        let result =
            normalize::normalize(query, &headers, &Bytes::copy_from_slice(body.as_bytes()), &limits(flags & 4 != 0));
        let got = match result {
            Ok(TokenRequest::Cacheable(_)) => "cacheable",
            Ok(TokenRequest::PassThrough(_)) => "pass-through",
            Err(_) => "rejected",
        };
        assert_eq!(got, *expected, "{name}");
        write(
            "normalize",
            name,
            &joined(&[*flags], &[query.unwrap_or("").as_bytes(), auth.as_bytes(), body.as_bytes()]),
        );
    }
}

fn main() {
    form_parse();
    basic_decode();
    cache_key();
    unseal();
    flight_message();
    normalize();
    println!("seeds written under {}", Path::new("seeds").canonicalize().unwrap().display());
}
