//! Mint budgets: token buckets of `mint_rate` mints a second (bursts of up to one second's worth),
//! one global (`upstream.mint_rate`) and one per caller that has its own (`[[clients]]
//! mint_rate`). Time is tokio's, so tests run on a paused clock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::BudgetScope;

struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u32, now: Instant) -> Self {
        let rate = f64::from(rate.max(1));
        Self {
            rate,
            burst: rate.max(1.0),
            tokens: rate.max(1.0),
            last: now,
        }
    }

    /// Takes one token, or says how long until one is there.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

/// The global budget and the callers' own.
pub struct Budgets {
    global: Mutex<Bucket>,
    callers: Mutex<HashMap<Arc<str>, Bucket>>,
}

fn buckets(rates: &[(Arc<str>, u32)], now: Instant) -> HashMap<Arc<str>, Bucket> {
    rates
        .iter()
        .map(|(id, rate)| (Arc::clone(id), Bucket::new(*rate, now)))
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A bucket is updated in one await-free step: a panic elsewhere cannot leave it half-made.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Budgets {
    /// Full budgets: `global` mints a second for all, and each caller's own rate.
    pub fn new(global: u32, callers: &[(Arc<str>, u32)]) -> Self {
        let now = Instant::now();
        Self {
            global: Mutex::new(Bucket::new(global, now)),
            callers: Mutex::new(buckets(callers, now)),
        }
    }

    /// Spends one mint of `caller`'s budget (when it has one) and of the global one; when either
    /// is spent, says whose and how long until there is room again.
    pub fn spend(&self, caller: &str) -> Result<(), (BudgetScope, Duration)> {
        let now = Instant::now();
        if let Some(bucket) = lock(&self.callers).get_mut(caller) {
            bucket
                .take(now)
                .map_err(|wait| (BudgetScope::Caller, wait))?;
        }
        lock(&self.global)
            .take(now)
            .map_err(|wait| (BudgetScope::Global, wait))
    }

    /// Replaces the per-caller budgets (a reload); callers whose rate is unchanged keep their
    /// bucket, so a reload does not refill anyone's budget.
    pub fn set_caller_rates(&self, rates: &[(Arc<str>, u32)]) {
        let mut callers = lock(&self.callers);
        let mut fresh = buckets(rates, Instant::now());
        for (id, bucket) in fresh.iter_mut() {
            if let Some(old) = callers.remove(id) {
                if old.rate == bucket.rate {
                    *bucket = old;
                }
            }
        }
        *callers = fresh;
    }
}
