//! Purges: an operator drops a client's cached tokens (or one scope of them, or everything).
//!
//! Entries cannot be listed by client (their names are keyed hashes of the whole request), so a
//! purge bumps a generation instead: every purge epoch that applies to a request is part of its
//! cache key and L1 key, so after a bump the old entries are never found again and expire by TTL.
//! Epochs live in the Redis hash [`EPOCHS_KEY`] under keyed-hash tags (Redis never learns which
//! client was purged); every replica reloads them when a purge is announced and once a second.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use shared::canonical::{CanonicalRequest, PurgeEpochs, Scope};
use shared::keys::{KeyHasher, Tag};

/// The Redis hash of purge epochs: field `all`, and one field per purged tag (hex).
pub const EPOCHS_KEY: &str = "tp:purge";
/// The field of "purge everything".
pub const ALL_FIELD: &str = "all";

/// What to purge.
#[derive(Debug, Clone)]
pub enum PurgeTarget {
    All,
    Client(String),
    ClientScope(String, Scope),
}

impl PurgeTarget {
    /// The field of this target in [`EPOCHS_KEY`].
    pub fn field(&self, hasher: &KeyHasher) -> String {
        match self {
            PurgeTarget::All => ALL_FIELD.to_owned(),
            PurgeTarget::Client(client_id) => hex::encode(hasher.client_tag(client_id)),
            PurgeTarget::ClientScope(client_id, scope) => hex::encode(hasher.scope_tag(client_id, scope)),
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
}

impl Epochs {
    /// The epochs that apply to `request`.
    pub fn for_request(&self, hasher: &KeyHasher, request: &CanonicalRequest) -> PurgeEpochs {
        let all = self.all.load(Ordering::Acquire);
        if !self.any_tagged.load(Ordering::Acquire) {
            return PurgeEpochs { all, ..PurgeEpochs::default() };
        }
        let tagged = self.tagged.read().unwrap_or_else(|p| p.into_inner());
        let epoch = |tag: Tag| tagged.get(&tag).copied().unwrap_or(0);
        PurgeEpochs {
            all,
            client: epoch(hasher.client_tag(&request.client_id)),
            scope: epoch(hasher.scope_tag(&request.client_id, &request.scope)),
        }
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

    /// Bumps one epoch here only (a replica without Redis). Returns the new epoch.
    pub fn bump_local(&self, field: &str) -> u64 {
        if field == ALL_FIELD {
            return self.all.fetch_add(1, Ordering::AcqRel) + 1;
        }
        let Some(tag) = hex::decode(field).ok().and_then(|b| Tag::try_from(b).ok()) else { return 0 };
        let mut tagged = self.tagged.write().unwrap_or_else(|p| p.into_inner());
        let epoch = tagged.entry(tag).or_default();
        *epoch += 1;
        self.any_tagged.store(true, Ordering::Release);
        *epoch
    }
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

    #[test]
    fn a_client_purge_applies_to_that_client_only() {
        let keys = Keys::derive(&[1; 32]).unwrap();
        let epochs = Epochs::default();
        let field = PurgeTarget::Client("a".into()).field(&keys.hasher);
        assert_eq!(epochs.bump_local(&field), 1);
        assert_eq!(epochs.for_request(&keys.hasher, &request("a", None)).client, 1);
        assert_eq!(epochs.for_request(&keys.hasher, &request("b", None)), PurgeEpochs::default());
    }

    #[test]
    fn a_scope_purge_applies_to_that_scope_only() {
        let keys = Keys::derive(&[1; 32]).unwrap();
        let epochs = Epochs::default();
        let field = PurgeTarget::ClientScope("a".into(), Scope::parse(Some("x")).unwrap()).field(&keys.hasher);
        epochs.bump_local(&field);
        assert_eq!(epochs.for_request(&keys.hasher, &request("a", Some("x"))).scope, 1);
        assert_eq!(epochs.for_request(&keys.hasher, &request("a", Some("x y"))), PurgeEpochs::default());
        assert_eq!(epochs.for_request(&keys.hasher, &request("a", None)), PurgeEpochs::default());
    }

    #[test]
    fn replace_loads_epochs_from_redis_fields() {
        let keys = Keys::derive(&[1; 32]).unwrap();
        let epochs = Epochs::default();
        let field = PurgeTarget::Client("a".into()).field(&keys.hasher);
        epochs.replace(HashMap::from([(ALL_FIELD.to_owned(), 3), (field, 2), ("junk".to_owned(), 9)]));
        let got = epochs.for_request(&keys.hasher, &request("a", None));
        assert_eq!((got.all, got.client, got.scope), (3, 2, 0));
    }
}
