//! The OAuth error codes this proxy answers with itself (RFC 6749 §5.2, and the admin API's).
//! A module of their own, below everything that answers, so that no two modules import each
//! other to name one.

/// The error codes this proxy answers with itself (RFC 6749 §5.2, and the admin API's), in
/// `{"error": ..., "error_description": ...}` bodies. The upstream's own errors are relayed as
/// they came and never pass through this type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidRequest,
    InvalidClient,
    InvalidScope,
    /// The caller's source address may not call (`TOKEN_PROXY_ALLOWED_NETWORKS`).
    AccessDenied,
    ServerError,
    TemporarilyUnavailable,
    /// Admin API: a missing or wrong bearer token.
    Unauthorized,
    /// Admin API: off (no admin token configured).
    NotFound,
    /// Admin API: the bound on remembered client purges is reached.
    TooManyPurges,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidClient => "invalid_client",
            ErrorCode::InvalidScope => "invalid_scope",
            ErrorCode::AccessDenied => "access_denied",
            ErrorCode::ServerError => "server_error",
            ErrorCode::TemporarilyUnavailable => "temporarily_unavailable",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NotFound => "not_found",
            ErrorCode::TooManyPurges => "too_many_purges",
        }
    }
}
