//! Callers proving who they are with their platform's identity (issue 17), end to end:
//! Kubernetes projected service-account tokens (RSA keys from the `openssl` command line, P-256
//! keys from rcgen, signed here with ring, their JWKS on disk or served on loopback over TLS by
//! a CA made with rcgen), and SPIFFE X.509-SVIDs (rcgen, one URI SAN) on mutual TLS.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use token_broker::app::{Broker as Server, StartError};
use token_broker::auth::{JwksSource, Refresher, ServiceAccounts};
use token_broker::config::{ClientConfig, Config, KubernetesConfig, TlsConfig};
use token_broker::metrics::Metrics;
use token_broker::sandbox::{Sandbox, SandboxOptions};
use token_broker::secret::MasterKey;
use token_broker::server::ApiState;

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const AUDIENCE: &str = "token-broker";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// ---------------------------------------------------------------------------------------------
// Keys, a JWKS, tokens.

enum Pair {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
}

/// A cluster signing key, as the API server holds it.
struct Signer {
    kid: String,
    pair: Pair,
}

impl Signer {
    /// A 2048-bit RSA key from the `openssl` command line (ring cannot make RSA keys), read as
    /// the PKCS#1 DER that `genpkey -outform DER` writes.
    fn rsa(kid: &str) -> Self {
        let out = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-outform",
                "DER",
            ])
            .output()
            .expect("the openssl command line (tests/install-deps.sh installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Signer {
            kid: kid.into(),
            pair: Pair::Rsa(RsaKeyPair::from_der(&out.stdout).unwrap()),
        }
    }

    /// A P-256 key made by rcgen.
    fn ec(kid: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &key.serialize_der(),
            &SystemRandom::new(),
        )
        .unwrap();
        Signer {
            kid: kid.into(),
            pair: Pair::Ec(pair),
        }
    }

    fn alg(&self) -> &'static str {
        match self.pair {
            Pair::Rsa(_) => "RS256",
            Pair::Ec(_) => "ES256",
        }
    }

    /// The public key as a JWK.
    fn jwk(&self) -> serde_json::Value {
        match &self.pair {
            Pair::Rsa(pair) => {
                let c: ring::rsa::PublicKeyComponents<Vec<u8>> = pair.public().into();
                json!({"kty":"RSA","use":"sig","alg":"RS256","kid":self.kid,"n":b64(&c.n),"e":b64(&c.e)})
            }
            Pair::Ec(pair) => {
                use ring::signature::KeyPair as _;
                let p = pair.public_key().as_ref();
                json!({"kty":"EC","crv":"P-256","use":"sig","alg":"ES256","kid":self.kid,
                       "x":b64(&p[1..33]),"y":b64(&p[33..])})
            }
        }
    }

    /// The bytes an attacker would use as an HMAC secret: the public key.
    fn public_bytes(&self) -> Vec<u8> {
        self.jwk().to_string().into_bytes()
    }

    fn sign_raw(&self, msg: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match &self.pair {
            Pair::Rsa(pair) => {
                let mut sig = vec![0; pair.public().modulus_len()];
                pair.sign(&ring::signature::RSA_PKCS1_SHA256, &rng, msg, &mut sig)
                    .unwrap();
                sig
            }
            Pair::Ec(pair) => pair.sign(&rng, msg).unwrap().as_ref().to_vec(),
        }
    }

    /// A compact JWS of `header` and `claims`.
    fn sign(&self, header: &serde_json::Value, claims: &serde_json::Value) -> String {
        let msg = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = self.sign_raw(msg.as_bytes());
        format!("{msg}.{}", b64(&sig))
    }

    fn header(&self) -> serde_json::Value {
        json!({"alg": self.alg(), "kid": self.kid})
    }

    /// A projected service-account token for `namespace:name`, valid for an hour.
    fn token(&self, account: &str) -> String {
        self.sign(&self.header(), &claims(account))
    }
}

/// The claims the API server writes into a projected token.
fn claims(account: &str) -> serde_json::Value {
    let (namespace, name) = account.split_once(':').unwrap();
    let t = now();
    json!({
        "iss": ISSUER,
        "aud": [AUDIENCE],
        "sub": format!("system:serviceaccount:{namespace}:{name}"),
        "iat": t, "nbf": t, "exp": t + 3600,
        "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": name, "uid": "0"}},
    })
}

