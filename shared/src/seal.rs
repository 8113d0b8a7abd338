//! AES-256-GCM sealing of cached token responses (docs/architecture.md, invariant 4).
//!
//! A sealed value is `key id (1 byte) ‖ nonce (12) ‖ ciphertext ‖ tag (16)`. The associated data
//! is the key id and the cache key, so a value copied under another key, truncated or altered
//! fails to open. Each entry's AES key is derived with HKDF from the seal key *and the client's
//! secret*: someone holding a Redis dump and the proxy's keys still cannot read a token without
//! also knowing that client's secret.
//!
//! Deriving an entry key costs two HMAC-SHA256 computations (nine compression blocks), and a hot
//! entry is opened on every request that reads it from Redis. So the sealer remembers the entry
//! keys it derived last in a small fixed table ([`EntryKeyMemo`]), in process memory only, beside
//! the seal key they come from. What is sealed, and how, does not change: the memo only skips
//! recomputing a derivation whose result it already holds.

use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use hkdf::Hkdf;
use sha2::Sha256;

use crate::keys::CacheKey;

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Bytes a sealed value adds to its plaintext.
pub const OVERHEAD: usize = 1 + NONCE_LEN + TAG_LEN;
const LABEL_ENTRY: &[u8] = b"token-proxy/v1/entry-key";
/// Slots of the entry-key memo. Each holds one entry key, 88 bytes in all: 4,096 slots are
/// 352 KiB, allocated once per sealer.
const MEMO_SLOTS: usize = 4096;

/// Seals and opens entries with one seal key.
#[derive(Clone)]
pub struct Sealer {
    key_id: u8,
    seal_key: [u8; 32],
    /// Shared by the clones of one sealer.
    memo: Arc<EntryKeyMemo>,
}

/// The entry keys derived last, in a direct-mapped table: the slot of an entry is chosen by its
/// cache key (an HMAC output, uniformly spread and not steerable without the index key), and a
/// new entry simply replaces the one in its slot. Bounded, no eviction bookkeeping, one
/// uncontended lock per use.
///
/// A slot answers only for the exact cache key *and* client secret it was derived from: the cache
/// key already binds the secret (it is an HMAC of the request, secret included), and the slot
/// also keeps a keyed 64-bit hash of the secret (SipHash, random per-process key; never the secret
/// itself) so that [`Sealer::open`] with another secret still derives, and fails, exactly as
/// without the memo.
struct EntryKeyMemo {
    slots: Box<[Mutex<Option<MemoSlot>>]>,
    secret_hasher: std::hash::RandomState,
}

struct MemoSlot {
    key: CacheKey,
    secret_tag: u64,
    entry_key: [u8; 32],
}

impl EntryKeyMemo {
    fn new() -> EntryKeyMemo {
        EntryKeyMemo {
            slots: (0..MEMO_SLOTS).map(|_| Mutex::new(None)).collect(),
            secret_hasher: std::hash::RandomState::new(),
        }
    }

    fn slot(&self, key: &CacheKey) -> std::sync::MutexGuard<'_, Option<MemoSlot>> {
        let bytes = key.as_bytes();
        let index = usize::from(u16::from_le_bytes([bytes[0], bytes[1]])) % MEMO_SLOTS;
        // A poisoned slot holds a complete value or none: it is still usable.
        self.slots[index].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The entry key of `key` and `client_secret`, from the memo or from `derive` (then
    /// remembered).
    fn get_or_derive(&self, key: &CacheKey, client_secret: &[u8], derive: impl FnOnce() -> [u8; 32]) -> [u8; 32] {
        let secret_tag = self.secret_hasher.hash_one(client_secret);
        if let Some(found) = self.slot(key).as_ref().filter(|s| s.key == *key && s.secret_tag == secret_tag) {
            return found.entry_key;
        }
        // Derived outside the lock; two threads deriving the same key at once both store it.
        let entry_key = derive();
        *self.slot(key) = Some(MemoSlot { key: *key, secret_tag, entry_key });
        entry_key
    }
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

/// Why a stored value was not opened. Every variant means "treat as a miss".
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("sealed value is truncated")]
    Truncated,
    #[error("sealed with unknown key id {0}")]
    UnknownKey(u8),
    #[error("sealed value failed authentication")]
    Rejected,
}

