//! The circuit breaker: one kind for both things the broker can stop calling for a while, Truora
//! (a miss's mint, `upstream.breaker_*`) and the Redis tier (`cache.shared.breaker_*`).
//!
//! - **Closed**: calls go through; `threshold` consecutive failures open it.
//! - **Open**: no call until `cooldown` has passed; a failure seen meanwhile (a call that was
//!   already in flight) pushes the end further.
//! - **Half-open**: one probe call is let through; its success closes the breaker, its failure
//!   opens it again for a cooldown. Other calls are refused while the probe is out; a probe that
//!   ends without an outcome (cancelled) frees its place for the next one.
//!
//! An answer that says nothing about health (Truora's 429 or another 4xx) leaves a closed or open
//! breaker as it is, and closes a half-open one: what was called did answer. Time is tokio's, so
//! tests run on a paused clock.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

/// Where the breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through; `failures` consecutive ones have failed.
    Closed { failures: u32 },
    /// No calls until `until`.
    Open { until: Instant },
    /// One probe call may go; `probing` while it is out.
    HalfOpen { probing: bool },
}

impl BreakerState {
    /// `closed`, `open` or `half_open`, for `/readyz` and the status page.
    pub fn name(&self) -> &'static str {
        match self {
            BreakerState::Closed { .. } => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen { .. } => "half_open",
        }
    }

    /// The value of a `*_breaker_state` gauge: 0 closed, 1 half-open, 2 open.
    pub fn gauge(&self) -> i64 {
        match self {
            BreakerState::Closed { .. } => 0,
            BreakerState::HalfOpen { .. } => 1,
            BreakerState::Open { .. } => 2,
        }
    }
}

/// What one call's outcome says about the health of what was called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// It answered sensibly.
    Up,
    /// It failed: an error, a timeout, no connection, an unusable answer.
    Down,
    /// It answered, but the answer says nothing about its health (a 429, a 4xx).
    Unknown,
}

/// A change worth telling an operator about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The breaker opened: calls are refused for a cooldown.
    Opened,
    /// The breaker closed after being open or half-open.
    Closed,
}

/// A circuit breaker; see the module docs.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<BreakerState>,
}

impl Breaker {
    /// A closed breaker that opens after `threshold` consecutive failures, for `cooldown`.
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            state: Mutex::new(BreakerState::Closed { failures: 0 }),
        }
    }

    /// How long it stays open.
    pub fn cooldown(&self) -> Duration {
        self.cooldown
    }

    /// The state now.
    pub fn state(&self) -> BreakerState {
        *self.lock()
    }

    /// May a call go now? `Err` with the time to wait when not. The call's outcome is given to
    /// [`Admitted::record`].
    pub fn admit(&self) -> Result<Admitted<'_>, Duration> {
        let now = Instant::now();
        let mut st = self.lock();
        let probe = match *st {
            BreakerState::Closed { .. } => false,
            BreakerState::Open { until } if now < until => return Err(until - now),
            BreakerState::Open { .. } | BreakerState::HalfOpen { probing: false } => {
                *st = BreakerState::HalfOpen { probing: true };
                true
            }
            // A probe is out: come back in a moment.
            BreakerState::HalfOpen { probing: true } => return Err(Duration::from_secs(1)),
        };
        Ok(Admitted {
            breaker: self,
            probe,
        })
    }

    /// Feeds one outcome to the breaker; says whether it opened or closed.
    pub fn record(&self, health: Health) -> Option<Change> {
        let now = Instant::now();
        let mut st = self.lock();
        let before = *st;
        *st = match (before, health) {
            (_, Health::Up) | (BreakerState::HalfOpen { .. }, Health::Unknown) => {
                BreakerState::Closed { failures: 0 }
            }
            (state, Health::Unknown) => state,
            (BreakerState::Closed { failures }, Health::Down) if failures + 1 < self.threshold => {
                BreakerState::Closed {
                    failures: failures + 1,
                }
            }
            (BreakerState::Open { until }, Health::Down) => BreakerState::Open {
                until: until.max(now + self.cooldown),
            },
            (_, Health::Down) => BreakerState::Open {
                until: now + self.cooldown,
            },
        };
        let was_closed = matches!(before, BreakerState::Closed { .. });
        match (*st, was_closed) {
            (BreakerState::Open { .. }, _) if !matches!(before, BreakerState::Open { .. }) => {
                Some(Change::Opened)
            }
            (BreakerState::Closed { .. }, false) => Some(Change::Closed),
            _ => None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, BreakerState> {
        // Every update is one assignment: a panic elsewhere cannot leave it half-made.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A call the breaker let through. Dropped without an outcome (the call was cancelled), a probe
/// frees its place so that the next call may probe.
#[derive(Debug)]
pub struct Admitted<'a> {
    breaker: &'a Breaker,
    probe: bool,
}

impl Admitted<'_> {
    /// Feeds this call's outcome (or one attempt's, when a call retries) to the breaker.
    pub fn record(&mut self, health: Health) -> Option<Change> {
        self.probe = false;
        self.breaker.record(health)
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if self.probe {
            let mut st = self.breaker.lock();
            if let BreakerState::HalfOpen { probing: true } = *st {
                *st = BreakerState::HalfOpen { probing: false };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn it_opens_after_the_threshold_and_a_probe_closes_it() {
        let b = Breaker::new(3, Duration::from_secs(10));
        for _ in 0..2 {
            assert_eq!(b.admit().unwrap().record(Health::Down), None);
        }
        assert_eq!(b.state(), BreakerState::Closed { failures: 2 });
        assert_eq!(
            b.admit().unwrap().record(Health::Down),
            Some(Change::Opened)
        );
        assert_eq!(b.admit().unwrap_err(), Duration::from_secs(10));
        tokio::time::advance(Duration::from_secs(10)).await;
        let mut probe = b.admit().unwrap();
        assert_eq!(b.state(), BreakerState::HalfOpen { probing: true });
        assert!(b.admit().is_err(), "one probe at a time");
        assert_eq!(probe.record(Health::Up), Some(Change::Closed));
        assert_eq!(b.state().gauge(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_opens_it_again_and_a_cancelled_one_frees_its_place() {
        let b = Breaker::new(1, Duration::from_secs(5));
        b.admit().unwrap().record(Health::Down);
        tokio::time::advance(Duration::from_secs(5)).await;
        drop(b.admit().unwrap());
        assert_eq!(b.state(), BreakerState::HalfOpen { probing: false });
        assert_eq!(
            b.admit().unwrap().record(Health::Down),
            Some(Change::Opened)
        );
        assert_eq!(b.state().name(), "open");
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_that_says_nothing_closes_only_a_half_open_breaker() {
        let b = Breaker::new(2, Duration::from_secs(5));
        b.admit().unwrap().record(Health::Down);
        b.admit().unwrap().record(Health::Unknown);
        assert_eq!(b.state(), BreakerState::Closed { failures: 1 });
        b.admit().unwrap().record(Health::Down);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            b.admit().unwrap().record(Health::Unknown),
            Some(Change::Closed)
        );
    }
}
