//! Security end to end: TLS and client certificates (generated here with rcgen), per-caller
//! policy, hostile HTTP (oversized heads, slow clients, smuggling shapes, connection floods),
//! process hardening, and rotation without restart.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use token_broker::app::Broker as Server;
use token_broker::config::{ClientConfig, Config, TlsConfig};
use token_broker::sandbox::{Sandbox, SandboxOptions};
use token_broker::secret::{MasterKey, SecretDigest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A certificate authority for the tests, and certificates it signs.
struct Pki {
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

/// A PEM certificate and key on disk.
struct Issued {
    cert_pem: String,
    key_pem: String,
}

impl Pki {
    fn new(name: &str) -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let ca = params.self_signed(&ca_key).unwrap();
        Pki { ca, ca_key }
    }

    fn issue(&self, dns: &str, usage: ExtendedKeyUsagePurpose) -> Issued {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![dns.to_owned()]).unwrap();
        if dns == "localhost" {
            params
                .subject_alt_names
                .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        }
        params.extended_key_usages = vec![usage];
        params.distinguished_name.push(DnType::CommonName, dns);
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    fn ca_pem(&self) -> String {
        self.ca.pem()
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// An HTTPS client trusting `ca`, presenting `identity` when given.
fn https_client(
    ca: &str,
    identity: Option<&Issued>,
) -> Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_client_config(ca, identity))
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    Client::builder(TokioExecutor::new()).build(https)
}

/// A rustls client trusting `ca`, presenting `identity` when given.
fn tls_client_config(ca: &str, identity: Option<&Issued>) -> rustls::ClientConfig {
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
        Some(id) => {
            let chain = CertificateDer::pem_slice_iter(id.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config
}

async fn https_post(
    client: &Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Full<Bytes>,
    >,
    url: &str,
    bearer: Option<&str>,
    form: &str,
) -> Result<Resp, String> {
    let mut req = Request::post(url).header("content-type", "application/x-www-form-urlencoded");
    if let Some(secret) = bearer {
        req = req.header("authorization", format!("Bearer {secret}"));
    }
    let req = req.body(Full::new(Bytes::from(form.to_owned()))).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| format!("{e:?}"))?;
    let version = response.version();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    let mut headers = parts.headers;
    headers.insert(
        "x-test-version",
        http::HeaderValue::from_str(&format!("{version:?}")).unwrap(),
    );
    Ok(Resp {
        status: parts.status,
        headers,
        body,
    })
}

/// A broker with TLS on the caller listener and client certificates checked against `pki`.
struct TlsBroker {
    url: String,
    sandbox: Sandbox,
    pki: Pki,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn tls_broker(tweak: impl FnOnce(&mut Config)) -> TlsBroker {
    let pki = Pki::new("token-broker test CA");
    let dir = tempfile::tempdir().unwrap();
    let server = pki.issue("localhost", ExtendedKeyUsagePurpose::ServerAuth);
    let sandbox = Sandbox::start(SandboxOptions::new(MASTER_KEY))
        .await
        .unwrap();
    let mut cfg = config(&sandbox.url());
    cfg.server.tls = Some(TlsConfig {
        cert_file: write(dir.path(), "server.pem", &server.cert_pem),
        key_file: write(dir.path(), "server.key", &server.key_pem),
        client_ca_file: Some(write(dir.path(), "ca.pem", &pki.ca_pem())),
    });
    // checkout: bearer secret and certificate; billing: bearer only; batch: certificate only.
    cfg.clients[0].tls_san = Some("checkout.internal".into());
    cfg.clients.push(ClientConfig {
        id: "batch".into(),
        tls_san: Some("batch.internal".into()),
        ..Default::default()
    });
    tweak(&mut cfg);
    cfg.validate().unwrap();
    let server = Server::from_config(&cfg, MasterKey::new(MASTER_KEY).unwrap())
        .await
        .unwrap();
    let url = format!(
        "https://localhost:{}/v1/tokens",
        server.caller_addr().unwrap().port()
    );
    let task = tokio::spawn(server.run(std::future::pending()));
    TlsBroker {
        url,
        sandbox,
        pki,
        _dir: dir,
        task,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_callers_are_served_over_http2_and_http1() {
    let b = tls_broker(|_| {}).await;
    let client = https_client(&b.pki.ca_pem(), None);
    let r = https_post(&client, &b.url, Some(BILLING_SECRET), FORM)
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header("x-test-version"), "HTTP/2.0", "ALPN offers h2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_alone_authenticates_a_tls_san_only_caller() {
    let b = tls_broker(|_| {}).await;
    let batch = b
        .pki
        .issue("batch.internal", ExtendedKeyUsagePurpose::ClientAuth);
    let client = https_client(&b.pki.ca_pem(), Some(&batch));
    let r = https_post(&client, &b.url, None, FORM).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // Without a certificate, or with one for another name, there is no caller.
    let anonymous = https_client(&b.pki.ca_pem(), None);
    let r = https_post(&anonymous, &b.url, None, FORM).await.unwrap();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let stranger = b
        .pki
        .issue("stranger.internal", ExtendedKeyUsagePurpose::ClientAuth);
    let client = https_client(&b.pki.ca_pem(), Some(&stranger));
    let r = https_post(&client, &b.url, None, FORM).await.unwrap();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(b.sandbox.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_with_secret_and_san_needs_both() {
    let b = tls_broker(|_| {}).await;
    let no_cert = https_client(&b.pki.ca_pem(), None);
    let r = https_post(&no_cert, &b.url, Some(CHECKOUT_SECRET), FORM)
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let wrong = b
        .pki
        .issue("batch.internal", ExtendedKeyUsagePurpose::ClientAuth);
    let r = https_post(
        &https_client(&b.pki.ca_pem(), Some(&wrong)),
        &b.url,
        Some(CHECKOUT_SECRET),
        FORM,
    )
    .await
    .unwrap();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let right = b
        .pki
        .issue("checkout.internal", ExtendedKeyUsagePurpose::ClientAuth);
    let with_cert = https_client(&b.pki.ca_pem(), Some(&right));
    let r = https_post(&with_cert, &b.url, Some(CHECKOUT_SECRET), FORM)
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // The certificate alone is not enough for a caller that also has a secret.
    let r = https_post(&with_cert, &b.url, None, FORM).await.unwrap();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(b.sandbox.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_fails_the_handshake() {
    let b = tls_broker(|_| {}).await;
    let rogue_ca = Pki::new("rogue CA");
    let rogue = rogue_ca.issue("batch.internal", ExtendedKeyUsagePurpose::ClientAuth);
    let client = https_client(&b.pki.ca_pem(), Some(&rogue));
    let r = https_post(&client, &b.url, None, FORM).await;
    assert!(r.is_err() || r.unwrap().status == StatusCode::UNAUTHORIZED);
    assert_eq!(b.sandbox.calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_to_the_tls_listener_gets_nothing() {
    let b = tls_broker(|_| {}).await;
    let plain = b.url.replace("https://localhost", "http://127.0.0.1");
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = Request::post(plain)
        .body(Full::new(Bytes::from(FORM)))
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .unwrap();
    assert!(r.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_listener_serves_deliveries_over_its_own_tls() {
    let pki = Pki::new("webhook test CA");
    let dir = tempfile::tempdir().unwrap();
    let cert = pki.issue("localhost", ExtendedKeyUsagePurpose::ServerAuth);
    let sandbox = Sandbox::start(SandboxOptions::new(MASTER_KEY))
        .await
        .unwrap();
    let mut cfg = config(&sandbox.url());
    with_webhooks(&mut cfg);
    if let Some(w) = cfg.webhooks.as_mut() {
        w.tls = Some(token_broker::config::WebhookTlsConfig {
            cert_file: write(dir.path(), "hooks.pem", &cert.cert_pem),
            key_file: write(dir.path(), "hooks.key", &cert.key_pem),
        });
    }
    cfg.validate().unwrap();
    let server = Server::from_config(&cfg, MasterKey::new(MASTER_KEY).unwrap())
        .await
        .unwrap();
    let port = server.webhook_addr().unwrap().port();
    let task = tokio::spawn(server.run(std::future::pending()));
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let jwt = token_broker::sandbox::sign_hs256(
        b"k",
        &format!(r#"{{"event":"identity_process_created","iat":{iat}}}"#),
    );
    let client = https_client(&pki.ca_pem(), None);
    let url = format!("https://localhost:{port}/webhooks/truora");
    let r = https_post(&client, &url, Some(WEBHOOK_SECRET), &jwt)
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["outcome"], "ignored");
    // Plain HTTP to it gets nothing.
    let plain: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = Request::post(format!("http://127.0.0.1:{port}/webhooks/truora"))
        .body(Full::new(Bytes::from(jwt)))
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), plain.request(req))
        .await
        .unwrap();
    assert!(answer.is_err());
    task.abort();
}

#[test]
fn the_tls_listener_speaks_only_tls_1_2_and_1_3() {
    let pki = Pki::new("ca");
    let dir = tempfile::tempdir().unwrap();
    let server = pki.issue("localhost", ExtendedKeyUsagePurpose::ServerAuth);
    let config = token_broker::server::tls::server_config(&TlsConfig {
        cert_file: write(dir.path(), "s.pem", &server.cert_pem),
        key_file: write(dir.path(), "s.key", &server.key_pem),
        client_ca_file: None,
    })
    .unwrap();
    // rustls has no TLS 1.1 or older at all; these are the versions it will negotiate.
    let suites: Vec<_> = config
        .crypto_provider()
        .cipher_suites
        .iter()
        .map(|s| s.version().version)
        .collect();
    assert!(suites.contains(&rustls::ProtocolVersion::TLSv1_3));
    assert!(suites.iter().all(|v| matches!(
        v,
        rustls::ProtocolVersion::TLSv1_2 | rustls::ProtocolVersion::TLSv1_3
    )));
    assert_eq!(
        config.alpn_protocols,
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_caller_policy_denies_with_403_naming_the_rule_and_no_upstream_call() {
    let b = Broker::start(|c, _| {
        c.clients[0].allowed_flows = Some(vec!["IPFallowed".into()]);
        c.clients[0].allowed_countries = Some(vec!["CO".into(), "MX".into()]);
        c.clients[0].allowed_redirect_hosts = Some(vec!["*.example".into()]);
        c.clients[0].drop_in = false;
    })
    .await;
    let allowed = FORM.replace("IPF0a1b2c", "IPFallowed");
    assert_eq!(
        b.tokens(CHECKOUT_SECRET, &allowed).await.status,
        StatusCode::OK
    );
    let cases = [
        (FORM.to_owned(), "allowed_flows", "flow_id"),
        (
            allowed.replace("country=CO", "country=BR"),
            "allowed_countries",
            "country",
        ),
        (
            allowed.replace("shop.example", "evil.test"),
            "allowed_redirect_hosts",
            "redirect_url",
        ),
    ];
    for (form, rule, field) in cases {
        let r = b.tokens(CHECKOUT_SECRET, &form).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{form}");
        assert_eq!(r.json()["error"], "forbidden_by_policy");
        assert_eq!(r.json()["rule"], rule);
        assert_eq!(r.json()["field"], field);
    }
    let r = send(
        Method::POST,
        &format!("{}/v1/api-keys", b.url),
        &[
            ("authorization", &format!("Bearer {CHECKOUT_SECRET}")),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        &allowed,
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.json()["http_code"], 403);
    assert!(r.json()["message"].as_str().unwrap().contains("drop_in"));
    // Another caller without a policy is unaffected.
    assert_eq!(b.tokens(BILLING_SECRET, FORM).await.status, StatusCode::OK);
    assert_eq!(b.sandbox.calls(), 2);
    b.stop().await;
}

/// Sends raw bytes on a new connection and reads until the server closes or `wait` passes.
async fn raw(addr: &str, bytes: &[u8], wait: Duration) -> (String, bool) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + wait;
    let mut closed = false;
    while Instant::now() < deadline {
        match tokio::time::timeout(deadline - Instant::now(), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

fn head(extra: &str, body: &str) -> Vec<u8> {
    format!(
        "POST /v1/tokens HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CHECKOUT_SECRET}\r\nContent-Type: application/x-www-form-urlencoded\r\n{extra}\r\n{body}"
    )
    .into_bytes()
}

fn addr_of(url: &str) -> String {
    url.trim_start_matches("http://").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_or_too_large_headers_get_431() {
    let b = Broker::start(|c, _| {
        c.server.max_headers = 16;
        c.server.max_header_bytes = 8192;
    })
    .await;
    let addr = addr_of(&b.url);
    let many: String = (0..40).map(|i| format!("X-H{i}: v\r\n")).collect();
    let (answer, _) = raw(
        &addr,
        &head(&format!("{many}Content-Length: 0\r\n"), ""),
        Duration::from_secs(3),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let large = format!("X-Big: {}\r\nContent-Length: 0\r\n", "a".repeat(20_000));
    let (answer, _) = raw(&addr, &head(&large, ""), Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_too_slow_with_its_head_is_disconnected() {
    let b = Broker::start(|c, _| c.server.header_read_timeout = Duration::from_millis(300)).await;
    let started = Instant::now();
    let (_, closed) = raw(
        &addr_of(&b.url),
        b"POST /v1/tokens HTTP/1.1\r\nHost: x\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(closed, "the connection was not closed");
    assert!(started.elapsed() < Duration::from_secs(3));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_too_slow_with_its_body_gets_408() {
    let b = Broker::start(|c, _| c.server.body_read_timeout = Duration::from_millis(300)).await;
    let (answer, closed) = raw(
        &addr_of(&b.url),
        &head("Content-Length: 200\r\n", "country=CO"),
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"));
    assert!(closed);
    assert_eq!(b.sandbox.calls(), 0);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_shapes_are_refused_and_the_connection_closed() {
    let b = Broker::start(|_, _| {}).await;
    let addr = addr_of(&b.url);
    let chunked = format!("{:x}\r\n{FORM}\r\n0\r\n\r\n", FORM.len());
    for (headers, body, status) in [
        (
            format!(
                "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
                chunked.len()
            ),
            chunked.clone(),
            "411",
        ),
        (
            format!(
                "Transfer-Encoding: chunked\r\nContent-Length: {}\r\n",
                chunked.len()
            ),
            chunked.clone(),
            "411",
        ),
        (
            format!("Content-Length: {}\r\nContent-Length: 5\r\n", FORM.len()),
            FORM.to_owned(),
            "400",
        ),
    ] {
        // A second request is pipelined behind: it must not be answered.
        let mut bytes = head(&headers, &body);
        bytes.extend_from_slice(&head(&format!("Content-Length: {}\r\n", FORM.len()), FORM));
        let (answer, closed) = raw(&addr, &bytes, Duration::from_secs(3)).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{headers}: {answer}"
        );
        assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{answer}");
        assert!(closed, "{headers}");
    }
    assert_eq!(b.sandbox.calls(), 0);
    b.stop().await;
}

/// A repeated `Content-Length`: on HTTP/1 hyper merges identical values (the request is served)
/// and refuses differing ones itself; on HTTP/2 identical ones reach the broker, which refuses
/// them (400 `ambiguous_framing`), and h2 resets the stream on differing ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_content_length_is_merged_by_http1_and_refused_on_http2() {
    let b = Broker::start(|_, _| {}).await;
    let addr = addr_of(&b.url);
    let twice = format!(
        "Connection: close\r\nContent-Length: {0}\r\nContent-Length: {0}\r\n",
        FORM.len()
    );
    let (answer, _) = raw(&addr, &head(&twice, FORM), Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    for (second, expect) in [(FORM.len().to_string(), Some(400)), ("5".into(), None)] {
        let tcp = TcpStream::connect(&addr).await.unwrap();
        let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(connection);
        let req = Request::post("/v1/tokens")
            .header("authorization", format!("Bearer {CHECKOUT_SECRET}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("content-length", FORM.len().to_string())
            .header("content-length", second)
            .body(())
            .unwrap();
        let (response, mut body) = client.send_request(req, false).unwrap();
        let _ = body.send_data(Bytes::from(FORM), true);
        let response = tokio::time::timeout(Duration::from_secs(5), response)
            .await
            .unwrap();
        match expect {
            Some(status) => {
                let response = response.unwrap();
                assert_eq!(response.status().as_u16(), status);
                let mut body = response.into_body();
                let mut text = Vec::new();
                while let Some(chunk) = body.data().await {
                    text.extend_from_slice(&chunk.unwrap());
                }
                assert!(String::from_utf8_lossy(&text).contains("ambiguous_framing"));
            }
            None => assert!(response.is_err(), "differing lengths were accepted"),
        }
    }
    assert_eq!(
        b.sandbox.calls(),
        1,
        "only the merged HTTP/1 request minted"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_closed_and_counted() {
    let b = Broker::start(|c, _| c.server.max_connections = 2).await;
    let addr = addr_of(&b.url);
    let _one = TcpStream::connect(&addr).await.unwrap();
    let _two = TcpStream::connect(&addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (answer, closed) = raw(
        &addr,
        &head(&format!("Content-Length: {}\r\n", FORM.len()), FORM),
        Duration::from_secs(3),
    )
    .await;
    assert!(closed && answer.is_empty(), "{answer}");
    let m = b.metrics().await;
    assert!(
        m.contains("token_broker_server_connections_rejected_total 1"),
        "{m}"
    );
    assert!(m.contains("token_broker_server_connections_open 2"), "{m}");
    drop((_one, _two));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(b.tokens(CHECKOUT_SECRET, FORM).await.status, StatusCode::OK);
    b.stop().await;
}

/// Tries a token request on a new connection until one is served, for at most `limit`: how long
/// a valid caller is kept out.
async fn served_within(addr: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let request = head(
            &format!("Connection: close\r\nContent-Length: {}\r\n", FORM.len()),
            FORM,
        );
        let (answer, _) = raw(addr, &request, Duration::from_secs(2)).await;
        if answer.starts_with("HTTP/1.1 200") {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "a valid caller was kept out for {:?}: {answer:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sockets that hold a place without a request in progress are closed after
/// `server.header_read_timeout`: one that says nothing, one that sent half an HTTP/2 preface,
/// an HTTP/2 session that answers pings but asks nothing, and a kept-alive HTTP/1.1 connection
/// after its request. So they cannot keep a valid caller out for longer than that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_half_preface_and_idle_sessions_cannot_keep_a_caller_out() {
    let idle = Duration::from_millis(800);
    let b = Broker::start(|c, _| {
        c.server.max_connections = 4;
        c.server.header_read_timeout = idle;
    })
    .await;
    let addr = addr_of(&b.url);
    let silent = TcpStream::connect(&addr).await.unwrap();
    let mut half = TcpStream::connect(&addr).await.unwrap();
    half.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let (mut h2_client, h2_connection) =
        h2::client::handshake(TcpStream::connect(&addr).await.unwrap())
            .await
            .unwrap();
    let h2_session = tokio::spawn(h2_connection);
    // The session is up: its SETTINGS were exchanged.
    h2_client = h2_client.ready().await.unwrap();
    let mut kept = TcpStream::connect(&addr).await.unwrap();
    kept.write_all(&head(&format!("Content-Length: {}\r\n", FORM.len()), FORM))
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = kept.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Every place is taken now; within the idle limit and a little, a caller is served.
    let waited = served_within(&addr, idle + Duration::from_secs(3)).await;
    assert!(
        waited >= Duration::from_millis(300),
        "no place was held: {waited:?}"
    );
    // The HTTP/2 session was ended by the broker.
    tokio::time::timeout(Duration::from_secs(3), h2_session)
        .await
        .expect("the idle HTTP/2 session is still open")
        .unwrap()
        .ok();
    // The clients keep their ends open: each of the four is closed by the broker, not by its
    // client going away. One that has not finished closing one idle period after the broker
    // began to close it is dropped then, and only then counted: the last ones are counted up to
    // two idle periods after they opened.
    let idle_closed = || async {
        b.metrics()
            .await
            .lines()
            .find_map(|l| {
                l.strip_prefix(
                    r#"token_broker_server_connections_closed_total{listener="caller",reason="idle"} "#,
                )
            })
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    wait_for(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || async { idle_closed().await >= 4.0 },
        || "fewer than the four idle connections were closed for idling".to_owned(),
    )
    .await;
    drop((silent, half, h2_client, kept));
    b.stop().await;
}

/// A connection still in use is closed when it is older than `server.max_connection_age`, after
/// its request in progress is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_older_than_its_max_age_is_closed_gracefully() {
    let b = Broker::start(|c, _| c.server.max_connection_age = Duration::from_secs(1)).await;
    let (mut client, connection) =
        h2::client::handshake(TcpStream::connect(addr_of(&b.url)).await.unwrap())
            .await
            .unwrap();
    let session = tokio::spawn(connection);
    let started = Instant::now();
    let mut served = 0;
    while !session.is_finished() && started.elapsed() < Duration::from_secs(5) {
        let Ok(ready) = client.clone().ready().await else {
            break;
        };
        client = ready;
        let req = Request::post("/v1/tokens")
            .header("authorization", format!("Bearer {CHECKOUT_SECRET}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("content-length", FORM.len().to_string())
            .body(())
            .unwrap();
        let Ok((response, mut body)) = client.send_request(req, false) else {
            break;
        };
        let _ = body.send_data(Bytes::from(FORM), true);
        match response.await {
            Ok(r) => {
                assert_eq!(r.status(), StatusCode::OK);
                served += 1;
            }
            Err(_) => break,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lived = started.elapsed();
    assert!(served >= 3, "{served} requests served");
    assert!(
        lived >= Duration::from_millis(900) && lived < Duration::from_secs(4),
        "the connection lived {lived:?}"
    );
    let m = b.metrics().await;
    assert!(
        m.contains(
            r#"token_broker_server_connections_closed_total{listener="caller",reason="age"} 1"#
        ),
        "{m}"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_at_most_its_share_of_connections() {
    let b = Broker::start(|c, _| c.server.max_connections_per_peer = Some(2)).await;
    let addr = addr_of(&b.url);
    let one = TcpStream::connect(&addr).await.unwrap();
    let _two = TcpStream::connect(&addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (answer, closed) = raw(
        &addr,
        &head(&format!("Content-Length: {}\r\n", FORM.len()), FORM),
        Duration::from_secs(2),
    )
    .await;
    assert!(closed && answer.is_empty(), "{answer}");
    drop(one);
    served_within(&addr, Duration::from_secs(3)).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_after_its_tls_handshake_is_closed_too() {
    let b = tls_broker(|c| {
        c.server.max_connections = 1;
        c.server.header_read_timeout = Duration::from_millis(800);
    })
    .await;
    let port = b.url.split(':').nth(2).unwrap().split('/').next().unwrap();
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(tls_client_config(&b.pki.ca_pem(), None)));
    let tcp = TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut silent = connector.connect(name, tcp).await.unwrap();
    let started = Instant::now();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut byte)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "still open: {read:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    let client = https_client(&b.pki.ca_pem(), None);
    let r = https_post(&client, &b.url, Some(BILLING_SECRET), FORM)
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_connections_are_held_to_the_stream_cap() {
    let b = Broker::start(|c, _| c.server.http2_max_streams = 7).await;
    let tcp = TcpStream::connect(addr_of(&b.url)).await.unwrap();
    let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    // One exchange, so the broker's SETTINGS have certainly arrived.
    let req = Request::post("/v1/tokens")
        .header("authorization", format!("Bearer {CHECKOUT_SECRET}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("content-length", FORM.len().to_string())
        .body(())
        .unwrap();
    let (response, mut body) = client.send_request(req, false).unwrap();
    body.send_data(Bytes::from(FORM), true).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(client.current_max_send_streams(), 7);
    b.stop().await;
}

/// One caller deleting an unrelated user in a loop changes nothing for another caller: its
/// repeat requests are hits, even while its mints are in flight during those deletes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_callers_deletes_do_not_change_a_callers_hit_ratio() {
    let b = Broker::start(|_, o| o.delay = Duration::from_millis(150)).await;
    let url = b.url.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let deleting = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                send(
                    Method::DELETE,
                    &format!("{url}/v1/tokens?account_id=somebody-else"),
                    &[("authorization", &format!("Bearer {BILLING_SECRET}"))],
                    "",
                )
                .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let mut caches = Vec::new();
    for _ in 0..6 {
        caches.push(
            b.tokens(CHECKOUT_SECRET, FORM)
                .await
                .header("x-cache")
                .to_owned(),
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    stop.store(true, Ordering::Relaxed);
    deleting.await.unwrap();
    assert_eq!(caches, ["MISS", "HIT", "HIT", "HIT", "HIT", "HIT"]);
    assert_eq!(b.sandbox.calls(), 1);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_beyond_a_callers_rate_get_429_with_retry_after() {
    let b = Broker::start(|c, _| c.cache.invalidate_rate = 3).await;
    let delete = |secret: &'static str| {
        let url = b.url.clone();
        async move {
            send(
                Method::DELETE,
                &format!("{url}/v1/tokens?account_id=user-1"),
                &[("authorization", &format!("Bearer {secret}"))],
                "",
            )
            .await
        }
    };
    for _ in 0..3 {
        assert_eq!(delete(CHECKOUT_SECRET).await.status, StatusCode::OK);
    }
    let refused = delete(CHECKOUT_SECRET).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.json()["error"], "invalidation_rate_exceeded");
    assert!(!refused.header("retry-after").is_empty());
    // Another caller has a rate of its own.
    assert_eq!(delete(BILLING_SECRET).await.status, StatusCode::OK);
    b.stop().await;
}

/// A broker run from a config file, with reload enabled.
struct FileBroker {
    url: String,
    admin: String,
    webhooks: Option<String>,
    path: PathBuf,
    key_path: PathBuf,
    config: Config,
    sandbox: Sandbox,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FileBroker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FileBroker {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sandbox = Sandbox::start(SandboxOptions::new(MASTER_KEY))
            .await
            .unwrap();
        sandbox.set_options(|o| o.delay = Duration::from_millis(50));
        let key_path = write(dir.path(), "key", MASTER_KEY);
        let mut cfg = config(&sandbox.url());
        cfg.upstream.api_key_file = Some(key_path.clone());
        cfg.upstream.identity_url = sandbox.url();
        tweak(&mut cfg);
        let path = dir.path().join("broker.toml");
        std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
        let loaded = Config::load(&path).unwrap();
        let server = Server::from_config(&loaded, loaded.master_key().unwrap())
            .await
            .unwrap();
        server.reload_from(path.clone(), loaded.clone()).unwrap();
        let url = format!("http://{}", server.caller_addr().unwrap());
        let admin = format!("http://{}", server.admin_addr().unwrap());
        let webhooks = server
            .webhook_addr()
            .map(|a| format!("http://{a}/webhooks/truora"));
        let task = tokio::spawn(server.run(std::future::pending()));
        FileBroker {
            url,
            admin,
            webhooks,
            path,
            key_path,
            config: loaded,
            sandbox,
            _dir: dir,
            task,
        }
    }

    fn rewrite(&mut self, f: impl FnOnce(&mut Config)) {
        f(&mut self.config);
        std::fs::write(&self.path, toml::to_string(&self.config).unwrap()).unwrap();
    }

    async fn reload(&self) -> Resp {
        send(
            Method::POST,
            &format!("{}/admin/reload", self.admin),
            &[],
            "",
        )
        .await
    }

    async fn tokens(&self, secret: &str, form: &str) -> Resp {
        post_tokens(&self.url, secret, form).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_rotates_the_webhook_secret_and_names_a_listener_change_as_needing_a_restart() {
    let mut b = FileBroker::start_with(with_webhooks).await;
    let hooks = b.webhooks.clone().unwrap();
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let created =
        token_broker::sandbox::sign_hs256(b"k", &format!(r#"{{"event":"created","iat":{iat}}}"#));
    let deliver = |secret: &str| {
        let (hooks, created, auth) = (hooks.clone(), created.clone(), format!("Bearer {secret}"));
        async move {
            send(Method::POST, &hooks, &[("authorization", &auth)], &created)
                .await
                .status
        }
    };
    assert_eq!(deliver(WEBHOOK_SECRET).await, StatusCode::OK);
    let rotated = "rotated-webhook-secret-0123456789";
    b.rewrite(|c| {
        c.webhooks.as_mut().unwrap().token_sha256 = SecretDigest::of(rotated.as_bytes()).to_hex();
    });
    let r = b.reload().await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["restart_required"], serde_json::json!([]));
    assert_eq!(deliver(WEBHOOK_SECRET).await, StatusCode::UNAUTHORIZED);
    assert_eq!(deliver(rotated).await, StatusCode::OK);
    b.rewrite(|c| c.webhooks.as_mut().unwrap().max_connections = 7);
    let r = b.reload().await;
    assert_eq!(
        r.json()["restart_required"],
        serde_json::json!(["webhooks"])
    );
    // The rest of the reload applied: the secret stays the rotated one.
    assert_eq!(deliver(rotated).await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_revokes_callers_at_once_cached_tokens_included() {
    let mut b = FileBroker::start().await;
    assert_eq!(b.tokens(BILLING_SECRET, FORM).await.status, StatusCode::OK);
    let newcomer = "newcomer-secret-0123456789abcdef";
    b.rewrite(|c| {
        c.clients.retain(|c| c.id != "billing");
        c.clients.push(ClientConfig {
            id: "newcomer".into(),
            token_sha256: Some(SecretDigest::of(newcomer.as_bytes()).to_hex()),
            ..Default::default()
        });
    });
    assert_eq!(
        b.tokens(newcomer, FORM).await.status,
        StatusCode::UNAUTHORIZED
    );
    let r = b.reload().await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["revoked"], serde_json::json!(["billing"]));
    assert_eq!(b.tokens(newcomer, FORM).await.status, StatusCode::OK);
    assert_eq!(
        b.tokens(BILLING_SECRET, FORM).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(b.tokens(CHECKOUT_SECRET, FORM).await.status, StatusCode::OK);
    // billing's cached token is gone: restoring billing mints afresh.
    b.rewrite(|c| {
        c.clients.push(ClientConfig {
            id: "billing".into(),
            token_sha256: Some(SecretDigest::of(BILLING_SECRET.as_bytes()).to_hex()),
            ..Default::default()
        });
    });
    assert_eq!(b.reload().await.status, StatusCode::OK);
    assert_eq!(
        b.tokens(BILLING_SECRET, FORM).await.header("x-cache"),
        "MISS"
    );
}

/// Two overlapping reloads apply in the order they read: the first reads its config, then blocks
/// on its master-key file (a FIFO) while the file is rewritten and a second reload starts; the
/// second must wait, so the newer file is the one in force at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_reloads_never_apply_an_older_file_last() {
    let mut b = FileBroker::start().await;
    let fifo = b.path.with_file_name("key.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    // Older: billing removed, the key read from the FIFO.
    b.rewrite(|c| {
        c.clients.retain(|c| c.id != "billing");
        c.upstream.api_key_file = Some(fifo.clone());
    });
    let admin = b.admin.clone();
    let reload = move || {
        let admin = admin.clone();
        tokio::spawn(
            async move { send(Method::POST, &format!("{admin}/admin/reload"), &[], "").await },
        )
    };
    let older = reload();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Newer: billing back, and the regular key file.
    let key_path = b.key_path.clone();
    b.rewrite(|c| {
        c.clients.push(ClientConfig {
            id: "billing".into(),
            token_sha256: Some(SecretDigest::of(BILLING_SECRET.as_bytes()).to_hex()),
            ..Default::default()
        });
        c.upstream.api_key_file = Some(key_path);
    });
    let newer = reload();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Let the older one go on: its key arrives.
    tokio::task::spawn_blocking(move || std::fs::write(&fifo, MASTER_KEY).unwrap())
        .await
        .unwrap();
    assert_eq!(older.await.unwrap().status, StatusCode::OK);
    assert_eq!(newer.await.unwrap().status, StatusCode::OK);
    assert_eq!(
        b.tokens(BILLING_SECRET, FORM).await.status,
        StatusCode::OK,
        "the older file was applied last"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_caller_loses_its_cached_pass_through_results_too() {
    const RESULT: &str = "/truora/identity/v1/processes/IDP1/result";
    let mut b = FileBroker::start_with(|c| {
        c.cache.result_ttl = Duration::from_secs(600);
        c.clients[1].passthrough = vec!["GET /truora/identity/v1/processes/*/result".into()];
    })
    .await;
    let read = |url: String| async move {
        send(
            Method::GET,
            &format!("{url}{RESULT}"),
            &[("authorization", &format!("Bearer {BILLING_SECRET}"))],
            "",
        )
        .await
    };
    assert_eq!(read(b.url.clone()).await.header("x-cache"), "MISS");
    assert_eq!(read(b.url.clone()).await.header("x-cache"), "HIT");
    let billing = b
        .config
        .clients
        .iter()
        .find(|c| c.id == "billing")
        .unwrap()
        .clone();
    b.rewrite(|c| c.clients.retain(|c| c.id != "billing"));
    assert_eq!(b.reload().await.status, StatusCode::OK);
    b.rewrite(|c| c.clients.push(billing));
    assert_eq!(b.reload().await.status, StatusCode::OK);
    assert_eq!(read(b.url.clone()).await.header("x-cache"), "MISS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_new_config_is_refused_and_the_old_one_kept() {
    let b = FileBroker::start().await;
    std::fs::write(&b.path, "[server]\nlisten = 5\n").unwrap();
    let r = b.reload().await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.json()["reloaded"], false);
    assert!(r.json()["message"].as_str().unwrap().contains("listen"));
    assert_eq!(b.tokens(CHECKOUT_SECRET, FORM).await.status, StatusCode::OK);
    let m = send(Method::GET, &format!("{}/metrics", b.admin), &[], "")
        .await
        .text();
    assert!(
        m.contains(r#"token_broker_config_reloads_total{result="error"} 1"#),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_refused_for_a_parse_error_never_shows_the_line() {
    let b = FileBroker::start().await;
    let password = "CANARY-redis-password-9c2b";
    let text = std::fs::read_to_string(&b.path).unwrap();
    std::fs::write(
        &b.path,
        format!("{text}\n[cache.shared]\nurl = \"redis://:{password}@127.0.0.1:6379\" x\n"),
    )
    .unwrap();
    let r = b.reload().await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let message = r.json()["message"].as_str().unwrap().to_owned();
    assert!(message.contains("cache.shared.url"), "{message}");
    assert!(!r.text().contains(password), "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_master_key_is_used_after_reload() {
    let b = FileBroker::start().await;
    let rotated = "CANARY-rotated-master-key-42";
    b.sandbox.set_options(|o| o.master_key = rotated.into());
    let r = b.tokens(CHECKOUT_SECRET, FORM).await;
    assert_eq!(r.json()["error"], "upstream_credential_rejected");
    std::fs::write(&b.key_path, format!("{rotated}\n")).unwrap();
    let r = b.reload().await;
    assert_eq!(r.status, StatusCode::OK);
    // The answer says which key is now in use, without showing it.
    assert_eq!(
        r.json()["key_fingerprint"],
        MasterKey::new(rotated).unwrap().fingerprint()
    );
    let r = b.tokens(CHECKOUT_SECRET, FORM).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(b.sandbox.received().last().unwrap().key_matched);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_finish_on_the_settings_they_started_with() {
    let mut b = FileBroker::start().await;
    b.sandbox
        .set_options(|o| o.delay = Duration::from_millis(600));
    let url = b.url.clone();
    let in_flight = tokio::spawn(async move {
        send(
            Method::POST,
            &format!("{url}/v1/tokens"),
            &[
                ("authorization", &format!("Bearer {BILLING_SECRET}")),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            FORM,
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    b.rewrite(|c| c.clients.retain(|c| c.id != "billing"));
    assert_eq!(b.reload().await.status, StatusCode::OK);
    assert_eq!(in_flight.await.unwrap().status, StatusCode::OK);
    assert_eq!(
        b.tokens(BILLING_SECRET, FORM).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_that_need_a_restart_are_named_not_applied() {
    let mut b = FileBroker::start().await;
    b.rewrite(|c| c.cache.max_entries = 5);
    let r = b.reload().await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["restart_required"], serde_json::json!(["cache"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_has_no_file_to_reload() {
    let b = Broker::start(|_, _| {}).await;
    let r = send(Method::POST, &format!("{}/admin/reload", b.admin), &[], "").await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    b.stop().await;
}
