//! Values in Redis: reading a token another replica minted, and storing one minted here.
//!
//! A value is the sealed JSON of a [`SharedToken`] at `<prefix>tok:<cache key hex>`, with a TTL
//! of the token's remaining life. Every value is indexed under its caller
//! (`<prefix>caller:<tag>`) and, when it names one, under its flow and user
//! (`<prefix>user:<tag>`): sorted sets scored by the value's expiry, trimmed of dead members
//! whenever they are written, so they stay near the live values. Invalidation walks them. The
//! tags are the current key's; a value read that opened only under a previous key is stored
//! again, sealed and indexed under the current one (with its `since` kept, so an invalidation
//! that came meanwhile still wins).
//!
//! A value carries the invalidation sequence of its mint's start (`since`, see
//! [`super::invalidate`]). It is stored index first, value second, then checked against the
//! invalidations since: one that matches deletes it again. It is served only while no matching
//! invalidation came after its `since`. Between the two, an invalidation wins over a mint that
//! started before it, on every replica, whatever the order of their steps.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use super::{Inner, SharedError, SharedTier};
use crate::cache::{CacheKey, Owner};
use crate::secret::hex;

pub(super) const VALUE_AAD: &[u8] = b"token-broker/shared-cache/value/v1\0";

/// Adds a member to an index scored by expiry, drops the dead members, and keeps the index as
/// long as its longest-lived member. KEYS[1] index; ARGV: member, expiry (Unix ms), now (Unix
/// ms), ttl (ms).
const INDEX: &str = "redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1]) \
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3]) \
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[4]) then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end \
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
    /// The invalidation sequence when its mint started ([`SharedTier::mark`]).
    pub since: u64,
}

impl std::fmt::Debug for SharedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedToken")
            .field("caller", &self.caller)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl SharedToken {
    /// Who it was minted for, as the local tier says it.
    pub fn owner(&self) -> Owner {
        Owner {
            caller: self.caller.as_str().into(),
            flow_id: self.flow_id.as_str().into(),
            account_id: self.account_id.as_deref().map(Into::into),
            minted_at: self
                .expires_at
                .checked_sub(self.lifetime)
                .unwrap_or(UNIX_EPOCH),
        }
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
    /// Values written before invalidations were sequenced read as of the start.
    #[serde(default)]
    since: u64,
}

impl Drop for Stored {
    fn drop(&mut self) {
        self.token.zeroize();
    }
}

/// What a store did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The value is in Redis for the fleet.
    Kept,
    /// An invalidation that drops it came while it was minted: deleted again, and not to be
    /// kept locally either.
    Invalidated,
}

impl SharedTier {
    /// Reads the value of `key`: `Ok(None)` when Redis has none, one that does not open, or one
    /// an invalidation has dropped since its mint started.
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
        let Some((found, under)) = self.inner.open_value(key, &sealed) else {
            m.lookups.with_label_values(&["undecryptable"]).inc();
            return Ok(None);
        };
        match self
            .invalidated_since(found.since, key, &found.owner())
            .await
        {
            Ok(false) if under > 0 => {
                // Sealed under a previous key: sealed again under the current one. An
                // invalidation since its mint deletes it again and it is not served.
                match self.put(key, &found).await {
                    Ok(PutOutcome::Invalidated) => {
                        m.lookups.with_label_values(&["invalidated"]).inc();
                        return Ok(None);
                    }
                    Ok(PutOutcome::Kept) => m.reseals.inc(),
                    Err(_) => {}
                }
                m.lookups.with_label_values(&["hit"]).inc();
                Ok(Some(found))
            }
            Ok(false) => {
                m.lookups.with_label_values(&["hit"]).inc();
                Ok(Some(found))
            }
            Ok(true) => {
                m.lookups.with_label_values(&["invalidated"]).inc();
                Ok(None)
            }
            Err(e) => {
                m.lookups.with_label_values(&["error"]).inc();
                Err(e)
            }
        }
    }

    /// Stores `token` under `key` until the token dies (`PX`), indexed for invalidation; then
    /// deletes it again if an invalidation that drops it came since its mint started. A token
    /// already dead is not stored.
    pub async fn put(
        &self,
        key: &CacheKey,
        token: &SharedToken,
    ) -> Result<PutOutcome, SharedError> {
        let now = SystemTime::now();
        let Ok(ttl) = token.expires_at.duration_since(now) else {
            return Ok(PutOutcome::Kept);
        };
        let ttl_ms = millis(ttl);
        if ttl_ms == 0 {
            return Ok(PutOutcome::Kept);
        }
        let member = hex(key);
        let owner = token.owner();
        // Indexed under the current key's tags.
        let k = &self.inner.keys;
        let t = &self.inner.taggers;
        let mut indexes = vec![k.index("caller", &t.tag(&[b"caller", owner.caller.as_bytes()]))];
        if let Some(account) = &owner.account_id {
            let tag = t.tag(&[b"user", owner.flow_id.as_bytes(), account.as_bytes()]);
            indexes.push(k.index("user", &tag));
        }
        for index in indexes {
            let cmd = redis::cmd("EVAL")
                .arg(INDEX)
                .arg(1)
                .arg(index)
                .arg(&member)
                .arg(unix_ms(token.expires_at))
                .arg(unix_ms(now))
                .arg(ttl_ms)
                .clone();
            self.inner.call::<i64>("put", cmd).await?;
        }
        let stored = Stored {
            token: token.token.as_str().to_owned(),
            expires_at_ms: unix_ms(token.expires_at),
            lifetime_ms: millis(token.lifetime),
            caller: token.caller.clone(),
            flow_id: token.flow_id.clone(),
            account_id: token.account_id.clone(),
            since: token.since,
        };
        let json = Zeroizing::new(serde_json::to_vec(&stored).map_err(|_| SharedError::Failed)?);
        let sealed = self
            .inner
            .sealer
            .seal(&[VALUE_AAD, key], &json)
            .ok_or(SharedError::Failed)?;
        let set = redis::cmd("SET")
            .arg(self.value_key(key))
            .arg(sealed)
            .arg("PX")
            .arg(ttl_ms)
            .clone();
        self.inner.call::<()>("put", set).await?;
        if !self.invalidated_since(token.since, key, &owner).await? {
            return Ok(PutOutcome::Kept);
        }
        let del = redis::cmd("DEL").arg(self.value_key(key)).clone();
        self.inner.call::<u64>("put", del).await?;
        Ok(PutOutcome::Invalidated)
    }
}

impl Inner {
    /// The token in a sealed value, and the index of the key it opened under (0: current).
    pub(super) fn open_value(&self, key: &CacheKey, sealed: &[u8]) -> Option<(SharedToken, usize)> {
        let (json, under) = self.sealer.open(&[VALUE_AAD, key], sealed)?;
        let stored: Stored = serde_json::from_slice(&json).ok()?;
        let token = SharedToken {
            token: Zeroizing::new(stored.token.clone()),
            expires_at: UNIX_EPOCH + Duration::from_millis(stored.expires_at_ms),
            lifetime: Duration::from_millis(stored.lifetime_ms),
            caller: stored.caller.clone(),
            flow_id: stored.flow_id.clone(),
            account_id: stored.account_id.clone(),
            since: stored.since,
        };
        Some((token, under))
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

pub(super) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, millis)
}
