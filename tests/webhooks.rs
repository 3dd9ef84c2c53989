//! One token per verification process, end to end: the broker's webhook listener, with the
//! embedded sandbox Truora minting, playing each process (opened, approved, declined) and
//! delivering Truora's signed webhooks to it; results read through the pass-through; a caller
//! asking for a new process with `Cache-Control: no-cache`; and `billing_hub`.

mod common;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use http::{Method, StatusCode};
use token_broker::config::Config;
use token_broker::sandbox::{sign_hs256, ClaimNames, WebhookTarget};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIGNING_SECRET: &str = "truora-signing-secret-0123456789";
const RESULT: &str = "GET /truora/identity/v1/processes/*/result";

/// A user's form in a flow.
fn form(flow: &str, user: &str) -> String {
    format!("country=CO&flow_id={flow}&redirect_url=https%3A%2F%2Fshop.example%2Fdone&account_id={user}")
}

/// A broker with `[webhooks]` whose deliveries must be signed with [`SIGNING_SECRET`], its
/// sandbox delivering to it as configured by `target`.
struct Hooked {
    b: Broker,
    _dir: tempfile::TempDir,
}

impl Hooked {
    async fn start(tweak: impl FnOnce(&mut Config)) -> Self {
        Self::start_with(tweak, |_| {}).await
    }

    async fn start_with(
        tweak: impl FnOnce(&mut Config),
        target: impl FnOnce(&mut WebhookTarget),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let secret_file: PathBuf = dir.path().join("signing-secret");
        std::fs::write(&secret_file, format!("{SIGNING_SECRET}\n")).unwrap();
        let b = Broker::start(|c, _| {
            with_webhooks(c);
            if let Some(w) = c.webhooks.as_mut() {
                w.signing_secret_file = Some(secret_file);
            }
            c.clients[0].passthrough = vec![RESULT.into()];
            tweak(c);
        })
        .await;
        let mut t = WebhookTarget {
            url: format!("{}/webhooks/truora", b.webhooks.as_deref().unwrap()),
            bearer: WEBHOOK_SECRET.into(),
            signing_secret: Some(SIGNING_SECRET.as_bytes().to_vec()),
            claims: ClaimNames::default(),
            event_in_query: false,
        };
        target(&mut t);
        b.sandbox.set_webhook(Some(t));
        Hooked { b, _dir: dir }
    }

    fn hooks(&self) -> String {
        format!("{}/webhooks/truora", self.b.webhooks.as_deref().unwrap())
    }

    async fn token(&self, secret: &str, form: &str) -> (String, &'static str) {
        let r = self.b.tokens(secret, form).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let cache = match r.json()["cache"].as_str().unwrap() {
            "hit" => "hit",
            "miss" => "miss",
            other => panic!("{other}"),
        };
        (r.json()["api_key"].as_str().unwrap().to_owned(), cache)
    }

    /// Posts `body` to the webhook path with `bearer`.
    async fn deliver(&self, bearer: &str, body: &str) -> Resp {
        send(
            Method::POST,
            &self.hooks(),
            &[
                ("authorization", &format!("Bearer {bearer}")),
                ("content-type", "text/plain"),
            ],
            body,
        )
        .await
    }

