//! Every Prometheus series the broker exports, registered in one explicit [`Registry`] that is
//! passed in (no globals), so tests can build as many brokers as they like.
//!
//! Names follow `token_broker_<subsystem>_<what>_<unit|total>`. Label values are bounded: routes,
//! statuses, outcomes, reasons and causes are fixed sets, and `caller` holds only ids from the
//! config file (`[[clients]] id`). No label ever holds a user, a flow or a token, so the number
//! of series does not grow with traffic. The hot-path children are resolved once (at start, or
//! on first use for a status code or a caller), so a request does no label hashing.
//!
//! It also owns the two bounded vocabularies its labels are made of, [`RouteLabel`] and
//! [`CacheOutcome`], so that every other module names a route or what the cache did with the
//! same type. It imports nothing but `prometheus` and `std`.
//!
//! docs/observability.md lists every series with its meaning; keep the two in step.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
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
/// Life left in a token when it is handed out, in seconds. Truora's tokens live 2 h (7200 s) and
/// the cache stops serving one at `cache.min_remaining` (900 s by default), so hits fall between
/// 900 and 7200 in steps of 15 min; 60 and 300 catch short-lived tokens handed over uncached,
/// 14400 anything longer than Truora's usual life.
const REMAINING_BUCKETS: &[f64] = &[
    60.0, 300.0, 900.0, 1800.0, 2700.0, 3600.0, 4500.0, 5400.0, 6300.0, 7200.0, 14400.0,
];
/// Requests waiting on one cache fill when it completes: 1 (no coalescing) to 1000 (a stampede
/// of identical misses).
const WAITER_BUCKETS: &[f64] = &[
    1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0,
];

/// The `route` label: one per caller endpoint, plus the catch-all for anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteLabel {
    /// `POST /v1/tokens`
    Tokens,
    /// `POST /v1/api-keys`
    ApiKeys,
    /// `DELETE /v1/tokens`
    Invalidate,
    /// `/truora/...`
    Passthrough,
    /// Anything else (unknown paths, wrong methods).
    Other,
}

impl RouteLabel {
    /// Every value, in the order of the series resolved for them.
    pub const ALL: [RouteLabel; 5] = [
        RouteLabel::Tokens,
        RouteLabel::ApiKeys,
        RouteLabel::Invalidate,
        RouteLabel::Passthrough,
        RouteLabel::Other,
    ];

    /// The label value, also written on the access line.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteLabel::Tokens => "tokens",
            RouteLabel::ApiKeys => "api_keys",
            RouteLabel::Invalidate => "invalidate",
            RouteLabel::Passthrough => "passthrough",
            RouteLabel::Other => "other",
        }
    }
}

/// What the cache did for one caller request: the one type behind `X-Cache`, the answer's
/// `cache` field, the access line's `cache`, `token_broker_cache_lookups_total{result}` and
/// `token_broker_caller_requests_total{cache}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheOutcome {
    /// No lookup: refused before it, or not a token request.
    #[default]
    None,
    /// Served from the cache.
    Hit,
    /// Missed and made the upstream call.
    Miss,
    /// Missed and waited on an identical request's upstream call.
    Coalesced,
    /// Names no user: minted, never cached.
    Uncacheable,
}

impl CacheOutcome {
    /// The access line's `cache` field: `-`, `hit`, `miss`, `coalesced`, `uncacheable`.
    pub fn label(self) -> &'static str {
        match self {
            CacheOutcome::None => "-",
            CacheOutcome::Hit => "hit",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Coalesced => "coalesced",
            CacheOutcome::Uncacheable => "uncacheable",
        }
    }

    /// True when the token came from the cache (`X-Cache: HIT`, `"cache":"hit"`); every other
    /// token was minted for this request or an identical one.
    pub fn is_hit(self) -> bool {
        self == CacheOutcome::Hit
    }

    /// The index of its `token_broker_caller_requests_total{cache}` child, in [`CALLER_CACHE`]
    /// order: a coalesced request counts as a miss there.
    fn caller_index(self) -> usize {
        match self {
            CacheOutcome::Hit => 0,
            CacheOutcome::Miss | CacheOutcome::Coalesced => 1,
            CacheOutcome::Uncacheable => 2,
            CacheOutcome::None => 3,
        }
    }
}

