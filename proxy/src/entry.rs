//! A cached token response and its freshness rules (docs/architecture.md, invariant 2).
//!
//! An entry remembers *when its token expires* as an [`Instant`] on this host, anchored at the
//! moment the upstream request was sent (so upstream latency can only make it expire early,
//! never late). Only relative durations cross machines: Redis holds the entry with a TTL, and
//! the reader turns the remaining TTL back into an instant on its own clock.
//!
//! A token's life has three phases:
//!
//! ```text
//! issued ──── fresh ──── refresh point ──── fresh ──── fresh cutoff ── stale ── min TTL ── expiry
//!             (HIT)      (HIT + one background refresh)  (a request fetches anew;   (never served)
//!                                                         the old token is served
//!                                                         only if the upstream fails)
//! ```
//!
//! The body is kept as a template with `expires_in` last, so serving a hit is one small copy
//! with the seconds actually left written in, not a JSON round trip.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use shared::wire::TokenResponse;

/// Layout versions of the plaintext stored (sealed) in Redis: the body prefix as is, or with
/// a JWT access token stored decoded (a quarter smaller; Redis memory is mostly the token).
const STORED_RAW: u8 = 2;
const STORED_JWT: u8 = 3;
/// Every body prefix starts with the access token, so that a JWT can be stored decoded.
const PREFIX_HEAD: &[u8] = b"{\"access_token\":\"";
const BASE64URL: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
/// Refresh points are drawn at random from this share of a lifetime below the configured
/// one, so that keys created together do not all refresh together.
const REFRESH_SPREAD: f64 = 0.1;

/// When entries are served, refreshed and dropped.
#[derive(Debug, Clone, Copy)]
pub struct Freshness {
    /// A token with less than this left is no longer fresh: the next request fetches anew.
    pub expiry_margin: Duration,
    /// No token with less than this left is ever served, even when the upstream is down.
    pub min_token_ttl: Duration,
    /// Share of its lifetime after which a hit also starts a background refresh (1.0 = never).
    pub refresh_at: f64,
}

impl Freshness {
    /// Time left below which a token is no longer fresh.
    pub fn fresh_cutoff(&self) -> Duration {
        self.expiry_margin.max(self.min_token_ttl)
    }
}

/// A token response held in a cache.
#[derive(Debug)]
pub struct CachedToken {
    /// The JSON body up to and including `"expires_in":`.
    body_prefix: Bytes,
    /// When the token itself expires, on this host's monotonic clock.
    expires_at: Instant,
    /// The lifetime the token was issued with.
    lifetime: Duration,
    /// After this a hit starts one background refresh.
    refresh_at: Instant,
    /// Set by the first hit past `refresh_at`, so one entry starts at most one refresh.
    refresh_claimed: AtomicBool,
}

impl CachedToken {
    /// Builds an entry from a 200 body, or `None` when the body is not a well-formed token
    /// response (such a response is relayed but never cached).
    pub fn from_upstream(body: &[u8], sent_at: Instant, freshness: &Freshness) -> Option<CachedToken> {
        let response: TokenResponse = serde_json::from_slice(body).ok()?;
        if response.access_token.is_empty() || response.token_type.is_empty() || response.expires_in == 0 {
            return None;
        }
        let lifetime = Duration::from_secs(response.expires_in.min(u64::from(u32::MAX)));
        let mut rest = response.other;
        rest.insert("token_type".into(), response.token_type.into());
        // `{"access_token":TOKEN,` + the other fields + `,"expires_in":` (rest is never empty).
        let mut json = b"{\"access_token\":".to_vec();
        json.extend_from_slice(&serde_json::to_vec(&response.access_token).ok()?);
        json.push(b',');
        let rest = serde_json::to_vec(&rest).ok()?;
        json.extend_from_slice(&rest[1..rest.len() - 1]);
        json.extend_from_slice(b",\"expires_in\":");
        CachedToken::new(json.into(), sent_at.checked_add(lifetime)?, lifetime, freshness)
    }

    fn new(body_prefix: Bytes, expires_at: Instant, lifetime: Duration, freshness: &Freshness) -> Option<CachedToken> {
        let issued_at = expires_at.checked_sub(lifetime).unwrap_or(expires_at);
        let share = if freshness.refresh_at >= 1.0 {
            1.0
        } else {
            (freshness.refresh_at - REFRESH_SPREAD * unit_random()).max(0.0)
        };
        let refresh_at = issued_at + lifetime.mul_f64(share);
        Some(CachedToken { body_prefix, expires_at, lifetime, refresh_at, refresh_claimed: AtomicBool::new(false) })
    }