    async fn stop(self) {
        self.b.stop().await;
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A delivery's JWT as Truora's rule would make it, signed with `key`.
fn delivery(key: &[u8], event: &str, flow: &str, user: &str, process: &str, iat: u64) -> String {
    let claims = serde_json::json!({
        "event": event, "flow_id": flow, "account_id": user, "process_id": process, "iat": iat,
    });
    sign_hs256(key, &claims.to_string())
}

fn counter(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0, |v| v.parse::<f64>().unwrap() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_keeps_the_token_and_success_drops_it_for_every_caller_and_only_that_user_and_flow()
{
    let h = Hooked::start(|_| {}).await;
    let (mine, other_user, other_flow) = (
        form("IPF1", "user-1"),
        form("IPF1", "user-2"),
        form("IPF2", "user-1"),
    );
    let (checkout, _) = h.token(CHECKOUT_SECRET, &mine).await;
    let (billing, _) = h.token(BILLING_SECRET, &mine).await;
    let (kept_user, _) = h.token(CHECKOUT_SECRET, &other_user).await;
    let (kept_flow, _) = h.token(CHECKOUT_SECRET, &other_flow).await;

    // The user opens the identity page: the process is created and goes on with its token.
    let created = h.b.sandbox.open(&checkout).await.unwrap().unwrap();
    assert_eq!(
        (created.event.as_str(), created.status),
        ("identity_process_created", Some(200))
    );
    assert_eq!(
        h.token(CHECKOUT_SECRET, &mine).await,
        (checkout.clone(), "hit")
    );

    // The user is approved: Truora's webhook ends the process.
    let done = h.b.sandbox.finish(&checkout, true).await.unwrap().unwrap();
    assert_eq!(
        (done.event.as_str(), done.status),
        ("identity_process_succeeded", Some(200)),
        "{done:?}"
    );
    for (secret, old) in [(CHECKOUT_SECRET, &checkout), (BILLING_SECRET, &billing)] {
        let (new, cache) = h.token(secret, &mine).await;
        assert_eq!(
            cache, "miss",
            "every caller's token of the ended process goes"
        );
        assert_ne!(&new, old);
    }
    assert_eq!(
        h.token(CHECKOUT_SECRET, &other_user).await,
        (kept_user, "hit")
    );
    assert_eq!(
        h.token(CHECKOUT_SECRET, &other_flow).await,
        (kept_flow, "hit")
    );

    let m = h.b.metrics().await;
    for (series, n) in [
        (
            r#"token_broker_webhook_deliveries_total{event="identity_process_created",outcome="ignored"}"#,
            1,
        ),
        (
            r#"token_broker_webhook_deliveries_total{event="identity_process_succeeded",outcome="taken"}"#,
            1,
        ),
        (
            r#"token_broker_cache_invalidations_total{reason="webhook"}"#,
            1,
        ),
    ] {
        assert_eq!(counter(&m, series), n, "{series}\n{m}");
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_process_ends_its_token_and_a_repeated_delivery_drops_nothing_more() {
    let h = Hooked::start(|_| {}).await;
    let mine = form("IPF1", "user-1");
    let (old, _) = h.token(CHECKOUT_SECRET, &mine).await;
    let process = h.b.sandbox.process_of(&old).unwrap().process_id;
    let done = h.b.sandbox.finish(&old, false).await.unwrap().unwrap();
    assert_eq!(
        (done.event.as_str(), done.status),
        ("identity_process_failed", Some(200))
    );
    let (new, cache) = h.token(CHECKOUT_SECRET, &mine).await;
    assert_eq!(cache, "miss");
    assert_ne!(new, old);

    // Truora retries the same delivery: taken again, and the user's new process keeps its token.
    let again = delivery(
        SIGNING_SECRET.as_bytes(),
        "identity_process_failed",
        "IPF1",
        "user-1",
        &process,
        now_secs(),
    );
    for _ in 0..2 {
        let r = h.deliver(WEBHOOK_SECRET, &again).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.json()["invalidated"], 0);
    }
    assert_eq!(h.token(CHECKOUT_SECRET, &mine).await, (new, "hit"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_deliveries_drop_nothing_and_say_why() {
    let h = Hooked::start(|_| {}).await;
    let mine = form("IPF1", "user-1");
    let (token, _) = h.token(CHECKOUT_SECRET, &mine).await;
    let key = SIGNING_SECRET.as_bytes();
    let good = |iat| {
        delivery(
            key,
            "identity_process_succeeded",
            "IPF1",
            "user-1",
            "IDP9",
            iat,
        )
    };
    let no_flow = sign_hs256(
        key,
        &serde_json::json!({"event": "success", "account_id": "user-1", "iat": now_secs()})
            .to_string(),
    );
    let cases: Vec<(&str, String, StatusCode, &str)> = vec![
        (
            "wrong-secret",
            good(now_secs()),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            WEBHOOK_SECRET,
            delivery(
                b"another key",
                "success",
                "IPF1",
                "user-1",
                "IDP9",
                now_secs(),
            ),
            StatusCode::UNAUTHORIZED,
            "bad_signature",
        ),
        (
            WEBHOOK_SECRET,
            good(now_secs() - 11 * 60),
            StatusCode::UNAUTHORIZED,
            "stale_delivery",
        ),
        (
            WEBHOOK_SECRET,
            good(now_secs() + 5 * 60),
            StatusCode::UNAUTHORIZED,
            "stale_delivery",
        ),
        (
            WEBHOOK_SECRET,
            r#"{"event":"success","flow_id":"IPF1","account_id":"user-1"}"#.into(),
            StatusCode::BAD_REQUEST,
            "not_a_jwt",
        ),
        (
            WEBHOOK_SECRET,
            no_flow,
            StatusCode::BAD_REQUEST,
            "missing_claim",
        ),
        (
            WEBHOOK_SECRET,
            "x".repeat(65 * 1024),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
    ];
    for (bearer, body, status, code) in cases {
        let r = h.deliver(bearer, &body).await;
        assert_eq!(
            (r.status, r.json()["error"].as_str().unwrap()),
            (status, code),
            "{}",
            r.text()
        );
        assert!(
            !r.text().contains("user-1"),
            "a claim value was echoed: {}",
            r.text()
        );
    }
    let none = send(Method::POST, &h.hooks(), &[], &good(now_secs())).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        none.header("www-authenticate"),
        "Bearer realm=\"token-broker\""
    );
    assert_eq!(
        h.token(CHECKOUT_SECRET, &mine).await,
        (token, "hit"),
        "a refused delivery dropped the token"
    );

    let m = h.b.metrics().await;
    for (outcome, n) in [
        ("unauthorized", 2),
        ("bad_signature", 1),
        ("stale", 2),
        ("malformed", 2),
        ("too_large", 1),
        ("taken", 0),
    ] {
        let total: u64 = m
            .lines()
            .filter(|l| {
                l.starts_with("token_broker_webhook_deliveries_total{")
                    && l.contains(&format!("outcome=\"{outcome}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
            .sum();
        assert_eq!(total, n, "{outcome}\n{m}");
    }
    assert_eq!(
        counter(
            &m,
            r#"token_broker_cache_invalidations_total{reason="webhook"}"#
        ),
        0
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_credential_is_checked_before_the_body_is_read() {
    let h = Hooked::start(|c| c.server.body_read_timeout = Duration::from_secs(30)).await;
    let addr =
        h.b.webhooks
            .as_deref()
            .unwrap()
            .trim_start_matches("http://")
            .to_owned();
    // A head announcing a body that never comes: with a wrong secret the answer is at once,
    // not after server.body_read_timeout.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"POST /webhooks/truora HTTP/1.1\r\nhost: x\r\nauthorization: Bearer nope\r\ncontent-length: 1000\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("the broker waited for a body it should not read")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_listener_serves_deliveries_only_and_the_caller_listener_no_deliveries() {
    let h = Hooked::start(|_| {}).await;
    let base = h.b.webhooks.clone().unwrap();
    let auth = format!("Bearer {CHECKOUT_SECRET}");
    let on_hooks = send(
        Method::POST,
        &format!("{base}/v1/tokens"),
        &[("authorization", &auth)],
        &form("IPF1", "u"),
    )
    .await;
    assert_eq!(on_hooks.status, StatusCode::NOT_FOUND);
    let get = send(
        Method::GET,
        &h.hooks(),
        &[("authorization", &format!("Bearer {WEBHOOK_SECRET}"))],
        "",
    )
    .await;
    assert_eq!(
        (get.status, get.header("allow")),
        (StatusCode::METHOD_NOT_ALLOWED, "POST")
    );
    let metrics = send(Method::GET, &format!("{base}/metrics"), &[], "").await;
    assert_eq!(metrics.status, StatusCode::NOT_FOUND);
    let on_callers = send(
        Method::POST,
        &format!("{}/webhooks/truora", h.b.url),
        &[("authorization", &auth)],
        "x",
    )
    .await;
    assert_eq!(on_callers.status, StatusCode::NOT_FOUND);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renamed_claims_and_an_event_in_the_rule_url_are_read_as_configured() {
    let renamed = ClaimNames {
        event: "Event".into(),
        flow_id: "FlowID".into(),
        account_id: "AccountID".into(),
        process_id: "ProcessID".into(),
        iat: "iat".into(),
    };
    let h = Hooked::start_with(
        |c| {
            let w = c.webhooks.as_mut().unwrap();
            w.claims.flow_id = "FlowID".into();
            w.claims.account_id = "AccountID".into();
            w.claims.process_id = "ProcessID".into();
        },
        |t| {
            t.claims = renamed.clone();
            t.event_in_query = true;
        },
    )
    .await;
    let mine = form("IPF1", "user-1");
    let (old, _) = h.token(CHECKOUT_SECRET, &mine).await;
    let done = h.b.sandbox.finish(&old, true).await.unwrap().unwrap();
    assert_eq!(done.status, Some(200), "{done:?}");
    assert_eq!(h.token(CHECKOUT_SECRET, &mine).await.1, "miss");
    h.stop().await;

    // The same deliveries to a broker that expects the default names: refused, nothing dropped.
    let h = Hooked::start_with(|_| {}, |t| t.claims = renamed).await;
    let (token, _) = h.token(CHECKOUT_SECRET, &mine).await;
    let done = h.b.sandbox.finish(&token, true).await.unwrap().unwrap();
    assert_eq!(done.status, Some(400), "{done:?}");
    assert_eq!(h.token(CHECKOUT_SECRET, &mine).await, (token, "hit"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_read_through_the_passthrough_ends_the_process_once() {
    let h = Hooked::start(|_| {}).await;
    h.b.sandbox.set_webhook(None);
    let mine = form("IPF1", "user-1");
    let (old, _) = h.token(CHECKOUT_SECRET, &mine).await;
    let (billing_old, _) = h.token(BILLING_SECRET, &mine).await;
    let process = h.b.sandbox.process_of(&old).unwrap().process_id;
    let path = format!("{}/truora/identity/v1/processes/{process}/result", h.b.url);
    let auth = format!("Bearer {CHECKOUT_SECRET}");
    // Pending: nothing changes.
    let pending = send(Method::GET, &path, &[("authorization", &auth)], "").await;
    assert_eq!(pending.json()["status"], "pending", "{}", pending.text());
    assert_eq!(h.token(CHECKOUT_SECRET, &mine).await, (old.clone(), "hit"));
    // Declined (no webhook configured in Truora): the result read says so.
    assert_eq!(h.b.sandbox.finish(&old, false).await.unwrap(), None);
    let failed = send(Method::GET, &path, &[("authorization", &auth)], "").await;
    assert_eq!(failed.json()["status"], "failure");
    let (new, cache) = h.token(CHECKOUT_SECRET, &mine).await;
    assert_eq!(cache, "miss");
    assert_ne!(new, old);
    let (billing_new, cache) = h.token(BILLING_SECRET, &mine).await;
    assert_eq!(
        cache, "miss",
        "another caller's token of the ended process goes too"
    );
    assert_ne!(billing_new, billing_old);
    // Reading the result again drops nothing of the new process.
    send(Method::GET, &path, &[("authorization", &auth)], "").await;
    assert_eq!(h.token(CHECKOUT_SECRET, &mine).await, (new, "hit"));
    let m = h.b.metrics().await;
    assert_eq!(
        counter(
            &m,
            r#"token_broker_cache_invalidations_total{reason="result"}"#
        ),
        1,
        "{m}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cache_mints_a_new_process_that_replaces_the_cached_token_on_both_endpoints() {
    let b = Broker::start(|_, _| {}).await;
    let mine = form("IPF1", "user-1");
    let auth = format!("Bearer {CHECKOUT_SECRET}");
    let first = b.tokens(CHECKOUT_SECRET, &mine).await.json()["api_key"].clone();
    let mut current = first;
    for (path, field) in [("/v1/tokens", "api_key"), ("/v1/api-keys", "api_key")] {
        let fresh = send(
            Method::POST,
            &format!("{}{path}", b.url),
            &[
                ("authorization", &auth),
                ("content-type", "application/x-www-form-urlencoded"),
                ("cache-control", "no-cache"),
            ],
            &mine,
        )
        .await;
        assert_eq!(fresh.status, StatusCode::OK, "{}", fresh.text());
        assert_eq!(fresh.header("x-cache"), "MISS");
        assert_ne!(
            fresh.json()[field],
            current,
            "{path} answered the cached token"
        );
        current = fresh.json()[field].clone();
        let next = b.tokens(CHECKOUT_SECRET, &mine).await;
        assert_eq!(
            (next.json()["cache"].as_str(), &next.json()["api_key"]),
            (Some("hit"), &current)
        );
    }
    assert_eq!(b.sandbox.calls(), 3);
    let m = b.metrics().await;
    assert_eq!(
        counter(
            &m,
            r#"token_broker_cache_invalidations_total{reason="no_cache"}"#
        ),
        2
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_hub_is_pinned_forwarded_and_part_of_the_cache_key() {
    let b = Broker::start(|c, _| {
        c.clients[0].billing_hub = Some("hub-a".into());
        c.clients[1].allowed_billing_hubs = Some(vec!["hub-x".into(), "hub-y".into()]);
    })
    .await;
    let mine = form("IPF1", "user-1");
    // checkout is pinned to hub-a: added when absent, forwarded to Truora.
    let pinned = b.tokens(CHECKOUT_SECRET, &mine).await;
    assert_eq!(pinned.status, StatusCode::OK, "{}", pinned.text());
    let sent = b.sandbox.received().last().unwrap().form.clone();
    assert!(
        sent.contains(&("billing_hub".into(), "hub-a".into())),
        "{sent:?}"
    );
    let same = b
        .tokens(CHECKOUT_SECRET, &format!("{mine}&billing_hub=hub-a"))
        .await;
    assert_eq!(
        (same.json()["cache"].as_str(), &same.json()["api_key"]),
        (Some("hit"), &pinned.json()["api_key"])
    );
    let other = b
        .tokens(CHECKOUT_SECRET, &format!("{mine}&billing_hub=hub-b"))
        .await;
    assert_eq!(
        (other.status, other.json()["rule"].as_str()),
        (StatusCode::FORBIDDEN, Some("billing_hub"))
    );
    // billing may use hub-x or hub-y, each its own token; none, or another, is refused.
    let x = b
        .tokens(BILLING_SECRET, &format!("{mine}&billing_hub=hub-x"))
        .await;
    let y = b
        .tokens(BILLING_SECRET, &format!("{mine}&billing_hub=hub-y"))
        .await;
    assert_eq!(
        (x.json()["cache"].as_str(), y.json()["cache"].as_str()),
        (Some("miss"), Some("miss"))
    );
    assert_ne!(x.json()["api_key"], y.json()["api_key"]);
    for body in [mine.clone(), format!("{mine}&billing_hub=hub-z")] {
        let r = b.tokens(BILLING_SECRET, &body).await;
        assert_eq!(
            (r.status, r.json()["rule"].as_str()),
            (StatusCode::FORBIDDEN, Some("allowed_billing_hubs"))
        );
    }
    assert_eq!(b.sandbox.calls(), 3);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_listener_has_its_own_connection_cap_and_closes_idle_connections() {
    let h = Hooked::start(|c| {
        c.server.header_read_timeout = Duration::from_secs(1);
        c.webhooks.as_mut().unwrap().max_connections = 2;
    })
    .await;
    let addr =
        h.b.webhooks
            .as_deref()
            .unwrap()
            .trim_start_matches("http://")
            .to_owned();
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    // Accepted, then closed at once: the third over the cap.
    let mut third = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "the connection over the cap was served");
    // The two that never send anything are closed after the first-request deadline.
    for s in &mut held {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("an idle connection stayed open")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
    // The caller listener is not affected by the webhook cap.
    assert_eq!(
        h.b.tokens(CHECKOUT_SECRET, &form("IPF1", "u")).await.status,
        StatusCode::OK
    );
    let m = h.b.metrics().await;
    assert_eq!(
        counter(&m, "token_broker_server_webhook_connections_rejected_total"),
        1
    );
    assert_eq!(
        counter(
            &m,
            r#"token_broker_server_connections_closed_total{listener="webhook",reason="idle"}"#
        ),
        2
    );
    h.stop().await;
}