/// The status codes the caller API answers with, whose `requests_total` children are kept
/// resolved; any other status is counted too, through a label lookup.
const STATUSES: [u16; 12] = [200, 400, 401, 404, 405, 413, 415, 429, 500, 502, 503, 504];
/// The `cause` label of `token_broker_cache_evictions_total`, as moka reports them.
pub const EVICTION_CAUSES: [&str; 4] = ["expired", "explicit", "replaced", "size"];
/// The `cache` label of `token_broker_caller_requests_total`, in the order
/// [`CacheOutcome`] maps onto it.
pub const CALLER_CACHE: [&str; 4] = ["hit", "miss", "uncacheable", "none"];
/// Callers with their own series; beyond this many distinct ids (never, with a sane config) the
/// rest share the `caller="(other)"` series.
pub const MAX_CALLERS: usize = 256;
/// The `caller` label of the series shared beyond [`MAX_CALLERS`].
pub const OTHER_CALLER: &str = "(other)";
/// The `version` label of `token_broker_build_info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The `revision` label of `token_broker_build_info`: `TOKEN_BROKER_REVISION` at build time
/// (a release pipeline sets it to the commit), else `unknown`.
pub const REVISION: &str = match option_env!("TOKEN_BROKER_REVISION") {
    Some(r) => r,
    None => "unknown",
};

/// One configured caller's series.
pub struct CallerSeries {
    /// The caller's `[[clients]] id`.
    pub id: Arc<str>,
    /// `token_broker_caller_requests_total{caller,cache}`, in [`CALLER_CACHE`] order.
    requests: [IntCounter; 4],
    /// `token_broker_caller_mints_total{caller}`.
    pub mints: IntCounter,
}

impl CallerSeries {
    /// Counts one answered request of this caller.
    pub fn count(&self, outcome: CacheOutcome) {
        self.requests[outcome.caller_index()].inc();
    }

    /// This caller's requests so far with `outcome` (a coalesced one counts as a miss).
    pub fn requests(&self, outcome: CacheOutcome) -> u64 {
        self.requests[outcome.caller_index()].get()
    }

    /// All of this caller's requests so far.
    pub fn total(&self) -> u64 {
        self.requests.iter().map(IntCounter::get).sum()
    }
}

/// One route's resolved children.
struct RouteSeries {
    duration: Histogram,
    statuses: [OnceLock<IntCounter>; STATUSES.len()],
}

/// The broker's series.
pub struct Metrics {
    registry: Registry,
    started: Instant,
    /// `token_broker_requests_total{route,status}`
    pub requests: IntCounterVec,
    /// `token_broker_request_duration_seconds{route}`
    pub request_duration: HistogramVec,
    /// `token_broker_requests_in_flight`
    pub requests_in_flight: IntGauge,
    /// `token_broker_cache_lookups_total{result}`
    pub cache_lookups: IntCounterVec,
    /// `token_broker_cache_entries`
    pub cache_entries: IntGauge,
    /// `token_broker_cache_max_entries`
    pub cache_max_entries: IntGauge,
    /// `token_broker_cache_evictions_total{cause}`, indexed as [`EVICTION_CAUSES`].
    pub evictions: [IntCounter; 4],
    /// `token_broker_cache_fill_waiters`
    pub fill_waiters: Histogram,
    /// `token_broker_token_remaining_seconds`
    pub token_remaining: Histogram,
    /// `token_broker_upstream_requests_total{outcome}`
    pub upstream_requests: IntCounterVec,
    /// `token_broker_upstream_duration_seconds`
    pub upstream_duration: Histogram,
    /// `token_broker_upstream_last_success_timestamp_seconds`
    pub upstream_last_success: Gauge,
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
    /// `token_broker_passthrough_requests_total{pattern,status}`
    pub passthrough_requests: IntCounterVec,
    /// `token_broker_passthrough_duration_seconds{pattern}`
    pub passthrough_duration: HistogramVec,
    /// `token_broker_server_connections_open`
    pub connections_open: IntGauge,
    /// `token_broker_server_connections_rejected_total`
    pub connections_rejected: IntCounter,
    /// `token_broker_server_tls_handshake_failures_total`
    pub tls_handshake_failures: IntCounter,
    /// `token_broker_server_connections_closed_total{listener,reason}`, for `reason` idle or
    /// age: connections the broker closed itself.
    pub connections_closed: IntCounterVec,
    /// `token_broker_server_accept_errors_total{listener}`
    pub accept_errors: IntCounterVec,
    /// `token_broker_server_admin_connections_rejected_total`
    pub admin_connections_rejected: IntCounter,
    /// `token_broker_server_webhook_connections_rejected_total`
    pub webhook_connections_rejected: IntCounter,
    /// `token_broker_config_reloads_total{result}`
    pub config_reloads: IntCounterVec,
    /// `token_broker_config_last_reload_success_timestamp_seconds`
    pub config_last_reload_success: Gauge,
    /// `token_broker_jwks_keys{source}`: created only with `[auth.kubernetes]`.
    pub jwks_keys: IntGaugeVec,
    /// `token_broker_jwks_refreshes_total{result}`: created only with `auth.kubernetes.jwks_url`.
    pub jwks_refreshes: IntCounterVec,
    /// `token_broker_cache_invalidations_total{reason}`
    pub cache_invalidations: IntCounterVec,
    /// `token_broker_webhook_deliveries_total{event,outcome}`
    pub webhook_deliveries: IntCounterVec,
    /// Pre-resolved `cache_lookups` children: hit, miss, coalesced, uncacheable.
    lookups: [IntCounter; 4],
    routes: [RouteSeries; 5],
    caller_requests: IntCounterVec,
    caller_mints: IntCounterVec,
    /// Append-only: a slot, once set, keeps its caller, so a slot number is a stable handle.
    /// The last slot is the shared `(other)` one.
    callers: Box<[OnceLock<CallerSeries>]>,
    callers_grow: Mutex<()>,
}

