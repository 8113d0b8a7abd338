//! Cost of the per-request cryptography on the cache path.
//!
//! - `keys/derive`: deriving the index and seal keys from the root secret (once per process).
//! - `keys/cache_key`: the keyed hash of a typical Cognito client-credentials request
//!   (every request pays it, hit or miss).
//! - `seal/seal_1k`, `seal/open_1k`: AES-256-GCM with a per-entry HKDF key over a ~1,000-byte
//!   token response (every Redis write, and every hit that reads Redis).
//!
//! Run with `cargo bench -p token-proxy-shared --bench key_and_seal`.

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use secrecy::{ExposeSecret, SecretString};
use shared::canonical::{AuthMethod, CanonicalRequest, Scope};
use shared::keys::Keys;

const ROOT: &[u8; 32] = b"0123456789abcdef0123456789abcdef";
const UPSTREAM: &str = "https://example-domain.auth.eu-west-1.amazoncognito.com/oauth2/token";
/// Cognito app client ids are 26 characters, their secrets 52.
const CLIENT_ID: &str = "4f1l2k3j4h5g6f7d8s9a0q1w2e";
const CLIENT_SECRET: &str = "1abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmno";

fn cognito_request() -> CanonicalRequest {
    assert_eq!(CLIENT_ID.len(), 26);
    assert_eq!(CLIENT_SECRET.len(), 52);
    CanonicalRequest {
        client_id: CLIENT_ID.into(),
        client_secret: SecretString::from(CLIENT_SECRET),
        auth_method: AuthMethod::Basic,
        grant_type: "client_credentials".into(),
        scope: Scope::parse(Some("orders/read orders/write")).expect("valid scopes"),
        extra: BTreeMap::new(),
    }
}

/// A token response shaped like Cognito's: an RS256 JWT access token of typical size.
fn token_response() -> Vec<u8> {
    let header = "eyJraWQiOiJ2d2Q1c2pqb1pRb2hZc2N0bGxzZ1hWQ0V0b2Q0S1Z2WWZ0b2hOZkVCb1ZvPSIsImFsZyI6IlJTMjU2In0";
    // Claims as Cognito issues them for client credentials (base64url of ~380 bytes of JSON).
    let claims = "A".repeat(506);
    // RS256 signature: 256 bytes, base64url without padding.
    let signature = "s".repeat(342);
    let body =
        format!("{{\"access_token\":\"{header}.{claims}.{signature}\",\"expires_in\":3600,\"token_type\":\"Bearer\"}}");
    body.into_bytes()
}

fn keys(c: &mut Criterion) {
    let mut group = c.benchmark_group("keys");
    group.bench_function("derive", |b| b.iter(|| Keys::derive(black_box(ROOT)).expect("long enough")));

    let keys = Keys::derive(ROOT).expect("long enough");
    let request = cognito_request();
    group.bench_function("cache_key", |b| b.iter(|| keys.hasher.cache_key(black_box(UPSTREAM), black_box(&request))));
    group.finish();
}

fn seal(c: &mut Criterion) {
    let keys = Keys::derive(ROOT).expect("long enough");
    let request = cognito_request();
    let key = keys.hasher.cache_key(UPSTREAM, &request);
    let secret = request.client_secret.expose_secret().as_bytes();
    let plaintext = token_response();
    let sealed = keys.sealer.seal(&key, secret, &plaintext);
    assert_eq!(keys.sealer.open(&key, secret, &sealed).expect("opens"), plaintext);

    let mut group = c.benchmark_group("seal");
    group.throughput(Throughput::Bytes(plaintext.len() as u64));
    group.bench_function(format!("seal_{}B", plaintext.len()), |b| {
        b.iter(|| keys.sealer.seal(black_box(&key), black_box(secret), black_box(&plaintext)))
    });
    group.bench_function(format!("open_{}B", plaintext.len()), |b| {
        b.iter(|| keys.sealer.open(black_box(&key), black_box(secret), black_box(&sealed)).expect("opens"))
    });
    group.finish();
}

criterion_group!(benches, keys, seal);
criterion_main!(benches);
