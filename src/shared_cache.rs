//! The optional second cache tier, in Redis, shared by every replica (`[cache.shared]`).
//!
//! What it adds to the in-process cache (see docs/scaling.md):
//!
//! - **Read-through**: a local miss reads Redis before calling Truora; a value found there is
//!   turned back into an [`Entry`](crate::cache::Entry) by the issuer and fills the local tier with
//!   the token's remaining life.
//! - **Fleet-wide single flight**: the replica that mints holds a short lock
//!   (`SET lock owner NX PX lock_ttl`, a random owner, released only by its owner through a Lua
//!   compare-and-delete); the others poll for the value with a bounded back-off, and take over
//!   when the lock expires with a dead holder.
//! - **Sealed values**: each value is AES-256-GCM under the configured key with the cache key as
//!   associated data, so a value moved to another key does not open. Redis keys are the cache
//!   key's SHA-256 hex under `key_prefix`, never user data.
//! - **Invalidation everywhere**: `DELETE /v1/tokens` deletes the caller's matching values and
//!   publishes a sealed message; every replica drops its matching local entries.
//! - **Redis is never required**: every call is bounded by `timeout` and guarded by a breaker;
//!   when Redis fails the broker serves from its local tier and Truora as without this tier, and
//!   the connection manager reconnects by itself.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use futures_util::StreamExt;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::IntoConnectionInfo;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

use crate::cache::{CacheKey, TokenCache};
use crate::config::{redacted_url, ConfigError, SharedCacheConfig};

/// The environment variable read for the value encryption key when
/// `cache.shared.encryption_key_file` is not set.
pub const ENCRYPTION_KEY_ENV: &str = "TOKEN_BROKER_CACHE_ENCRYPTION_KEY";

/// Format byte of a sealed value: 1 = AES-256-GCM, 96-bit random nonce, JSON inside.
const SEALED_V1: u8 = 1;
const NONCE_LEN: usize = 12;
const VALUE_AAD: &[u8] = b"token-broker/shared-cache/value/v1\0";
const MESSAGE_AAD: &[u8] = b"token-broker/shared-cache/invalidate/v1\0";
/// Values fetched per MGET when invalidating.
const INVALIDATE_BATCH: usize = 256;

/// Releases the lock only if it still holds this owner's token.
const UNLOCK: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";
/// Stores a value with its TTL and adds it to its caller's index, whose TTL is raised to the
/// longest of its values' (Redis 2.6+; no PEXPIRE GT needed).
const PUT: &str = "redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) \
redis.call('SADD', KEYS[2], ARGV[3]) \
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end \
return 1";

impl SharedCacheConfig {
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

/// The secrets of the shared tier: the value key and, when it is not in the URL, the password.
pub struct SharedSecrets {
    key: Zeroizing<[u8; 32]>,
    password: Option<Zeroizing<String>>,
}

impl std::fmt::Debug for SharedSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedSecrets([redacted])")
    }
}

impl SharedSecrets {
    /// Reads them from the files, the key from [`ENCRYPTION_KEY_ENV`] when it has no file.
    pub fn load(cfg: &SharedCacheConfig) -> Result<Self, ConfigError> {
        Self::load_with(
            cfg,
            std::env::var(ENCRYPTION_KEY_ENV).ok().map(Zeroizing::new),
        )
    }

    /// [`SharedSecrets::load`] with the environment's value given, for tests.
    pub fn load_with(
        cfg: &SharedCacheConfig,
        env_key: Option<Zeroizing<String>>,
    ) -> Result<Self, ConfigError> {
        let bad = |key: &str, reason: String| ConfigError::Invalid {
            key: format!("cache.shared.{key}"),
            reason,
        };
        let read = |key: &str, path: &std::path::Path| {
            std::fs::read_to_string(path)
                .map(Zeroizing::new)
                .map_err(|e| bad(key, format!("cannot read {}: {e}", path.display())))
        };
        let hex = match &cfg.encryption_key_file {
            Some(path) => read("encryption_key_file", path)?,
            None => env_key.ok_or_else(|| {
                bad(
                    "encryption_key_file",
                    format!("not set, and {ENCRYPTION_KEY_ENV} is not set: values in Redis must be encrypted"),
                )
            })?,
        };
        let key = parse_key(hex.trim()).ok_or_else(|| {
            bad(
                "encryption_key_file",
                "the key must be 64 hex digits (32 random bytes: `openssl rand -hex 32`)".into(),
            )
        })?;
        let password = match &cfg.password_file {
            Some(path) => {
                let text = read("password_file", path)?;
                let pw = text.trim_end_matches(['\r', '\n']);
                if pw.is_empty() {
                    return Err(bad("password_file", format!("{} is empty", path.display())));
                }
                Some(Zeroizing::new(pw.to_owned()))
            }
            None => None,
        };
        Ok(Self { key, password })
    }
}

