//! Values in Redis: reading a token another replica minted, storing one minted here, and
//! invalidation (deleting values, and telling every replica to drop its local entries).
//!
//! A value is the sealed JSON of a [`SharedToken`] at `<prefix>tok:<cache key hex>`, with a TTL
//! of the token's remaining life; each caller has an index set of its keys at
//! `<prefix>caller:<digest of the caller id>`, which invalidation walks.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use super::{Inner, SharedError, SharedTier};
use crate::cache::{CacheKey, TokenCache};
use crate::secret::{from_hex, hex};

const VALUE_AAD: &[u8] = b"token-broker/shared-cache/value/v1\0";
const MESSAGE_AAD: &[u8] = b"token-broker/shared-cache/invalidate/v1\0";
/// Values fetched per MGET when invalidating.
const INVALIDATE_BATCH: usize = 256;

/// Stores a value with its TTL and adds it to its caller's index, whose TTL is raised to the
/// longest of its values' (Redis 2.6+; no PEXPIRE GT needed).
const PUT: &str = "redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) \
redis.call('SADD', KEYS[2], ARGV[3]) \
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end \
return 1";

/// A token as another replica needs it to rebuild its entry (the answer bytes are rebuilt).
pub struct SharedToken {
    /// The token itself.
    pub token: Zeroizing<String>,
    /// When it dies, on the wall clock.
    pub expires_at: SystemTime,
    /// Its whole lifetime, as read from its claims when it was minted.
    pub lifetime: Duration,
    /// The caller it was minted for.
    pub caller: String,
    /// The flow it was minted for.
    pub flow_id: String,
    /// The user it was minted for, when named by account_id.
    pub account_id: Option<String>,
}

impl std::fmt::Debug for SharedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedToken")
            .field("caller", &self.caller)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// The JSON sealed in a value.
#[derive(Serialize, Deserialize)]
struct Stored {
    token: String,
    expires_at_ms: u64,
    lifetime_ms: u64,
    caller: String,
    flow_id: String,
    account_id: Option<String>,
}

impl Drop for Stored {
    fn drop(&mut self) {
        self.token.zeroize();
    }
}

/// The sealed JSON of an invalidation message.
#[derive(Serialize, Deserialize)]
struct Invalidation {
    origin: String,
    caller: String,
    flow_id: Option<String>,
    account_id: Option<String>,
}

impl SharedTier {
    /// Reads the value of `key`: `Ok(None)` when Redis has none (or one that does not open).
    pub async fn get(&self, key: &CacheKey) -> Result<Option<SharedToken>, SharedError> {
        let m = &self.inner.metrics;
        let cmd = redis::cmd("GET").arg(self.value_key(key)).clone();
        let sealed: Option<Vec<u8>> = match self.inner.call("get", cmd).await {
            Ok(v) => v,
            Err(e) => {
                m.lookups.with_label_values(&["error"]).inc();
                return Err(e);
            }
        };
        let Some(sealed) = sealed else {
            m.lookups.with_label_values(&["miss"]).inc();
            return Ok(None);
        };
        match self.inner.open_value(key, &sealed) {
            Some(found) => {
                m.lookups.with_label_values(&["hit"]).inc();
                Ok(Some(found))
            }
            None => {
                m.lookups.with_label_values(&["undecryptable"]).inc();
                Ok(None)
            }
        }
    }

    /// Stores `token` under `key` until the token dies (`PX`), and indexes it under its caller
    /// for invalidation. A token already dead is not stored.
    pub async fn put(&self, key: &CacheKey, token: &SharedToken) -> Result<(), SharedError> {
        let Ok(ttl) = token.expires_at.duration_since(SystemTime::now()) else {
            return Ok(());
        };
        let ttl_ms = ttl.as_millis().min(u128::from(u64::MAX)) as u64;
        if ttl_ms == 0 {
            return Ok(());
        }
        let stored = Stored {
            token: token.token.as_str().to_owned(),
            expires_at_ms: unix_ms(token.expires_at),
            lifetime_ms: token.lifetime.as_millis().min(u128::from(u64::MAX)) as u64,
            caller: token.caller.clone(),
            flow_id: token.flow_id.clone(),
            account_id: token.account_id.clone(),
        };
        let json = Zeroizing::new(serde_json::to_vec(&stored).map_err(|_| SharedError::Failed)?);
        let sealed = self
            .inner
            .sealer
            .seal(&[VALUE_AAD, key], &json)
            .ok_or(SharedError::Failed)?;
        let cmd = redis::cmd("EVAL")
            .arg(PUT)
            .arg(2)
            .arg(self.value_key(key))
            .arg(self.index_key(&token.caller))
            .arg(sealed)
            .arg(ttl_ms)
            .arg(hex(key))
            .clone();
        self.inner.call::<i64>("put", cmd).await.map(drop)
    }

