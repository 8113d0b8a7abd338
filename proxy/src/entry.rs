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
//! The upstream's body is kept exactly as it came, with the span of its top-level `expires_in`
//! value: serving a hit is one small copy with the seconds actually left written into that
//! span, not a JSON round trip, and every other byte (key order, spacing, escapes, numbers no
//! JSON library would print the same way) reaches the client unchanged (DESIGN.md invariant 8).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Layout versions of the plaintext stored (sealed) in Redis: the body as is, or with a JWT
/// access token stored decoded (a quarter smaller; Redis memory is mostly the token). Versions
/// 2 and 3 held a re-serialized body; they are no longer read (a miss).
const STORED_RAW: u8 = 4;
const STORED_JWT: u8 = 5;
/// Bytes before the body in every stored layout: version, lifetime, `expires_in` span.
const STORED_HEAD: usize = 1 + 4 + 4 + 4;
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
    /// Longest lifetime a token is cached with, whatever its `expires_in` says.
    pub max_lifetime: Duration,
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
    /// The upstream's body, byte for byte.
    body: Bytes,
    /// Where the top-level `expires_in` value is in `body`: replaced by the seconds left.
    expires_in: Range<usize>,
    /// Where the access token's text (inside its quotes) is in `body`, when known: a JWT there
    /// is stored decoded. Unknown for entries read back in the raw layout (nothing to compact).
    access_token: Option<Range<usize>>,
    /// When the token itself expires, on this host's monotonic clock.
    expires_at: Instant,
    /// The lifetime the token was issued with, capped at [`Freshness::max_lifetime`].
    lifetime: Duration,
    /// After this a hit starts one background refresh.
    refresh_at: Instant,
    /// Set by the first hit past `refresh_at`, so one entry starts at most one refresh.
    refresh_claimed: AtomicBool,
}

impl CachedToken {
    /// Builds an entry from a 200 body, or `None` when the body is not plainly one token
    /// response (such a response is relayed as is but never cached): not a JSON object; an
    /// `error` member; `access_token`, `token_type` or `expires_in` missing, empty, of the wrong
    /// type, or there more than once (clients would disagree on which one counts).
    pub fn from_upstream(body: &[u8], sent_at: Instant, freshness: &Freshness) -> Option<CachedToken> {
        let TopLevel(members) = serde_json::from_slice(body).ok()?;
        // access_token, token_type, expires_in
        let mut found: [Option<&RawValue>; 3] = [None; 3];
        for (name, value) in members {
            let slot = match name.as_str() {
                "access_token" => 0,
                "token_type" => 1,
                "expires_in" => 2,
                // An OAuth error sent with status 200 is not a token, whatever else it holds.
                "error" => return None,
                _ => continue,
            };
            if found[slot].replace(value).is_some() {
                return None;
            }
        }
        let [Some(access_token), Some(token_type), Some(expires_in)] = found else { return None };
        let non_empty = |value: &RawValue| serde_json::from_str::<String>(value.get()).is_ok_and(|s| !s.is_empty());
        if !non_empty(access_token) || !non_empty(token_type) {
            return None;
        }
        let seconds: u64 = serde_json::from_str(expires_in.get()).ok().filter(|&s| s > 0)?;
        let lifetime = Duration::from_secs(seconds).min(freshness.max_lifetime);
        // The token's text without its quotes (a non-empty string is at least 3 bytes).
        let token = span_in(body, access_token).map(|s| s.start + 1..s.end - 1)?;
        let expires_in = span_in(body, expires_in)?;
        let expires_at = sent_at.checked_add(lifetime)?;
        CachedToken::new(Bytes::copy_from_slice(body), expires_in, Some(token), expires_at, lifetime, freshness)
    }

