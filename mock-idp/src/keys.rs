//! The RS256 signing key: loading it from PEM, its key id, its JWKS entry, and signing.
//!
//! The default key is a fixture compiled into the binary, so start-up needs no key generation
//! (ring cannot generate RSA keys anyway). Its private half is in the repository: tokens signed
//! with it prove nothing, which is fine for a test tool and one more reason never to run
//! mock-idp in production.

use std::fmt;
use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::digest::{SHA256, digest};
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair, RsaPublicKeyComponents};

/// The development key (2048-bit RSA, PKCS#8 PEM) used unless `MOCK_IDP_SIGNING_KEY_FILE` says
/// otherwise.
pub(crate) const EMBEDDED_KEY_PEM: &str = include_str!("../fixtures/dev-signing-key.pem");

/// An RSA private key that signs tokens with RS256. Cheap to clone.
#[derive(Clone)]
pub struct SigningKey {
    inner: Arc<Inner>,
}

struct Inner {
    pair: RsaKeyPair,
    /// First 16 hex digits of the SHA-256 of the public key (DER `RSAPublicKey`): stable for a
    /// key, different between keys, so verifiers can pick the right JWKS entry.
    kid: String,
    /// The public key as a JWK, computed once: the JWKS endpoint is polled by verifiers.
    jwk: serde_json::Value,
    /// PKCS#1 v1.5 padding is deterministic, but ring's signing API asks for a generator.
    rng: SystemRandom,
}

/// Why a PEM text could not be used as a signing key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("no `-----BEGIN PRIVATE KEY-----` (PKCS#8) or `-----BEGIN RSA PRIVATE KEY-----` block")]
    NotPem,
    #[error("the PEM block is not valid base64")]
    BadBase64,
    #[error("not a usable RSA private key: {0}")]
    Rejected(String),
    #[error("RSA signing failed")]
    Sign,
}

impl SigningKey {
    /// The embedded development key. Parsed once per process, then shared.
    pub fn embedded() -> SigningKey {
        static KEY: OnceLock<SigningKey> = OnceLock::new();
        KEY.get_or_init(|| {
            // A compile-time constant, checked by this module's tests: failing here is a
            // broken build, not bad input.
            SigningKey::from_pem(EMBEDDED_KEY_PEM).expect("the embedded development key is valid")
        })
        .clone()
    }

    /// Reads an RSA private key from PEM: PKCS#8 (`PRIVATE KEY`) or PKCS#1 (`RSA PRIVATE KEY`).
    pub fn from_pem(pem: &str) -> Result<SigningKey, KeyError> {
        let (label, der) = decode_pem(pem)?;
        let pair = match label {
            "PRIVATE KEY" => RsaKeyPair::from_pkcs8(&der),
            _ => RsaKeyPair::from_der(&der),
        }
        .map_err(|rejected| KeyError::Rejected(rejected.to_string()))?;

        let fingerprint = digest(&SHA256, pair.public().as_ref());
        let kid = hex::encode(&fingerprint.as_ref()[..8]);
        let public = RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
        let jwk = serde_json::json!({
            "kty": "RSA",
            "alg": "RS256",
            "use": "sig",
            "kid": kid,
            "n": URL_SAFE_NO_PAD.encode(&public.n),
            "e": URL_SAFE_NO_PAD.encode(&public.e),
        });
        Ok(SigningKey { inner: Arc::new(Inner { pair, kid, jwk, rng: SystemRandom::new() }) })
    }

    /// The key id put in every token header and in the JWKS entry.
    pub fn kid(&self) -> &str {
        &self.inner.kid
    }

    /// The public key as a JWK (`kty`, `alg`, `use`, `kid`, `n`, `e`).
    pub fn jwk(&self) -> &serde_json::Value {
        &self.inner.jwk
    }

    /// RS256 (RSASSA-PKCS1-v1_5 with SHA-256) signature of `message`.
    pub(crate) fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        let mut signature = vec![0; self.inner.pair.public().modulus_len()];
        self.inner
            .pair
            .sign(&RSA_PKCS1_SHA256, &self.inner.rng, message, &mut signature)
            .map_err(|_| KeyError::Sign)?;
        Ok(signature)
    }
}

/// Only the key id: the private key must never reach a log.
impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey").field("kid", &self.inner.kid).finish_non_exhaustive()
    }
}

/// Finds the first supported PEM block and returns its label and DER bytes.
fn decode_pem(pem: &str) -> Result<(&'static str, Vec<u8>), KeyError> {
    for label in ["PRIVATE KEY", "RSA PRIVATE KEY"] {
        let begin = format!("-----BEGIN {label}-----");
        let end = format!("-----END {label}-----");
        let Some(start) = pem.find(&begin) else { continue };
        let body = &pem[start + begin.len()..];
        let stop = body.find(&end).ok_or(KeyError::NotPem)?;
        let base64: String = body[..stop].chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let der = STANDARD.decode(base64).map_err(|_| KeyError::BadBase64)?;
        return Ok((label, der));
    }
    Err(KeyError::NotPem)
}

#[cfg(test)]
mod tests {
    use ring::signature::RSA_PKCS1_2048_8192_SHA256;

    use super::*;

    #[test]
    fn the_embedded_key_loads_and_has_a_16_hex_digit_kid() {
        let key = SigningKey::embedded();
        assert_eq!(key.kid().len(), 16);
        assert!(key.kid().bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        let jwk = key.jwk();
        assert_eq!(jwk["kty"], "RSA");
        assert_eq!(jwk["alg"], "RS256");
        assert_eq!(jwk["use"], "sig");
        assert_eq!(jwk["kid"], key.kid());
        // 65537 is the only exponent anyone uses.
        assert_eq!(jwk["e"], "AQAB");
        // A 2048-bit modulus is 256 bytes: 342 base64url characters without padding.
        assert_eq!(jwk["n"].as_str().unwrap().len(), 342);
    }

    #[test]
    fn signatures_verify_with_the_published_components() {
        let key = SigningKey::embedded();
        let signature = key.sign(b"header.claims").unwrap();
        let n = URL_SAFE_NO_PAD.decode(key.jwk()["n"].as_str().unwrap()).unwrap();
        let e = URL_SAFE_NO_PAD.decode(key.jwk()["e"].as_str().unwrap()).unwrap();
        let public = RsaPublicKeyComponents { n: &n, e: &e };
        public.verify(&RSA_PKCS1_2048_8192_SHA256, b"header.claims", &signature).unwrap();
        assert!(public.verify(&RSA_PKCS1_2048_8192_SHA256, b"header.claimz", &signature).is_err());
    }

    #[test]
    fn refuses_what_is_not_an_rsa_private_key() {
        assert_eq!(SigningKey::from_pem("hello").unwrap_err(), KeyError::NotPem);
        assert_eq!(
            SigningKey::from_pem("-----BEGIN PRIVATE KEY-----\n!!!\n-----END PRIVATE KEY-----").unwrap_err(),
            KeyError::BadBase64
        );
        assert!(matches!(
            SigningKey::from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----"),
            Err(KeyError::Rejected(_))
        ));
        assert_eq!(SigningKey::from_pem("-----BEGIN PRIVATE KEY-----\nAAAA").unwrap_err(), KeyError::NotPem);
    }

    #[test]
    fn debug_shows_only_the_kid() {
        let debug = format!("{:?}", SigningKey::embedded());
        assert!(debug.contains("kid"));
        assert!(debug.len() < 80, "{debug}");
    }
}
