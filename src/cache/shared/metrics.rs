//! The Redis tier's series, in the broker's registry (docs/observability.md lists them).

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::config::SharedMode;

/// The shared tier's series, in the broker's registry.
pub(super) struct SharedMetrics {
    pub(super) lookups: IntCounterVec,
    pub(super) errors: IntCounterVec,
    pub(super) duration: Histogram,
    pub(super) breaker_state: IntGauge,
    pub(super) locks: IntCounterVec,
    pub(super) invalidations: IntCounterVec,
    pub(super) subscribed: IntGauge,
    pub(super) mode: IntGaugeVec,
    pub(super) nodes: IntGaugeVec,
    pub(super) cluster_slots: IntGauge,
    pub(super) topology_changes: IntCounter,
    pub(super) reseals: IntCounter,
}

impl SharedMetrics {
    pub(super) fn new(registry: &Registry, mode: SharedMode) -> prometheus::Result<Self> {
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
            mode: IntGaugeVec::new(
                Opts::new(
                    "token_broker_shared_cache_mode",
                    "1 for the configured cache.shared.mode (standalone, cluster, sentinel).",
                ),
                &["mode"],
            )?,
            nodes: IntGaugeVec::new(
                Opts::new(
                    "token_broker_shared_cache_nodes",
                    "Redis nodes seen at the last topology probe, by role (primary, replica): the cluster's masters and replicas, or the primary and its connected replicas.",
                ),
                &["role"],
            )?,
            cluster_slots: IntGauge::new(
                "token_broker_shared_cache_cluster_slots",
                "Hash slots served by a master at the last probe (cluster mode; 16384 when the whole key space is served).",
            )?,
            topology_changes: IntCounter::new(
                "token_broker_shared_cache_topology_changes_total",
                "Changes of primary this replica followed: a new primary named by Sentinel, or a change in the cluster's set of masters.",
            )?,
            reseals: IntCounter::new(
                "token_broker_shared_cache_reseals_total",
                "Values read that opened only under a previous encryption key, and were sealed again under the current one.",
            )?,
        };
        registry.register(Box::new(m.lookups.clone()))?;
        registry.register(Box::new(m.errors.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        registry.register(Box::new(m.breaker_state.clone()))?;
        registry.register(Box::new(m.locks.clone()))?;
        registry.register(Box::new(m.invalidations.clone()))?;
        registry.register(Box::new(m.subscribed.clone()))?;
        registry.register(Box::new(m.mode.clone()))?;
        registry.register(Box::new(m.nodes.clone()))?;
        registry.register(Box::new(m.cluster_slots.clone()))?;
        registry.register(Box::new(m.topology_changes.clone()))?;
        registry.register(Box::new(m.reseals.clone()))?;
        for each in [
            SharedMode::Standalone,
            SharedMode::Cluster,
            SharedMode::Sentinel,
        ] {
            m.mode
                .with_label_values(&[each.name()])
                .set(i64::from(each == mode));
        }
        for role in ["primary", "replica"] {
            m.nodes.with_label_values(&[role]);
        }
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
            "limit",
            "throttle",
            "topology",
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
