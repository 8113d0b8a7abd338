//! Cache keys: `Keys::derive(&[7; 32]).hasher.cache_key(upstream, request)` (docs/architecture.md,
//! invariant 1).
//!
//! Input layout (readable seeds): `op` byte, then fields separated by `0xFF` (a byte UTF-8 never
//! contains): upstream, client_id, client_secret, grant_type, scope, then `name=value` extras.
//! A missing or empty scope field is `Scope::Omitted`; otherwise the scope is the set of its
//! space-separated tokens, taken as they are (the encoder must be injective for any content, not
//! only for what `Scope::parse` lets through).
//!
//! Properties: the key is deterministic (twice, and from a cloned hasher); a request differing
//! in exactly one token-affecting field (chosen by `op`), or with bytes moved across a field
//! boundary, gets a different key, and the canonical encodings differ too; switching between
//! Basic and body credentials keeps the key; a valid scope string with its tokens reordered,
//! duplicated and padded with spaces keeps the key.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use libfuzzer_sys::fuzz_target;
use secrecy::{ExposeSecret, SecretString};
use shared::canonical::{AuthMethod, CanonicalRequest, Scope};
use shared::keys::{KeyHasher, Keys};

const SEP: u8 = 0xFF;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn secret(request: &CanonicalRequest) -> String {
    request.client_secret.expose_secret().to_owned()
}

fn encoding(upstream: &str, request: &CanonicalRequest) -> Vec<u8> {
    let mut out = Vec::new();
    request.encode(upstream, &mut out);
    out
}

/// Asserts that `(ub, b)` gets a different key (and encoding) from `(ua, a)`.
fn assert_differs(hasher: &KeyHasher, ua: &str, a: &CanonicalRequest, ub: &str, b: &CanonicalRequest, what: &str) {
    assert_ne!(encoding(ua, a), encoding(ub, b), "{what}: canonical encodings collide");
    assert_ne!(hasher.cache_key(ua, a), hasher.cache_key(ub, b), "{what}: cache keys collide");
}

fuzz_target!(|data: &[u8]| {
    let Some((&op, rest)) = data.split_first() else { return };
    let mut fields = rest.split(|&b| b == SEP);
    let upstream = text(fields.next().unwrap_or_default());
    let client_id = text(fields.next().unwrap_or_default());
    let client_secret = text(fields.next().unwrap_or_default());
    let grant_type = text(fields.next().unwrap_or_default());
    let scope_text = fields.next().map(text).unwrap_or_default();
    let scope = if scope_text.is_empty() {
        Scope::Omitted
    } else {
        Scope::Set(scope_text.split(' ').map(str::to_owned).collect())
    };
    let extra: BTreeMap<String, String> = fields
        .map(|f| {
            let f = text(f);
            match f.split_once('=') {
                Some((n, v)) => (n.to_owned(), v.to_owned()),
                None => (f, String::new()),
            }
        })
        .collect();
    let request = CanonicalRequest {
        client_id,
        client_secret: SecretString::from(client_secret),
        auth_method: if op & 0x80 == 0 { AuthMethod::Basic } else { AuthMethod::Body },
        grant_type,
        scope,
        extra,
    };

    let hasher = Keys::derive(&[7u8; 32]).expect("32 bytes is long enough").hasher;
    let key = hasher.cache_key(&upstream, &request);
    assert_eq!(key, hasher.cache_key(&upstream, &request), "cache key is not deterministic");
    assert_eq!(key, hasher.clone().cache_key(&upstream, &request.clone()), "a cloned hasher differs");

    // The credential method is not part of the key.
    let mut other_method = request.clone();
    other_method.auth_method = match request.auth_method {
        AuthMethod::Basic => AuthMethod::Body,
        AuthMethod::Body => AuthMethod::Basic,
    };
    assert_eq!(key, hasher.cache_key(&upstream, &other_method), "auth method changed the key");

    // Scope order, duplicates and runs of spaces do not matter (for scopes Scope::parse accepts).
    if let Ok(parsed) = Scope::parse(Some(&scope_text))
        && let Scope::Set(set) = &parsed
    {
        let tokens: Vec<&str> = set.iter().map(String::as_str).collect();
        let mut shuffled: Vec<&str> = tokens.iter().rev().copied().collect();
        shuffled.push(tokens[usize::from(op) % tokens.len()]);
        let n = shuffled.len();
        shuffled.rotate_left(usize::from(op) % n);
        let reparsed = Scope::parse(Some(&format!("  {}  ", shuffled.join("   ")))).expect("same tokens parse");
        assert_eq!(reparsed, parsed);
        let a = CanonicalRequest { scope: parsed, ..request.clone() };
        let b = CanonicalRequest { scope: reparsed, ..request.clone() };
        assert_eq!(hasher.cache_key(&upstream, &a), hasher.cache_key(&upstream, &b));
    }

    // One field changed: a different key. `suffix` makes every changed string differ.
    let suffix = char::from(b'!' + (op >> 3) % 90);
    let mut changed = request.clone();
    let mut changed_upstream = upstream.clone();
    let what = match op % 7 {
        0 => {
            changed_upstream.push(suffix);
            "upstream"
        }
        1 => {
            changed.client_id.push(suffix);
            "client_id"
        }
        2 => {
            changed.client_secret = SecretString::from(format!("{}{suffix}", secret(&request)));
            "client_secret"
        }
        3 => {
            changed.grant_type.push(suffix);
            "grant_type"
        }
        4 => {
            changed.scope = match &request.scope {
                Scope::Omitted => Scope::Set(BTreeSet::new()),
                Scope::Set(set) => {
                    let mut set = set.clone();
                    let longest = set.iter().max_by_key(|s| s.len()).cloned().unwrap_or_default();
                    if op & 0x40 == 0 && set.len() > 1 {
                        set.remove(&longest);
                    } else {
                        set.insert(format!("{longest}{suffix}"));
                    }
                    Scope::Set(set)
                }
            };
            "scope"
        }
        5 => {
            let longest = request.extra.keys().max_by_key(|s| s.len()).cloned().unwrap_or_default();
            if op & 0x40 == 0 && !request.extra.is_empty() {
                changed.extra.get_mut(&longest).expect("present").push(suffix);
            } else {
                changed.extra.insert(format!("{longest}{suffix}"), String::new());
            }
            "extra"
        }
        _ => {
            // Move the first character of one field to the end of the field before it.
            let moved = |from: &str, into: &str| -> Option<(String, String)> {
                let c = from.chars().next()?;
                Some((format!("{into}{c}"), from[c.len_utf8()..].to_owned()))
            };
            match (op >> 3) % 3 {
                0 => {
                    let Some((u, id)) = moved(&request.client_id, &upstream) else { return };
                    changed_upstream = u;
                    changed.client_id = id;
                }
                1 => {
                    let Some((id, s)) = moved(&secret(&request), &request.client_id) else { return };
                    changed.client_id = id;
                    changed.client_secret = SecretString::from(s);
                }
                _ => {
                    let Some((s, g)) = moved(&request.grant_type, &secret(&request)) else { return };
                    changed.client_secret = SecretString::from(s);
                    changed.grant_type = g;
                }
            }
            "moved bytes"
        }
    };
    assert_differs(&hasher, &upstream, &request, &changed_upstream, &changed, what);
});
