//! Redis refusing this replica, as opposed to Redis being away: a TLS handshake that fails (a
//! certificate not signed by a trusted CA, or not for the host; a client certificate required
//! or not trusted) or a login refused (`WRONGPASS`, `NOAUTH`). Retrying cannot cure these, and
//! without this module they showed only as command timeouts.
//!
//! Every connection of the store (fred's command and subscription clients, the hit-read
//! connection) reports here. A cause is logged once, as one line naming the server and the
//! cause, when it starts (a second connection refused for the same cause adds nothing), and once
//! when Redis accepts again. While a refusal lasts the store counts as down (`/readyz`), and
//! while the command connection is refused its commands fail at once instead of waiting for
//! their deadline: requests go on without Redis. fred keeps reconnecting by itself (and says
//! when it succeeds); the hit-read connection retries on the next read after its backoff, so
//! reads are never held back here, or a refused read connection could never find out that
//! Redis accepts it again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use fred::error::{Error, ErrorKind};

/// One of the store's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Link {
    Commands,
    Subscription,
    Reads,
    /// The IAM token's credentials (`iam.rs`): without them no connection can log in.
    Credentials,
    /// The periodic re-authentication of fred's connections with a new IAM token: refused, the
    /// connections still serve (Redis keeps their login) but a new one could not log in.
    Reauthentication,
}

/// Why Redis refuses us. Carries no secret: a TLS error's kind or an error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The TLS handshake failed, or the server ended the session with an alert.
    Tls(String),
    /// The login was refused: `WRONGPASS`, `NOAUTH`.
    Auth(String),
    /// No IAM token could be made: no AWS credentials, or their source failed (the cause, which
    /// names no secret).
    Credentials(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Tls(cause) => write!(f, "TLS failed: {}", tls_hint(cause)),
            Refusal::Auth(code) => write!(
                f,
                "the login was refused ({code}): wrong user or password (with IAM: the user, cache name or region, \
                 or the role lacks elasticache:Connect / memorydb:Connect on the cache and the user)"
            ),
            Refusal::Credentials(cause) => write!(f, "no IAM token: {cause}"),
        }
    }
}

/// A TLS error (rustls's own words, e.g. `InvalidCertificate(UnknownIssuer)`) with what it
/// usually means for Redis.
fn tls_hint(cause: &str) -> String {
    let hint = if cause.contains("UnknownIssuer") {
        "the server's certificate is not signed by a CA this replica trusts (the Redis CA file, or the system's roots)"
    } else if cause.contains("NotValidForName") {
        "the server's certificate is not valid for the host name or address connected to"
    } else if cause.contains("Expired") {
        "the server's certificate has expired"
    } else if cause.contains("CertificateRequired") || cause.contains("HandshakeFailure") {
        "the server requires a client certificate (mTLS), and none was presented"
    } else if cause.contains("UnknownCA") || cause.contains("BadCertificate") || cause.contains("DecryptError") {
        "the server does not accept this replica's client certificate"
    } else if cause.contains("InvalidContentType") || cause.contains("CorruptMessage") {
        "the server does not speak TLS on that port"
    } else {
        "the TLS handshake or session failed"
    };
    format!("{hint} ({cause})")
}

impl Refusal {
    /// The refusal a fred connection error stands for, if it is one; `tls` says whether the
    /// connection speaks TLS (an I/O error can only be a TLS one then).
    pub(crate) fn of_fred(error: &Error, tls: bool) -> Option<Refusal> {
        let details = error.details();
        match error.kind() {
            ErrorKind::Auth => Some(Refusal::Auth(first_word(details))),
            ErrorKind::Tls => Some(Refusal::Tls(details.to_owned())),
            // fred keeps an I/O error's `Debug`: rustls's errors come inside one, as
            // `Custom { kind: InvalidData, error: InvalidCertificate(UnknownIssuer) }`.
            ErrorKind::IO if tls && details.contains("InvalidData") => {
                let cause = details.split_once("error: ").map_or(details, |(_, rest)| rest);
                Some(Refusal::Tls(cause.trim_end_matches([' ', '}']).to_owned()))
            }
            _ => None,
        }
    }

    /// The refusal a login reply's error code stands for, if it is one.
    pub(crate) fn of_code(code: &str) -> Option<Refusal> {
        matches!(code, "WRONGPASS" | "NOAUTH").then(|| Refusal::Auth(code.to_owned()))
    }
}

fn first_word(text: &str) -> String {
    text.split_whitespace().next().unwrap_or("refused").to_owned()
}

/// The refusals of the store's connections, and their log lines.
#[derive(Debug)]
pub(crate) struct Refusals {
    /// `host:port` of the server (the first named in the URL), for the log lines.
    server: String,
    current: Mutex<HashMap<Link, Refusal>>,
    /// Whether `current` holds anything: read without the lock.
    any: AtomicBool,
    /// Whether the command connection is refused: read on every command, without the lock.
    commands: AtomicBool,
}

