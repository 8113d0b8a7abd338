//! Purges: an operator drops a client's cached tokens (or one scope of them, or everything).
//!
//! Entries cannot be listed by client (their names are keyed hashes of the whole request), so a
//! purge bumps a generation instead: every purge epoch that applies to a request is part of its
//! cache key and L1 key, so after a bump the old entries are never found again and expire by TTL.
//! Epochs live in the Redis hash [`EPOCHS_KEY`] under keyed-hash tags (Redis never learns which
//! client was purged); every replica looks at its version when a purge is announced and once a
//! second, and reads it whole only when the version changed.
//!
//! A purge must outlive any loss of Redis state (invariant 9), so epochs never go back:
//!
//! - An epoch is Redis's clock in µs at the purge, or one more than the epoch before if that is
//!   larger: a purge repeated after a loss never reuses a value some entry was keyed with.
//! - The hash without its `all` field has been lost (a restart, a failover, eviction, `DEL`):
//!   whoever notices first writes `all` anew, from the clock, so every entry keyed before the loss
//!   is out of reach for every replica, including one started after the loss. The loss costs one
//!   upstream call per key; a purged token never comes back.
//! - A replica that remembers an epoch Redis has lost or holds older (a failover to a replica that
//!   missed the write) writes it back: Redis's state is the maximum of its own and every
//!   replica's memory.
//!
//! The state is bounded: a client id of at most [`MAX_CLIENT_ID_BYTES`], at most
//! [`MAX_PURGED`] client (and client-scope) epochs, each kept for the retention: the longest a
//! cached token lives (`TOKEN_PROXY_MAX_TOKEN_LIFETIME`), after which every entry keyed under
//! the epoch before it has expired.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use shared::canonical::{CanonicalRequest, PurgeEpochs, Scope};
use shared::keys::{KeyHasher, Tag};

use crate::store::{PurgeState, RedisStore, StoreError};

/// The field of "purge everything" in the purge hash ([`crate::store::EPOCHS_KEY`]).
pub const ALL_FIELD: &str = "all";
/// The longest client id a purge accepts (Cognito's are at most 128 characters).
pub const MAX_CLIENT_ID_BYTES: usize = 256;
/// The most client and client-scope epochs kept at once: a purge beyond it is refused (purging
/// everything still works). Each field is about 60 bytes, read by every replica on each change.
pub const MAX_PURGED: usize = 10_000;

/// Why a purge did not happen.
#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{MAX_PURGED} clients or scopes were purged within the retention; purge everything instead")]
    TooMany,
}

/// What to purge, at every upstream or at one named upstream.
#[derive(Debug, Clone)]
pub struct PurgeTarget {
    /// `None`: at every upstream.
    pub upstream: Option<String>,
    pub covers: Covers,
}

/// The tokens a purge covers (at its upstream or upstreams).
#[derive(Debug, Clone)]
pub enum Covers {
    All,
    Client(String),
    ClientScope(String, Scope),
}

impl PurgeTarget {
    /// The field of this target in [`EPOCHS_KEY`].
    pub fn field(&self, hasher: &KeyHasher) -> String {
        match (&self.upstream, &self.covers) {
            (None, Covers::All) => ALL_FIELD.to_owned(),
            (None, Covers::Client(client_id)) => hex::encode(hasher.client_tag(client_id)),
            (None, Covers::ClientScope(client_id, scope)) => hex::encode(hasher.scope_tag(client_id, scope)),
            (Some(upstream), Covers::All) => hex::encode(hasher.upstream_tag(upstream)),
            (Some(upstream), Covers::Client(client_id)) => hex::encode(hasher.client_tag_at(upstream, client_id)),
            (Some(upstream), Covers::ClientScope(client_id, scope)) => {
                hex::encode(hasher.scope_tag_at(upstream, client_id, scope))
            }
        }
    }
}

/// This replica's copy of the purge epochs.
#[derive(Debug, Default)]
pub struct Epochs {
    all: AtomicU64,
    /// Epochs of purged clients and client scopes, by tag. Empty until the first such purge,
    /// and then the only reason a request computes its tags (two HMACs).
    tagged: RwLock<HashMap<Tag, u64>>,
    /// Whether `tagged` has anything: lets every request skip the lock until a purge of a
    /// client happened (the lock's reader count would be a cache line both cores write).
    any_tagged: AtomicBool,
    /// The version of the Redis hash these epochs were read at; `None` before the first read.
    version: Mutex<Option<String>>,
    /// Whether the epochs were read from Redis at least once. Until then Redis's entries are
    /// not used: a replica that does not know the epochs yet could find a purged token there.
    synced: AtomicBool,
}

