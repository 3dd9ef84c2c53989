//! The configuration file: TOML read into serde structs, then validated as a whole before any
//! socket is bound. Every error names the key at fault (`clients[1].token_sha256`, ...), and the
//! command line turns it into exit status 64.
//!
//! Durations are written as humantime strings (`"5s"`, `"15m"`). Unknown keys are an error, so a
//! typo cannot silently fall back to a default.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::policy::CallerPolicy;
use crate::secret::{MasterKey, SecretDigest};

/// The environment variable read for the master key when `upstream.api_key_file` is not set.
pub const API_KEY_ENV: &str = "TRUORA_API_KEY";

/// Truora's tokens live two hours by default; a `min_remaining` at or above that caches nothing.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(2 * 60 * 60);

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the broker listens.
    #[serde(default)]
    pub server: ServerConfig,
    /// How the broker reaches Truora.
    #[serde(default)]
    pub upstream: UpstreamConfig,
    /// The token cache.
    #[serde(default)]
    pub cache: CacheConfig,
    /// The internal callers allowed to ask for tokens.
    #[serde(default)]
    pub clients: Vec<ClientConfig>,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the caller API (`POST /v1/tokens`, `POST /v1/api-keys`, `DELETE /v1/tokens`).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Address of the admin endpoints (the status page `/`, `/metrics`, `/healthz`, `/readyz`,
    /// `POST /admin/reload`); never the token API.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// Largest request body accepted, in bytes; larger bodies get 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// How long in-flight requests may run after SIGTERM or Ctrl-C before the broker exits anyway.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// How long a client may take to send a request's head (also the idle limit between
    /// requests on a kept-alive connection); past it the connection is closed.
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// How long a client may take to send a request's body once its head is in; past it, 408.
    #[serde(default = "default_body_read_timeout", with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Most headers in one request; more get 431.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// Largest request head (request line and headers) in bytes; larger gets 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Most open connections on the caller listener; beyond it new connections are closed at
    /// once (counted in `token_broker_server_connections_rejected_total`).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Most concurrent HTTP/2 streams per connection.
    #[serde(default = "default_http2_max_streams")]
    pub http2_max_streams: u32,
    /// TLS on the caller listener. Absent: plain HTTP (behind a trusted network only).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// `[server.tls]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the listener's certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM file with the listener's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM file with the CA certificates that sign callers' client certificates. Present: client
    /// certificates are checked, and callers with `tls_san` are identified by them.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

/// `[upstream]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL of Truora's account API, where `POST /v1/api-keys` mints tokens.
    #[serde(default = "default_account_url")]
    pub account_url: String,
    /// Base URL of Truora's identity API, where `/truora/identity/...` pass-through goes.
    #[serde(default = "default_identity_url")]
    pub identity_url: String,
    /// The longest a pass-through request may wait for Truora's answer head; past it, 504.
    #[serde(default = "default_passthrough_timeout", with = "humantime_serde")]
    pub passthrough_timeout: Duration,
    /// Largest pass-through request body, in bytes, streamed and cut off beyond it (413).
    #[serde(default = "default_passthrough_max_body_bytes")]
    pub passthrough_max_body_bytes: usize,
    /// Base URL of Truora's identity web page; responses carry `<web_url>/?token=<api_key>`.
    #[serde(default = "default_web_url")]
    pub web_url: String,
    /// File holding the master API key. When absent the key comes from `TRUORA_API_KEY`.
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// The longest one attempt may take, connection and answer included. An attempt that times
    /// out after its request was sent is not retried (Truora may have minted): callers get 504.
    #[serde(default = "default_upstream_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// The longest opening a connection to Truora may take (never more than `upstream.timeout`).
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// The longest a caller waits for a mint, retries and back-off included.
    #[serde(default = "default_deadline", with = "humantime_serde")]
    pub deadline: Duration,
    /// Retries after the first attempt, only where safe: a connection that could not be made,
    /// and 429 or 503 answers (after their Retry-After).
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// First back-off before a retry; it doubles each time, with jitter.
    #[serde(default = "default_retry_backoff", with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Longest back-off between two attempts.
    #[serde(default = "default_retry_backoff_max", with = "humantime_serde")]
    pub retry_backoff_max: Duration,
    /// Consecutive failed calls (5xx, timeouts, connection failures, unusable answers) that open
    /// the circuit breaker; while open, misses get 503 at once and hits are still served.
    #[serde(default = "default_breaker_threshold")]
    pub breaker_threshold: u32,
    /// How long the breaker stays open before one probe call may close it again.
    #[serde(default = "default_breaker_cooldown", with = "humantime_serde")]
    pub breaker_cooldown: Duration,
    /// Most calls to Truora in flight at once; beyond it misses get 503 at once.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: u32,
    /// Most mints a second for all callers together (bursts of up to one second's worth);
    /// beyond it misses get 429.
    #[serde(default = "default_mint_rate")]
    pub mint_rate: u32,
    /// How list fields (`emails`, `phones`) are sent to Truora: `"repeat"` (`emails=a&emails=b`,
    /// what integrators send) or `"comma"` (`emails=a,b`). Truora's docs do not settle it.
    #[serde(default)]
    pub array_encoding: ArrayEncoding,
}

