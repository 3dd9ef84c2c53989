//! Criterion benchmarks of the issuance core without sockets: the whole cache-hit path (parse,
//! validate, key, lookup, answer bytes) and its parts.
//!
//! Run: `make bench` (or `cargo bench --bench issuance`). Results are machine-dependent; the
//! performance work records its tables in docs/performance.md. This file is not a test:
//! nothing here fails on a timing.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use base64::Engine;
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use token_broker::cache;
use token_broker::config::ArrayEncoding;
use token_broker::issuance::{Issuer, IssuerSettings};
use token_broker::metrics::Metrics;
use token_broker::request::TokenRequest;
use token_broker::resilience::{Policy, ResilienceSettings};
use token_broker::token;
use token_broker::upstream::{Mint, MintFuture};

const FORM: &[u8] =
    b"country=CO&flow_id=IPF0a1b2c3d4e5f&redirect_url=https%3A%2F%2Fshop.example%2Fdone&account_id=user-4242";

fn jwt() -> String {
    let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.c2lnbmF0dXJl",
        e.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
        e.encode(r#"{"account_id":"user-4242","exp":1800007200,"iat":1800000000,"jti":"abc","key_type":"web"}"#)
    )
}

struct Instant200;
impl Mint for Instant200 {
    fn mint(&self, _form: String) -> MintFuture {
        let t = jwt();
        Box::pin(async move { Ok(t) })
    }
}

/// Polls a future that is expected to be ready at once (a cache hit never awaits).
fn now<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a hit should not wait"),
    }
}

fn benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let metrics = Arc::new(Metrics::new(prometheus::Registry::new()).unwrap());
    let issuer = Issuer::new(
        IssuerSettings {
            min_remaining: Duration::from_secs(900),
            max_entries: 100_000,
            web_url: "https://identity.truora.com".into(),
            array_encoding: ArrayEncoding::Repeat,
        },
        Arc::new(Instant200),
        Policy::new(
            ResilienceSettings::from_config(&Default::default()),
            Arc::clone(&metrics),
        ),
        metrics,
    );
    let caller: Arc<str> = "checkout".into();
    // Fill the cache with the benchmarked entry.
    runtime.block_on(async {
        let req = TokenRequest::from_form(FORM).unwrap();
        issuer.issue(&caller, &req).await.unwrap();
    });

    c.bench_function("hit: parse + validate + key + lookup + answer", |b| {
        b.iter(|| {
            let req = TokenRequest::from_form(black_box(FORM)).unwrap();
            let issued = now(issuer.issue(&caller, &req)).unwrap();
            black_box(issued.tokens_body(Instant::now()))
        })
    });
    c.bench_function("form parse + validate", |b| {
        b.iter(|| black_box(TokenRequest::from_form(black_box(FORM)).unwrap()))
    });
    let req = TokenRequest::from_form(FORM).unwrap();
    c.bench_function("cache key", |b| {
        b.iter(|| black_box(cache::key(black_box("checkout"), &req)))
    });
    let t = jwt();
    c.bench_function("jwt claims lifetime", |b| {
        b.iter(|| black_box(token::lifetime(black_box(&t))))
    });
}

criterion_group!(issuance, benches);
criterion_main!(issuance);
