//! Limits shared by the fleet (`cache.shared.fleet_limits`): the mint budgets decided for every
//! replica at once, and Truora's throttle window told to every replica.
//!
//! The guard sees them only through [`FleetLimits`], which the composition root backs with the
//! Redis tier. When the fleet cannot be asked (Redis down, its breaker open), the guard applies
//! its own local budgets, as a broker without a shared tier does, and
//! `token_broker_fleet_limits_fallback` says so.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

use crate::error::BudgetScope;

/// What the fleet said about one mint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetVerdict {
    /// Within every budget: mint.
    Allowed,
    /// Truora's throttle window, opened by some replica, is open for this long still.
    Throttled(Duration),
    /// This budget is spent across the fleet; room again after the duration.
    Budget(BudgetScope, Duration),
}

/// A future of [`FleetLimits`].
pub type FleetFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Budgets and the throttle window, shared by every replica.
pub trait FleetLimits: Send + Sync + 'static {
    /// Spends one mint of `caller`'s budget (`caller_rate` a second, when it has one) and of the
    /// global one (`global_rate`) for the whole fleet, in one atomic step; `None` when the fleet
    /// could not be asked.
    fn spend<'a>(
        &'a self,
        caller: &'a str,
        caller_rate: Option<u32>,
        global_rate: u32,
    ) -> FleetFuture<'a, Option<FleetVerdict>>;

    /// Tells every replica that Truora throttled this one for `retry_after`.
    fn throttled(&self, retry_after: Duration) -> FleetFuture<'_, ()>;
}

/// The series of the fleet limits, registered only when they are on.
pub(super) struct FleetMetrics {
    pub(super) decisions: IntCounterVec,
    pub(super) fallback: IntGauge,
    pub(super) windows: IntCounterVec,
}

impl FleetMetrics {
    pub(super) fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            decisions: IntCounterVec::new(
                Opts::new(
                    "token_broker_fleet_limit_decisions_total",
                    "Mint budget decisions, by where they were taken (redis: for the whole fleet; local: this replica alone, Redis could not be asked) and result (allowed, throttled, caller_budget, global_budget).",
                ),
                &["source", "result"],
            )?,
            fallback: IntGauge::new(
                "token_broker_fleet_limits_fallback",
                "1 while this replica applies its own local limits because Redis could not be asked for the fleet's, else 0.",
            )?,
            windows: IntCounterVec::new(
                Opts::new(
                    "token_broker_fleet_throttle_windows_total",
                    "Truora throttle windows shared through Redis, by origin (local: this replica's 429, told to the fleet; remote: opened here by another replica's).",
                ),
                &["origin"],
            )?,
        };
        registry.register(Box::new(m.decisions.clone()))?;
        registry.register(Box::new(m.fallback.clone()))?;
        registry.register(Box::new(m.windows.clone()))?;
        for source in ["redis", "local"] {
            for result in ["allowed", "throttled", "caller_budget", "global_budget"] {
                m.decisions.with_label_values(&[source, result]);
            }
        }
        for origin in ["local", "remote"] {
            m.windows.with_label_values(&[origin]);
        }
        Ok(m)
    }

    pub(super) fn decided(&self, source: &str, result: &str) {
        self.decisions.with_label_values(&[source, result]).inc();
    }
}

/// The label of a refused budget.
pub(super) fn scope_label(scope: BudgetScope) -> &'static str {
    match scope {
        BudgetScope::Caller => "caller_budget",
        BudgetScope::Global => "global_budget",
    }
}
