//! Invalidation across the fleet: recording it in Redis so that it wins over mints in flight on
//! every replica, deleting the values it matches, and telling every replica to drop its local
//! entries (and listening for the others' messages).
//!
//! Every invalidation gets the next number of `<prefix>inv:seq` and is recorded in the sorted
//! set `<prefix>inv:log` as tags of what it names (never the caller, flow, user or key
//! themselves):
//! the latest [`LOG_CAPACITY`] are kept, and `<prefix>inv:floor` remembers the newest one let
//! go. A mint takes the current number when it starts ([`SharedTier::mark`]); a value minted
//! since a matching invalidation is never served, and one whose `since` the log no longer reaches
//! is not served either (the safe side).
//!
//! During a key rotation (previous keys configured) an invalidation is recorded under every
//! key's tags (one log member each, of the same number), walks the indexes of every key's tags,
//! and a value is checked against every key's tags of its owner; its message is published
//! sealed under every key, each copy carrying one id so a replica holding several keys applies
//! it once. Replicas that share at least one key thus see each other's invalidations.
//!
//! The same channel carries Truora's throttle windows (`fleet_limits`): a message naming the
//! window's end instead of an owner.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::store::unix_ms;
use super::{Inner, OnThrottle, SharedError, SharedTier};
use crate::cache::{CacheKey, Dropped, Filter, Owner, TokenCache};
use crate::secret::{from_hex, hex};

const MESSAGE_AAD: &[u8] = b"token-broker/shared-cache/invalidate/v1\0";
/// Values fetched per MGET when invalidating.
const BATCH: usize = 256;
/// Invalidations the log keeps: far more than can come during one mint's deadline.
pub const LOG_CAPACITY: u32 = 4096;
/// What a log record says for a field the invalidation does not name: any value.
const ANY: &str = "-";
/// What an owner says for a field it has not (a token naming its user by email or phone only):
/// never equal to a tag, so a filter by account never matches it.
const NONE: &str = "none";

/// Message ids remembered to apply each message once (it comes once per key during a rotation).
const SEEN: usize = 256;

/// Records an invalidation. KEYS: seq, log, floor; ARGV: capacity, then a caller tag, flow tag,
/// account tag and cache-key tag per encryption key. Returns its number.
const RECORD: &str = "local seq = redis.call('INCR', KEYS[1]) \
for i = 2, #ARGV, 4 do \
  redis.call('ZADD', KEYS[2], seq, seq .. '|' .. ARGV[i] .. '|' .. ARGV[i + 1] .. '|' .. ARGV[i + 2] .. '|' .. ARGV[i + 3]) \
end \
local excess = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[1]) \
if excess > 0 then \
  local gone = redis.call('ZRANGE', KEYS[2], 0, excess - 1, 'WITHSCORES') \
  redis.call('SET', KEYS[3], gone[#gone]) \
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, excess - 1) \
end \
return seq";

/// Whether an owner's value minted since ARGV[1] is dropped by a later invalidation, or the
/// log no longer reaches back to it. KEYS: log, floor; ARGV: since, then the owner's caller
/// tag, flow tag, account tag and the value's cache-key tag under each encryption key.
const SINCE: &str = "local since = tonumber(ARGV[1]) \
if tonumber(redis.call('GET', KEYS[2]) or '0') > since then return 1 end \
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf')) do \
  local c, f, a, k = string.match(m, '^%d+|([^|]+)|([^|]+)|([^|]+)|([^|]+)$') \
  for i = 2, #ARGV, 4 do \
    if (c == '-' or c == ARGV[i]) and (f == '-' or f == ARGV[i + 1]) and (a == '-' or a == ARGV[i + 2]) and (k == '-' or k == ARGV[i + 3]) then return 1 end \
  end \
end \
return 0";