    /// Time left before the token expires.
    pub fn remaining(&self, now: Instant) -> Duration {
        self.expires_at.saturating_duration_since(now)
    }

    /// Whether the token is fresh: served as a hit.
    pub fn is_fresh(&self, now: Instant, freshness: &Freshness) -> bool {
        self.remaining(now) > freshness.fresh_cutoff()
    }

    /// Whether the token may still be served when the upstream fails.
    pub fn is_servable(&self, now: Instant, freshness: &Freshness) -> bool {
        self.remaining(now) > freshness.min_token_ttl
    }

    /// How long the entry may be kept (in Redis, in L1): until only the minimum is left.
    pub fn keep_for(&self, now: Instant, freshness: &Freshness) -> Option<Duration> {
        self.remaining(now).checked_sub(freshness.min_token_ttl).filter(|d| !d.is_zero())
    }

    /// True once, for the first caller past the refresh point.
    pub fn claim_refresh(&self, now: Instant) -> bool {
        now >= self.refresh_at && !self.refresh_claimed.swap(true, Ordering::Relaxed)
    }

    /// The response body with `expires_in` set to the whole seconds left.
    pub fn render(&self, now: Instant) -> Bytes {
        let mut digits = itoa::Buffer::new();
        let secs = digits.format(self.remaining(now).as_secs());
        let mut body = BytesMut::with_capacity(self.body_prefix.len() + secs.len() + 1);
        body.put_slice(&self.body_prefix);
        body.put_slice(secs.as_bytes());
        body.put_u8(b'}');
        body.freeze()
    }

    /// The plaintext to seal into Redis: layout version, lifetime, then the body prefix, with
    /// a JWT access token decoded when decoding is exactly reversible. The expiry travels beside
    /// it as a relative duration (the entry's TTL, or the time left in a notification).
    pub fn to_stored(&self) -> Vec<u8> {
        let lifetime = u32::try_from(self.lifetime.as_secs()).unwrap_or(u32::MAX).to_be_bytes();
        if let Some(compact) = compact_jwt(&self.body_prefix) {
            let mut out = Vec::with_capacity(5 + compact.len());
            out.push(STORED_JWT);
            out.extend_from_slice(&lifetime);
            out.extend_from_slice(&compact);
            return out;
        }
        let mut out = Vec::with_capacity(5 + self.body_prefix.len());
        out.push(STORED_RAW);
        out.extend_from_slice(&lifetime);
        out.extend_from_slice(&self.body_prefix);
        out
    }

    /// Rebuilds an entry whose token has `remaining` left, from [`CachedToken::to_stored`].
    pub fn from_stored(
        plaintext: &[u8],
        remaining: Duration,
        now: Instant,
        freshness: &Freshness,
    ) -> Option<CachedToken> {
        let (&version, rest) = plaintext.split_first()?;
        let (lifetime, body) = rest.split_at_checked(4)?;
        let lifetime = Duration::from_secs(u64::from(u32::from_be_bytes(lifetime.try_into().ok()?)));
        let prefix = match version {
            STORED_RAW => Bytes::copy_from_slice(body),
            STORED_JWT => expand_jwt(body)?,
            _ => return None,
        };
        if !prefix.starts_with(PREFIX_HEAD) || !prefix.ends_with(b"\"expires_in\":") {
            return None;
        }
        CachedToken::new(prefix, now.checked_add(remaining)?, lifetime, freshness)
    }

    /// Rebuilds an entry read from Redis with `ttl` left there: entries are stored to expire
    /// when their token has `min_token_ttl` left (see [`CachedToken::keep_for`]).
    pub fn from_redis(plaintext: &[u8], ttl: Duration, now: Instant, freshness: &Freshness) -> Option<CachedToken> {
        CachedToken::from_stored(plaintext, ttl.checked_add(freshness.min_token_ttl)?, now, freshness)
    }
}