impl Sealer {
    pub(crate) fn new(key_id: u8, seal_key: [u8; 32]) -> Sealer {
        Sealer { key_id, seal_key, memo: Arc::new(EntryKeyMemo::new()) }
    }

    /// The id written in front of every value this sealer seals.
    pub fn key_id(&self) -> u8 {
        self.key_id
    }

    /// The AES key of one entry: HKDF-SHA256 with the seal key as salt, the client's secret as
    /// input key material, and the label and cache key as info.
    fn derive_entry_key(&self, key: &CacheKey, client_secret: &[u8]) -> [u8; 32] {
        let hkdf = Hkdf::<Sha256>::new(Some(&self.seal_key), client_secret);
        let mut entry_key = [0u8; 32];
        let mut info = [0u8; LABEL_ENTRY.len() + 32];
        info[..LABEL_ENTRY.len()].copy_from_slice(LABEL_ENTRY);
        info[LABEL_ENTRY.len()..].copy_from_slice(key.as_bytes());
        hkdf.expand(&info, &mut entry_key).expect("32-byte HKDF output is valid");
        entry_key
    }

    fn cipher(&self, key: &CacheKey, client_secret: &[u8]) -> Aes256Gcm {
        let entry_key = self.memo.get_or_derive(key, client_secret, || self.derive_entry_key(key, client_secret));
        Aes256Gcm::new_from_slice(&entry_key).expect("AES-256 takes a 32-byte key")
    }

    fn aad(&self, key: &CacheKey) -> [u8; 33] {
        let mut aad = [0u8; 33];
        aad[0] = self.key_id;
        aad[1..].copy_from_slice(key.as_bytes());
        aad
    }

