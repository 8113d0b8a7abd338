//! The quota's counters in Redis (see [`crate::quota`]): failed-authentication attempts per
//! client and source, the cluster-wide upstream rate cap, and the per-client call budgets.

use std::sync::LazyLock;
use std::time::Duration;

use fred::prelude::*;
use fred::types::scripts::Script;
use shared::keys::Tag;

use super::{RedisStore, StoreError, millis};

/// Admits one authentication attempt against a client's counters (hashes with fields `f`,
/// failures, and `p`, attempts in flight), per source and per client. Refused when failures
/// reached a limit. Busy when failures plus attempts in flight fill the per-client limit, or
/// the per-source limit once that source has failed: a concurrent burst of guesses cannot
/// overshoot while its first calls are being answered, and an honest source (no failures)
/// is slowed only by the per-client limit. Else counted as in flight.
/// KEYS: per-source hash, per-client hash. ARGV: their limits (0 = none), window (ms).
/// Returns {0} counted, {1, ms left in the window} refused, {2} busy.
const AUTH_ATTEMPT_LUA: &str = r"
local f, p = {}, {}
for i = 1, 2 do
  f[i] = tonumber(redis.call('HGET', KEYS[i], 'f') or '0')
  p[i] = tonumber(redis.call('HGET', KEYS[i], 'p') or '0')
  local limit = tonumber(ARGV[i])
  if limit > 0 and f[i] >= limit then return {1, math.max(redis.call('PTTL', KEYS[i]), 1)} end
end
if tonumber(ARGV[1]) > 0 and f[1] > 0 and f[1] + p[1] >= tonumber(ARGV[1]) then return {2} end
if tonumber(ARGV[2]) > 0 and f[2] + p[2] >= tonumber(ARGV[2]) then return {2} end
for i = 1, 2 do
  if tonumber(ARGV[i]) > 0 then
    redis.call('HINCRBY', KEYS[i], 'p', 1)
    if redis.call('PTTL', KEYS[i]) < 0 then redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
  end
end
return {0}
";

/// Settles an attempt admitted by [`AUTH_ATTEMPT_LUA`]: no longer in flight, and a failure
/// if it failed. A counter left with nothing is deleted, so successful calls leave no trace.
/// KEYS: as for the attempt. ARGV: 1 if it failed else 0, window (ms), the two limits.
const AUTH_SETTLE_LUA: &str = r"
for i = 1, 2 do
  if tonumber(ARGV[i + 2]) > 0 then
    local p = redis.call('HINCRBY', KEYS[i], 'p', -1)
    if p < 0 then redis.call('HSET', KEYS[i], 'p', 0) end
    if ARGV[1] == '1' then redis.call('HINCRBY', KEYS[i], 'f', 1) end
    if redis.call('PTTL', KEYS[i]) < 0 then redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
    if p <= 0 and tonumber(redis.call('HGET', KEYS[i], 'f') or '0') == 0 then redis.call('DEL', KEYS[i]) end
  end
end
return 0
";

/// Takes one slot of the cluster-wide upstream rate cap, in windows of one second of Redis's
/// own clock (no replica's clock is involved). KEYS: the counter hash. ARGV: calls per second.
/// Returns 0 when a slot was taken, else the ms until the next window.
const RATE_SLOT_LUA: &str = r"
local now = redis.call('TIME')
if redis.call('HGET', KEYS[1], 'w') ~= now[1] then
  redis.call('HSET', KEYS[1], 'w', now[1], 'n', 0)
  redis.call('PEXPIRE', KEYS[1], 2000)
end
if redis.call('HINCRBY', KEYS[1], 'n', 1) <= tonumber(ARGV[1]) then return 0 end
return math.max(1000 - math.floor(tonumber(now[2]) / 1000), 1)
";

/// Takes one call of a client's budget: a sliding window of Redis's own clock, as a sorted set
/// of the calls made (score: ms), so it holds at most `budget` members. KEYS: the set.
/// ARGV: budget, window (ms), a member unique to this call. Returns 0 when the call was
/// counted, else the ms until the oldest call leaves the window.
const BUDGET_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[2])
if redis.call('TYPE', KEYS[1]).ok ~= 'zset' then redis.call('DEL', KEYS[1]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(tonumber(oldest[2]) + window - now, 1)
";

/// The hash that counts this second's upstream calls (`tp:rate:NAME` for a named upstream).
const RATE_KEY: &str = "tp:rate";

/// What the failed-authentication counters say about one more attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Counted as in flight: go ahead.
    Counted,
    /// Too many failures: refused for the rest of the window.
    Refused(Duration),
    /// Failures plus attempts in flight fill a limit: wait for one to settle.
    Busy,
}

/// The Redis names of one client's failed-authentication counters: per source, per client.
/// Keyed-hash tags, hash-tagged by client so both live in one Redis Cluster slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthCounters {
    per_source: String,
    per_client: String,
}

