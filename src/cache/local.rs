//! The in-process tier: tokens by key, bounded by `cache.max_entries` (least recently used
//! first out), each gone once it is inside `cache.min_remaining`, and dropped on demand by
//! caller, flow and user.
//!
//! An entry keeps the token once, with what its answers need made ready (the `expires_at`
//! text, whether the token needs escaping at all), so a hit parses and escapes nothing: it
//! copies. Keeping both answers rendered would hold the token three times per entry; the
//! memory per cached token is measured in docs/performance.md.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use moka::notification::RemovalCause;
use zeroize::Zeroizing;

use super::{bounded, CacheKey};
use crate::metrics::Metrics;

/// Who a token was minted for: what invalidation matches entries on.
#[derive(Debug, Clone)]
pub struct Owner {
    /// The caller it was minted for.
    pub caller: Arc<str>,
    /// The flow it was minted for.
    pub flow_id: Box<str>,
    /// The user it was minted for, when named by account_id.
    pub account_id: Option<Box<str>>,
}

/// A minted token with everything needed to answer with it again (see the module docs).
pub struct Entry {
    /// Who it was minted for.
    pub owner: Owner,
    /// When the token dies, on the local monotonic clock.
    pub expires: Instant,
    /// The last moment it may be handed out (`expires - min_remaining`).
    pub serve_until: Instant,
    /// When the token dies, on the wall clock.
    pub expires_at: SystemTime,
    token: Zeroizing<Box<str>>,
    /// `expires_at` in RFC 3339 to the second (`2026-11-26T02:13:31Z`).
    expires_at_text: [u8; 20],
    /// `{upstream.web_url}/?token=`, JSON-escaped without quotes; one allocation shared by
    /// every entry of an issuer.
    identity_prefix: Arc<str>,
    /// The token is all `A-Z a-z 0-9 - _ .`: the same bytes in JSON and in a URL query.
    plain: bool,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("caller", &self.owner.caller)
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

impl Entry {
    /// An entry for `token`, answered with `identity_prefix` (see [`identity_prefix`]) before
    /// the token in its `identity_url`.
    pub fn new(
        token: &str,
        identity_prefix: Arc<str>,
        owner: Owner,
        expires: Instant,
        serve_until: Instant,
        expires_at: SystemTime,
    ) -> Self {
        let mut expires_at_text = [b'0'; 20];
        // RFC 3339 to the second is 20 bytes for every year a token can end in (before 10000).
        let _ = write!(
            &mut expires_at_text[..],
            "{}",
            humantime::format_rfc3339_seconds(expires_at)
        );
        Self {
            owner,
            expires,
            serve_until,
            expires_at,
            plain: token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')),
            token: Zeroizing::new(token.into()),
            expires_at_text,
            identity_prefix,
        }
    }

    /// Life left at `now`.
    pub fn remaining(&self, now: Instant) -> Duration {
        self.expires.saturating_duration_since(now)
    }

    /// `expires_at` as the answer says it.
    pub fn expires_at_text(&self) -> &[u8] {
        &self.expires_at_text
    }

    /// The JSON-escaped `identity_url` before the token.
    pub fn identity_prefix(&self) -> &[u8] {
        self.identity_prefix.as_bytes()
    }