fn parse_key(hex: &str) -> Option<Zeroizing<[u8; 32]>> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = Zeroizing::new([0u8; 32]);
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16);
        out[i] = u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok()?;
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Seals and opens values with AES-256-GCM.
struct Sealer(Aes256Gcm);

impl Sealer {
    fn new(key: &[u8; 32]) -> Self {
        Self(Aes256Gcm::new(key.into()))
    }

    fn seal(&self, aad: &[&[u8]], plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        // The OS random source failing is not something to serve through.
        getrandom::fill(&mut nonce).expect("the OS random source works");
        let aad = aad.concat();
        let sealed = self
            .0
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .expect("AES-GCM sealing of a small value cannot fail");
        let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        out.push(SEALED_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    fn open(&self, aad: &[&[u8]], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        let (&version, rest) = sealed.split_first()?;
        if version != SEALED_V1 || rest.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        self.0
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &aad.concat(),
                },
            )
            .ok()
            .map(Zeroizing::new)
    }
}

/// A token as another replica needs it to rebuild its entry (the answer bytes are rebuilt).
pub struct SharedToken {
    /// The token itself.
    pub token: Zeroizing<String>,
    /// When it dies, on the wall clock.
    pub expires_at: SystemTime,
    /// Its whole lifetime, as read from its claims when it was minted.
    pub lifetime: Duration,
    /// The caller it was minted for.
    pub caller: String,
    /// The flow it was minted for.
    pub flow_id: String,
    /// The user it was minted for, when named by account_id.
    pub account_id: Option<String>,
}

impl std::fmt::Debug for SharedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedToken")
            .field("caller", &self.caller)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// The JSON sealed in a value.
#[derive(Serialize, Deserialize)]
struct Stored {
    token: String,
    expires_at_ms: u64,
    lifetime_ms: u64,
    caller: String,
    flow_id: String,
    account_id: Option<String>,
}

impl Drop for Stored {
    fn drop(&mut self) {
        self.token.zeroize();
    }
}

/// The sealed JSON of an invalidation message.
#[derive(Serialize, Deserialize)]
struct Invalidation {
    origin: String,
    caller: String,
    flow_id: Option<String>,
    account_id: Option<String>,
}

/// Why a Redis call did not help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedError {
    /// The breaker is open: Redis was not asked.
    BreakerOpen,
    /// No answer within `cache.shared.timeout`.
    Timeout,
    /// Redis answered with an error, or the connection failed.
    Failed,
}

impl SharedError {
    fn label(self) -> &'static str {
        match self {
            SharedError::BreakerOpen => "breaker_open",
            SharedError::Timeout => "timeout",
            SharedError::Failed => "error",
        }
    }
}

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

/// The shared tier's series, in the broker's registry.
struct SharedMetrics {
    lookups: IntCounterVec,
    errors: IntCounterVec,
    duration: Histogram,
    breaker_state: IntGauge,
    locks: IntCounterVec,
    invalidations: IntCounterVec,
    subscribed: IntGauge,
}

