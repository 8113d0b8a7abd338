//! The purge epochs in Redis (see [`crate::purge`] for what they mean): one hash, its scripts.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use fred::prelude::*;
use fred::types::scripts::Script;

use super::{PURGE_CHANNEL, RedisStore, StoreError, bytes_of, micros};

/// Lua helpers of the purge scripts (see [`crate::purge`]): Redis's clock in µs, exact as a Lua
/// number until the year 2255; epochs written as integers, never in exponent form; epochs that
/// are not plain digit strings below 2^53 (where adding one stops changing a Lua number) count
/// as absent, exactly as the replicas' parser sees them; and the repair of a lost or damaged hash (absent, another type, an unusable `all`):
/// `all` anew from the clock, so entries keyed before the loss stay out of reach, and a version
/// where there is none (a hash written by an earlier release).
const PURGE_LUA_COMMON: &str = r"
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function int(n) return string.format('%.0f', n) end
local function sane(value)
  if type(value) ~= 'string' or not value:match('^%d+$') then return nil end
  local n = tonumber(value)
  if n < 9007199254740992 then return n end
  return nil
end
local function epoch(field) return sane(redis.call('HGET', KEYS[1], field)) or 0 end
local function changed(now)
  redis.call('HSET', KEYS[1], 'v', int(math.max(epoch('v') + 1, now)))
end
local now = now_us()
local kind = redis.call('TYPE', KEYS[1]).ok
if kind ~= 'hash' and kind ~= 'none' then redis.call('DEL', KEYS[1]) end
if not sane(redis.call('HGET', KEYS[1], 'all')) then
  redis.call('HSET', KEYS[1], 'all', int(math.max(epoch('all') + 1, now)))
  changed(now)
elseif not sane(redis.call('HGET', KEYS[1], 'v')) then
  changed(now)
end
";

/// Bumps one purge epoch and announces it. KEYS: epochs hash. ARGV: field, channel, retention
/// (µs), the most tagged fields. A new tagged field first drops the fields older than the
/// retention (or unusable); past the bound it is refused. The new epoch is above every epoch in
/// the hash, not only this field's: a key's epoch is the latest of the fields that cover it
/// (`purge::Epochs::for_request`), so a purge must move it even after a failover to a server
/// whose clock is behind. Returns the new epoch, or -1 when refused.
const PURGE_LUA: &str = r"
local field = ARGV[1]
if field ~= 'all' and redis.call('HEXISTS', KEYS[1], field) == 0 then
  local flat = redis.call('HGETALL', KEYS[1])
  local kept = 0
  for i = 1, #flat, 2 do
    if flat[i] ~= 'all' and flat[i] ~= 'v' then
      if (sane(flat[i + 1]) or 0) < now - tonumber(ARGV[3]) then redis.call('HDEL', KEYS[1], flat[i])
      else kept = kept + 1 end
    end
  end
  if kept >= tonumber(ARGV[4]) then return -1 end
end
local top = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if all[i] ~= 'v' then top = math.max(top, sane(all[i + 1]) or 0) end
end
local new = math.max(epoch(field) + 1, now, top + 1)
redis.call('HSET', KEYS[1], field, int(new))
changed(now)
redis.call('PUBLISH', ARGV[2], field)
return new
";

/// The purge hash if its version differs from the caller's. KEYS: epochs hash. ARGV: the
/// version the caller has ('' for none: always the hash). Returns the hash (flat), or an
/// empty array.
const PURGE_STATE_LUA: &str = r"
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'v') == ARGV[1] then return {} end
return redis.call('HGETALL', KEYS[1])
";

/// Writes back epochs a replica remembers that Redis lost or holds older, unless older than
/// the retention, and announces it so that every replica reads the hash at once. KEYS: epochs
/// hash. ARGV: retention (µs), channel, then field, epoch pairs. Returns the hash (flat).
const RESTORE_PURGES_LUA: &str = r"
local wrote = false
for i = 3, #ARGV, 2 do
  local field, want = ARGV[i], sane(ARGV[i + 1])
  if want and want > epoch(field) and (field == 'all' or want >= now - tonumber(ARGV[1])) then
    redis.call('HSET', KEYS[1], field, int(want))
    wrote = true
  end
end
if wrote then
  changed(now)
  redis.call('PUBLISH', ARGV[2], 'restored')
end
return redis.call('HGETALL', KEYS[1])
";