/// How a list field is written into the form sent upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ArrayEncoding {
    /// One `name=value` pair per element.
    #[default]
    Repeat,
    /// One pair, the elements joined with commas.
    Comma,
}

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
    /// `[cache.shared]`: a second tier in Redis shared by every replica. Absent: the cache is
    /// this process's alone (see docs/scaling.md).
    #[serde(default)]
    pub shared: Option<SharedCacheConfig>,
}

/// `[cache.shared]`: the Redis tier shared by replicas (see `crate::shared_cache`).
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

/// One `[[clients]]` entry: an internal caller. It authenticates with a bearer secret
/// (`token_sha256`), a client certificate (`tls_san`), or both (then both are required).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The caller's name: in logs and the cache key. `[a-z0-9_.-]`, at most 64.
    pub id: String,
    /// Hex SHA-256 of the caller's bearer secret (`token-broker hash-secret` prints it).
    #[serde(default)]
    pub token_sha256: Option<String>,
    /// DNS name the caller's client certificate must be valid for (needs
    /// `server.tls.client_ca_file`).
    #[serde(default)]
    pub tls_san: Option<String>,
    /// Most mints a second for this caller (bursts of up to one second's worth); beyond it its
    /// misses get 429. Absent: only the global `upstream.mint_rate` applies.
    #[serde(default)]
    pub mint_rate: Option<u32>,
    /// Flow ids this caller may ask tokens for. Absent: any.
    #[serde(default)]
    pub allowed_flows: Option<Vec<String>>,
    /// Countries this caller may ask tokens for. Absent: any.
    #[serde(default)]
    pub allowed_countries: Option<Vec<String>>,
    /// Hosts `redirect_url` may point at (`example.com`, or `*.example.com` for its
    /// subdomains). Absent: any.
    #[serde(default)]
    pub allowed_redirect_hosts: Option<Vec<String>>,
    /// Whether this caller may use the drop-in `POST /v1/api-keys`.
    #[serde(default = "default_true")]
    pub drop_in: bool,
    /// Truora endpoints this caller may reach through the broker, as `"METHOD /truora/..."`
    /// (`*` matches one path segment). Empty: no pass-through.
    #[serde(default)]
    pub passthrough: Vec<String>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            id: String::new(),
            token_sha256: None,
            tls_san: None,
            mint_rate: None,
            allowed_flows: None,
            allowed_countries: None,
            allowed_redirect_hosts: None,
            drop_in: true,
            passthrough: Vec::new(),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}
