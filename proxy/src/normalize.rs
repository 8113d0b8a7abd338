//! Turns an HTTP request into a [`TokenRequest`], or refuses it (docs/architecture.md, invariant 7).
//!
//! The rules are RFC 6749's, applied strictly because whatever two requests share a cache key
//! must be interchangeable: one client-authentication method per request (§2.3), Basic
//! credentials form-urlencoded inside (§2.3.1), no repeated parameters and empty = absent
//! (§3.2), `application/x-www-form-urlencoded` only. A refused request never reaches the cache
//! or the upstream. Refusals never quote a credential.

use std::collections::BTreeMap;

use bytes::Bytes;
use http::StatusCode;
use http::header::{self, HeaderMap, HeaderValue};
use secrecy::SecretString;
use shared::basic;
use shared::canonical::{AuthMethod, CanonicalRequest, Scope};
use shared::form::{self, Form, FormError};

use crate::response::{ErrorCode, Rejection};

/// Longest `scope` parameter accepted, in bytes.
pub const MAX_SCOPE_BYTES: usize = 2048;

/// The grant whose responses are cached.
const CLIENT_CREDENTIALS: &str = "client_credentials";

/// Request limits from the configuration.
#[derive(Debug, Clone)]
pub struct RequestLimits {
    pub max_header_bytes: usize,
    pub max_body_bytes: usize,
    pub allow_query_params: bool,
}

/// A valid token request.
#[derive(Debug)]
pub enum TokenRequest {
    /// `client_credentials`: answered from the cache when possible.
    Cacheable(CanonicalRequest),
    /// Any other grant: forwarded as the client sent it, never cached.
    PassThrough(PassThrough),
}

/// A request forwarded without caching.
pub struct PassThrough {
    pub form_body: String,
    pub authorization: Option<HeaderValue>,
    /// The client whose secret the request presents (Basic, or `client_id` with
    /// `client_secret` in the body). The upstream checks that secret whatever the grant, so
    /// its verdict counts against the failed-authentication throttle like any other; `None`
    /// when no secret is presented (nothing to guess).
    pub client_id: Option<String>,
}

/// The body and header carry credentials: never print them.
impl std::fmt::Debug for PassThrough {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PassThrough")
            .field("form_body_len", &self.form_body.len())
            .field("authorization", &self.authorization.is_some())
            .field("client_id", &self.client_id.is_some())
            .finish()
    }
}

/// Checks the request head before the body is read. One pass over the headers: each
/// `HeaderMap` lookup hashes its name, and a hit's head has only a handful of headers.
pub fn check_head(headers: &HeaderMap, limits: &RequestLimits) -> Result<(), Rejection> {
    let mut transfer_encodings = Seen::default();
    let mut authorizations = Seen::default();
    let mut content_types = Seen::default();
    let mut content_lengths = Seen::default();
    let mut header_bytes = 0;
    for (name, value) in headers {
        header_bytes += name.as_str().len() + value.len() + 4;
        let seen = match *name {
            header::TRANSFER_ENCODING => &mut transfer_encodings,
            header::AUTHORIZATION => &mut authorizations,
            header::CONTENT_TYPE => &mut content_types,
            header::CONTENT_LENGTH => &mut content_lengths,
            _ => continue,
        };
        seen.count += 1;
        seen.first = seen.first.or(Some(value));
    }
    // hyper refuses conflicting Content-Lengths and, given Content-Length with
    // Transfer-Encoding, frames by the latter and closes the connection (RFC 9112 §6.1). It does
    // accept a repeated Transfer-Encoding (`chunked, chunked`), and a list ending in chunked
    // (`gzip, chunked`) whose other codings it ignores, which another hop may read differently:
    // only exactly `chunked` is accepted here. tests/api/raw_socket.rs holds both to it.
    if let Some(coding) = transfer_encodings.first {
        let exactly_chunked = coding.to_str().is_ok_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
        if !exactly_chunked || transfer_encodings.count > 1 {
            return Err(Rejection::ambiguous_framing());
        }
    }
    // Two of either would be taken first-wins here, and may be read otherwise by another hop
    // or by the upstream: which client, which body format, is not a guess to make.
    if authorizations.count > 1 {
        return Err(Rejection::invalid_request("more than one Authorization header"));
    }
    if content_types.count > 1 {
        return Err(Rejection::invalid_request("more than one Content-Type header"));
    }
    if header_bytes > limits.max_header_bytes {
        return Err(Rejection::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ErrorCode::InvalidRequest,
            "request headers are too large",
        ));
    }
    let content_type = content_types
        .first
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Rejection::invalid_request("Content-Type must be application/x-www-form-urlencoded"))?;
    if !is_form_content_type(content_type) {
        return Err(Rejection::invalid_request("Content-Type must be application/x-www-form-urlencoded"));
    }
    let declared_length = content_lengths.first.and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared_length.is_some_and(|n| n > limits.max_body_bytes) {
        return Err(body_too_large());
    }
    Ok(())
}

