//! Every Prometheus series the broker exports, registered in one explicit [`Registry`] that is
//! passed in (no globals), so tests can build as many brokers as they like.
//!
//! Names follow `token_broker_<subsystem>_<what>_<unit|total>`. Label values are bounded: routes
//! and outcomes are fixed sets, and no label ever holds a user, a flow or a token. The hot-path
//! children are resolved once here, so a hit does no label lookup for them.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

/// Request latency buckets: 50 us (a cache hit) to 10 s (past any upstream timeout).
const REQUEST_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];
/// Upstream latency buckets: 5 ms (a near fake) to 30 s (past any configured timeout).
const UPSTREAM_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The `route` label values: one per endpoint, plus the catch-all for anything else.
pub const ROUTES: [&str; 4] = ["tokens", "api_keys", "invalidate", "other"];

/// The broker's series.
pub struct Metrics {
    registry: Registry,
    /// `token_broker_requests_total{route,status}`
    pub requests: IntCounterVec,
    /// `token_broker_request_duration_seconds{route}`
    pub request_duration: HistogramVec,
    /// `token_broker_cache_lookups_total{result}`
    pub cache_lookups: IntCounterVec,
    /// `token_broker_cache_entries`
    pub cache_entries: IntGauge,
    /// `token_broker_upstream_requests_total{outcome}`
    pub upstream_requests: IntCounterVec,
    /// `token_broker_upstream_duration_seconds`
    pub upstream_duration: Histogram,
    /// `token_broker_auth_failures_total{reason}`
    pub auth_failures: IntCounterVec,
    /// `token_broker_upstream_retries_total{reason}`
    pub upstream_retries: IntCounterVec,
    /// `token_broker_upstream_refused_total{reason}`
    pub upstream_refused: IntCounterVec,
    /// `token_broker_upstream_breaker_state`
    pub breaker_state: IntGauge,
    /// `token_broker_upstream_throttle_remaining_seconds`
    pub throttle_remaining: Gauge,
    /// `token_broker_upstream_credential_rejected`
    pub credential_rejected: IntGauge,
    /// `token_broker_upstream_in_flight`
    pub upstream_in_flight: IntGauge,
    /// `token_broker_server_connections_open`
    pub connections_open: IntGauge,
    /// `token_broker_server_connections_rejected_total`
    pub connections_rejected: IntCounter,
    /// `token_broker_server_tls_handshake_failures_total`
    pub tls_handshake_failures: IntCounter,
    /// `token_broker_config_reloads_total{result}`
    pub config_reloads: IntCounterVec,
    /// `token_broker_config_last_reload_success_timestamp_seconds`
    pub config_last_reload_success: Gauge,
    /// Pre-resolved `cache_lookups` children.
    pub lookup_hit: IntCounter,
    /// `result="miss"`: this request made the upstream call.
    pub lookup_miss: IntCounter,
    /// `result="coalesced"`: this request waited on another's upstream call.
    pub lookup_coalesced: IntCounter,
    /// `result="uncacheable"`: the request names no user, so it is never cached.
    pub lookup_uncacheable: IntCounter,
}