fn default_max_body_bytes() -> usize {
    16 * 1024
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_body_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_headers() -> usize {
    64
}
fn default_max_header_bytes() -> usize {
    16 * 1024
}
fn default_max_connections() -> usize {
    10_000
}
fn default_http2_max_streams() -> u32 {
    128
}
fn default_account_url() -> String {
    "https://api.account.truora.com".into()
}
fn default_identity_url() -> String {
    "https://api.identity.truora.com".into()
}
fn default_passthrough_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_passthrough_max_body_bytes() -> usize {
    10 * 1024 * 1024
}
fn default_web_url() -> String {
    "https://identity.truora.com".into()
}
fn default_upstream_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_deadline() -> Duration {
    Duration::from_secs(10)
}
fn default_max_retries() -> u32 {
    2
}
fn default_retry_backoff() -> Duration {
    Duration::from_millis(100)
}
fn default_retry_backoff_max() -> Duration {
    Duration::from_secs(2)
}
fn default_breaker_threshold() -> u32 {
    5
}
fn default_breaker_cooldown() -> Duration {
    Duration::from_secs(10)
}
fn default_max_concurrent() -> u32 {
    64
}
fn default_mint_rate() -> u32 {
    50
}
fn default_max_entries() -> u64 {
    100_000
}
fn default_min_remaining() -> Duration {
    Duration::from_secs(15 * 60)
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            admin_listen: default_admin_listen(),
            max_body_bytes: default_max_body_bytes(),
            shutdown_timeout: default_shutdown_timeout(),
            header_read_timeout: default_header_read_timeout(),
            body_read_timeout: default_body_read_timeout(),
            max_headers: default_max_headers(),
            max_header_bytes: default_max_header_bytes(),
            max_connections: default_max_connections(),
            http2_max_streams: default_http2_max_streams(),
            tls: None,
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            account_url: default_account_url(),
            identity_url: default_identity_url(),
            passthrough_timeout: default_passthrough_timeout(),
            passthrough_max_body_bytes: default_passthrough_max_body_bytes(),
            web_url: default_web_url(),
            api_key_file: None,
            timeout: default_upstream_timeout(),
            connect_timeout: default_connect_timeout(),
            deadline: default_deadline(),
            max_retries: default_max_retries(),
            retry_backoff: default_retry_backoff(),
            retry_backoff_max: default_retry_backoff_max(),
            breaker_threshold: default_breaker_threshold(),
            breaker_cooldown: default_breaker_cooldown(),
            max_concurrent: default_max_concurrent(),
            mint_rate: default_mint_rate(),
            array_encoding: ArrayEncoding::default(),
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_entries: default_max_entries(),
            min_remaining: default_min_remaining(),
            result_ttl: Duration::ZERO,
            shared: None,
        }
    }
}

/// A configuration that cannot be used, naming the key and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    /// The TOML does not parse, has an unknown key, or a value of the wrong type.
    #[error("config file {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    /// A value parses but breaks a rule.
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// A caller as the broker uses it: its name, how it authenticates, what it may ask for.
#[derive(Debug, Clone)]
pub struct Client {
    /// From `[[clients]] id`.
    pub id: Arc<str>,
    /// From `[[clients]] token_sha256`.
    pub digest: Option<SecretDigest>,
    /// From `[[clients]] tls_san`, lower-cased.
    pub tls_san: Option<Arc<str>>,
    /// From `[[clients]] mint_rate`.
    pub mint_rate: Option<u32>,
    /// From the `allowed_*` lists and `drop_in`.
    pub policy: Arc<CallerPolicy>,
    /// From `[[clients]] passthrough`.
    pub passthrough: Arc<[crate::passthrough::Pattern]>,
}

impl Client {
    /// A caller known by its bearer secret alone, allowed everything (tests, the demo).
    pub fn with_secret(id: &str, secret: &[u8]) -> Self {
        Self {
            id: id.into(),
            digest: Some(SecretDigest::of(secret)),
            tls_san: None,
            mint_rate: None,
            policy: Arc::new(CallerPolicy::default()),
            passthrough: Arc::new([]),
        }
    }
}

