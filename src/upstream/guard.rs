//! What stands between a cache miss and Truora: the throttle window, the circuit breaker, the cap
//! on calls in flight, the mint budgets, and retries within an overall deadline.
//!
//! A miss goes through [`Guard::call`], in this order:
//!
//! 1. **Throttle window**: after Truora said 429 (or a 400 "rate limit"), no call is made until
//!    its Retry-After has passed; callers get 503 with the time left.
//! 2. **Breaker** ([`crate::breaker`]): after `breaker_threshold` consecutive failures misses get
//!    503 at once for `breaker_cooldown`; then one probe call is let through, whose success
//!    closes it again. Hits never come here, so they are served throughout.
//! 3. **Concurrency cap**: at most `max_concurrent` calls in flight; beyond it, 503 at once
//!    rather than a queue behind a slow upstream.
//! 4. **Mint budgets** ([`crate::upstream::budget`]): the caller's own and the global one;
//!    beyond them, 429 to that caller. With fleet limits ([`crate::upstream::fleet`]) they are
//!    spent for the whole fleet in Redis, and a throttle window another replica opened refuses
//!    here too; when Redis cannot be asked, the local budgets apply.
//! 5. **Attempts**: each bounded by `timeout` and by what is left of `deadline`. Only what is
//!    safe is retried, with jittered exponential back-off: a connection that could not be made
//!    (nothing was sent), and 429/503 after their Retry-After. A timeout or broken connection
//!    after the request was sent is not retried: Truora may have minted.
//!
//! Every attempt's outcome feeds the breaker, the throttle window and the credential state
//! (a rejected master key raises a metric, cleared by the next success, and logs at most once a
//! minute); with fleet limits a 429's window is told to every replica. Time is tokio's, so tests
//! run on a paused clock.
//!
//! Inside a traced request the whole of it is one span, `truora.mint`, with the attempts made
//! and the outcome (`ok` or the error's code).

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::budget::Budgets;
use super::fleet::{scope_label, FleetLimits, FleetMetrics, FleetVerdict};
use super::Mint;
use crate::breaker::{Breaker, BreakerState, Change, Health};
use crate::config::Config;
use crate::error::{BrokerError, Refusal, UpstreamError};
use crate::metrics::Metrics;
use crate::telemetry;

/// How often a rejected master key is logged at most.
const CREDENTIAL_LOG_EVERY: Duration = Duration::from_secs(60);

/// The `[upstream]` and `[[clients]]` settings the guard applies.
#[derive(Debug, Clone)]
pub struct GuardSettings {
    /// `upstream.timeout`: one attempt.
    pub timeout: Duration,
    /// `upstream.deadline`: all attempts and back-off.
    pub deadline: Duration,
    /// `upstream.max_retries`.
    pub max_retries: u32,
    /// `upstream.retry_backoff`.
    pub retry_backoff: Duration,
    /// `upstream.retry_backoff_max`.
    pub retry_backoff_max: Duration,
    /// `upstream.breaker_threshold`.
    pub breaker_threshold: u32,
    /// `upstream.breaker_cooldown`.
    pub breaker_cooldown: Duration,
    /// `upstream.max_concurrent`.
    pub max_concurrent: u32,
    /// `upstream.mint_rate`.
    pub mint_rate: u32,
    /// `[[clients]] mint_rate`, for the callers that have one.
    pub caller_rates: Vec<(Arc<str>, u32)>,
}

impl GuardSettings {
    /// The settings of a validated config.
    pub fn from_config(config: &Config) -> Self {
        let u = &config.upstream;
        Self {
            timeout: u.timeout,
            deadline: u.deadline,
            max_retries: u.max_retries,
            retry_backoff: u.retry_backoff,
            retry_backoff_max: u.retry_backoff_max,
            breaker_threshold: u.breaker_threshold,
            breaker_cooldown: u.breaker_cooldown,
            max_concurrent: u.max_concurrent,
            mint_rate: u.mint_rate,
            caller_rates: caller_rates(config),
        }
    }
}

/// `[[clients]] mint_rate` of the callers that have one.
pub fn caller_rates(config: &Config) -> Vec<(Arc<str>, u32)> {
    config
        .clients
        .iter()
        .filter_map(|c| Some((Arc::from(c.id.as_str()), c.mint_rate?)))
        .collect()
}