    /// Calls `f` with the token JSON-escaped (without quotes) and the token escaped for a URL
    /// query (which JSON needs no further escaping for). Both are the token itself unless it
    /// holds other bytes than a JWT's; then they are made here, in buffers wiped after use.
    pub fn with_escaped_token<R>(&self, f: impl FnOnce(&[u8], &[u8]) -> R) -> R {
        if self.plain {
            return f(self.token.as_bytes(), self.token.as_bytes());
        }
        let mut json = Zeroizing::new(Vec::with_capacity(self.token.len() + 16));
        // Serialising a str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *json, &**self.token);
        let inner = json
            .get(1..json.len().saturating_sub(1))
            .unwrap_or_default();
        let url: Zeroizing<String> =
            Zeroizing::new(form_urlencoded::byte_serialize(self.token.as_bytes()).collect());
        f(inner, url.as_bytes())
    }
}

/// The JSON-escaped `identity_url` before the token (`{web_url}/?token=`), for [`Entry::new`].
pub fn identity_prefix(web_url: &str) -> Arc<str> {
    let url = format!("{}/?token=", web_url.trim_end_matches('/'));
    let quoted = serde_json::to_string(&url).unwrap_or_default();
    quoted
        .get(1..quoted.len().saturating_sub(1))
        .unwrap_or_default()
        .into()
}

struct ServeUntil;

impl moka::Expiry<CacheKey, Arc<Entry>> for ServeUntil {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Arc<Entry>,
        created_at: Instant,
    ) -> Option<Duration> {
        Some(value.serve_until.saturating_duration_since(created_at))
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        value: &Arc<Entry>,
        updated_at: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.serve_until.saturating_duration_since(updated_at))
    }
}

/// Tokens by key, bounded by `cache.max_entries`, each gone once it is inside `min_remaining`.
#[derive(Clone)]
pub struct TokenCache {
    inner: moka::sync::Cache<CacheKey, Arc<Entry>>,
}

impl TokenCache {
    /// A cache of at most `max_entries` tokens.
    pub fn new(max_entries: u64) -> Self {
        Self {
            inner: Self::builder(max_entries).build(),
        }
    }

