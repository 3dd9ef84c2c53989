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

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{Inner, SharedError, SharedTier};
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

/// Records an invalidation. KEYS: seq, log, floor; ARGV: caller tag, flow tag, account tag,
/// key tag, capacity. Returns its number.
const RECORD: &str = "local seq = redis.call('INCR', KEYS[1]) \
redis.call('ZADD', KEYS[2], seq, seq .. '|' .. ARGV[1] .. '|' .. ARGV[2] .. '|' .. ARGV[3] .. '|' .. ARGV[4]) \
local excess = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[5]) \
if excess > 0 then \
  local gone = redis.call('ZRANGE', KEYS[2], 0, excess - 1, 'WITHSCORES') \
  redis.call('SET', KEYS[3], gone[#gone]) \
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, excess - 1) \
end \
return seq";

/// Whether an owner's value minted since ARGV[1] is dropped by a later invalidation, or the
/// log no longer reaches back to it. KEYS: log, floor; ARGV: since, caller tag, flow tag,
/// account tag, key tag.
const SINCE: &str = "local since = tonumber(ARGV[1]) \
if tonumber(redis.call('GET', KEYS[2]) or '0') > since then return 1 end \
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf')) do \
  local c, f, a, k = string.match(m, '^%d+|([^|]+)|([^|]+)|([^|]+)|([^|]+)$') \
  if (c == '-' or c == ARGV[2]) and (f == '-' or f == ARGV[3]) and (a == '-' or a == ARGV[4]) and (k == '-' or k == ARGV[5]) then return 1 end \
end \
return 0";

/// The sealed JSON of an invalidation message.
#[derive(Serialize, Deserialize)]
struct Message {
    origin: String,
    /// The one cache key (hex), for a key's invalidation.
    #[serde(default)]
    key: Option<String>,
    caller: Option<String>,
    flow_id: Option<String>,
    account_id: Option<String>,
}

impl SharedTier {
    /// The invalidation number now: a mint takes it when it starts and stores it with its value.
    pub async fn mark(&self) -> Result<u64, SharedError> {
        let cmd = redis::cmd("GET").arg(self.log_keys().0).clone();
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
        let (_, log, floor) = self.log_keys();
        let (c, f, a) = self.owner_tags(owner);
        let k = self.inner.tagger.tag(&[b"key", key]);
        let cmd = redis::cmd("EVAL")
            .arg(SINCE)
            .arg(2)
            .arg(log)
            .arg(floor)
            .arg(since)
            .arg(c)
            .arg(f)
            .arg(a)
            .arg(k)
            .clone();
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
        let (seq, log, floor) = self.log_keys();
        let tag = |kind: &[u8], v: Option<&str>| {
            v.map_or_else(
                || ANY.to_owned(),
                |v| self.inner.tagger.tag(&[kind, v.as_bytes()]),
            )
        };
        let cmd = redis::cmd("EVAL")
            .arg(RECORD)
            .arg(3)
            .arg(seq)
            .arg(log)
            .arg(floor)
            .arg(tag(b"caller", filter.caller.as_deref()))
            .arg(tag(b"flow", filter.flow_id.as_deref()))
            .arg(tag(b"account", filter.account_id.as_deref()))
            .arg(
                filter
                    .key
                    .map_or_else(|| ANY.to_owned(), |k| self.inner.tagger.tag(&[b"key", &k])),
            )
            .arg(LOG_CAPACITY)
            .clone();
        self.inner.call("invalidate", cmd).await
    }

