//! Criterion benchmarks of the issuance core without sockets, on hits and on misses, and of the
//! whole caller service (every tower layer, no sockets) on a hit.
//!
//! - `core/hit form`: parse + validate + cache key + lookup + answer bytes, one cached key.
//! - `core/hit form, 10k keys`: the same over 10,000 cached keys in turn (cold CPU caches).
//! - `core/hit json`: the same request as JSON.
//! - `core/miss`: a distinct user each time, so single flight, the spawned flight, the entry
//!   and the cache insert, against an upstream that answers at once.
//! - `core/miss, no user`: a request naming no user (never cached, minted inline).
//! - `service/hit`: `caller_service` on a form POST: route, auth (SHA-256 of the secret),
//!   body read, the core, response headers, metrics.
//!
//! Command: `make bench` (or `cargo bench --bench issuance`). Not a test: nothing here fails on a
//! timing.
//!
//! Results and the machine they were measured on: docs/performance.md.

#[path = "support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use std::hint::black_box;
use token_broker::issuance::TokenRequest;
use token_broker::metrics::CacheOutcome;
use token_broker::server::caller_service;
use tower::{Service, ServiceExt};

use support::*;

fn core(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let issuer = issuer(100_000, Arc::default());
    let caller: Arc<str> = CALLER.into();
    let forms: Vec<String> = (0..10_000).map(form).collect();
    runtime.block_on(async {
        for body in forms.iter().map(String::as_bytes).chain([FORM]) {
            let req = TokenRequest::from_form(body).unwrap();
            issuer
                .issue(&caller, &req, &mut CacheOutcome::None)
                .await
                .unwrap();
        }
    });

    let mut g = c.benchmark_group("core");
    g.bench_function("hit form", |b| {
        b.iter(|| {
            let req = TokenRequest::from_form(black_box(FORM)).unwrap();
            let issued = ready(issuer.issue(&caller, &req, &mut CacheOutcome::None)).unwrap();
            black_box(issued.tokens_body(Instant::now()))
        })
    });
    let mut i = 0;
    g.bench_function("hit form, 10k keys", |b| {
        b.iter(|| {
            i = (i + 1) % forms.len();
            let req = TokenRequest::from_form(black_box(forms[i].as_bytes())).unwrap();
            let issued = ready(issuer.issue(&caller, &req, &mut CacheOutcome::None)).unwrap();
            black_box(issued.tokens_body(Instant::now()))
        })
    });
    g.bench_function("hit json", |b| {
        b.iter(|| {
            let req = TokenRequest::from_json(black_box(JSON)).unwrap();
            let issued = ready(issuer.issue(&caller, &req, &mut CacheOutcome::None)).unwrap();
            black_box(issued.tokens_body(Instant::now()))
        })
    });

    // Misses: every iteration names a user never seen before. The cache is bounded, so this
    // also pays for evictions once it is full, as a broker under a stream of misses does.
    let user = AtomicU64::new(1_000_000);
    g.bench_function("miss", |b| {
        b.iter_batched(
            || form(user.fetch_add(1, Ordering::Relaxed)),
            |body| {
                runtime.block_on(async {
                    let req = TokenRequest::from_form(body.as_bytes()).unwrap();
                    let issued = issuer
                        .issue(&caller, &req, &mut CacheOutcome::None)
                        .await
                        .unwrap();
                    black_box(issued.tokens_body(Instant::now()))
                })
            },
            BatchSize::SmallInput,
        )
    });
    let anonymous =
        b"country=CO&flow_id=IPF0a1b2c3d4e5f&redirect_url=https%3A%2F%2Fshop.example%2Fdone";
    g.bench_function("miss, no user", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let req = TokenRequest::from_form(black_box(anonymous)).unwrap();
                let issued = issuer
                    .issue(&caller, &req, &mut CacheOutcome::None)
                    .await
                    .unwrap();
                black_box(issued.tokens_body(Instant::now()))
            })
        })
    });
    g.finish();
}

fn service(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let issuer = issuer(1_000, Arc::default());
    let mut svc = caller_service(
        state(issuer),
        std::sync::Arc::new(token_broker::auth::Peer::default()),
    );
    runtime.block_on(async {
        let r = svc
            .ready()
            .await
            .unwrap()
            .call(post("/v1/tokens", FORM))
            .await;
        assert_eq!(r.unwrap().status(), 200);
    });
    // The body read is bounded by a tokio timer: it needs the runtime's context (not its thread).
    let _context = runtime.enter();
    let mut g = c.benchmark_group("service");
    g.bench_function("hit", |b| {
        b.iter_batched(
            || post("/v1/tokens", FORM),
            |req| {
                let response = ready(svc.call(req)).unwrap();
                assert_eq!(response.status(), 200);
                black_box(response)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group! {
    name = issuance;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(4));
    targets = core, service
}
criterion_main!(issuance);
