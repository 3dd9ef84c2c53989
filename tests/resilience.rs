//! Upstream resilience end to end: the sandbox Truora hangs, resets, fails, throttles or lies,
//! and callers get fast, clear answers while hits keep flowing. Durations are short and real
//! (the paused-clock versions of these rules are unit tests in src/resilience.rs).

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use token_broker::sandbox::Fault;

fn user(i: impl std::fmt::Display) -> String {
    FORM.replace("user-1", &format!("user-{i}"))
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_failure_is_retried_then_reported_as_unreachable() {
    // Point the broker at a port where nothing listens: every connect fails.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut cfg = config(&format!("http://{closed}"));
    cfg.upstream.max_retries = 2;
    cfg.upstream.retry_backoff = Duration::from_millis(20);
    let server = token_broker::app::Broker::from_config(
        &cfg,
        token_broker::secret::MasterKey::new(MASTER_KEY).unwrap(),
    )
    .await
    .unwrap();
    let url = format!("http://{}/v1/tokens", server.caller_addr().unwrap());
    let admin = format!("http://{}/metrics", server.admin_addr().unwrap());
    let task = tokio::spawn(server.run(std::future::pending()));
    let r = send(
        Method::POST,
        &url,
        &[
            ("authorization", &format!("Bearer {CHECKOUT_SECRET}")),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        FORM,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.json()["error"], "upstream_unreachable");
    let m = send(Method::GET, &admin, &[], "").await.text();
    assert_eq!(
        metric(
            &m,
            r#"token_broker_upstream_retries_total{reason="unreachable"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            r#"token_broker_upstream_requests_total{outcome="unreachable"}"#
        ),
        3.0
    );
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_after_the_request_was_sent_is_not_retried() {
    let b = Broker::start(|_, _| {}).await;
    b.sandbox.set_fault(Some(Fault::Reset));
    let r = b.tokens(CHECKOUT_SECRET, FORM).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(r.json()["error"], "upstream_connection_lost");
    assert_eq!(b.sandbox.calls(), 1);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_after_sending_is_504_and_not_retried() {
    let b = Broker::start(|c, _| c.upstream.timeout = Duration::from_millis(300)).await;
    b.sandbox.set_fault(Some(Fault::Hang));
    let started = Instant::now();
    let r = b.tokens(CHECKOUT_SECRET, FORM).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(b.sandbox.calls(), 1);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_with_retry_after_is_retried_and_succeeds() {
    let b = Broker::start(|_, _| {}).await;
    b.sandbox.fail_next(Fault::Unavailable(1), 1);
    let started = Instant::now();
    let r = b.tokens(CHECKOUT_SECRET, FORM).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(b.sandbox.calls(), 2);
    let m = b.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"token_broker_upstream_retries_total{reason="server_error"}"#
        ),
        1.0
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_caller_never_waits_past_the_deadline() {
    let b = Broker::start(|c, _| {
        c.upstream.timeout = Duration::from_millis(400);
        c.upstream.deadline = Duration::from_millis(600);
    })
    .await;
    // 503 asking for 5 s: further than the deadline, so it is not waited for.
    b.sandbox.set_fault(Some(Fault::Unavailable(5)));
    let started = Instant::now();
    let r = b.tokens(CHECKOUT_SECRET, FORM).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert!(started.elapsed() < Duration::from_millis(600));
    assert_eq!(b.sandbox.calls(), 1);
    b.stop().await;
}

async fn throttled_then_recovers(fault: Fault) {
    let b = Broker::start(|c, _| {
        c.upstream.timeout = Duration::from_millis(500);
        c.upstream.deadline = Duration::from_millis(500);
    })
    .await;
    b.sandbox.fail_next(fault, 1);
    let r = b.tokens(CHECKOUT_SECRET, &user("a")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert_eq!(r.json()["error"], "upstream_throttled");
    assert!(r.header("retry-after").parse::<u64>().unwrap() >= 1);
    // Inside the window: no call at all, for any user.
    let r = b.tokens(CHECKOUT_SECRET, &user("b")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(b.sandbox.calls(), 1);
    let m = b.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"token_broker_upstream_refused_total{reason="throttled"}"#
        ),
        1.0
    );
    assert!(metric(&m, "token_broker_upstream_throttle_remaining_seconds") > 0.0);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = b.tokens(CHECKOUT_SECRET, &user("b")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(b.sandbox.calls(), 2);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_stops_all_calls_until_its_retry_after() {
    throttled_then_recovers(Fault::Throttle(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_saying_rate_limit_counts_as_throttling() {
    throttled_then_recovers(Fault::RateLimit400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_answers_at_once_keeps_serving_hits_and_closes_after_a_probe() {
    let b = Broker::start(|c, _| {
        c.upstream.breaker_threshold = 3;
        c.upstream.breaker_cooldown = Duration::from_millis(500);
    })
    .await;
    // A cached token from before the outage.
    assert_eq!(b.tokens(CHECKOUT_SECRET, FORM).await.status, StatusCode::OK);
    b.sandbox.set_fault(Some(Fault::Status(500)));
    for i in 0..3 {
        let r = b.tokens(CHECKOUT_SECRET, &user(format!("down{i}"))).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    }
    let started = Instant::now();
    let r = b.tokens(CHECKOUT_SECRET, &user("x")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.json()["error"], "upstream_circuit_open");
    assert!(r.header("retry-after").parse::<u64>().unwrap() >= 1);
    assert!(started.elapsed() < Duration::from_millis(200));
    assert_eq!(b.sandbox.calls(), 4, "no call while open");
    // Hits are still served, and the replica stays ready, saying why misses fail.
    let hit = b.tokens(CHECKOUT_SECRET, FORM).await;
    assert_eq!(hit.header("x-cache"), "HIT");
    let ready = send(Method::GET, &format!("{}/readyz", b.admin), &[], "").await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(ready.json()["upstream"]["breaker"], "open");
    assert_eq!(
        metric(&b.metrics().await, "token_broker_upstream_breaker_state"),
        2.0
    );
    // After the cooldown, Truora is back: one probe closes the breaker.
    b.sandbox.set_fault(None);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        b.tokens(CHECKOUT_SECRET, &user("y")).await.status,
        StatusCode::OK
    );
    let ready = send(Method::GET, &format!("{}/readyz", b.admin), &[], "").await;
    assert_eq!(ready.json()["upstream"]["breaker"], "closed");
    assert_eq!(
        metric(&b.metrics().await, "token_broker_upstream_breaker_state"),
        0.0
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_global_and_per_caller_mint_budgets_answer_429() {
    let b = Broker::start(|c, _| {
        c.upstream.mint_rate = 3;
        c.clients[1].mint_rate = Some(1); // billing
    })
    .await;
    assert_eq!(
        b.tokens(BILLING_SECRET, &user("b1")).await.status,
        StatusCode::OK
    );
    let r = b.tokens(BILLING_SECRET, &user("b2")).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
    assert_eq!(r.json()["error"], "mint_budget_exceeded");
    assert!(r.header("retry-after").parse::<u64>().unwrap() >= 1);
    // checkout is not held back by billing's budget, only by the global one (3, 1 spent).
    assert_eq!(
        b.tokens(CHECKOUT_SECRET, &user("c1")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        b.tokens(CHECKOUT_SECRET, &user("c2")).await.status,
        StatusCode::OK
    );
    let r = b.tokens(CHECKOUT_SECRET, &user("c3")).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(b.sandbox.calls(), 3);
    // Hits cost no budget.
    assert_eq!(
        b.tokens(CHECKOUT_SECRET, &user("c1"))
            .await
            .header("x-cache"),
        "HIT"
    );
    let m = b.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"token_broker_upstream_refused_total{reason="budget_caller"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            r#"token_broker_upstream_refused_total{reason="budget_global"}"#
        ),
        1.0
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_beyond_max_concurrent_get_503_at_once() {
    let b = Arc::new(
        Broker::start(|c, s| {
            c.upstream.max_concurrent = 2;
            s.delay = Duration::from_millis(500);
        })
        .await,
    );
    let mut tasks = Vec::new();
    for i in 0..2 {
        let b = Arc::clone(&b);
        tasks.push(tokio::spawn(async move {
            b.tokens(CHECKOUT_SECRET, &user(i)).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let started = Instant::now();
    let r = b.tokens(CHECKOUT_SECRET, &user("third")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.json()["error"], "upstream_saturated");
    assert!(started.elapsed() < Duration::from_millis(300));
    for t in tasks {
        assert_eq!(t.await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(b.sandbox.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_master_key_is_502_and_flagged_until_the_next_success() {
    let b = Broker::start(|_, _| {}).await;
    b.sandbox.set_fault(Some(Fault::Status(401)));
    let r = b.tokens(CHECKOUT_SECRET, FORM).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.json()["error"], "upstream_credential_rejected");
    assert_eq!(b.sandbox.calls(), 1, "a rejected key is not retried");
    assert_eq!(
        metric(
            &b.metrics().await,
            "token_broker_upstream_credential_rejected"
        ),
        1.0
    );
    let ready = send(Method::GET, &format!("{}/readyz", b.admin), &[], "").await;
    assert_eq!(ready.json()["upstream"]["credential_rejected"], true);
    b.sandbox.set_fault(None);
    assert_eq!(b.tokens(CHECKOUT_SECRET, FORM).await.status, StatusCode::OK);
    assert_eq!(
        metric(
            &b.metrics().await,
            "token_broker_upstream_credential_rejected"
        ),
        0.0
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_answers_are_502_and_never_cached() {
    use base64::Engine;
    let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let jwt = |claims: &str| {
        format!(
            "{}.{}.sig",
            e.encode(r#"{"alg":"HS256"}"#),
            e.encode(claims)
        )
    };
    let b = Broker::start(|_, _| {}).await;
    let cases = [
        Fault::Body("<html>oops</html>".into()),
        Fault::Body(r#"{"message":"API key created successfully"}"#.into()),
        Fault::Body(format!(
            r#"{{"api_key":"{}"}}"#,
            jwt(r#"{"iat":2000,"exp":1000}"#)
        )),
        Fault::Body(format!(
            r#"{{"api_key":"{}"}}"#,
            jwt(r#"{"iat":0,"exp":9999999999}"#)
        )),
        Fault::Huge,
    ];
    for (i, fault) in cases.into_iter().enumerate() {
        b.sandbox.set_fault(Some(fault.clone()));
        let calls = b.sandbox.calls();
        let r = b.tokens(CHECKOUT_SECRET, FORM).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "case {i}: {}", r.text());
        assert_eq!(r.json()["error"], "upstream_bad_response", "case {i}");
        assert_eq!(b.sandbox.calls(), calls + 1, "case {i}: not retried");
    }
    b.sandbox.set_fault(None);
    let r = b.tokens(CHECKOUT_SECRET, FORM).await;
    assert_eq!(r.header("x-cache"), "MISS", "nothing bad was cached");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coalesced_waiters_share_a_failure_and_the_next_request_makes_one_new_call() {
    let b = Arc::new(Broker::start(|_, s| s.delay = Duration::from_millis(300)).await);
    b.sandbox.set_fault(Some(Fault::Status(500)));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let b = Arc::clone(&b);
        tasks.push(tokio::spawn(async move {
            b.tokens(CHECKOUT_SECRET, FORM).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().status, StatusCode::BAD_GATEWAY);
    }
    assert_eq!(b.sandbox.calls(), 1);
    b.sandbox.set_fault(None);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let b = Arc::clone(&b);
        tasks.push(tokio::spawn(async move {
            b.tokens(CHECKOUT_SECRET, FORM).await
        }));
    }
    let mut keys = HashSet::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, StatusCode::OK);
        keys.insert(r.json()["api_key"].as_str().unwrap().to_owned());
    }
    assert_eq!(keys.len(), 1);
    assert_eq!(b.sandbox.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_disconnects_does_not_cancel_the_shared_call() {
    let b = Broker::start(|_, s| s.delay = Duration::from_millis(400)).await;
    // The caller gives up long before Truora answers.
    let gave_up =
        tokio::time::timeout(Duration::from_millis(100), b.tokens(CHECKOUT_SECRET, FORM)).await;
    assert!(gave_up.is_err());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = b.tokens(CHECKOUT_SECRET, FORM).await;
    assert_eq!(
        r.header("x-cache"),
        "HIT",
        "the call went on and filled the cache"
    );
    assert_eq!(b.sandbox.calls(), 1);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hits_keep_flowing_while_the_upstream_hangs() {
    let b = Arc::new(
        Broker::start(|c, _| {
            c.upstream.timeout = Duration::from_secs(3);
            c.upstream.deadline = Duration::from_secs(3);
        })
        .await,
    );
    // Warm 20 users, then hang Truora and keep 20 misses stuck on it.
    for i in 0..20 {
        assert_eq!(
            b.tokens(CHECKOUT_SECRET, &user(i)).await.status,
            StatusCode::OK
        );
    }
    b.sandbox.set_fault(Some(Fault::Hang));
    let mut stuck = Vec::new();
    for i in 0..20 {
        let b = Arc::clone(&b);
        stuck.push(tokio::spawn(async move {
            b.tokens(CHECKOUT_SECRET, &user(format!("new{i}"))).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // 400 hits over 8 connections while the misses hang: every one answers, and none waits
    // on the hung upstream (each takes far less than the 3 s timeout).
    let mut workers = Vec::new();
    for w in 0..8 {
        let b = Arc::clone(&b);
        workers.push(tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            for i in 0..50 {
                let started = Instant::now();
                let r = b.tokens(CHECKOUT_SECRET, &user((w * 50 + i) % 20)).await;
                assert_eq!(r.status, StatusCode::OK);
                assert_eq!(r.header("x-cache"), "HIT");
                slowest = slowest.max(started.elapsed());
            }
            slowest
        }));
    }
    for w in workers {
        let slowest = w.await.unwrap();
        assert!(slowest < Duration::from_secs(1), "a hit waited {slowest:?}");
    }
    for s in stuck {
        assert_eq!(s.await.unwrap().status, StatusCode::GATEWAY_TIMEOUT);
    }
}
