//! What an invalidation drops ([`Filter`]), and the record that lets one win over every mint
//! that started before it ([`Log`]).
//!
//! A mint takes a [`Mark`] when its flight starts. Before its token is stored, the log is asked
//! whether an invalidation matching the token's owner came since that mark: if one did, the token
//! is handed to the requests that waited for it but never stored, so a `DELETE` (or a webhook, or
//! a revocation) that ran while the mint was in flight sticks. Only invalidations matching the
//! owner count: another caller's `DELETE`, or one for another user, changes nothing.
//!
//! The log keeps the latest [`LOG_CAPACITY`] invalidations. A mark older than everything it
//! still holds cannot be answered for, and is treated as invalidated (the token is not stored;
//! the next request mints again): the safe side.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::SystemTime;

use super::{CacheKey, Owner};

/// Invalidations remembered for in-flight mints: far more than can happen during one mint's
/// deadline at any sane rate (`DELETE` is rate limited per caller).
pub const LOG_CAPACITY: usize = 4096;

/// Why tokens are dropped: the `reason` of `token_broker_cache_invalidations_total` and of the
/// audit line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Truora's webhook said the user's process in a flow ended.
    Webhook,
    /// A process result read through the pass-through said it ended.
    Result,
    /// The caller's own `DELETE /v1/tokens`.
    Caller,
    /// The caller asked for a new process (`Cache-Control: no-cache`).
    NoCache,
    /// A reload removed the caller or changed its credential (audited, not counted).
    Revoked,
}

impl Reason {
    /// Every reason counted in `token_broker_cache_invalidations_total`.
    pub const COUNTED: [Reason; 4] = [Self::Webhook, Self::Result, Self::Caller, Self::NoCache];

    /// The label and audit value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Webhook => "webhook",
            Self::Result => "result",
            Self::Caller => "caller",
            Self::NoCache => "no_cache",
            Self::Revoked => "revoked",
        }
    }
}

/// What an invalidation dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Tokens.
    pub tokens: u64,
    /// Distinct callers they were minted for.
    pub callers: usize,
}

impl Dropped {
    /// What two tiers holding copies of the same tokens dropped: the larger of each count.
    pub fn either(self, other: Self) -> Self {
        Self {
            tokens: self.tokens.max(other.tokens),
            callers: self.callers.max(other.callers),
        }
    }
}

/// What an invalidation drops: the entries whose owner has every field given (and whose key is
/// `key`, when given). The empty filter matches everything (a tier that may have missed
/// invalidations forgets it all).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only the token of this cache key (a caller asking for a new process with
    /// `Cache-Control: no-cache`).
    pub key: Option<CacheKey>,
    /// Only this caller's tokens; `None`: every caller's (a process that ended drops its tokens
    /// whoever asked for them).
    pub caller: Option<Arc<str>>,
    /// Only tokens of this flow.
    pub flow_id: Option<Box<str>>,
    /// Only tokens of this user (`account_id`).
    pub account_id: Option<Box<str>>,
    /// Only tokens minted at or before this time: a process that ended then drops its own
    /// token, never one minted since for a new process.
    pub minted_before: Option<SystemTime>,
    /// The process whose end this is, so that hearing of it again drops nothing more. Not
    /// matched on.
    pub process: Option<Arc<str>>,
}

impl Filter {
    /// Everything of one caller (a revoked caller).
    pub fn caller(caller: &str) -> Self {
        Self {
            caller: Some(caller.into()),
            ..Self::default()
        }
    }

    /// A caller's tokens for a flow and/or an account (`DELETE /v1/tokens`), or a user's in a
    /// flow whoever the caller (a process that ended).
    pub fn of(caller: Option<&str>, flow_id: Option<&str>, account_id: Option<&str>) -> Self {
        Self {
            caller: caller.map(Into::into),
            flow_id: flow_id.map(Into::into),
            account_id: account_id.map(Into::into),
            ..Self::default()
        }
    }

    /// Every caller's tokens of a user in a flow whose process ended: those minted at or before
    /// `minted_before` when given; `process` names it when known.
    pub fn ended(
        flow_id: &str,
        account_id: &str,
        process: Option<&str>,
        minted_before: Option<SystemTime>,
    ) -> Self {
        Self {
            minted_before,
            process: process.map(Into::into),
            ..Self::of(None, Some(flow_id), Some(account_id))
        }
    }

