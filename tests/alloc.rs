//! Pins the heap allocations of a cache hit: through the issuance core (parse + validate + key +
//! lookup + answer bytes), and through the whole caller service (every tower layer, no sockets).
//!
//! A separate test binary because it installs a counting global allocator. Counts are per thread,
//! so the test harness's other threads do not disturb them. This is a count, not a timing: it
//! belongs in `make test`, and docs/performance.md says what each allocation is for.

#[path = "../benches/support/mod.rs"]
mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::time::Instant;

use token_broker::issuance::TokenRequest;
use token_broker::metrics::CacheOutcome;
use token_broker::server::caller_service;
use tower::Service;

use support::*;

/// Heap allocations of one cache hit through the issuance core, a form body with one escaped
/// field: see docs/performance.md ("Allocations per hit").
const CORE_HIT_ALLOCATIONS: u64 = 2;
/// Heap allocations of one cache hit through `caller_service`, request already built: the core's
/// 2, the response header map's two tables, the boxed future of the innermost service (the core
/// call) and the `X-Request-Id` the broker generates. The observe and panic-guard layers' futures
/// are named types, not boxes, and cost none. See docs/performance.md ("Allocations per hit").
const SERVICE_HIT_ALLOCATIONS: u64 = 6;

/// Counts every allocation and reallocation made by the current thread.
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    // `try_with`: never panic inside the allocator, even while the thread is being torn down.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

// SAFETY: every call is forwarded unchanged to the system allocator; counting touches only a
// const-initialised thread-local `Cell`, which neither allocates nor unwinds.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// Uncounted calls first: the cache's first housekeeping run, after its first 64 reads, sets up its
/// bookkeeping once (about 170 allocations, once per cache); later runs allocate nothing.
const WARM_UP: usize = 100;

/// Allocation counts of `runs` calls of `f`, sorted, after [`WARM_UP`] uncounted calls.
fn per_call(runs: usize, mut f: impl FnMut()) -> Vec<u64> {
    for _ in 0..WARM_UP {
        f();
    }
    let mut counts = Vec::with_capacity(runs);
    for _ in 0..runs {
        let before = allocations();
        f();
        counts.push(allocations() - before);
    }
    counts.sort_unstable();
    counts
}

/// Every call, not only a typical one. The cache's periodic housekeeping (a pass every 128 or so
/// reads) allocates once more when it runs, because the eviction listener that counts
/// `token_broker_cache_evictions_total` has it gather what it evicted: at most one extra
/// allocation, on at most 2% of hits.
fn assert_every_call_made(sorted: &[u64], expected: u64) {
    let extra = sorted.iter().filter(|c| **c > expected).count();
    assert!(
        sorted[0] == expected
            && sorted[sorted.len() - 1] <= expected + 1
            && extra * 50 <= sorted.len(),
        "allocations per hit, fewest {} and most {} of {} ({extra} over {expected}): change the \
         constant (and docs/performance.md) only with a reason",
        sorted[0],
        sorted[sorted.len() - 1],
        sorted.len()
    );
}

#[test]
fn the_counter_sees_allocations() {
    let before = allocations();
    let v = std::hint::black_box(vec![1u8; 10]);
    assert_eq!(allocations() - before, 1);
    drop(v);
}

/// One test for both paths, so that no other test runs (or drops a cache) meanwhile: the cache's
/// concurrent table frees memory through a process-wide epoch collector, and a hit that happens
/// to run another thread's deferred frees would be charged for them.
#[test]
fn a_cache_hit_allocates_a_pinned_small_number_of_times() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // Through the issuance core: parse + validate + key + lookup + answer bytes.
    let issuer = issuer(1_000, Arc::default());
    let caller: Arc<str> = CALLER.into();
    runtime.block_on(async {
        let req = TokenRequest::from_form(FORM).unwrap();
        issuer
            .issue(&caller, &req, &mut CacheOutcome::None)
            .await
            .unwrap();
    });
    let counts = per_call(1_000, || {
        let req = TokenRequest::from_form(FORM).unwrap();
        let issued = ready(issuer.issue(&caller, &req, &mut CacheOutcome::None)).unwrap();
        assert_eq!(issued.cache, CacheOutcome::Hit);
        std::hint::black_box(issued.tokens_body(Instant::now()));
    });
    assert_every_call_made(&counts, CORE_HIT_ALLOCATIONS);

    // Through the whole caller service: route, auth, body, core, headers, metrics.
    let mut service = caller_service(
        state(issuer),
        std::sync::Arc::new(token_broker::auth::Peer::default()),
    );
    let mut requests: Vec<_> = (0..1_000 + WARM_UP)
        .map(|_| post("/v1/tokens", FORM))
        .collect();
    // The body read is bounded by a tokio timer: it needs the runtime's context (not its thread).
    let _context = runtime.enter();
    let counts = per_call(1_000, || {
        let response = ready(service.call(requests.pop().unwrap())).unwrap();
        assert_eq!(response.headers()["x-cache"], "HIT");
        std::hint::black_box(response);
    });
    assert_every_call_made(&counts, SERVICE_HIT_ALLOCATIONS);
}