impl SharedMetrics {
    fn new(registry: &Registry) -> prometheus::Result<Self> {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        let m = Self {
            lookups: counter(
                "token_broker_shared_cache_lookups_total",
                "Reads of the Redis tier after a local miss, by result (hit, miss, stale, undecryptable, error).",
                &["result"],
            )?,
            errors: counter(
                "token_broker_shared_cache_errors_total",
                "Redis calls that failed, by operation and reason (error, timeout, breaker_open).",
                &["op", "reason"],
            )?,
            duration: Histogram::with_opts(
                HistogramOpts::new(
                    "token_broker_shared_cache_duration_seconds",
                    "Time of each Redis call that was made, successful or not.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                ]),
            )?,
            breaker_state: IntGauge::new(
                "token_broker_shared_cache_breaker_state",
                "State of the Redis breaker: 0 closed, 1 half-open, 2 open (Redis skipped).",
            )?,
            locks: counter(
                "token_broker_shared_cache_lock_total",
                "Misses that went through the fleet-wide minting lock, by outcome (acquired, waited, fallback).",
                &["outcome"],
            )?,
            invalidations: counter(
                "token_broker_shared_cache_invalidations_total",
                "Invalidations applied to the local tier, by origin (local: this replica's DELETE; remote: published by another replica).",
                &["origin"],
            )?,
            subscribed: IntGauge::new(
                "token_broker_shared_cache_subscribed",
                "1 while this replica listens to the invalidation channel, else 0.",
            )?,
        };
        registry.register(Box::new(m.lookups.clone()))?;
        registry.register(Box::new(m.errors.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        registry.register(Box::new(m.breaker_state.clone()))?;
        registry.register(Box::new(m.locks.clone()))?;
        registry.register(Box::new(m.invalidations.clone()))?;
        registry.register(Box::new(m.subscribed.clone()))?;
        for result in ["hit", "miss", "stale", "undecryptable", "error"] {
            m.lookups.with_label_values(&[result]);
        }
        for op in [
            "get",
            "put",
            "lock",
            "unlock",
            "invalidate",
            "publish",
            "subscribe",
        ] {
            for reason in ["error", "timeout", "breaker_open"] {
                m.errors.with_label_values(&[op, reason]);
            }
        }
        for outcome in ["acquired", "waited", "fallback"] {
            m.locks.with_label_values(&[outcome]);
        }
        for origin in ["local", "remote"] {
            m.invalidations.with_label_values(&[origin]);
        }
        Ok(m)
    }
}

/// Consecutive failures open it for a cooldown; then calls go through again, and the first
/// result closes it (success) or opens it again (failure).
struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<BreakerState>,
}

#[derive(Default)]
struct BreakerState {
    failures: u32,
    open_until: Option<Instant>,
}

impl Breaker {
    /// Whether a call may be made now, and the state to show (0, 1, 2).
    fn allow(&self) -> (bool, i64) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match s.open_until {
            Some(t) if Instant::now() < t => (false, 2),
            Some(_) => (true, 1),
            None => (true, 0),
        }
    }

    /// Records a result; returns the new state when it changed between open and closed.
    fn record(&self, ok: bool) -> Option<i64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if ok {
            s.failures = 0;
            return s.open_until.take().map(|_| 0);
        }
        s.failures = s.failures.saturating_add(1);
        if s.failures >= self.threshold {
            let was_open = s.open_until.is_some();
            s.open_until = Some(Instant::now() + self.cooldown);
            return (!was_open).then_some(2);
        }
        None
    }
}

struct Inner {
    client: redis::Client,
    conn: ConnectionManager,
    sealer: Sealer,
    prefix: String,
    channel: String,
    timeout: Duration,
    lock_ttl: Duration,
    breaker: Breaker,
    metrics: SharedMetrics,
    /// This replica's random id, so it skips its own invalidation messages.
    origin: String,
    /// `scheme://host:port` of Redis, for log lines.
    shown: String,
}

/// The Redis tier. Dropping it stops its invalidation listener.
pub struct SharedTier {
    inner: Arc<Inner>,
    listener: Option<tokio::task::AbortHandle>,
}

impl Drop for SharedTier {
    fn drop(&mut self) {
        if let Some(listener) = self.listener.take() {
            listener.abort();
        }
    }
}

/// A held fleet-wide lock: its owner token.
pub struct LockToken(String);

