//! Keys derived from the root secret, and the cache key of a request.
//!
//! One root secret (`TOKEN_PROXY_SECRET`, shared by every replica of a cluster) yields, through
//! HKDF-SHA256 with domain-separated labels, an *index key* that names entries and a *seal key*
//! that encrypts them. Neither is ever stored. A cache key is
//! `HMAC-SHA256(index key, canonical request)`: without the index key nobody can tell which
//! client an entry belongs to, or test a guessed secret against Redis.

use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::canonical::{CanonicalRequest, CanonicalSink, PurgeEpochs, Scope};
use crate::seal::Sealer;

/// Shortest root secret accepted, in bytes.
pub const MIN_ROOT_SECRET_LEN: usize = 32;

const HKDF_SALT: &[u8] = b"token-proxy/v1";
const LABEL_INDEX: &[u8] = b"token-proxy/v1/index-key";
const LABEL_SEAL: &[u8] = b"token-proxy/v1/seal-key";
const LABEL_KEY_ID: &[u8] = b"token-proxy/v1/key-id";
const LABEL_PURGE_CLIENT: &[u8] = b"token-proxy/v1/purge-client";
const LABEL_PURGE_SCOPE: &[u8] = b"token-proxy/v1/purge-scope";
const LABEL_THROTTLE_CLIENT: &[u8] = b"token-proxy/v1/throttle-client";
const LABEL_THROTTLE_SOURCE: &[u8] = b"token-proxy/v1/throttle-source";
const LABEL_PURGE_UPSTREAM: &[u8] = b"token-proxy/v1/purge-upstream";
const LABEL_PURGE_CLIENT_AT: &[u8] = b"token-proxy/v1/purge-client-at-upstream";
const LABEL_PURGE_SCOPE_AT: &[u8] = b"token-proxy/v1/purge-scope-at-upstream";
const LABEL_THROTTLE_CLIENT_AT: &[u8] = b"token-proxy/v1/throttle-client-at-upstream";
const LABEL_THROTTLE_SOURCE_AT: &[u8] = b"token-proxy/v1/throttle-source-at-upstream";
const LABEL_BUDGET: &[u8] = b"token-proxy/v1/client-call-budget";

/// Names a client (or a client and a scope, or a client and a source address) in Redis
/// without revealing it.
pub type Tag = [u8; 16];

/// The fixed-width name of a cache entry.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn from_bytes(bytes: [u8; 32]) -> CacheKey {
        CacheKey(bytes)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// Short and unambiguous in logs; a keyed hash reveals nothing about the request.
impl std::fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CacheKey({})", &self.to_hex()[..12])
    }
}

/// Computes cache keys. Holds an HMAC state already keyed, so each key costs one clone and
/// the hashing of the request, not a fresh key schedule.
#[derive(Clone)]
pub struct KeyHasher {
    keyed: Hmac<Sha256>,
}

impl std::fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyHasher(..)")
    }
}

impl KeyHasher {
    fn new(index_key: &[u8; 32]) -> KeyHasher {
        // HMAC accepts keys of any length; 32 bytes cannot fail.
        let keyed = <Hmac<Sha256> as KeyInit>::new_from_slice(index_key).expect("HMAC takes any key length");
        KeyHasher { keyed }
    }

    /// The cache key of `request` sent to `upstream`.
    pub fn cache_key(&self, upstream: &str, request: &CanonicalRequest) -> CacheKey {
        self.cache_key_with(upstream, request, PurgeEpochs::default())
    }

    /// The cache key of `request` under the given purge epochs.
    pub fn cache_key_with(&self, upstream: &str, request: &CanonicalRequest, epochs: PurgeEpochs) -> CacheKey {
        let mut mac = MacSink(self.keyed.clone());
        request.encode_with(upstream, epochs, &mut mac);
        CacheKey(mac.0.finalize().into_bytes().into())
    }

    fn tag(&self, label: &[u8], parts: &[&[u8]]) -> Tag {
        let mut mac = self.keyed.clone();
        mac.update(label);
        for part in parts {
            mac.update(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_be_bytes());
            mac.update(part);
        }
        let full: [u8; 32] = mac.finalize().into_bytes().into();
        full[..16].try_into().expect("16 of 32 bytes")
    }

    /// The purge tag of a client.
    pub fn client_tag(&self, client_id: &str) -> Tag {
        self.tag(LABEL_PURGE_CLIENT, &[client_id.as_bytes()])
    }

