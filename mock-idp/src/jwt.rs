//! Access tokens: RS256-signed JWTs with the claims Cognito puts in a client-credentials
//! access token.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;

use crate::keys::{KeyError, SigningKey};

/// The claims of one access token, named as in Cognito's tokens.
#[derive(Debug, Serialize)]
pub(crate) struct Claims<'a> {
    /// For client credentials the subject is the client itself.
    pub sub: &'a str,
    pub client_id: &'a str,
    /// Always `access`: the client-credentials grant issues no id token.
    pub token_use: &'static str,
    /// Granted scopes, space-separated.
    pub scope: &'a str,
    pub iss: &'a str,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Expiry, seconds since the Unix epoch: `iat` plus the token lifetime.
    pub exp: u64,
    /// Unique token id (128 random bits, hex), so two tokens are never equal.
    pub jti: &'a str,
    /// Cognito's access-token format version.
    pub version: u8,
    /// Cognito's `aws_client_metadata` request parameter, echoed so tests can see that it
    /// reached the token endpoint and changed the token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_metadata: Option<&'a str>,
}

#[derive(Serialize)]
struct Header<'a> {
    alg: &'static str,
    kid: &'a str,
    typ: &'static str,
}

/// Encodes and signs `claims`: `base64url(header).base64url(claims).base64url(signature)`.
pub(crate) fn encode(key: &SigningKey, claims: &Claims<'_>) -> Result<String, KeyError> {
    let header = Header { alg: "RS256", kid: key.kid(), typ: "JWT" };
    let mut token = segment(&header);
    token.push('.');
    token.push_str(&segment(claims));
    let signature = key.sign(token.as_bytes())?;
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(signature));
    Ok(token)
}

fn segment(value: &impl Serialize) -> String {
    // Serializing these plain structs of strings and integers cannot fail.
    let json = serde_json::to_vec(value).unwrap_or_default();
    URL_SAFE_NO_PAD.encode(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_segment(segment: &str) -> serde_json::Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(segment).unwrap()).unwrap()
    }

    #[test]
    fn token_has_the_cognito_header_and_claims() {
        let key = SigningKey::embedded();
        let claims = Claims {
            sub: "c",
            client_id: "c",
            token_use: "access",
            scope: "a/b c",
            iss: "http://localhost/mock-idp",
            iat: 1_700_000_000,
            exp: 1_700_003_600,
            jti: "00112233445566778899aabbccddeeff",
            version: 2,
            client_metadata: None,
        };
        let token = encode(&key, &claims).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(decode_segment(parts[0]), serde_json::json!({"alg": "RS256", "kid": key.kid(), "typ": "JWT"}));
        let body = decode_segment(parts[1]);
        assert_eq!(body["scope"], "a/b c");
        assert_eq!(body["exp"], 1_700_003_600);
        assert_eq!(body["version"], 2);
        assert!(body.get("client_metadata").is_none());
    }
}
