//! The token endpoint's logic, free of any web framework: read a request, authenticate the
//! client, check the grant and scopes (Cognito's rules), and mint the access token.

use std::collections::HashMap;

use http::HeaderMap;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use ring::digest::{SHA256, digest};
use secrecy::{ExposeSecret, SecretString};
use shared::basic::{self, BasicError};
use shared::form::Form;
use shared::wire::OAuthError;

use crate::config::ClientConfig;
use crate::jwt::{self, Claims};
use crate::keys::SigningKey;

/// Why a token request is refused. Each variant is one OAuth error code (RFC 6749 §5.2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TokenError {
    #[error("invalid_request: {0}")]
    InvalidRequest(String),
    /// The reason is for the log only: like Cognito, the body says just `invalid_client`, so
    /// a caller cannot tell an unknown client from a wrong secret.
    #[error("invalid_client: {0}")]
    InvalidClient(&'static str),
    #[error("unsupported_grant_type")]
    UnsupportedGrantType,
    #[error("invalid_scope: `{0}` is not allowed for this client")]
    InvalidScope(String),
    /// Our own failure (randomness or signing), answered with 500.
    #[error("server_error: {0}")]
    Internal(&'static str),
}

impl TokenError {
    fn invalid_request(reason: impl Into<String>) -> TokenError {
        TokenError::InvalidRequest(reason.into())
    }

    /// Whether the caller is at fault (HTTP 400) rather than mock-idp (HTTP 500).
    pub(crate) fn is_client_error(&self) -> bool {
        !matches!(self, TokenError::Internal(_))
    }

    /// The JSON body sent to the caller.
    pub(crate) fn body(&self) -> OAuthError {
        match self {
            TokenError::InvalidRequest(reason) => OAuthError::new("invalid_request", reason.clone()),
            TokenError::InvalidClient(_) => OAuthError { error: "invalid_client".to_owned(), error_description: None },
            TokenError::UnsupportedGrantType => {
                OAuthError::new("unsupported_grant_type", "only client_credentials is supported")
            }
            TokenError::InvalidScope(scope) => {
                OAuthError::new("invalid_scope", format!("scope `{scope}` is not allowed for this client"))
            }
            TokenError::Internal(_) => OAuthError { error: "server_error".to_owned(), error_description: None },
        }
    }
}

/// A token request as read off the wire, before any check against the client list.
#[derive(Debug)]
pub(crate) struct TokenRequest {
    /// The client as named by Basic or by the body's `client_id`.
    client_id: String,
    secret: Option<SecretString>,
    form: Form,
}

impl TokenRequest {
    /// Reads the headers and body of a `POST /oauth2/token`. Refuses what RFC 6749 calls
    /// malformed: another content type, repeated parameters, two authentication methods.
    pub(crate) fn from_http(headers: &HeaderMap, body: &[u8]) -> Result<TokenRequest, TokenError> {
        let content_type = single_header(headers, CONTENT_TYPE)?;
        if !content_type.is_some_and(is_form_content_type) {
            return Err(TokenError::invalid_request("Content-Type must be application/x-www-form-urlencoded"));
        }
        let mut form = Form::parse(body).map_err(|err| TokenError::invalid_request(err.to_string()))?;
        let body_id = form.take("client_id");
        let body_secret = form.take("client_secret").map(SecretString::from);

        let Some(authorization) = single_header(headers, AUTHORIZATION)? else {
            // client_secret_post, RFC 6749 §2.3.1.
            return match (body_id, body_secret) {
                (Some(client_id), secret) => Ok(TokenRequest { client_id, secret, form }),
                (None, Some(_)) => Err(TokenError::invalid_request("client_secret without client_id")),
                (None, None) => Err(TokenError::InvalidClient("no client authentication")),
            };
        };
        let authorization =
            authorization.to_str().map_err(|_| TokenError::invalid_request("the Authorization header is not ASCII"))?;
        let basic = basic::decode(authorization).map_err(|err| match err {
            BasicError::NotBasic => TokenError::InvalidClient("unsupported authentication scheme"),
            other => TokenError::invalid_request(other.to_string()),
        })?;
        // RFC 6749 §2.3: one authentication method per request.
        if body_secret.is_some() {
            return Err(TokenError::invalid_request("client_secret in the body next to Basic authentication"));
        }
        if body_id.is_some_and(|id| id != basic.client_id) {
            return Err(TokenError::invalid_request("client_id in the body differs from the Basic client id"));
        }
        Ok(TokenRequest { client_id: basic.client_id, secret: basic.client_secret, form })
    }
}

/// What an authorized request may be given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Grant {
    pub client_id: String,
    /// Granted scopes, space-separated, in the order requested (or configured, when the
    /// request named none), without duplicates.
    pub scope: String,
    pub client_metadata: Option<String>,
}

/// A configured client, ready for authentication.
#[derive(Debug)]
struct Client {
    /// SHA-256 of the secret: comparing fixed-length digests leaks neither the secret's length
    /// nor where a guess first differs.
    secret_digest: [u8; 32],
    scopes: Vec<String>,
}

