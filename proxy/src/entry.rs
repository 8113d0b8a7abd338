//! A cached token response and its freshness rules (DESIGN.md invariant 2).
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

use bytes::{BufMut, Bytes, BytesMut};
use shared::wire::TokenResponse;

/// Layout version of the plaintext stored (sealed) in Redis.
const STORED_VERSION: u8 = 2;
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
        let mut fields = response.other;
        fields.insert("access_token".into(), response.access_token.into());
        fields.insert("token_type".into(), response.token_type.into());
        let mut json = serde_json::to_vec(&fields).ok()?;
        // `{...}` → `{...,"expires_in":`; fields is never empty, so a comma is always right.
        json.pop();
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

    /// The plaintext to seal into Redis: version, lifetime, body prefix. The expiry travels
    /// beside it as a relative duration (the entry's TTL, or the time left in a notification).
    pub fn to_stored(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(5 + self.body_prefix.len());
        out.push(STORED_VERSION);
        out.extend_from_slice(&u32::try_from(self.lifetime.as_secs()).unwrap_or(u32::MAX).to_be_bytes());
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
        if version != STORED_VERSION || rest.len() < 4 {
            return None;
        }
        let (lifetime, prefix) = rest.split_at(4);
        if !prefix.ends_with(b"\"expires_in\":") {
            return None;
        }
        let lifetime = Duration::from_secs(u64::from(u32::from_be_bytes(lifetime.try_into().ok()?)));
        CachedToken::new(Bytes::copy_from_slice(prefix), now.checked_add(remaining)?, lifetime, freshness)
    }

    /// Rebuilds an entry read from Redis with `ttl` left there: entries are stored to expire
    /// when their token has `min_token_ttl` left (see [`CachedToken::keep_for`]).
    pub fn from_redis(plaintext: &[u8], ttl: Duration, now: Instant, freshness: &Freshness) -> Option<CachedToken> {
        CachedToken::from_stored(plaintext, ttl.checked_add(freshness.min_token_ttl)?, now, freshness)
    }
}

/// A uniform random number in [0, 1).
fn unit_random() -> f64 {
    let mut bytes = [0u8; 4];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    f64::from(u32::from_le_bytes(bytes)) / (f64::from(u32::MAX) + 1.0)
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
