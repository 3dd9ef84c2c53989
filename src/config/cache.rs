//! `[cache]` and `[cache.shared]`: the in-process token cache, the pass-through result cache and
//! the optional Redis tier shared by replicas.

use std::path::PathBuf;
use std::time::Duration;

use redis::IntoConnectionInfo;
use serde::{Deserialize, Serialize};

use super::upstream::default_breaker_threshold;
use super::{invalid, ConfigError};
use crate::truora::DEFAULT_TOKEN_LIFETIME;

/// `[cache]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Most tokens held at once; the least recently used go first beyond it.
    #[serde(default = "default_max_entries")]
    pub max_entries: u64,
    /// A cached token is handed out only while it has at least this much life left.
    #[serde(default = "default_min_remaining", with = "humantime_serde")]
    pub min_remaining: Duration,
    /// How long a final process result (`status` success or failure) read through
    /// `GET /truora/identity/v1/processes/*/result` is kept, per caller and path. `0s`: off.
    #[serde(default, with = "humantime_serde")]
    pub result_ttl: Duration,
    /// Most `DELETE /v1/tokens` a second per caller (bursts of up to one second's worth); beyond
    /// it, 429. Invalidation is cheap but not free: a caller deleting in a loop must not crowd
    /// out the others.
    #[serde(default = "default_invalidate_rate")]
    pub invalidate_rate: u32,
    /// Most bytes of results the result cache holds (bodies and keys counted); the least
    /// recently read make room beyond it.
    #[serde(default = "default_result_max_bytes")]
    pub result_max_bytes: u64,
    /// `[cache.shared]`: a second tier in Redis shared by every replica. Absent: the cache is
    /// this process's alone (see docs/scaling.md).
    #[serde(default)]
    pub shared: Option<SharedCacheConfig>,
}

/// `[cache.shared]`: the Redis tier shared by replicas (see docs/scaling.md).
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SharedCacheConfig {
    /// `redis://host:port/db` or `rediss://` for TLS; a user and password may be given in it.
    pub url: String,
    /// File holding the Redis password (AUTH), when it is not in `url`.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// File holding the 32-byte value encryption key as 64 hex digits. When absent the key comes
    /// from `TOKEN_BROKER_CACHE_ENCRYPTION_KEY`.
    #[serde(default)]
    pub encryption_key_file: Option<PathBuf>,
    /// PEM file of the CA certificates that sign Redis's certificate (`rediss://` only). Absent:
    /// Mozilla's roots and the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Prefix of every Redis key and channel the broker uses, so brokers of different
    /// deployments can share one Redis.
    #[serde(default = "default_shared_key_prefix")]
    pub key_prefix: String,
    /// The longest one Redis call (or connecting) may take; past it the broker goes on without
    /// Redis for that request.
    #[serde(default = "default_shared_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Life of the fleet-wide minting lock: a replica that dies holding it delays others by at
    /// most this. Must exceed `upstream.deadline`, so a live holder never loses its lock.
    #[serde(default = "default_shared_lock_ttl", with = "humantime_serde")]
    pub lock_ttl: Duration,
    /// Consecutive failed Redis calls that open the Redis breaker (calls skip Redis while open).
    #[serde(default = "default_breaker_threshold")]
    pub breaker_threshold: u32,
    /// How long the Redis breaker stays open before Redis is tried again.
    #[serde(default = "default_shared_breaker_cooldown", with = "humantime_serde")]
    pub breaker_cooldown: Duration,
}

impl std::fmt::Debug for SharedCacheConfig {
    /// The URL may hold Redis's password: only its scheme and host are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCacheConfig")
            .field("url", &redacted_url(&self.url))
            .field("password_file", &self.password_file)
            .field("encryption_key_file", &self.encryption_key_file)
            .field("ca_file", &self.ca_file)
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("lock_ttl", &self.lock_ttl)
            .field("breaker_threshold", &self.breaker_threshold)
            .field("breaker_cooldown", &self.breaker_cooldown)
            .finish()
    }
}

/// A Redis URL without its user info, path or query: safe for a log line.
pub fn redacted_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("?", url));
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    format!("{scheme}://{host}")
}

fn default_shared_key_prefix() -> String {
    "token-broker:".into()
}
fn default_shared_timeout() -> Duration {
    Duration::from_millis(250)
}
fn default_shared_lock_ttl() -> Duration {
    Duration::from_secs(15)
}
fn default_shared_breaker_cooldown() -> Duration {
    Duration::from_secs(5)
}

fn default_invalidate_rate() -> u32 {
    10
}
fn default_result_max_bytes() -> u64 {
    16 * 1024 * 1024
}
fn default_max_entries() -> u64 {
    100_000
}
fn default_min_remaining() -> Duration {
    Duration::from_secs(15 * 60)
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_entries: default_max_entries(),
            min_remaining: default_min_remaining(),
            result_ttl: Duration::ZERO,
            result_max_bytes: default_result_max_bytes(),
            invalidate_rate: default_invalidate_rate(),
            shared: None,
        }
    }
}

