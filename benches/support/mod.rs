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

/// The Kubernetes service account of [`CALLER`] in [`service_account_state`].
pub const SERVICE_ACCOUNT: &str = "shop:checkout";

/// The caller listener's state around `issuer` with [`CALLER`] authenticated by the projected
/// service-account token of [`SERVICE_ACCOUNT`] (ES256, a key made here), and that token.
pub fn service_account_state(issuer: Arc<Issuer>) -> (Arc<ApiState>, String) {
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("key");
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
        .expect("key");
    // An uncompressed point: 0x04, then x and y.
    let point = pair.public_key().as_ref();
    let jwks = format!(
        r#"{{"keys":[{{"kty":"EC","crv":"P-256","use":"sig","alg":"ES256","kid":"bench","x":"{}","y":"{}"}}]}}"#,
        e.encode(&point[1..33]),
        e.encode(&point[33..65])
    );
    let issuer_url = "https://kubernetes.default.svc.cluster.local";
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = format!(
        r#"{{"aud":["token-broker"],"exp":{},"iat":{now},"nbf":{now},"iss":"{issuer_url}","sub":"system:serviceaccount:shop:checkout","kubernetes.io":{{"namespace":"shop","serviceaccount":{{"name":"checkout","uid":"0f6b1c5e-2a57-4f0e-9d3e-7a1b2c3d4e5f"}},"pod":{{"name":"checkout-7d9f8b6c5-x2x4q","uid":"5b1e2f3a-4c5d-4e6f-8a9b-0c1d2e3f4a5b"}}}}}}"#,
        now + 3600
    );
    let input = format!(
        "{}.{}",
        e.encode(r#"{"alg":"ES256","kid":"bench","typ":"JWT"}"#),
        e.encode(claims)
    );
    let signature = pair.sign(&rng, input.as_bytes()).expect("signature");
    let token = format!("{input}.{}", e.encode(signature.as_ref()));
    let k = token_broker::config::KubernetesConfig {
        issuer: issuer_url.into(),
        audiences: vec!["token-broker".into()],
        jwks_file: None,
        jwks_url: None,
        ca_file: None,
        jwks_token_file: None,
        jwks_refresh: Duration::from_secs(300),
    };
    let keys = token_broker::auth::KeySet::parse(jwks.as_bytes()).expect("jwks");
    let verifier = Arc::new(token_broker::auth::ServiceAccounts::new(&k, keys));
    let callers = Callers::from_config(&[token_broker::config::ClientConfig {
        id: CALLER.into(),
        service_account: Some(SERVICE_ACCOUNT.into()),
        ..Default::default()
    }])
    .expect("callers")
    .with_service_accounts(Some(verifier));
    let metrics = Arc::new(Metrics::new(prometheus::Registry::new()).expect("metrics"));
    (Arc::new(ApiState::new(issuer, callers, metrics)), token)
}

/// `POST path` with the bearer secret and a form body, as hyper would hand it over.
pub fn post(path: &str, body: &'static [u8]) -> Request<Full<Bytes>> {
    post_as(path, body, &const_format_bearer())
}

/// `POST path` with `authorization` and a form body.
pub fn post_as(path: &str, body: &'static [u8], authorization: &str) -> Request<Full<Bytes>> {
    Request::post(path)
        .header(http::header::AUTHORIZATION, authorization)
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