/// The Redis hash of purge epochs (see [`crate::purge`]): field `all`, field `v` (the
/// version), and one field per purged tag (hex).
pub const EPOCHS_KEY: &str = "tp:purge";
/// The field of the purge hash that changes with every change of it.
const VERSION_FIELD: &str = "v";

/// The purge hash as Redis holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PurgeState {
    /// Changes with every change of the hash.
    pub version: String,
    /// `field → epoch`, without the version.
    pub fields: HashMap<String, u64>,
}

static PURGE: LazyLock<Script> = LazyLock::new(|| Script::from_lua(format!("{PURGE_LUA_COMMON}{PURGE_LUA}")));
static PURGE_STATE: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(format!("{PURGE_LUA_COMMON}{PURGE_STATE_LUA}")));
static RESTORE_PURGES: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(format!("{PURGE_LUA_COMMON}{RESTORE_PURGES_LUA}")));

impl RedisStore {
    /// Bumps the purge epoch `field` and announces it to every replica: see [`PURGE_LUA`].
    /// Returns the new epoch, or `None` when `max_tagged` fields are in use already.
    pub async fn purge(&self, field: &str, retention: Duration, max_tagged: usize) -> Result<Option<u64>, StoreError> {
        let args: Vec<Value> = vec![
            field.into(),
            PURGE_CHANNEL.into(),
            micros(retention).into(),
            i64::try_from(max_tagged).unwrap_or(i64::MAX).into(),
        ];
        let epoch: i64 =
            self.guarded(async { Ok(PURGE.evalsha_with_reload(&self.client, vec![EPOCHS_KEY], args).await?) }).await?;
        if epoch == -1 {
            return Ok(None);
        }
        u64::try_from(epoch).map(Some).map_err(|_| StoreError::UnexpectedReply)
    }

    /// The purge hash, unless its version is `known`: see [`PURGE_STATE_LUA`].
    pub async fn purge_state(&self, known: Option<&str>) -> Result<Option<PurgeState>, StoreError> {
        let args: Vec<Value> = vec![known.unwrap_or("").into()];
        let flat: Vec<Value> = self
            .guarded(async { Ok(PURGE_STATE.evalsha_with_reload(&self.client, vec![EPOCHS_KEY], args).await?) })
            .await?;
        if flat.is_empty() {
            return Ok(None);
        }
        parse_purge_state(flat).map(Some)
    }

    /// Writes back the epochs in `fields` that Redis lost or holds older: see
    /// [`RESTORE_PURGES_LUA`]. Returns the hash afterwards.
    pub async fn restore_purges(
        &self,
        fields: &[(String, u64)],
        retention: Duration,
    ) -> Result<PurgeState, StoreError> {
        let mut args: Vec<Value> = vec![micros(retention).into(), PURGE_CHANNEL.into()];
        for (field, epoch) in fields {
            args.push(field.as_str().into());
            args.push(epoch.to_string().into());
        }
        let flat: Vec<Value> = self
            .guarded(async { Ok(RESTORE_PURGES.evalsha_with_reload(&self.client, vec![EPOCHS_KEY], args).await?) })
            .await?;
        parse_purge_state(flat)
    }
}

/// The purge hash from HGETALL's flat reply; fields that are not `name → integer` are skipped.
fn parse_purge_state(flat: Vec<Value>) -> Result<PurgeState, StoreError> {
    let mut state = PurgeState::default();
    let mut flat = flat.into_iter();
    while let (Some(field), Some(value)) = (flat.next(), flat.next()) {
        let field = bytes_of(field).and_then(|b| String::from_utf8(b.to_vec()).ok());
        let value = bytes_of(value).and_then(|b| String::from_utf8(b.to_vec()).ok());
        let (Some(field), Some(value)) = (field, value) else { continue };
        if field == VERSION_FIELD {
            state.version = value;
        } else if let Some(epoch) =
            value.bytes().all(|b| b.is_ascii_digit()).then(|| value.parse::<u64>().ok()).flatten()
        {
            // The scripts count larger values as absent (see PURGE_LUA_COMMON): so does this
            // replica, which then never writes one back.
            if epoch < 1 << 53 {
                state.fields.insert(field, epoch);
            }
        }
    }
    if state.version.is_empty() {
        return Err(StoreError::UnexpectedReply);
    }
    Ok(state)
}
