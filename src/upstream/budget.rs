//! Mint budgets: token buckets ([`crate::rate`]) of `mint_rate` mints a second, one global
//! (`upstream.mint_rate`) and one per caller that has its own (`[[clients]] mint_rate`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::BudgetScope;
use crate::rate::Bucket;

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

    /// `caller`'s own rate a second, when it has one.
    pub fn caller_rate(&self, caller: &str) -> Option<u32> {
        lock(&self.callers)
            .get(caller)
            .map(|b| b.rate().round() as u32)
    }

    /// Replaces the per-caller budgets (a reload); callers whose rate is unchanged keep their
    /// bucket, so a reload does not refill anyone's budget.
    pub fn set_caller_rates(&self, rates: &[(Arc<str>, u32)]) {
        let mut callers = lock(&self.callers);
        let mut fresh = buckets(rates, Instant::now());
        for (id, bucket) in fresh.iter_mut() {
            if let Some(old) = callers.remove(id) {
                if old.rate() == bucket.rate() {
                    *bucket = old;
                }
            }
        }
        *callers = fresh;
    }
}
