//! Criterion benchmarks of the pieces of the hot path, each alone: the form parser, the JSON
//! parser, the cache-key builder, the answer renderer, the JWT-claims reader and the access
//! line (the broker's format against tracing-subscriber's).
//!
//! Command: `make bench` (or `cargo bench --bench parts`). Not a test: nothing here fails on a
//! timing.
//!
//! Results and the machine they were measured on: docs/performance.md.

#[path = "support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use token_broker::issuance::key::key;
use token_broker::issuance::TokenRequest;
use token_broker::logging::AccessLine;
use token_broker::metrics::CacheOutcome;
use token_broker::truora::token_lifetime;

use support::*;

fn parts(c: &mut Criterion) {
    let mut g = c.benchmark_group("parts");
    g.bench_function("form parse + validate", |b| {
        b.iter(|| black_box(TokenRequest::from_form(black_box(FORM)).unwrap()))
    });
    g.bench_function("json parse + validate", |b| {
        b.iter(|| black_box(TokenRequest::from_json(black_box(JSON)).unwrap()))
    });
    let req = TokenRequest::from_form(FORM).unwrap();
    g.bench_function("cache key", |b| {
        b.iter(|| black_box(key(black_box(CALLER), black_box(&req))))
    });
    let t = jwt(42);
    g.bench_function("jwt claims lifetime", |b| {
        b.iter(|| black_box(token_lifetime(black_box(&t))))
    });

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let issuer = issuer(10, Arc::default());
    let issued = runtime
        .block_on(issuer.issue(&CALLER.into(), &req, &mut CacheOutcome::None))
        .unwrap();
    g.bench_function("answer bytes", |b| {
        b.iter(|| black_box(issued.tokens_body(black_box(Instant::now()))))
    });
    let line = AccessLine {
        request_id: "3f9a0c1b2d4e-123456",
        caller: CALLER,
        route: "tokens",
        status: 200,
        cache: CacheOutcome::Hit,
        latency: Duration::from_micros(41),
    };
    // The broker's own format (access lines written by hand) against tracing-subscriber's.
    use token_broker::logging::Format;
    use tracing_subscriber::fmt::format::{Format as Plain, JsonFields};
    for (name, json, by_hand) in [
        ("access line text", false, true),
        ("access line json", true, true),
        (
            "access line text, tracing-subscriber's format",
            false,
            false,
        ),
        ("access line json, tracing-subscriber's format", true, false),
    ] {
        let fmt = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(std::io::sink);
        let json_fmt = Plain::default().json().flatten_event(true);
        let subscriber: Box<dyn tracing::Subscriber + Send + Sync> = match (json, by_hand) {
            (false, true) => Box::new(fmt.event_format(Format::text()).finish()),
            (true, true) => Box::new(
                fmt.fmt_fields(JsonFields::new())
                    .event_format(Format::json())
                    .finish(),
            ),
            (false, false) => Box::new(fmt.finish()),
            (true, false) => Box::new(
                fmt.fmt_fields(JsonFields::new())
                    .event_format(json_fmt)
                    .finish(),
            ),
        };
        tracing::subscriber::with_default(subscriber, || {
            g.bench_function(name, |b| b.iter(|| black_box(&line).log()));
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = parts
}
criterion_main!(benches);