/// A point-in-time view for `/readyz`, the status page and the gauges.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    /// The breaker.
    pub breaker: BreakerState,
    /// Time left in the throttle window.
    pub throttled_for: Duration,
    /// Whether the last answer about the master key was a rejection.
    pub credential_rejected: bool,
    /// Calls in flight.
    pub in_flight: usize,
}

/// What Truora's last answers said, besides the breaker's count.
struct Heard {
    throttle_until: Option<Instant>,
    credential_rejected: bool,
    credential_logged: Option<Instant>,
    credential_suppressed: u64,
}

/// The limits shared by the fleet, and their series.
struct Fleet {
    limits: Arc<dyn FleetLimits>,
    metrics: Arc<FleetMetrics>,
}

/// Opens this replica's throttle window when another replica was throttled by Truora (an
/// invalidation channel message): cloned out of the guard for the listener.
#[derive(Clone)]
pub struct ThrottleWindow {
    heard: Arc<Mutex<Heard>>,
    metrics: Arc<OnceLock<Arc<FleetMetrics>>>,
}

impl ThrottleWindow {
    /// Refuses calls for `d` from now (or longer, when the window is open longer already).
    pub fn open_for(&self, d: Duration) {
        if d.is_zero() {
            return;
        }
        open_window(&mut lock(&self.heard), Instant::now() + d);
        if let Some(m) = self.metrics.get() {
            m.windows.with_label_values(&["remote"]).inc();
        }
    }
}

fn open_window(heard: &mut Heard, until: Instant) {
    heard.throttle_until = Some(heard.throttle_until.map_or(until, |t| t.max(until)));
}

/// The guard around every upstream call; see the module docs.
pub struct Guard {
    settings: GuardSettings,
    heard: Arc<Mutex<Heard>>,
    fleet: OnceLock<Fleet>,
    fleet_metrics: Arc<OnceLock<Arc<FleetMetrics>>>,
    breaker: Breaker,
    budgets: Budgets,
    permits: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data stays consistent at every await-free step, so a panic elsewhere cannot
    // leave it half-updated: carry on with it.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Guard {
    /// A guard with the given settings.
    pub fn new(settings: GuardSettings, metrics: Arc<Metrics>) -> Self {
        Self {
            budgets: Budgets::new(settings.mint_rate, &settings.caller_rates),
            breaker: Breaker::new(settings.breaker_threshold, settings.breaker_cooldown),
            permits: Arc::new(Semaphore::new(settings.max_concurrent as usize)),
            heard: Arc::new(Mutex::new(Heard {
                throttle_until: None,
                credential_rejected: false,
                credential_logged: None,
                credential_suppressed: 0,
            })),
            fleet: OnceLock::new(),
            fleet_metrics: Arc::new(OnceLock::new()),
            settings,
            metrics,
        }
    }

    /// Mints through `mint` for `caller`, applying every rule of the module docs.
    pub async fn call(
        &self,
        caller: &str,
        mint: &dyn Mint,
        form: &str,
    ) -> Result<String, BrokerError> {
        let span = telemetry::child(|| {
            tracing::info_span!(
                "truora.mint",
                otel.kind = "client",
                token_broker.caller = caller,
                token_broker.upstream.attempts = tracing::field::Empty,
                token_broker.upstream.outcome = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            )
        });
        let mut attempts = 0;
        let result = self.attempt(caller, mint, form, &span, &mut attempts).await;
        if !span.is_none() {
            span.record("token_broker.upstream.attempts", attempts);
            match &result {
                Ok(_) => span.record("token_broker.upstream.outcome", "ok"),
                Err(e) => span
                    .record("token_broker.upstream.outcome", e.code())
                    .record("otel.status_code", "error"),
            };
        }
        result
    }

    /// [`Guard::call`] itself; `attempts` counts the calls made to Truora, each inside `span`
    /// (so that the client sends its `traceparent`).
    async fn attempt(
        &self,
        caller: &str,
        mint: &dyn Mint,
        form: &str,
        span: &tracing::Span,
        attempts: &mut u32,
    ) -> Result<String, BrokerError> {
        let deadline = Instant::now() + self.settings.deadline;
        self.check_throttle()?;
        let admitted = self.breaker.admit();
        self.metrics.breaker_state.set(self.breaker.state().gauge());
        let mut admitted = match admitted {
            Ok(admitted) => admitted,
            Err(retry_after) => return Err(self.refuse(Refusal::CircuitOpen { retry_after })),
        };
        let _permit = match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => return Err(self.refuse(Refusal::Saturated)),
        };
        self.spend(caller).await?;

