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
//!   cache key as associated data, opened under it or any previous key (a rotation), and sealed
//!   again under the current one when read. Redis keys are the cache key's SHA-256 hex under
//!   `key_prefix`, never user data.
//! - **Invalidation everywhere** ([`invalidate`]): an invalidation is recorded so that it wins
//!   over every mint in flight on every replica, deletes the matching values (found through
//!   indexes, not a scan) and publishes a sealed message; every replica drops its matching local
//!   entries.
//! - **Fleet limits** ([`limits`]): the mint budgets spent for the whole fleet in one script per
//!   mint, and Truora's throttle window stored and published for every replica.
//! - **Any deployment of Redis** ([`conn`]): standalone, Cluster or Sentinel, through the redis
//!   crate's own support for each. In cluster mode the keys a script touches share a hash tag.
//! - **Redis is never required** (here): every call is bounded by `timeout` and guarded by a
//!   [`Breaker`]; when Redis fails the broker serves from its local tier and Truora as without
//!   this tier, and the connections come back by themselves.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::Registry;

use super::{CacheKey, TokenCache};
use crate::breaker::{Breaker, Change, Health};
use crate::config::{SharedCacheConfig, SharedMode};
use crate::secret::hex;
use crate::telemetry;

mod conn;
pub mod invalidate;
pub mod limits;
pub mod lock;
mod metrics;
pub mod seal;
pub mod store;

pub use limits::{FleetHandle, LimitVerdict};
pub use lock::{LockOutcome, LockToken};
pub use seal::{SharedSecrets, ENCRYPTION_KEY_ENV};
pub use store::{PutOutcome, SharedToken};

use conn::Conn;
use metrics::SharedMetrics;
use seal::{Sealer, Taggers};

/// What a replica does when another tells it Truora throttled it: opens its own window for the
/// time left.
pub type OnThrottle = Arc<dyn Fn(Duration) + Send + Sync>;

/// How often the topology (nodes, slots, the primary) is probed for its series.
const TOPOLOGY_EVERY: Duration = Duration::from_secs(10);

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

/// What every call of the tier shares.
struct Inner {
    conn: Conn,
    sealer: Sealer,
    /// Tags of callers, flows and users for index names and invalidation records, under every
    /// key (the current one first).
    taggers: Taggers,
    keys: Keys,
    channel: String,
    timeout: Duration,
    lock_ttl: Duration,
    fleet_limits: bool,
    breaker: Breaker,
    metrics: SharedMetrics,
    /// This replica's random id, so it skips its own invalidation messages.
    origin: String,
    /// How log lines name Redis: scheme, hosts and ports only.
    shown: String,
}

/// The names of the tier's Redis keys. In cluster mode the keys that one script touches share a
/// hash tag, and so do a token's value and its lock: `tok:{<hex>}` and `lock:{<hex>}`, and
/// `{inv}:seq`, `{inv}:log`, `{inv}:floor`. Elsewhere the names are those of the versions before
/// Cluster support (`tok:<hex>`, `inv:seq`...), so a rolling upgrade keeps sharing values and
/// invalidations. The fleet limits' keys are new, tagged `{fleet}` in every mode.
pub(super) struct Keys {
    prefix: String,
    cluster: bool,
}

impl Keys {
    fn per_token(&self, kind: &str, member: &str) -> String {
        if self.cluster {
            format!("{}{kind}:{{{member}}}", self.prefix)
        } else {
            format!("{}{kind}:{member}", self.prefix)
        }
    }

    /// The value of an index member (a cache key's hex).
    pub(super) fn value(&self, member: &str) -> String {
        self.per_token("tok", member)
    }

    pub(super) fn lock(&self, member: &str) -> String {
        self.per_token("lock", member)
    }

    pub(super) fn index(&self, kind: &str, tag: &str) -> String {
        format!("{}{kind}:{tag}", self.prefix)
    }