impl Config {
    /// Reads and parses a file, then validates it.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let config = Self::parse(&text).map_err(|reason| ConfigError::Parse {
            path: path.to_owned(),
            reason,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text without validating it.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    /// Checks every rule that the types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.listen == s.admin_listen && s.listen.port() != 0 {
            return Err(invalid(
                "server.admin_listen",
                "must differ from server.listen: the admin endpoints never share the token API's port",
            ));
        }
        if !(256..=1024 * 1024).contains(&s.max_body_bytes) {
            return Err(invalid(
                "server.max_body_bytes",
                "must be between 256 and 1048576",
            ));
        }
        if s.shutdown_timeout > Duration::from_secs(300) {
            return Err(invalid("server.shutdown_timeout", "must be at most 5m"));
        }
        for (key, d) in [
            ("server.header_read_timeout", s.header_read_timeout),
            ("server.body_read_timeout", s.body_read_timeout),
        ] {
            if d.is_zero() || d > Duration::from_secs(300) {
                return Err(invalid(key, "must be more than 0s and at most 5m"));
            }
        }
        if !(8..=1024).contains(&s.max_headers) {
            return Err(invalid("server.max_headers", "must be between 8 and 1024"));
        }
        if !(8192..=1024 * 1024).contains(&s.max_header_bytes) {
            return Err(invalid(
                "server.max_header_bytes",
                "must be between 8192 and 1048576",
            ));
        }
        if s.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be at least 1"));
        }
        if !(1..=10_000).contains(&s.http2_max_streams) {
            return Err(invalid(
                "server.http2_max_streams",
                "must be between 1 and 10000",
            ));
        }
        if let Some(tls) = &s.tls {
            for (key, path) in [
                ("server.tls.cert_file", Some(&tls.cert_file)),
                ("server.tls.key_file", Some(&tls.key_file)),
                ("server.tls.client_ca_file", tls.client_ca_file.as_ref()),
            ] {
                if let Some(path) = path {
                    if let Err(e) = std::fs::metadata(path) {
                        return Err(invalid(key, format!("cannot read {}: {e}", path.display())));
                    }
                }
            }
        }

        let u = &self.upstream;
        check_base_url("upstream.account_url", &u.account_url)?;
        check_base_url("upstream.web_url", &u.web_url)?;
        check_base_url("upstream.identity_url", &u.identity_url)?;
        if u.passthrough_timeout.is_zero() || u.passthrough_timeout > Duration::from_secs(600) {
            return Err(invalid(
                "upstream.passthrough_timeout",
                "must be more than 0s and at most 10m",
            ));
        }
        if !(1024..=1024 * 1024 * 1024).contains(&u.passthrough_max_body_bytes) {
            return Err(invalid(
                "upstream.passthrough_max_body_bytes",
                "must be between 1024 and 1073741824",
            ));
        }
        if u.timeout.is_zero() || u.timeout > Duration::from_secs(120) {
            return Err(invalid(
                "upstream.timeout",
                "must be more than 0s and at most 2m",
            ));
        }
        if u.connect_timeout.is_zero() || u.connect_timeout > Duration::from_secs(60) {
            return Err(invalid(
                "upstream.connect_timeout",
                "must be more than 0s and at most 1m",
            ));
        }
        if u.deadline < u.timeout || u.deadline > Duration::from_secs(300) {
            return Err(invalid(
                "upstream.deadline",
                "must be at least upstream.timeout and at most 5m",
            ));
        }
        if u.max_retries > 10 {
            return Err(invalid("upstream.max_retries", "must be at most 10"));
        }
        if u.retry_backoff.is_zero() || u.retry_backoff > u.retry_backoff_max {
            return Err(invalid(
                "upstream.retry_backoff",
                "must be more than 0s and at most upstream.retry_backoff_max",
            ));
        }
        if u.retry_backoff_max > Duration::from_secs(60) {
            return Err(invalid("upstream.retry_backoff_max", "must be at most 1m"));
        }
        if u.breaker_threshold == 0 {
            return Err(invalid("upstream.breaker_threshold", "must be at least 1"));
        }
        if u.breaker_cooldown.is_zero() || u.breaker_cooldown > Duration::from_secs(600) {
            return Err(invalid(
                "upstream.breaker_cooldown",
                "must be more than 0s and at most 10m",
            ));
        }
        if !(1..=4096).contains(&u.max_concurrent) {
            return Err(invalid(
                "upstream.max_concurrent",
                "must be between 1 and 4096",
            ));
        }
        if !(1..=100_000).contains(&u.mint_rate) {
            return Err(invalid(
                "upstream.mint_rate",
                "must be between 1 and 100000",
            ));
        }

        let c = &self.cache;
        if c.max_entries == 0 {
            return Err(invalid("cache.max_entries", "must be at least 1"));
        }
        if c.result_ttl > Duration::from_secs(3600) {
            return Err(invalid("cache.result_ttl", "must be at most 1h"));
        }
        if c.min_remaining >= DEFAULT_TOKEN_LIFETIME {
            return Err(invalid(
                "cache.min_remaining",
                "must be less than 2h, the lifetime of Truora's tokens, or nothing could be reused",
            ));
        }

        if let Some(shared) = &c.shared {
            shared.validate(self.upstream.deadline)?;
        }

        if self.clients.is_empty() {
            return Err(invalid(
                "clients",
                "no [[clients]] configured: no caller could ask for a token",
            ));
        }
        let mut ids = HashSet::new();
        let mut digests = HashSet::new();
        for (i, client) in self.clients.iter().enumerate() {
            let id = &client.id;
            let valid_id = !id.is_empty()
                && id.len() <= 64
                && id.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
                });
            if !valid_id {
                return Err(invalid(
                    format!("clients[{i}].id"),
                    "must be 1 to 64 characters of a-z, 0-9, '_', '.', '-'",
                ));
            }
            if !ids.insert(id.as_str()) {
                return Err(invalid(
                    format!("clients[{i}].id"),
                    format!("\"{id}\" is used by another client"),
                ));
            }
            if client
                .mint_rate
                .is_some_and(|r| !(1..=100_000).contains(&r))
            {
                return Err(invalid(
                    format!("clients[{i}].mint_rate"),
                    "must be between 1 and 100000",
                ));
            }
            if client.token_sha256.is_none() && client.tls_san.is_none() {
                return Err(invalid(
                    format!("clients[{i}]"),
                    "needs token_sha256, tls_san or both: a way to authenticate",
                ));
            }
            if let Some(san) = &client.tls_san {
                if self
                    .server
                    .tls
                    .as_ref()
                    .and_then(|t| t.client_ca_file.as_ref())
                    .is_none()
                {
                    return Err(invalid(
                        format!("clients[{i}].tls_san"),
                        "needs server.tls.client_ca_file: client certificates are only checked with a CA to check them against",
                    ));
                }
                if rustls::pki_types::ServerName::try_from(san.as_str()).is_err()
                    || san.contains('*')
                {
                    return Err(invalid(
                        format!("clients[{i}].tls_san"),
                        format!("\"{san}\" is not a DNS name"),
                    ));
                }
            }
            check_list(i, "allowed_flows", client.allowed_flows.as_deref(), |f| {
                !f.is_empty()
                    && f.len() <= 64
                    && f.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
            })?;
            check_list(
                i,
                "allowed_countries",
                client.allowed_countries.as_deref(),
                |c| crate::request::COUNTRIES.contains(&c),
            )?;
            check_list(
                i,
                "allowed_redirect_hosts",
                client.allowed_redirect_hosts.as_deref(),
                |h| {
                    let bare = h.strip_prefix("*.").unwrap_or(h);
                    !bare.is_empty()
                        && !bare.contains('*')
                        && rustls::pki_types::ServerName::try_from(bare).is_ok()
                },
            )?;
            for (j, entry) in client.passthrough.iter().enumerate() {
                if let Err(reason) = crate::passthrough::Pattern::parse(entry) {
                    return Err(invalid(
                        format!("clients[{i}].passthrough[{j}]"),
                        format!("\"{entry}\": {reason}"),
                    ));
                }
            }
            let Some(hex) = &client.token_sha256 else {
                continue;
            };
            let Some(digest) = SecretDigest::from_hex(hex) else {
                return Err(invalid(
                    format!("clients[{i}].token_sha256"),
                    "must be 64 hex digits: the SHA-256 of the caller's secret (see `token-broker hash-secret`)",
                ));
            };
            if !digests.insert(digest.to_hex()) {
                return Err(invalid(
                    format!("clients[{i}].token_sha256"),
                    "is the same as another client's: each caller needs its own secret",
                ));
            }
        }
        Ok(())
    }

    /// The callers as the broker uses them. Call after [`Config::validate`].
    pub fn clients(&self) -> Vec<Client> {
        self.clients
            .iter()
            .map(|c| Client {
                id: c.id.as_str().into(),
                digest: c.token_sha256.as_deref().and_then(SecretDigest::from_hex),
                tls_san: c.tls_san.as_deref().map(|s| s.to_ascii_lowercase().into()),
                mint_rate: c.mint_rate,
                policy: Arc::new(CallerPolicy {
                    allowed_flows: c.allowed_flows.clone(),
                    allowed_countries: c.allowed_countries.clone(),
                    allowed_redirect_hosts: c
                        .allowed_redirect_hosts
                        .as_ref()
                        .map(|hosts| hosts.iter().map(|h| h.to_ascii_lowercase()).collect()),
                    drop_in: c.drop_in,
                }),
                passthrough: c
                    .passthrough
                    .iter()
                    .filter_map(|p| crate::passthrough::Pattern::parse(p).ok())
                    .collect(),
            })
            .collect()
    }

    /// Loads the master key: from `upstream.api_key_file` when set, else from `TRUORA_API_KEY`.
    /// Neither (or an empty one) refuses to start.
    pub fn master_key(&self) -> Result<MasterKey, ConfigError> {
        self.master_key_with(std::env::var(API_KEY_ENV).ok())
    }

    /// [`Config::master_key`] with the environment's value given, for tests.
    pub fn master_key_with(&self, env_value: Option<String>) -> Result<MasterKey, ConfigError> {
        if let Some(path) = &self.upstream.api_key_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                invalid(
                    "upstream.api_key_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            return MasterKey::new(&text).ok_or_else(|| {
                invalid(
                    "upstream.api_key_file",
                    format!("{} is empty", path.display()),
                )
            });
        }
        env_value
            .as_deref()
            .and_then(MasterKey::new)
            .ok_or_else(|| {
                invalid(
                    "upstream.api_key_file",
                    format!("not set, and {API_KEY_ENV} is not set or empty: the broker needs Truora's master API key"),
                )
            })
    }
}