        self.metrics.upstream_in_flight.inc();
        struct InFlight<'a>(&'a Metrics);
        impl Drop for InFlight<'_> {
            fn drop(&mut self) {
                self.0.upstream_in_flight.dec();
            }
        }
        let _in_flight = InFlight(&self.metrics);

        let mut attempt = 0;
        loop {
            let started = Instant::now();
            let left = deadline.saturating_duration_since(started);
            let result = if left.is_zero() {
                Err(UpstreamError::Timeout)
            } else {
                *attempts += 1;
                let call =
                    tracing::Instrument::instrument(mint.mint(form.to_owned()), span.clone());
                tokio::time::timeout(left, call)
                    .await
                    .unwrap_or(Err(UpstreamError::Timeout))
            };
            let health = self.observe(&result, started.elapsed());
            if admitted.record(health) == Some(Change::Opened) {
                tracing::warn!(
                    cooldown_s = self.settings.breaker_cooldown.as_secs_f64(),
                    "circuit breaker open: Truora is failing; misses get 503 until a probe succeeds"
                );
            }
            self.metrics.breaker_state.set(self.breaker.state().gauge());
            let err = match result {
                Ok(token) => return Ok(token),
                Err(e) => e,
            };
            if let (UpstreamError::Throttled { retry_after }, Some(fleet)) =
                (&err, self.fleet.get())
            {
                fleet.metrics.windows.with_label_values(&["local"]).inc();
                fleet.limits.throttled(*retry_after).await;
            }
            let Some(wait) = self.retry_wait(&err, attempt) else {
                return Err(err.into());
            };
            let resume = self
                .throttle_until()
                .map_or(Instant::now() + wait, |t| t.max(Instant::now() + wait));
            if attempt >= self.settings.max_retries || resume >= deadline || self.breaker_open() {
                return Err(err.into());
            }
            self.metrics
                .upstream_retries
                .with_label_values(&[err.outcome()])
                .inc();
            tokio::time::sleep_until(resume).await;
            attempt += 1;
        }
    }

    /// The state for `/readyz` and the gauges.
    pub fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        let heard = lock(&self.heard);
        Snapshot {
            breaker: self.breaker.state(),
            throttled_for: heard
                .throttle_until
                .map_or(Duration::ZERO, |t| t.saturating_duration_since(now)),
            credential_rejected: heard.credential_rejected,
            in_flight: self.settings.max_concurrent as usize - self.permits.available_permits(),
        }
    }

    /// Spends the mint budgets: the fleet's when they are shared and Redis answers, else this
    /// replica's own.
    async fn spend(&self, caller: &str) -> Result<(), BrokerError> {
        if let Some(fleet) = self.fleet.get() {
            let verdict = fleet
                .limits
                .spend(
                    caller,
                    self.budgets.caller_rate(caller),
                    self.settings.mint_rate,
                )
                .await;
            fleet.metrics.fallback.set(i64::from(verdict.is_none()));
            match verdict {
                Some(FleetVerdict::Allowed) => {
                    fleet.metrics.decided("redis", "allowed");
                    return Ok(());
                }
                Some(FleetVerdict::Throttled(left)) => {
                    fleet.metrics.decided("redis", "throttled");
                    open_window(&mut lock(&self.heard), Instant::now() + left);
                    self.metrics
                        .upstream_refused
                        .with_label_values(&["throttled"])
                        .inc();
                    return Err(UpstreamError::Throttled { retry_after: left }.into());
                }
                Some(FleetVerdict::Budget(scope, retry_after)) => {
                    fleet.metrics.decided("redis", scope_label(scope));
                    return Err(self.refuse(Refusal::BudgetExceeded { scope, retry_after }));
                }
                None => {}
            }
        }
        let spent = self.budgets.spend(caller);
        if let Some(fleet) = self.fleet.get() {
            let result = spent
                .err()
                .map_or("allowed", |(scope, _)| scope_label(scope));
            fleet.metrics.decided("local", result);
        }
        spent.map_err(|(scope, retry_after)| {
            self.refuse(Refusal::BudgetExceeded { scope, retry_after })
        })
    }

    /// Shares the mint budgets and the throttle window with the fleet through `limits` from
    /// now on, its series registered in `registry`. Once only: later calls change nothing.
    pub fn share_limits(
        &self,
        limits: Arc<dyn FleetLimits>,
        registry: &prometheus::Registry,
    ) -> prometheus::Result<()> {
        if self.fleet.get().is_some() {
            return Ok(());
        }
        let metrics = Arc::new(FleetMetrics::new(registry)?);
        let _ = self.fleet_metrics.set(Arc::clone(&metrics));
        let _ = self.fleet.set(Fleet { limits, metrics });
        Ok(())
    }

    /// The handle that opens this replica's throttle window from outside (another replica's
    /// 429, heard through Redis).
    pub fn throttle_window(&self) -> ThrottleWindow {
        ThrottleWindow {
            heard: Arc::clone(&self.heard),
            metrics: Arc::clone(&self.fleet_metrics),
        }
    }

    /// Replaces the per-caller budgets (a reload); see [`Budgets::set_caller_rates`].
    pub fn set_caller_rates(&self, rates: &[(Arc<str>, u32)]) {
        self.budgets.set_caller_rates(rates);
    }

    fn refuse(&self, refusal: Refusal) -> BrokerError {
        self.metrics
            .upstream_refused
            .with_label_values(&[refusal.reason()])
            .inc();
        refusal.into()
    }

    /// Inside Truora's Retry-After window, no call goes.
    fn check_throttle(&self) -> Result<(), BrokerError> {
        let now = Instant::now();
        let Some(until) = self.throttle_until().filter(|t| *t > now) else {
            return Ok(());
        };
        self.metrics
            .upstream_refused
            .with_label_values(&["throttled"])
            .inc();
        Err(UpstreamError::Throttled {
            retry_after: until - now,
        }
        .into())
    }

    fn throttle_until(&self) -> Option<Instant> {
        lock(&self.heard).throttle_until
    }

    fn breaker_open(&self) -> bool {
        matches!(self.breaker.state(), BreakerState::Open { .. })
    }

    /// How long to wait before retrying after `err`, or `None` when it must not be retried.
    fn retry_wait(&self, err: &UpstreamError, attempt: u32) -> Option<Duration> {
        let backoff = self.backoff(attempt);
        match err {
            UpstreamError::Unreachable => Some(backoff),
            UpstreamError::Throttled { retry_after } => Some(backoff.max(*retry_after)),
            UpstreamError::ServerError {
                status: 503,
                retry_after,
            } => Some(backoff.max(retry_after.unwrap_or_default())),
            _ => None,
        }
    }

    /// Exponential back-off with jitter: half the step fixed, half random.
    fn backoff(&self, attempt: u32) -> Duration {
        let step = self
            .settings
            .retry_backoff
            .saturating_mul(1 << attempt.min(16))
            .min(self.settings.retry_backoff_max);
        let mut r = [0u8; 4];
        let fraction = if getrandom::fill(&mut r).is_ok() {
            f64::from(u32::from_le_bytes(r)) / f64::from(u32::MAX)
        } else {
            0.5
        };
        step / 2 + step.mul_f64(fraction / 2.0)
    }

    /// Feeds one attempt's outcome to the metrics, the throttle window and the credential state,
    /// and says what it tells of Truora's health (for the breaker).
    fn observe(&self, result: &Result<String, UpstreamError>, took: Duration) -> Health {
        let outcome = result
            .as_ref()
            .map_or_else(UpstreamError::outcome, |_| "ok");
        self.metrics
            .upstream_requests
            .with_label_values(&[outcome])
            .inc();
        self.metrics.upstream_duration.observe(took.as_secs_f64());

        let now = Instant::now();
        let mut heard = lock(&self.heard);
        match result {
            Ok(_) => {
                self.metrics.upstream_succeeded();
                if heard.credential_rejected {
                    heard.credential_rejected = false;
                    self.metrics.credential_rejected.set(0);
                    tracing::info!("Truora accepts the master API key again");
                }
                Health::Up
            }
            Err(UpstreamError::Throttled { retry_after }) => {
                open_window(&mut heard, now + *retry_after);
                Health::Unknown
            }
            Err(UpstreamError::CredentialRejected { status }) => {
                self.credential_rejected(&mut heard, *status, now);
                Health::Unknown
            }
            Err(UpstreamError::Rejected { .. }) => Health::Unknown,
            Err(
                UpstreamError::ServerError { .. }
                | UpstreamError::BadResponse { .. }
                | UpstreamError::Timeout
                | UpstreamError::Unreachable
                | UpstreamError::ConnectionLost,
            ) => Health::Down,
        }
    }

    fn credential_rejected(&self, heard: &mut Heard, status: u16, now: Instant) {
        heard.credential_rejected = true;
        self.metrics.credential_rejected.set(1);
        let due = heard
            .credential_logged
            .is_none_or(|t| now.saturating_duration_since(t) >= CREDENTIAL_LOG_EVERY);
        if due {
            tracing::error!(
                status,
                suppressed = heard.credential_suppressed,
                "Truora rejected the broker's master API key: check upstream.api_key_file / TRUORA_API_KEY"
            );
            heard.credential_logged = Some(now);
            heard.credential_suppressed = 0;
        } else {
            heard.credential_suppressed += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::BudgetScope;
    use crate::upstream::MintFuture;
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Answers from a script, one per call; `Ok` once the script is spent.
    struct Scripted {
        answers: Mutex<VecDeque<Result<String, UpstreamError>>>,
        calls: AtomicUsize,
        delay: Duration,
    }

    impl Scripted {
        fn new(answers: Vec<Result<String, UpstreamError>>) -> Self {
            Self {
                answers: Mutex::new(answers.into()),
                calls: AtomicUsize::new(0),
                delay: Duration::ZERO,
            }
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl Mint for Scripted {
        fn mint(&self, _: String) -> MintFuture {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let answer = lock(&self.answers)
                .pop_front()
                .unwrap_or_else(|| Ok("token".into()));
            let delay = self.delay;
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                answer
            })
        }
    }

    fn settings() -> GuardSettings {
        GuardSettings {
            timeout: Duration::from_secs(5),
            deadline: Duration::from_secs(10),
            max_retries: 2,
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(2),
            breaker_threshold: 3,
            breaker_cooldown: Duration::from_secs(10),
            max_concurrent: 64,
            mint_rate: 1000,
            caller_rates: vec![],
        }
    }

    fn guard(s: GuardSettings) -> Guard {
        Guard::new(
            s,
            Arc::new(Metrics::new(prometheus::Registry::new()).unwrap()),
        )
    }

    fn server_error() -> Result<String, UpstreamError> {
        Err(UpstreamError::ServerError {
            status: 500,
            retry_after: None,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_connect_failure_is_retried_with_backoff() {
        let p = guard(settings());
        let m = Scripted::new(vec![Err(UpstreamError::Unreachable)]);
        let started = Instant::now();
        assert_eq!(p.call("c", &m, "").await.unwrap(), "token");
        assert_eq!(m.calls(), 2);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(50) && waited <= Duration::from_millis(100),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_at_max_retries() {
        let p = guard(settings());
        let m = Scripted::new(vec![Err(UpstreamError::Unreachable); 5]);
        assert_eq!(
            p.call("c", &m, "").await.unwrap_err().code(),
            "upstream_unreachable"
        );
        assert_eq!(m.calls(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_or_lost_connection_after_sending_is_not_retried() {
        let p = guard(settings());
        for err in [UpstreamError::Timeout, UpstreamError::ConnectionLost] {
            let m = Scripted::new(vec![Err(err)]);
            p.call("c", &m, "").await.unwrap_err();
            assert_eq!(m.calls(), 1);
        }
        let m = Scripted::new(vec![server_error()]);
        p.call("c", &m, "").await.unwrap_err();
        assert_eq!(m.calls(), 1, "a 500 may have minted: not retried");
    }

    #[tokio::test(start_paused = true)]
    async fn a_503_is_retried_after_its_retry_after() {
        let p = guard(settings());
        let m = Scripted::new(vec![Err(UpstreamError::ServerError {
            status: 503,
            retry_after: Some(Duration::from_secs(3)),
        })]);
        let started = Instant::now();
        p.call("c", &m, "").await.unwrap();
        assert!(started.elapsed() >= Duration::from_secs(3));
        assert_eq!(m.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_beyond_the_deadline_is_not_waited_for() {
        let p = guard(settings());
        let m = Scripted::new(vec![Err(UpstreamError::Throttled {
            retry_after: Duration::from_secs(30),
        })]);
        let started = Instant::now();
        let err = p.call("c", &m, "").await.unwrap_err();
        assert_eq!(err.code(), "upstream_throttled");
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(m.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_caller_never_waits_past_the_deadline() {
        let mut s = settings();
        s.deadline = Duration::from_secs(6);
        let p = guard(s);
        let mut m = Scripted::new(vec![]);
        m.delay = Duration::from_secs(100);
        let started = Instant::now();
        let err = p.call("c", &m, "").await.unwrap_err();
        assert_eq!(err.code(), "upstream_timeout");
        assert!(started.elapsed() <= Duration::from_secs(6));
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_opens_a_throttle_window_that_refuses_calls_until_it_ends() {
        let p = guard(settings());
        let m = Scripted::new(vec![Err(UpstreamError::Throttled {
            retry_after: Duration::from_secs(20),
        })]);
        p.call("c", &m, "").await.unwrap_err();
        let err = p.call("c", &m, "").await.unwrap_err();
        assert_eq!(err.code(), "upstream_throttled");
        assert!(err.retry_after().unwrap() >= 19);
        assert_eq!(m.calls(), 1, "no call inside the window");
        assert!(p.snapshot().throttled_for > Duration::from_secs(19));
        tokio::time::advance(Duration::from_secs(21)).await;
        p.call("c", &m, "").await.unwrap();
        assert_eq!(m.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_open_the_breaker_and_a_probe_closes_it() {
        let p = guard(settings());
        let m = Scripted::new(vec![server_error(), server_error(), server_error()]);
        for _ in 0..3 {
            p.call("c", &m, "").await.unwrap_err();
        }
        assert_eq!(p.snapshot().breaker.name(), "open");
        let err = p.call("c", &m, "").await.unwrap_err();
        assert_eq!(err.code(), "upstream_circuit_open");
        assert!(err.retry_after().unwrap() >= 9);
        assert_eq!(m.calls(), 3, "no call while open");
        tokio::time::advance(Duration::from_secs(11)).await;
        p.call("c", &m, "").await.unwrap();
        assert_eq!(p.snapshot().breaker.name(), "closed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_opens_the_breaker_again() {
        let p = guard(settings());
        let m = Scripted::new(vec![server_error(); 4]);
        for _ in 0..3 {
            p.call("c", &m, "").await.unwrap_err();
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        p.call("c", &m, "").await.unwrap_err();
        assert_eq!(p.snapshot().breaker.name(), "open");
        assert_eq!(m.calls(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_open_breaker_lets_exactly_one_probe_through() {
        let p = Arc::new(guard(settings()));
        let m = Scripted::new(vec![server_error(); 3]);
        for _ in 0..3 {
            p.call("c", &m, "").await.unwrap_err();
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        let mut slow = Scripted::new(vec![]);
        slow.delay = Duration::from_secs(1);
        let slow = Arc::new(slow);
        let probe = {
            let (p, slow) = (Arc::clone(&p), Arc::clone(&slow));
            tokio::spawn(async move { p.call("c", &*slow, "").await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let err = p.call("c", &*slow, "").await.unwrap_err();
        assert_eq!(err.code(), "upstream_circuit_open");
        probe.await.unwrap().unwrap();
        assert_eq!(slow.calls(), 1);
        assert_eq!(p.snapshot().breaker.name(), "closed");
    }

    #[tokio::test(start_paused = true)]
    async fn rejected_requests_and_429s_do_not_open_the_breaker() {
        let p = guard(settings());
        let m = Scripted::new(vec![
            Err(UpstreamError::Rejected { status: 400 }),
            Err(UpstreamError::CredentialRejected { status: 401 }),
            Err(UpstreamError::Rejected { status: 404 }),
            Err(UpstreamError::CredentialRejected { status: 403 }),
        ]);
        for _ in 0..4 {
            p.call("c", &m, "").await.unwrap_err();
        }
        assert_eq!(p.snapshot().breaker.name(), "closed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejected_master_key_is_flagged_until_the_next_success() {
        let p = guard(settings());
        let m = Scripted::new(vec![Err(UpstreamError::CredentialRejected { status: 401 })]);
        let err = p.call("c", &m, "").await.unwrap_err();
        assert_eq!(err.code(), "upstream_credential_rejected");
        assert!(p.snapshot().credential_rejected);
        assert_eq!(p.metrics.credential_rejected.get(), 1);
        p.call("c", &m, "").await.unwrap();
        assert!(!p.snapshot().credential_rejected);
        assert_eq!(p.metrics.credential_rejected.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejected_master_key_is_logged_at_most_once_a_minute() {
        let p = guard(settings());
        let rejected = || Err(UpstreamError::CredentialRejected { status: 401 });
        let m = Scripted::new(vec![rejected(), rejected(), rejected()]);
        for _ in 0..3 {
            p.call("c", &m, "").await.unwrap_err();
        }
        let first_log = lock(&p.heard).credential_logged;
        assert!(first_log.is_some());
        assert_eq!(lock(&p.heard).credential_suppressed, 2);
        tokio::time::advance(Duration::from_secs(61)).await;
        let m = Scripted::new(vec![rejected()]);
        p.call("c", &m, "").await.unwrap_err();
        assert_eq!(lock(&p.heard).credential_suppressed, 0);
        assert!(lock(&p.heard).credential_logged > first_log);
    }

    #[tokio::test(start_paused = true)]
    async fn the_global_mint_budget_refuses_with_429_and_refills() {
        let mut s = settings();
        s.mint_rate = 2;
        let p = guard(s);
        let m = Scripted::new(vec![]);
        p.call("a", &m, "").await.unwrap();
        p.call("b", &m, "").await.unwrap();
        let err = p.call("c", &m, "").await.unwrap_err();
        assert_eq!(err.code(), "mint_budget_exceeded");
        assert_eq!(err.status().as_u16(), 429);
        assert_eq!(m.calls(), 2);
        tokio::time::advance(Duration::from_millis(500)).await;
        p.call("c", &m, "").await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_callers_own_budget_does_not_touch_the_others() {
        let mut s = settings();
        s.caller_rates = vec![("noisy".into(), 1)];
        let p = guard(s);
        let m = Scripted::new(vec![]);
        p.call("noisy", &m, "").await.unwrap();
        let err = p.call("noisy", &m, "").await.unwrap_err();
        assert_eq!(err.code(), "mint_budget_exceeded");
        assert!(err.to_string().contains("this caller's"));
        for _ in 0..10 {
            p.call("quiet", &m, "").await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn calls_beyond_max_concurrent_are_refused_at_once() {
        let mut s = settings();
        s.max_concurrent = 1;
        let p = Arc::new(guard(s));
        let mut m = Scripted::new(vec![]);
        m.delay = Duration::from_secs(1);
        let m = Arc::new(m);
        let first = {
            let (p, m) = (Arc::clone(&p), Arc::clone(&m));
            tokio::spawn(async move { p.call("c", &*m, "").await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(p.snapshot().in_flight, 1);
        let err = p.call("c", &*m, "").await.unwrap_err();
        assert_eq!(err.code(), "upstream_saturated");
        first.await.unwrap().unwrap();
        assert_eq!(p.snapshot().in_flight, 0);
    }

    /// Fleet limits that answer from a script (`None`: Redis could not be asked) and record
    /// the windows they are told of.
    struct FakeFleet {
        verdicts: Mutex<VecDeque<Option<FleetVerdict>>>,
        told: Mutex<Vec<Duration>>,
        asked: Mutex<Vec<(String, Option<u32>, u32)>>,
    }

    impl FakeFleet {
        fn new(verdicts: Vec<Option<FleetVerdict>>) -> Arc<Self> {
            Arc::new(Self {
                verdicts: Mutex::new(verdicts.into()),
                told: Mutex::new(Vec::new()),
                asked: Mutex::new(Vec::new()),
            })
        }
    }

    impl FleetLimits for FakeFleet {
        fn spend<'a>(
            &'a self,
            caller: &'a str,
            caller_rate: Option<u32>,
            global_rate: u32,
        ) -> super::super::fleet::FleetFuture<'a, Option<FleetVerdict>> {
            lock(&self.asked).push((caller.to_owned(), caller_rate, global_rate));
            let v = lock(&self.verdicts)
                .pop_front()
                .unwrap_or(Some(FleetVerdict::Allowed));
            Box::pin(async move { v })
        }

        fn throttled(&self, retry_after: Duration) -> super::super::fleet::FleetFuture<'_, ()> {
            lock(&self.told).push(retry_after);
            Box::pin(async {})
        }
    }

    fn shared_guard(s: GuardSettings, fleet: &Arc<FakeFleet>) -> Guard {
        let g = guard(s);
        let registry = prometheus::Registry::new();
        g.share_limits(Arc::clone(fleet) as Arc<dyn FleetLimits>, &registry)
            .unwrap();
        g
    }

    #[tokio::test(start_paused = true)]
    async fn with_fleet_limits_the_fleet_decides_and_its_refusals_cost_no_call() {
        let mut s = settings();
        s.mint_rate = 1;
        s.caller_rates = vec![("noisy".into(), 7)];
        let fleet = FakeFleet::new(vec![
            Some(FleetVerdict::Allowed),
            Some(FleetVerdict::Allowed),
            Some(FleetVerdict::Budget(
                BudgetScope::Caller,
                Duration::from_millis(300),
            )),
            Some(FleetVerdict::Throttled(Duration::from_secs(20))),
        ]);
        let p = shared_guard(s, &fleet);
        let m = Scripted::new(vec![]);
        // The local global budget (1 a second) is not what decides: the fleet allowed both.
        p.call("noisy", &m, "").await.unwrap();
        p.call("noisy", &m, "").await.unwrap();
        let err = p.call("noisy", &m, "").await.unwrap_err();
        assert_eq!(err.code(), "mint_budget_exceeded");
        assert!(err.to_string().contains("this caller's"));
        let err = p.call("quiet", &m, "").await.unwrap_err();
        assert_eq!(err.code(), "upstream_throttled");
        assert!(err.retry_after().unwrap() >= 19);
        assert_eq!(m.calls(), 2);
        // The window another replica opened is this replica's own now: no fleet call either.
        assert!(p.snapshot().throttled_for > Duration::from_secs(19));
        assert_eq!(
            p.call("quiet", &m, "").await.unwrap_err().code(),
            "upstream_throttled"
        );
        let asked = lock(&fleet.asked).clone();
        assert_eq!(asked.len(), 4);
        assert_eq!(asked[0], ("noisy".to_owned(), Some(7), 1));
        assert_eq!(asked[3], ("quiet".to_owned(), None, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn without_an_answer_from_the_fleet_the_local_budgets_apply_and_say_so() {
        let mut s = settings();
        s.mint_rate = 1;
        let fleet = FakeFleet::new(vec![None, None]);
        let p = shared_guard(s, &fleet);
        let m = Scripted::new(vec![]);
        p.call("c", &m, "").await.unwrap();
        let metrics = p.fleet.get().unwrap().metrics.clone();
        assert_eq!(metrics.fallback.get(), 1);
        let err = p.call("c", &m, "").await.unwrap_err();
        assert_eq!(err.code(), "mint_budget_exceeded", "the local budget of 1");
        assert_eq!(
            metrics
                .decisions
                .with_label_values(&["local", "global_budget"])
                .get(),
            1
        );
        // The fleet answers again, and decides (the local budget is still spent).
        p.call("c", &m, "").await.unwrap();
        assert_eq!(metrics.fallback.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_is_told_to_the_fleet_and_a_window_heard_refuses_here() {
        let fleet = FakeFleet::new(vec![]);
        let p = shared_guard(settings(), &fleet);
        let m = Scripted::new(vec![Err(UpstreamError::Throttled {
            retry_after: Duration::from_secs(30),
        })]);
        p.call("c", &m, "").await.unwrap_err();
        assert_eq!(*lock(&fleet.told), vec![Duration::from_secs(30)]);

        let other = shared_guard(settings(), &FakeFleet::new(vec![]));
        other.throttle_window().open_for(Duration::from_secs(12));
        let err = other.call("c", &m, "").await.unwrap_err();
        assert_eq!(err.code(), "upstream_throttled");
        assert!(err.retry_after().unwrap() >= 11);
        assert_eq!(m.calls(), 1, "no call inside a window heard from the fleet");
        let windows = &other.fleet.get().unwrap().metrics.windows;
        assert_eq!(windows.with_label_values(&["remote"]).get(), 1);
    }

    #[test]
    fn backoff_doubles_within_jitter_and_is_capped() {
        let p = guard(settings());
        for attempt in 0..8 {
            let step = Duration::from_millis(100 * (1 << attempt)).min(Duration::from_secs(2));
            let b = p.backoff(attempt);
            assert!(b >= step / 2 && b <= step, "{attempt}: {b:?}");
        }
    }
}