    /// The names of a client's failed-authentication counters: from all sources, and from
    /// `source` (an address's bytes).
    pub fn throttle_tags(&self, client_id: &str, source: &[u8]) -> (Tag, Tag) {
        let client = self.tag(LABEL_THROTTLE_CLIENT, &[client_id.as_bytes()]);
        (client, self.tag(LABEL_THROTTLE_SOURCE, &[client_id.as_bytes(), source]))
    }

    /// The purge tag of a client's entries for one scope (omitted scope included).
    pub fn scope_tag(&self, client_id: &str, scope: &Scope) -> Tag {
        let scope = scope.to_param();
        let marker: &[u8] = if scope.is_some() { b"set" } else { b"omitted" };
        self.tag(LABEL_PURGE_SCOPE, &[client_id.as_bytes(), marker, scope.as_deref().unwrap_or("").as_bytes()])
    }

    /// The purge tag of every entry of one named upstream.
    pub fn upstream_tag(&self, upstream: &str) -> Tag {
        self.tag(LABEL_PURGE_UPSTREAM, &[upstream.as_bytes()])
    }

    /// The purge tag of a client at one named upstream only.
    pub fn client_tag_at(&self, upstream: &str, client_id: &str) -> Tag {
        self.tag(LABEL_PURGE_CLIENT_AT, &[upstream.as_bytes(), client_id.as_bytes()])
    }

    /// The purge tag of a client's entries for one scope at one named upstream only.
    pub fn scope_tag_at(&self, upstream: &str, client_id: &str, scope: &Scope) -> Tag {
        let scope = scope.to_param();
        let marker: &[u8] = if scope.is_some() { b"set" } else { b"omitted" };
        let scope = scope.as_deref().unwrap_or("").as_bytes();
        self.tag(LABEL_PURGE_SCOPE_AT, &[upstream.as_bytes(), client_id.as_bytes(), marker, scope])
    }

    /// The name of a client's call budget at an upstream (`None`: the one upstream of a
    /// deployment without names).
    pub fn budget_tag(&self, upstream: Option<&str>, client_id: &str) -> Tag {
        let upstream = upstream.map_or(&b""[..], str::as_bytes);
        let marker: &[u8] = if upstream.is_empty() { b"one" } else { b"named" };
        self.tag(LABEL_BUDGET, &[marker, upstream, client_id.as_bytes()])
    }

    /// [`KeyHasher::throttle_tags`] of a client at one named upstream (`None`: the one upstream
    /// of a deployment without names), so that each upstream counts its own failures.
    pub fn throttle_tags_at(&self, upstream: Option<&str>, client_id: &str, source: &[u8]) -> (Tag, Tag) {
        let Some(upstream) = upstream else { return self.throttle_tags(client_id, source) };
        let (at, client) = (upstream.as_bytes(), client_id.as_bytes());
        (self.tag(LABEL_THROTTLE_CLIENT_AT, &[at, client]), self.tag(LABEL_THROTTLE_SOURCE_AT, &[at, client, source]))
    }
}

/// Streams the canonical encoding into the MAC.
struct MacSink(Hmac<Sha256>);