impl CacheConfig {
    /// Checks the section's own rules, and the shared tier's against `upstream.deadline`.
    pub fn validate(&self, upstream_deadline: Duration) -> Result<(), ConfigError> {
        let c = self;
        if c.max_entries == 0 {
            return Err(invalid("cache.max_entries", "must be at least 1"));
        }
        if c.result_ttl > Duration::from_secs(3600) {
            return Err(invalid("cache.result_ttl", "must be at most 1h"));
        }
        if !(1..=10_000).contains(&c.invalidate_rate) {
            return Err(invalid(
                "cache.invalidate_rate",
                "must be between 1 and 10000",
            ));
        }
        if !(64 * 1024..=1024 * 1024 * 1024).contains(&c.result_max_bytes) {
            return Err(invalid(
                "cache.result_max_bytes",
                "must be between 65536 and 1073741824",
            ));
        }
        if c.min_remaining >= DEFAULT_TOKEN_LIFETIME {
            return Err(invalid(
                "cache.min_remaining",
                "must be less than 2h, the lifetime of Truora's tokens, or nothing could be reused",
            ));
        }

        if let Some(shared) = &c.shared {
            shared.validate(upstream_deadline)?;
        }
        Ok(())
    }
}

impl SharedCacheConfig {
    /// `[cache.shared]` with `url = "redis://127.0.0.1:6379"` and every default, for tests.
    #[cfg(test)]
    pub(crate) fn example() -> Self {
        let text = "[cache.shared]\nurl = \"redis://127.0.0.1:6379\"\n";
        let parsed: CacheSection = toml::from_str(text).unwrap();
        parsed.cache.shared.unwrap()
    }

    /// Checks the section on its own and against `upstream.deadline`.
    pub fn validate(&self, upstream_deadline: Duration) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: String| ConfigError::Invalid {
            key: format!("cache.shared.{key}"),
            reason,
        };
        let shown = redacted_url(&self.url);
        let info = redis::parse_redis_url(&self.url)
            .ok_or_else(|| bad("url", format!("{shown} is not a redis:// or rediss:// URL")))?;
        if !matches!(info.scheme(), "redis" | "rediss") || info.host_str().is_none_or(str::is_empty)
        {
            return Err(bad(
                "url",
                format!("{shown} must be redis://host[:port][/db] or rediss://..."),
            ));
        }
        if let Err(e) = self.url.as_str().into_connection_info() {
            return Err(bad("url", format!("{shown}: {}", e.category())));
        }
        if self.password_file.is_some() && info.password().is_some() {
            return Err(bad(
                "password_file",
                "set, and the URL holds a password too: give it in one place".into(),
            ));
        }
        if self.ca_file.is_some() && info.scheme() != "rediss" {
            return Err(bad("ca_file", "needs a rediss:// URL".into()));
        }
        let prefix_ok = !self.key_prefix.is_empty()
            && self.key_prefix.len() <= 64
            && self
                .key_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:{}".contains(&b));
        if !prefix_ok {
            return Err(bad(
                "key_prefix",
                "must be 1 to 64 of [A-Za-z0-9-_.:{}]".into(),
            ));
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(10) {
            return Err(bad("timeout", "must be more than 0 and at most 10s".into()));
        }
        if self.lock_ttl <= upstream_deadline {
            return Err(bad(
                "lock_ttl",
                "must be longer than upstream.deadline, or a replica still minting could lose its lock and another mint too".into(),
            ));
        }
        if self.breaker_threshold == 0 {
            return Err(bad("breaker_threshold", "must be at least 1".into()));
        }
        if self.breaker_cooldown.is_zero() {
            return Err(bad("breaker_cooldown", "must be more than 0".into()));
        }
        Ok(())
    }
}

/// A file holding only `[cache]`, for [`SharedCacheConfig::example`].
#[cfg(test)]
#[derive(Deserialize)]
struct CacheSection {
    cache: CacheConfig,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SharedCacheConfig {
        SharedCacheConfig::example()
    }

    #[test]
    fn the_section_is_checked() {
        let check = |f: &dyn Fn(&mut SharedCacheConfig)| {
            let mut c = cfg();
            f(&mut c);
            c.validate(Duration::from_secs(10))
                .err()
                .map(|e| e.to_string())
        };
        assert_eq!(check(&|_| {}), None);
        assert!(check(&|c| c.url = "http://127.0.0.1:6379".into())
            .unwrap()
            .starts_with("cache.shared.url"));
        assert!(check(&|c| c.ca_file = Some("/ca.pem".into()))
            .unwrap()
            .starts_with("cache.shared.ca_file"));
        assert_eq!(
            check(&|c| {
                c.url = "rediss://127.0.0.1:6379".into();
                c.ca_file = Some("/ca.pem".into());
            }),
            None
        );
        assert!(check(&|c| c.lock_ttl = Duration::from_secs(10))
            .unwrap()
            .starts_with("cache.shared.lock_ttl"));
        assert!(check(&|c| c.key_prefix = "a b".into())
            .unwrap()
            .starts_with("cache.shared.key_prefix"));
        assert!(check(&|c| c.timeout = Duration::ZERO)
            .unwrap()
            .starts_with("cache.shared.timeout"));
        assert!(check(&|c| c.breaker_threshold = 0)
            .unwrap()
            .starts_with("cache.shared.breaker_threshold"));
    }

    #[test]
    fn urls_are_shown_without_their_user_info() {
        assert_eq!(
            redacted_url("rediss://user:pw@redis.internal:6380/2"),
            "rediss://redis.internal:6380"
        );
        assert_eq!(redacted_url("redis://h"), "redis://h");
    }
}
