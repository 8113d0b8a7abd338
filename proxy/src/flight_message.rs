//! What a flight's leader tells its followers on other replicas: the token, the upstream's
//! answer, or how the upstream failed. Followers get the leader's outcome, errors included, so
//! an upstream error burst costs one call, not one per waiting replica.
//!
//! The message is sealed like a cache entry (bound to its cache key, keyed by the client's
//! secret), so pub/sub traffic is as unreadable as Redis at rest. A token travels with the
//! time it has left, a relative duration, never an absolute time.
//!
//! Layout (big-endian), inside the seal:
//! - `1 ‖ u64 ms left ‖ stored entry` — a token (see [`CachedToken::to_stored`]);
//! - `2 ‖ answer` — the upstream's answer, relayed to callers as it came;
//! - `3 ‖ answer` — the upstream answered with a status a token endpoint must not send (5xx);
//! - `4 ‖ u8 kind` — the upstream did not answer (timeout, connection, unreadable answer);
//!
//! where `answer = u16 status ‖ 3 × (u16 length ‖ header value) ‖ body`, a length of `0xFFFF`
//! meaning the header was absent.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use http::header::HeaderValue;

use crate::entry::{CachedToken, Freshness};
use crate::response::UpstreamFailure;
use crate::upstream::{UpstreamError, UpstreamResponse};

const TOKEN: u8 = 1;
const RELAYED: u8 = 2;
const BAD_STATUS: u8 = 3;
const UNREACHABLE: u8 = 4;
const ABSENT: u16 = 0xFFFF;

/// A flight's outcome as it crosses replicas.
#[derive(Debug)]
pub enum FlightMessage {
    Token(CachedToken),
    Relayed(UpstreamResponse),
    Failed(UpstreamFailure),
}

/// Encodes a token with the time it has left.
pub fn encode_token(token: &CachedToken, now: Instant) -> Vec<u8> {
    let mut out = vec![TOKEN];
    out.extend_from_slice(&u64::try_from(token.remaining(now).as_millis()).unwrap_or(u64::MAX).to_be_bytes());
    out.extend_from_slice(&token.to_stored());
    out
}

pub fn encode_relayed(response: &UpstreamResponse) -> Vec<u8> {
    encode_answer(RELAYED, response)
}

pub fn encode_failure(failure: &UpstreamFailure) -> Vec<u8> {
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

/// Decodes a message; `None` for anything malformed.
pub fn decode(message: &[u8], now: Instant, freshness: &Freshness) -> Option<FlightMessage> {
    let (&kind, rest) = message.split_first()?;
    match kind {
        TOKEN => {
            let (left, stored) = rest.split_at_checked(8)?;
            let left = Duration::from_millis(u64::from_be_bytes(left.try_into().ok()?));
            CachedToken::from_stored(stored, left, now, freshness).map(FlightMessage::Token)
        }
        RELAYED => decode_answer(rest).map(FlightMessage::Relayed),
        BAD_STATUS => decode_answer(rest).map(|r| FlightMessage::Failed(UpstreamFailure::BadStatus(r))),
        UNREACHABLE => {
            let error = match rest {
                [0] => UpstreamError::Timeout,
                [1] => UpstreamError::Connect,
                [2] => UpstreamError::BadResponse,
                _ => return None,
            };
            Some(FlightMessage::Failed(UpstreamFailure::Unreachable(error)))
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
    use super::*;

    const FRESH: Freshness = Freshness {
        expiry_margin: Duration::from_secs(60),
        min_token_ttl: Duration::from_secs(30),
        refresh_at: 0.75,
        max_lifetime: Duration::from_secs(86_400),
    };

    #[test]
    fn a_token_round_trips_with_its_time_left() {
        let t0 = Instant::now();
        let token =
            CachedToken::from_upstream(br#"{"access_token":"x","expires_in":3600,"token_type":"Bearer"}"#, t0, &FRESH)
                .unwrap();
        let later = t0 + Duration::from_secs(100);
        let Some(FlightMessage::Token(back)) = decode(&encode_token(&token, later), later, &FRESH) else {
            panic!("not a token")
        };
        assert_eq!(back.remaining(later), Duration::from_secs(3500));
        assert_eq!(back.render(later), token.render(later));
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
        let Some(FlightMessage::Relayed(back)) = decode(&encode_relayed(&response), now, &FRESH) else { panic!() };
        assert_eq!(
            (back.status, &back.body, &back.content_type),
            (response.status, &response.body, &response.content_type)
        );
        assert_eq!((back.retry_after, back.www_authenticate), (None, response.www_authenticate.clone()));

        let failure =
            UpstreamFailure::BadStatus(UpstreamResponse { status: StatusCode::SERVICE_UNAVAILABLE, ..response });
        assert!(matches!(
            decode(&encode_failure(&failure), now, &FRESH),
            Some(FlightMessage::Failed(UpstreamFailure::BadStatus(r))) if r.status == StatusCode::SERVICE_UNAVAILABLE
        ));
        for error in [UpstreamError::Timeout, UpstreamError::Connect, UpstreamError::BadResponse] {
            let encoded = encode_failure(&UpstreamFailure::Unreachable(error));
            assert!(matches!(
                decode(&encoded, now, &FRESH),
                Some(FlightMessage::Failed(UpstreamFailure::Unreachable(e))) if e == error
            ));
        }
    }

    #[test]
    fn malformed_messages_are_refused() {
        let now = Instant::now();
        for message in [&[][..], &[9], &[TOKEN, 0, 0], &[RELAYED, 0], &[RELAYED, 0, 200, 0, 5, b'a'], &[UNREACHABLE, 7]]
        {
            assert!(decode(message, now, &FRESH).is_none(), "{message:?}");
        }
    }
}