impl CanonicalSink for MacSink {
    fn put(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// Everything derived from one root secret.
#[derive(Debug, Clone)]
pub struct Keys {
    pub hasher: KeyHasher,
    pub sealer: Sealer,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the root secret must be at least {MIN_ROOT_SECRET_LEN} bytes, got {0}")]
pub struct RootSecretTooShort(pub usize);

impl Keys {
    /// Derives the index key, the seal key and the seal key's one-byte id from `root`.
    pub fn derive(root: &[u8]) -> Result<Keys, RootSecretTooShort> {
        if root.len() < MIN_ROOT_SECRET_LEN {
            return Err(RootSecretTooShort(root.len()));
        }
        let hkdf = Hkdf::<Sha256>::new(Some(HKDF_SALT), root);
        let mut index_key = [0u8; 32];
        let mut seal_key = [0u8; 32];
        let mut key_id = [0u8; 1];
        // Outputs of 32 bytes or less never exceed HKDF's limit.
        for (label, out) in
            [(LABEL_INDEX, &mut index_key[..]), (LABEL_SEAL, &mut seal_key[..]), (LABEL_KEY_ID, &mut key_id[..])]
        {
            hkdf.expand(label, out).expect("HKDF output length is valid");
        }
        Ok(Keys { hasher: KeyHasher::new(&index_key), sealer: Sealer::new(key_id[0], seal_key) })
    }

    /// Fresh random keys, for a replica that runs alone without a configured secret.
    pub fn random() -> Keys {
        let mut root = [0u8; 32];
        getrandom::fill(&mut root).expect("the OS random source is available");
        Keys::derive(&root).expect("32 bytes is long enough")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canonical::{AuthMethod, Scope};
    use proptest::prelude::*;
    use secrecy::SecretString;
    use std::collections::BTreeMap;

    const ROOT: &[u8; 32] = b"0123456789abcdef0123456789abcdef";

    fn request(id: &str, secret: &str, scope: Option<&str>) -> CanonicalRequest {
        CanonicalRequest {
            client_id: id.into(),
            client_secret: SecretString::from(secret),
            auth_method: AuthMethod::Basic,
            grant_type: "client_credentials".into(),
            scope: Scope::parse(scope).unwrap(),
            extra: BTreeMap::new(),
        }
    }

    /// Known-answer test: pins the derivation and the canonical encoding. If this changes,
    /// every deployed cache is silently invalidated, so change it only on purpose. The
    /// expected values were computed independently with Python's `hmac` and `hashlib`.
    #[test]
    fn cache_key_known_answer() {
        let keys = Keys::derive(ROOT).unwrap();
        let key = keys.hasher.cache_key("https://idp.example/oauth2/token", &request("client", "secret", Some("b a")));
        assert_eq!(key.to_hex(), "a72f898030a471e4a0f39865d1627ffa4d87e81ad268ee319bb1252ba3c842a1");
        assert_eq!(keys.sealer.key_id(), 50);
    }

    #[test]
    fn purge_epochs_change_the_key_only_when_set() {
        let keys = Keys::derive(ROOT).unwrap();
        let r = request("c", "s", Some("a"));
        let plain = keys.hasher.cache_key("u", &r);
        assert_eq!(keys.hasher.cache_key_with("u", &r, PurgeEpochs::default()), plain);
        let mut seen = std::collections::HashSet::from([plain]);
        for epochs in [
            PurgeEpochs { all: 1, ..PurgeEpochs::default() },
            PurgeEpochs { client: 1, ..PurgeEpochs::default() },
            PurgeEpochs { scope: 1, ..PurgeEpochs::default() },
            PurgeEpochs { all: 2, client: 1, scope: 0 },
        ] {
            assert!(seen.insert(keys.hasher.cache_key_with("u", &r, epochs)), "{epochs:?}");
        }
    }

    #[test]
    fn purge_tags_separate_clients_and_scopes() {
        let keys = Keys::derive(ROOT).unwrap();
        let h = &keys.hasher;
        assert_ne!(h.client_tag("a"), h.client_tag("b"));
        let (some, none) = (Scope::parse(Some("x y")).unwrap(), Scope::Omitted);
        assert_ne!(h.scope_tag("a", &some), h.scope_tag("a", &none));
        assert_ne!(h.scope_tag("a", &some), h.scope_tag("b", &some));
        assert_eq!(h.scope_tag("a", &some), h.scope_tag("a", &Scope::parse(Some("y x")).unwrap()));
        assert_ne!(h.scope_tag("a", &none), h.client_tag("a"));
        let (client, source) = h.throttle_tags("a", &[127, 0, 0, 1]);
        assert_ne!(client, h.client_tag("a"), "throttle and purge names are unrelated");
        assert_ne!(source, h.throttle_tags("a", &[127, 0, 0, 2]).1);
        assert_eq!(client, h.throttle_tags("a", &[127, 0, 0, 2]).0);
    }

    #[test]
    fn tags_at_an_upstream_are_that_upstreams_alone() {
        let keys = Keys::derive(ROOT).unwrap();
        let h = &keys.hasher;
        let scope = Scope::parse(Some("x")).unwrap();
        assert_ne!(h.upstream_tag("orders"), h.upstream_tag("partners"));
        assert_ne!(h.client_tag_at("orders", "a"), h.client_tag_at("partners", "a"));
        assert_ne!(h.client_tag_at("orders", "a"), h.client_tag("a"), "a client everywhere is another purge");
        assert_ne!(h.scope_tag_at("orders", "a", &scope), h.scope_tag_at("partners", "a", &scope));
        assert_ne!(h.scope_tag_at("orders", "a", &scope), h.scope_tag("a", &scope));
        // Lengths are part of the input: moving bytes between the upstream and the client differs.
        assert_ne!(h.client_tag_at("ab", "c"), h.client_tag_at("a", "bc"));
        let source = [127, 0, 0, 1];
        assert_eq!(h.throttle_tags_at(None, "a", &source), h.throttle_tags("a", &source));
        let (orders, partners) =
            (h.throttle_tags_at(Some("orders"), "a", &source), h.throttle_tags_at(Some("partners"), "a", &source));
        assert_ne!(orders.0, partners.0);
        assert_ne!(orders.1, partners.1);
        assert_ne!(orders.0, h.throttle_tags("a", &source).0);
    }

    #[test]
    fn short_root_secret_is_refused() {
        assert_eq!(Keys::derive(&[0u8; 31]).unwrap_err(), RootSecretTooShort(31));
    }

    #[test]
    fn different_roots_give_different_keys() {
        let a = Keys::derive(ROOT).unwrap();
        let b = Keys::derive(&[7u8; 32]).unwrap();
        let r = request("client", "secret", None);
        assert_ne!(a.hasher.cache_key("u", &r), b.hasher.cache_key("u", &r));
    }

    #[test]
    fn auth_method_does_not_change_the_key() {
        let keys = Keys::derive(ROOT).unwrap();
        let basic = request("c", "s", Some("x"));
        let mut body = basic.clone();
        body.auth_method = AuthMethod::Body;
        assert_eq!(keys.hasher.cache_key("u", &basic), keys.hasher.cache_key("u", &body));
    }

    #[test]
    fn omitted_scope_differs_from_every_explicit_scope() {
        let keys = Keys::derive(ROOT).unwrap();
        let omitted = keys.hasher.cache_key("u", &request("c", "s", None));
        assert_ne!(omitted, keys.hasher.cache_key("u", &request("c", "s", Some("a"))));
    }

    fn arb_request() -> impl Strategy<Value = CanonicalRequest> {
        (
            "\\PC{1,12}",
            "\\PC{1,12}",
            proptest::option::of(proptest::collection::vec("[a-z/]{1,5}", 1..4)),
            proptest::collection::btree_map("[a-z_]{1,6}", "\\PC{1,8}", 0..3),
        )
            .prop_map(|(id, secret, scopes, extra)| {
                let mut r = request(&id, &secret, scopes.map(|s| s.join(" ")).as_deref());
                r.extra = extra;
                r
            })
    }

    proptest! {
        #[test]
        fn scope_order_and_duplicates_do_not_change_the_key(
            scopes in proptest::collection::vec("[a-z/:.]{1,8}", 1..6),
            seed in any::<u64>(),
        ) {
            let keys = Keys::derive(ROOT).unwrap();
            let mut shuffled = scopes.clone();
            shuffled.push(scopes[0].clone());
            let n = shuffled.len();
            shuffled.rotate_left((seed as usize) % n);
            shuffled.reverse();
            let a = keys.hasher.cache_key("u", &request("c", "s", Some(&scopes.join(" "))));
            let b = keys.hasher.cache_key("u", &request("c", "s", Some(&shuffled.join("  "))));
            prop_assert_eq!(a, b);
        }

        /// Equal keys if and only if equal canonical encodings: no field change goes unseen,
        /// and no shifting of bytes across field boundaries collides.
        #[test]
        fn keys_collide_only_for_equal_requests(a in arb_request(), b in arb_request(), ua in "[a-z]{0,3}", ub in "[a-z]{0,3}") {
            let keys = Keys::derive(ROOT).unwrap();
            let same = {
                use secrecy::ExposeSecret;
                ua == ub && a.client_id == b.client_id
                    && a.client_secret.expose_secret() == b.client_secret.expose_secret()
                    && a.grant_type == b.grant_type && a.scope == b.scope && a.extra == b.extra
            };
            prop_assert_eq!(keys.hasher.cache_key(&ua, &a) == keys.hasher.cache_key(&ub, &b), same);
        }

        #[test]
        fn moving_bytes_between_fields_changes_the_key(id in "[a-z]{1,8}", secret in "[a-z]{1,8}") {
            let keys = Keys::derive(ROOT).unwrap();
            let moved = format!("{id}{}", &secret[..1]);
            let a = keys.hasher.cache_key("u", &request(&id, &secret, None));
            let b = keys.hasher.cache_key("u", &request(&moved, &secret[1..], None));
            prop_assert_ne!(a, b);
        }
    }
}
