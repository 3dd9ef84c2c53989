//! Dropping cached tokens, for every reason there is: a caller's own `DELETE /v1/tokens`, a
//! caller asking for a new process, Truora saying a process ended (webhook or result read), a
//! reload revoking a caller. Each drop reaches the local cache, the shared tier and every other
//! replica, wins over the mints in flight that it matches, is counted in
//! `token_broker_cache_invalidations_total{reason}` and leaves one audit event (how many tokens and
//! callers, the flow, the user's keyed tag: never a token).
//!
//! A process that ended drops only its own tokens: those minted before it ended (when the news
//! says when), and only once (when it names the process): a retried webhook, or the result read
//! again, never drops the token of the new process the user has started since.

use std::time::SystemTime;

use super::issuer::Issuer;
use crate::audit::{Event, Identifier, UserTags};
use crate::cache::{Dropped, Filter, Reason};
use crate::error::{BrokerError, Refusal};

/// A verification process that ended, as Truora tells it.
#[derive(Debug, Clone, Copy)]
pub struct Ended<'a> {
    /// Its flow.
    pub flow_id: &'a str,
    /// Its user.
    pub account_id: &'a str,
    /// Its id, when known: hearing of it again drops nothing more.
    pub process_id: Option<&'a str>,
    /// When it ended, when known: tokens minted later are another process's and stay.
    pub at: Option<SystemTime>,
}

impl Issuer {
    /// Drops the tokens `filter` matches here, and, with a shared tier, in Redis and on every
    /// other replica; mints in flight that it matches, anywhere, do not keep their tokens. When
    /// Redis cannot be reached the local tokens are dropped and the call fails, so the caller
    /// knows to retry: other replicas may still hold the token.
    pub async fn invalidate_everywhere(
        &self,
        filter: &Filter,
        reason: Reason,
    ) -> Result<Dropped, BrokerError> {
        let local = self.cache.invalidate(filter);
        let (dropped, reached) = match &self.shared {
            None => (local, Ok(())),
            Some(shared) => match shared.invalidate(filter).await {
                Ok(there) => (local.either(there), Ok(())),
                Err(_) => (local, Err(Refusal::SharedCacheUnavailable.into())),
            },
        };
        self.record_invalidation(filter, reason, dropped, reached.is_ok());
        reached.map(|()| dropped)
    }

    /// `DELETE /v1/tokens` of `caller`: at most `cache.invalidate_rate` a second per caller,
    /// then [`Issuer::invalidate_everywhere`] of its own tokens for the flow and/or account.
    pub async fn invalidate_for_caller(
        &self,
        caller: &str,
        flow_id: Option<&str>,
        account_id: Option<&str>,
    ) -> Result<Dropped, BrokerError> {
        self.invalidations
            .take(caller)
            .map_err(|retry_after| Refusal::InvalidationRateExceeded { retry_after })?;
        self.invalidate_everywhere(
            &Filter::of(Some(caller), flow_id, account_id),
            Reason::Caller,
        )
        .await
    }

    /// Truora says a process ended: every caller's tokens for that user and flow minted before
    /// it ended go, found through the cache's (flow, account) index. Nothing more goes when
    /// the same process was heard of before (here, or from another replica).
    pub async fn process_ended(
        &self,
        ended: &Ended<'_>,
        reason: Reason,
    ) -> Result<Dropped, BrokerError> {
        if let Some(process) = ended.process_id {
            if self.cache.has_ended(process) {
                tracing::debug!(
                    reason = reason.label(),
                    "a process heard of before: nothing more to drop"
                );
                return Ok(Dropped::default());
            }
        }
        let filter = Filter::ended(ended.flow_id, ended.account_id, ended.process_id, ended.at);
        self.invalidate_everywhere(&filter, reason).await
    }

    /// Counts the invalidation and records it in the audit trail (revocations are neither: a
    /// reload counts them, and records its own `revocation` event).
    fn record_invalidation(
        &self,
        filter: &Filter,
        reason: Reason,
        dropped: Dropped,
        everywhere: bool,
    ) {
        if reason == Reason::Revoked {
            return;
        }
        self.metrics
            .cache_invalidations
            .with_label_values(&[reason.label()])
            .inc();
        let key = self.audit.key();
        let user = UserTags::of(
            &key,
            filter.account_id.as_deref().map(Identifier::AccountId),
        );
        self.audit.record(&Event::Invalidation {
            reason: reason.label(),
            caller: filter.caller.as_deref().unwrap_or("*"),
            flow_id: filter.flow_id.as_deref(),
            user: &user,
            tag_key: &user.key,
            invalidated: dropped.tokens,
            callers: u64::try_from(dropped.callers).unwrap_or(u64::MAX),
            everywhere,
        });
    }
}