/// Authenticates clients and mints their tokens.
#[derive(Debug)]
pub(crate) struct TokenService {
    clients: HashMap<String, Client>,
    key: SigningKey,
    issuer: String,
}

impl TokenService {
    pub(crate) fn new(clients: &[ClientConfig], key: SigningKey, issuer: String) -> TokenService {
        let clients = clients
            .iter()
            .map(|c| {
                let client = Client { secret_digest: sha256(c.client_secret.as_bytes()), scopes: c.scopes.clone() };
                (c.client_id.clone(), client)
            })
            .collect();
        TokenService { clients, key, issuer }
    }

    pub(crate) fn key(&self) -> &SigningKey {
        &self.key
    }

    /// Applies Cognito's rules: the client must exist and prove its secret, the grant must be
    /// client_credentials, and every requested scope must be one of the client's.
    pub(crate) fn authorize(&self, request: TokenRequest) -> Result<Grant, TokenError> {
        let TokenRequest { client_id, secret, form } = request;
        let grant_type = form.get("grant_type").ok_or_else(|| TokenError::invalid_request("grant_type is missing"))?;

        let client = self.clients.get(&client_id).ok_or(TokenError::InvalidClient("unknown client"))?;
        let secret = secret.ok_or(TokenError::InvalidClient("no client_secret"))?;
        if !digests_equal(&client.secret_digest, &sha256(secret.expose_secret().as_bytes())) {
            return Err(TokenError::InvalidClient("wrong client_secret"));
        }

        if grant_type != "client_credentials" {
            return Err(TokenError::UnsupportedGrantType);
        }
        let scope = grant_scopes(&client.scopes, form.get("scope"))?;
        // Any other parameter is ignored, as Cognito does.
        Ok(Grant { client_id, scope, client_metadata: form.get("aws_client_metadata").map(str::to_owned) })
    }

    /// Signs an access token for `grant`, issued at `now` (Unix seconds).
    pub(crate) fn mint(&self, grant: &Grant, lifetime_secs: u64, now: u64) -> Result<String, TokenError> {
        let jti = random_id()?;
        let claims = Claims {
            sub: &grant.client_id,
            client_id: &grant.client_id,
            token_use: "access",
            scope: &grant.scope,
            iss: &self.issuer,
            iat: now,
            exp: now.saturating_add(lifetime_secs),
            jti: &jti,
            version: 2,
            client_metadata: grant.client_metadata.as_deref(),
        };
        jwt::encode(&self.key, &claims).map_err(|_| TokenError::Internal("signing failed"))
    }
}

/// 128 random bits in hex: token ids and cookie values.
pub(crate) fn random_id() -> Result<String, TokenError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|_| TokenError::Internal("the system has no randomness"))?;
    Ok(hex::encode(bytes))
}

/// The granted scopes: all of the client's when none is requested, else the requested ones,
/// each of which must be allowed.
fn grant_scopes(allowed: &[String], requested: Option<&str>) -> Result<String, TokenError> {
    let requested: Vec<&str> = requested.unwrap_or("").split(' ').filter(|s| !s.is_empty()).collect();
    if requested.is_empty() {
        return Ok(allowed.join(" "));
    }
    let mut granted: Vec<&str> = Vec::with_capacity(requested.len());
    for scope in requested {
        if !allowed.iter().any(|a| a == scope) {
            return Err(TokenError::InvalidScope(scope.to_owned()));
        }
        if !granted.contains(&scope) {
            granted.push(scope);
        }
    }
    Ok(granted.join(" "))
}

/// The value of a header that may appear at most once.
fn single_header(headers: &HeaderMap, name: http::HeaderName) -> Result<Option<&http::HeaderValue>, TokenError> {
    let mut values = headers.get_all(&name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(TokenError::invalid_request(format!("the {name} header is repeated")));
    }
    Ok(first)
}