/// The sealed JSON of a message: an invalidation (an owner's fields), or Truora's throttle
/// window (its end). Replicas of versions before the window ignore it: it names no owner.
#[derive(Serialize, Deserialize)]
struct Message {
    origin: String,
    /// The same in every copy of one message (one per key during a rotation).
    #[serde(default)]
    id: String,
    /// The one cache key (hex), for a key's invalidation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    caller: Option<String>,
    flow_id: Option<String>,
    account_id: Option<String>,
    /// Only tokens minted at or before this time, Unix ms (a process that ended then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    minted_before_ms: Option<u64>,
    /// The process whose end this is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    process: Option<String>,
    /// The end of Truora's throttle window, Unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    throttle_until_ms: Option<u64>,
}

impl SharedTier {
    /// The invalidation number now: a mint takes it when it starts and stores it with its value.
    pub async fn mark(&self) -> Result<u64, SharedError> {
        let cmd = redis::cmd("GET").arg(self.inner.keys.log().0).clone();
        let seq: Option<u64> = self.inner.call("mark", cmd).await?;
        Ok(seq.unwrap_or(0))
    }

    /// True when an invalidation after `since` drops `owner`'s token, or the log no longer
    /// reaches back to `since`.
    pub(super) async fn invalidated_since(
        &self,
        since: u64,
        key: &CacheKey,
        owner: &Owner,
    ) -> Result<bool, SharedError> {
        let (_, log, floor) = self.inner.keys.log();
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(SINCE).arg(2).arg(log).arg(floor).arg(since);
        for ((c, f, a), tagger) in self
            .owner_tags(owner)
            .into_iter()
            .zip(self.inner.taggers.each())
        {
            cmd.arg(c).arg(f).arg(a).arg(tagger.tag(&[b"key", key]));
        }
        Ok(self.inner.call::<i64>("check", cmd).await? == 1)
    }

    /// Records the invalidation (so that it wins over mints in flight everywhere), deletes the
    /// values it matches, and tells every replica to drop its matching local entries. Returns
    /// what was deleted from Redis.
    pub async fn invalidate(&self, filter: &Filter) -> Result<Dropped, SharedError> {
        self.inner
            .metrics
            .invalidations
            .with_label_values(&["local"])
            .inc();
        self.record(filter).await?;
        let deleted = self.delete_matching(filter).await?;
        self.publish(filter).await?;
        Ok(deleted)
    }

    async fn record(&self, filter: &Filter) -> Result<u64, SharedError> {
        let (seq, log, floor) = self.inner.keys.log();
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(RECORD)
            .arg(3)
            .arg(seq)
            .arg(log)
            .arg(floor)
            .arg(LOG_CAPACITY);
        for tagger in self.inner.taggers.each() {
            let tag = |kind: &[u8], v: Option<&str>| {
                v.map_or_else(|| ANY.to_owned(), |v| tagger.tag(&[kind, v.as_bytes()]))
            };
            cmd.arg(tag(b"caller", filter.caller.as_deref()))
                .arg(tag(b"flow", filter.flow_id.as_deref()))
                .arg(tag(b"account", filter.account_id.as_deref()))
                .arg(
                    filter
                        .key
                        .map_or_else(|| ANY.to_owned(), |k| tagger.tag(&[b"key", &k])),
                );
        }
        self.inner.call("invalidate", cmd).await
    }

    /// Deletes the values `filter` drops: the one of its cache key, or those found through the
    /// caller's indexes or the user's (one per encryption key).
    async fn delete_matching(&self, filter: &Filter) -> Result<Dropped, SharedError> {
        if let Some(key) = &filter.key {
            let del = redis::cmd("DEL").arg(self.value_key(key)).clone();
            let tokens: u64 = self.inner.call("invalidate", del).await?;
            return Ok(Dropped {
                tokens,
                callers: usize::from(tokens > 0),
            });
        }
        let indexes = match (&filter.caller, &filter.flow_id, &filter.account_id) {
            (_, Some(flow), Some(account)) => self.user_indexes(flow, account),
            (Some(caller), _, _) => self.caller_indexes(caller),
            // Nothing indexes everything: the empty filter is for the local tier alone.
            (None, _, _) => return Ok(Dropped::default()),
        };
        let (mut tokens, mut callers) = (0, Vec::new());
        for index in indexes {
            tokens += self.delete_indexed(&index, filter, &mut callers).await?;
        }
        Ok(Dropped {
            tokens,
            callers: callers.len(),
        })
    }

