//! Every Prometheus series the broker exports, registered in one explicit [`Registry`] that is
//! passed in (no globals), so tests can build as many brokers as they like.
//!
//! Names follow `token_broker_<subsystem>_<what>_<unit|total>`. Label values are bounded: routes
//! and outcomes are fixed sets, and no label ever holds a user, a flow or a token. The hot-path
//! children are resolved once here, so a hit does no label lookup for them.

use std::sync::OnceLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
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

/// The hot children of one route, resolved once: its latency histogram, and its
/// `requests_total` child for status 200, made on the route's first 200 answer (so the series
/// still appears with its first answer, as documented). Counting an answer through these takes no
/// label hashing, no lock and no reference count, which the series' vectors would each cost.
pub struct RouteSeries {
    duration: Histogram,
    ok: OnceLock<IntCounter>,
}

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
    /// Pre-resolved `cache_lookups` children.
    pub lookup_hit: IntCounter,
    /// `result="miss"`: this request made the upstream call.
    pub lookup_miss: IntCounter,
    /// `result="coalesced"`: this request waited on another's upstream call.
    pub lookup_coalesced: IntCounter,
    /// `result="uncacheable"`: the request names no user, so it is never cached.
    pub lookup_uncacheable: IntCounter,
    /// Per route, in the order of [`ROUTES`].
    routes: [RouteSeries; 4],
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
                "Caller requests refused for authentication, by reason: missing, malformed, unknown.",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(cache_lookups.clone()))?;
        registry.register(Box::new(cache_entries.clone()))?;
        registry.register(Box::new(upstream_requests.clone()))?;
        registry.register(Box::new(upstream_duration.clone()))?;
        registry.register(Box::new(auth_failures.clone()))?;

        // Make every bounded series visible from the start, so rates and alerts have a zero to
        // start from instead of a missing series.
        let routes = ROUTES.map(|route| RouteSeries {
            duration: request_duration.with_label_values(&[route]),
            ok: OnceLock::new(),
        });
        for outcome in [
            "ok",
            "credential_rejected",
            "throttled",
            "server_error",
            "rejected",
            "bad_response",
            "timeout",
            "unreachable",
        ] {
            upstream_requests.with_label_values(&[outcome]);
        }
        for reason in ["missing", "malformed", "unknown"] {
            auth_failures.with_label_values(&[reason]);
        }
        Ok(Self {
            lookup_hit: cache_lookups.with_label_values(&["hit"]),
            lookup_miss: cache_lookups.with_label_values(&["miss"]),
            lookup_coalesced: cache_lookups.with_label_values(&["coalesced"]),
            lookup_uncacheable: cache_lookups.with_label_values(&["uncacheable"]),
            routes,
            registry,
            requests,
            request_duration,
            cache_lookups,
            cache_entries,
            upstream_requests,
            upstream_duration,
            auth_failures,
        })
    }

    /// Counts and times one caller API answer: `requests_total{route,status}` and
    /// `request_duration_seconds{route}`. `route` is one of [`ROUTES`].
    pub fn observe_request(&self, route: &str, status: http::StatusCode, seconds: f64) {
        let Some(series) = ROUTES
            .iter()
            .position(|r| *r == route)
            .map(|i| &self.routes[i])
        else {
            // Not a route label: count it the slow way rather than lose it.
            self.requests
                .with_label_values(&[route, status.as_str()])
                .inc();
            self.request_duration
                .with_label_values(&[route])
                .observe(seconds);
            return;
        };
        if status == http::StatusCode::OK {
            series
                .ok
                .get_or_init(|| self.requests.with_label_values(&[route, "200"]))
                .inc();
        } else {
            self.requests
                .with_label_values(&[route, status.as_str()])
                .inc();
        }
        series.duration.observe(seconds);
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
    fn answers_are_counted_by_route_and_status_from_their_first_answer_on() {
        let m = Metrics::new(Registry::new()).unwrap();
        let before = String::from_utf8(m.render()).unwrap();
        assert!(!before.contains("token_broker_requests_total{"), "{before}");
        m.observe_request("tokens", http::StatusCode::OK, 0.001);
        m.observe_request("tokens", http::StatusCode::OK, 0.001);
        m.observe_request("tokens", http::StatusCode::BAD_REQUEST, 0.001);
        m.observe_request("api_keys", http::StatusCode::OK, 0.001);
        let text = String::from_utf8(m.render()).unwrap();
        for line in [
            r#"token_broker_requests_total{route="tokens",status="200"} 2"#,
            r#"token_broker_requests_total{route="tokens",status="400"} 1"#,
            r#"token_broker_requests_total{route="api_keys",status="200"} 1"#,
            r#"token_broker_request_duration_seconds_count{route="tokens"} 3"#,
            r#"token_broker_request_duration_seconds_count{route="api_keys"} 1"#,
            r#"token_broker_request_duration_seconds_count{route="invalidate"} 0"#,
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        assert!(!text.contains(r#"route="invalidate",status"#));
    }

    #[test]
    fn two_brokers_can_each_have_a_registry() {
        Metrics::new(Registry::new()).unwrap();
        Metrics::new(Registry::new()).unwrap();
    }
}
