//! What a flight's leader tells its followers on other replicas: the token, the upstream's
//! answer, or how the upstream failed. Followers get the leader's outcome, errors included, so
//! an upstream error burst costs one call, not one per waiting replica.
//!
//! The message is sealed like a cache entry (bound to its cache key, keyed by the client's
//! secret), so pub/sub traffic is as unreadable as Redis at rest. A token travels with its
//! expiry on Redis's clock, as an entry does (see [`crate::redis_clock`]): the leader places it
//! through its lock's clock, a follower reads it against the clock of its own last lookup, so
//! an old announcement published again is a token that has expired, never a young one.
//!
//! Layout (big-endian), inside the seal:
//! - `1 ‖ entry` — a token, as [`redis_clock::encode_entry`] lays out an entry;
//! - `2 ‖ answer` — the upstream's answer, relayed to callers as it came;
//! - `3 ‖ answer` — the upstream answered with a status a token endpoint must not send (5xx);
//! - `4 ‖ u8 kind` — the upstream did not answer (timeout, connection, unreadable answer);
//! - `5 ‖ u8 reason ‖ u32 ms` — the leader's guards refused the call (throttle, rate cap;
//!   the reason's place in [`REFUSAL_REASONS`]), retry after that long;
//!
//! where `answer = u16 status ‖ 3 × (u16 length ‖ header value) ‖ body`, a length of `0xFFFF`
//! meaning the header was absent.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::StatusCode;
use http::header::HeaderValue;

use crate::entry::{CachedToken, Freshness};
use crate::outcome::{Outcome, REFUSAL_REASONS, Refused, UpstreamFailure};
use crate::redis_clock::{self, RedisClock};
use crate::upstream::{UpstreamError, UpstreamResponse};

const TOKEN: u8 = 1;
const RELAYED: u8 = 2;
const BAD_STATUS: u8 = 3;
const UNREACHABLE: u8 = 4;
const REFUSED: u8 = 5;
const ABSENT: u16 = 0xFFFF;

/// Encodes a flight's outcome; a token with its expiry on Redis's clock (`clock`: the leader's
/// lock reply).
pub fn encode(outcome: &Outcome, now: Instant, clock: &RedisClock) -> Vec<u8> {
    match outcome {
        Outcome::Token(token) => encode_token(token, now, clock),
        Outcome::Relayed(response) => encode_answer(RELAYED, response),
        Outcome::Failed(failure) => encode_failure(failure),
        Outcome::Refused(refused) => encode_refused(refused),
    }
}

fn encode_token(token: &CachedToken, now: Instant, clock: &RedisClock) -> Vec<u8> {
    let mut out = vec![TOKEN];
    out.extend_from_slice(&redis_clock::encode_entry(clock.at(now + token.remaining(now)), &token.to_stored()));
    out
}

/// A refusal by the leader's guards: no upstream call was made.
fn encode_refused(refused: &Refused) -> Vec<u8> {
    let reason = REFUSAL_REASONS.iter().position(|r| *r == refused.reason).unwrap_or(usize::from(u8::MAX));
    let mut out = vec![REFUSED, u8::try_from(reason).unwrap_or(u8::MAX)];
    out.extend_from_slice(&u32::try_from(refused.retry_after.as_millis()).unwrap_or(u32::MAX).to_be_bytes());
    out
}

fn encode_failure(failure: &UpstreamFailure) -> Vec<u8> {
    match failure {
        UpstreamFailure::BadStatus(response) => encode_answer(BAD_STATUS, response),
        UpstreamFailure::Unreachable(error) => vec![
            UNREACHABLE,
            match error {
                UpstreamError::Timeout => 0,
                UpstreamError::Connect => 1,
                UpstreamError::BadResponse => 2,
            },
        ],
    }
}

fn encode_answer(kind: u8, response: &UpstreamResponse) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&response.status.as_u16().to_be_bytes());
    for header in [&response.content_type, &response.retry_after, &response.www_authenticate] {
        match header {
            Some(value) if value.len() < usize::from(ABSENT) => {
                out.extend_from_slice(&u16::try_from(value.len()).unwrap_or(ABSENT).to_be_bytes());
                out.extend_from_slice(value.as_bytes());
            }
            _ => out.extend_from_slice(&ABSENT.to_be_bytes()),
        }
    }
    out.extend_from_slice(&response.body);
    out
}

/// Decodes a message at `now`, with `clock` from the follower's last lookup; `None` for
/// anything malformed.
pub fn decode(message: &[u8], now: Instant, clock: &RedisClock, freshness: &Freshness) -> Option<Outcome> {
    let (&kind, rest) = message.split_first()?;
    match kind {
        TOKEN => {
            let (left, stored) = redis_clock::decode_entry(rest, clock.at(now))?;
            CachedToken::from_stored(stored, left, now, freshness).map(|token| Outcome::Token(Arc::new(token)))
        }
        RELAYED => decode_answer(rest).map(Outcome::Relayed),
        REFUSED => {
            let (&reason, ms) = rest.split_first()?;
            let reason = REFUSAL_REASONS.get(usize::from(reason))?;
            let ms = u32::from_be_bytes(ms.try_into().ok()?);
            let retry_after = std::time::Duration::from_millis(u64::from(ms));
            Some(Outcome::Refused(Refused { reason, retry_after }))
        }
        BAD_STATUS => decode_answer(rest).map(|r| Outcome::Failed(UpstreamFailure::BadStatus(r))),
        UNREACHABLE => {
            let error = match rest {
                [0] => UpstreamError::Timeout,
                [1] => UpstreamError::Connect,
                [2] => UpstreamError::BadResponse,
                _ => return None,
            };
            Some(Outcome::Failed(UpstreamFailure::Unreachable(error)))
        }
        _ => None,
    }
}