/// `application/x-www-form-urlencoded`, optionally with `charset=utf-8` (the only charset the
/// form parser decodes).
fn is_form_content_type(value: &http::HeaderValue) -> bool {
    let Ok(value) = value.to_str() else { return false };
    let mut parts = value.split(';');
    let media_type = parts.next().unwrap_or("").trim();
    media_type.eq_ignore_ascii_case("application/x-www-form-urlencoded")
        && parts.map(str::trim).filter(|p| !p.is_empty()).all(|parameter| {
            parameter.split_once('=').is_some_and(|(name, value)| {
                name.trim().eq_ignore_ascii_case("charset")
                    && value.trim().trim_matches('"').eq_ignore_ascii_case("utf-8")
            })
        })
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

/// Compares without an early exit, so timing does not show how much of a guess was right.
fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn service() -> TokenService {
        TokenService::new(
            &[ClientConfig::new("app", "s3cret", &["api/read", "api/write"])],
            SigningKey::embedded(),
            "iss".to_owned(),
        )
    }

    fn headers(pairs: &[(http::HeaderName, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(name.clone(), HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn form_headers() -> HeaderMap {
        headers(&[(CONTENT_TYPE, "application/x-www-form-urlencoded")])
    }

    fn authorize(headers: &HeaderMap, body: &str) -> Result<Grant, TokenError> {
        service().authorize(TokenRequest::from_http(headers, body.as_bytes())?)
    }

    #[test]
    fn accepts_the_form_content_type_with_a_utf8_charset_only() {
        let ok = |v: &str| is_form_content_type(&HeaderValue::from_str(v).unwrap());
        assert!(ok("application/x-www-form-urlencoded"));
        assert!(ok("Application/X-WWW-Form-Urlencoded; charset=UTF-8"));
        assert!(ok("application/x-www-form-urlencoded;charset=\"utf-8\";"));
        assert!(!ok("application/json"));
        assert!(!ok("application/x-www-form-urlencoded; charset=latin1"));
        assert!(!ok("application/x-www-form-urlencoded; boundary=x"));
        assert!(!ok("application/x-www-form-urlencodedx"));
    }

    #[test]
    fn body_credentials_and_basic_credentials_are_equivalent() {
        let body = authorize(&form_headers(), "grant_type=client_credentials&client_id=app&client_secret=s3cret");
        let mut basic_headers = form_headers();
        basic_headers.insert(AUTHORIZATION, HeaderValue::from_str(&basic::encode("app", "s3cret")).unwrap());
        let basic = authorize(&basic_headers, "grant_type=client_credentials&client_id=app");
        assert_eq!(body.unwrap(), basic.unwrap());
    }

    #[test]
    fn two_authentication_methods_are_refused() {
        let mut h = form_headers();
        h.insert(AUTHORIZATION, HeaderValue::from_str(&basic::encode("app", "s3cret")).unwrap());
        let both = authorize(&h, "grant_type=client_credentials&client_secret=s3cret");
        assert!(matches!(both, Err(TokenError::InvalidRequest(_))), "{both:?}");
        let other_id = authorize(&h, "grant_type=client_credentials&client_id=other");
        assert!(matches!(other_id, Err(TokenError::InvalidRequest(_))), "{other_id:?}");
    }

    #[test]
    fn authentication_failures_are_invalid_client() {
        let cases = [
            "grant_type=client_credentials&client_id=app&client_secret=wrong",
            "grant_type=client_credentials&client_id=app",
            "grant_type=client_credentials&client_id=nobody&client_secret=s3cret",
            "grant_type=client_credentials",
        ];
        for body in cases {
            let result = authorize(&form_headers(), body);
            assert!(matches!(result, Err(TokenError::InvalidClient(_))), "{body}: {result:?}");
        }
        let mut bearer = form_headers();
        bearer.insert(AUTHORIZATION, HeaderValue::from_static("Bearer abc"));
        assert!(matches!(authorize(&bearer, "grant_type=client_credentials"), Err(TokenError::InvalidClient(_))));
    }

    #[test]
    fn malformed_requests_are_invalid_request() {
        let cases: [(HeaderMap, &str); 5] = [
            (headers(&[(CONTENT_TYPE, "application/json")]), "grant_type=client_credentials"),
            (HeaderMap::new(), "grant_type=client_credentials"),
            (form_headers(), "grant_type=client_credentials&grant_type=client_credentials"),
            (form_headers(), "client_id=app&client_secret=s3cret"),
            (form_headers(), "grant_type=client_credentials&client_secret=s3cret"),
        ];
        for (h, body) in cases {
            let result = authorize(&h, body);
            assert!(matches!(result, Err(TokenError::InvalidRequest(_))), "{body}: {result:?}");
        }
        let mut twice = form_headers();
        twice.append(AUTHORIZATION, HeaderValue::from_str(&basic::encode("app", "s3cret")).unwrap());
        twice.append(AUTHORIZATION, HeaderValue::from_str(&basic::encode("app", "s3cret")).unwrap());
        assert!(matches!(authorize(&twice, "grant_type=client_credentials"), Err(TokenError::InvalidRequest(_))));
    }

    #[test]
    fn scopes_follow_cognito_rules() {
        let base = "grant_type=client_credentials&client_id=app&client_secret=s3cret";
        let scope = |extra: &str| authorize(&form_headers(), &format!("{base}{extra}")).map(|g| g.scope);
        assert_eq!(scope(""), Ok("api/read api/write".to_owned()));
        assert_eq!(scope("&scope="), Ok("api/read api/write".to_owned()));
        assert_eq!(scope("&scope=api%2Fwrite"), Ok("api/write".to_owned()));
        assert_eq!(scope("&scope=api/write+api/read+api/write"), Ok("api/write api/read".to_owned()));
        assert_eq!(scope("&scope=api/read+api/admin"), Err(TokenError::InvalidScope("api/admin".to_owned())));
    }

    #[test]
    fn other_grants_are_unsupported_once_the_client_is_known() {
        let body = "grant_type=authorization_code&client_id=app&client_secret=s3cret&code=x";
        assert_eq!(authorize(&form_headers(), body), Err(TokenError::UnsupportedGrantType));
    }

    #[test]
    fn error_bodies_never_tell_why_authentication_failed() {
        let body = TokenError::InvalidClient("wrong client_secret").body();
        assert_eq!(serde_json::to_string(&body).unwrap(), r#"{"error":"invalid_client"}"#);
    }
}