fn jwks(keys: &[&Signer]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()}).to_string()
}

fn kubernetes_file(path: PathBuf) -> KubernetesConfig {
    KubernetesConfig {
        issuer: ISSUER.into(),
        audiences: vec!["vault".into(), AUDIENCE.into()],
        jwks_file: Some(path),
        jwks_url: None,
        ca_file: None,
        jwks_token_file: None,
        jwks_refresh: Duration::from_secs(300),
    }
}

fn service_account_client(id: &str, account: &str) -> ClientConfig {
    ClientConfig {
        id: id.into(),
        service_account: Some(account.into()),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// A broker in this process, its state at hand.

struct Running {
    url: String,
    admin: String,
    state: Arc<ApiState>,
    server_task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.server_task.abort();
    }
}

async fn sandbox() -> Sandbox {
    Sandbox::start(SandboxOptions::new(MASTER_KEY))
        .await
        .unwrap()
}

/// `checkout` and `billing` by secret, `shop-api` (`shop:api`) and `shop-worker`
/// (`shop:worker`) by service account.
fn config_with(sandbox: &Sandbox, k: KubernetesConfig) -> Config {
    let mut c = config(&sandbox.url());
    c.upstream.identity_url = sandbox.url();
    c.auth.kubernetes = Some(k);
    c.clients
        .push(service_account_client("shop-api", "shop:api"));
    c.clients
        .push(service_account_client("shop-worker", "shop:worker"));
    c
}

async fn build(cfg: &Config) -> Result<Server, StartError> {
    cfg.validate().unwrap();
    Server::from_config(cfg, MasterKey::new(MASTER_KEY).unwrap()).await
}

fn run(server: Server) -> Running {
    let url = format!("http://{}", server.caller_addr().unwrap());
    let admin = format!("http://{}", server.admin_addr().unwrap());
    let state = Arc::clone(server.state());
    let server_task = tokio::spawn(server.run(std::future::pending()));
    Running {
        url,
        admin,
        state,
        server_task,
    }
}

impl Running {
    async fn tokens(&self, bearer: &str) -> Resp {
        let r = post_tokens(&self.url, bearer, FORM).await;
        assert!(
            !r.everything().contains(bearer) || bearer.len() < 20,
            "the bearer value came back"
        );
        r
    }

    async fn metrics(&self) -> String {
        send(Method::GET, &format!("{}/metrics", self.admin), &[], "")
            .await
            .text()
    }

    fn signature_checks(&self) -> u64 {
        self.state
            .callers
            .load()
            .service_accounts()
            .unwrap()
            .signature_checks()
    }
}

fn metric(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn reason_count(scrape: &str, reason: &str) -> f64 {
    metric(
        scrape,
        &format!("token_broker_auth_failures_total{{reason=\"{reason}\"}}"),
    )
}

// ---------------------------------------------------------------------------------------------
// Kubernetes service-account tokens.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_maps_to_its_client_and_gets_its_own_cached_tokens_only() {
    let dir = tempfile::tempdir().unwrap();
    let (rsa, ec) = (Signer::rsa("rsa-1"), Signer::ec("ec-1"));
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks(&[&rsa, &ec])).unwrap();
    let sandbox = sandbox().await;
    let b = run(build(&config_with(&sandbox, kubernetes_file(path)))
        .await
        .unwrap());

    let api = rsa.token("shop:api");
    let r = b.tokens(&api).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header("x-cache"), "MISS");
    let first = r.json()["api_key"].clone();
    let r = b.tokens(&api).await;
    assert_eq!(r.header("x-cache"), "HIT");
    assert_eq!(r.json()["api_key"], first);
    assert_eq!(
        b.signature_checks(),
        1,
        "the second request was answered from the remembered token"
    );

    // Same form, other callers: each its own token, never shop-api's.
    let worker = ec.token("shop:worker");
    let r = b.tokens(&worker).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header("x-cache"), "MISS");
    assert_ne!(r.json()["api_key"], first);
    let r = b.tokens(CHECKOUT_SECRET).await;
    assert_eq!(r.header("x-cache"), "MISS", "static secrets work as before");
    assert_eq!(sandbox.calls(), 3);

    // The per-caller series name them by their configured id.
    let m = b.metrics().await;
    for caller in ["shop-api", "shop-worker", "checkout"] {
        assert!(
            m.contains(&format!("caller=\"{caller}\"")),
            "{caller} not in the scrape"
        );
    }
    assert_eq!(metric(&m, "token_broker_jwks_keys{source=\"file\"}"), 2.0);
    assert!(!m.contains(&api) && !m.contains(&worker));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_token_is_refused_with_401_and_the_reason_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let (key, stranger) = (Signer::rsa("rsa-1"), Signer::ec("rsa-1"));
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks(&[&key])).unwrap();
    let sandbox = sandbox().await;
    let b = run(build(&config_with(&sandbox, kubernetes_file(path)))
        .await
        .unwrap());

    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = claims("shop:api");
        f(&mut c);
        key.sign(&key.header(), &c)
    };
    let t = now();
    let good = key.token("shop:api");
    let parts: Vec<&str> = good.split('.').collect();
    let other_payload = b64(claims("shop:worker").to_string().as_bytes());
    let header_none = b64(br#"{"alg":"none","kid":"rsa-1"}"#);
    let hs_header = b64(br#"{"alg":"HS256","kid":"rsa-1"}"#);
    let hs_msg = format!("{hs_header}.{}", parts[1]);
    let hs_sig = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key.public_bytes()),
        hs_msg.as_bytes(),
    );
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "wrong audience",
            with(&|c| c["aud"] = json!(["https://kubernetes.default.svc"])),
            "wrong_audience",
        ),
        (
            "wrong issuer",
            with(&|c| c["iss"] = json!("https://other-cluster.example")),
            "wrong_issuer",
        ),
        (
            "expired",
            with(&|c| {
                c["iat"] = json!(t - 7200);
                c["exp"] = json!(t - 3600);
            }),
            "expired",
        ),
        (
            "not yet valid",
            with(&|c| c["nbf"] = json!(t + 3600)),
            "expired",
        ),
        (
            "tampered signature",
            format!("{}.{}.{}", parts[0], other_payload, parts[2]),
            "bad_signature",
        ),
        (
            "another key under a known kid",
            stranger.sign(&json!({"alg":"RS256","kid":"rsa-1"}), &claims("shop:api")),
            "bad_signature",
        ),
        (
            "unknown kid",
            key.sign(&json!({"alg":"RS256","kid":"rsa-9"}), &claims("shop:api")),
            "unknown_key",
        ),
        (
            "alg none",
            format!("{header_none}.{}.", parts[1]),
            "bad_signature",
        ),
        (
            "HS256 signed with the public key",
            format!("{hs_msg}.{}", b64(hs_sig.as_ref())),
            "bad_signature",
        ),
        (
            "unknown service account",
            key.token("shop:stranger"),
            "unknown_service_account",
        ),
        (
            "crit header",
            key.sign(
                &json!({"alg":"RS256","kid":"rsa-1","crit":["exp"],"exp":1}),
                &claims("shop:api"),
            ),
            "malformed",
        ),
        (
            "over 8 KiB",
            with(&|c| c["pad"] = json!("x".repeat(9000))),
            "malformed",
        ),
    ];
    for (what, token, reason) in &cases {
        let before = reason_count(&b.metrics().await, reason);
        let r = b.tokens(token).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}: {}", r.text());
        assert_eq!(
            r.header("www-authenticate"),
            "Bearer realm=\"token-broker\""
        );
        assert_eq!(r.json()["error"], "unauthorized", "{what}");
        let after = reason_count(&b.metrics().await, reason);
        assert_eq!(after, before + 1.0, "{what} counts as {reason}");
    }
    assert_eq!(sandbox.calls(), 0, "no refusal reached Truora");
    // The good one still goes through, and no token is in the scrape.
    assert_eq!(b.tokens(&good).await.status, StatusCode::OK);
    let m = b.metrics().await;
    for (_, token, _) in &cases {
        assert!(!m.contains(token.as_str()));
    }
}

