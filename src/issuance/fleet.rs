//! The issuer with a shared tier (`[cache.shared]`): a local miss reads Redis first; one replica
//! of the fleet mints under a lock while the others wait for its value; invalidation reaches
//! Redis and every replica. Redis failing, or a wait outlasting the lock's life, means minting
//! here without it: Redis is never required.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::issuer::{Flown, Issuer, Subject};
use crate::audit::UserTags;
use crate::cache::shared::{
    FleetHandle, LimitVerdict, LockOutcome, PutOutcome, SharedTier, SharedToken,
};
use crate::cache::{CacheKey, Entry};
use crate::error::{BrokerError, BudgetScope};
use crate::metrics::CacheOutcome;
use crate::upstream::{FleetFuture, FleetLimits, FleetVerdict};

/// The guard's fleet limits, kept in the Redis tier: `None` when `fleet_limits` is off.
pub fn fleet_limits(tier: &SharedTier) -> Option<Arc<dyn FleetLimits>> {
    tier.fleet()
        .map(|handle| Arc::new(RedisLimits(handle)) as Arc<dyn FleetLimits>)
}

/// [`FleetLimits`] in Redis.
struct RedisLimits(FleetHandle);

impl FleetLimits for RedisLimits {
    fn spend<'a>(
        &'a self,
        caller: &'a str,
        caller_rate: Option<u32>,
        global_rate: u32,
    ) -> FleetFuture<'a, Option<FleetVerdict>> {
        Box::pin(async move {
            let verdict = self.0.spend(caller, caller_rate, global_rate).await.ok()?;
            Some(match verdict {
                LimitVerdict::Allowed => FleetVerdict::Allowed,
                LimitVerdict::Throttled(d) => FleetVerdict::Throttled(d),
                LimitVerdict::CallerBudget(d) => FleetVerdict::Budget(BudgetScope::Caller, d),
                LimitVerdict::GlobalBudget(d) => FleetVerdict::Budget(BudgetScope::Global, d),
            })
        })
    }

    fn throttled(&self, retry_after: Duration) -> FleetFuture<'_, ()> {
        Box::pin(async move {
            // Redis failing: the other replicas learn of the window from their own 429.
            let _ = self.0.throttle(retry_after).await;
        })
    }
}

impl Issuer {
    /// The Redis tier, when configured.
    pub fn shared(&self) -> Option<&SharedTier> {
        self.shared.as_ref()
    }

    /// A local miss with a shared tier: Redis first; else one replica of the fleet takes the
    /// lock and mints while the others poll for its value; Redis failing or the wait outlasting
    /// the lock's life means minting here without it.
    pub(super) async fn fly_fleet(
        &self,
        shared: &SharedTier,
        key: &CacheKey,
        subject: Subject,
    ) -> Result<Flown, BrokerError> {
        let give_up = Instant::now() + shared.wait_bound();
        let mut pause = Duration::from_millis(5);
        let mut waited = false;
        let hit = |entry| Flown {
            entry,
            cache: CacheOutcome::Hit,
            keep: true,
        };
        let outcome = loop {
            match shared.get(key).await {
                Ok(Some(found)) => {
                    if let Some(entry) = self.shared_entry(shared, found, &subject) {
                        if waited {
                            shared.count_lock(LockOutcome::Waited);
                        }
                        return Ok(hit(entry));
                    }
                }
                Ok(None) => {}
                Err(_) => break LockOutcome::Fallback,
            }
            match shared.lock(key).await {
                Ok(Some(lock)) => {
                    // Another replica may have stored its token and let go between the read
                    // and the lock: read once more before minting.
                    if let Ok(Some(found)) = shared.get(key).await {
                        if let Some(entry) = self.shared_entry(shared, found, &subject) {
                            shared.unlock(key, lock).await;
                            return Ok(hit(entry));
                        }
                    }
                    shared.count_lock(LockOutcome::Acquired);
                    let flown = self.mint_and_share(shared, key, subject).await;
                    shared.unlock(key, lock).await;
                    return flown;
                }
                Ok(None) if Instant::now() < give_up => {
                    waited = true;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                _ => break LockOutcome::Fallback,
            }
        };
        shared.count_lock(outcome);
        self.mint_entry(subject).await.map(|entry| Flown {
            entry,
            cache: CacheOutcome::Miss,
            keep: true,
        })
    }

    /// Mints under the fleet's lock and stores the token in Redis, marked with the
    /// invalidation number of the mint's start: an invalidation that drops it meanwhile
    /// deletes it again, and then it is not kept here either.
    async fn mint_and_share(
        &self,
        shared: &SharedTier,
        key: &CacheKey,
        subject: Subject,
    ) -> Result<Flown, BrokerError> {
        // Without a mark (Redis failing), the token is handed over and kept here, not in Redis.
        let since = shared.mark().await;
        let (entry, mut token) = self.mint_token(subject).await?;
        let mut keep = true;
        if let (Ok(since), true) = (since, entry.serve_until > Instant::now()) {
            token.since = since;
            keep = shared.put(key, &token).await != Ok(PutOutcome::Invalidated);
        }
        Ok(Flown {
            entry,
            cache: CacheOutcome::Miss,
            keep,
        })
    }

    /// The entry for a token read from Redis, with the life it has left by the wall clock;
    /// `None` when it may no longer be handed out (inside `min_remaining`) or is not this
    /// request's.
    fn shared_entry(
        &self,
        shared: &SharedTier,
        found: SharedToken,
        subject: &Subject,
    ) -> Option<Arc<Entry>> {
        let remaining = found.expires_at.duration_since(SystemTime::now()).ok();
        let usable = remaining.filter(|r| *r > self.settings.min_remaining);
        let ours = found.caller == *subject.caller && found.flow_id == *subject.flow_id;
        let (Some(remaining), true) = (usable, ours) else {
            shared.count_stale();
            return None;
        };
        let now = Instant::now();
        let subject = Subject {
            caller: Arc::clone(&subject.caller),
            flow_id: subject.flow_id.clone(),
            account_id: subject.account_id.clone(),
            form: String::new(),
            user: UserTags::default(),
            request_id: Box::default(),
            peer: None,
            cache: "hit",
        };
        let minted_at = found.owner().minted_at;
        Some(self.entry(
            &found.token,
            now,
            now + remaining,
            found.expires_at,
            minted_at,
            subject,
        ))
    }
}