impl Refusals {
    pub(crate) fn new(server: String) -> Refusals {
        Refusals {
            server,
            current: Mutex::new(HashMap::new()),
            any: AtomicBool::new(false),
            commands: AtomicBool::new(false),
        }
    }

    /// Whether Redis refuses the command connection now: its commands would only time out.
    pub(crate) fn refuses_commands(&self) -> bool {
        self.commands.load(Ordering::Relaxed)
    }

    /// Whether Redis refuses any of the store's connections now.
    pub(crate) fn any(&self) -> bool {
        self.any.load(Ordering::Relaxed)
    }

    /// `link` was refused for `refusal`. Logged when no connection was refused for that cause.
    pub(crate) fn refused(&self, link: Link, refusal: Refusal) {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let known = current.values().any(|r| *r == refusal);
        current.insert(link, refusal.clone());
        self.any.store(true, Ordering::Relaxed);
        self.commands.store(current.contains_key(&Link::Commands), Ordering::Relaxed);
        drop(current);
        if !known {
            match refusal {
                Refusal::Credentials(_) => tracing::error!(
                    server = %self.server,
                    "Redis cannot be logged in to: {refusal}; requests go on without Redis until a token can be made"
                ),
                _ => tracing::error!(
                    server = %self.server,
                    "Redis refuses this replica's connections: {refusal}; requests go on without Redis until it accepts them"
                ),
            }
        }
    }

    /// `link` connected. Logged when it was the last connection refused.
    pub(crate) fn accepted(&self, link: Link) {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let removed = current.remove(&link).is_some();
        self.commands.store(current.contains_key(&Link::Commands), Ordering::Relaxed);
        if removed && current.is_empty() {
            self.any.store(false, Ordering::Relaxed);
            drop(current);
            tracing::info!(server = %self.server, "Redis accepts this replica's connections again");
        }
    }

    /// What Redis refuses now, if anything.
    pub(crate) fn current(&self) -> Option<Refusal> {
        let current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        [Link::Credentials, Link::Commands, Link::Subscription, Link::Reads, Link::Reauthentication]
            .iter()
            .find_map(|link| current.get(link).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fred_errors_are_classified_by_cause() {
        let io = Error::new(ErrorKind::IO, "Custom { kind: InvalidData, error: InvalidCertificate(UnknownIssuer) }");
        assert_eq!(Refusal::of_fred(&io, true), Some(Refusal::Tls("InvalidCertificate(UnknownIssuer)".into())));
        let plain =
            Error::new(ErrorKind::IO, "Custom { kind: InvalidData, error: \"stream did not contain valid UTF-8\" }");
        assert_eq!(Refusal::of_fred(&plain, false), None, "no TLS, no TLS refusal");
        let auth = Error::new(ErrorKind::Auth, "WRONGPASS invalid username-password pair or user is disabled.");
        assert_eq!(Refusal::of_fred(&auth, false), Some(Refusal::Auth("WRONGPASS".into())));
        let refused = Error::new(ErrorKind::IO, "Os { code: 111, kind: ConnectionRefused, message: \"refused\" }");
        assert_eq!(Refusal::of_fred(&refused, true), None, "Redis away is not Redis refusing");
        assert_eq!(Refusal::of_fred(&Error::new(ErrorKind::Timeout, "Request timed out."), true), None);
        assert_eq!(Refusal::of_code("NOAUTH"), Some(Refusal::Auth("NOAUTH".into())));
        assert_eq!(Refusal::of_code("WRONGTYPE"), None);
        let shown = Refusal::Tls("InvalidCertificate(UnknownIssuer)".into()).to_string();
        assert!(shown.contains("not signed by a CA this replica trusts"), "{shown}");
    }

    #[test]
    fn a_refusal_lasts_until_every_refused_link_is_accepted() {
        let refusals = Refusals::new("cache:6380".into());
        assert_eq!(refusals.current(), None);
        refusals.refused(Link::Commands, Refusal::Auth("WRONGPASS".into()));
        refusals.refused(Link::Subscription, Refusal::Auth("WRONGPASS".into()));
        assert!(refusals.refuses_commands());
        refusals.accepted(Link::Commands);
        assert!(!refusals.refuses_commands(), "the command connection is back");
        assert_eq!(refusals.current(), Some(Refusal::Auth("WRONGPASS".into())));
        assert!(refusals.any());
        refusals.accepted(Link::Subscription);
        assert_eq!(refusals.current(), None);
        assert!(!refusals.any());
        refusals.accepted(Link::Reads);
        assert_eq!(refusals.current(), None);
    }
}