fn counter(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntCounterVec> {
    IntCounterVec::new(Opts::new(name, help), labels)
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> prometheus::Result<Histogram> {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
}

impl Metrics {
    /// Creates and registers every series in `registry`.
    pub fn new(registry: Registry) -> prometheus::Result<Self> {
        let requests = counter(
            "token_broker_requests_total",
            "Caller API requests answered, by route and HTTP status.",
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
        let requests_in_flight = IntGauge::new(
            "token_broker_requests_in_flight",
            "Caller API requests received and not yet answered.",
        )?;
        let cache_lookups = counter(
            "token_broker_cache_lookups_total",
            "Token cache lookups by result: hit, miss (made the upstream call), coalesced (waited on another request's call), uncacheable (no user named).",
            &["result"],
        )?;
        let cache_entries = IntGauge::new(
            "token_broker_cache_entries",
            "Tokens held in the in-process cache.",
        )?;
        let cache_max_entries = IntGauge::new(
            "token_broker_cache_max_entries",
            "The cache's bound (cache.max_entries); past it the least useful entries are evicted (cause=\"size\").",
        )?;
        let evictions_vec = counter(
            "token_broker_cache_evictions_total",
            "Tokens that left the cache, by cause: expired (reached expiry minus cache.min_remaining), explicit (DELETE /v1/tokens), replaced (a fresh token for the same key), size (cache.max_entries reached).",
            &["cause"],
        )?;
        let fill_waiters = histogram(
            "token_broker_cache_fill_waiters",
            "Requests waiting on one cache fill (one upstream call) when it completed, the one that started it included: above 1, identical misses were coalesced.",
            WAITER_BUCKETS,
        )?;
        let token_remaining = histogram(
            "token_broker_token_remaining_seconds",
            "Life left in each token handed out (hits and misses), in seconds, when it was answered.",
            REMAINING_BUCKETS,
        )?;
        let upstream_requests = counter(
            "token_broker_upstream_requests_total",
            "Calls to Truora's POST /v1/api-keys by outcome.",
            &["outcome"],
        )?;
        let upstream_duration = histogram(
            "token_broker_upstream_duration_seconds",
            "Duration of calls to Truora's POST /v1/api-keys, answer read included.",
            UPSTREAM_BUCKETS,
        )?;
        let upstream_last_success = Gauge::new(
            "token_broker_upstream_last_success_timestamp_seconds",
            "Unix time of the last call to Truora that minted a token; 0 until the first one.",
        )?;
        let auth_failures = counter(
            "token_broker_auth_failures_total",
            "Caller requests refused for authentication, by reason: missing, malformed, unknown, certificate_required; for service-account tokens bad_signature, expired, wrong_audience, wrong_issuer, unknown_service_account, unknown_key.",
            &["reason"],
        )?;
        let upstream_retries = counter(
            "token_broker_upstream_retries_total",
            "Upstream attempts retried, by the outcome that caused the retry (unreachable, throttled, server_error).",
            &["reason"],
        )?;
        let upstream_refused = counter(
            "token_broker_upstream_refused_total",
            "Misses answered without calling Truora, by reason: throttled (inside a Retry-After window), circuit_open, saturated (max_concurrent reached), budget_global, budget_caller (mint_rate spent).",
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
            "Caller connections closed at once because server.max_connections were open, or server.max_connections_per_peer from the same address.",
        )?;
        let connections_closed = counter(
            "token_broker_server_connections_closed_total",
            "Connections the broker closed itself, by listener (caller, admin) and reason: idle (no request in progress for server.header_read_timeout), age (older than server.max_connection_age).",
            &["listener", "reason"],
        )?;
        let accept_errors = counter(
            "token_broker_server_accept_errors_total",
            "Connections that could not be accepted, by listener (out of file descriptors, say); accepting backs off meanwhile.",
            &["listener"],
        )?;
        let admin_connections_rejected = IntCounter::new(
            "token_broker_server_admin_connections_rejected_total",
            "Admin connections closed at once because server.admin_max_connections were open.",
        )?;
        let webhook_connections_rejected = IntCounter::new(
            "token_broker_server_webhook_connections_rejected_total",
            "Webhook connections closed at once because webhooks.max_connections were open.",
        )?;
        registry.register(Box::new(webhook_connections_rejected.clone()))?;
        for listener in ["caller", "admin", "webhook"] {
            accept_errors.with_label_values(&[listener]);
            for reason in ["idle", "age"] {
                connections_closed.with_label_values(&[listener, reason]);
            }
        }
        registry.register(Box::new(connections_closed.clone()))?;
        registry.register(Box::new(accept_errors.clone()))?;
        registry.register(Box::new(admin_connections_rejected.clone()))?;
        let tls_handshake_failures = IntCounter::new(
            "token_broker_server_tls_handshake_failures_total",
            "Caller and webhook connections whose TLS handshake failed or timed out.",
        )?;
        let config_reloads = counter(
            "token_broker_config_reloads_total",
            "Configuration reloads (SIGHUP, POST /admin/reload) by result: ok, or error (the old configuration is kept).",
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
        let jwks_keys = IntGaugeVec::new(
            Opts::new(
                "token_broker_jwks_keys",
                "Signing keys of [auth.kubernetes] in use (RS256 and ES256 keys with a kid), by source: file (jwks_file) or url (jwks_url).",
            ),
            &["source"],
        )?;
        let jwks_refreshes = counter(
            "token_broker_jwks_refreshes_total",
            "Fetches of auth.kubernetes.jwks_url (at start, every jwks_refresh, and for a token naming an unknown key) by result: ok, or error (the last good keys are kept).",
            &["result"],
        )?;
        registry.register(Box::new(jwks_keys.clone()))?;
        registry.register(Box::new(jwks_refreshes.clone()))?;
        // The reasons are the issuance core's (webhook, result, caller, no_cache): it creates
        // their series at start.
        let cache_invalidations = counter(
            "token_broker_cache_invalidations_total",
            "Invalidations of cached tokens by reason: webhook (Truora said the process ended), result (a result read through the pass-through said so), caller (DELETE /v1/tokens), no_cache (a caller asked for a new process).",
            &["reason"],
        )?;
        // Both labels are bounded by the webhook receiver: canonical event names (or other,
        // unknown) and its fixed outcomes.
        let webhook_deliveries = counter(
            "token_broker_webhook_deliveries_total",
            "Deliveries to the webhook listener by event and outcome: taken (the process ended: its tokens dropped), ignored (an event that ends nothing), unauthorized, bad_signature, stale (iat outside webhooks.max_age), malformed, too_large, error (body timeout, shared cache unreachable).",
            &["event", "outcome"],
        )?;
        registry.register(Box::new(cache_invalidations.clone()))?;
        registry.register(Box::new(webhook_deliveries.clone()))?;
        let caller_requests = counter(
            "token_broker_caller_requests_total",
            "Caller API requests answered per configured caller, by what the cache did: hit, miss (minted, or waited on an identical mint), uncacheable (names no user), none (no cache lookup made).",
            &["caller", "cache"],
        )?;
        let caller_mints = counter(
            "token_broker_caller_mints_total",
            "Tokens minted at Truora per configured caller.",
            &["caller"],
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "token_broker_build_info",
                "Always 1; the labels tell the running build: version, and revision when the build set TOKEN_BROKER_REVISION.",
            ),
            &["version", "revision"],
        )?;
        build_info.with_label_values(&[VERSION, REVISION]).set(1);

        registry.register(Box::new(upstream_retries.clone()))?;
        registry.register(Box::new(upstream_refused.clone()))?;
        registry.register(Box::new(breaker_state.clone()))?;
        registry.register(Box::new(throttle_remaining.clone()))?;
        registry.register(Box::new(credential_rejected.clone()))?;
        registry.register(Box::new(upstream_in_flight.clone()))?;
        // The pattern label is the matched `[[clients]] passthrough` entry (from the config, so
        // bounded) or "denied".
        let passthrough_requests = counter(
            "token_broker_passthrough_requests_total",
            "Pass-through requests to Truora's other endpoints, by the allowlist pattern they matched (or denied) and the status answered.",
            &["pattern", "status"],
        )?;
        let passthrough_duration = HistogramVec::new(
            HistogramOpts::new(
                "token_broker_passthrough_duration_seconds",
                "Time to Truora's answer head for pass-through requests, by pattern.",
            )
            .buckets(UPSTREAM_BUCKETS.to_vec()),
            &["pattern"],
        )?;
        passthrough_requests.with_label_values(&["denied", "403"]);
        registry.register(Box::new(passthrough_requests.clone()))?;
        registry.register(Box::new(passthrough_duration.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(cache_lookups.clone()))?;
        registry.register(Box::new(cache_entries.clone()))?;
        registry.register(Box::new(upstream_requests.clone()))?;
        registry.register(Box::new(upstream_duration.clone()))?;
        registry.register(Box::new(auth_failures.clone()))?;
        registry.register(Box::new(requests_in_flight.clone()))?;
        registry.register(Box::new(cache_max_entries.clone()))?;
        registry.register(Box::new(evictions_vec.clone()))?;
        registry.register(Box::new(fill_waiters.clone()))?;
        registry.register(Box::new(token_remaining.clone()))?;
        registry.register(Box::new(upstream_last_success.clone()))?;
        registry.register(Box::new(caller_requests.clone()))?;
        registry.register(Box::new(caller_mints.clone()))?;
        registry.register(Box::new(build_info))?;
        // The standard process_* set (resident memory, CPU seconds, open file descriptors,
        // start time, threads), read from /proc at scrape time.
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        // Make every bounded series visible from the start, so rates and alerts have a zero to
        // start from instead of a missing series.
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
        for reason in [
            "missing",
            "malformed",
            "unknown",
            "certificate_required",
            "bad_signature",
            "expired",
            "wrong_audience",
            "wrong_issuer",
            "unknown_service_account",
            "unknown_key",
        ] {
            auth_failures.with_label_values(&[reason]);
        }
        let routes = RouteLabel::ALL.map(|route| RouteSeries {
            duration: request_duration.with_label_values(&[route.as_str()]),
            statuses: Default::default(),
        });
        let mut callers = Vec::with_capacity(MAX_CALLERS + 1);
        callers.resize_with(MAX_CALLERS + 1, OnceLock::new);
        Ok(Self {
            lookups: [
                CacheOutcome::Hit,
                CacheOutcome::Miss,
                CacheOutcome::Coalesced,
                CacheOutcome::Uncacheable,
            ]
            .map(|outcome| cache_lookups.with_label_values(&[outcome.label()])),
            evictions: EVICTION_CAUSES.map(|cause| evictions_vec.with_label_values(&[cause])),
            registry,
            started: Instant::now(),
            requests,
            request_duration,
            requests_in_flight,
            cache_lookups,
            cache_entries,
            cache_max_entries,
            fill_waiters,
            token_remaining,
            upstream_requests,
            upstream_duration,
            upstream_last_success,
            auth_failures,
            upstream_retries,
            upstream_refused,
            breaker_state,
            throttle_remaining,
            credential_rejected,
            upstream_in_flight,
            passthrough_requests,
            passthrough_duration,
            connections_open,
            connections_rejected,
            tls_handshake_failures,
            connections_closed,
            accept_errors,
            admin_connections_rejected,
            webhook_connections_rejected,
            config_reloads,
            config_last_reload_success,
            jwks_keys,
            jwks_refreshes,
            cache_invalidations,
            webhook_deliveries,
            routes,
            caller_requests,
            caller_mints,
            callers: callers.into_boxed_slice(),
            callers_grow: Mutex::new(()),
        })
    }

    /// Counts and times one answered caller request.
    pub fn request_done(&self, route: RouteLabel, status: u16, elapsed: Duration) {
        let series = &self.routes[route as usize];
        series.duration.observe(elapsed.as_secs_f64());
        let child = || {
            self.requests
                .with_label_values(&[route.as_str(), &status.to_string()])
        };
        match STATUSES.iter().position(|s| *s == status) {
            Some(i) => series.statuses[i].get_or_init(child).inc(),
            None => child().inc(),
        }
    }

    /// Counts one cache lookup by what it found (`None`, no lookup, is not counted).
    pub fn count_lookup(&self, outcome: CacheOutcome) {
        let i = match outcome {
            CacheOutcome::None => return,
            CacheOutcome::Hit => 0,
            CacheOutcome::Miss => 1,
            CacheOutcome::Coalesced => 2,
            CacheOutcome::Uncacheable => 3,
        };
        self.lookups[i].inc();
    }

    /// Cache lookups so far that ended with `outcome`.
    pub fn lookups(&self, outcome: CacheOutcome) -> u64 {
        match outcome {
            CacheOutcome::None => 0,
            CacheOutcome::Hit => self.lookups[0].get(),
            CacheOutcome::Miss => self.lookups[1].get(),
            CacheOutcome::Coalesced => self.lookups[2].get(),
            CacheOutcome::Uncacheable => self.lookups[3].get(),
        }
    }

    /// The slot of `caller`'s series, created on first sight. `caller` must come from the config
    /// (an authenticated caller), which bounds the label. The common case compares pointers
    /// only: callers are handed the same `Arc` on every request.
    pub fn caller_slot(&self, caller: &Arc<str>) -> usize {
        for (i, slot) in self.callers[..MAX_CALLERS].iter().enumerate() {
            match slot.get() {
                Some(s) if Arc::ptr_eq(&s.id, caller) || *s.id == **caller => return i,
                Some(_) => {}
                None => return self.add_caller(caller),
            }
        }
        self.add_caller(caller)
    }

    fn add_caller(&self, caller: &Arc<str>) -> usize {
        let _grow = self
            .callers_grow
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for (i, slot) in self.callers[..MAX_CALLERS].iter().enumerate() {
            match slot.get() {
                Some(s) if *s.id == **caller => return i,
                Some(_) => {}
                None => {
                    slot.get_or_init(|| self.caller_series(Arc::clone(caller)));
                    return i;
                }
            }
        }
        self.callers[MAX_CALLERS].get_or_init(|| self.caller_series(OTHER_CALLER.into()));
        MAX_CALLERS
    }

    fn caller_series(&self, id: Arc<str>) -> CallerSeries {
        CallerSeries {
            requests: CALLER_CACHE
                .map(|cache| self.caller_requests.with_label_values(&[&id, cache])),
            mints: self.caller_mints.with_label_values(&[&id]),
            id,
        }
    }

    /// Creates the series of these callers now, so they are exported (at zero) from the start.
    pub fn register_callers<'a>(&self, ids: impl IntoIterator<Item = &'a Arc<str>>) {
        for id in ids {
            self.caller_slot(id);
        }
    }

    /// The series in `slot`, from [`Metrics::caller_slot`].
    pub fn caller(&self, slot: usize) -> Option<&CallerSeries> {
        self.callers.get(slot).and_then(OnceLock::get)
    }

    /// Every caller seen (or registered) so far, in order of first sight.
    pub fn callers(&self) -> impl Iterator<Item = &CallerSeries> {
        self.callers.iter().filter_map(OnceLock::get)
    }

    /// Notes a successful mint at the current wall-clock time.
    pub fn upstream_succeeded(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.upstream_last_success.set(now.as_secs_f64());
    }

    /// Time since these series were created (the broker's uptime).
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The Prometheus text exposition of every registered series.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
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

    fn text(m: &Metrics) -> String {
        String::from_utf8(m.render()).unwrap()
    }

    #[test]
    fn every_required_series_is_exported_with_help() {
        let m = Metrics::new(Registry::new()).unwrap();
        m.requests.with_label_values(&["tokens", "200"]).inc();
        m.count_lookup(CacheOutcome::Hit);
        m.upstream_duration.observe(0.1);
        m.register_callers([&Arc::from("checkout")]);
        let text = text(&m);
        for name in [
            "token_broker_requests_total",
            "token_broker_request_duration_seconds",
            "token_broker_requests_in_flight",
            "token_broker_cache_lookups_total",
            "token_broker_cache_entries",
            "token_broker_cache_max_entries",
            "token_broker_cache_evictions_total",
            "token_broker_cache_fill_waiters",
            "token_broker_token_remaining_seconds",
            "token_broker_upstream_requests_total",
            "token_broker_upstream_duration_seconds",
            "token_broker_upstream_last_success_timestamp_seconds",
            "token_broker_upstream_retries_total",
            "token_broker_upstream_refused_total",
            "token_broker_upstream_breaker_state",
            "token_broker_upstream_throttle_remaining_seconds",
            "token_broker_upstream_credential_rejected",
            "token_broker_upstream_in_flight",
            "token_broker_auth_failures_total",
            "token_broker_caller_requests_total",
            "token_broker_caller_mints_total",
            "token_broker_build_info",
        ] {
            assert!(text.contains(&format!("# HELP {name} ")), "{name}");
        }
        assert!(text.contains(r#"token_broker_cache_lookups_total{result="hit"} 1"#));
        assert!(text.contains(&format!(
            r#"token_broker_build_info{{revision="{REVISION}",version="{VERSION}"}} 1"#
        )));
        for cause in EVICTION_CAUSES {
            assert!(text.contains(&format!(
                r#"token_broker_cache_evictions_total{{cause="{cause}"}} 0"#
            )));
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_standard_process_series_are_exported() {
        let text = text(&Metrics::new(Registry::new()).unwrap());
        for name in [
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
            "process_threads",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}");
        }
    }

    #[test]
    fn two_brokers_can_each_have_a_registry() {
        Metrics::new(Registry::new()).unwrap();
        Metrics::new(Registry::new()).unwrap();
    }

    #[test]
    fn requests_are_counted_by_route_and_status_whatever_the_status() {
        let m = Metrics::new(Registry::new()).unwrap();
        let ms = Duration::from_millis(1);
        m.request_done(RouteLabel::Tokens, 200, ms);
        m.request_done(RouteLabel::Tokens, 200, ms);
        m.request_done(RouteLabel::Invalidate, 418, ms);
        let text = text(&m);
        assert!(text.contains(r#"token_broker_requests_total{route="tokens",status="200"} 2"#));
        assert!(text.contains(r#"token_broker_requests_total{route="invalidate",status="418"} 1"#));
        assert!(text.contains(r#"token_broker_request_duration_seconds_count{route="tokens"} 2"#));
    }

    #[test]
    fn a_caller_keeps_its_slot_and_its_series_are_labelled_with_its_id() {
        let m = Metrics::new(Registry::new()).unwrap();
        let a: Arc<str> = "checkout".into();
        let b: Arc<str> = "billing".into();
        let slot = m.caller_slot(&a);
        assert_eq!(m.caller_slot(&b), slot + 1);
        // Another Arc with the same id (a reloaded config) finds the same slot.
        assert_eq!(m.caller_slot(&Arc::from("checkout")), slot);
        m.caller(slot).unwrap().count(CacheOutcome::Hit);
        m.caller(slot).unwrap().mints.inc();
        let text = text(&m);
        assert!(
            text.contains(r#"token_broker_caller_requests_total{cache="hit",caller="checkout"} 1"#)
        );
        assert!(text.contains(r#"token_broker_caller_mints_total{caller="checkout"} 1"#));
        let ids: Vec<&str> = m.callers().map(|c| &*c.id).collect();
        assert_eq!(ids, ["checkout", "billing"]);
    }

    #[test]
    fn callers_beyond_the_bound_share_one_series() {
        let m = Metrics::new(Registry::new()).unwrap();
        for i in 0..MAX_CALLERS + 10 {
            m.caller_slot(&Arc::from(format!("c{i}")));
        }
        assert_eq!(m.caller_slot(&Arc::from("late")), MAX_CALLERS);
        assert_eq!(m.callers().count(), MAX_CALLERS + 1);
        assert!(text(&m).contains(r#"token_broker_caller_mints_total{caller="(other)"} 0"#));
    }
}