    fn new(
        body: Bytes,
        expires_in: Range<usize>,
        access_token: Option<Range<usize>>,
        expires_at: Instant,
        lifetime: Duration,
        freshness: &Freshness,
    ) -> Option<CachedToken> {
        let issued_at = expires_at.checked_sub(lifetime).unwrap_or(expires_at);
        let share = if freshness.refresh_at >= 1.0 {
            1.0
        } else {
            (freshness.refresh_at - REFRESH_SPREAD * unit_random()).max(0.0)
        };
        let refresh_at = issued_at + lifetime.mul_f64(share);
        Some(CachedToken {
            body,
            expires_in,
            access_token,
            expires_at,
            lifetime,
            refresh_at,
            refresh_claimed: AtomicBool::new(false),
        })
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

    /// The upstream's body with `expires_in` set to the whole seconds left.
    pub fn render(&self, now: Instant) -> Bytes {
        let mut digits = itoa::Buffer::new();
        let secs = digits.format(self.remaining(now).as_secs());
        let (head, tail) = (&self.body[..self.expires_in.start], &self.body[self.expires_in.end..]);
        let mut body = BytesMut::with_capacity(head.len() + secs.len() + tail.len());
        body.put_slice(head);
        body.put_slice(secs.as_bytes());
        body.put_slice(tail);
        body.freeze()
    }

    /// The plaintext to seal into Redis: `version ‖ u32 lifetime (s) ‖ u32 start ‖ u32 end of
    /// expires_in`, then the body, with a JWT access token decoded when decoding is exactly
    /// reversible (see [`compact_jwt`]). The expiry travels beside it as a relative duration
    /// (the entry's TTL, or the time left in a notification).
    pub fn to_stored(&self) -> Vec<u8> {
        let compact = self.access_token.as_ref().and_then(|token| compact_jwt(&self.body, token));
        let mut out = Vec::with_capacity(STORED_HEAD + compact.as_ref().map_or(self.body.len(), Vec::len));
        out.push(if compact.is_some() { STORED_JWT } else { STORED_RAW });
        out.extend_from_slice(&u32::try_from(self.lifetime.as_secs()).unwrap_or(u32::MAX).to_be_bytes());
        for at in [self.expires_in.start, self.expires_in.end] {
            // Bodies are at most 64 KiB (see `upstream::MAX_RESPONSE_BYTES`).
            out.extend_from_slice(&u32::try_from(at).unwrap_or(u32::MAX).to_be_bytes());
        }
        out.extend_from_slice(compact.as_deref().unwrap_or(&self.body));
        out
    }

    /// Rebuilds an entry whose token has `remaining` left, from [`CachedToken::to_stored`].
    /// The time left never exceeds the stored lifetime (nor the configured maximum), whatever
    /// `remaining` says: a stretched Redis TTL cannot make a token look younger than it is.
    pub fn from_stored(
        plaintext: &[u8],
        remaining: Duration,
        now: Instant,
        freshness: &Freshness,
    ) -> Option<CachedToken> {
        let (head, rest) = plaintext.split_at_checked(STORED_HEAD)?;
        let word = |at: usize| head.get(at..at + 4)?.try_into().ok().map(u32::from_be_bytes);
        let lifetime = Duration::from_secs(u64::from(word(1)?)).min(freshness.max_lifetime);
        let expires_in = usize::try_from(word(5)?).ok()?..usize::try_from(word(9)?).ok()?;
        let (body, access_token) = match head[0] {
            STORED_RAW => (Bytes::copy_from_slice(rest), None),
            STORED_JWT => {
                let (body, token) = expand_jwt(rest)?;
                (body, Some(token))
            }
            _ => return None,
        };
        if expires_in.start >= expires_in.end || expires_in.end > body.len() {
            return None;
        }
        let expires_at = now.checked_add(remaining.min(lifetime))?;
        CachedToken::new(body, expires_in, access_token, expires_at, lifetime, freshness)
    }
}

/// The members of a top-level JSON object in their order, duplicates kept, each value as the
/// exact text it came as (a slice of the body, so its position can be taken).
struct TopLevel<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for TopLevel<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> Visitor<'de> for Members {
            type Value = TopLevel<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TopLevel<'de>, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry()? {
                    members.push(member);
                }
                Ok(TopLevel(members))
            }
        }
        deserializer.deserialize_map(Members)
    }
}