    /// Deletes the values `filter` drops: the one of its key, or those found through the
    /// caller's index or the user's.
    async fn delete_matching(&self, filter: &Filter) -> Result<Dropped, SharedError> {
        if let Some(key) = &filter.key {
            let del = redis::cmd("DEL").arg(self.value_key(key)).clone();
            let tokens: u64 = self.inner.call("invalidate", del).await?;
            return Ok(Dropped {
                tokens,
                callers: usize::from(tokens > 0),
            });
        }
        let index = match (&filter.caller, &filter.flow_id, &filter.account_id) {
            (_, Some(flow), Some(account)) => self.user_index(flow, account),
            (Some(caller), _, _) => self.caller_index(caller),
            // Nothing indexes everything: the empty filter is for the local tier alone.
            (None, _, _) => return Ok(Dropped::default()),
        };
        let members: Vec<String> = self
            .inner
            .call(
                "invalidate",
                redis::cmd("ZRANGE").arg(&index).arg(0).arg(-1).clone(),
            )
            .await?;
        let mut doomed = Vec::new();
        let mut gone = Vec::new();
        let mut callers = Vec::new();
        for batch in members.chunks(BATCH) {
            let keys: Vec<String> = batch
                .iter()
                .map(|m| format!("{}tok:{m}", self.inner.prefix))
                .collect();
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
                    .and_then(|k| Some((k, self.inner.open_value(&k, &sealed)?)));
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
        let mut deleted = Dropped {
            tokens: 0,
            callers: callers.len(),
        };
        for batch in doomed.chunks(BATCH) {
            deleted.tokens += self
                .inner
                .call::<u64>("invalidate", redis::cmd("DEL").arg(batch).clone())
                .await?;
        }
        for batch in gone.chunks(BATCH) {
            self.inner
                .call::<u64>(
                    "invalidate",
                    redis::cmd("ZREM").arg(&index).arg(batch).clone(),
                )
                .await?;
        }
        Ok(deleted)
    }

    async fn publish(&self, filter: &Filter) -> Result<(), SharedError> {
        let message = Message {
            origin: self.inner.origin.clone(),
            key: filter.key.as_ref().map(|k| hex(k)),
            caller: filter.caller.as_deref().map(Into::into),
            flow_id: filter.flow_id.as_deref().map(Into::into),
            account_id: filter.account_id.as_deref().map(Into::into),
        };
        let json = Zeroizing::new(serde_json::to_vec(&message).map_err(|_| SharedError::Failed)?);
        let sealed = self
            .inner
            .sealer
            .seal(&[MESSAGE_AAD, self.inner.channel.as_bytes()], &json)
            .ok_or(SharedError::Failed)?;
        let cmd = redis::cmd("PUBLISH")
            .arg(&self.inner.channel)
            .arg(sealed)
            .clone();
        self.inner.call::<u64>("publish", cmd).await.map(drop)
    }

    /// The tags of an owner's caller, flow and account, as the log records them.
    fn owner_tags(&self, owner: &Owner) -> (String, String, String) {
        let t = &self.inner.tagger;
        (
            t.tag(&[b"caller", owner.caller.as_bytes()]),
            t.tag(&[b"flow", owner.flow_id.as_bytes()]),
            owner
                .account_id
                .as_deref()
                .map_or_else(|| NONE.to_owned(), |a| t.tag(&[b"account", a.as_bytes()])),
        )
    }
}

impl Inner {
    /// Listens to the invalidation channel for good, reconnecting with a back-off. After a
    /// reconnection the local tier is emptied (and counts as invalidated for mints in flight):
    /// invalidations may have been missed meanwhile, and what was dropped is read again from
    /// Redis.
    pub(super) async fn listen(self: Arc<Self>, local: TokenCache) {
        let mut pause = Duration::from_millis(100);
        let mut first = true;
        loop {
            let connect = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(&self.channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
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
                        self.apply(&local, msg.get_payload_bytes());
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

    fn apply(&self, local: &TokenCache, sealed: &[u8]) {
        let Some(json) = self
            .sealer
            .open(&[MESSAGE_AAD, self.channel.as_bytes()], sealed)
        else {
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
        let mut filter = Filter::of(
            msg.caller.as_deref(),
            msg.flow_id.as_deref(),
            msg.account_id.as_deref(),
        );
        filter.key = msg.key.as_deref().and_then(from_hex::<32>);
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
