//! The in-process tier: tokens by key, bounded by `cache.max_entries` (least recently used
//! first out), each gone once it is inside `cache.min_remaining`, and dropped on demand.
//!
//! Invalidation never scans the cache: an index, kept with the cache (an entry evicted leaves it
//! too), finds a caller's tokens and a user's tokens of a flow. Every invalidation is recorded in
//! the [`Log`], and a mint stores its token only when none that matches it came since the mint
//! started ([`TokenCache::insert_unless_invalidated`]). A hit takes no lock of ours.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use moka::notification::RemovalCause;

use super::invalidation::{Dropped, Filter, Log, Mark};
use super::{bounded, CacheKey, Entry, Owner};
use crate::metrics::Metrics;

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

/// Entries by key, without holding them alive.
type Keys = HashMap<CacheKey, Weak<Entry>>;

/// The cache's entries by caller, and by flow and user (flow id, account id).
#[derive(Default)]
struct Index {
    by_caller: HashMap<Arc<str>, Keys>,
    by_user: HashMap<(Box<str>, Box<str>), Keys>,
}

impl Index {
    fn add(&mut self, key: CacheKey, entry: &Arc<Entry>) {
        let owner = &entry.owner;
        let weak = Arc::downgrade(entry);
        self.by_caller
            .entry(Arc::clone(&owner.caller))
            .or_default()
            .insert(key, weak.clone());
        if let Some(account) = &owner.account_id {
            self.by_user
                .entry((owner.flow_id.clone(), account.clone()))
                .or_default()
                .insert(key, weak);
        }
    }

    /// Forgets `entry` under `key`, unless the index already holds a newer entry there.
    fn remove(&mut self, key: &CacheKey, entry: &Arc<Entry>) {
        let owner = &entry.owner;
        let gone = |keys: &mut Keys| {
            if keys
                .get(key)
                .is_some_and(|w| w.as_ptr() == Arc::as_ptr(entry))
            {
                keys.remove(key);
            }
            keys.is_empty()
        };
        if self.by_caller.get_mut(&owner.caller).is_some_and(gone) {
            self.by_caller.remove(&owner.caller);
        }
        if let Some(account) = &owner.account_id {
            let user = (owner.flow_id.clone(), account.clone());
            if self.by_user.get_mut(&user).is_some_and(gone) {
                self.by_user.remove(&user);
            }
        }
    }

    /// The keys of the entries `filter` may drop: a caller's, or a user's in a flow, or (for a
    /// filter naming neither) every key.
    fn candidates(&self, filter: &Filter) -> Vec<(CacheKey, Weak<Entry>)> {
        let pairs = |keys: &Keys| -> Vec<(CacheKey, Weak<Entry>)> {
            keys.iter().map(|(k, w)| (*k, w.clone())).collect()
        };
        if let (Some(key), Some(caller)) = (&filter.key, &filter.caller) {
            return self
                .by_caller
                .get(caller)
                .and_then(|keys| keys.get(key))
                .map(|w| vec![(*key, w.clone())])
                .unwrap_or_default();
        }
        match (&filter.caller, &filter.flow_id, &filter.account_id) {
            (_, Some(flow), Some(account)) => self
                .by_user
                .get(&(flow.clone(), account.clone()))
                .map(pairs)
                .unwrap_or_default(),
            (Some(caller), _, _) => self.by_caller.get(caller).map(pairs).unwrap_or_default(),
            (None, _, _) => self.by_caller.values().flat_map(pairs).collect(),
        }
    }
}

/// What the cache and its eviction listener share.
#[derive(Default)]
struct Shared {
    index: Mutex<Index>,
    /// Held while an invalidation is recorded and applied, and while a mint checks and stores:
    /// so a mint can never store its token between an invalidation's record and its sweep.
    log: Mutex<Log>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each update is complete before its lock is let go: a panic elsewhere leaves no half-made
    // state behind.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Tokens by key, bounded by `cache.max_entries`, each gone once it is inside `min_remaining`.
#[derive(Clone)]
pub struct TokenCache {
    inner: moka::sync::Cache<CacheKey, Arc<Entry>>,
    shared: Arc<Shared>,
    /// Processes whose end was applied (here, or on another replica that said so), so that
    /// hearing of one again (a retried webhook, a result read again) drops nothing more.
    ended: moka::sync::Cache<Arc<str>, ()>,
}

/// Ended processes remembered: far more than end within a day at any sane rate; each is a few
/// dozen bytes.
const ENDED_CAPACITY: u64 = 100_000;
/// How long an ended process is remembered: longer than any token of it can live (two hours),
/// and than Truora retries a delivery.
const ENDED_MEMORY: Duration = Duration::from_secs(24 * 60 * 60);

impl TokenCache {
    /// A cache of at most `max_entries` tokens.
    pub fn new(max_entries: u64) -> Self {
        Self::build(max_entries, None)
    }

