//! Pass-through end to end: callers reach Truora's other endpoints through the broker, which
//! checks each caller's allowlist, injects the master key, strips what must not travel and
//! streams the bodies; the sandbox Truora records what reached it.

mod common;

use std::time::Duration;

use common::*;

use http::{Method, StatusCode};

const RESULT: &str = "GET /truora/identity/v1/processes/*/result";

fn auth(secret: &str) -> String {
    format!("Bearer {secret}")
}

async fn get(b: &Broker, secret: &str, path: &str) -> Resp {
    send(
        Method::GET,
        &format!("{}{path}", b.url),
        &[("authorization", &auth(secret))],
        "",
    )
    .await
}

async fn broker(tweak: impl FnOnce(&mut token_broker::config::Config)) -> Broker {
    Broker::start(|c, _| {
        c.clients[0].passthrough = vec![
            RESULT.into(),
            "GET /truora/identity/v1/stream".into(),
            "POST /truora/account/v1/upload".into(),
        ];
        tweak(c);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_call_reaches_truora_with_the_master_key_and_without_the_callers_secret() {
    let b = broker(|_| {}).await;
    let r = get(
        &b,
        CHECKOUT_SECRET,
        "/truora/identity/v1/processes/IDP1/result?lang=es",
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{} {:?}",
        r.text(),
        b.sandbox.forwarded()
    );
    assert_eq!(r.json()["status"], "success");
    let seen = b.sandbox.forwarded();
    assert_eq!(seen.len(), 1);
    let f = &seen[0];
    assert!(f.key_matched, "the master key was injected");
    assert_eq!(f.path_and_query, "/v1/processes/IDP1/result?lang=es");
    assert!(!f.header_names.iter().any(|h| h == "authorization"));
    assert_eq!(
        f.host,
        b.sandbox.url().trim_start_matches("http://"),
        "Host rewritten"
    );
    assert_eq!(f.forwarded_for, "127.0.0.1");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anything_off_the_allowlist_is_403_and_never_reaches_truora() {
    let b = broker(|_| {}).await;
    for (secret, method, path) in [
        (
            CHECKOUT_SECRET,
            Method::GET,
            "/truora/identity/v1/processes",
        ),
        (
            CHECKOUT_SECRET,
            Method::DELETE,
            "/truora/identity/v1/processes/IDP1/result",
        ),
        (
            CHECKOUT_SECRET,
            Method::GET,
            "/truora/identity/v1/processes/IDP1/result/extra",
        ),
        (
            CHECKOUT_SECRET,
            Method::GET,
            "/truora/account/v1/processes/IDP1/result",
        ),
        // billing has no passthrough entry at all.
        (
            BILLING_SECRET,
            Method::GET,
            "/truora/identity/v1/processes/IDP1/result",
        ),
    ] {
        let r = send(
            method.clone(),
            &format!("{}{path}", b.url),
            &[("authorization", &auth(secret))],
            "",
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{method} {path}");
        assert_eq!(r.json()["rule"], "passthrough");
    }
    let r = send(
        Method::GET,
        &format!("{}/truora/identity/v1/processes/IDP1/result", b.url),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(b.sandbox.forwarded().is_empty());
    let m = b.metrics().await;
    assert!(
        m.contains(r#"token_broker_passthrough_requests_total{pattern="denied",status="403"} 5"#),
        "{m}"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_that_could_slip_past_the_allowlist_are_refused() {
    let b = broker(|_| {}).await;
    for path in [
        "/truora/identity/v1/processes/x/../../stream/result",
        "/truora/identity/v1/processes/a%2Fb/result",
        "/truora/identity/v1/processes//result",
    ] {
        let r = get(&b, CHECKOUT_SECRET, path).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}");
    }
    assert!(b.sandbox.forwarded().is_empty());
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_parameters_and_escapes_are_refused_before_truora() {
    let b = broker(|_| {}).await;
    for path in [
        "/truora/identity/v1/processes/IDP1;v=2/result",
        "/truora/identity/v1/processes/IDP1%00/result",
        "/truora/identity/v1/processes/IDP%251/result",
        "/truora/identity/v1/processes/IDP1%3F/result",
    ] {
        let r = get(&b, CHECKOUT_SECRET, path).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}");
    }
    assert!(b.sandbox.forwarded().is_empty());
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mint_endpoint_can_neither_be_allowlisted_nor_reached() {
    for pattern in [
        "POST /truora/account/*/*",
        "POST /truora/account/v1/api-keys",
        "GET /truora/account/v1/api-keys/*",
    ] {
        let mut cfg = config("http://127.0.0.1:9");
        cfg.clients[0].passthrough = vec![pattern.into()];
        cfg.validate().unwrap();
        let err = token_broker::app::Broker::from_config(
            &cfg,
            token_broker::secret::MasterKey::new(MASTER_KEY).unwrap(),
        )
        .await
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.contains("clients[0].passthrough[0]") && err.contains("mint endpoint"),
            "{pattern}: {err}"
        );
    }
    let b = broker(|_| {}).await;
    for path in [
        "/truora/account/v1/api-keys",
        "/truora/account/V1/API-KEYS",
        "/truora/account/v1/api-keys/anything",
    ] {
        let r = send(
            Method::POST,
            &format!("{}{path}", b.url),
            &[
                ("authorization", &auth(CHECKOUT_SECRET)),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            "key_type=backend&grant=digital-identity&country=CO",
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}");
    }
    assert_eq!(b.sandbox.calls(), 0, "nothing was minted");
    assert!(b.sandbox.forwarded().is_empty());
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_that_could_redirect_the_call_at_truora_are_not_forwarded() {
    let b = broker(|_| {}).await;
    let r = send(
        Method::GET,
        &format!("{}/truora/identity/v1/processes/IDP1/result", b.url),
        &[
            ("authorization", &auth(CHECKOUT_SECRET)),
            ("x-http-method-override", "DELETE"),
            ("x-original-url", "/v1/api-keys"),
            ("x-forwarded-host", "evil.example"),
            ("forwarded", "host=evil.example"),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let f = &b.sandbox.forwarded()[0];
    for name in [
        "x-http-method-override",
        "x-original-url",
        "x-forwarded-host",
        "forwarded",
    ] {
        assert!(
            !f.header_names.iter().any(|h| h == name),
            "{name} was forwarded"
        );
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truoras_status_and_body_come_back_as_they_are_except_a_rejected_key() {
    let b = broker(|_| {}).await;
    let r = get(
        &b,
        CHECKOUT_SECRET,
        "/truora/identity/v1/processes/missing/result",
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["message"], "process not found");
    b.sandbox
        .set_options(|o| o.master_key = "rotated-elsewhere".into());
    let r = get(
        &b,
        CHECKOUT_SECRET,
        "/truora/identity/v1/processes/IDP1/result",
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.json()["error"], "upstream_credential_rejected");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_do_not_cross_in_either_direction() {
    let b = broker(|_| {}).await;
    let r = send(
        Method::GET,
        &format!("{}/truora/identity/v1/processes/IDP1/result", b.url),
        &[
            ("authorization", &auth(CHECKOUT_SECRET)),
            ("connection", "x-private"),
            ("x-private", "1"),
            ("proxy-authorization", "Basic abc"),
            ("x-forwarded-for", "10.1.2.3"),
            ("accept", "application/json"),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let f = &b.sandbox.forwarded()[0];
    for name in [
        "x-private",
        "proxy-authorization",
        "authorization",
        "connection",
    ] {
        assert!(
            !f.header_names.iter().any(|h| h == name),
            "{name} was forwarded"
        );
    }
    assert!(f.header_names.iter().any(|h| h == "accept"));
    assert_eq!(
        f.forwarded_for, "10.1.2.3, 127.0.0.1",
        "X-Forwarded-For appended"
    );
    assert!(r.headers.get("keep-alive").is_none());
    assert!(r.headers.get("proxy-authenticate").is_none());
    b.stop().await;
}

/// The peak resident memory (VmHWM) of process `pid`, in bytes.
fn peak_resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_answer_is_streamed_without_the_broker_holding_it() {
    use http_body_util::BodyExt;
    // The broker in a process of its own, so its peak memory is its alone.
    let sandbox = token_broker::sandbox::Sandbox::start(
        token_broker::sandbox::SandboxOptions::new(MASTER_KEY),
    )
    .await
    .unwrap();
    let mut cfg = config(&sandbox.url());
    cfg.upstream.identity_url = sandbox.url();
    cfg.clients[0].passthrough = vec!["GET /truora/identity/v1/stream".into()];
    let dir = tempfile::tempdir().unwrap();
    let Process { mut child, url } = Process::start(dir.path(), "broker", cfg).await;
    let pid = child.id().unwrap();
    let before = peak_resident_bytes(pid);

    const SIZE: u64 = 256 * 1024 * 1024;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let req = http::Request::get(format!("{url}/truora/identity/v1/stream?bytes={SIZE}"))
        .header("authorization", auth(CHECKOUT_SECRET))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(60), client.request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // Count the bytes as they come, keeping none of them.
    let mut body = response.into_body();
    let mut received = 0u64;
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(30), body.frame())
        .await
        .unwrap()
    {
        if let Some(data) = frame.unwrap().data_ref() {
            received += data.len() as u64;
        }
    }
    assert_eq!(received, SIZE);
    let grew = peak_resident_bytes(pid).saturating_sub(before);
    assert!(
        grew < 48 * 1024 * 1024,
        "the broker's peak memory grew by {} MiB relaying 256 MiB",
        grew >> 20
    );
    let _ = child.start_kill();
    let _ = child.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_are_streamed_up_to_the_cap() {
    let b = broker(|c| c.upstream.passthrough_max_body_bytes = 4 * 1024 * 1024).await;
    let body = "y".repeat(3 * 1024 * 1024);
    let url = format!("{}/truora/account/v1/upload", b.url);
    let r = send(
        Method::POST,
        &url,
        &[
            ("authorization", &auth(CHECKOUT_SECRET)),
            ("content-type", "application/octet-stream"),
        ],
        &body,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["received_bytes"], 3 * 1024 * 1024);
    // Over the cap: refused from its Content-Length, before any of it is read or sent on.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut raw = tokio::net::TcpStream::connect(b.url.trim_start_matches("http://"))
        .await
        .unwrap();
    let head = format!(
        "POST /truora/account/v1/upload HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nContent-Length: {}\r\n\r\n",
        auth(CHECKOUT_SECRET),
        5 * 1024 * 1024
    );
    raw.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), raw.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(
        b.sandbox.forwarded().len(),
        1,
        "the oversized body was not sent"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_results_are_cached_per_caller_and_pending_ones_never() {
    let b = broker(|c| {
        c.cache.result_ttl = Duration::from_secs(60);
        c.clients[1].passthrough = vec![RESULT.into()];
    })
    .await;
    let path = "/truora/identity/v1/processes/IDP7/result";
    let first = get(&b, CHECKOUT_SECRET, path).await;
    assert_eq!(first.header("x-cache"), "MISS");
    let second = get(&b, CHECKOUT_SECRET, path).await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.header("x-cache"), "HIT");
    assert_eq!(second.json(), first.json());
    assert_eq!(b.sandbox.forwarded().len(), 1);
    // Another caller does not get checkout's cached answer.
    assert_eq!(
        get(&b, BILLING_SECRET, path).await.header("x-cache"),
        "MISS"
    );
    let pending = "/truora/identity/v1/processes/pending-1/result";
    for _ in 0..2 {
        let r = get(&b, CHECKOUT_SECRET, pending).await;
        assert_eq!(r.json()["status"], "pending");
        assert_eq!(r.header("x-cache"), "MISS");
    }
    assert_eq!(b.sandbox.forwarded().len(), 4);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_not_cached_unless_configured() {
    let b = broker(|_| {}).await;
    let path = "/truora/identity/v1/processes/IDP7/result";
    get(&b, CHECKOUT_SECRET, path).await;
    let again = get(&b, CHECKOUT_SECRET, path).await;
    assert_eq!(again.header("x-cache"), "");
    assert_eq!(b.sandbox.forwarded().len(), 2);
    let m = b.metrics().await;
    assert!(
        m.contains(&format!(
            "token_broker_passthrough_requests_total{{pattern=\"{RESULT}\",status=\"200\"}} 2"
        )),
        "{m}"
    );
    b.stop().await;
}