    /// The invalidation sequence, log and floor (see [`invalidate`]).
    pub(super) fn log(&self) -> (String, String, String) {
        let p = &self.prefix;
        if self.cluster {
            (
                format!("{p}{{inv}}:seq"),
                format!("{p}{{inv}}:log"),
                format!("{p}{{inv}}:floor"),
            )
        } else {
            (
                format!("{p}inv:seq"),
                format!("{p}inv:log"),
                format!("{p}inv:floor"),
            )
        }
    }

    /// The fleet limits' keys: the throttle window's end, and a budget's bucket.
    pub(super) fn fleet(&self, what: &str) -> String {
        format!("{}{{fleet}}:{what}", self.prefix)
    }
}

/// The Redis tier. Dropping it stops its invalidation listener and its topology probe.
pub struct SharedTier {
    inner: Arc<Inner>,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for SharedTier {
    fn drop(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
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
        let ca = match &cfg.ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| TierError::CaFile {
                path: path.clone(),
                reason: e.to_string(),
            })?),
            None => None,
        };
        let metrics = SharedMetrics::new(registry, cfg.mode)?;
        let (conn, shown) = Conn::new(
            cfg,
            secrets.password.as_ref(),
            secrets.sentinel_password.as_ref(),
            ca,
            metrics.topology_changes.clone(),
        )?;
        let mut origin = [0u8; 8];
        getrandom::fill(&mut origin).map_err(|_| TierError::Random)?;
        Ok(Self {
            inner: Arc::new(Inner {
                conn,
                sealer: Sealer::new(&secrets.keys),
                taggers: Taggers::new(&secrets.keys).ok_or(TierError::TagKey)?,
                keys: Keys {
                    prefix: cfg.key_prefix.clone(),
                    cluster: cfg.mode == SharedMode::Cluster,
                },
                channel: format!("{}invalidate", cfg.key_prefix),
                timeout: cfg.timeout,
                lock_ttl: cfg.lock_ttl,
                fleet_limits: cfg.fleet_limits,
                breaker: Breaker::new(cfg.breaker_threshold, cfg.breaker_cooldown),
                metrics,
                origin: hex(&origin),
                shown,
            }),
            tasks: Vec::new(),
        })
    }

    /// Starts listening to other replicas' invalidations, applied to `local`, and to their
    /// throttle windows, handed to `on_throttle`; and probing the topology for its series.
    /// Needs a tokio runtime; stops when the tier is dropped.
    pub fn listen(&mut self, local: TokenCache, on_throttle: Option<OnThrottle>) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        let inner = Arc::clone(&self.inner);
        self.tasks
            .push(tokio::spawn(inner.listen(local, on_throttle)).abort_handle());
        let inner = Arc::clone(&self.inner);
        self.tasks
            .push(tokio::spawn(inner.probe_topology()).abort_handle());
    }

    /// The fleet limits, when `fleet_limits` is on.
    pub fn fleet(&self) -> Option<FleetHandle> {
        self.inner
            .fleet_limits
            .then(|| FleetHandle(Arc::clone(&self.inner)))
    }

    /// The Redis key of a cache key's value: `<prefix>tok:<sha256 hex>` (in cluster mode
    /// `<prefix>tok:{<sha256 hex>}`).
    pub fn value_key(&self, key: &CacheKey) -> String {
        self.inner.keys.value(&hex(key))
    }

    /// The Redis key of a cache key's minting lock: `<prefix>lock:<sha256 hex>` (in cluster
    /// mode `<prefix>lock:{<sha256 hex>}`, in the slot of its value).
    pub fn lock_key(&self, key: &CacheKey) -> String {
        self.inner.keys.lock(&hex(key))
    }

    /// The index of a caller's values under each key's tag: `<prefix>caller:<tag>`, the
    /// current key's first.
    fn caller_indexes(&self, caller: &str) -> Vec<String> {
        self.inner
            .taggers
            .tags(&[b"caller", caller.as_bytes()])
            .into_iter()
            .map(|tag| self.inner.keys.index("caller", &tag))
            .collect()
    }

    /// The index of a user's values in a flow, across callers, under each key's tag:
    /// `<prefix>user:<tag>`, the current key's first.
    fn user_indexes(&self, flow_id: &str, account_id: &str) -> Vec<String> {
        self.inner
            .taggers
            .tags(&[b"user", flow_id.as_bytes(), account_id.as_bytes()])
            .into_iter()
            .map(|tag| self.inner.keys.index("user", &tag))
            .collect()
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

    /// With Sentinel, `host:port` of the primary followed now (for tests and the logs).
    pub fn primary(&self) -> Option<String> {
        self.inner.conn.primary()
    }
}

