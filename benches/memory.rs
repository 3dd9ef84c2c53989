//! `make bench-memory`: the memory cached tokens take, in this process, with tokens shaped and
//! sized like the sandbox's (and Truora's) web tokens (about 600 characters).
//!
//! Fills the issuance core with `BENCH_TOKENS` (1,000,000) distinct cached tokens through the
//! miss path, against an upstream that answers at once, and reads the resident set from
//! /proc/self/status before and after; then sends a fifth as many new users again, to show that
//! `cache.max_entries` bounds both the entries and the memory. Not a test: it prints, it does not
//! fail on a number.
//!
//! Command: `make bench-memory` (or `cargo bench --bench memory`).
//!
//! Results and the machine they were measured on: docs/performance.md.

#[path = "support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Instant;

use token_broker::issuance::TokenRequest;
use token_broker::metrics::CacheOutcome;

use support::*;

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(f64::NAN);
    kib / 1024.0
}

fn main() {
    let n: u64 = std::env::var("BENCH_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let upstream = Arc::<InstantUpstream>::default();
    let issuer = issuer(n, Arc::clone(&upstream));
    let caller: Arc<str> = CALLER.into();
    let token_len = jwt(0).len();
    let fill = |from: u64, to: u64| {
        runtime.block_on(async {
            for user in from..to {
                let body = form(user);
                let req = TokenRequest::from_form(body.as_bytes()).unwrap();
                issuer
                    .issue(&caller, &req, &mut CacheOutcome::None)
                    .await
                    .unwrap();
            }
        })
    };

    let before = rss_mib();
    let started = Instant::now();
    fill(0, n);
    let filled_in = started.elapsed();
    let entries = issuer.cache().len();
    let full = rss_mib();
    fill(n, n + n / 5);
    let entries_after = issuer.cache().len();
    let after = rss_mib();

    let per_entry = (full - before) * 1024.0 * 1024.0 / entries as f64;
    println!("tokens of {token_len} characters; cache.max_entries = {n}");
    println!(
        "filled {entries} entries with {} misses in {:.1} s ({:.1} us per miss)",
        n,
        filled_in.as_secs_f64(),
        filled_in.as_secs_f64() * 1e6 / n as f64
    );
    println!(
        "resident: {before:.0} MiB empty, {full:.0} MiB full ({per_entry:.0} bytes per cached token)"
    );
    println!(
        "after {} more new users: {entries_after} entries, {after:.0} MiB resident ({:+.1}%)",
        n / 5,
        (after - full) * 100.0 / full
    );
    let gib = full / 1024.0;
    println!(
        "target: {n} cached tokens within 1.5 GiB resident: {gib:.2} GiB, {}",
        if n == 1_000_000 && gib <= 1.5 {
            "met"
        } else if n == 1_000_000 {
            "NOT met"
        } else {
            "run with 1,000,000 tokens to judge"
        }
    );
    assert!(entries_after <= n, "the cache grew past max_entries");
    std::hint::black_box(upstream.calls.load(std::sync::atomic::Ordering::Relaxed));
}
