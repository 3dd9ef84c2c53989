//! Per-request observation: the request id and the access log.
//!
//! - **Request id**: an incoming `X-Request-Id` is kept when it is 1 to 64 characters of
//!   `A-Z a-z 0-9 . _ : -` (anything else could be a way to smuggle text into the logs, and 64
//!   characters is room for a UUID or a W3C trace id but not for a token); otherwise the broker
//!   makes one: a random per-process prefix and a counter, no system call per request. Either
//!   way it is sent back on the response and written on the access line.
//! - **Note**: what the layers below learn about a request that the access line and the
//!   per-caller series need (the caller, what the cache did) is noted in a task-local set up by
//!   the `Observe` layer around each request. Outside that scope (benchmarks, tests of the core)
//!   noting does nothing.
//! - **Access line**: one `info` event per caller API request, target `access`, with the
//!   request id, caller id, route, status, cache result and latency. Never a path, query, header
//!   or body: no token, secret, email or phone can reach it. `RUST_LOG=info,access=off` turns it
//!   off.

use std::cell::Cell;
use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;

use crate::metrics::CallerCache;

/// The target of the access line's event (`RUST_LOG=info,access=off` turns it off).
pub const TARGET: &str = "access";
/// `X-Request-Id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The longest incoming request id kept.
pub const MAX_REQUEST_ID_LEN: usize = 64;

/// What the cache did for a request, as the access line says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheNote {
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

impl CacheNote {
    /// The access line's `cache` field.
    pub fn label(self) -> &'static str {
        match self {
            CacheNote::None => "-",
            CacheNote::Hit => "hit",
            CacheNote::Miss => "miss",
            CacheNote::Coalesced => "coalesced",
            CacheNote::Uncacheable => "uncacheable",
        }
    }

    /// The `cache` label of `token_broker_caller_requests_total`.
    pub fn caller_cache(self) -> CallerCache {
        match self {
            CacheNote::None => CallerCache::None,
            CacheNote::Hit => CallerCache::Hit,
            CacheNote::Miss | CacheNote::Coalesced => CallerCache::Miss,
            CacheNote::Uncacheable => CallerCache::Uncacheable,
        }
    }
}

/// What is known about the request being answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Note {
    /// The caller's slot in [`crate::metrics::Metrics::caller_slot`], once known.
    pub caller: Option<usize>,
    /// What the cache did.
    pub cache: CacheNote,
}

tokio::task_local! {
    static NOTE: Cell<Note>;
}

/// Notes the authenticated caller of the current request (its metrics slot).
pub fn note_caller(slot: usize) {
    let _ = NOTE.try_with(|n| {
        n.set(Note {
            caller: Some(slot),
            ..n.get()
        })
    });
}

/// Notes what the cache did for the current request (the caller was noted when it
/// authenticated).
pub fn note_cache(cache: CacheNote) {
    let _ = NOTE.try_with(|n| n.set(Note { cache, ..n.get() }));
}

/// Runs `f` (the synchronous part of a request: building its future) with a fresh note, and
/// returns what it noted.
pub fn sync_scope<R>(f: impl FnOnce() -> R) -> (R, Note) {
    NOTE.sync_scope(Cell::new(Note::default()), || {
        let r = f();
        (r, NOTE.with(Cell::get))
    })
}

/// A request's future run with its note as the current one: see [`scope`].
pub type Scoped<F> = tokio::task::futures::TaskLocalFuture<Cell<Note>, F>;

/// Runs `fut` with `note` as the current request's note: each poll of the returned future
/// polls `fut` with the note current, so what `fut` notes meanwhile adds to it. Once it is
/// done, [`take_note`] says what was noted by its end.
pub fn scope<F: Future>(note: Note, fut: F) -> Scoped<F> {
    NOTE.scope(Cell::new(note), fut)
}

/// What was noted by the end of `scoped` (see [`scope`]), taken out of it: call it once, after
/// `scoped` is done (a second call sees the default note; a call while it runs ends its noting).
pub fn take_note<F>(scoped: Pin<&mut Scoped<F>>) -> Note {
    scoped
        .take_value()
        .map(Cell::into_inner)
        .unwrap_or_default()
}

/// The access line of one caller API request.
#[derive(Debug, Clone, Copy)]
pub struct AccessLine<'a> {
    /// The request id (kept or made, see [`request_id`]).
    pub request_id: &'a str,
    /// The authenticated caller's id, `-` when none.
    pub caller: &'a str,
    /// The route's label.
    pub route: &'a str,
    /// The answer's status.
    pub status: u16,
    /// What the cache did.
    pub cache: CacheNote,
    /// From the request's arrival to its answer.
    pub latency: std::time::Duration,
}

