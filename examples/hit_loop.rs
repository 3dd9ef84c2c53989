//! A loop of cache hits for profilers: `valgrind --tool=callgrind` counts its instructions
//! repeatably, where timings on a shared virtual machine are noise.
//!
//! `hit_loop core N`: N hits through the issuance core (parse + validate + key + lookup + answer).
//! `hit_loop service N`: N hits through `caller_service` (every tower layer, no sockets).
//! `hit_loop requests N`: only builds the N requests `service` sends, to subtract from it.
//! `hit_loop service-account N`: N hits through `caller_service` by a caller that sends its
//! Kubernetes projected service-account token (verified once, then remembered);
//! `hit_loop token-requests N` and `hit_loop token N`: building its requests, and the SHA-256
//! of its token, to subtract.
//! `hit_loop key N`, `hit_loop secret N`: only the SHA-256 work of a hit (the cache key; the
//! digest of the caller's secret), to subtract: valgrind's CPU has no SHA extensions, so sha2
//! runs its portable code there, many times slower than SHA-NI on the hardware.
//! Instructions per hit = (count at N - count at 0) / N; `make profile` does exactly that.

#[path = "../benches/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Instant;

use token_broker::issuance::TokenRequest;
use token_broker::metrics::CacheOutcome;
use token_broker::server::caller_service;
use tower::Service;

use support::*;

fn main() {
    let mut args = std::env::args().skip(1);
    let what = args.next().unwrap_or_default();
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    // Timers: the upstream call and the body read are bounded by tokio timeouts.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let issuer = issuer(1_000, Arc::default());
    match what.as_str() {
        "core" => {
            let caller: Arc<str> = CALLER.into();
            runtime.block_on(async {
                let req = TokenRequest::from_form(FORM).unwrap();
                issuer
                    .issue(&caller, &req, &mut CacheOutcome::None)
                    .await
                    .unwrap();
            });
            for _ in 0..n {
                let req = TokenRequest::from_form(std::hint::black_box(FORM)).unwrap();
                let issued = ready(issuer.issue(&caller, &req, &mut CacheOutcome::None)).unwrap();
                std::hint::black_box(issued.tokens_body(Instant::now()));
            }
        }
        "service" => {
            let mut service = caller_service(
                state(issuer),
                std::sync::Arc::new(token_broker::auth::Peer::default()),
            );
            runtime.block_on(async {
                service.call(post("/v1/tokens", FORM)).await.unwrap();
            });
            // The body read's timeout needs the runtime's context (not its thread).
            let _context = runtime.enter();
            for _ in 0..n {
                let response = ready(service.call(post("/v1/tokens", FORM))).unwrap();
                // A hit, not an error answered (a 500 costs far more and would be counted).
                assert_eq!(response.status(), 200);
                std::hint::black_box(response);
            }
        }
        "service-account" | "token-requests" | "token" => {
            let (state, token) = service_account_state(issuer);
            let bearer = format!("Bearer {token}");
            if what == "token" {
                for _ in 0..n {
                    std::hint::black_box(token_broker::secret::SecretDigest::of(
                        std::hint::black_box(token.as_bytes()),
                    ));
                }
                return;
            }
            if what == "token-requests" {
                for _ in 0..n {
                    std::hint::black_box(post_as("/v1/tokens", FORM, &bearer));
                }
                return;
            }
            let mut service = caller_service(
                state,
                std::sync::Arc::new(token_broker::auth::Peer::default()),
            );
            runtime.block_on(async {
                let first = service.call(post_as("/v1/tokens", FORM, &bearer)).await;
                assert_eq!(first.unwrap().status(), 200);
            });
            let _context = runtime.enter();
            for _ in 0..n {
                let response = ready(service.call(post_as("/v1/tokens", FORM, &bearer))).unwrap();
                assert_eq!(response.status(), 200);
                std::hint::black_box(response);
            }
        }
        "key" => {
            let req = TokenRequest::from_form(FORM).unwrap();
            for _ in 0..n {
                std::hint::black_box(token_broker::issuance::key::key(
                    CALLER,
                    std::hint::black_box(&req),
                ));
            }
        }
        "secret" => {
            for _ in 0..n {
                std::hint::black_box(token_broker::secret::SecretDigest::of(
                    std::hint::black_box(SECRET.as_bytes()),
                ));
            }
        }
        "requests" => {
            for _ in 0..n {
                std::hint::black_box(post("/v1/tokens", FORM));
            }
        }
        _ => {
            eprintln!("usage: hit_loop core|service|requests|service-account|token-requests|token|key|secret N");
            std::process::exit(64);
        }
    }
}