impl AuthCounters {
    pub fn new(client: Tag, source: Tag) -> AuthCounters {
        let client = hex::encode(client);
        AuthCounters {
            per_source: format!("tp:auth:{{{client}}}:{}", hex::encode(source)),
            per_client: format!("tp:auth:{{{client}}}"),
        }
    }

    fn names(&self) -> Vec<&str> {
        vec![self.per_source.as_str(), self.per_client.as_str()]
    }
}

static AUTH_ATTEMPT: LazyLock<Script> = LazyLock::new(|| Script::from_lua(AUTH_ATTEMPT_LUA));
static AUTH_SETTLE: LazyLock<Script> = LazyLock::new(|| Script::from_lua(AUTH_SETTLE_LUA));
static RATE_SLOT: LazyLock<Script> = LazyLock::new(|| Script::from_lua(RATE_SLOT_LUA));
static BUDGET: LazyLock<Script> = LazyLock::new(|| Script::from_lua(BUDGET_LUA));
/// Gives a call back to a budget: the upstream refused the credentials, so the call was not the
/// client's (anyone who knows a client_id could otherwise spend its budget with wrong secrets).
static BUDGET_REFUND: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua("return redis.call('ZREM', KEYS[1], ARGV[1])"));

impl RedisStore {
    /// Admits an authentication attempt against `counters`: see [`AUTH_ATTEMPT_LUA`].
    pub async fn auth_attempt(
        &self,
        counters: &AuthCounters,
        limits: [u32; 2],
        window: Duration,
    ) -> Result<Verdict, StoreError> {
        let args: Vec<Value> = vec![limits[0].into(), limits[1].into(), millis(window).into()];
        let reply: Vec<i64> = self
            .guarded(async { Ok(AUTH_ATTEMPT.evalsha_with_reload(&self.client, counters.names(), args).await?) })
            .await?;
        match reply.as_slice() {
            [0] => Ok(Verdict::Counted),
            [1, left] => Ok(Verdict::Refused(Duration::from_millis(left.unsigned_abs()))),
            [2] => Ok(Verdict::Busy),
            _ => Err(StoreError::UnexpectedReply),
        }
    }

    /// Settles an attempt [`RedisStore::auth_attempt`] counted: see [`AUTH_SETTLE_LUA`].
    pub async fn auth_settle(
        &self,
        counters: &AuthCounters,
        failed: bool,
        limits: [u32; 2],
        window: Duration,
    ) -> Result<(), StoreError> {
        let args: Vec<Value> =
            vec![i64::from(failed).into(), millis(window).into(), limits[0].into(), limits[1].into()];
        self.guarded(async { Ok(AUTH_SETTLE.evalsha_with_reload(&self.client, counters.names(), args).await?) }).await
    }

    /// Takes a slot of the cluster-wide rate cap of `upstream` (its name; `None` for the one
    /// upstream of a deployment without names): see [`RATE_SLOT_LUA`]. `Some(wait)` = none
    /// left before the next window, `wait` from now.
    pub async fn rate_slot(&self, upstream: Option<&str>, per_second: u32) -> Result<Option<Duration>, StoreError> {
        let key = match upstream {
            None => RATE_KEY.to_owned(),
            Some(name) => format!("{RATE_KEY}:{name}"),
        };
        let wait: i64 = self
            .guarded(async { Ok(RATE_SLOT.evalsha_with_reload(&self.client, vec![key], per_second).await?) })
            .await?;
        Ok((wait > 0).then(|| Duration::from_millis(wait.unsigned_abs())))
    }

    /// Takes one call of the budget named `tag` (see [`BUDGET_LUA`]), recorded as `call` (unique
    /// to it): `Some(wait)` = spent, a call frees up `wait` from now.
    pub async fn budget_call(
        &self,
        tag: Tag,
        call: &str,
        budget: u32,
        window: Duration,
    ) -> Result<Option<Duration>, StoreError> {
        let key = budget_key(tag);
        let args: Vec<Value> = vec![budget.into(), millis(window).into(), call.into()];
        let wait: i64 =
            self.guarded(async { Ok(BUDGET.evalsha_with_reload(&self.client, vec![key], args).await?) }).await?;
        Ok((wait > 0).then(|| Duration::from_millis(wait.unsigned_abs())))
    }

    /// Gives the call `call` back to the budget named `tag` (see [`BUDGET_REFUND`]).
    pub async fn budget_refund(&self, tag: Tag, call: &str) -> Result<(), StoreError> {
        let (keys, args) = (vec![budget_key(tag)], vec![Value::from(call)]);
        let _: i64 =
            self.guarded(async { Ok(BUDGET_REFUND.evalsha_with_reload(&self.client, keys, args).await?) }).await?;
        Ok(())
    }
}

/// A client's budget at an upstream: `tp:budget:{hex tag}` (the tag is a keyed hash).
fn budget_key(tag: Tag) -> String {
    format!("tp:budget:{{{}}}", hex::encode(tag))
}