/// `prefix` with its access token stored as the three decoded segments of a JWT:
/// `(u16 length ‖ bytes) × 3 ‖ the rest of the prefix after the token's closing quote`.
/// `None` unless the token is a JWT whose segments re-encode to exactly the same text.
fn compact_jwt(prefix: &[u8]) -> Option<Vec<u8>> {
    let after = prefix.strip_prefix(PREFIX_HEAD)?;
    let end = after.iter().position(|&b| b == b'"')?;
    let (token, rest) = after.split_at(end);
    let segments: Vec<&[u8]> = token.split(|&b| b == b'.').collect();
    if segments.len() != 3 {
        return None;
    }
    let mut out = Vec::with_capacity(prefix.len());
    for segment in segments {
        let raw = BASE64URL.decode(segment).ok()?;
        if BASE64URL.encode(&raw).as_bytes() != segment {
            return None;
        }
        out.extend_from_slice(&u16::try_from(raw.len()).ok()?.to_be_bytes());
        out.extend_from_slice(&raw);
    }
    out.extend_from_slice(rest);
    Some(out)
}

/// Reverses [`compact_jwt`]. Runs on every hit read from Redis, so the segments are encoded
/// straight into the one buffer, sized up front: no allocation per segment, no copy.
fn expand_jwt(compact: &[u8]) -> Option<Bytes> {
    let mut segments: [&[u8]; 3] = [&[]; 3];
    let mut rest = compact;
    for segment in &mut segments {
        let (len, tail) = rest.split_at_checked(2)?;
        (*segment, rest) = tail.split_at_checked(usize::from(u16::from_be_bytes(len.try_into().ok()?)))?;
    }
    let encoded: usize = segments.iter().map(|s| base64::encoded_len(s.len(), false)).sum::<Option<usize>>()?;
    let mut prefix = BytesMut::with_capacity(PREFIX_HEAD.len() + encoded + 2 + rest.len());
    prefix.put_slice(PREFIX_HEAD);
    for (i, segment) in segments.iter().enumerate() {
        if i > 0 {
            prefix.put_u8(b'.');
        }
        let start = prefix.len();
        prefix.resize(start + base64::encoded_len(segment.len(), false)?, 0);
        BASE64URL.encode_slice(segment, &mut prefix[start..]).ok()?;
    }
    prefix.put_slice(rest);
    Some(prefix.freeze())
}