    /// A cache of at most `max_entries` tokens whose evictions are counted, by cause, in
    /// `token_broker_cache_evictions_total`.
    pub fn observed(max_entries: u64, metrics: Arc<Metrics>) -> Self {
        Self::build(max_entries, Some(metrics))
    }

    /// Bounded by `max_entries` (see [`bounded`]), each entry gone at its `serve_until`, and out
    /// of the index once evicted.
    fn build(max_entries: u64, metrics: Option<Arc<Metrics>>) -> Self {
        let shared = Arc::new(Shared::default());
        let listener = Arc::clone(&shared);
        let inner = bounded(max_entries)
            .expire_after(ServeUntil)
            .eviction_listener(move |key, entry: Arc<Entry>, cause| {
                if let Some(metrics) = &metrics {
                    let i = match cause {
                        RemovalCause::Expired => 0,
                        RemovalCause::Explicit => 1,
                        RemovalCause::Replaced => 2,
                        RemovalCause::Size => 3,
                    };
                    metrics.evictions[i].inc();
                }
                lock(&listener.index).remove(&key, &entry);
            })
            .build();
        let ended = moka::sync::Cache::builder()
            .max_capacity(ENDED_CAPACITY)
            .time_to_live(ENDED_MEMORY)
            .build();
        Self {
            inner,
            shared,
            ended,
        }
    }

    /// True when the end of `process` was applied already.
    pub fn has_ended(&self, process: &str) -> bool {
        self.ended.contains_key(process)
    }

    /// The entry for `key` if it may still be handed out at `now`.
    pub fn get(&self, key: &CacheKey, now: Instant) -> Option<Arc<Entry>> {
        self.inner.get(key).filter(|e| e.serve_until > now)
    }

    /// Where the invalidation log stands: a mint takes this when it starts.
    pub fn mark(&self) -> Mark {
        lock(&self.shared.log).mark()
    }

    /// True when an invalidation since `mark` drops the token of `key` minted for `owner` (see
    /// [`Log`]).
    pub fn invalidated_since(&self, mark: Mark, key: &CacheKey, owner: &Owner) -> bool {
        lock(&self.shared.log).invalidated_since(mark, key, owner)
    }

    /// Stores an entry (replacing any older one for the key), whatever came before.
    pub fn insert(&self, key: CacheKey, entry: Arc<Entry>) {
        let _log = lock(&self.shared.log);
        self.store(key, entry);
    }

    /// Stores the entry of a mint that started at `since`, unless an invalidation that drops it
    /// came meanwhile; says whether it was stored.
    pub fn insert_unless_invalidated(&self, key: CacheKey, entry: Arc<Entry>, since: Mark) -> bool {
        let log = lock(&self.shared.log);
        if log.invalidated_since(since, &key, &entry.owner) {
            return false;
        }
        self.store(key, entry);
        true
    }

    /// With the log held: into the cache, then into the index.
    fn store(&self, key: CacheKey, entry: Arc<Entry>) {
        lock(&self.shared.index).add(key, &entry);
        self.inner.insert(key, entry);
    }