    /// Seals `plaintext` for the entry `key` of the client whose secret is `client_secret`.
    pub fn seal(&self, key: &CacheKey, client_secret: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).expect("the OS random source is available");
        let sealed = self
            .cipher(key, client_secret)
            .encrypt(&Nonce::from(nonce), Payload { msg: plaintext, aad: &self.aad(key) })
            .expect("AES-GCM encryption of a bounded message cannot fail");
        let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
        out.push(self.key_id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens a value sealed by [`Sealer::seal`] for the same key and client secret.
    pub fn open(&self, key: &CacheKey, client_secret: &[u8], sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        if sealed.len() < OVERHEAD {
            return Err(OpenError::Truncated);
        }
        if sealed[0] != self.key_id {
            return Err(OpenError::UnknownKey(sealed[0]));
        }
        let nonce: [u8; NONCE_LEN] = sealed[1..1 + NONCE_LEN].try_into().map_err(|_| OpenError::Truncated)?;
        self.cipher(key, client_secret)
            .decrypt(&Nonce::from(nonce), Payload { msg: &sealed[1 + NONCE_LEN..], aad: &self.aad(key) })
            .map_err(|_| OpenError::Rejected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Keys;
    use proptest::prelude::*;

    fn sealer() -> Sealer {
        Keys::derive(&[42u8; 32]).unwrap().sealer
    }

    fn key(byte: u8) -> CacheKey {
        CacheKey::from_bytes([byte; 32])
    }

    #[test]
    fn round_trip() {
        let s = sealer();
        let sealed = s.seal(&key(1), b"secret", b"hello token");
        assert_eq!(sealed.len(), OVERHEAD + 11);
        assert_eq!(s.open(&key(1), b"secret", &sealed).unwrap(), b"hello token");
    }

    /// Known answer: a value sealed by an independent implementation (Python's `cryptography`
    /// AESGCM with the same HKDF derivation and a fixed nonce) opens here. Pins the entry-key
    /// derivation, the layout and the associated data.
    #[test]
    fn opens_an_independently_sealed_value() {
        let sealed =
            hex::decode("6f000102030405060708090a0b3e81a5844eff6ad00af404f7f5792d97dd02335d3edc71aa8b0ac3").unwrap();
        assert_eq!(sealer().open(&key(1), b"secret", &sealed).unwrap(), b"hello token");
    }

    /// The memo hands out exactly the key derivation would: values open across sealers of the
    /// same root (each with its own memo), repeatedly, also when entries share a memo slot.
    #[test]
    fn memoized_entry_keys_equal_derived_ones() {
        let (a, b) = (sealer(), sealer());
        // Same first two bytes, so the same slot: each use replaces the other's entry.
        let mut bytes = [2u8; 32];
        bytes[..2].copy_from_slice(&[1, 1]);
        let (k1, k2) = (key(1), CacheKey::from_bytes(bytes));
        for _ in 0..3 {
            for (k, secret) in [(k1, &b"s1"[..]), (k2, b"s2"), (k1, b"s3")] {
                let sealed = a.seal(&k, secret, b"payload");
                assert_eq!(a.memo.get_or_derive(&k, secret, unreachable_key), a.derive_entry_key(&k, secret));
                assert_eq!(b.open(&k, secret, &sealed).unwrap(), b"payload");
                assert_eq!(a.open(&k, secret, &sealed).unwrap(), b"payload");
                assert_eq!(a.open(&k, b"other", &sealed), Err(OpenError::Rejected));
                assert_eq!(a.open(&k, secret, &sealed).unwrap(), b"payload");
            }
        }
    }

    /// Stands in for a derivation that must not run: the key is in the memo.
    fn unreachable_key() -> [u8; 32] {
        panic!("the entry key should have come from the memo")
    }

    #[test]
    fn nonces_are_fresh() {
        let s = sealer();
        assert_ne!(s.seal(&key(1), b"s", b"x"), s.seal(&key(1), b"s", b"x"));
    }

    #[test]
    fn another_key_or_secret_cannot_open() {
        let s = sealer();
        let sealed = s.seal(&key(1), b"secret", b"hello");
        assert_eq!(s.open(&key(2), b"secret", &sealed), Err(OpenError::Rejected));
        assert_eq!(s.open(&key(1), b"secreT", &sealed), Err(OpenError::Rejected));
        let other = Keys::derive(&[43u8; 32]).unwrap().sealer;
        assert!(other.open(&key(1), b"secret", &sealed).is_err());
    }

    #[test]
    fn truncated_and_foreign_values_fail_cleanly() {
        let s = sealer();
        let sealed = s.seal(&key(1), b"secret", b"hello");
        assert_eq!(s.open(&key(1), b"secret", &sealed[..OVERHEAD - 1]), Err(OpenError::Truncated));
        assert_eq!(s.open(&key(1), b"secret", &[]), Err(OpenError::Truncated));
        let mut relabelled = sealed.clone();
        relabelled[0] ^= 0xff;
        assert_eq!(s.open(&key(1), b"secret", &relabelled), Err(OpenError::UnknownKey(sealed[0] ^ 0xff)));
    }

    proptest! {
        #[test]
        fn seal_open_round_trips(plain in proptest::collection::vec(any::<u8>(), 0..512), secret in "\\PC{1,32}", k in any::<[u8; 32]>()) {
            let s = sealer();
            let key = CacheKey::from_bytes(k);
            let sealed = s.seal(&key, secret.as_bytes(), &plain);
            prop_assert_eq!(s.open(&key, secret.as_bytes(), &sealed).unwrap(), plain);
        }

        #[test]
        fn any_single_bit_flip_is_rejected(plain in proptest::collection::vec(any::<u8>(), 0..64), bit in any::<usize>()) {
            let s = sealer();
            let mut sealed = s.seal(&key(9), b"secret", &plain);
            let bit = bit % (sealed.len() * 8);
            sealed[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(s.open(&key(9), b"secret", &sealed).is_err());
        }

        #[test]
        fn any_truncation_is_rejected(plain in proptest::collection::vec(any::<u8>(), 1..64), cut in any::<usize>()) {
            let s = sealer();
            let sealed = s.seal(&key(9), b"secret", &plain);
            let cut = cut % sealed.len();
            prop_assert!(s.open(&key(9), b"secret", &sealed[..cut]).is_err());
        }

        #[test]
        fn open_never_panics(garbage in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = sealer().open(&key(3), b"secret", &garbage);
        }
    }
}
