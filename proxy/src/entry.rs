//! A cached token response and its freshness rules (DESIGN.md invariant 2).
//!
//! An entry remembers *when its token expires* as an [`Instant`] on this host, anchored at the
//! moment the upstream request was sent (so upstream latency can only make it expire early,
//! never late). Only relative durations cross machines: Redis holds the entry with a TTL, and
//! the reader turns the remaining TTL back into an instant on its own clock.
//!
//! The body is kept as a template with `expires_in` last, so serving a hit is one small copy
//! with the seconds actually left written in, not a JSON round trip.

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use shared::wire::TokenResponse;

/// Layout version of the plaintext stored (sealed) in Redis.
const STORED_VERSION: u8 = 1;

/// When entries stop being served.
#[derive(Debug, Clone, Copy)]
pub struct Freshness {
    /// Entries end this long before their token expires.
    pub expiry_margin: Duration,
    /// No token with less than this left is ever served.
    pub min_token_ttl: Duration,
}

impl Freshness {
    /// How long before expiry an entry stops being usable: the larger of the two settings.
    fn cutoff(&self) -> Duration {
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
}

impl CachedToken {
    /// Builds an entry from a 200 body, or `None` when the body is not a well-formed token
    /// response (such a response is relayed but never cached).
    pub fn from_upstream(body: &[u8], sent_at: Instant) -> Option<CachedToken> {
        let response: TokenResponse = serde_json::from_slice(body).ok()?;
        if response.access_token.is_empty() || response.token_type.is_empty() || response.expires_in == 0 {
            return None;
        }
        let lifetime = Duration::from_secs(response.expires_in);
        let mut fields = response.other;
        fields.insert("access_token".into(), response.access_token.into());
        fields.insert("token_type".into(), response.token_type.into());
        let mut json = serde_json::to_vec(&fields).ok()?;
        // `{...}` → `{...,"expires_in":`; fields is never empty, so a comma is always right.
        json.pop();
        json.extend_from_slice(b",\"expires_in\":");
        Some(CachedToken { body_prefix: json.into(), expires_at: sent_at.checked_add(lifetime)? })
    }

    /// Time left before the token expires.
    pub fn remaining(&self, now: Instant) -> Duration {
        self.expires_at.saturating_duration_since(now)
    }

    /// How long this entry may still be served, or `None` if it must not be.
    pub fn usable_for(&self, now: Instant, freshness: &Freshness) -> Option<Duration> {
        self.remaining(now).checked_sub(freshness.cutoff()).filter(|d| !d.is_zero())
    }

    /// The response body with `expires_in` set to the whole seconds left, or `None` when the
    /// entry is no longer usable.
    pub fn render(&self, now: Instant, freshness: &Freshness) -> Option<Bytes> {
        self.usable_for(now, freshness)?;
        Some(self.render_unchecked(now))
    }

    /// The body with `expires_in` rewritten, without the freshness check (for a response being
    /// relayed as it arrives, even when it is too short-lived to cache).
    pub fn render_unchecked(&self, now: Instant) -> Bytes {
        let mut digits = itoa::Buffer::new();
        let secs = digits.format(self.remaining(now).as_secs());
        let mut body = BytesMut::with_capacity(self.body_prefix.len() + secs.len() + 1);
        body.put_slice(&self.body_prefix);
        body.put_slice(secs.as_bytes());
        body.put_u8(b'}');
        body.freeze()
    }

    /// The plaintext to seal into Redis: version, then the body prefix. The expiry travels as
    /// the entry's TTL, see [`CachedToken::from_stored`].
    pub fn to_stored(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + self.body_prefix.len());
        out.push(STORED_VERSION);
        out.extend_from_slice(&self.body_prefix);
        out
    }

    /// Rebuilds an entry read from Redis. `ttl` is the entry's remaining TTL there; the entry
    /// was stored to expire `cutoff` before its token, so the token has `ttl + cutoff` left.
    pub fn from_stored(plaintext: &[u8], ttl: Duration, now: Instant, freshness: &Freshness) -> Option<CachedToken> {
        let (&version, prefix) = plaintext.split_first()?;
        if version != STORED_VERSION || !prefix.ends_with(b"\"expires_in\":") {
            return None;
        }
        let expires_at = now.checked_add(ttl)?.checked_add(freshness.cutoff())?;
        Some(CachedToken { body_prefix: Bytes::copy_from_slice(prefix), expires_at })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRESH: Freshness =
        Freshness { expiry_margin: Duration::from_secs(60), min_token_ttl: Duration::from_secs(30) };

    fn parse(body: &Bytes) -> serde_json::Value {
        serde_json::from_slice(body).unwrap()
    }

    #[test]
    fn rewrites_expires_in_to_the_time_left() {
        let t0 = Instant::now();
        let token =
            CachedToken::from_upstream(br#"{"access_token":"a.b.c","expires_in":3600,"token_type":"Bearer"}"#, t0)
                .unwrap();
        let body = token.render(t0 + Duration::from_millis(100_500), &FRESH).unwrap();
        let json = parse(&body);
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
        )
        .unwrap();
        let json = parse(&token.render_unchecked(t0));
        assert_eq!(json["scope"], "a b");
        assert_eq!(json["id_token"], "y");
    }

    #[test]
    fn is_never_served_under_the_cutoff() {
        let t0 = Instant::now();
        let token =
            CachedToken::from_upstream(br#"{"access_token":"x","expires_in":100,"token_type":"Bearer"}"#, t0).unwrap();
        // cutoff = max(60, 30) = 60 s: usable for 40 s.
        assert_eq!(token.usable_for(t0, &FRESH), Some(Duration::from_secs(40)));
        assert!(token.render(t0 + Duration::from_secs(39), &FRESH).is_some());
        assert!(token.render(t0 + Duration::from_secs(40), &FRESH).is_none());
        assert!(token.render(t0 + Duration::from_secs(500), &FRESH).is_none());
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
            assert!(CachedToken::from_upstream(body, t0).is_none(), "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn stored_form_round_trips_through_a_relative_ttl() {
        let t0 = Instant::now();
        let token =
            CachedToken::from_upstream(br#"{"access_token":"x","expires_in":3600,"token_type":"Bearer"}"#, t0).unwrap();
        let stored = token.to_stored();
        let ttl = token.usable_for(t0, &FRESH).unwrap();
        let back = CachedToken::from_stored(&stored, ttl, t0, &FRESH).unwrap();
        assert_eq!(back.remaining(t0), Duration::from_secs(3600));
        assert_eq!(parse(&back.render_unchecked(t0)), parse(&token.render_unchecked(t0)));
        assert!(CachedToken::from_stored(&stored[1..], ttl, t0, &FRESH).is_none());
        assert!(CachedToken::from_stored(&stored[..stored.len() - 1], ttl, t0, &FRESH).is_none());
    }
}
