//! # mock-idp: a Cognito-compatible token server for tests. NOT FOR PRODUCTION.
//!
//! It issues real RS256 JWTs signed with a key whose private half is in this repository, keeps
//! no audit trail, and has an unauthenticated admin API that injects failures. It exists so
//! that token-proxy can be run locally, tested and load-tested without Amazon Cognito.
//!
//! It speaks Cognito's `POST /oauth2/token` for the client-credentials grant: client
//! authentication by HTTP Basic (`client_secret_basic`) or in the body (`client_secret_post`),
//! scopes per client (an omitted `scope` means all of the client's), errors as HTTP 400 with
//! `{"error": "..."}`. It also serves `GET /.well-known/jwks.json` and `GET /healthz`, counts
//! what it receives and issues (and, for leak tests, can keep every token it issues:
//! [`MockIdp::issued_tokens`]), and injects latency, failures, hangs and dropped connections
//! on request, in-process through [`MockIdp`] or over HTTP:
//!
//! - `GET /admin/stats`: `{"requests_total": N, "issued_total": N, "issued": {"client": n}}`
//! - `GET /admin/faults`, `POST /admin/faults` with any of `{"latency_ms": u64,
//!   "fail_next": {"count": n, "status": 503}, "hang_next": n, "drop_next": n,
//!   "token_lifetime_secs": u64}` (only the fields given change)
//! - `POST /admin/reset`: counters zeroed, faults cleared
//!
//! ```no_run
//! # async fn example() -> std::io::Result<()> {
//! use mock_idp::{ClientConfig, Config};
//!
//! let server = mock_idp::spawn(Config::for_tests(vec![ClientConfig::new("app", "secret", &["api/read"])])).await?;
//! server.idp.fail_next(1, 503);
//! // ... point the proxy at server.token_url() ...
//! assert_eq!(server.idp.requests_total(), 0);
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - `config`: [`Config`] and [`ClientConfig`], read from `MOCK_IDP_*` variables by
//!   [`Config::from_lookup`].
//! - `keys`: the RS256 [`SigningKey`] (embedded development key by default), its `kid` and JWK.
//! - `jwt`: the access token's claims and their signed encoding.
//! - `token`: the token endpoint's rules, framework-free: request parsing, client
//!   authentication, grant and scope checks, minting.
//! - `faults`: latency and the one-shot failure, hang and drop faults.
//! - `stats`: the counters of requests and issued tokens.
//! - `idp`: [`MockIdp`], the shared state and the in-process control API.
//! - `handlers`: the HTTP routes and the mapping of outcomes to responses.
//! - `admin`: the admin API (`/admin/stats`, `/admin/faults`, `/admin/reset`).
//! - `connection`: TCP connections a handler can cut, for dropped-connection faults.
//! - `server`: [`serve`] on a bound listener, or [`spawn`] a background [`RunningMockIdp`].

#![forbid(unsafe_code)]

mod admin;
mod config;
mod connection;
mod faults;
mod handlers;
mod idp;
mod jwt;
mod keys;
mod server;
mod stats;
mod token;

pub use config::{
    ClientConfig, Config, ConfigError, DEFAULT_ISSUER, DEFAULT_LISTEN, DEFAULT_SCOPES, DEFAULT_TOKEN_LIFETIME,
};
pub use idp::MockIdp;
pub use keys::{KeyError, SigningKey};
pub use server::{RunningMockIdp, serve, spawn};
