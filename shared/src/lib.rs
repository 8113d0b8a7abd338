//! Code shared by `token-proxy` and `mock-idp`.
//!
//! # Layout
//!
//! - [`form`]: strict `application/x-www-form-urlencoded` parsing and encoding (RFC 6749 §3.2).
//! - [`basic`]: HTTP Basic client authentication with RFC 6749 §2.3.1 encoding.
//! - [`wire`]: the JSON bodies of the token endpoint.
//! - [`canonical`]: a client-credentials request reduced to what determines its token.
//! - [`keys`]: the keys derived from the root secret, and the cache key of a request.
//! - [`seal`]: AES-256-GCM sealing of cached responses, bound to their cache key.

#![forbid(unsafe_code)]

pub mod basic;
pub mod canonical;
pub mod form;
pub mod keys;
pub mod seal;
pub mod wire;
