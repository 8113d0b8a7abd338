//! `shared::basic::decode` on arbitrary UTF-8 header values (docs/architecture.md, invariant 7, RFC 6749
//! §2.3.1).
//!
//! Properties: never panics, whether given the header value as is or after a `Basic ` prefix (so
//! the fuzzer spends its time inside the base64 and form decoding); accepted credentials have a
//! non-empty client id and, when present, a non-empty secret, and re-encoding them decodes to the
//! same credentials. Round trip: the input split into id and secret at a point chosen by its
//! first byte comes back unchanged from `decode(&encode(id, secret))`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use secrecy::ExposeSecret;
use shared::basic::{self, BasicCredentials};

fn secret(creds: &BasicCredentials) -> Option<&str> {
    creds.client_secret.as_ref().map(|s| s.expose_secret())
}

fn check_decoded(header: &str) {
    let Ok(creds) = basic::decode(header) else { return };
    assert!(!creds.client_id.is_empty());
    assert!(secret(&creds).is_none_or(|s| !s.is_empty()), "an empty secret must be absent");
    let again = basic::decode(&basic::encode(&creds.client_id, secret(&creds).unwrap_or("")))
        .expect("re-encoded credentials decode");
    assert_eq!(again.client_id, creds.client_id);
    assert_eq!(secret(&again), secret(&creds));
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };

    check_decoded(text);
    check_decoded(&format!("Basic {text}"));

    // Round trip: id = text[..at], secret = text[at..], at the char boundary at or below `split`.
    let mut at = usize::from(split).min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let (id, secret_part) = text.split_at(at);
    if id.is_empty() {
        return;
    }
    let header = basic::encode(id, secret_part);
    assert!(header.starts_with("Basic "));
    let creds = basic::decode(&header).expect("encoded credentials decode");
    assert_eq!(creds.client_id, id);
    assert_eq!(secret(&creds), (!secret_part.is_empty()).then_some(secret_part));
});
