//! JSON bodies of the token endpoint (RFC 6749 §5.1 and §5.2), as Cognito sends them.

use serde::{Deserialize, Serialize};

/// An OAuth error body: `{"error": "...", "error_description": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OAuthError {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_description: Option<String>,
}

impl OAuthError {
    pub fn new(error: &str, description: impl Into<String>) -> OAuthError {
        OAuthError { error: error.to_owned(), error_description: Some(description.into()) }
    }

    /// Serializes to JSON bytes (cannot fail for this shape).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_else(|_| br#"{"error":"server_error"}"#.to_vec())
    }
}

/// A successful token response. Fields other than the three required ones are kept as they came.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: String,
    pub expires_in: u64,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// Never print a token.
impl std::fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenResponse")
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}