    /// Deletes the values of one index that `filter` drops, and the index's members that are
    /// gone; adds the callers of the values dropped to `callers`.
    async fn delete_indexed(
        &self,
        index: &str,
        filter: &Filter,
        callers: &mut Vec<String>,
    ) -> Result<u64, SharedError> {
        let members: Vec<String> = self
            .inner
            .call(
                "invalidate",
                redis::cmd("ZRANGE").arg(index).arg(0).arg(-1).clone(),
            )
            .await?;
        let mut doomed = Vec::new();
        let mut gone = Vec::new();
        for batch in members.chunks(BATCH) {
            let keys: Vec<String> = batch.iter().map(|m| self.inner.keys.value(m)).collect();
            let values: Vec<Option<Vec<u8>>> = self
                .inner
                .call("invalidate", redis::cmd("MGET").arg(&keys).clone())
                .await?;
            for ((member, key), value) in batch.iter().zip(keys).zip(values) {
                let Some(sealed) = value else {
                    gone.push(member.clone());
                    continue;
                };
                // A value that does not open (another key, tampered) goes too.
                let opened = from_hex::<32>(member)
                    .and_then(|k| Some((k, self.inner.open_value(&k, &sealed)?.0)));
                if let Some((k, t)) = &opened {
                    if !filter.matches(k, &t.owner()) {
                        continue;
                    }
                    if !callers.contains(&t.caller) {
                        callers.push(t.caller.clone());
                    }
                }
                doomed.push(key);
                gone.push(member.clone());
            }
        }
        let mut deleted = 0;
        for batch in doomed.chunks(BATCH) {
            deleted += self
                .inner
                .call::<u64>("invalidate", redis::cmd("DEL").arg(batch).clone())
                .await?;
        }
        for batch in gone.chunks(BATCH) {
            self.inner
                .call::<u64>(
                    "invalidate",
                    redis::cmd("ZREM").arg(index).arg(batch).clone(),
                )
                .await?;
        }
        Ok(deleted)
    }

    async fn publish(&self, filter: &Filter) -> Result<(), SharedError> {
        self.inner
            .publish(Message {
                origin: self.inner.origin.clone(),
                id: String::new(),
                key: filter.key.as_ref().map(|k| hex(k)),
                caller: filter.caller.as_deref().map(Into::into),
                flow_id: filter.flow_id.as_deref().map(Into::into),
                account_id: filter.account_id.as_deref().map(Into::into),
                minted_before_ms: filter.minted_before.map(unix_ms),
                process: filter.process.as_deref().map(Into::into),
                throttle_until_ms: None,
            })
            .await
    }

    /// The tags of an owner's caller, flow and account under each key, as the log records
    /// them.
    fn owner_tags(&self, owner: &Owner) -> Vec<(String, String, String)> {
        self.inner
            .taggers
            .each()
            .iter()
            .map(|t| {
                (
                    t.tag(&[b"caller", owner.caller.as_bytes()]),
                    t.tag(&[b"flow", owner.flow_id.as_bytes()]),
                    owner
                        .account_id
                        .as_deref()
                        .map_or_else(|| NONE.to_owned(), |a| t.tag(&[b"account", a.as_bytes()])),
                )
            })
            .collect()
    }
}