/// Checks every entry of an optional `[[clients]]` list with `valid`.
fn check_list(
    i: usize,
    key: &str,
    list: Option<&[String]>,
    valid: impl Fn(&str) -> bool,
) -> Result<(), ConfigError> {
    let Some(list) = list else {
        return Ok(());
    };
    if list.is_empty() {
        return Err(invalid(
            format!("clients[{i}].{key}"),
            "is empty, so it would allow nothing: leave it out to allow any",
        ));
    }
    match list.iter().find(|v| !valid(v)) {
        Some(bad) => Err(invalid(
            format!("clients[{i}].{key}"),
            format!("\"{bad}\" is not valid here"),
        )),
        None => Ok(()),
    }
}

/// A base URL: `http` or `https`, a host, no query or fragment, no user info.
fn check_base_url(key: &str, value: &str) -> Result<(), ConfigError> {
    let uri: http::Uri = value
        .parse()
        .map_err(|_| invalid(key, format!("\"{value}\" is not a URL")))?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or("");
    if !scheme_ok || authority.is_empty() || authority.contains('@') {
        return Err(invalid(
            key,
            format!("\"{value}\" must be an http(s) URL with a host and no user info"),
        ));
    }
    if uri.query().is_some() || value.contains('#') {
        return Err(invalid(
            key,
            format!("\"{value}\" must have no query or fragment"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[server]
listen = "127.0.0.1:8080"
admin_listen = "127.0.0.1:9090"
[upstream]
account_url = "https://api.account.truora.com"
web_url = "https://identity.truora.com"
timeout = "5s"
[cache]
max_entries = 100000
min_remaining = "15m"
[[clients]]
id = "checkout"
token_sha256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
"#;

    fn err_key(text: &str) -> String {
        match Config::parse(text).unwrap().validate().unwrap_err() {
            ConfigError::Invalid { key, .. } => key,
            other => panic!("{other}"),
        }
    }

    #[test]
    fn the_documented_example_is_valid() {
        let c = Config::parse(GOOD).unwrap();
        c.validate().unwrap();
        assert_eq!(c.upstream.timeout, Duration::from_secs(5));
        assert_eq!(c.cache.min_remaining, Duration::from_secs(900));
        assert_eq!(c.clients().len(), 1);
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let text = GOOD.replace("timeout = \"5s\"", "timeout = \"5s\"\ntimout = \"5s\"");
        let err = Config::parse(&text).unwrap_err();
        assert!(err.contains("timout"), "{err}");
    }

    #[test]
    fn bad_duration_is_an_error_naming_the_key() {
        let text = GOOD.replace("\"15m\"", "\"fifteen\"");
        let err = Config::parse(&text).unwrap_err();
        assert!(err.contains("min_remaining"), "{err}");
    }

    #[test]
    fn bad_digest_names_the_client_key() {
        let text = GOOD.replace("ba7816bf", "zz7816bf");
        assert_eq!(err_key(&text), "clients[0].token_sha256");
    }

    #[test]
    fn duplicate_client_ids_are_refused() {
        let text = format!(
            "{GOOD}\n[[clients]]\nid = \"checkout\"\ntoken_sha256 = \"{}\"\n",
            "1".repeat(64)
        );
        assert_eq!(err_key(&text), "clients[1].id");
    }

    #[test]
    fn shared_secret_between_clients_is_refused() {
        let text = format!(
            "{GOOD}\n[[clients]]\nid = \"other\"\ntoken_sha256 = \"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\"\n"
        );
        assert_eq!(err_key(&text), "clients[1].token_sha256");
    }

    #[test]
    fn no_clients_is_refused() {
        let text = GOOD.split("[[clients]]").next().unwrap();
        assert_eq!(err_key(text), "clients");
    }

    #[test]
    fn same_port_for_admin_and_callers_is_refused() {
        let text = GOOD.replace("127.0.0.1:9090", "127.0.0.1:8080");
        assert_eq!(err_key(&text), "server.admin_listen");
    }

    #[test]
    fn non_http_upstream_url_is_refused() {
        let text = GOOD.replace("https://api.account.truora.com", "ftp://x");
        assert_eq!(err_key(&text), "upstream.account_url");
        let text = GOOD.replace("https://identity.truora.com", "https://u:p@identity");
        assert_eq!(err_key(&text), "upstream.web_url");
    }

    #[test]
    fn resilience_settings_are_checked_against_each_other() {
        let with =
            |extra: &str| GOOD.replace("timeout = \"5s\"", &format!("timeout = \"5s\"\n{extra}"));
        assert_eq!(err_key(&with("deadline = \"1s\"")), "upstream.deadline");
        assert_eq!(
            err_key(&with("connect_timeout = \"0s\"")),
            "upstream.connect_timeout"
        );
        assert_eq!(err_key(&with("max_retries = 99")), "upstream.max_retries");
        assert_eq!(
            err_key(&with("retry_backoff = \"5s\"")),
            "upstream.retry_backoff"
        );
        assert_eq!(
            err_key(&with("breaker_threshold = 0")),
            "upstream.breaker_threshold"
        );
        assert_eq!(
            err_key(&with("breaker_cooldown = \"0s\"")),
            "upstream.breaker_cooldown"
        );
        assert_eq!(
            err_key(&with("max_concurrent = 0")),
            "upstream.max_concurrent"
        );
        assert_eq!(err_key(&with("mint_rate = 0")), "upstream.mint_rate");
        let text = format!("{GOOD}mint_rate = 0\n");
        assert_eq!(err_key(&text), "clients[0].mint_rate");
    }

    #[test]
    fn resilience_defaults_do_not_get_in_the_way() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.upstream.max_concurrent, 64);
        assert_eq!(c.upstream.mint_rate, 50);
        assert_eq!(c.clients[0].mint_rate, None);
    }

    #[test]
    fn min_remaining_of_two_hours_is_refused() {
        let text = GOOD.replace("\"15m\"", "\"2h\"");
        assert_eq!(err_key(&text), "cache.min_remaining");
    }

    #[test]
    fn zero_timeout_and_zero_entries_are_refused() {
        assert_eq!(
            err_key(&GOOD.replace("\"5s\"", "\"0s\"")),
            "upstream.timeout"
        );
        assert_eq!(err_key(&GOOD.replace("100000", "0")), "cache.max_entries");
    }

    #[test]
    fn master_key_comes_from_the_file_before_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "file-key\n").unwrap();
        let mut c = Config::parse(GOOD).unwrap();
        c.upstream.api_key_file = Some(path);
        let key = c.master_key_with(Some("env-key".into())).unwrap();
        assert_eq!(key.expose(), "file-key");
    }

    #[test]
    fn master_key_falls_back_to_the_environment() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(
            c.master_key_with(Some("env-key".into())).unwrap().expose(),
            "env-key"
        );
    }

    #[test]
    fn no_master_key_anywhere_refuses_to_start() {
        let c = Config::parse(GOOD).unwrap();
        let err = c.master_key_with(None).unwrap_err().to_string();
        assert!(err.contains("TRUORA_API_KEY"), "{err}");
        let err = c
            .master_key_with(Some("  ".into()))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("upstream.api_key_file"), "{err}");
    }

    #[test]
    fn unreadable_key_file_names_the_key() {
        let mut c = Config::parse(GOOD).unwrap();
        c.upstream.api_key_file = Some("/nonexistent/key".into());
        let err = c
            .master_key_with(Some("env".into()))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("upstream.api_key_file"), "{err}");
    }
}
