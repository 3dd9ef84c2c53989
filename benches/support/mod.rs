//! Shared by the criterion benches, the allocation test (`tests/alloc.rs`) and the profiling
//! example (`examples/hit_loop.rs`): an issuance core and a caller service in front of an
//! upstream that answers at once with a token shaped like Truora's, and the bodies they send.
//!
//! Nothing here opens a socket.
#![allow(dead_code)]

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use token_broker::auth::{Caller, Callers};
use token_broker::issuance::{Issuer, IssuerSettings};
use token_broker::metrics::Metrics;
use token_broker::server::ApiState;
use token_broker::truora::ArrayEncoding;
use token_broker::upstream::{Guard, GuardSettings, Mint, MintFuture};

/// The benchmarked caller.
pub const CALLER: &str = "checkout";
/// Its bearer secret (a benchmark value, not a real one).
pub const SECRET: &str = "bench-caller-secret-0123456789abcdef";
/// The form every hit benchmark sends: an escaped redirect URL and a user, as callers send it.
pub const FORM: &[u8] = b"country=CO&flow_id=IPF0a1b2c3d4e5f&redirect_url=https%3A%2F%2Fshop.example%2Fdone&account_id=user-4242";
/// The same request as JSON.
pub const JSON: &[u8] = br#"{"country":"CO","flow_id":"IPF0a1b2c3d4e5f","redirect_url":"https://shop.example/done","account_id":"user-4242"}"#;

/// The benchmark form for user `n` (`account_id=user-<n>`).
pub fn form(n: u64) -> String {
    format!(
        "country=CO&flow_id=IPF0a1b2c3d4e5f&redirect_url=https%3A%2F%2Fshop.example%2Fdone&account_id=user-{n}"
    )
}

/// A JWT with the claims Truora's web tokens carry (two hours), of a realistic length.
pub fn jwt(n: u64) -> String {
    let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let claims = format!(
        r#"{{"account_id":"user-{n}","additional_data":"{{\"country\":\"CO\",\"flow_id\":\"IPF0a1b2c3d4e5f\",\"redirect_url\":\"https://shop.example/done\"}}","client_id":"TCI0123456789abcdef","exp":1800007200,"grant":"digital-identity","iat":1800000000,"iss":"https://api.account.truora.com","jti":"{n:032x}","key_name":"token-broker","key_type":"web","username":"bench"}}"#
    );
    format!(
        "{}.{}.{}",
        e.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
        e.encode(claims),
        e.encode([7u8; 32])
    )
}

/// An upstream that mints at once and counts its calls.
#[derive(Default)]
pub struct InstantUpstream {
    /// Tokens minted so far.
    pub calls: AtomicUsize,
}

impl Mint for InstantUpstream {
    fn mint(&self, _form: String) -> MintFuture {
        let n = self.calls.fetch_add(1, Ordering::Relaxed) as u64;
        let token = jwt(n);
        Box::pin(async move { Ok(token) })
    }
}

/// A shared handle on an [`InstantUpstream`], so the caller can keep counting its calls.
pub struct Shared(pub Arc<InstantUpstream>);

impl Mint for Shared {
    fn mint(&self, form: String) -> MintFuture {
        self.0.mint(form)
    }
}

/// An issuance core of `max_entries` in front of `upstream`.
pub fn issuer(max_entries: u64, upstream: Arc<InstantUpstream>) -> Arc<Issuer> {
    let metrics = Arc::new(Metrics::new(prometheus::Registry::new()).expect("metrics"));
    Issuer::new(
        IssuerSettings {
            min_remaining: Duration::from_secs(900),
            max_entries,
            web_url: "https://identity.truora.com".into(),
            array_encoding: ArrayEncoding::Repeat,
            invalidate_rate: 10,
        },
        Arc::new(Shared(upstream)),
        Guard::new(
            GuardSettings {
                // Benchmarks mint far faster than any real budget allows.
                mint_rate: u32::MAX,
                max_concurrent: 4096,
                ..GuardSettings::from_config(&Default::default())
            },
            Arc::clone(&metrics),
        ),
        metrics,
    )
}

/// The caller listener's state around `issuer`, with [`CALLER`] as its one client.
pub fn state(issuer: Arc<Issuer>) -> Arc<ApiState> {
    let metrics = Arc::new(Metrics::new(prometheus::Registry::new()).expect("metrics"));
    let callers = Callers::new(vec![Caller::with_secret(CALLER, SECRET.as_bytes())]);
    Arc::new(ApiState::new(issuer, callers, metrics))
}

/// `POST path` with the bearer secret and a form body, as hyper would hand it over.
pub fn post(path: &str, body: &'static [u8]) -> Request<Full<Bytes>> {
    Request::post(path)
        .header(http::header::AUTHORIZATION, const_format_bearer())
        .header(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(Full::new(Bytes::from_static(body)))
        .expect("request")
}

fn const_format_bearer() -> String {
    format!("Bearer {SECRET}")
}

/// Polls a future that must be ready at once (a cache hit never waits).
pub fn ready<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a cache hit should not wait"),
    }
}
