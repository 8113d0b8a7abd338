//! `token_proxy::normalize::normalize`: an HTTP request's query, `Authorization` header and body
//! turned into a token request or a rejection (docs/architecture.md, invariants 1 and 7).
//!
//! Input layout: `flags` byte, then query `0xFF` authorization `0xFF` body (the body may contain
//! `0xFF`). Flag bits: 1 = a query string is present, 2 = an `Authorization` header is present
//! (skipped if its bytes are not a valid header value), 4 = query parameters are allowed.
//!
//! Properties: never panics; a rejection is a 4xx and never quotes the client secret; a cacheable
//! request has a non-empty client id and secret, grant type `client_credentials`, a valid scope
//! set, no credential or grant parameter among its extras, and a `Debug` form that does not
//! depend on the secret;
//! and the same request sent with the other client-authentication method (Basic instead of body
//! credentials, or the reverse) normalizes to the same cache key (invariant 1).
#![no_main]

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use secrecy::{ExposeSecret, SecretString};
use shared::basic;
use shared::canonical::{AuthMethod, CanonicalRequest, MAX_SCOPES, Scope};
use shared::form::{self, Form, MAX_PARAMETERS};
use shared::keys::Keys;
use token_proxy::normalize::{self, RequestLimits, TokenRequest};
use token_proxy::response::Rejection;

const SEP: u8 = 0xFF;

fn headers(authorization: Option<HeaderValue>) -> HeaderMap {
    let mut map = HeaderMap::new();
    map.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-www-form-urlencoded"));
    if let Some(value) = authorization {
        map.insert(header::AUTHORIZATION, value);
    }
    map
}

fn cacheable(result: Result<TokenRequest, Rejection>) -> CanonicalRequest {
    match result {
        Ok(TokenRequest::Cacheable(request)) => request,
        Ok(TokenRequest::PassThrough(_)) => panic!("the other auth method made a pass-through request"),
        Err(rejection) => panic!("the other auth method was rejected: {}", rejection.description),
    }
}

/// The secrets the request carries (from the Basic header and from the body or query).
fn sent_secrets(authorization: Option<&HeaderValue>, body: &[u8], query: Option<&str>) -> Vec<String> {
    let mut secrets = Vec::new();
    if let Some(creds) = authorization.and_then(|v| v.to_str().ok()).and_then(|v| basic::decode(v).ok()) {
        secrets.extend(creds.client_secret.map(|s| s.expose_secret().to_owned()));
    }
    for part in [Some(body), query.map(str::as_bytes)].into_iter().flatten() {
        if let Ok(form) = Form::parse(part) {
            secrets.extend(form.get("client_secret").map(str::to_owned));
        }
    }
    secrets
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let mut parts = rest.splitn(3, |&b| b == SEP);
    let query_bytes = parts.next().unwrap_or_default();
    let auth_bytes = parts.next().unwrap_or_default();
    let body = Bytes::copy_from_slice(parts.next().unwrap_or_default());
    let query_text = String::from_utf8_lossy(query_bytes);
    let query = (flags & 1 != 0).then_some(&*query_text);
    let authorization = if flags & 2 != 0 {
        let Ok(value) = HeaderValue::from_bytes(auth_bytes) else { return };
        Some(value)
    } else {
        None
    };
    let limits = RequestLimits { max_header_bytes: 8192, max_body_bytes: 8192, allow_query_params: flags & 4 != 0 };
    let headers = headers(authorization.clone());

    let result = normalize::normalize(query, &headers, &body, &limits);
    let request = match result {
        Err(rejection) => {
            assert!(rejection.status.is_client_error(), "rejected with {}", rejection.status);
            // Secrets that no fixed message could contain (a character no description uses), and
            // not when the secret is also part of a parameter name (a repeated name is quoted).
            let names: Vec<String> = [Some(&body[..]), query.map(str::as_bytes)]
                .into_iter()
                .flatten()
                .flat_map(|p| p.split(|&b| b == b'&'))
                .map(|segment| {
                    let raw = segment.split(|&b| b == b'=').next().unwrap_or_default();
                    form::decode_component(raw).unwrap_or_else(|_| String::from_utf8_lossy(raw).into_owned())
                })
                .collect();
            for secret in sent_secrets(authorization.as_ref(), &body, query) {
                let distinctive = secret.chars().any(|c| !c.is_ascii() || "#$~^|\\{}<>!*@[]".contains(c));
                if distinctive && !names.iter().any(|n| n.contains(&secret)) {
                    assert!(!rejection.description.contains(&secret), "a rejection quotes the client secret");
                }
            }
            return;
        }
        Ok(TokenRequest::PassThrough(pass)) => {
            // Forwarded as sent: same Authorization, and a body that is a valid form.
            assert_eq!(pass.authorization, authorization);
            let forwarded = Form::parse(pass.form_body.as_bytes()).expect("a forwarded body parses");
            assert!(forwarded.get("grant_type").is_some_and(|g| g != "client_credentials"));
            return;
        }
        Ok(TokenRequest::Cacheable(request)) => request,
    };

    let secret = request.client_secret.expose_secret().to_owned();
    assert!(!request.client_id.is_empty() && !secret.is_empty());
    assert_eq!(request.grant_type, "client_credentials");
    if let Scope::Set(set) = &request.scope {
        assert!(!set.is_empty() && set.len() <= MAX_SCOPES);
        assert_eq!(Scope::parse(request.scope.to_param().as_deref()).as_ref(), Ok(&request.scope));
    }
    for name in ["grant_type", "client_id", "client_secret", "scope"] {
        assert!(!request.extra.contains_key(name), "{name} left among the extra parameters");
    }
    assert!(request.extra.iter().all(|(n, v)| !n.is_empty() && !v.is_empty()));
    let mut other_secret = request.clone();
    other_secret.client_secret = SecretString::from("another secret");
    assert_eq!(format!("{request:?}"), format!("{other_secret:?}"), "Debug shows the client secret");

    // The same request with the other authentication method: the same cache key.
    let scope = request.scope.to_param();
    let mut pairs: Vec<(&str, &str)> = vec![("grant_type", "client_credentials")];
    pairs.extend(scope.as_deref().map(|s| ("scope", s)));
    pairs.extend(request.extra.iter().map(|(n, v)| (n.as_str(), v.as_str())));
    if pairs.len() + 2 > MAX_PARAMETERS {
        // Only reachable with query parameters merged in: the body alone could not carry them.
        return;
    }
    let other = match request.auth_method {
        AuthMethod::Basic => {
            pairs.extend([("client_id", request.client_id.as_str()), ("client_secret", secret.as_str())]);
            let body = Bytes::from(form::encode_pairs(pairs));
            cacheable(normalize::normalize(None, &self::headers(None), &body, &limits))
        }
        AuthMethod::Body => {
            let header = HeaderValue::from_str(&basic::encode(&request.client_id, &secret)).expect("valid header");
            let body = Bytes::from(form::encode_pairs(pairs));
            cacheable(normalize::normalize(None, &self::headers(Some(header)), &body, &limits))
        }
    };
    assert_ne!(other.auth_method, request.auth_method);
    let hasher = Keys::derive(&[7u8; 32]).expect("valid root").hasher;
    let upstream = "https://idp.example/oauth2/token";
    assert_eq!(
        hasher.cache_key(upstream, &request),
        hasher.cache_key(upstream, &other),
        "Basic and body credentials for the same request got different keys"
    );
});
