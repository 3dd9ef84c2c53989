//! Limits kept in Redis for the whole fleet (`cache.shared.fleet_limits`).
//!
//! - **Mint budgets**: one token bucket per budget, `rate` a second with bursts of one second's
//!   worth, as each replica's own buckets ([`crate::rate`]) but shared:
//!   `<prefix>{fleet}:mint:global` for `upstream.mint_rate`, `<prefix>{fleet}:mint:caller:<tag>`
//!   for a caller's `mint_rate`. One script per mint checks the throttle window and both buckets
//!   and spends from both or neither, on Redis's own clock (`TIME`), so replicas' clocks do not
//!   matter. A bucket left alone for two seconds is full and expires.
//! - **Throttle window**: after Truora's 429, `<prefix>{fleet}:throttle` holds the window's end
//!   (Unix ms, by Redis's clock) until it passes; the budget script refuses while it is open, and
//!   a message on the invalidation channel opens every replica's own window at once.
//!
//! Every key carries the `{fleet}` hash tag: in cluster mode they share a slot, so the script
//! runs on one node.

use std::sync::Arc;
use std::time::Duration;

use super::{Inner, SharedError};

/// KEYS: throttle, global bucket[, caller bucket]; ARGV: global rate[, caller rate]. Returns
/// {0, 0} when spent, {1, ms left in the throttle window}, {2, ms until the caller's budget has
/// room}, {3, ms until the global budget has room}.
const SPEND: &str = "local t = redis.call('TIME') \
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) \
local closed = tonumber(redis.call('GET', KEYS[1]) or '0') \
if closed > now then return {1, closed - now} end \
local function level(key, rate) \
  local v = redis.call('HMGET', key, 'tokens', 'at') \
  local tokens, at = tonumber(v[1]), tonumber(v[2]) \
  if tokens == nil or at == nil then return rate end \
  return math.min(rate, tokens + math.max(0, now - at) * rate / 1000) \
end \
local function wait(tokens, rate) return math.ceil((1 - tokens) * 1000 / rate) end \
local function take(key, tokens) \
  redis.call('HSET', key, 'tokens', tostring(tokens - 1), 'at', tostring(now)) \
  redis.call('PEXPIRE', key, 2000) \
end \
local g_rate = tonumber(ARGV[1]) \
local g = level(KEYS[2], g_rate) \
local c, c_rate \
if #KEYS > 2 then \
  c_rate = tonumber(ARGV[2]) \
  c = level(KEYS[3], c_rate) \
  if c < 1 then return {2, wait(c, c_rate)} end \
end \
if g < 1 then return {3, wait(g, g_rate)} end \
take(KEYS[2], g) \
if c then take(KEYS[3], c) end \
return {0, 0}";

/// KEYS: throttle; ARGV: the window's length (ms). Extends the window to now + length (by
/// Redis's clock) unless it already ends later. Returns the window's end (Unix ms).
const THROTTLE: &str = "local t = redis.call('TIME') \
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) \
local closed = now + tonumber(ARGV[1]) \
local current = tonumber(redis.call('GET', KEYS[1]) or '0') \
if current >= closed then return current end \
redis.call('SET', KEYS[1], tostring(closed), 'PX', ARGV[1]) \
return closed";

/// What the fleet's budgets said about one mint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitVerdict {
    /// Spent: mint.
    Allowed,
    /// Truora's throttle window is open for this long still.
    Throttled(Duration),
    /// The caller's own budget is spent; room again after this.
    CallerBudget(Duration),
    /// The global budget is spent; room again after this.
    GlobalBudget(Duration),
}

/// The fleet limits of a tier ([`super::SharedTier::fleet`]): cheap to clone.
#[derive(Clone)]
pub struct FleetHandle(pub(super) Arc<Inner>);

impl FleetHandle {
    /// Spends one mint of `caller`'s budget (when it has a rate) and of the global one, for the
    /// whole fleet, unless Truora's throttle window is open.
    pub async fn spend(
        &self,
        caller: &str,
        caller_rate: Option<u32>,
        global_rate: u32,
    ) -> Result<LimitVerdict, SharedError> {
        let inner = &self.0;
        let keys = &inner.keys;
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(SPEND)
            .arg(if caller_rate.is_some() { 3 } else { 2 })
            .arg(keys.fleet("throttle"))
            .arg(keys.fleet("mint:global"));
        if caller_rate.is_some() {
            let tag = inner.taggers.tag(&[b"caller", caller.as_bytes()]);
            cmd.arg(keys.fleet(&format!("mint:caller:{tag}")));
        }
        cmd.arg(global_rate.max(1));
        if let Some(rate) = caller_rate {
            cmd.arg(rate.max(1));
        }
        let (code, ms): (u8, u64) = inner.call("limit", cmd).await?;
        let d = Duration::from_millis(ms);
        Ok(match code {
            0 => LimitVerdict::Allowed,
            1 => LimitVerdict::Throttled(d),
            2 => LimitVerdict::CallerBudget(d),
            3 => LimitVerdict::GlobalBudget(d),
            _ => return Err(SharedError::Failed),
        })
    }

    /// Opens Truora's throttle window for the fleet for `retry_after`, and tells every replica.
    pub async fn throttle(&self, retry_after: Duration) -> Result<(), SharedError> {
        let inner = &self.0;
        let ms = retry_after.as_millis().clamp(1, u128::from(u64::MAX)) as u64;
        let cmd = redis::cmd("EVAL")
            .arg(THROTTLE)
            .arg(1)
            .arg(inner.keys.fleet("throttle"))
            .arg(ms)
            .clone();
        let until: u64 = inner.call("throttle", cmd).await?;
        inner.publish_throttle(until).await
    }
}