impl SharedTier {
    /// The tier for a validated `[cache.shared]`, its series registered in `registry`. Nothing is
    /// connected yet: the first call connects, so a Redis that is down does not stop the broker
    /// from starting.
    pub fn new(
        cfg: &SharedCacheConfig,
        secrets: SharedSecrets,
        registry: &Registry,
    ) -> Result<Self, String> {
        let shown = redacted_url(&cfg.url);
        let mut info = cfg
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| format!("cache.shared.url {shown}: {}", e.category()))?;
        if let Some(password) = &secrets.password {
            let settings = info
                .redis_settings()
                .clone()
                .set_password(password.as_str());
            info = info.set_redis_settings(settings);
        }
        let client = match &cfg.ca_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    format!("cache.shared.ca_file: cannot read {}: {e}", path.display())
                })?;
                redis::Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )
            }
            None => redis::Client::open(info),
        }
        .map_err(|e| format!("cache.shared: {shown}: {}", e.category()))?;
        let conn = client
            .get_connection_manager_lazy(
                ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(cfg.timeout))
                    .set_response_timeout(Some(cfg.timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(1)),
            )
            .map_err(|e| format!("cache.shared: {shown}: {}", e.category()))?;
        let metrics = SharedMetrics::new(registry).map_err(|e| e.to_string())?;
        let mut origin = [0u8; 8];
        getrandom::fill(&mut origin).map_err(|e| e.to_string())?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                conn,
                sealer: Sealer::new(&secrets.key),
                prefix: cfg.key_prefix.clone(),
                channel: format!("{}invalidate", cfg.key_prefix),
                timeout: cfg.timeout,
                lock_ttl: cfg.lock_ttl,
                breaker: Breaker {
                    threshold: cfg.breaker_threshold,
                    cooldown: cfg.breaker_cooldown,
                    state: Mutex::new(BreakerState::default()),
                },
                metrics,
                origin: hex(&origin),
                shown,
            }),
            listener: None,
        })
    }

    /// Starts listening to other replicas' invalidations, applied to `local`. Needs a tokio
    /// runtime; stops when the tier is dropped.
    pub fn listen(&mut self, local: TokenCache) {
        if let Some(old) = self.listener.take() {
            old.abort();
        }
        let inner = Arc::clone(&self.inner);
        self.listener = Some(tokio::spawn(inner.listen(local)).abort_handle());
    }

    /// The Redis key of a cache key's value: `<prefix>tok:<sha256 hex>`.
    pub fn value_key(&self, key: &CacheKey) -> String {
        format!("{}tok:{}", self.inner.prefix, hex(key))
    }

    /// The Redis key of a cache key's minting lock: `<prefix>lock:<sha256 hex>`.
    pub fn lock_key(&self, key: &CacheKey) -> String {
        format!("{}lock:{}", self.inner.prefix, hex(key))
    }

    fn index_key(&self, caller: &str) -> String {
        let digest = Sha256::new()
            .chain_update(b"token-broker/shared-cache/caller/v1\0")
            .chain_update(caller.as_bytes())
            .finalize();
        format!("{}caller:{}", self.inner.prefix, hex(&digest))
    }

    /// How long a miss may wait on another replica's lock before minting without it: the lock's
    /// life and one Redis call more.
    pub fn wait_bound(&self) -> Duration {
        self.inner.lock_ttl + self.inner.timeout
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

    /// Counts a value that was read but could not be served (too close to its expiry, or of
    /// another subject).
    pub fn count_stale(&self) {
        self.inner
            .metrics
            .lookups
            .with_label_values(&["stale"])
            .inc();
    }

    /// Reads the value of `key`: `Ok(None)` when Redis has none (or one that does not open).
    pub async fn get(&self, key: &CacheKey) -> Result<Option<SharedToken>, SharedError> {
        let m = &self.inner.metrics;
        let cmd = redis::cmd("GET").arg(self.value_key(key)).clone();
        let sealed: Option<Vec<u8>> = match self.inner.call("get", cmd).await {
            Ok(v) => v,
            Err(e) => {
                m.lookups.with_label_values(&["error"]).inc();
                return Err(e);
            }
        };
        let Some(sealed) = sealed else {
            m.lookups.with_label_values(&["miss"]).inc();
            return Ok(None);
        };
        match self.inner.open_value(key, &sealed) {
            Some(found) => {
                m.lookups.with_label_values(&["hit"]).inc();
                Ok(Some(found))
            }
            None => {
                m.lookups.with_label_values(&["undecryptable"]).inc();
                Ok(None)
            }
        }
    }

    /// Stores `token` under `key` until the token dies (`PX`), and indexes it under its caller
    /// for invalidation. A token already dead is not stored.
    pub async fn put(&self, key: &CacheKey, token: &SharedToken) -> Result<(), SharedError> {
        let Ok(ttl) = token.expires_at.duration_since(SystemTime::now()) else {
            return Ok(());
        };
        let ttl_ms = ttl.as_millis().min(u128::from(u64::MAX)) as u64;
        if ttl_ms == 0 {
            return Ok(());
        }
        let stored = Stored {
            token: token.token.as_str().to_owned(),
            expires_at_ms: unix_ms(token.expires_at),
            lifetime_ms: token.lifetime.as_millis().min(u128::from(u64::MAX)) as u64,
            caller: token.caller.clone(),
            flow_id: token.flow_id.clone(),
            account_id: token.account_id.clone(),
        };
        let json = Zeroizing::new(serde_json::to_vec(&stored).map_err(|_| SharedError::Failed)?);
        let sealed = self.inner.sealer.seal(&[VALUE_AAD, key], &json);
        let cmd = redis::cmd("EVAL")
            .arg(PUT)
            .arg(2)
            .arg(self.value_key(key))
            .arg(self.index_key(&token.caller))
            .arg(sealed)
            .arg(ttl_ms)
            .arg(hex(key))
            .clone();
        self.inner.call::<i64>("put", cmd).await.map(drop)
    }

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

    /// Deletes the caller's values for the flow and/or account given (neither: all of the
    /// caller's) and tells every replica to drop its matching local entries. Returns how many
    /// values were deleted from Redis.
    pub async fn invalidate(
        &self,
        caller: &str,
        flow_id: Option<&str>,
        account_id: Option<&str>,
    ) -> Result<u64, SharedError> {
        self.inner
            .metrics
            .invalidations
            .with_label_values(&["local"])
            .inc();
        let index = self.index_key(caller);
        let members: Vec<String> = self
            .inner
            .call("invalidate", redis::cmd("SMEMBERS").arg(&index).clone())
            .await?;
        let mut doomed = Vec::new();
        let mut gone = Vec::new();
        for batch in members.chunks(INVALIDATE_BATCH) {
            let keys: Vec<String> = batch
                .iter()
                .map(|m| format!("{}tok:{m}", self.inner.prefix))
                .collect();
            let values: Vec<Option<Vec<u8>>> = self
                .inner
                .call("invalidate", redis::cmd("MGET").arg(&keys).clone())
                .await?;
            for ((member, key), value) in batch.iter().zip(keys).zip(values) {
                let Some(sealed) = value else {
                    gone.push(member.clone());
                    continue;
                };
                let matches = parse_hex_key(member)
                    .and_then(|k| self.inner.open_value(&k, &sealed))
                    .is_none_or(|t| {
                        t.caller == caller
                            && flow_id.is_none_or(|f| t.flow_id == f)
                            && account_id.is_none_or(|a| t.account_id.as_deref() == Some(a))
                    });
                if matches {
                    doomed.push(key);
                    gone.push(member.clone());
                }
            }
        }
        let mut deleted = 0;
        for batch in doomed.chunks(INVALIDATE_BATCH) {
            deleted += self
                .inner
                .call::<u64>("invalidate", redis::cmd("DEL").arg(batch).clone())
                .await?;
        }
        for batch in gone.chunks(INVALIDATE_BATCH) {
            self.inner
                .call::<u64>(
                    "invalidate",
                    redis::cmd("SREM").arg(&index).arg(batch).clone(),
                )
                .await?;
        }
        let message = Invalidation {
            origin: self.inner.origin.clone(),
            caller: caller.to_owned(),
            flow_id: flow_id.map(Into::into),
            account_id: account_id.map(Into::into),
        };
        let json = Zeroizing::new(serde_json::to_vec(&message).map_err(|_| SharedError::Failed)?);
        let sealed = self
            .inner
            .sealer
            .seal(&[MESSAGE_AAD, self.inner.channel.as_bytes()], &json);
        self.inner
            .call::<u64>(
                "publish",
                redis::cmd("PUBLISH")
                    .arg(&self.inner.channel)
                    .arg(sealed)
                    .clone(),
            )
            .await?;
        Ok(deleted)
    }
}