/// How often a header came, and its first value.
#[derive(Default)]
struct Seen<'a> {
    count: usize,
    first: Option<&'a HeaderValue>,
}

pub fn body_too_large() -> Rejection {
    Rejection::new(StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::InvalidRequest, "request body is too large")
}

/// `application/x-www-form-urlencoded`, optionally with `charset=utf-8`; nothing else.
fn is_form_content_type(value: &str) -> bool {
    let mut parts = value.split(';').map(str::trim);
    if !parts.next().is_some_and(|essence| essence.eq_ignore_ascii_case("application/x-www-form-urlencoded")) {
        return false;
    }
    parts.all(|param| match param.split_once('=') {
        Some((name, value)) => {
            name.trim().eq_ignore_ascii_case("charset") && value.trim().trim_matches('"').eq_ignore_ascii_case("utf-8")
        }
        None => param.is_empty(),
    })
}

fn form_rejection(error: FormError) -> Rejection {
    Rejection::invalid_request(error.to_string())
}

/// Normalizes a request whose head passed [`check_head`].
pub fn normalize(
    query: Option<&str>,
    headers: &HeaderMap,
    body: &Bytes,
    limits: &RequestLimits,
) -> Result<TokenRequest, Rejection> {
    let mut form = Form::parse(body).map_err(form_rejection)?;
    let mut merged_query = false;
    if let Some(query) = query.filter(|q| !q.is_empty()) {
        if !limits.allow_query_params {
            return Err(Rejection::invalid_request("parameters in the query string are not accepted"));
        }
        for (name, value) in Form::parse(query.as_bytes()).map_err(form_rejection)?.into_pairs() {
            form.insert(name, value).map_err(form_rejection)?;
        }
        // The limit holds for the body and the query together.
        if form.len() > form::MAX_PARAMETERS {
            return Err(form_rejection(FormError::TooManyParameters));
        }
        merged_query = true;
    }

    let authorization = headers.get(header::AUTHORIZATION);
    let basic = match authorization {
        None => None,
        Some(value) => {
            let value = value.to_str().map_err(|_| Rejection::invalid_request("malformed Authorization header"))?;
            Some(basic::decode(value).map_err(|e| Rejection::invalid_request(e.to_string()))?)
        }
    };

    let grant_type = form.take("grant_type").ok_or_else(|| Rejection::invalid_request("grant_type is required"))?;
    if grant_type != CLIENT_CREDENTIALS {
        // Validated like any other request, then forwarded as it came.
        if basic.is_some() && form.get("client_secret").is_some() {
            return Err(two_methods());
        }
        let client_id = match &basic {
            Some(basic) => basic.client_secret.as_ref().map(|_| basic.client_id.clone()),
            None => form.get("client_secret").and(form.get("client_id")).map(str::to_owned),
        };
        let form_body = if merged_query {
            let mut pairs = vec![("grant_type", grant_type.as_str())];
            pairs.extend(form.iter());
            form::encode_pairs(pairs)
        } else {
            String::from_utf8(body.to_vec()).map_err(|_| form_rejection(FormError::NotUtf8))?
        };
        return Ok(TokenRequest::PassThrough(PassThrough {
            form_body,
            authorization: authorization.cloned(),
            client_id,
        }));
    }

    let body_id = form.take("client_id");
    let body_secret = form.take("client_secret");
    let (client_id, client_secret, auth_method) = match basic {
        Some(basic) => {
            if body_secret.is_some() {
                return Err(two_methods());
            }
            // Cognito accepts a body client_id equal to the Basic one, and common client
            // libraries send it; a different one is ambiguous.
            if body_id.as_ref().is_some_and(|id| *id != basic.client_id) {
                return Err(Rejection::invalid_request("client_id in the body differs from the Basic credentials"));
            }
            let secret = basic.client_secret.ok_or_else(client_authentication_required)?;
            (basic.client_id, secret, AuthMethod::Basic)
        }
        None => match (body_id, body_secret) {
            (Some(id), Some(secret)) => (id, SecretString::from(secret), AuthMethod::Body),
            _ => return Err(client_authentication_required()),
        },
    };

    let scope_param = form.take("scope");
    if scope_param.as_ref().is_some_and(|s| s.len() > MAX_SCOPE_BYTES) {
        return Err(Rejection::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidScope, "scope is too long"));
    }
    let scope = Scope::parse(scope_param.as_deref())
        .map_err(|e| Rejection::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidScope, e.to_string()))?;
    // Everything else can change the token (e.g. Cognito's aws_client_metadata): keyed and forwarded.
    let extra: BTreeMap<String, String> = form.into_pairs().into_iter().collect();
    Ok(TokenRequest::Cacheable(CanonicalRequest { client_id, client_secret, auth_method, grant_type, scope, extra }))
}