impl Inner {
    /// Publishes `message` with a fresh id, sealed under every key (one copy each), so that
    /// replicas holding only a previous key, or only the current one, read it.
    async fn publish(&self, mut message: Message) -> Result<(), SharedError> {
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|_| SharedError::Failed)?;
        message.id = crate::secret::hex(&id);
        let json = Zeroizing::new(serde_json::to_vec(&message).map_err(|_| SharedError::Failed)?);
        for key in 0..self.sealer.keys() {
            let sealed = self
                .sealer
                .seal_with(key, &[MESSAGE_AAD, self.channel.as_bytes()], &json)
                .ok_or(SharedError::Failed)?;
            let cmd = redis::cmd("PUBLISH").arg(&self.channel).arg(sealed).clone();
            self.call::<u64>("publish", cmd).await?;
        }
        Ok(())
    }

    /// Tells every replica that Truora's throttle window is open until `until_ms` (Unix ms).
    pub(super) async fn publish_throttle(&self, until_ms: u64) -> Result<(), SharedError> {
        self.publish(Message {
            origin: self.origin.clone(),
            id: String::new(),
            key: None,
            caller: None,
            flow_id: None,
            account_id: None,
            minted_before_ms: None,
            process: None,
            throttle_until_ms: Some(until_ms),
        })
        .await
    }

    /// Listens to the invalidation channel for good, reconnecting with a back-off. After a
    /// reconnection the local tier is emptied (and counts as invalidated for mints in flight):
    /// invalidations may have been missed meanwhile, and what was dropped is read again from
    /// Redis.
    pub(super) async fn listen(
        self: Arc<Self>,
        local: TokenCache,
        on_throttle: Option<OnThrottle>,
    ) {
        let mut pause = Duration::from_millis(100);
        let mut first = true;
        let mut seen = VecDeque::with_capacity(SEEN);
        let mut attempt = 0usize;
        loop {
            let this_attempt = attempt;
            let this = &*self;
            let connect = async move {
                let mut pubsub = this.conn.pubsub(this_attempt).await?;
                pubsub.subscribe(&this.channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            attempt = attempt.wrapping_add(1);
            match tokio::time::timeout(self.timeout.max(Duration::from_secs(1)), connect).await {
                Ok(Ok(pubsub)) => {
                    if !first {
                        local.clear();
                        tracing::info!(redis = %self.shown, "listening to invalidations again; the local cache was emptied");
                    }
                    first = false;
                    self.metrics.subscribed.set(1);
                    pause = Duration::from_millis(100);
                    let mut messages = pubsub.into_on_message();
                    while let Some(msg) = messages.next().await {
                        self.apply(
                            &local,
                            on_throttle.as_ref(),
                            &mut seen,
                            msg.get_payload_bytes(),
                        );
                    }
                    self.metrics.subscribed.set(0);
                    tracing::warn!(redis = %self.shown, "lost the invalidation channel; reconnecting");
                }
                Ok(Err(_)) => self.fail("subscribe", SharedError::Failed),
                Err(_) => self.fail("subscribe", SharedError::Timeout),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    fn apply(
        &self,
        local: &TokenCache,
        on_throttle: Option<&OnThrottle>,
        seen: &mut VecDeque<String>,
        sealed: &[u8],
    ) {
        let Some((json, _)) = self
            .sealer
            .open(&[MESSAGE_AAD, self.channel.as_bytes()], sealed)
        else {
            // During a rotation, the copy sealed under a key this replica does not hold.
            self.fail("subscribe", SharedError::Failed);
            return;
        };
        let Ok(msg) = serde_json::from_slice::<Message>(&json) else {
            self.fail("subscribe", SharedError::Failed);
            return;
        };
        if msg.origin == self.origin {
            return;
        }
        if !msg.id.is_empty() {
            if seen.contains(&msg.id) {
                return;
            }
            if seen.len() == SEEN {
                seen.pop_front();
            }
            seen.push_back(msg.id.clone());
        }
        if let Some(until) = msg.throttle_until_ms {
            let left = until.saturating_sub(unix_ms(SystemTime::now()));
            if let Some(open) = on_throttle {
                open(Duration::from_millis(left));
            }
            return;
        }
        let mut filter = Filter::of(
            msg.caller.as_deref(),
            msg.flow_id.as_deref(),
            msg.account_id.as_deref(),
        );
        filter.key = msg.key.as_deref().and_then(from_hex::<32>);
        filter.minted_before = msg
            .minted_before_ms
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
        filter.process = msg.process.as_deref().map(Into::into);
        // A message naming nothing would empty this replica's cache: no replica sends one.
        if filter == Filter::default() {
            return;
        }
        local.invalidate(&filter);
        self.metrics
            .invalidations
            .with_label_values(&["remote"])
            .inc();
    }
}
