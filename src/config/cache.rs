//! `[cache]` and `[cache.shared]`: the in-process token cache, the pass-through result cache and
//! the optional Redis tier shared by replicas.

use std::collections::BTreeSet;
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

/// How the broker reaches Redis (`cache.shared.mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SharedMode {
    /// One Redis at `url` (a primary, or a managed endpoint that fails over behind one address).
    #[default]
    Standalone,
    /// Redis Cluster: `nodes` are seeds; the client follows the slots, `MOVED`/`ASK` and
    /// topology changes itself.
    Cluster,
    /// A primary and its replicas behind Sentinel: `nodes` are the sentinels, `sentinel_master`
    /// the name they monitor; the broker follows the primary they name.
    Sentinel,
}

impl SharedMode {
    /// The mode as the config file and the metrics spell it.
    pub fn name(self) -> &'static str {
        match self {
            SharedMode::Standalone => "standalone",
            SharedMode::Cluster => "cluster",
            SharedMode::Sentinel => "sentinel",
        }
    }
}

/// `[cache.shared]`: the Redis tier shared by replicas (see docs/scaling.md).
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SharedCacheConfig {
    /// `standalone` (one Redis at `url`), `cluster` (Redis Cluster, seeds in `nodes`) or
    /// `sentinel` (sentinels in `nodes`, the primary named `sentinel_master`).
    #[serde(default)]
    pub mode: SharedMode,
    /// `standalone` only: `redis://host:port/db` or `rediss://` for TLS; a user and password may
    /// be given in it.
    #[serde(default)]
    pub url: Option<String>,
    /// `cluster`: seed nodes of the cluster; `sentinel`: the sentinels. Each
    /// `redis://host:port` or `rediss://host:port` (all of one scheme), a user may be given in
    /// them, a password never (`password_file`, `sentinel_password_file`).
    #[serde(default)]
    pub nodes: Vec<String>,
    /// `sentinel` only: the name of the primary the sentinels monitor.
    #[serde(default)]
    pub sentinel_master: Option<String>,
    /// File holding the Redis password (AUTH) of the data nodes, when it is not in `url`.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// `sentinel` only: file holding the sentinels' own password, when they require one (it
    /// may differ from the data nodes' `password_file`).
    #[serde(default)]
    pub sentinel_password_file: Option<PathBuf>,
    /// File holding the 32-byte value encryption key as 64 hex digits. When absent the key comes
    /// from `TOKEN_BROKER_CACHE_ENCRYPTION_KEY`. Values are sealed with it.
    #[serde(default)]
    pub encryption_key_file: Option<PathBuf>,
    /// Files of earlier encryption keys (same format): values sealed with any of them still
    /// open, and are sealed again with the current key when next written; invalidations still
    /// find them. For rotating the key without a mint per user (see docs/scaling.md).
    #[serde(default)]
    pub previous_encryption_key_files: Vec<PathBuf>,
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
    /// Enforce `upstream.mint_rate` and every `clients.mint_rate` across the fleet through Redis,
    /// and share Truora's throttle window (after a 429) with every replica. Redis unreachable:
    /// each replica applies its own limits, as without the section.
    #[serde(default = "default_true")]
    pub fleet_limits: bool,
}