fn two_methods() -> Rejection {
    Rejection::invalid_request("use one client authentication method: Basic or body credentials, not both")
}

fn client_authentication_required() -> Rejection {
    Rejection::new(
        StatusCode::UNAUTHORIZED,
        ErrorCode::InvalidClient,
        "client_credentials requires client_id and client_secret (Basic or in the body)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    const LIMITS: RequestLimits =
        RequestLimits { max_header_bytes: 8192, max_body_bytes: 8192, allow_query_params: false };

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-www-form-urlencoded"));
        for (name, value) in pairs {
            map.insert(header::HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn cacheable(query: Option<&str>, headers: &HeaderMap, body: &str, limits: &RequestLimits) -> CanonicalRequest {
        match normalize(query, headers, &Bytes::copy_from_slice(body.as_bytes()), limits).unwrap() {
            TokenRequest::Cacheable(r) => r,
            other => panic!("not cacheable: {other:?}"),
        }
    }

    fn rejected(headers: &HeaderMap, body: &str) -> Rejection {
        normalize(None, headers, &Bytes::copy_from_slice(body.as_bytes()), &LIMITS).unwrap_err()
    }

    #[test]
    fn basic_and_body_credentials_normalize_alike() {
        let basic = cacheable(
            None,
            &headers(&[("authorization", &basic::encode("app", "s:3+c"))]),
            "grant_type=client_credentials&scope=b+a",
            &LIMITS,
        );
        let body = cacheable(
            None,
            &headers(&[]),
            "grant_type=client_credentials&client_id=app&client_secret=s%3A3%2Bc&scope=a+b",
            &LIMITS,
        );
        assert_eq!(basic.auth_method, AuthMethod::Basic);
        assert_eq!(body.auth_method, AuthMethod::Body);
        assert_eq!(basic.client_id, body.client_id);
        assert_eq!(basic.client_secret.expose_secret(), body.client_secret.expose_secret());
        assert_eq!(basic.scope, body.scope);
    }

    #[test]
    fn basic_with_matching_body_client_id_is_accepted() {
        let r = cacheable(
            None,
            &headers(&[("authorization", &basic::encode("app", "s"))]),
            "grant_type=client_credentials&client_id=app",
            &LIMITS,
        );
        assert_eq!(r.client_id, "app");
        assert!(r.extra.is_empty());
    }

    #[test]
    fn ambiguous_credentials_are_refused() {
        let auth = basic::encode("app", "s");
        let h = headers(&[("authorization", &auth)]);
        assert_eq!(rejected(&h, "grant_type=client_credentials&client_secret=s").error, ErrorCode::InvalidRequest);
        assert_eq!(rejected(&h, "grant_type=client_credentials&client_id=other").error, ErrorCode::InvalidRequest);
        assert_eq!(
            rejected(&headers(&[]), "grant_type=client_credentials&client_id=app").error,
            ErrorCode::InvalidClient
        );
        assert_eq!(
            rejected(&headers(&[("authorization", "Bearer x")]), "grant_type=client_credentials").error,
            ErrorCode::InvalidRequest
        );
    }

    #[test]
    fn extra_parameters_are_keyed() {
        let r = cacheable(
            None,
            &headers(&[]),
            "grant_type=client_credentials&client_id=a&client_secret=b&aws_client_metadata=%7B%7D",
            &LIMITS,
        );
        assert_eq!(r.extra.get("aws_client_metadata").map(String::as_str), Some("{}"));
    }

    #[test]
    fn query_parameters_only_in_compatibility_mode() {
        let h = headers(&[]);
        let body = Bytes::from_static(b"grant_type=client_credentials");
        let err = normalize(Some("client_id=a&client_secret=b"), &h, &body, &LIMITS).unwrap_err();
        assert_eq!(err.error, ErrorCode::InvalidRequest);
        let compat = RequestLimits { allow_query_params: true, ..LIMITS };
        let r = cacheable(Some("client_id=a&client_secret=b"), &h, "grant_type=client_credentials", &compat);
        assert_eq!(r.client_id, "a");
        let err = normalize(Some("grant_type=x"), &h, &body, &compat).unwrap_err();
        assert!(err.description.contains("repeated"));
    }

    #[test]
    fn the_parameter_limit_covers_body_and_query_together() {
        let compat = RequestLimits { allow_query_params: true, ..LIMITS };
        let body: Vec<String> = (0..30).map(|i| format!("b{i}=1")).collect();
        let query: Vec<String> = (0..30).map(|i| format!("q{i}=1")).collect();
        let body = Bytes::from(format!("grant_type=client_credentials&{}", body.join("&")));
        let err = normalize(Some(&query.join("&")), &headers(&[]), &body, &compat).unwrap_err();
        assert!(err.description.contains("too many"), "{err:?}");
    }

    #[test]
    fn pass_through_requests_never_print_credentials() {
        let body = Bytes::from_static(b"grant_type=refresh_token&refresh_token=abc&client_id=hunter2");
        let h = headers(&[("authorization", "Basic aHVudGVyMjpodW50ZXIy")]);
        let request = normalize(None, &h, &body, &LIMITS).unwrap();
        let printed = format!("{request:?}");
        assert!(!printed.contains("hunter2") && !printed.contains("aHVudGVy") && !printed.contains("abc"), "{printed}");
    }

    #[test]
    fn other_grants_pass_through_unchanged() {
        let body = Bytes::from_static(b"grant_type=refresh_token&refresh_token=abc&client_id=x");
        match normalize(None, &headers(&[]), &body, &LIMITS).unwrap() {
            TokenRequest::PassThrough(p) => assert_eq!(p.form_body.as_bytes(), &body[..]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn head_checks() {
        assert!(check_head(&headers(&[]), &LIMITS).is_ok());
        for ct in
            ["application/x-www-form-urlencoded; charset=UTF-8", "Application/X-WWW-Form-Urlencoded;charset=\"utf-8\""]
        {
            assert!(is_form_content_type(ct), "{ct}");
        }
        for ct in [
            "application/json",
            "application/x-www-form-urlencoded; charset=latin1",
            "multipart/form-data",
            "text/plain",
        ] {
            assert!(!is_form_content_type(ct), "{ct}");
        }
        let mut no_type = headers(&[]);
        no_type.remove(header::CONTENT_TYPE);
        assert_eq!(check_head(&no_type, &LIMITS).unwrap_err().status, StatusCode::BAD_REQUEST);
        let big = headers(&[("x-padding", &"a".repeat(9000))]);
        assert_eq!(check_head(&big, &LIMITS).unwrap_err().status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        let long = headers(&[("content-length", "9000")]);
        assert_eq!(check_head(&long, &LIMITS).unwrap_err().status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[test]
    fn repeated_credentials_or_content_types_and_codings_other_than_chunked_are_refused() {
        let with = |name: header::HeaderName, values: &[&str]| {
            let mut map = headers(&[]);
            map.remove(&name);
            for value in values {
                map.append(&name, HeaderValue::from_str(value).unwrap());
            }
            check_head(&map, &LIMITS)
        };
        let form = "application/x-www-form-urlencoded";
        for (name, values) in [
            (header::AUTHORIZATION, &["Basic YTpi", "Basic YzpkZA=="][..]),
            (header::AUTHORIZATION, &["Basic YTpi", "Basic YTpi"]),
            (header::CONTENT_TYPE, &[form, form]),
            (header::TRANSFER_ENCODING, &["gzip, chunked"]),
            (header::TRANSFER_ENCODING, &["chunked", "chunked"]),
            (header::TRANSFER_ENCODING, &["identity"]),
        ] {
            let refusal = with(name.clone(), values).unwrap_err();
            assert_eq!((refusal.status, refusal.error), (StatusCode::BAD_REQUEST, ErrorCode::InvalidRequest), "{name}");
        }
        assert!(with(header::TRANSFER_ENCODING, &[" Chunked "]).is_ok());
        assert!(with(header::AUTHORIZATION, &["Basic YTpi"]).is_ok());
    }

    #[test]
    fn other_grants_name_the_client_whose_secret_they_present() {
        let client_of = |h: &HeaderMap, body: &'static str| {
            let request = normalize(None, h, &Bytes::from_static(body.as_bytes()), &LIMITS);
            match request {
                Ok(TokenRequest::PassThrough(p)) => p.client_id,
                other => panic!("{other:?}"),
            }
        };
        let refresh = "grant_type=refresh_token&refresh_token=r";
        let basic = headers(&[("authorization", &basic::encode("app", "s"))]);
        assert_eq!(client_of(&basic, refresh).as_deref(), Some("app"));
        let body = "grant_type=refresh_token&refresh_token=r&client_id=app&client_secret=s";
        assert_eq!(client_of(&headers(&[]), body).as_deref(), Some("app"));
        // No secret presented: nothing to guess.
        assert_eq!(client_of(&headers(&[]), "grant_type=refresh_token&refresh_token=r&client_id=app"), None);
        assert_eq!(client_of(&headers(&[("authorization", "Basic YXBwOg==")]), refresh), None); // "app:"
    }

    #[test]
    fn rejections_never_quote_credentials() {
        let h = headers(&[("authorization", "Basic aHVudGVyMg==")]); // "hunter2", no colon
        let err = rejected(&h, "grant_type=client_credentials");
        assert!(!err.description.contains("hunter2") && !err.description.contains("aHVudGVyMg"));
        let err = rejected(&headers(&[]), "grant_type=client_credentials&client_secret=hunter2&client_secret=x");
        assert!(!err.description.contains("hunter2"));
    }
}
