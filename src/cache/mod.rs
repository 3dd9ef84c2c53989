//! The token cache, in two tiers: this process's own ([`local`]), and optionally one in Redis
//! shared by every replica ([`shared`], `[cache.shared]`). What a cached token is ([`entry`]), and
//! what an invalidation drops and how it wins over mints in flight ([`invalidation`]).
//!
//! The cache knows tokens by an opaque [`CacheKey`]; which requests share a key is the issuance
//! core's decision (`crate::issuance::key`), so the cache never sees a request.

pub mod entry;
pub mod invalidation;
pub mod local;
pub mod shared;

pub use entry::{identity_prefix, Entry, Owner};
pub use invalidation::{Dropped, Filter, Mark, Reason};
pub use local::TokenCache;

/// A cache key: the SHA-256 the issuance core makes of a caller and its canonical request. Never
/// user data itself.
pub type CacheKey = [u8; 32];

/// A moka cache of at most `max_entries`, where the least recently used entry makes room: the
/// broker's caches (tokens, pass-through results) all store what a caller just paid an upstream
/// call for. moka's default policy (TinyLFU) would instead refuse a new entry whenever the cache
/// is full of entries used more often, and the caller's next request would call Truora again.
pub fn bounded<K, V>(max_entries: u64) -> moka::sync::CacheBuilder<K, V, moka::sync::Cache<K, V>>
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    moka::sync::Cache::builder()
        .max_capacity(max_entries)
        .eviction_policy(moka::policy::EvictionPolicy::lru())
}