    /// Records the invalidation and drops the entries it matches. Looks only at one key, the
    /// caller's entries, or the user's in a flow, through the index.
    pub fn invalidate(&self, filter: &Filter) -> Dropped {
        let mut log = lock(&self.shared.log);
        log.record(filter.clone());
        if let Some(process) = &filter.process {
            self.ended.insert(Arc::clone(process), ());
        }
        let candidates = lock(&self.shared.index).candidates(filter);
        let mut dropped = Dropped::default();
        let mut callers: Vec<Arc<str>> = Vec::new();
        for (key, weak) in candidates {
            let Some(entry) = weak.upgrade() else {
                continue;
            };
            // Whatever entry holds the key now has the same owner (the key is made from it),
            // and was indexed before this invalidation took the log.
            if filter.matches(&key, &entry.owner) && self.inner.remove(&key).is_some() {
                dropped.tokens += 1;
                if !callers.contains(&entry.owner.caller) {
                    callers.push(Arc::clone(&entry.owner.caller));
                }
            }
        }
        drop(log);
        dropped.callers = callers.len();
        dropped
    }

    /// Drops every entry, and counts as an invalidation of everything for mints in flight (the
    /// shared tier does this when it may have missed invalidations).
    pub fn clear(&self) {
        let mut log = lock(&self.shared.log);
        log.record(Filter::default());
        self.inner.invalidate_all();
        drop(log);
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
    use crate::cache::identity_prefix;
    use crate::metrics::EVICTION_CAUSES;
    use std::time::SystemTime;

    fn entry(caller: &str, flow: &str, account: Option<&str>, life: Duration) -> Arc<Entry> {
        let now = Instant::now();
        let owner = Owner {
            caller: caller.into(),
            flow_id: flow.into(),
            account_id: account.map(Into::into),
            minted_at: SystemTime::now(),
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
        assert_eq!(
            cache
                .invalidate(&Filter::of(Some("c"), Some("f1"), Some("u1")))
                .tokens,
            1
        );
        assert_eq!(
            cache
                .invalidate(&Filter::of(Some("c"), None, Some("u1")))
                .tokens,
            1
        );
        assert_eq!(
            cache
                .invalidate(&Filter::of(Some("c"), Some("f1"), None))
                .tokens,
            1
        );
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
        assert_eq!(
            cache
                .invalidate(&Filter::of(Some("c"), None, Some("u1")))
                .tokens,
            1
        );
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

    #[test]
    fn a_mint_started_before_a_matching_invalidation_is_not_stored() {
        let cache = TokenCache::new(10);
        let life = Duration::from_secs(60);
        let since = cache.mark();
        cache.invalidate(&Filter::of(Some("c"), Some("f"), None));
        assert!(!cache.insert_unless_invalidated([1; 32], entry("c", "f", Some("u"), life), since));
        assert!(cache.get(&[1; 32], Instant::now()).is_none());
        // Unrelated invalidations do not count; a mark taken after one does not see it.
        assert!(cache.insert_unless_invalidated([2; 32], entry("c", "g", Some("u"), life), since));
        let later = cache.mark();
        assert!(cache.insert_unless_invalidated([3; 32], entry("c", "f", Some("u"), life), later));
    }

    #[test]
    fn a_user_of_a_flow_is_dropped_across_callers_and_nothing_else() {
        let cache = TokenCache::new(10);
        let life = Duration::from_secs(60);
        cache.insert([1; 32], entry("a", "f", Some("u"), life));
        cache.insert([2; 32], entry("b", "f", Some("u"), life));
        cache.insert([3; 32], entry("a", "g", Some("u"), life));
        cache.insert([4; 32], entry("a", "f", Some("v"), life));
        assert_eq!(
            cache
                .invalidate(&Filter::of(None, Some("f"), Some("u")))
                .tokens,
            2
        );
        for (key, kept) in [(1, false), (2, false), (3, true), (4, true)] {
            assert_eq!(
                cache.get(&[key; 32], Instant::now()).is_some(),
                kept,
                "{key}"
            );
        }
    }

    #[test]
    fn evicted_entries_leave_the_index() {
        let cache = TokenCache::new(5);
        for i in 0..50u8 {
            cache.insert([i; 32], entry("c", "f", Some("u"), Duration::from_secs(60)));
            cache.len();
        }
        cache.len();
        let index = lock(&cache.shared.index);
        let by_caller = index.by_caller.values().map(HashMap::len).sum::<usize>();
        let by_user = index.by_user.values().map(HashMap::len).sum::<usize>();
        assert!(by_caller <= 5 && by_user <= 5, "{by_caller} {by_user}");
    }
}