/// Where `value`, a slice of `body`, lies in it.
fn span_in(body: &[u8], value: &RawValue) -> Option<Range<usize>> {
    let start = (value.get().as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    let end = start.checked_add(value.get().len()).filter(|&end| end <= body.len())?;
    Some(start..end)
}

/// `body` with the access token at `token` stored as the three decoded segments of a JWT:
/// `u32 where the token was ‖ (u16 length ‖ bytes) × 3 ‖ the body without the token's text`.
/// `None` unless the token is a JWT whose segments re-encode to exactly the same text.
fn compact_jwt(body: &[u8], token: &Range<usize>) -> Option<Vec<u8>> {
    let text = body.get(token.clone())?;
    let segments: Vec<&[u8]> = text.split(|&b| b == b'.').collect();
    if segments.len() != 3 {
        return None;
    }
    let mut out = Vec::with_capacity(body.len());
    out.extend_from_slice(&u32::try_from(token.start).ok()?.to_be_bytes());
    for segment in segments {
        let raw = BASE64URL.decode(segment).ok()?;
        if BASE64URL.encode(&raw).as_bytes() != segment {
            return None;
        }
        out.extend_from_slice(&u16::try_from(raw.len()).ok()?.to_be_bytes());
        out.extend_from_slice(&raw);
    }
    out.extend_from_slice(&body[..token.start]);
    out.extend_from_slice(&body[token.end..]);
    Some(out)
}

/// Reverses [`compact_jwt`]: the body and where its token is. Runs on every hit read from
/// Redis, so the segments are encoded straight into the one buffer, sized up front: no
/// allocation per segment, no copy.
fn expand_jwt(compact: &[u8]) -> Option<(Bytes, Range<usize>)> {
    let (at, mut rest) = compact.split_at_checked(4)?;
    let at = usize::try_from(u32::from_be_bytes(at.try_into().ok()?)).ok()?;
    let mut segments: [&[u8]; 3] = [&[]; 3];
    for segment in &mut segments {
        let (len, tail) = rest.split_at_checked(2)?;
        (*segment, rest) = tail.split_at_checked(usize::from(u16::from_be_bytes(len.try_into().ok()?)))?;
    }
    let (before, after) = rest.split_at_checked(at)?;
    let encoded: usize = segments.iter().map(|s| base64::encoded_len(s.len(), false)).sum::<Option<usize>>()?;
    let mut body = BytesMut::with_capacity(rest.len() + encoded + 2);
    body.put_slice(before);
    for (i, segment) in segments.iter().enumerate() {
        if i > 0 {
            body.put_u8(b'.');
        }
        let start = body.len();
        body.resize(start + base64::encoded_len(segment.len(), false)?, 0);
        BASE64URL.encode_slice(segment, &mut body[start..]).ok()?;
    }
    let token = at..body.len();
    body.put_slice(after);
    Some((body.freeze(), token))
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

    const FRESH: Freshness = Freshness {
        expiry_margin: Duration::from_secs(60),
        min_token_ttl: Duration::from_secs(30),
        refresh_at: 0.75,
        max_lifetime: Duration::from_secs(86_400),
    };

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
        // A quarter of the token saved, less the lengths and where the token was (10 bytes).
        assert!(stored.len() < STORED_HEAD + token.body.len() - 15, "{} vs {}", stored.len(), token.body.len());
        let back = CachedToken::from_stored(&stored, Duration::from_secs(3600), t0, &FRESH).unwrap();
        assert_eq!(back.body, token.body);
        assert_eq!(back.render(t0), token.render(t0));
        // And again from what came back: the same compact form.
        assert_eq!(back.to_stored(), stored);
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
            assert_eq!(back.body, token.body, "{access_token}");
            assert_eq!(back.to_stored(), stored, "{access_token}");
            assert_eq!(parse(&back.render(t0))["access_token"], access_token);
        }
    }

    #[test]
    fn stored_form_round_trips_with_the_time_left() {
        let t0 = Instant::now();
        let token = token(t0, 3600);
        let stored = token.to_stored();
        let left = token.remaining(t0);
        let back = CachedToken::from_stored(&stored, left, t0, &FRESH).unwrap();
        assert_eq!(back.remaining(t0), Duration::from_secs(3600));
        assert_eq!(back.lifetime, Duration::from_secs(3600));
        assert_eq!(parse(&back.render(t0)), parse(&token.render(t0)));
        assert!(CachedToken::from_stored(&stored[1..], left, t0, &FRESH).is_none());
        // Cut before the end of `expires_in` (the seal catches any other cut).
        assert!(CachedToken::from_stored(&stored[..STORED_HEAD + 20], left, t0, &FRESH).is_none());
        assert!(CachedToken::from_stored(&stored[..3], left, t0, &FRESH).is_none());
    }

    /// Splits a rendered body around its `expires_in` digits, given the text before them.
    fn around_expires_in<'a>(rendered: &'a [u8], head: &str) -> (&'a [u8], u64) {
        let rest = rendered.strip_prefix(head.as_bytes()).expect("the head is unchanged");
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        (&rest[digits..], std::str::from_utf8(&rest[..digits]).unwrap().parse().unwrap())
    }

    #[test]
    fn relays_everything_but_expires_in_byte_for_byte() {
        let t0 = Instant::now();
        let jwt_tail =
            concat!(r#","access_token":"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhcHAifQ.c2lnbmF0dXJl""#, r#","id":1.10}"#);
        let cases = [
            // Numbers no float can hold, in forms a serializer would rewrite.
            (
                r#"{"big":12345678901234567890123,"neg":-0.0,"exp":1E+400,"access_token":"x","expires_in":"#,
                r#","token_type":"Bearer"}"#,
            ),
            // Key order, and duplicated extra fields.
            (
                r#"{"z":1,"token_type":"Bearer","a":2,"z":3,"scope":"a","scope":"b","expires_in":"#,
                r#","access_token":"x"}"#,
            ),
            // Escapes as sent: unicode, a surrogate pair, a slash, in keys and values.
            (
                r#"{"\u0073cope":"caf\u00e9 \ud83d\ude00 a\/b","access_token":"x\/y","token_type":"Bea\u0072er","expires_in":"#,
                "}",
            ),
            // Whitespace everywhere, and after the closing brace.
            (
                " \n{ \"access_token\" :\t\"x\" ,\r\n \"token_type\":\"Bearer\", \"expires_in\" :  ",
                " , \"n\" : [ 1 , { } ] }\n",
            ),
            // A JWT (stored decoded) that is not the first member.
            (r#"{"token_type":"Bearer","expires_in":"#, jwt_tail),
        ];
        for (head, tail) in cases {
            let body = format!("{head}3600{tail}");
            let token = CachedToken::from_upstream(body.as_bytes(), t0, &FRESH).unwrap_or_else(|| panic!("{body}"));
            let later = t0 + Duration::from_millis(100_500);
            let rendered = token.render(later);
            let (rest, seconds) = around_expires_in(&rendered, head);
            assert_eq!((rest, seconds), (tail.as_bytes(), 3499), "{body}");
            // The same bytes after a trip through Redis or a flight message.
            let back = CachedToken::from_stored(&token.to_stored(), token.remaining(later), later, &FRESH).unwrap();
            assert_eq!(back.render(later), token.render(later), "{body}");
        }
    }

    #[test]
    fn bodies_that_are_not_plainly_one_token_are_not_cached() {
        let t0 = Instant::now();
        for body in [
            // An error with status 200.
            &br#"{"access_token":"x","expires_in":10,"token_type":"Bearer","error":"invalid_client"}"#[..],
            // The members clients read, more than once (also when written with an escape).
            br#"{"access_token":"x","expires_in":10,"token_type":"Bearer","expires_in":99999}"#,
            br#"{"access_token":"x","expires_in":10,"token_type":"Bearer","access_token":"y"}"#,
            br#"{"access_token":"x","expires_in":10,"token_type":"Bearer","token_type":"mac"}"#,
            br#"{"access_token":"x","expires_in":10,"token_type":"Bearer","expires\u005fin":99999}"#,
            // Not one object.
            br#"{"access_token":"x","expires_in":10,"token_type":"Bearer"} {}"#,
            br#""{\"access_token\":\"x\"}""#,
            // Lifetimes that are not whole positive seconds.
            br#"{"access_token":"x","expires_in":10.0,"token_type":"Bearer"}"#,
            br#"{"access_token":"x","expires_in":1e3,"token_type":"Bearer"}"#,
            br#"{"access_token":"x","expires_in":123456789012345678901234567890,"token_type":"Bearer"}"#,
            br#"{"access_token":7,"expires_in":10,"token_type":"Bearer"}"#,
        ] {
            assert!(CachedToken::from_upstream(body, t0, &FRESH).is_none(), "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn lifetimes_are_capped_at_the_maximum() {
        let t0 = Instant::now();
        let capped = Freshness { max_lifetime: Duration::from_secs(120), ..FRESH };
        let token = CachedToken::from_upstream(
            br#"{"access_token":"x","expires_in":31536000,"token_type":"Bearer"}"#,
            t0,
            &capped,
        )
        .unwrap();
        assert_eq!(parse(&token.render(t0))["expires_in"], 120);
        assert_eq!(token.keep_for(t0, &capped), Some(Duration::from_secs(90)));
        // Read back with a TTL stretched far beyond the lifetime: still at most 120 s left.
        let stored = token.to_stored();
        let back = CachedToken::from_stored(&stored, Duration::from_secs(31_536_000), t0, &capped).unwrap();
        assert_eq!(back.remaining(t0), Duration::from_secs(120));
        assert_eq!(parse(&back.render(t0))["expires_in"], 120);
        // A maximum lowered since the entry was stored applies too.
        let lower = Freshness { max_lifetime: Duration::from_secs(100), ..FRESH };
        let back = CachedToken::from_stored(&stored, Duration::from_secs(120), t0, &lower).unwrap();
        assert_eq!(back.remaining(t0), Duration::from_secs(100));
    }

    #[test]
    fn stored_forms_that_do_not_fit_are_refused() {
        let t0 = Instant::now();
        let long = Duration::from_secs(100);
        let stored = token(t0, 100).to_stored();
        let mut bad_span = stored.clone();
        bad_span[9..13].copy_from_slice(&u32::MAX.to_be_bytes());
        let mut empty_span = stored.clone();
        empty_span[9..13].copy_from_slice(&stored[5..9]);
        let mut old_version = stored.clone();
        old_version[0] = 3;
        for bad in [&bad_span[..], &empty_span, &old_version, &stored[..STORED_HEAD], &[STORED_JWT; 40]] {
            assert!(CachedToken::from_stored(bad, long, t0, &FRESH).is_none(), "{bad:?}");
        }
    }

    proptest::proptest! {
        /// Whatever a stored form holds (it is authenticated, but the code must not rely on
        /// that to stay in bounds), reading it never panics, never yields more time left than
        /// its lifetime, and what it yields stores and reads back to the same body.
        #[test]
        fn any_stored_form_reads_without_panicking(
            version in 3u8..7,
            lifetime in proptest::prelude::any::<u32>(),
            start in 0u32..64,
            len in 0u32..8,
            rest in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..128),
        ) {
            let t0 = Instant::now();
            let words = [lifetime, start, start + len].map(u32::to_be_bytes).concat();
            let stored = [&[version][..], &words, &rest].concat();
            if let Some(token) = CachedToken::from_stored(&stored, Duration::from_secs(u64::MAX / 4), t0, &FRESH) {
                proptest::prop_assert!(token.remaining(t0) <= token.lifetime);
                let again = CachedToken::from_stored(&token.to_stored(), token.remaining(t0), t0, &FRESH).unwrap();
                proptest::prop_assert_eq!(again.render(t0), token.render(t0));
            }
        }
    }
}