// A JWKS served on loopback over TLS, by a CA of the test's own.

struct Pki {
    ca: rcgen::Certificate,
    key: KeyPair,
}

impl Pki {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Pki {
            ca: params.self_signed(&key).unwrap(),
            key,
        }
    }

    /// A leaf with these subject alternative names; (certificate PEM, key PEM).
    fn issue(&self, sans: Vec<SanType>, usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![usage];
        params.distinguished_name.push(DnType::CommonName, "test");
        let cert = params.signed_by(&key, &self.ca, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

#[derive(Default)]
struct Served {
    status: u16,
    body: String,
    hits: usize,
    authorization: Option<String>,
}

struct JwksServer {
    url: String,
    ca_pem: String,
    served: Arc<Mutex<Served>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl JwksServer {
    async fn start(body: String) -> Self {
        let pki = Pki::new("jwks test CA");
        let (cert, key) = pki.issue(
            vec![SanType::IpAddress("127.0.0.1".parse().unwrap())],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let served = Arc::new(Mutex::new(Served {
            status: 200,
            body,
            ..Default::default()
        }));
        let state = Arc::clone(&served);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, state) = (acceptor.clone(), Arc::clone(&state));
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req: Request<_>| {
                        let mut s = state.lock().unwrap();
                        s.hits += 1;
                        s.authorization = req
                            .headers()
                            .get("authorization")
                            .map(|v| v.to_str().unwrap().to_owned());
                        let answer = http::Response::builder()
                            .status(s.status)
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(s.body.clone())))
                            .unwrap();
                        async move { Ok::<_, std::convert::Infallible>(answer) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        JwksServer {
            url: format!("https://127.0.0.1:{port}/openid/v1/jwks"),
            ca_pem: pki.ca.pem(),
            served,
            task,
        }
    }

    fn set(&self, f: impl FnOnce(&mut Served)) {
        f(&mut self.served.lock().unwrap());
    }

    fn hits(&self) -> usize {
        self.served.lock().unwrap().hits
    }

    /// `[auth.kubernetes]` fetching from here, its CA in `dir`.
    fn config(&self, dir: &Path) -> KubernetesConfig {
        let ca = dir.join("cluster-ca.crt");
        std::fs::write(&ca, &self.ca_pem).unwrap();
        KubernetesConfig {
            jwks_file: None,
            jwks_url: Some(self.url.clone()),
            ca_file: Some(ca),
            ..kubernetes_file(PathBuf::new())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jwks_is_fetched_over_tls_and_a_rotated_key_is_picked_up_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (Signer::ec("2024"), Signer::rsa("2025"));
    let jwks_server = JwksServer::start(jwks(&[&old])).await;
    let token_file = dir.path().join("broker-token");
    std::fs::write(&token_file, "the-brokers-own-token\n").unwrap();
    let mut k = jwks_server.config(dir.path());
    k.jwks_token_file = Some(token_file);
    let sandbox = sandbox().await;
    let b = run(build(&config_with(&sandbox, k)).await.unwrap());
    assert_eq!(jwks_server.hits(), 1, "fetched once at start");
    assert_eq!(
        jwks_server.served.lock().unwrap().authorization.as_deref(),
        Some("Bearer the-brokers-own-token"),
        "jwks_token_file is presented to the JWKS endpoint"
    );
    assert_eq!(
        b.tokens(&old.token("shop:api")).await.status,
        StatusCode::OK
    );

    // The cluster rotates: its JWKS now has the new key too, and tokens are signed with it.
    jwks_server.set(|s| s.body = jwks(&[&old, &new]));
    let fresh = new.token("shop:worker");
    let r = b.tokens(&fresh).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        reason_count(&b.metrics().await, "unknown_key"),
        1.0,
        "answered at once, not held while the keys are fetched"
    );
    // Many more unknown-key tokens do not make many fetches: at most one per 10 s.
    for _ in 0..5 {
        let _ = b.tokens(&fresh).await;
    }
    let started = std::time::Instant::now();
    let mut status = StatusCode::UNAUTHORIZED;
    while status != StatusCode::OK {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the rotated key was never picked up"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        status = b.tokens(&fresh).await.status;
    }
    assert_eq!(jwks_server.hits(), 2, "one refresh for all those tokens");
    let m = b.metrics().await;
    assert_eq!(metric(&m, "token_broker_jwks_keys{source=\"url\"}"), 2.0);
    assert_eq!(
        metric(&m, "token_broker_jwks_refreshes_total{result=\"ok\"}"),
        2.0
    );
    assert!(!m.contains("the-brokers-own-token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_endpoint_down_at_refresh_keeps_the_last_good_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (key, added) = (Signer::ec("k1"), Signer::ec("k2"));
    let jwks_server = JwksServer::start(jwks(&[&key])).await;
    let k = jwks_server.config(dir.path());
    let metrics = Arc::new(Metrics::new(prometheus::Registry::new()).unwrap());
    let verifier = Arc::new(ServiceAccounts::from_config(&k).unwrap());
    let source = JwksSource::from_config(&k).unwrap().unwrap();
    verifier.set_keys(source.fetch().await.unwrap(), &metrics, "url");
    // Short intervals here; the broker's are jwks_refresh and 10 s.
    let refresher = Refresher::spawn(
        source,
        Arc::clone(&verifier),
        Duration::from_millis(200),
        Duration::from_millis(100),
        Arc::clone(&metrics),
    );
    let verify = |token: &str| {
        verifier.verify(
            token.as_bytes(),
            &token_broker::secret::SecretDigest::of(token.as_bytes()),
        )
    };
    let errors = || metrics.jwks_refreshes.with_label_values(&["error"]).get();
    for down in [
        Box::new(|s: &mut Served| s.status = 503) as Box<dyn Fn(&mut Served)>,
        Box::new(|s: &mut Served| {
            s.status = 200;
            s.body = "<html>maintenance</html>".into();
        }),
        Box::new(|s: &mut Served| s.body = r#"{"keys":[]}"#.into()),
    ] {
        let before = errors();
        jwks_server.set(|s| down(s));
        wait_for(
            Duration::from_secs(10),
            Duration::from_millis(50),
            || async { errors() > before },
            || "no failed refresh counted".into(),
        )
        .await;
        // A token never seen before (so not remembered) still verifies with the old key.
        assert_eq!(
            verify(&key.sign(&key.header(), &claims(&format!("shop:n{before}")))).as_deref(),
            Ok(format!("shop:n{before}").as_str())
        );
    }
    // Back up, with a new key: picked up by the next refresh.
    jwks_server.set(|s| s.body = jwks(&[&key, &added]));
    wait_for(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async { verifier.keys().contains("k2") },
        || "the new key was not picked up".into(),
    )
    .await;
    assert_eq!(verify(&added.token("shop:api")).as_deref(), Ok("shop:api"));
    // The task stops with its handle.
    drop(refresher);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let hits = jwks_server.hits();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        jwks_server.hits(),
        hits,
        "the refresher outlived its handle"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_set_at_start_is_no_start() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = sandbox().await;
    let jwks_server = JwksServer::start("not json".into()).await;
    let cfg = config_with(&sandbox, jwks_server.config(dir.path()));
    let err = build(&cfg).await.err().expect("started without keys");
    assert!(matches!(err, StartError::Jwks(_)), "{err}");
    assert!(
        !err.is_config(),
        "a run-time failure (exit 1), not a bad file"
    );
    jwks_server.set(|s| s.status = 500);
    assert!(matches!(build(&cfg).await, Err(StartError::Jwks(_))));
    // Nothing listening: the same.
    let mut k = jwks_server.config(dir.path());
    k.jwks_url = Some(format!("https://127.0.0.1:{}/jwks", free_port()));
    let cfg = config_with(&sandbox, k);
    let err = build(&cfg).await.err().expect("started without keys");
    assert!(
        err.to_string().starts_with("auth.kubernetes.jwks_url"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_rereads_the_jwks_file_and_forgets_revoked_callers_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (Signer::ec("old"), Signer::ec("new"));
    let jwks_path = dir.path().join("jwks.json");
    std::fs::write(&jwks_path, jwks(&[&old])).unwrap();
    let sandbox = sandbox().await;
    let mut cfg = config_with(&sandbox, kubernetes_file(jwks_path.clone()));
    let key_path = dir.path().join("api-key");
    std::fs::write(&key_path, MASTER_KEY).unwrap();
    cfg.upstream.api_key_file = Some(key_path);
    let path = dir.path().join("config.toml");
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    let server = build(&cfg).await.unwrap();
    let reloader = server.reload_from(path.clone(), cfg.clone()).unwrap();
    let b = run(server);

    let t_old = old.token("shop:api");
    assert_eq!(b.tokens(&t_old).await.status, StatusCode::OK);
    assert_eq!(b.tokens(&t_old).await.status, StatusCode::OK);
    assert_eq!(b.signature_checks(), 1);

    // The cluster's old key is withdrawn: after the reload a remembered token of it is refused.
    std::fs::write(&jwks_path, jwks(&[&new])).unwrap();
    let done = reloader.reload().await.unwrap();
    assert!(done.restart_required.is_empty(), "{done:?}");
    let r = b.tokens(&t_old).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let t_new = new.token("shop:api");
    assert_eq!(b.tokens(&t_new).await.status, StatusCode::OK);

    // shop-api is revoked: its remembered token stops working with the reload.
    cfg.clients.retain(|c| c.id != "shop-api");
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    let done = reloader.reload().await.unwrap();
    assert_eq!(done.revoked, ["shop-api"]);
    let r = b.tokens(&t_new).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let m = b.metrics().await;
    assert_eq!(reason_count(&m, "unknown_service_account"), 1.0);

    // Changing where the keys come from needs a restart, and says so.
    let mut moved = cfg.clone();
    let k = moved.auth.kubernetes.as_mut().unwrap();
    k.jwks_file = None;
    k.jwks_url = Some("https://127.0.0.1:1/jwks".into());
    std::fs::write(&path, toml::to_string(&moved).unwrap()).unwrap();
    let done = reloader.reload().await.unwrap();
    assert_eq!(done.restart_required, ["auth"]);
}

#[test]
fn check_config_validates_the_new_keys() {
    let dir = tempfile::tempdir().unwrap();
    let jwks_path = dir.path().join("jwks.json");
    std::fs::write(&jwks_path, jwks(&[&Signer::ec("k")])).unwrap();
    let mut cfg = config("https://api.account.truora.com");
    cfg.auth.kubernetes = Some(kubernetes_file(jwks_path.clone()));
    cfg.clients
        .push(service_account_client("shop-api", "shop:api"));
    let check = |cfg: &Config| {
        let path = dir.path().join("config.toml");
        std::fs::write(&path, toml::to_string(cfg).unwrap()).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_token-broker"))
            .args(["check-config", "--config", path.to_str().unwrap()])
            .env("TRUORA_API_KEY", MASTER_KEY)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(check(&cfg).0, Some(0), "{}", check(&cfg).1);
    let mut bad = cfg.clone();
    bad.clients[2].service_account = Some("shop/api".into());
    let (code, err) = check(&bad);
    assert_eq!(code, Some(64));
    assert!(err.contains("clients[2].service_account"), "{err}");
    std::fs::write(
        &jwks_path,
        r#"{"keys":[{"kty":"oct","kid":"h","k":"c2VjcmV0"}]}"#,
    )
    .unwrap();
    let (code, err) = check(&cfg);
    assert_eq!(code, Some(64));
    assert!(err.contains("auth.kubernetes.jwks_file"), "{err}");
    assert!(err.contains("no usable signing key"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// SPIFFE IDs on mutual TLS.

const SPIFFE_API: &str = "spiffe://prod.example.org/ns/shop/sa/api";
const SPIFFE_STRICT: &str = "spiffe://prod.example.org/ns/shop/sa/strict";

type Https = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

fn https_client(ca: &str, identity: Option<&(String, String)>) -> Https {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new()).build(https)
}

async fn https_post(client: &Https, url: &str, bearer: Option<&str>) -> StatusCode {
    let mut req = Request::post(url).header("content-type", "application/x-www-form-urlencoded");
    if let Some(b) = bearer {
        req = req.header("authorization", format!("Bearer {b}"));
    }
    let req = req.body(Full::new(Bytes::from(FORM))).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .unwrap()
        .unwrap();
    let status = r.status();
    let _ = r.into_body().collect().await;
    status
}

fn svid(pki: &Pki, ids: &[&str]) -> (String, String) {
    pki.issue(
        ids.iter()
            .map(|id| SanType::URI((*id).try_into().unwrap()))
            .collect(),
        ExtendedKeyUsagePurpose::ClientAuth,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spiffe_certificate_maps_to_its_client_and_another_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (server_ca, other_domain, spire) = (
        Pki::new("listener CA"),
        Pki::new("another trust domain"),
        Pki::new("SPIRE"),
    );
    let (cert, key) = server_ca.issue(
        vec![SanType::DnsName("localhost".try_into().unwrap())],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    // A trust bundle: two CAs in one file; the SVIDs come from the second.
    let bundle = format!("{}{}", other_domain.ca.pem(), spire.ca.pem());
    let k8s_key = Signer::ec("k");
    let jwks_path = write("jwks.json", &jwks(&[&k8s_key]));
    let sandbox = sandbox().await;
    let mut cfg = config_with(&sandbox, kubernetes_file(jwks_path));
    cfg.server.tls = Some(TlsConfig {
        cert_file: write("server.pem", &cert),
        key_file: write("server.key", &key),
        client_ca_file: Some(write("bundle.pem", &bundle)),
    });
    cfg.clients.push(ClientConfig {
        id: "shop-svid".into(),
        spiffe_id: Some(SPIFFE_API.into()),
        ..Default::default()
    });
    cfg.clients.push(ClientConfig {
        id: "shop-strict".into(),
        service_account: Some("shop:strict".into()),
        spiffe_id: Some(SPIFFE_STRICT.into()),
        require_all: Some(true),
        ..Default::default()
    });
    let server = build(&cfg).await.unwrap();
    let url = format!(
        "https://localhost:{}/v1/tokens",
        server.caller_addr().unwrap().port()
    );
    let admin = format!("http://{}", server.admin_addr().unwrap());
    let _b = run(server);
    let ca = server_ca.ca.pem();

    let mine = svid(&spire, &[SPIFFE_API]);
    assert_eq!(
        https_post(&https_client(&ca, Some(&mine)), &url, None).await,
        StatusCode::OK
    );
    let m = send(Method::GET, &format!("{admin}/metrics"), &[], "")
        .await
        .text();
    assert!(
        m.contains("caller=\"shop-svid\""),
        "named by its configured id"
    );

    let another = svid(&spire, &["spiffe://prod.example.org/ns/shop/sa/other"]);
    assert_eq!(
        https_post(&https_client(&ca, Some(&another)), &url, None).await,
        StatusCode::UNAUTHORIZED
    );
    // An SVID carries one URI SAN: with two, even if one is right, it names no one.
    let two = svid(&spire, &[SPIFFE_API, "spiffe://prod.example.org/ns/x"]);
    assert_eq!(
        https_post(&https_client(&ca, Some(&two)), &url, None).await,
        StatusCode::UNAUTHORIZED
    );
    // The right ID from the bundle's other CA is fine too: the bundle is one trust store.
    let from_other = svid(&other_domain, &[SPIFFE_API]);
    assert_eq!(
        https_post(&https_client(&ca, Some(&from_other)), &url, None).await,
        StatusCode::OK
    );
    assert_eq!(sandbox.calls(), 1, "the same caller, the same form: a hit");

    // require_all: the token and the SVID together, neither alone.
    let token = k8s_key.token("shop:strict");
    let strict = svid(&spire, &[SPIFFE_STRICT]);
    let anonymous = https_client(&ca, None);
    assert_eq!(
        https_post(&anonymous, &url, Some(&token)).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        https_post(&https_client(&ca, Some(&strict)), &url, None).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        https_post(&https_client(&ca, Some(&mine)), &url, Some(&token)).await,
        StatusCode::UNAUTHORIZED,
        "another caller's SVID"
    );
    assert_eq!(
        https_post(&https_client(&ca, Some(&strict)), &url, Some(&token)).await,
        StatusCode::OK
    );
    let m = send(Method::GET, &format!("{admin}/metrics"), &[], "")
        .await
        .text();
    assert_eq!(reason_count(&m, "certificate_required"), 2.0);
}
