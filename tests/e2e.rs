//! End to end: real sockets on loopback, the broker in this process, the sandbox Truora behind
//! it counting calls and failing on demand.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use token_broker::sandbox::Fault;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_master_key_is_injected_and_caller_credentials_are_not_forwarded() {
    let b = Broker::start(|_, _| {}).await;
    let r = b.tokens(CHECKOUT_SECRET, FORM).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let received = b.sandbox.received();
    assert_eq!(received.len(), 1);
    assert!(received[0].key_matched);
    assert!(!received[0].authorization_present);
    let form = &received[0].form;
    assert!(form.contains(&("key_type".into(), "web".into())));
    assert!(form.contains(&("grant".into(), "digital-identity".into())));
    assert!(form.contains(&("redirect_url".into(), "https://shop.example/done".into())));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_identical_misses_make_one_upstream_call() {
    let b = Broker::start(|_, s| s.delay = Duration::from_millis(300)).await;
    let b = std::sync::Arc::new(b);
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let b = std::sync::Arc::clone(&b);
        tasks.push(tokio::spawn(async move {
            b.tokens(CHECKOUT_SECRET, FORM).await
        }));
    }
    let mut keys = HashSet::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        keys.insert(r.json()["api_key"].as_str().unwrap().to_owned());
    }
    assert_eq!(keys.len(), 1, "every waiter gets the one token");
    assert_eq!(b.sandbox.calls(), 1);
    let metrics = b.metrics().await;
    assert!(
        metrics.contains(r#"token_broker_cache_lookups_total{result="miss"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"token_broker_upstream_requests_total{outcome="ok"} 1"#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reordered_fields_hit_the_same_token() {
    let b = Broker::start(|_, _| {}).await;
    let first = b.tokens(CHECKOUT_SECRET, FORM).await;
    let reordered = "account_id=user-1&redirect_url=https%3A%2F%2Fshop.example%2Fdone&flow_id=IPF0a1b2c&country=CO";
    let second = b.tokens(CHECKOUT_SECRET, reordered).await;
    assert_eq!(second.header("x-cache"), "HIT");
    assert_eq!(second.json()["cache"], "hit");
    assert_eq!(first.json()["api_key"], second.json()["api_key"]);
    assert_eq!(b.sandbox.calls(), 1);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_caller_or_another_user_misses() {
    let b = Broker::start(|_, _| {}).await;
    let a = b.tokens(CHECKOUT_SECRET, FORM).await.json();
    let other_caller = b.tokens(BILLING_SECRET, FORM).await;
    assert_eq!(other_caller.header("x-cache"), "MISS");
    let other_user = b
        .tokens(CHECKOUT_SECRET, &FORM.replace("user-1", "user-2"))
        .await;
    assert_eq!(other_user.header("x-cache"), "MISS");
    assert_ne!(a["api_key"], other_caller.json()["api_key"]);
    assert_ne!(a["api_key"], other_user.json()["api_key"]);
    assert_eq!(b.sandbox.calls(), 3);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_naming_no_user_is_minted_every_time() {
    let b = Broker::start(|_, _| {}).await;
    let anon = "country=CO&flow_id=IPF0a1b2c&redirect_url=https%3A%2F%2Fshop.example%2Fdone";
    let x = b.tokens(CHECKOUT_SECRET, anon).await;
    let y = b.tokens(CHECKOUT_SECRET, anon).await;
    assert_eq!((x.header("x-cache"), y.header("x-cache")), ("MISS", "MISS"));
    assert_ne!(x.json()["api_key"], y.json()["api_key"]);
    assert_eq!(b.sandbox.calls(), 2);
    assert!(b
        .metrics()
        .await
        .contains(r#"token_broker_cache_lookups_total{result="uncacheable"} 2"#));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_not_served_inside_min_remaining() {
    // Tokens live 3 s and must keep 2 s: a token may be reused for about 1 s only.
    let b = Broker::start(|c, s| {
        c.cache.min_remaining = Duration::from_secs(2);
        s.token_lifetime = Duration::from_secs(3);
    })
    .await;
    let first = b.tokens(CHECKOUT_SECRET, FORM).await.json();
    let hit = b.tokens(CHECKOUT_SECRET, FORM).await;
    assert_eq!(hit.header("x-cache"), "HIT");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let later = b.tokens(CHECKOUT_SECRET, FORM).await;
    assert_eq!(later.header("x-cache"), "MISS");
    assert_ne!(first["api_key"], later.json()["api_key"]);
    assert!(later.json()["expires_in"].as_u64().unwrap() >= 2);
    assert_eq!(b.sandbox.calls(), 2);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skewed_upstream_clock_does_not_shorten_or_stretch_the_lifetime() {
    // Truora's clock a day behind: exp is in our past, yet the token has its two hours.
    let b = Broker::start(|_, s| s.clock_skew_secs = -86_400).await;
    let r = b.tokens(CHECKOUT_SECRET, FORM).await;
    assert_eq!(r.status, StatusCode::OK);
    let expires_in = r.json()["expires_in"].as_u64().unwrap();
    assert!((7190..=7200).contains(&expires_in), "{expires_in}");
    assert_eq!(
        b.tokens(CHECKOUT_SECRET, FORM).await.header("x-cache"),
        "HIT"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_read_from_code_when_api_key_is_absent() {
    let b = Broker::start(|_, s| s.code_field = true).await;
    let r = b.tokens(CHECKOUT_SECRET, FORM).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(r.json()["api_key"].as_str().unwrap().starts_with("eyJ"));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answer_carries_identity_url_and_expiry() {
    let b = Broker::start(|_, _| {}).await;
    let r = b.tokens(CHECKOUT_SECRET, FORM).await;
    assert_eq!(r.header("cache-control"), "no-store");
    assert_eq!(r.header("content-type"), "application/json");
    let v = r.json();
    let key = v["api_key"].as_str().unwrap();
    assert_eq!(
        v["identity_url"],
        format!("https://identity.truora.com/?token={key}")
    );
    assert!(v["expires_at"].as_str().unwrap().ends_with('Z'));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_never_reach_the_caller_as_their_own() {
    let b = Broker::start(|c, _| c.upstream.timeout = Duration::from_millis(500)).await;
    let cases = [
        (Fault::Status(401), 502, "upstream_credential_rejected"),
        (Fault::Status(403), 502, "upstream_credential_rejected"),
        (Fault::Status(500), 502, "upstream_unavailable"),
        (Fault::Status(400), 502, "upstream_rejected_request"),
        (Fault::Body("not json".into()), 502, "upstream_bad_response"),
        (
            Fault::Body(r#"{"message":"ok"}"#.into()),
            502,
            "upstream_bad_response",
        ),
        (Fault::Hang, 504, "upstream_timeout"),
    ];
    for (fault, status, code) in cases {
        b.sandbox.set_fault(Some(fault.clone()));
        let r = b.tokens(CHECKOUT_SECRET, FORM).await;
        assert_eq!(r.status.as_u16(), status, "{fault:?}: {}", r.text());
        assert_eq!(r.json()["error"], code, "{fault:?}");
        assert!(
            !r.text().contains("Insufficient permissions"),
            "upstream body echoed"
        );
        assert!(
            !r.text().contains("Internal server error"),
            "upstream body echoed"
        );
    }
    // Nothing was cached: with Truora back, the next request mints.
    b.sandbox.set_fault(None);
    let r = b.tokens(CHECKOUT_SECRET, FORM).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-cache"), "MISS");
    let metrics = b.metrics().await;
    assert!(metrics
        .contains(r#"token_broker_upstream_requests_total{outcome="credential_rejected"} 2"#));
    assert!(metrics.contains(r#"token_broker_upstream_requests_total{outcome="timeout"} 1"#));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_429_passes_its_retry_after_on() {
    let b = Broker::start(|_, _| {}).await;
    b.sandbox.set_fault(Some(Fault::Status(429)));
    let r = b.tokens(CHECKOUT_SECRET, FORM).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.header("retry-after"), "2");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_without_an_upstream_call() {
    let b = Broker::start(|_, _| {}).await;
    let cases = [
        (format!("{FORM}&key_type=backend"), 400, "key_type"),
        (format!("{FORM}&grant=signals"), 400, "grant"),
        (FORM.replace("CO", "US"), 400, "country"),
        (format!("{FORM}&document_type=selfie"), 400, "document_type"),
        (FORM.replace("https%3A", "http%3A"), 400, "redirect_url"),
        (FORM.replace("user-1", "user%201"), 400, "account_id"),
        (format!("{FORM}&phone=573100000000"), 400, "phone"),
        (format!("{FORM}&emails=not-an-email"), 400, "emails"),
        (format!("{FORM}&country=BR"), 400, "country"),
        (format!("{FORM}&surprise=1"), 400, "surprise"),
        (FORM.replace("flow_id=IPF0a1b2c&", ""), 400, "flow_id"),
    ];
    for (form, status, field) in cases {
        let r = b.tokens(CHECKOUT_SECRET, &form).await;
        assert_eq!(r.status.as_u16(), status, "{form}: {}", r.text());
        assert_eq!(r.json()["field"], field, "{form}");
        assert!(!r.json()["message"].as_str().unwrap().is_empty());
    }
    let big = format!("{FORM}&start_variables.metadata.x={}", "a".repeat(20_000));
    assert_eq!(
        b.tokens(CHECKOUT_SECRET, &big).await.status,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    let r = send(
        Method::POST,
        &format!("{}/v1/tokens", b.url),
        &[
            ("authorization", &format!("Bearer {CHECKOUT_SECRET}")),
            ("content-type", "text/plain"),
        ],
        FORM,
    )
    .await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let r = send(
        Method::POST,
        &format!("{}/v1/tokens", b.url),
        &[
            ("authorization", &format!("Bearer {CHECKOUT_SECRET}")),
            ("content-type", "application/x-www-form-urlencoded"),
            ("truora-api-key", "some-key"),
        ],
        FORM,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = b.tokens("wrong-secret", FORM).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.header("www-authenticate").starts_with("Bearer"));
    assert_eq!(b.sandbox.calls(), 0);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drop_in_endpoint_speaks_truoras_shapes() {
    let b = Broker::start(|_, _| {}).await;
    let headers = [
        ("authorization", format!("Bearer {CHECKOUT_SECRET}")),
        ("content-type", "application/x-www-form-urlencoded".into()),
    ];
    let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let url = format!("{}/v1/api-keys", b.url);
    let body = format!("key_type=web&grant=digital-identity&{FORM}");
    let ok = send(Method::POST, &url, &h, &body).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.json()["message"], "API key created successfully");
    // The drop-in and the native endpoint share the cached token.
    let native = b.tokens(CHECKOUT_SECRET, FORM).await;
    assert_eq!(native.header("x-cache"), "HIT");
    assert_eq!(native.json()["api_key"], ok.json()["api_key"]);
    let bad = send(Method::POST, &url, &h, "key_type=backend").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.json()["code"], 10400);
    assert_eq!(bad.json()["http_code"], 400);
    b.sandbox.set_fault(Some(Fault::Status(401)));
    let rejected = send(Method::POST, &url, &h, &body.replace("user-1", "user-9")).await;
    assert_eq!(rejected.status, StatusCode::BAD_GATEWAY);
    assert_eq!(rejected.json()["http_code"], 502);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_drops_only_the_callers_matching_tokens() {
    let b = Broker::start(|_, _| {}).await;
    b.tokens(CHECKOUT_SECRET, FORM).await;
    b.tokens(BILLING_SECRET, FORM).await;
    let r = send(
        Method::DELETE,
        &format!("{}/v1/tokens?flow_id=IPF0a1b2c&account_id=user-1", b.url),
        &[("authorization", &format!("Bearer {CHECKOUT_SECRET}"))],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["invalidated"], 1);
    assert_eq!(
        b.tokens(CHECKOUT_SECRET, FORM).await.header("x-cache"),
        "MISS"
    );
    assert_eq!(
        b.tokens(BILLING_SECRET, FORM).await.header("x-cache"),
        "HIT"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_never_serves_the_token_api() {
    let b = Broker::start(|_, _| {}).await;
    let r = send(
        Method::POST,
        &format!("{}/v1/tokens", b.admin),
        &[
            ("authorization", &format!("Bearer {CHECKOUT_SECRET}")),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        FORM,
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    for path in ["/healthz", "/readyz"] {
        let r = send(Method::GET, &format!("{}{path}", b.admin), &[], "").await;
        assert_eq!(r.status, StatusCode::OK);
    }
    assert_eq!(b.sandbox.calls(), 0);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_master_key_appears_in_no_response_or_metric() {
    let b = Broker::start(|c, _| {
        c.upstream.timeout = Duration::from_millis(300);
        c.upstream.deadline = Duration::from_millis(500);
    })
    .await;
    let mut seen = String::new();
    for (i, fault) in [
        None,
        Some(Fault::Status(401)),
        Some(Fault::Status(500)),
        Some(Fault::Status(429)),
        Some(Fault::Body("{}".into())),
        Some(Fault::Hang),
    ]
    .into_iter()
    .enumerate()
    {
        b.sandbox.set_fault(fault);
        seen += &b
            .tokens(
                CHECKOUT_SECRET,
                &FORM.replace("user-1", &format!("u-leak-{i}")),
            )
            .await
            .everything();
        seen += &b.tokens(CHECKOUT_SECRET, "country=XX").await.everything();
        seen += &b.tokens("bad", FORM).await.everything();
    }
    seen += &b.metrics().await;
    assert!(seen.contains("upstream_credential_rejected"));
    assert!(!seen.contains(MASTER_KEY), "master key leaked");
    assert!(!seen.contains(CHECKOUT_SECRET), "caller secret leaked");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_values_stay_bounded_whatever_the_users_and_flows() {
    let b = Broker::start(|_, _| {}).await;
    b.tokens(CHECKOUT_SECRET, FORM).await;
    let before = b
        .metrics()
        .await
        .lines()
        .filter(|l| !l.starts_with('#'))
        .count();
    for i in 0..30 {
        let form = FORM
            .replace("user-1", &format!("user-{i}"))
            .replace("IPF0a1b2c", &format!("IPF{i}"));
        b.tokens(CHECKOUT_SECRET, &form).await;
    }
    let text = b.metrics().await;
    let after = text.lines().filter(|l| !l.starts_with('#')).count();
    assert_eq!(before, after, "series grew with users or flows");
    assert!(!text.contains("user-7"));
    b.stop().await;
}
