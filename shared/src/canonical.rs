//! A client-credentials request reduced to exactly what determines the token it yields.
//!
//! Two requests with equal [`CanonicalRequest`]s must be interchangeable at the token endpoint,
//! and two that differ in anything the endpoint looks at must differ here (docs/architecture.md, invariant 1).
//! So the credentials are kept however they were sent (Basic or body), scope is a set (order and
//! duplicates do not matter, but an omitted scope is distinct from any explicit one), and every
//! other parameter, known or not (Cognito's `aws_client_metadata`, Auth0's `audience`, ...), is
//! part of the request. The same values are what the proxy forwards upstream.

use std::collections::{BTreeMap, BTreeSet};

use secrecy::{ExposeSecret, SecretString};

/// Most distinct scopes in one request.
pub const MAX_SCOPES: usize = 64;

/// The scope of a request: omitted (the endpoint grants the client's defaults) or a set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Omitted,
    Set(BTreeSet<String>),
}

impl Scope {
    /// Parses a `scope` parameter (RFC 6749 §3.3: space-delimited, case-sensitive). Runs of
    /// spaces are tolerated; an empty or all-space value equals an omitted scope.
    pub fn parse(value: Option<&str>) -> Result<Scope, ScopeError> {
        let Some(value) = value else { return Ok(Scope::Omitted) };
        let set: BTreeSet<String> = value.split(' ').filter(|s| !s.is_empty()).map(str::to_owned).collect();
        if set.len() > MAX_SCOPES {
            return Err(ScopeError::TooMany);
        }
        if set.iter().any(|s| s.chars().any(|c| !is_scope_char(c))) {
            return Err(ScopeError::InvalidCharacter);
        }
        Ok(if set.is_empty() { Scope::Omitted } else { Scope::Set(set) })
    }

    /// The value to send upstream: sorted, deduplicated, single spaces.
    pub fn to_param(&self) -> Option<String> {
        match self {
            Scope::Omitted => None,
            Scope::Set(set) => Some(set.iter().map(String::as_str).collect::<Vec<_>>().join(" ")),
        }
    }
}

/// RFC 6749 §3.3: `scope-token = 1*( %x21 / %x23-5B / %x5D-7E )`.
fn is_scope_char(c: char) -> bool {
    matches!(c, '\x21' | '\x23'..='\x5b' | '\x5d'..='\x7e')
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("too many scopes (at most {MAX_SCOPES})")]
    TooMany,
    #[error("scope contains a character RFC 6749 does not allow")]
    InvalidCharacter,
}

/// How the client authenticated. Part of what is forwarded, not of the key: Basic and body
/// credentials for the same client share one cache entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// `client_secret_basic`
    Basic,
    /// `client_secret_post`
    Body,
}

/// A cacheable token request.
#[derive(Debug, Clone)]
pub struct CanonicalRequest {
    pub client_id: String,
    pub client_secret: SecretString,
    pub auth_method: AuthMethod,
    pub grant_type: String,
    pub scope: Scope,
    /// Every other non-empty parameter, by name.
    pub extra: BTreeMap<String, String>,
}

// Field tags of the canonical encoding. Never reuse or renumber one: cache keys depend on them.
const TAG_UPSTREAM: u8 = 1;
const TAG_CLIENT_ID: u8 = 2;
const TAG_CLIENT_SECRET: u8 = 3;
const TAG_GRANT_TYPE: u8 = 4;
const TAG_SCOPE_OMITTED: u8 = 5;
const TAG_SCOPE_SET: u8 = 6;
const TAG_EXTRA: u8 = 7;
const TAG_PURGE: u8 = 8;

/// Purge generations that apply to a request: every purge bumps one, which changes the key of
/// every entry it covers (so they are never found again and expire by TTL).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PurgeEpochs {
    /// Bumped by "purge everything".
    pub all: u64,
    /// Bumped by a purge of this client.
    pub client: u64,
    /// Bumped by a purge of this client and scope.
    pub scope: u64,
}

/// Where a canonical encoding goes: a buffer, or straight into a hash (no copy).
pub trait CanonicalSink {
    fn put(&mut self, bytes: &[u8]);
}

impl CanonicalSink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

impl CanonicalRequest {
    /// Writes the unambiguous encoding that the cache key is computed over: a version prefix,
    /// then each field as `tag, u32 length, bytes` (collections as `tag, u32 count, items`), so
    /// no two different requests can encode alike, whatever bytes their fields contain.
    pub fn encode(&self, upstream: &str, out: &mut impl CanonicalSink) {
        out.put(b"token-proxy/canonical/v1");
        field(out, TAG_UPSTREAM, upstream.as_bytes());
        field(out, TAG_CLIENT_ID, self.client_id.as_bytes());
        field(out, TAG_CLIENT_SECRET, self.client_secret.expose_secret().as_bytes());
        field(out, TAG_GRANT_TYPE, self.grant_type.as_bytes());
        match &self.scope {
            Scope::Omitted => out.put(&[TAG_SCOPE_OMITTED]),
            Scope::Set(set) => {
                count(out, TAG_SCOPE_SET, set.len());
                for scope in set {
                    bytes(out, scope.as_bytes());
                }
            }
        }
        count(out, TAG_EXTRA, self.extra.len());
        for (name, value) in &self.extra {
            bytes(out, name.as_bytes());
            bytes(out, value.as_bytes());
        }
    }

    /// [`CanonicalRequest::encode`] followed by the purge epochs, if any purge ever applied
    /// (so keys from before the first purge stay as they were).
    pub fn encode_with(&self, upstream: &str, epochs: PurgeEpochs, out: &mut impl CanonicalSink) {
        self.encode(upstream, out);
        if epochs != PurgeEpochs::default() {
            out.put(&[TAG_PURGE]);
            for epoch in [epochs.all, epochs.client, epochs.scope] {
                out.put(&epoch.to_be_bytes());
            }
        }
    }
}

fn field(out: &mut impl CanonicalSink, tag: u8, value: &[u8]) {
    out.put(&[tag]);
    bytes(out, value);
}

fn count(out: &mut impl CanonicalSink, tag: u8, n: usize) {
    out.put(&[tag]);
    out.put(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
}

fn bytes(out: &mut impl CanonicalSink, value: &[u8]) {
    // Inputs are bounded far below 4 GiB by the request size limits.
    out.put(&u32::try_from(value.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.put(value);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_is_a_set() {
        let a = Scope::parse(Some("b a  a")).unwrap();
        let b = Scope::parse(Some("a b")).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_param().as_deref(), Some("a b"));
    }

    #[test]
    fn empty_scope_is_omitted() {
        assert_eq!(Scope::parse(Some("  ")).unwrap(), Scope::Omitted);
        assert_eq!(Scope::parse(None).unwrap(), Scope::Omitted);
    }

    #[test]
    fn scope_refuses_bad_characters_and_excess() {
        assert_eq!(Scope::parse(Some("a\"b")), Err(ScopeError::InvalidCharacter));
        assert_eq!(Scope::parse(Some("caf\u{e9}")), Err(ScopeError::InvalidCharacter));
        let many: Vec<String> = (0..=MAX_SCOPES).map(|i| format!("s{i}")).collect();
        assert_eq!(Scope::parse(Some(&many.join(" "))), Err(ScopeError::TooMany));
    }
}