impl Epochs {
    /// The epochs that apply to `request` sent to `upstream` (its name; `None` for the one
    /// upstream of a deployment without names). A purge at every upstream and one at this
    /// upstream both move the key: each part is the later of the two epochs, which works
    /// because epochs only grow, on one clock for all fields (see [`Epochs::bump_local`]).
    pub fn for_request(&self, hasher: &KeyHasher, upstream: Option<&str>, request: &CanonicalRequest) -> PurgeEpochs {
        let all = self.all.load(Ordering::Acquire);
        if !self.any_tagged.load(Ordering::Acquire) {
            return PurgeEpochs { all, ..PurgeEpochs::default() };
        }
        let tagged = self.tagged.read().unwrap_or_else(|p| p.into_inner());
        let epoch = |tag: Tag| tagged.get(&tag).copied().unwrap_or(0);
        let (client_id, scope) = (&request.client_id, &request.scope);
        let mut epochs = PurgeEpochs {
            all,
            client: epoch(hasher.client_tag(client_id)),
            scope: epoch(hasher.scope_tag(client_id, scope)),
        };
        if let Some(upstream) = upstream {
            epochs.all = epochs.all.max(epoch(hasher.upstream_tag(upstream)));
            epochs.client = epochs.client.max(epoch(hasher.client_tag_at(upstream, client_id)));
            epochs.scope = epochs.scope.max(epoch(hasher.scope_tag_at(upstream, client_id, scope)));
        }
        epochs
    }

    /// The epochs as fields of [`EPOCHS_KEY`], to compare with Redis's.
    fn fields(&self) -> HashMap<String, u64> {
        let tagged = self.tagged.read().unwrap_or_else(|p| p.into_inner());
        let mut fields: HashMap<String, u64> = tagged.iter().map(|(tag, epoch)| (hex::encode(tag), *epoch)).collect();
        fields.insert(ALL_FIELD.to_owned(), self.all.load(Ordering::Acquire));
        fields
    }

    /// Whether the epochs were read from Redis at least once.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    fn version(&self) -> Option<String> {
        self.version.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Takes the state read from Redis.
    fn adopt(&self, state: PurgeState) {
        self.replace(state.fields);
        *self.version.lock().unwrap_or_else(|p| p.into_inner()) = Some(state.version);
        self.synced.store(true, Ordering::Release);
    }

    /// Replaces the epochs with those read from Redis (`field → epoch`).
    pub fn replace(&self, fields: HashMap<String, u64>) {
        let mut tagged = HashMap::new();
        let mut all = 0;
        for (field, epoch) in fields {
            if field == ALL_FIELD {
                all = epoch;
            } else if let Some(tag) = hex::decode(&field).ok().and_then(|b| Tag::try_from(b).ok()) {
                tagged.insert(tag, epoch);
            }
        }
        let any = !tagged.is_empty();
        *self.tagged.write().unwrap_or_else(|p| p.into_inner()) = tagged;
        self.any_tagged.store(any, Ordering::Release);
        self.all.store(all, Ordering::Release);
    }

    /// Bumps one epoch here only (a replica without Redis). Returns the new epoch: one more
    /// than any epoch held, so that epochs of different fields compare as Redis's clock-based
    /// ones do (see [`Epochs::for_request`]).
    pub fn bump_local(&self, field: &str) -> u64 {
        let mut tagged = self.tagged.write().unwrap_or_else(|p| p.into_inner());
        let new = tagged.values().copied().chain([self.all.load(Ordering::Acquire)]).max().unwrap_or(0) + 1;
        if field == ALL_FIELD {
            self.all.store(new, Ordering::Release);
            return new;
        }
        let Some(tag) = hex::decode(field).ok().and_then(|b| Tag::try_from(b).ok()) else { return 0 };
        tagged.insert(tag, new);
        self.any_tagged.store(true, Ordering::Release);
        new
    }
}

/// How much of the purge hash [`sync`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Look {
    /// Only if its version changed: the cheap look, once a second.
    IfChanged,
    /// Whatever the version says: now and then, for changes that did not move the version
    /// (a purge by a replica of an earlier release, a version planted in Redis).
    Whole,
}