impl std::fmt::Debug for SharedCacheConfig {
    /// The URLs may hold Redis's password: only their scheme and host are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCacheConfig")
            .field("mode", &self.mode)
            .field("url", &self.url.as_deref().map(redacted_url))
            .field(
                "nodes",
                &self
                    .nodes
                    .iter()
                    .map(|n| redacted_url(n))
                    .collect::<Vec<_>>(),
            )
            .field("sentinel_master", &self.sentinel_master)
            .field("password_file", &self.password_file)
            .field("sentinel_password_file", &self.sentinel_password_file)
            .field("encryption_key_file", &self.encryption_key_file)
            .field(
                "previous_encryption_key_files",
                &self.previous_encryption_key_files,
            )
            .field("ca_file", &self.ca_file)
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("lock_ttl", &self.lock_ttl)
            .field("breaker_threshold", &self.breaker_threshold)
            .field("breaker_cooldown", &self.breaker_cooldown)
            .field("fleet_limits", &self.fleet_limits)
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

fn default_true() -> bool {
    true
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
        let only_in = |key: &str, set: bool, mode: &str| {
            if set {
                Err(bad(key, format!("only for mode = \"{mode}\"")))
            } else {
                Ok(())
            }
        };
        let tls = match self.mode {
            SharedMode::Standalone => {
                only_in("nodes", !self.nodes.is_empty(), "cluster\" or \"sentinel")?;
                let url = self.url.as_deref().ok_or_else(|| {
                    bad(
                        "url",
                        "required with mode = \"standalone\" (the default)".into(),
                    )
                })?;
                check_url("url", url, true, self.password_file.is_some())?
            }
            SharedMode::Cluster | SharedMode::Sentinel => {
                only_in("url", self.url.is_some(), "standalone")?;
                if self.nodes.is_empty() {
                    return Err(bad(
                        "nodes",
                        format!(
                            "required with mode = \"{}\": at least one redis://host:port",
                            self.mode.name()
                        ),
                    ));
                }
                if self.nodes.len() > 64 {
                    return Err(bad("nodes", "at most 64".into()));
                }
                let mut schemes = BTreeSet::new();
                for (i, node) in self.nodes.iter().enumerate() {
                    schemes.insert(check_url(&format!("nodes[{i}]"), node, false, false)?);
                }
                if schemes.len() > 1 {
                    return Err(bad(
                        "nodes",
                        "all redis:// or all rediss://, not a mix".into(),
                    ));
                }
                let users: BTreeSet<String> = self
                    .nodes
                    .iter()
                    .filter_map(|n| redis::parse_redis_url(n).map(|u| u.username().to_owned()))
                    .collect();
                if users.len() > 1 {
                    return Err(bad("nodes", "all with the same user, or none".into()));
                }
                schemes.contains(&true)
            }
        };
        let sentinel = self.mode == SharedMode::Sentinel;
        only_in(
            "sentinel_password_file",
            !sentinel && self.sentinel_password_file.is_some(),
            "sentinel",
        )?;
        match (&self.sentinel_master, sentinel) {
            (Some(_), false) => only_in("sentinel_master", true, "sentinel")?,
            (None, true) => {
                return Err(bad(
                    "sentinel_master",
                    "required with mode = \"sentinel\": the name the sentinels monitor".into(),
                ))
            }
            (Some(name), true) => {
                let ok = !name.is_empty()
                    && name.len() <= 128
                    && name.bytes().all(|b| b.is_ascii_graphic());
                if !ok {
                    return Err(bad(
                        "sentinel_master",
                        "must be 1 to 128 printable characters without spaces".into(),
                    ));
                }
            }
            (None, false) => {}
        }
        if self.ca_file.is_some() && !tls {
            return Err(bad("ca_file", "needs rediss:// URLs".into()));
        }
        if self.previous_encryption_key_files.len() > 8 {
            return Err(bad(
                "previous_encryption_key_files",
                "at most 8 (keep the keys a value may still be sealed with)".into(),
            ));
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
        if self.mode == SharedMode::Cluster && self.key_prefix.contains(['{', '}']) {
            return Err(bad(
                "key_prefix",
                "no { or } with mode = \"cluster\": the broker hash-tags its keys itself, and a tag in the prefix would put every key in one slot".into(),
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

/// Checks one Redis URL of `cache.shared.<key>`; true when it is `rediss://`. `standalone`: a
/// database and a password may be given in it (but not a password when `password_file` is set
/// too); otherwise neither (`nodes` name hosts only, passwords come from files).
fn check_url(
    key: &str,
    url: &str,
    standalone: bool,
    password_file: bool,
) -> Result<bool, ConfigError> {
    let bad = |reason: String| ConfigError::Invalid {
        key: format!("cache.shared.{key}"),
        reason,
    };
    let shown = redacted_url(url);
    let info = redis::parse_redis_url(url)
        .ok_or_else(|| bad(format!("{shown} is not a redis:// or rediss:// URL")))?;
    if !matches!(info.scheme(), "redis" | "rediss") || info.host_str().is_none_or(str::is_empty) {
        let form = if standalone {
            "redis://host[:port][/db] or rediss://..."
        } else {
            "redis://host:port or rediss://host:port"
        };
        return Err(bad(format!("{shown} must be {form}")));
    }
    if let Err(e) = url.into_connection_info() {
        return Err(bad(format!("{shown}: {}", e.category())));
    }
    if standalone {
        if password_file && info.password().is_some() {
            return Err(ConfigError::Invalid {
                key: "cache.shared.password_file".into(),
                reason: "set, and the URL holds a password too: give it in one place".into(),
            });
        }
    } else {
        if info.password().is_some() {
            return Err(bad(format!(
                "{shown}: no password in the URL; use password_file (sentinel_password_file for the sentinels)"
            )));
        }
        if !matches!(info.path(), "" | "/" | "/0") || info.query().is_some() {
            return Err(bad(format!("{shown}: host and port only")));
        }
    }
    Ok(info.scheme() == "rediss")
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
        assert!(check(&|c| c.url = Some("http://127.0.0.1:6379".into()))
            .unwrap()
            .starts_with("cache.shared.url"));
        assert!(check(&|c| c.ca_file = Some("/ca.pem".into()))
            .unwrap()
            .starts_with("cache.shared.ca_file"));
        assert_eq!(
            check(&|c| {
                c.url = Some("rediss://127.0.0.1:6379".into());
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
    fn each_mode_needs_its_own_keys_and_refuses_the_others() {
        let check = |text: &str| {
            let parsed: CacheSection = toml::from_str(&format!("[cache.shared]\n{text}")).unwrap();
            parsed
                .cache
                .shared
                .unwrap()
                .validate(Duration::from_secs(10))
                .err()
                .map(|e| e.to_string())
        };
        let fails_on = |text: &str, key: &str| {
            let err = check(text).unwrap_or_else(|| panic!("{text} was accepted"));
            assert!(
                err.starts_with(&format!("cache.shared.{key}")),
                "{text}: {err}"
            );
        };
        assert_eq!(check("url = \"redis://h:6379\""), None);
        fails_on("mode = \"standalone\"", "url");
        fails_on("url = \"redis://h\"\nnodes = [\"redis://h:1\"]", "nodes");
        let cluster = "mode = \"cluster\"\nnodes = [\"redis://a:7000\", \"redis://b:7001\"]";
        assert_eq!(check(cluster), None);
        fails_on("mode = \"cluster\"", "nodes");
        fails_on(&format!("{cluster}\nurl = \"redis://h\""), "url");
        fails_on(
            &format!("{cluster}\nsentinel_master = \"m\""),
            "sentinel_master",
        );
        fails_on(
            &format!("{cluster}\nkey_prefix = \"{{tb}}:\""),
            "key_prefix",
        );
        fails_on(
            "mode = \"cluster\"\nnodes = [\"redis://a:7000\", \"rediss://b:7001\"]",
            "nodes",
        );
        fails_on(
            "mode = \"cluster\"\nnodes = [\"redis://:pw@a:7000\"]",
            "nodes[0]",
        );
        fails_on(
            "mode = \"cluster\"\nnodes = [\"redis://a:7000/2\"]",
            "nodes[0]",
        );
        fails_on(
            "mode = \"cluster\"\nnodes = [\"http://a:7000\"]",
            "nodes[0]",
        );
        fails_on(&format!("{cluster}\nca_file = \"/ca.pem\""), "ca_file");
        fails_on(
            &format!("{cluster}\nsentinel_password_file = \"/pw\""),
            "sentinel_password_file",
        );
        let sentinel = "mode = \"sentinel\"\nnodes = [\"redis://s1:26379\"]";
        fails_on(sentinel, "sentinel_master");
        fails_on(
            &format!("{sentinel}\nsentinel_master = \"a b\""),
            "sentinel_master",
        );
        assert_eq!(
            check(&format!(
                "{sentinel}\nsentinel_master = \"mymaster\"\nsentinel_password_file = \"/pw\"\npassword_file = \"/pw2\""
            )),
            None
        );
        // The key prefix may carry braces outside cluster mode, as before.
        assert_eq!(check("url = \"redis://h\"\nkey_prefix = \"{tb}:\""), None);
        let many: Vec<String> = (0..9).map(|i| format!("\"/k{i}\"")).collect();
        fails_on(
            &format!(
                "url = \"redis://h\"\nprevious_encryption_key_files = [{}]",
                many.join(",")
            ),
            "previous_encryption_key_files",
        );
    }

    #[test]
    fn fleet_limits_are_on_by_default_and_node_urls_are_redacted() {
        let parsed: CacheSection = toml::from_str(
            "[cache.shared]\nmode = \"cluster\"\nnodes = [\"redis://user:pw@a:7000\"]\n",
        )
        .unwrap();
        let c = parsed.cache.shared.unwrap();
        assert!(c.fleet_limits);
        assert_eq!(c.mode, SharedMode::Cluster);
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("pw") && shown.contains("redis://a:7000"),
            "{shown}"
        );
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
