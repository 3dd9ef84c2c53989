//! The optional second cache tier, in Redis, shared by every replica (`[cache.shared]`).
//!
//! What it adds to the in-process tier (see docs/scaling.md):
//!
//! - **Read-through** ([`store`]): a local miss reads Redis before calling Truora; a value found
//!   there is turned back into an entry by the issuer and fills the local tier with the token's
//!   remaining life.
//! - **Fleet-wide single flight** ([`lock`]): the replica that mints holds a short lock; the
//!   others poll for the value with a bounded back-off, and take over when the lock expires with
//!   a dead holder.
//! - **Sealed values** ([`seal`]): each value is AES-256-GCM under the configured key with the
//!   cache key as associated data. Redis keys are the cache key's SHA-256 hex under
//!   `key_prefix`, never user data.
//! - **Invalidation everywhere** ([`invalidate`]): an invalidation is recorded so that it wins
//!   over every mint in flight on every replica, deletes the matching values (found through
//!   indexes, not a scan) and publishes a sealed message; every replica drops its matching local
//!   entries.
//! - **Redis is never required** (here): every call is bounded by `timeout` and guarded by a
//!   [`Breaker`]; when Redis fails the broker serves from its local tier and Truora as without
//!   this tier, and the connection manager reconnects by itself.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::IntoConnectionInfo;

use super::{CacheKey, TokenCache};
use crate::breaker::{Breaker, Change, Health};
use crate::config::{redacted_url, SharedCacheConfig};
use crate::secret::hex;

pub mod invalidate;
pub mod lock;
pub mod seal;
pub mod store;

pub use lock::{LockOutcome, LockToken};
pub use seal::{SharedSecrets, ENCRYPTION_KEY_ENV};
pub use store::{PutOutcome, SharedToken};

use seal::{Sealer, Tagger};

/// Why the tier could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    /// The Redis client refused the URL or its TLS settings.
    #[error("cache.shared: {shown}: {reason}")]
    Client { shown: String, reason: String },
    /// `cache.shared.ca_file` could not be read.
    #[error("cache.shared.ca_file: cannot read {}: {reason}", path.display())]
    CaFile { path: PathBuf, reason: String },
    /// The tier's series could not be registered.
    #[error("cache.shared: its metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The OS random source failed.
    #[error("cache.shared: the OS random source failed")]
    Random,
    /// The key of the tags could not be derived from the encryption key.
    #[error("cache.shared: the tag key could not be derived")]
    TagKey,
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

/// The shared tier's series, in the broker's registry.
pub(super) struct SharedMetrics {
    pub(super) lookups: IntCounterVec,
    pub(super) errors: IntCounterVec,
    pub(super) duration: Histogram,
    pub(super) breaker_state: IntGauge,
    pub(super) locks: IntCounterVec,
    pub(super) invalidations: IntCounterVec,
    pub(super) subscribed: IntGauge,
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
        for result in [
            "hit",
            "miss",
            "stale",
            "undecryptable",
            "invalidated",
            "error",
        ] {
            m.lookups.with_label_values(&[result]);
        }
        for op in [
            "get",
            "mark",
            "check",
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

/// What every call of the tier shares.
struct Inner {
    client: redis::Client,
    conn: ConnectionManager,
    sealer: Sealer,
    /// Tags of callers, flows and users for index names and invalidation records.
    tagger: Tagger,
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

impl SharedTier {
    /// The tier for a validated `[cache.shared]`, its series registered in `registry`. Nothing is
    /// connected yet: the first call connects, so a Redis that is down does not stop the broker
    /// from starting.
    pub fn new(
        cfg: &SharedCacheConfig,
        secrets: SharedSecrets,
        registry: &Registry,
    ) -> Result<Self, TierError> {
        let shown = redacted_url(&cfg.url);
        let mut info = cfg
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| TierError::Client {
                shown: shown.clone(),
                reason: e.category().to_string(),
            })?;
        if let Some(password) = &secrets.password {
            let settings = info
                .redis_settings()
                .clone()
                .set_password(password.as_str());
            info = info.set_redis_settings(settings);
        }
        let client = match &cfg.ca_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| TierError::CaFile {
                    path: path.clone(),
                    reason: e.to_string(),
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
        .map_err(|e| TierError::Client {
            shown: shown.clone(),
            reason: e.category().to_string(),
        })?;
        let conn = client
            .get_connection_manager_lazy(
                ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(cfg.timeout))
                    .set_response_timeout(Some(cfg.timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(1)),
            )
            .map_err(|e| TierError::Client {
                shown: shown.clone(),
                reason: e.category().to_string(),
            })?;
        let metrics = SharedMetrics::new(registry)?;
        let mut origin = [0u8; 8];
        getrandom::fill(&mut origin).map_err(|_| TierError::Random)?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                conn,
                sealer: Sealer::new(&secrets.key),
                tagger: Tagger::new(&secrets.key).ok_or(TierError::TagKey)?,
                prefix: cfg.key_prefix.clone(),
                channel: format!("{}invalidate", cfg.key_prefix),
                timeout: cfg.timeout,
                lock_ttl: cfg.lock_ttl,
                breaker: Breaker::new(cfg.breaker_threshold, cfg.breaker_cooldown),
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

    /// The index of a caller's values: `<prefix>caller:<tag of the caller>`.
    fn caller_index(&self, caller: &str) -> String {
        let tag = self.inner.tagger.tag(&[b"caller", caller.as_bytes()]);
        format!("{}caller:{tag}", self.inner.prefix)
    }

    /// The index of a user's values in a flow, across callers: `<prefix>user:<tag>`.
    fn user_index(&self, flow_id: &str, account_id: &str) -> String {
        let tag = self
            .inner
            .tagger
            .tag(&[b"user", flow_id.as_bytes(), account_id.as_bytes()]);
        format!("{}user:{tag}", self.inner.prefix)
    }

    /// The invalidation sequence, log and floor (see [`invalidate`]).
    fn log_keys(&self) -> (String, String, String) {
        let p = &self.inner.prefix;
        (
            format!("{p}inv:seq"),
            format!("{p}inv:log"),
            format!("{p}inv:floor"),
        )
    }

    /// How long a miss may wait on another replica's lock before minting without it: the lock's
    /// life and one Redis call more.
    pub fn wait_bound(&self) -> Duration {
        self.inner.lock_ttl + self.inner.timeout
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
        let admitted = self.breaker.admit();
        self.metrics.breaker_state.set(self.breaker.state().gauge());
        let Ok(mut admitted) = admitted else {
            self.fail(op, SharedError::BreakerOpen);
            return Err(SharedError::BreakerOpen);
        };
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
        let health = if result.is_ok() {
            Health::Up
        } else {
            Health::Down
        };
        match admitted.record(health) {
            Some(Change::Opened) => tracing::warn!(
                redis = %self.shown,
                cooldown_s = self.breaker.cooldown().as_secs_f64(),
                "the shared cache (Redis) is failing: serving from the local cache and Truora without it"
            ),
            Some(Change::Closed) => {
                tracing::info!(redis = %self.shown, "the shared cache (Redis) answers again")
            }
            None => {}
        }
        self.metrics.breaker_state.set(self.breaker.state().gauge());
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
}