fn decode_answer(mut rest: &[u8]) -> Option<UpstreamResponse> {
    let (status, tail) = rest.split_at_checked(2)?;
    let status = StatusCode::from_u16(u16::from_be_bytes(status.try_into().ok()?)).ok()?;
    rest = tail;
    let mut headers: [Option<HeaderValue>; 3] = [None, None, None];
    for header in &mut headers {
        let (len, tail) = rest.split_at_checked(2)?;
        let len = u16::from_be_bytes(len.try_into().ok()?);
        rest = tail;
        if len != ABSENT {
            let (value, tail) = rest.split_at_checked(usize::from(len))?;
            *header = Some(HeaderValue::from_bytes(value).ok()?);
            rest = tail;
        }
    }
    let [content_type, retry_after, www_authenticate] = headers;
    Some(UpstreamResponse { status, body: Bytes::copy_from_slice(rest), content_type, retry_after, www_authenticate })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const FRESH: Freshness = Freshness {
        expiry_margin: Duration::from_secs(60),
        min_token_ttl: Duration::from_secs(30),
        refresh_at: 0.75,
        max_lifetime: Duration::from_secs(86_400),
    };

    /// A clock whose reading of Redis time was taken at `local`.
    fn clock(local: Instant) -> RedisClock {
        RedisClock::new(crate::redis_clock::RedisTime(1_700_000_000_000_000), local)
    }

    #[test]
    fn a_token_round_trips_with_its_time_left() {
        let t0 = Instant::now();
        let token =
            CachedToken::from_upstream(br#"{"access_token":"x","expires_in":3600,"token_type":"Bearer"}"#, t0, &FRESH)
                .unwrap();
        let later = t0 + Duration::from_secs(100);
        let Some(Outcome::Token(back)) = decode(&encode_token(&token, later, &clock(t0)), later, &clock(t0), &FRESH)
        else {
            panic!("not a token")
        };
        assert_eq!(back.remaining(later), Duration::from_secs(3500));
        assert_eq!(back.render(later), token.render(later));
    }

    #[test]
    fn an_announcement_published_again_later_is_a_token_that_has_expired() {
        let t0 = Instant::now();
        let token =
            CachedToken::from_upstream(br#"{"access_token":"x","expires_in":60,"token_type":"Bearer"}"#, t0, &FRESH)
                .unwrap();
        let message = encode_token(&token, t0, &clock(t0));
        // A follower an hour later: its lookup read Redis's clock an hour on.
        let hour = Duration::from_secs(3600);
        let replayed_at = t0 + hour;
        let follower =
            RedisClock::new(crate::redis_clock::RedisTime(1_700_000_000_000_000 + 3_600_000_000), replayed_at);
        if let Some(Outcome::Token(back)) = decode(&message, replayed_at, &follower, &FRESH) {
            assert_eq!(back.remaining(replayed_at), Duration::ZERO, "a replayed token must not look young");
        }
    }

    #[test]
    fn answers_and_failures_round_trip() {
        let response = UpstreamResponse {
            status: StatusCode::BAD_REQUEST,
            body: Bytes::from_static(br#"{"error":"invalid_client"}"#),
            content_type: Some(HeaderValue::from_static("application/json")),
            retry_after: None,
            www_authenticate: Some(HeaderValue::from_static("Basic")),
        };
        let now = Instant::now();
        let Some(Outcome::Relayed(back)) =
            decode(&encode(&Outcome::Relayed(response.clone()), now, &clock(now)), now, &clock(now), &FRESH)
        else {
            panic!()
        };
        assert_eq!(
            (back.status, &back.body, &back.content_type),
            (response.status, &response.body, &response.content_type)
        );
        assert_eq!((back.retry_after, back.www_authenticate), (None, response.www_authenticate.clone()));

        let failure =
            UpstreamFailure::BadStatus(UpstreamResponse { status: StatusCode::SERVICE_UNAVAILABLE, ..response });
        assert!(matches!(
            decode(&encode_failure(&failure), now, &clock(now), &FRESH),
            Some(Outcome::Failed(UpstreamFailure::BadStatus(r))) if r.status == StatusCode::SERVICE_UNAVAILABLE
        ));
        for error in [UpstreamError::Timeout, UpstreamError::Connect, UpstreamError::BadResponse] {
            let encoded = encode_failure(&UpstreamFailure::Unreachable(error));
            assert!(matches!(
                decode(&encoded, now, &clock(now), &FRESH),
                Some(Outcome::Failed(UpstreamFailure::Unreachable(e))) if e == error
            ));
        }
    }

    #[test]
    fn a_refusal_reaches_followers_as_a_refusal() {
        let now = Instant::now();
        for reason in REFUSAL_REASONS {
            let refused = Refused { reason, retry_after: Duration::from_millis(1_500) };
            let Some(Outcome::Refused(back)) = decode(&encode_refused(&refused), now, &clock(now), &FRESH) else {
                panic!("not a refusal")
            };
            assert_eq!(back, refused);
        }
        assert!(decode(&[REFUSED, 9, 0, 0, 0, 1], now, &clock(now), &FRESH).is_none(), "an unknown reason");
    }

    #[test]
    fn malformed_messages_are_refused() {
        let now = Instant::now();
        for message in [
            &[][..],
            &[9],
            &[TOKEN, 0, 0],
            &[RELAYED, 0],
            &[RELAYED, 0, 200, 0, 5, b'a'],
            &[UNREACHABLE, 7],
            &[REFUSED, 0, 0],
        ] {
            assert!(decode(message, now, &clock(now), &FRESH).is_none(), "{message:?}");
        }
    }
}
