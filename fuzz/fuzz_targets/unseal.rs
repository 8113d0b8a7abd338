//! Unsealing cache entries: `Sealer::open` (docs/architecture.md, invariant 4).
//!
//! Input layout: `n` byte, then `n % 64` bytes of client secret, then the payload.
//!
//! Properties:
//! - opening the payload as if it were a stored value never panics and never succeeds (the
//!   fuzzer cannot forge an AES-GCM tag; values really sealed for these keys cannot be in its
//!   input, since every seal draws a fresh random nonce and those values never reach the fuzzer);
//! - sealing the payload as a plaintext and opening it with the same cache key and secret gives
//!   it back; the sealed value has the documented layout and shows neither plaintext nor secret;
//! - that sealed value fails to open with one bit flipped, truncated, under another cache key
//!   (moved in Redis), with another secret, or with another root secret.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use shared::keys::{CacheKey, Keys};
use shared::seal::{OVERHEAD, OpenError, Sealer};

static SEALER: LazyLock<Sealer> = LazyLock::new(|| Keys::derive(&[7u8; 32]).expect("valid root").sealer);
static OTHER: LazyLock<Sealer> = LazyLock::new(|| Keys::derive(&[8u8; 32]).expect("valid root").sealer);

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else { return };
    let (secret, payload) = rest.split_at(usize::from(n % 64).min(rest.len()));
    let sealer = &*SEALER;
    let key = CacheKey::from_bytes([1u8; 32]);

    // Arbitrary bytes as a stored value: a miss, never a panic, never a success.
    for (key, secret) in [(key, secret), (key, &b"secret"[..]), (CacheKey::from_bytes([n; 32]), secret)] {
        match sealer.open(&key, secret, payload) {
            Ok(_) => panic!("opened a value that seal did not produce"),
            Err(OpenError::Truncated) => assert!(payload.len() < OVERHEAD),
            Err(OpenError::UnknownKey(id)) => assert_ne!(id, sealer.key_id()),
            Err(OpenError::Rejected) => {}
        }
    }

    // Round trip, with the payload as the plaintext.
    let sealed = sealer.seal(&key, secret, payload);
    assert_eq!(sealed.len(), OVERHEAD + payload.len());
    assert_eq!(sealed[0], sealer.key_id());
    assert_eq!(sealer.open(&key, secret, &sealed).as_deref(), Ok(payload), "seal then open lost the plaintext");
    if payload.len() >= 16 {
        assert!(!contains(&sealed, payload), "plaintext readable in the sealed value");
    }
    if secret.len() >= 16 {
        assert!(!contains(&sealed, secret), "secret readable in the sealed value");
    }

    // Tampering, moving and the wrong keys are all misses.
    let bit = (usize::from(n) * 131 + payload.len() * 7 + secret.len()) % (sealed.len() * 8);
    let mut flipped = sealed.clone();
    flipped[bit / 8] ^= 1 << (bit % 8);
    assert!(sealer.open(&key, secret, &flipped).is_err(), "a flipped bit ({bit}) was not noticed");
    let cut = (usize::from(n) + payload.len()) % sealed.len();
    assert!(sealer.open(&key, secret, &sealed[..cut]).is_err(), "truncation to {cut} was not noticed");
    let mut moved = *key.as_bytes();
    moved[usize::from(n) % 32] ^= 1 << (n % 8);
    assert!(sealer.open(&CacheKey::from_bytes(moved), secret, &sealed).is_err(), "opened under another key");
    let mut other_secret = secret.to_vec();
    other_secret.push(n);
    assert!(sealer.open(&key, &other_secret, &sealed).is_err(), "opened with another secret");
    assert!(OTHER.open(&key, secret, &sealed).is_err(), "opened with another root secret");
});
