//! Redis's clock: how an entry in Redis carries its token's expiry to every replica without
//! comparing the clocks of different hosts (invariant 2).
//!
//! Every sealed entry starts with the instant its token expires, in µs on the clock of the
//! Redis server that holds it; every read of an entry reads that server's `TIME` in the same
//! round trip (after the value). The time left is the difference of two readings of one clock,
//! and it is sealed: neither `PEXPIRE`/`PERSIST` on an entry nor an old sealed value written back
//! can make a token look younger than it is. The entry's TTL only frees memory.
//!
//! A writer turns its token's expiry (an [`Instant`] on its own host) into Redis time through a
//! [`RedisClock`]: the `TIME` the lock script read, and the instant its reply arrived. That
//! reply arrived after the script ran, so the mapping can only place an expiry early, never
//! late. The one caveat is Redis's own: after a failover the new primary's clock is another
//! host's, as it already is for every TTL Redis replicates (Redis propagates absolute expiry
//! times); the expiry margin absorbs the skew of hosts kept in step by NTP.

use std::time::{Duration, Instant};

/// A reading of Redis's clock, in µs since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RedisTime(pub u64);

impl RedisTime {
    /// From `TIME`'s two fields: seconds and µs.
    pub fn from_parts(seconds: u64, micros: u64) -> Option<RedisTime> {
        seconds.checked_mul(1_000_000)?.checked_add(micros).map(RedisTime)
    }

    /// How long from `self` until `later` (zero if it has passed).
    pub fn until(self, later: RedisTime) -> Duration {
        Duration::from_micros(later.0.saturating_sub(self.0))
    }
}

/// A reading of Redis's clock and when it reached this host: maps local instants to Redis time.
#[derive(Debug, Clone, Copy)]
pub struct RedisClock {
    redis: RedisTime,
    /// When the reply carrying `redis` arrived (after Redis read its clock).
    local: Instant,
}

impl RedisClock {
    pub fn new(redis: RedisTime, local: Instant) -> RedisClock {
        RedisClock { redis, local }
    }

    /// `instant` in Redis time, never later than Redis's clock really shows at `instant`.
    pub fn at(&self, instant: Instant) -> RedisTime {
        match instant.checked_duration_since(self.local) {
            Some(after) => RedisTime(self.redis.0.saturating_add(micros(after))),
            None => RedisTime(self.redis.0.saturating_sub(micros(self.local - instant))),
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The first byte of an entry's plaintext: the layout below. Entries sealed before it (which
/// started with the token's layout, 2 or 3, and carried no expiry) no longer open: a miss each.
const ENTRY_LAYOUT: u8 = 0xE1;

/// The plaintext sealed into Redis: the layout byte, the token's expiry in Redis time, then the
/// token's own stored form.
pub fn encode_entry(expires: RedisTime, token: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + token.len());
    out.push(ENTRY_LAYOUT);
    out.extend_from_slice(&expires.0.to_be_bytes());
    out.extend_from_slice(token);
    out
}

/// Reverses [`encode_entry`]: the time left at `now` (Redis time read with the value) and the
/// token's stored form; `None` for another layout.
pub fn decode_entry(plaintext: &[u8], now: RedisTime) -> Option<(Duration, &[u8])> {
    let (expires, token) = plaintext.strip_prefix(&[ENTRY_LAYOUT])?.split_first_chunk::<8>()?;
    Some((now.until(RedisTime(u64::from_be_bytes(*expires))), token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_instants_map_to_redis_time_by_their_distance_from_the_reading() {
        let local = Instant::now();
        let clock = RedisClock::new(RedisTime(1_000_000_000), local);
        assert_eq!(clock.at(local + Duration::from_secs(3)), RedisTime(1_003_000_000));
        assert_eq!(clock.at(local - Duration::from_millis(5)), RedisTime(999_995_000));
    }

    #[test]
    fn an_entry_carries_its_expiry_and_the_time_left_never_goes_below_zero() {
        let plaintext = encode_entry(RedisTime(10_000_000), b"token");
        assert_eq!(decode_entry(&plaintext, RedisTime(7_500_000)), Some((Duration::from_millis(2_500), &b"token"[..])));
        assert_eq!(decode_entry(&plaintext, RedisTime(12_000_000)), Some((Duration::ZERO, &b"token"[..])));
        assert_eq!(decode_entry(&plaintext[..8], RedisTime(0)), None);
        assert_eq!(decode_entry(&plaintext[1..], RedisTime(0)), None, "another layout");
    }

    #[test]
    fn time_fields_combine_into_micros() {
        assert_eq!(RedisTime::from_parts(1_700_000_000, 123_456), Some(RedisTime(1_700_000_000_123_456)));
        assert_eq!(RedisTime::from_parts(u64::MAX, 0), None);
    }
}