    /// Deletes the caller's values for the flow and/or account given (neither: all of the
    /// caller's) and tells every replica to drop its matching local entries. Returns how many
    /// values were deleted from Redis.
    pub async fn invalidate(
        &self,
        caller: &str,
        flow_id: Option<&str>,
        account_id: Option<&str>,
    ) -> Result<u64, SharedError> {
        self.inner
            .metrics
            .invalidations
            .with_label_values(&["local"])
            .inc();
        let index = self.index_key(caller);
        let members: Vec<String> = self
            .inner
            .call("invalidate", redis::cmd("SMEMBERS").arg(&index).clone())
            .await?;
        let mut doomed = Vec::new();
        let mut gone = Vec::new();
        for batch in members.chunks(INVALIDATE_BATCH) {
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
                let matches = from_hex::<32>(member)
                    .and_then(|k| self.inner.open_value(&k, &sealed))
                    .is_none_or(|t| {
                        t.caller == caller
                            && flow_id.is_none_or(|f| t.flow_id == f)
                            && account_id.is_none_or(|a| t.account_id.as_deref() == Some(a))
                    });
                if matches {
                    doomed.push(key);
                    gone.push(member.clone());
                }
            }
        }
        let mut deleted = 0;
        for batch in doomed.chunks(INVALIDATE_BATCH) {
            deleted += self
                .inner
                .call::<u64>("invalidate", redis::cmd("DEL").arg(batch).clone())
                .await?;
        }
        for batch in gone.chunks(INVALIDATE_BATCH) {
            self.inner
                .call::<u64>(
                    "invalidate",
                    redis::cmd("SREM").arg(&index).arg(batch).clone(),
                )
                .await?;
        }
        let message = Invalidation {
            origin: self.inner.origin.clone(),
            caller: caller.to_owned(),
            flow_id: flow_id.map(Into::into),
            account_id: account_id.map(Into::into),
        };
        let json = Zeroizing::new(serde_json::to_vec(&message).map_err(|_| SharedError::Failed)?);
        let sealed = self
            .inner
            .sealer
            .seal(&[MESSAGE_AAD, self.inner.channel.as_bytes()], &json)
            .ok_or(SharedError::Failed)?;
        self.inner
            .call::<u64>(
                "publish",
                redis::cmd("PUBLISH")
                    .arg(&self.inner.channel)
                    .arg(sealed)
                    .clone(),
            )
            .await?;
        Ok(deleted)
    }
}

impl Inner {
    pub(super) fn open_value(&self, key: &CacheKey, sealed: &[u8]) -> Option<SharedToken> {
        let json = self.sealer.open(&[VALUE_AAD, key], sealed)?;
        let stored: Stored = serde_json::from_slice(&json).ok()?;
        Some(SharedToken {
            token: Zeroizing::new(stored.token.clone()),
            expires_at: UNIX_EPOCH + Duration::from_millis(stored.expires_at_ms),
            lifetime: Duration::from_millis(stored.lifetime_ms),
            caller: stored.caller.clone(),
            flow_id: stored.flow_id.clone(),
            account_id: stored.account_id.clone(),
        })
    }

    /// Listens to the invalidation channel for good, reconnecting with a back-off. After a
    /// reconnection the local tier is emptied: invalidations may have been missed meanwhile,
    /// and what was dropped is read again from Redis.
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
        let Ok(msg) = serde_json::from_slice::<Invalidation>(&json) else {
            self.fail("subscribe", SharedError::Failed);
            return;
        };
        if msg.origin == self.origin {
            return;
        }
        local.invalidate(
            &msg.caller,
            msg.flow_id.as_deref(),
            msg.account_id.as_deref(),
        );
        self.metrics
            .invalidations
            .with_label_values(&["remote"])
            .inc();
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().min(u128::from(u64::MAX)) as u64)
}