    /// A cache of at most `max_entries` tokens whose evictions are counted, by cause, in
    /// `token_broker_cache_evictions_total`.
    pub fn observed(max_entries: u64, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Self::builder(max_entries)
                .eviction_listener(move |_key, _entry, cause| {
                    let i = match cause {
                        RemovalCause::Expired => 0,
                        RemovalCause::Explicit => 1,
                        RemovalCause::Replaced => 2,
                        RemovalCause::Size => 3,
                    };
                    metrics.evictions[i].inc();
                })
                .build(),
        }
    }

    /// Bounded by `max_entries` (see [`bounded`]), each entry gone at its `serve_until`.
    fn builder(
        max_entries: u64,
    ) -> moka::sync::CacheBuilder<CacheKey, Arc<Entry>, moka::sync::Cache<CacheKey, Arc<Entry>>>
    {
        bounded(max_entries).expire_after(ServeUntil)
    }

    /// The entry for `key` if it may still be handed out at `now`.
    pub fn get(&self, key: &CacheKey, now: Instant) -> Option<Arc<Entry>> {
        self.inner.get(key).filter(|e| e.serve_until > now)
    }

    /// Stores an entry (replacing any older one for the key).
    pub fn insert(&self, key: CacheKey, entry: Arc<Entry>) {
        self.inner.insert(key, entry);
    }

    /// Drops the caller's entries for the flow and/or account given (neither: all of the
    /// caller's, as when it is revoked); returns how many.
    pub fn invalidate(&self, caller: &str, flow_id: Option<&str>, account_id: Option<&str>) -> u64 {
        let mut dropped = 0;
        for (key, entry) in self.inner.iter() {
            let owner = &entry.owner;
            let matches = &*owner.caller == caller
                && flow_id.is_none_or(|f| &*owner.flow_id == f)
                && account_id.is_none_or(|a| owner.account_id.as_deref() == Some(a));
            if matches && self.inner.remove(&*key).is_some() {
                dropped += 1;
            }
        }
        dropped
    }

    /// Drops every entry (the shared tier does this when it may have missed invalidations).
    pub fn clear(&self) {
        self.inner.invalidate_all();
    }

    /// Entries held now (after pending evictions are applied).
    pub fn len(&self) -> u64 {
        self.inner.run_pending_tasks();
        self.inner.entry_count()
    }

    /// True when no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::EVICTION_CAUSES;

    fn entry(caller: &str, flow: &str, account: Option<&str>, life: Duration) -> Arc<Entry> {
        let now = Instant::now();
        let owner = Owner {
            caller: caller.into(),
            flow_id: flow.into(),
            account_id: account.map(Into::into),
        };
        Arc::new(Entry::new(
            "t",
            identity_prefix("https://id.example"),
            owner,
            now + life,
            now + life,
            SystemTime::now() + life,
        ))
    }

    #[test]
    fn a_hit_returns_the_entry_until_serve_until() {
        let cache = TokenCache::new(10);
        cache.insert([1; 32], entry("c", "f", None, Duration::from_secs(60)));
        assert!(cache.get(&[1; 32], Instant::now()).is_some());
        assert!(cache
            .get(&[1; 32], Instant::now() + Duration::from_secs(61))
            .is_none());
        assert!(cache.get(&[2; 32], Instant::now()).is_none());
    }

    #[test]
    fn invalidation_drops_only_the_callers_matching_entries() {
        let cache = TokenCache::new(10);
        let life = Duration::from_secs(60);
        cache.insert([1; 32], entry("c", "f1", Some("u1"), life));
        cache.insert([2; 32], entry("c", "f2", Some("u1"), life));
        cache.insert([3; 32], entry("c", "f1", Some("u2"), life));
        cache.insert([4; 32], entry("other", "f1", Some("u1"), life));
        assert_eq!(cache.invalidate("c", Some("f1"), Some("u1")), 1);
        assert_eq!(cache.invalidate("c", None, Some("u1")), 1);
        assert_eq!(cache.invalidate("c", Some("f1"), None), 1);
        assert_eq!(cache.len(), 1);
        assert!(cache.get(&[4; 32], Instant::now()).is_some());
    }

    #[test]
    fn evictions_are_counted_by_cause() {
        let metrics = Arc::new(Metrics::new(prometheus::Registry::new()).unwrap());
        let cache = TokenCache::observed(2, Arc::clone(&metrics));
        let count = |cause: &str| {
            let i = EVICTION_CAUSES.iter().position(|c| *c == cause).unwrap();
            metrics.evictions[i].get()
        };
        let long = Duration::from_secs(600);
        cache.insert([1; 32], entry("c", "f", Some("u1"), long));
        cache.insert([1; 32], entry("c", "f", Some("u1"), long));
        cache.len();
        assert_eq!(count("replaced"), 1);
        assert_eq!(cache.invalidate("c", None, Some("u1")), 1);
        cache.len();
        assert_eq!(count("explicit"), 1);
        cache.insert([2; 32], entry("c", "f", None, Duration::from_millis(50)));
        // moka's timer wheel ticks about once a second: wait for it, for at most 5 s.
        let deadline = Instant::now() + Duration::from_secs(5);
        while count("expired") == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            cache.len();
        }
        assert_eq!(count("expired"), 1);
        for i in 10..30u8 {
            cache.insert([i; 32], entry("c", "f", None, long));
            cache.len();
        }
        assert!(count("size") >= 18, "{}", count("size"));
    }

    #[test]
    fn a_full_cache_keeps_the_token_just_minted_over_often_hit_ones() {
        // A token is stored because it was just minted for a caller who is likely to ask
        // again soon; a full cache of tokens hit many times must still take it (evicting the
        // least recently used), or every request of a new user would mint anew.
        let cache = TokenCache::new(50);
        let life = Duration::from_secs(600);
        for i in 0..50u8 {
            cache.insert([i; 32], entry("c", "f", None, life));
        }
        for _ in 0..20 {
            for i in 0..50u8 {
                assert!(cache.get(&[i; 32], Instant::now()).is_some());
            }
            cache.len();
        }
        for new in 100..110u8 {
            cache.insert([new; 32], entry("c", "f", None, life));
            cache.len();
            assert!(
                cache.get(&[new; 32], Instant::now()).is_some(),
                "the token just stored for key {new} was refused"
            );
        }
        assert!(cache.len() <= 50, "{}", cache.len());
    }

    #[test]
    fn max_entries_bounds_the_cache() {
        let cache = TokenCache::new(5);
        for i in 0..50u8 {
            cache.insert([i; 32], entry("c", "f", None, Duration::from_secs(60)));
        }
        assert!(cache.len() <= 5, "{}", cache.len());
    }
}