    /// The one token of `key`, minted for `caller`.
    pub fn key(caller: &str, key: CacheKey) -> Self {
        Self {
            key: Some(key),
            ..Self::caller(caller)
        }
    }

    /// True when the token of `key`, minted for `owner`, is one this filter drops.
    pub fn matches(&self, key: &CacheKey, owner: &Owner) -> bool {
        self.key.is_none_or(|k| k == *key)
            && self.minted_before.is_none_or(|t| owner.minted_at <= t)
            && self.caller.as_deref().is_none_or(|c| *owner.caller == *c)
            && self.flow_id.as_deref().is_none_or(|f| *owner.flow_id == *f)
            && self
                .account_id
                .as_deref()
                .is_none_or(|a| owner.account_id.as_deref() == Some(a))
    }
}

/// A point in the log: what a flight remembers from its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mark(u64);

/// The latest invalidations, in order.
#[derive(Debug, Default)]
pub struct Log {
    /// The sequence number the next invalidation gets.
    next: u64,
    /// The latest invalidations and their sequence numbers, oldest first.
    recent: VecDeque<(u64, Filter)>,
}

impl Log {
    /// Where the log stands now.
    pub fn mark(&self) -> Mark {
        Mark(self.next)
    }

    /// Records an invalidation.
    pub fn record(&mut self, filter: Filter) {
        if self.recent.len() == LOG_CAPACITY {
            self.recent.pop_front();
        }
        self.recent.push_back((self.next, filter));
        self.next += 1;
    }

    /// True when an invalidation since `mark` drops the token of `key` minted for `owner`, or
    /// when the log no longer reaches back to `mark`.
    pub fn invalidated_since(&self, mark: Mark, key: &CacheKey, owner: &Owner) -> bool {
        let oldest = self.recent.front().map_or(self.next, |(seq, _)| *seq);
        if mark.0 < oldest && self.next > mark.0 {
            return true;
        }
        self.recent
            .iter()
            .rev()
            .take_while(|(seq, _)| *seq >= mark.0)
            .any(|(_, filter)| filter.matches(key, owner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(caller: &str, flow: &str, account: Option<&str>) -> Owner {
        Owner {
            caller: caller.into(),
            flow_id: flow.into(),
            account_id: account.map(Into::into),
            minted_at: std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000),
        }
    }

    const K: CacheKey = [1; 32];

    #[test]
    fn a_filter_matches_every_field_it_names_and_nothing_else() {
        let o = owner("c", "f", Some("u"));
        assert!(Filter::caller("c").matches(&K, &o));
        assert!(!Filter::caller("d").matches(&K, &o));
        assert!(Filter::of(Some("c"), Some("f"), None).matches(&K, &o));
        assert!(!Filter::of(Some("c"), Some("g"), None).matches(&K, &o));
        assert!(Filter::of(None, Some("f"), Some("u")).matches(&K, &o));
        assert!(!Filter::of(None, Some("f"), Some("v")).matches(&K, &o));
        assert!(!Filter::of(Some("c"), None, Some("u")).matches(&K, &owner("c", "f", None)));
        assert!(Filter::default().matches(&K, &o));
        assert!(Filter::key("c", K).matches(&K, &o));
        assert!(!Filter::key("c", [2; 32]).matches(&K, &o));
    }

    #[test]
    fn only_a_matching_invalidation_since_the_mark_counts() {
        let mut log = Log::default();
        log.record(Filter::caller("c"));
        let mark = log.mark();
        let o = owner("c", "f", Some("u"));
        assert!(
            !log.invalidated_since(mark, &K, &o),
            "the one before the mark"
        );
        log.record(Filter::caller("other"));
        log.record(Filter::of(Some("c"), None, Some("someone-else")));
        assert!(!log.invalidated_since(mark, &K, &o));
        log.record(Filter::of(Some("c"), Some("f"), None));
        assert!(log.invalidated_since(mark, &K, &o));
    }

    #[test]
    fn a_mark_older_than_the_log_counts_as_invalidated() {
        let mut log = Log::default();
        let mark = log.mark();
        assert!(!log.invalidated_since(mark, &K, &owner("c", "f", None)));
        for _ in 0..=LOG_CAPACITY {
            log.record(Filter::caller("other"));
        }
        assert!(log.invalidated_since(mark, &K, &owner("c", "f", None)));
        assert!(!log.invalidated_since(log.mark(), &K, &owner("c", "f", None)));
    }
}
