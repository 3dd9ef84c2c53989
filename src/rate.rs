//! Token buckets: `rate` a second, bursts of up to one second's worth. One per key, made on
//! first use ([`KeyedBuckets`]), for limits kept per caller; the mint budgets and the `DELETE`
//! rate are built from them. Time is tokio's, so tests run on a paused clock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

/// One bucket.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket of `rate` a second (at least 1).
    pub fn new(rate: u32, now: Instant) -> Self {
        let rate = f64::from(rate.max(1));
        Self {
            rate,
            burst: rate,
            tokens: rate,
            last: now,
        }
    }

    /// Its rate a second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Takes one token, or says how long until one is there.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
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

/// A bucket per key, all of one rate, made full on a key's first use. Buckets full again (idle
/// for a second or more) are let go when the map grows, so the map stays as large as the keys
/// in use.
pub struct KeyedBuckets {
    rate: u32,
    buckets: Mutex<HashMap<Arc<str>, Bucket>>,
}

/// Keys held before idle buckets are let go.
const PRUNE_ABOVE: usize = 1024;

impl KeyedBuckets {
    /// Buckets of `rate` a second per key.
    pub fn new(rate: u32) -> Self {
        Self {
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token from `key`'s bucket, or says how long until one is there.
    pub fn take(&self, key: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = lock(&self.buckets);
        if buckets.len() > PRUNE_ABOVE {
            buckets.retain(|_, b| now.saturating_duration_since(b.last) < Duration::from_secs(1));
        }
        match buckets.get_mut(key) {
            Some(bucket) => bucket.take(now),
            None => {
                let mut bucket = Bucket::new(self.rate, now);
                let taken = bucket.take(now);
                buckets.insert(key.into(), bucket);
                taken
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A bucket is updated in one step: a panic elsewhere cannot leave it half-made.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let mut b = Bucket::new(2, Instant::now());
        assert!(b.take(Instant::now()).is_ok());
        assert!(b.take(Instant::now()).is_ok());
        let wait = b.take(Instant::now()).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        tokio::time::advance(wait).await;
        assert!(b.take(Instant::now()).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn each_key_has_its_own_bucket() {
        let k = KeyedBuckets::new(1);
        assert!(k.take("a").is_ok());
        assert!(k.take("a").is_err());
        assert!(k.take("b").is_ok());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(k.take("a").is_ok());
    }
}