/// Says on a Redis call's span that it failed, and how.
fn failed(span: &tracing::Span, e: SharedError) {
    span.record("token_broker.outcome", e.label())
        .record("otel.status_code", "error");
}

impl Inner {
    /// One Redis call: skipped while the breaker is open, bounded by the timeout, timed,
    /// counted when it fails. Errors are logged only when they open the breaker, and never with
    /// Redis's own text (which could quote a key or the URL). Inside a traced request it is a
    /// span, `redis`, with the operation and its outcome (never a key or a value); the span is
    /// made and closed here, never entered, as nothing below it has spans of its own.
    async fn call<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        cmd: redis::Cmd,
    ) -> Result<T, SharedError> {
        let span = telemetry::child(|| {
            tracing::info_span!(
                "redis",
                otel.kind = "client",
                db.system.name = "redis",
                db.operation.name = op,
                token_broker.outcome = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            )
        });
        let admitted = self.breaker.admit();
        self.metrics.breaker_state.set(self.breaker.state().gauge());
        let Ok(mut admitted) = admitted else {
            self.fail(op, SharedError::BreakerOpen);
            failed(&span, SharedError::BreakerOpen);
            return Err(SharedError::BreakerOpen);
        };
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, self.conn.query::<T>(&cmd)).await;
        self.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        let result = match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                tracing::debug!(op, kind = e.category(), "Redis call failed");
                Err(SharedError::Failed)
            }
            Err(_) => {
                self.conn.timed_out();
                Err(SharedError::Timeout)
            }
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
        match &result {
            Ok(_) => {
                span.record("token_broker.outcome", "ok");
            }
            Err(e) => {
                self.fail(op, *e);
                failed(&span, *e);
            }
        }
        result
    }

    fn fail(&self, op: &'static str, e: SharedError) {
        self.metrics
            .errors
            .with_label_values(&[op, e.label()])
            .inc();
    }

    /// Probes the topology for its series every [`TOPOLOGY_EVERY`], for good: the cluster's
    /// masters, replicas and slots (`CLUSTER SLOTS`), or the primary and its replicas (`ROLE`).
    /// A Sentinel-named node that is no longer a primary is left for the next one Sentinel
    /// names.
    async fn probe_topology(self: Arc<Self>) {
        let mut masters_seen = None;
        loop {
            let cluster = self.conn.mode() == SharedMode::Cluster;
            let cmd = if cluster {
                redis::cmd("CLUSTER").arg("SLOTS").clone()
            } else {
                redis::cmd("ROLE")
            };
            if let Ok(value) = self.call::<redis::Value>("topology", cmd).await {
                let nodes = &self.metrics.nodes;
                if cluster {
                    if let Some((masters, replicas, slots)) = conn::cluster_slots(&value) {
                        nodes
                            .with_label_values(&["primary"])
                            .set(count(masters.len()));
                        if masters_seen.as_ref().is_some_and(|m| *m != masters) {
                            self.metrics.topology_changes.inc();
                            tracing::warn!(redis = %self.shown, masters = masters.len(), "the cluster's masters changed");
                        }
                        masters_seen = Some(masters);
                        nodes.with_label_values(&["replica"]).set(count(replicas));
                        self.metrics
                            .cluster_slots
                            .set(i64::try_from(slots).unwrap_or(i64::MAX));
                    }
                } else if let Some(replicas) = conn::primary_role(&value) {
                    nodes.with_label_values(&["primary"]).set(1);
                    nodes.with_label_values(&["replica"]).set(count(replicas));
                } else {
                    nodes.with_label_values(&["primary"]).set(0);
                    self.conn.demoted();
                }
            }
            tokio::time::sleep(TOPOLOGY_EVERY).await;
        }
    }
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
