//! The whole-suite leak check: every client secret and access token of this process, and every
//! form in which they must never show up in logs, panics, metrics, response bodies or Redis
//! (docs/architecture.md, invariant 4).
//!
//! `client()` and `spawn_idp()` register client secrets, `proxy_config()` secret settings, and
//! tokens come from the record of every mock-idp `spawn_idp()` started, including tokens the test
//! never saw. The harness checks by itself: every response `read()` reads, the metrics and the
//! new log lines whenever a `TestProxy` stops or is dropped, and a `SAVE`d RDB file plus every
//! key and value whenever a `RedisServer` is dropped.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use mock_idp::MockIdp;

use super::canaries::{Canaries, MIN_CANARY_LEN, leak_forms};
use super::logs::capture;

/// The process-wide registry of canaries.
pub(super) struct Registry {
    canaries: Canaries,
    /// A secret value → its canary and the clients (or settings) that use it.
    secrets: HashMap<String, (usize, Vec<String>)>,
    tokens: usize,
    /// Clients whose secret is too short to scan for.
    short: BTreeSet<String>,
    /// Every mock-idp started by `spawn_idp`, and how many of its tokens are registered.
    pub(super) idps: Vec<(MockIdp, usize)>,
    /// How much of the capture buffer has been scanned.
    logs_scanned_to: usize,
    checks: usize,
    bytes_scanned: usize,
}

pub(super) fn registry() -> MutexGuard<'static, Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    capture();
    REGISTRY
        .get_or_init(|| {
            Mutex::new(Registry {
                canaries: Canaries::new(),
                secrets: HashMap::new(),
                tokens: 0,
                short: BTreeSet::new(),
                idps: Vec::new(),
                logs_scanned_to: 0,
                checks: 0,
                bytes_scanned: 0,
            })
        })
        .lock()
        // A panic is only ever raised after the lock is released.
        .unwrap_or_else(PoisonError::into_inner)
}

impl Registry {
    /// Registers a secret used by `owner` (a client id, or a setting's name).
    pub(super) fn secret(&mut self, owner: String, secret: &str, what: impl Fn(&str) -> String) {
        if secret.len() < MIN_CANARY_LEN {
            self.short.insert(owner);
            return;
        }
        if let Some((canary, owners)) = self.secrets.get_mut(secret) {
            if !owners.contains(&owner) {
                owners.push(owner);
                self.canaries.canaries[*canary].what = what(&owners.join("`, `"));
            }
            return;
        }
        let canary = self.canaries.add(what(&owner), leak_forms(secret));
        self.secrets.insert(secret.to_owned(), (canary, vec![owner]));
    }

    /// Registers the tokens the known mock-idps issued since the last call. Tokens are
    /// recorded before anyone sees them, so a token this finds was issued after the previous
    /// call read the log length: every log line that can mention it is still to be scanned.
    fn sync_tokens(&mut self) {
        let mut new = Vec::new();
        for (idp, known) in &mut self.idps {
            let tokens = idp.issued_tokens_since(*known);
            *known += tokens.len();
            new.extend(tokens);
        }
        for token in new {
            self.canaries.add_token(&token);
            self.tokens += 1;
        }
    }

    pub(super) fn check(&mut self, place: &str, haystack: &[u8], text: bool) -> Result<(), String> {
        self.check_after(place, haystack, text, 0)
    }

    fn check_after(&mut self, place: &str, haystack: &[u8], text: bool, fresh_from: usize) -> Result<(), String> {
        self.sync_tokens();
        self.checks += 1;
        self.bytes_scanned += haystack.len() - fresh_from;
        self.canaries.check_after(place, haystack, text, fresh_from)
    }
}

/// Registers a client secret (once per value; values shorter than [`MIN_CANARY_LEN`] are
/// noted and skipped).
pub fn register_secret(client_id: &str, secret: &str) {
    registry().secret(client_id.to_owned(), secret, |owners| format!("the client secret of `{owners}`"));
}

/// Counts of what the leak checks have looked for so far in this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanaryStats {
    /// Distinct secret values (client secrets and secret settings) scanned for.
    pub secrets: usize,
    /// Distinct access tokens scanned for.
    pub tokens: usize,
    /// Clients (or settings) whose secret is too short to scan for.
    pub short: Vec<String>,
    pub checks: usize,
    pub bytes_scanned: usize,
}

pub fn canary_stats() -> CanaryStats {
    let mut registry = registry();
    registry.sync_tokens();
    CanaryStats {
        secrets: registry.secrets.len(),
        tokens: registry.tokens,
        short: registry.short.iter().cloned().collect(),
        checks: registry.checks,
        bytes_scanned: registry.bytes_scanned,
    }
}

/// Scans `haystack` for every registered secret and token (text: a failure shows the
/// surrounding line, redacted). Panics with a message naming what leaked into `place`.
pub fn check_no_leak(place: &str, haystack: &[u8]) {
    let result = registry().check(place, haystack, true);
    if let Err(message) = result {
        panic!("{message}");
    }
}

/// Scans everything logged (and every panic) since the previous call for every registered
/// secret and token. Secrets are registered before they are used and tokens before anyone sees
/// them, so scanning each log byte once, against everything registered by then, is enough.
pub fn check_logs() {
    let result = {
        let mut registry = registry();
        // Read the length before registering new tokens (see `Registry::sync_tokens`).
        let end = capture().buffer().len();
        registry.sync_tokens();
        // From a little before the previous end, for a canary written across it.
        let previous_end = registry.logs_scanned_to;
        let start = previous_end.saturating_sub(registry.canaries.longest.saturating_sub(1));
        let chunk = capture().buffer()[start..end].to_vec();
        registry.logs_scanned_to = end;
        registry.check_after("the captured logs (and panic messages)", &chunk, true, previous_end - start)
    };
    if let Err(message) = result {
        panic!("{message}");
    }
}