impl Metrics {
    /// Creates and registers every series in `registry`.
    pub fn new(registry: Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "token_broker_requests_total",
                "Caller API requests answered, by route and HTTP status.",
            ),
            &["route", "status"],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "token_broker_request_duration_seconds",
                "Time from request received to response ready, by route.",
            )
            .buckets(REQUEST_BUCKETS.to_vec()),
            &["route"],
        )?;
        let cache_lookups = IntCounterVec::new(
            Opts::new(
                "token_broker_cache_lookups_total",
                "Token cache lookups by result: hit, miss (made the upstream call), coalesced (waited on another request's call), uncacheable (no user named).",
            ),
            &["result"],
        )?;
        let cache_entries = IntGauge::new(
            "token_broker_cache_entries",
            "Tokens held in the in-process cache.",
        )?;
        let upstream_requests = IntCounterVec::new(
            Opts::new(
                "token_broker_upstream_requests_total",
                "Calls to Truora's POST /v1/api-keys by outcome.",
            ),
            &["outcome"],
        )?;
        let upstream_duration = Histogram::with_opts(
            HistogramOpts::new(
                "token_broker_upstream_duration_seconds",
                "Duration of calls to Truora's POST /v1/api-keys, answer read included.",
            )
            .buckets(UPSTREAM_BUCKETS.to_vec()),
        )?;
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "token_broker_auth_failures_total",
                "Caller requests refused for authentication, by reason: missing, malformed, unknown, certificate_required.",
            ),
            &["reason"],
        )?;
        let upstream_retries = IntCounterVec::new(
            Opts::new(
                "token_broker_upstream_retries_total",
                "Upstream attempts retried, by the outcome that caused the retry (unreachable, throttled, server_error).",
            ),
            &["reason"],
        )?;
        let upstream_refused = IntCounterVec::new(
            Opts::new(
                "token_broker_upstream_refused_total",
                "Misses answered without calling Truora, by reason: throttled (inside a Retry-After window), circuit_open, saturated (max_concurrent reached), budget_global, budget_caller (mint_rate spent).",
            ),
            &["reason"],
        )?;
        let breaker_state = IntGauge::new(
            "token_broker_upstream_breaker_state",
            "Circuit breaker in front of Truora: 0 closed, 1 half-open (probing), 2 open (misses refused).",
        )?;
        let throttle_remaining = Gauge::new(
            "token_broker_upstream_throttle_remaining_seconds",
            "Seconds left in the window Truora asked for with a 429; no call is made meanwhile.",
        )?;
        let credential_rejected = IntGauge::new(
            "token_broker_upstream_credential_rejected",
            "1 when Truora's last answer about the master API key was a rejection (401/403); cleared by the next success.",
        )?;
        let upstream_in_flight = IntGauge::new(
            "token_broker_upstream_in_flight",
            "Calls to Truora in flight now (at most upstream.max_concurrent).",
        )?;
        let connections_open = IntGauge::new(
            "token_broker_server_connections_open",
            "Caller connections open now (at most server.max_connections).",
        )?;
        let connections_rejected = IntCounter::new(
            "token_broker_server_connections_rejected_total",
            "Caller connections closed at once because server.max_connections were open.",
        )?;
        let tls_handshake_failures = IntCounter::new(
            "token_broker_server_tls_handshake_failures_total",
            "Caller connections whose TLS handshake failed or timed out.",
        )?;
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "token_broker_config_reloads_total",
                "Configuration reloads (SIGHUP, POST /admin/reload) by result: ok, or error (the old configuration is kept).",
            ),
            &["result"],
        )?;
        let config_last_reload_success = Gauge::new(
            "token_broker_config_last_reload_success_timestamp_seconds",
            "Unix time of the last configuration load that succeeded (start-up included).",
        )?;
        for result in ["ok", "error"] {
            config_reloads.with_label_values(&[result]);
        }
        registry.register(Box::new(connections_open.clone()))?;
        registry.register(Box::new(connections_rejected.clone()))?;
        registry.register(Box::new(tls_handshake_failures.clone()))?;
        registry.register(Box::new(config_reloads.clone()))?;
        registry.register(Box::new(config_last_reload_success.clone()))?;
        registry.register(Box::new(upstream_retries.clone()))?;
        registry.register(Box::new(upstream_refused.clone()))?;
        registry.register(Box::new(breaker_state.clone()))?;
        registry.register(Box::new(throttle_remaining.clone()))?;
        registry.register(Box::new(credential_rejected.clone()))?;
        registry.register(Box::new(upstream_in_flight.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(cache_lookups.clone()))?;
        registry.register(Box::new(cache_entries.clone()))?;
        registry.register(Box::new(upstream_requests.clone()))?;
        registry.register(Box::new(upstream_duration.clone()))?;
        registry.register(Box::new(auth_failures.clone()))?;

        // Make every bounded series visible from the start, so rates and alerts have a zero to
        // start from instead of a missing series.
        for route in ROUTES {
            request_duration.with_label_values(&[route]);
        }
        for outcome in [
            "ok",
            "credential_rejected",
            "throttled",
            "server_error",
            "rejected",
            "bad_response",
            "timeout",
            "unreachable",
            "connection_lost",
        ] {
            upstream_requests.with_label_values(&[outcome]);
        }
        for reason in ["unreachable", "throttled", "server_error"] {
            upstream_retries.with_label_values(&[reason]);
        }
        for reason in [
            "throttled",
            "circuit_open",
            "saturated",
            "budget_global",
            "budget_caller",
        ] {
            upstream_refused.with_label_values(&[reason]);
        }
        for reason in ["missing", "malformed", "unknown", "certificate_required"] {
            auth_failures.with_label_values(&[reason]);
        }
        Ok(Self {
            lookup_hit: cache_lookups.with_label_values(&["hit"]),
            lookup_miss: cache_lookups.with_label_values(&["miss"]),
            lookup_coalesced: cache_lookups.with_label_values(&["coalesced"]),
            lookup_uncacheable: cache_lookups.with_label_values(&["uncacheable"]),
            registry,
            requests,
            request_duration,
            cache_lookups,
            cache_entries,
            upstream_requests,
            upstream_duration,
            auth_failures,
            upstream_retries,
            upstream_refused,
            breaker_state,
            throttle_remaining,
            credential_rejected,
            upstream_in_flight,
            connections_open,
            connections_rejected,
            tls_handshake_failures,
            config_reloads,
            config_last_reload_success,
        })
    }

    /// The Prometheus text exposition of every registered series.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 * 1024);
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }

    /// The registry, for callers that add their own series.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_required_series_is_exported_with_help() {
        let m = Metrics::new(Registry::new()).unwrap();
        m.requests.with_label_values(&["tokens", "200"]).inc();
        m.lookup_hit.inc();
        m.upstream_duration.observe(0.1);
        let text = String::from_utf8(m.render()).unwrap();
        for name in [
            "token_broker_requests_total",
            "token_broker_request_duration_seconds",
            "token_broker_cache_lookups_total",
            "token_broker_cache_entries",
            "token_broker_upstream_requests_total",
            "token_broker_upstream_duration_seconds",
            "token_broker_auth_failures_total",
        ] {
            assert!(text.contains(&format!("# HELP {name} ")), "{name}");
        }
        assert!(text.contains(r#"token_broker_cache_lookups_total{result="hit"} 1"#));
    }

    #[test]
    fn two_brokers_can_each_have_a_registry() {
        Metrics::new(Registry::new()).unwrap();
        Metrics::new(Registry::new()).unwrap();
    }
}