impl AccessLine<'_> {
    /// Logs the line: one `info` event, target `access`.
    pub fn log(&self) {
        tracing::info!(
            target: TARGET,
            request_id = %self.request_id,
            caller = %self.caller,
            route = %self.route,
            status = self.status,
            cache = %self.cache.label(),
            latency_us = self.latency.as_micros() as u64,
            "request"
        );
    }
}

fn prefix() -> &'static str {
    static PREFIX: OnceLock<String> = OnceLock::new();
    PREFIX.get_or_init(|| {
        let mut raw = [0u8; 6];
        if getrandom::fill(&mut raw).is_err() {
            // No randomness: the start time still tells processes apart.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            raw.copy_from_slice(&nanos.to_le_bytes()[..6]);
        }
        crate::secret::hex(&raw)
    })
}

/// True when `value` may be used as a request id as it came.
pub fn acceptable(value: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&value.len())
        && value
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// A new request id: `<12 hex digits of this process>-<counter>`.
pub fn generate() -> HeaderValue {
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut buf = [0u8; 40];
    let len = {
        let mut w = &mut buf[..];
        // 12 + 1 + at most 20 digits fits in 40 bytes.
        let _ = write!(w, "{}-{n}", prefix());
        40 - w.len()
    };
    HeaderValue::from_bytes(&buf[..len]).unwrap_or(HeaderValue::from_static("-"))
}

/// The request's id: its own `X-Request-Id` when acceptable, else a new one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    match headers.get(&X_REQUEST_ID) {
        Some(v) if acceptable(v.as_bytes()) => v.clone(),
        _ => generate(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_well_formed_incoming_id_is_kept() {
        let mut h = HeaderMap::new();
        for id in [
            "3f2c9a1e-7b4d-4c2a-9e1f-0a1b2c3d4e5f",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "req.42:a_b",
        ] {
            h.insert(&X_REQUEST_ID, HeaderValue::from_static(id));
            assert_eq!(request_id(&h), id);
        }
    }

    #[test]
    fn an_unsafe_or_oversized_incoming_id_is_replaced() {
        let mut h = HeaderMap::new();
        let long = "a".repeat(MAX_REQUEST_ID_LEN + 1);
        for bad in [
            "",
            "has space",
            "quote\"d",
            "user@example.com",
            "+573100000000",
            "a=b",
            long.as_str(),
        ] {
            h.insert(&X_REQUEST_ID, HeaderValue::from_str(bad).unwrap());
            let id = request_id(&h);
            assert_ne!(id, bad);
            assert!(id.to_str().unwrap().starts_with(prefix()), "{id:?}");
        }
        assert!(acceptable("a".repeat(MAX_REQUEST_ID_LEN).as_bytes()));
    }

    #[test]
    fn generated_ids_are_distinct_acceptable_and_share_the_process_prefix() {
        let ids: std::collections::HashSet<String> = (0..1000)
            .map(|_| request_id(&HeaderMap::new()).to_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            assert!(acceptable(id.as_bytes()), "{id}");
            let (p, n) = id.split_once('-').unwrap();
            assert_eq!(p.len(), 12);
            assert_eq!(p, prefix());
            assert!(n.parse::<u64>().is_ok());
        }
    }

    /// `fut` run in a [`scope`] of `note`, and what was noted by its end.
    async fn scoped<T>(note: Note, fut: impl Future<Output = T>) -> (T, Note) {
        let mut scoped = std::pin::pin!(scope(note, fut));
        let out = scoped.as_mut().await;
        (out, take_note(scoped))
    }

    #[tokio::test]
    async fn notes_reach_the_scope_and_nothing_happens_outside_one() {
        note_cache(CacheNote::Hit); // outside any scope: ignored, no panic
        let ((), n) = sync_scope(|| note_caller(1));
        assert_eq!(n.caller, Some(1));
        let ((), n) = scoped(n, async {
            tokio::task::yield_now().await;
            note_cache(CacheNote::Coalesced);
        })
        .await;
        assert_eq!(
            n,
            Note {
                caller: Some(1),
                cache: CacheNote::Coalesced
            }
        );
        let ((), n) = scoped(Note::default(), async {}).await;
        assert_eq!(n, Note::default());
    }
}