fn parse_hex_key(hex: &str) -> Option<CacheKey> {
    parse_key(hex).map(|k| *k)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().min(u128::from(u64::MAX)) as u64)
}

impl Inner {
    /// One Redis call: skipped while the breaker is open, bounded by the timeout, timed,
    /// counted when it fails. Errors are logged only when they open the breaker, and never with
    /// Redis's own text (which could quote a key or the URL).
    async fn call<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        cmd: redis::Cmd,
    ) -> Result<T, SharedError> {
        let (allowed, state) = self.breaker.allow();
        self.metrics.breaker_state.set(state);
        if !allowed {
            self.fail(op, SharedError::BreakerOpen);
            return Err(SharedError::BreakerOpen);
        }
        let mut conn = self.conn.clone();
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, cmd.query_async::<T>(&mut conn)).await;
        self.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        let result = match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                tracing::debug!(op, kind = e.category(), "Redis call failed");
                Err(SharedError::Failed)
            }
            Err(_) => Err(SharedError::Timeout),
        };
        let changed = self.breaker.record(result.is_ok());
        if let Some(state) = changed {
            self.metrics.breaker_state.set(state);
            if state == 2 {
                tracing::warn!(
                    redis = %self.shown,
                    cooldown_s = self.breaker.cooldown.as_secs_f64(),
                    "the shared cache (Redis) is failing: serving from the local cache and Truora without it"
                );
            } else {
                tracing::info!(redis = %self.shown, "the shared cache (Redis) answers again");
            }
        }
        if let Err(e) = result {
            self.fail(op, e);
        }
        result
    }

    fn fail(&self, op: &'static str, e: SharedError) {
        self.metrics
            .errors
            .with_label_values(&[op, e.label()])
            .inc();
    }

    fn open_value(&self, key: &CacheKey, sealed: &[u8]) -> Option<SharedToken> {
        let json = self.sealer.open(&[VALUE_AAD, key], sealed)?;
        let stored: Stored = serde_json::from_slice(&json).ok()?;
        Some(SharedToken {
            token: Zeroizing::new(stored.token.clone()),
            expires_at: UNIX_EPOCH + Duration::from_millis(stored.expires_at_ms),
            lifetime: Duration::from_millis(stored.lifetime_ms),
            caller: stored.caller.clone(),
            flow_id: stored.flow_id.clone(),
            account_id: stored.account_id.clone(),
        })
    }

    /// Listens to the invalidation channel for good, reconnecting with a back-off. After a
    /// reconnection the local tier is emptied: invalidations may have been missed meanwhile,
    /// and what was dropped is read again from Redis.
    async fn listen(self: Arc<Self>, local: TokenCache) {
        let mut pause = Duration::from_millis(100);
        let mut first = true;
        loop {
            let connect = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(&self.channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            match tokio::time::timeout(self.timeout.max(Duration::from_secs(1)), connect).await {
                Ok(Ok(pubsub)) => {
                    if !first {
                        local.clear();
                        tracing::info!(redis = %self.shown, "listening to invalidations again; the local cache was emptied");
                    }
                    first = false;
                    self.metrics.subscribed.set(1);
                    pause = Duration::from_millis(100);
                    let mut messages = pubsub.into_on_message();
                    while let Some(msg) = messages.next().await {
                        self.apply(&local, msg.get_payload_bytes());
                    }
                    self.metrics.subscribed.set(0);
                    tracing::warn!(redis = %self.shown, "lost the invalidation channel; reconnecting");
                }
                Ok(Err(_)) => self.fail("subscribe", SharedError::Failed),
                Err(_) => self.fail("subscribe", SharedError::Timeout),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    fn apply(&self, local: &TokenCache, sealed: &[u8]) {
        let Some(json) = self
            .sealer
            .open(&[MESSAGE_AAD, self.channel.as_bytes()], sealed)
        else {
            self.fail("subscribe", SharedError::Failed);
            return;
        };
        let Ok(msg) = serde_json::from_slice::<Invalidation>(&json) else {
            self.fail("subscribe", SharedError::Failed);
            return;
        };
        if msg.origin == self.origin {
            return;
        }
        local.invalidate(
            &msg.caller,
            msg.flow_id.as_deref(),
            msg.account_id.as_deref(),
        );
        self.metrics
            .invalidations
            .with_label_values(&["remote"])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SharedCacheConfig {
        crate::config::Config::parse(
            "[cache.shared]\nurl = \"redis://127.0.0.1:6379\"\n[[clients]]\nid = \"c\"\ntoken_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\n",
        )
        .unwrap()
        .cache
        .shared
        .unwrap()
    }

    #[test]
    fn a_sealed_value_opens_only_under_its_own_key() {
        let sealer = Sealer::new(&[7; 32]);
        let a: CacheKey = [1; 32];
        let b: CacheKey = [2; 32];
        let sealed = sealer.seal(&[VALUE_AAD, &a], b"secret-token");
        assert!(!sealed.windows(12).any(|w| w == b"secret-token"));
        assert_eq!(
            sealer.open(&[VALUE_AAD, &a], &sealed).unwrap().as_slice(),
            b"secret-token"
        );
        assert!(sealer.open(&[VALUE_AAD, &b], &sealed).is_none());
        assert!(Sealer::new(&[8; 32])
            .open(&[VALUE_AAD, &a], &sealed)
            .is_none());
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(sealer.open(&[VALUE_AAD, &a], &tampered).is_none());
        // A fresh nonce each time: the same value never seals the same way twice.
        assert_ne!(sealed, sealer.seal(&[VALUE_AAD, &a], b"secret-token"));
    }

    #[test]
    fn the_key_comes_from_the_file_or_the_environment_and_must_be_32_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg();
        let err = SharedSecrets::load_with(&c, None).unwrap_err().to_string();
        assert!(err.contains("cache.shared.encryption_key_file"), "{err}");
        let good = "ab".repeat(32);
        assert!(SharedSecrets::load_with(&c, Some(Zeroizing::new(good.clone()))).is_ok());
        let short = "abcd1234";
        let err = SharedSecrets::load_with(&c, Some(Zeroizing::new(short.into())))
            .unwrap_err()
            .to_string();
        assert!(!err.contains(short), "the key is never echoed: {err}");
        let path = dir.path().join("key");
        std::fs::write(&path, format!("{}\n", "0f".repeat(32))).unwrap();
        c.encryption_key_file = Some(path);
        let s = SharedSecrets::load_with(&c, None).unwrap();
        assert_eq!(*s.key, [0x0f; 32]);
        assert_eq!(format!("{s:?}"), "SharedSecrets([redacted])");
    }

    #[test]
    fn the_password_comes_from_its_file_or_the_url_not_both() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "hunter2\n").unwrap();
        let mut c = cfg();
        c.password_file = Some(path);
        let key = Some(Zeroizing::new("ab".repeat(32)));
        let s = SharedSecrets::load_with(&c, key).unwrap();
        assert_eq!(s.password.as_deref().map(String::as_str), Some("hunter2"));
        assert!(c.validate(Duration::from_secs(10)).is_ok());
        c.url = "redis://:inline@127.0.0.1:6379".into();
        let err = c.validate(Duration::from_secs(10)).unwrap_err().to_string();
        assert!(err.starts_with("cache.shared.password_file"), "{err}");
        assert!(!err.contains("inline"), "{err}");
        assert!(!format!("{c:?}").contains("inline"));
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
    fn the_breaker_opens_after_the_threshold_and_closes_on_success() {
        let b = Breaker {
            threshold: 2,
            cooldown: Duration::from_millis(50),
            state: Mutex::new(BreakerState::default()),
        };
        assert_eq!(b.allow(), (true, 0));
        assert_eq!(b.record(false), None);
        assert_eq!(b.record(false), Some(2));
        assert_eq!(b.allow(), (false, 2));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.allow(), (true, 1));
        assert_eq!(b.record(false), None, "a failed probe keeps it open");
        assert_eq!(b.allow(), (false, 2));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.record(true), Some(0));
        assert_eq!(b.allow(), (true, 0));
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