/// Brings this replica's epochs and Redis's in step: reads the hash (Redis writes `all` anew
/// first if the hash was lost or damaged), writes back whatever this replica remembers that
/// Redis has lost or holds older, and adopts the result.
pub async fn sync(epochs: &Epochs, store: &RedisStore, retention: Duration, look: Look) -> Result<(), StoreError> {
    let known = match look {
        Look::IfChanged => epochs.version(),
        Look::Whole => None,
    };
    let Some(state) = store.purge_state(known.as_deref()).await? else { return Ok(()) };
    let behind: Vec<(String, u64)> = epochs
        .fields()
        .into_iter()
        .filter(|(field, epoch)| state.fields.get(field).is_none_or(|theirs| theirs < epoch))
        .collect();
    let state = if behind.is_empty() {
        state
    } else {
        tracing::warn!(fields = behind.len(), "Redis lost purge epochs this replica remembers; writing them back");
        store.restore_purges(&behind, retention).await?
    };
    epochs.adopt(state);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;
    use shared::canonical::AuthMethod;
    use shared::keys::Keys;

    fn request(id: &str, scope: Option<&str>) -> CanonicalRequest {
        CanonicalRequest {
            client_id: id.into(),
            client_secret: SecretString::from("s"),
            auth_method: AuthMethod::Basic,
            grant_type: "client_credentials".into(),
            scope: Scope::parse(scope).unwrap(),
            extra: Default::default(),
        }
    }

    fn everywhere(covers: Covers) -> PurgeTarget {
        PurgeTarget { upstream: None, covers }
    }

    fn at(upstream: &str, covers: Covers) -> PurgeTarget {
        PurgeTarget { upstream: Some(upstream.to_owned()), covers }
    }

    #[test]
    fn a_purge_at_one_upstream_moves_only_that_upstreams_keys() {
        let keys = Keys::derive(&[1; 32]).unwrap();
        let epochs = Epochs::default();
        let h = &keys.hasher;
        let (orders, partners) = (Some("orders"), Some("partners"));
        epochs.bump_local(&at("orders", Covers::Client("a".into())).field(h));
        assert_eq!(epochs.for_request(h, orders, &request("a", None)).client, 1);
        assert_eq!(epochs.for_request(h, partners, &request("a", None)), PurgeEpochs::default());
        assert_eq!(epochs.for_request(h, orders, &request("b", None)), PurgeEpochs::default());

        // A purge of the client everywhere after it moves both, and past the first purge.
        let everywhere_epoch = epochs.bump_local(&everywhere(Covers::Client("a".into())).field(h));
        assert_eq!(epochs.for_request(h, orders, &request("a", None)).client, everywhere_epoch);
        assert_eq!(epochs.for_request(h, partners, &request("a", None)).client, everywhere_epoch);
        // Then the whole of one upstream, later than everything before.
        let upstream_epoch = epochs.bump_local(&at("partners", Covers::All).field(h));
        assert!(upstream_epoch > everywhere_epoch);
        assert_eq!(epochs.for_request(h, partners, &request("z", Some("x"))).all, upstream_epoch);
        assert_eq!(epochs.for_request(h, orders, &request("z", Some("x"))).all, 0);
        // Scope at one upstream.
        let scope = Scope::parse(Some("x")).unwrap();
        let scope_epoch = epochs.bump_local(&at("orders", Covers::ClientScope("c".into(), scope)).field(h));
        assert_eq!(epochs.for_request(h, orders, &request("c", Some("x"))).scope, scope_epoch);
        assert_eq!(epochs.for_request(h, orders, &request("c", None)).scope, 0);
        assert_eq!(epochs.for_request(h, partners, &request("c", Some("x"))).scope, 0);
    }

    #[test]
    fn a_client_purge_applies_to_that_client_only() {
        let keys = Keys::derive(&[1; 32]).unwrap();
        let epochs = Epochs::default();
        let field = everywhere(Covers::Client("a".into())).field(&keys.hasher);
        assert_eq!(epochs.bump_local(&field), 1);
        assert_eq!(epochs.for_request(&keys.hasher, None, &request("a", None)).client, 1);
        assert_eq!(epochs.for_request(&keys.hasher, None, &request("b", None)), PurgeEpochs::default());
    }

    #[test]
    fn a_scope_purge_applies_to_that_scope_only() {
        let keys = Keys::derive(&[1; 32]).unwrap();
        let epochs = Epochs::default();
        let field = everywhere(Covers::ClientScope("a".into(), Scope::parse(Some("x")).unwrap())).field(&keys.hasher);
        epochs.bump_local(&field);
        assert_eq!(epochs.for_request(&keys.hasher, None, &request("a", Some("x"))).scope, 1);
        assert_eq!(epochs.for_request(&keys.hasher, None, &request("a", Some("x y"))), PurgeEpochs::default());
        assert_eq!(epochs.for_request(&keys.hasher, None, &request("a", None)), PurgeEpochs::default());
    }

    #[test]
    fn replace_loads_epochs_from_redis_fields() {
        let keys = Keys::derive(&[1; 32]).unwrap();
        let epochs = Epochs::default();
        let field = everywhere(Covers::Client("a".into())).field(&keys.hasher);
        epochs.replace(HashMap::from([(ALL_FIELD.to_owned(), 3), (field, 2), ("junk".to_owned(), 9)]));
        let got = epochs.for_request(&keys.hasher, None, &request("a", None));
        assert_eq!((got.all, got.client, got.scope), (3, 2, 0));
    }
}
