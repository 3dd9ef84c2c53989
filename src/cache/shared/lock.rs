//! The fleet-wide minting lock: `SET lock owner NX PX lock_ttl` with a random owner, released
//! only by its owner through a Lua compare-and-delete, so a replica whose lock expired (and was
//! taken by another) cannot release the other's.

use super::{SharedError, SharedTier};
use crate::cache::CacheKey;
use crate::secret::hex;

/// Releases the lock only if it still holds this owner's token.
const UNLOCK: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

/// How a miss that went through the fleet-wide lock ended, for
/// `token_broker_shared_cache_lock_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockOutcome {
    /// This replica took the lock and minted.
    Acquired,
    /// Another replica minted; this one waited and read the value.
    Waited,
    /// Redis could not be used, or the wait outlasted its bound: minted without the lock.
    Fallback,
}

/// A held fleet-wide lock: its owner token.
pub struct LockToken(String);

impl SharedTier {
    /// Takes the minting lock of `key` for `lock_ttl`: `Ok(None)` when another holds it.
    pub async fn lock(&self, key: &CacheKey) -> Result<Option<LockToken>, SharedError> {
        let mut owner = [0u8; 16];
        getrandom::fill(&mut owner).map_err(|_| SharedError::Failed)?;
        let owner = hex(&owner);
        let ttl_ms = self.inner.lock_ttl.as_millis().min(u128::from(u64::MAX)) as u64;
        let cmd = redis::cmd("SET")
            .arg(self.lock_key(key))
            .arg(&owner)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .clone();
        let set: Option<String> = self.inner.call("lock", cmd).await?;
        Ok(set.map(|_| LockToken(owner)))
    }

    /// Releases the lock if it is still ours (it may have expired and been taken since).
    pub async fn unlock(&self, key: &CacheKey, lock: LockToken) {
        let cmd = redis::cmd("EVAL")
            .arg(UNLOCK)
            .arg(1)
            .arg(self.lock_key(key))
            .arg(lock.0)
            .clone();
        let _ = self.inner.call::<i64>("unlock", cmd).await;
    }

    /// Counts a miss's way through the lock.
    pub fn count_lock(&self, outcome: LockOutcome) {
        let label = match outcome {
            LockOutcome::Acquired => "acquired",
            LockOutcome::Waited => "waited",
            LockOutcome::Fallback => "fallback",
        };
        self.inner.metrics.locks.with_label_values(&[label]).inc();
    }
}
