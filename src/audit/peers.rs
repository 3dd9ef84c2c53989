//! Rate limits per peer address, so that a flood of bad requests cannot fill the trail:
//!
//! - **Authentication failures** are written only when they repeat: one `auth_failures` event
//!   when a peer reaches [`AUTH_THRESHOLD`] failures within [`WINDOW`], none for the rest of that
//!   window. The exact counts are in `token_broker_auth_failures_total`.
//! - **Refused webhook deliveries** are written one by one, at most [`WEBHOOK_BURST`] per peer
//!   and window; the next one written says how many were left out (`suppressed`).
//!
//! At most [`MAX_PEERS`] addresses are followed at once; windows that have ended are forgotten
//! first, and past the bound a new address is not followed (its events are left out, counted in
//! the metrics as always).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The window of both limits.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Failures of one peer within [`WINDOW`] that make an `auth_failures` event.
pub const AUTH_THRESHOLD: u64 = 5;
/// Refused deliveries of one peer written per [`WINDOW`].
pub const WEBHOOK_BURST: u64 = 5;
/// Addresses followed at once.
pub const MAX_PEERS: usize = 4096;

#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    count: u64,
    /// Left out and not yet reported.
    suppressed: u64,
}

/// One limit's windows, by address.
#[derive(Default)]
pub(super) struct PeerWindows {
    windows: Mutex<HashMap<IpAddr, Window>>,
}

impl PeerWindows {
    /// Counts one event of `peer` at `now` and returns its window as it is now: the count
    /// within the window and the events left out before it (taken: reported once). `None` when
    /// the peer cannot be followed.
    fn count(&self, peer: IpAddr, now: Instant, suppress_after: Option<u64>) -> Option<(u64, u64)> {
        let mut windows = self
            .windows
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if windows.len() >= MAX_PEERS && !windows.contains_key(&peer) {
            windows.retain(|_, w| now.duration_since(w.start) < WINDOW && w.suppressed == 0);
            if windows.len() >= MAX_PEERS {
                return None;
            }
        }
        let w = windows.entry(peer).or_insert(Window {
            start: now,
            count: 0,
            suppressed: 0,
        });
        if now.duration_since(w.start) >= WINDOW {
            w.start = now;
            w.count = 0;
        }
        w.count += 1;
        if suppress_after.is_some_and(|burst| w.count > burst) {
            w.suppressed += 1;
            return Some((w.count, u64::MAX));
        }
        let suppressed = std::mem::take(&mut w.suppressed);
        Some((w.count, suppressed))
    }

    /// One authentication failure of `peer`: `Some(failures)` when an event is due.
    pub(super) fn auth_failure(&self, peer: IpAddr, now: Instant) -> Option<u64> {
        let (count, _) = self.count(peer, now, None)?;
        (count == AUTH_THRESHOLD).then_some(count)
    }

    /// One refused delivery of `peer`: `Some(suppressed before it)` when it is to be written.
    pub(super) fn webhook_refusal(&self, peer: IpAddr, now: Instant) -> Option<u64> {
        let (_, suppressed) = self.count(peer, now, Some(WEBHOOK_BURST))?;
        (suppressed != u64::MAX).then_some(suppressed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn repeated_authentication_failures_make_one_event_per_peer_and_window() {
        let w = PeerWindows::default();
        let t = Instant::now();
        let due: Vec<_> = (0..20).filter_map(|_| w.auth_failure(ip(1), t)).collect();
        assert_eq!(due, [AUTH_THRESHOLD]);
        // Another peer has its own count; a single failure is not "repeated".
        assert_eq!(w.auth_failure(ip(2), t), None);
        // The next window starts again.
        let later = t + WINDOW;
        let due: Vec<_> = (0..AUTH_THRESHOLD)
            .filter_map(|_| w.auth_failure(ip(1), later))
            .collect();
        assert_eq!(due, [AUTH_THRESHOLD]);
    }

    #[test]
    fn refused_deliveries_are_written_up_to_a_burst_then_reported_as_suppressed() {
        let w = PeerWindows::default();
        let t = Instant::now();
        let written: Vec<_> = (0..12)
            .filter_map(|_| w.webhook_refusal(ip(1), t))
            .collect();
        assert_eq!(written, vec![0; WEBHOOK_BURST as usize]);
        // The first one written in the next window says how many were left out.
        assert_eq!(
            w.webhook_refusal(ip(1), t + WINDOW),
            Some(12 - WEBHOOK_BURST)
        );
        assert_eq!(w.webhook_refusal(ip(1), t + WINDOW), Some(0));
    }

    #[test]
    fn past_the_bound_ended_windows_make_room_and_new_peers_are_not_followed() {
        let w = PeerWindows::default();
        let t = Instant::now();
        for n in 0..MAX_PEERS {
            let peer = IpAddr::from([10, (n >> 16) as u8, (n >> 8) as u8, n as u8]);
            w.auth_failure(peer, t);
        }
        let newcomer = IpAddr::from([192, 0, 2, 1]);
        assert!(w.count(newcomer, t, None).is_none());
        assert!(w.count(newcomer, t + WINDOW, None).is_some());
    }
}
