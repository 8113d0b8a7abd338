//! `token_proxy::flight_message::decode`: what a follower replica reads from pub/sub after
//! unsealing (and, through `CachedToken::from_stored`, what it reads from Redis).
//!
//! Properties: never panics, for a few valid freshness settings; whatever decodes re-encodes
//! (`flight_message::encode`) to a message that decodes to the same thing (for a token: the same rendered body and the same
//! time left, to the millisecond the wire carries).
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use token_proxy::entry::Freshness;
use token_proxy::flight_message;
use token_proxy::outcome::{Outcome, UpstreamFailure};
use token_proxy::redis_clock::{RedisClock, RedisTime};
use token_proxy::upstream::UpstreamResponse;

const FRESHNESS: [Freshness; 3] = [
    Freshness {
        expiry_margin: Duration::from_secs(60),
        min_token_ttl: Duration::from_secs(30),
        refresh_at: 0.75,
        max_lifetime: Duration::from_secs(86_400),
    },
    Freshness {
        expiry_margin: Duration::ZERO,
        min_token_ttl: Duration::ZERO,
        refresh_at: 1.0,
        max_lifetime: Duration::from_secs(86_400),
    },
    Freshness {
        expiry_margin: Duration::from_secs(300),
        min_token_ttl: Duration::from_secs(600),
        refresh_at: 0.0,
        max_lifetime: Duration::from_secs(86_400),
    },
];

fn same_response(a: &UpstreamResponse, b: &UpstreamResponse) {
    assert_eq!(a.status, b.status);
    assert_eq!(a.body, b.body);
    assert_eq!(a.content_type, b.content_type);
    assert_eq!(a.retry_after, b.retry_after);
    assert_eq!(a.www_authenticate, b.www_authenticate);
}

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let clock = RedisClock::new(RedisTime(1_700_000_000_000_000), now);
    for freshness in &FRESHNESS {
        let Some(message) = flight_message::decode(data, now, &clock, freshness) else { continue };
        let again = flight_message::decode(&flight_message::encode(&message, now, &clock), now, &clock, freshness);
        match &message {
            Outcome::Token(token) => {
                let body = token.render(now);
                assert!(token.remaining(now) <= Duration::from_secs(u64::from(u32::MAX)));
                let _ = (token.is_fresh(now, freshness), token.keep_for(now, freshness), token.to_stored());
                let Some(Outcome::Token(again)) = again else { panic!("a decoded token does not re-decode") };
                assert_eq!(again.render(now), body);
                assert_eq!(again.remaining(now).as_millis(), token.remaining(now).as_millis());
            }
            Outcome::Relayed(response) => {
                let Some(Outcome::Relayed(again)) = again else { panic!("a relayed answer does not re-decode") };
                same_response(response, &again);
            }
            Outcome::Refused(refused) => {
                let Some(Outcome::Refused(again)) = again else { panic!("a refusal does not re-decode") };
                assert_eq!(&again, refused);
            }
            Outcome::Failed(failure) => match (failure, again) {
                (UpstreamFailure::BadStatus(a), Some(Outcome::Failed(UpstreamFailure::BadStatus(b)))) => {
                    same_response(a, &b)
                }
                (UpstreamFailure::Unreachable(a), Some(Outcome::Failed(UpstreamFailure::Unreachable(b)))) => {
                    assert_eq!(*a, b)
                }
                _ => panic!("a failure does not re-decode"),
            },
        }
    }
});