/// A uniform random number in [0, 1), to spread refresh points (and queued upstream calls);
/// nothing secret rests on it.
///
/// Every hit read from Redis builds an entry, so this avoids a `getrandom` system call per
/// request: each `RandomState::new()` is SipHash under a fresh key (the thread's random key,
/// seeded once from the OS, with a counter added), which is random enough for spreading.
pub(crate) fn unit_random() -> f64 {
    use std::hash::BuildHasher as _;
    let bits = std::hash::RandomState::new().hash_one(()) >> 11;
    // 53 random bits: exactly representable, and below 1.
    bits as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRESH: Freshness =
        Freshness { expiry_margin: Duration::from_secs(60), min_token_ttl: Duration::from_secs(30), refresh_at: 0.75 };

    fn parse(body: &Bytes) -> serde_json::Value {
        serde_json::from_slice(body).unwrap()
    }

    fn token(t0: Instant, expires_in: u64) -> CachedToken {
        let body = format!(r#"{{"access_token":"x","expires_in":{expires_in},"token_type":"Bearer"}}"#);
        CachedToken::from_upstream(body.as_bytes(), t0, &FRESH).unwrap()
    }

    #[test]
    fn rewrites_expires_in_to_the_time_left() {
        let t0 = Instant::now();
        let token = CachedToken::from_upstream(
            br#"{"access_token":"a.b.c","expires_in":3600,"token_type":"Bearer"}"#,
            t0,
            &FRESH,
        )
        .unwrap();
        let json = parse(&token.render(t0 + Duration::from_millis(100_500)));
        assert_eq!(json["expires_in"], 3499);
        assert_eq!(json["access_token"], "a.b.c");
        assert_eq!(json["token_type"], "Bearer");
    }

    #[test]
    fn keeps_extra_fields() {
        let t0 = Instant::now();
        let token = CachedToken::from_upstream(
            br#"{"access_token":"x","expires_in":100,"token_type":"Bearer","scope":"a b","id_token":"y"}"#,
            t0,
            &FRESH,
        )
        .unwrap();
        let json = parse(&token.render(t0));
        assert_eq!(json["scope"], "a b");
        assert_eq!(json["id_token"], "y");
    }

    #[test]
    fn phases_follow_the_settings() {
        let t0 = Instant::now();
        let token = token(t0, 100);
        let at = |s| t0 + Duration::from_secs(s);
        // Fresh until 60 s are left, servable until 30 s are left, kept until then.
        assert!(token.is_fresh(at(39), &FRESH));
        assert!(!token.is_fresh(at(40), &FRESH));
        assert!(token.is_servable(at(69), &FRESH));
        assert!(!token.is_servable(at(70), &FRESH));
        assert_eq!(token.keep_for(t0, &FRESH), Some(Duration::from_secs(70)));
        assert_eq!(token.keep_for(at(70), &FRESH), None);
    }

    #[test]
    fn refresh_is_claimed_once_between_65_and_75_percent() {
        let t0 = Instant::now();
        for _ in 0..50 {
            let token = token(t0, 1000);
            assert!(!token.claim_refresh(t0 + Duration::from_secs(649)));
            assert!(token.claim_refresh(t0 + Duration::from_secs(750)));
            assert!(!token.claim_refresh(t0 + Duration::from_secs(751)));
        }
    }

    #[test]
    fn refresh_points_are_spread() {
        let t0 = Instant::now();
        let points: std::collections::BTreeSet<_> = (0..20).map(|_| token(t0, 1000).refresh_at).collect();
        assert!(points.len() > 10, "refresh points should differ between entries");
    }

    #[test]
    fn refuses_malformed_token_responses() {
        let t0 = Instant::now();
        for body in [
            &br#"{"access_token":"x","token_type":"Bearer"}"#[..],
            br#"{"access_token":"","expires_in":10,"token_type":"Bearer"}"#,
            br#"{"access_token":"x","expires_in":0,"token_type":"Bearer"}"#,
            br#"{"access_token":"x","expires_in":"10","token_type":"Bearer"}"#,
            br#"{"access_token":"x","expires_in":-5,"token_type":"Bearer"}"#,
            br#"{"access_token":"x","expires_in":10}"#,
            br#"not json"#,
            br#"[]"#,
        ] {
            assert!(CachedToken::from_upstream(body, t0, &FRESH).is_none(), "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn jwts_are_stored_decoded_and_come_back_byte_for_byte() {
        let t0 = Instant::now();
        let jwt =
            "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhcHAiLCJzY29wZSI6ImEgYiJ9.c2lnbmF0dXJlLWJ5dGVzLWhlcmUtMTIzNDU2Nzg5MA";
        let body = format!(r#"{{"access_token":"{jwt}","expires_in":3600,"token_type":"Bearer","scope":"a b"}}"#);
        let token = CachedToken::from_upstream(body.as_bytes(), t0, &FRESH).unwrap();
        let stored = token.to_stored();
        assert_eq!(stored[0], STORED_JWT);
        assert!(stored.len() + 20 < token.body_prefix.len(), "{} vs {}", stored.len(), token.body_prefix.len());
        let back = CachedToken::from_stored(&stored, Duration::from_secs(3600), t0, &FRESH).unwrap();
        assert_eq!(back.body_prefix, token.body_prefix);
    }

    #[test]
    fn other_tokens_are_stored_as_they_are() {
        let t0 = Instant::now();
        for access_token in ["opaque-token", "a.b", "a.b.c=", "a.b.c.d", "with \\\"quote\\\" and \\\\ slash", "x.y+.z"]
        {
            let body = serde_json::json!({"access_token": access_token, "expires_in": 100, "token_type": "Bearer"});
            let token = CachedToken::from_upstream(body.to_string().as_bytes(), t0, &FRESH).unwrap();
            let stored = token.to_stored();
            let back = CachedToken::from_stored(&stored, Duration::from_secs(100), t0, &FRESH).unwrap();
            assert_eq!(back.body_prefix, token.body_prefix, "{access_token}");
            assert_eq!(parse(&back.render(t0))["access_token"], access_token);
        }
    }

    #[test]
    fn stored_form_round_trips_through_a_relative_ttl() {
        let t0 = Instant::now();
        let token = token(t0, 3600);
        let stored = token.to_stored();
        let ttl = token.keep_for(t0, &FRESH).unwrap();
        let back = CachedToken::from_redis(&stored, ttl, t0, &FRESH).unwrap();
        assert_eq!(back.remaining(t0), Duration::from_secs(3600));
        assert_eq!(back.lifetime, Duration::from_secs(3600));
        assert_eq!(parse(&back.render(t0)), parse(&token.render(t0)));
        assert!(CachedToken::from_redis(&stored[1..], ttl, t0, &FRESH).is_none());
        assert!(CachedToken::from_redis(&stored[..stored.len() - 1], ttl, t0, &FRESH).is_none());
        assert!(CachedToken::from_redis(&stored[..3], ttl, t0, &FRESH).is_none());
    }
}
