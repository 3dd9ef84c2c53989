//! Checks of the performance work that are not timings, so they belong in `make test`: the
//! answer bytes a hit renders by hand, and single flight holding under a thousand concurrent
//! identical misses through the whole caller service and the real upstream client.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use token_broker::app::Broker as Server;
use token_broker::cache::{identity_prefix, Entry, Owner};
use token_broker::issuance::Issued;
use token_broker::metrics::CacheOutcome;
use token_broker::sandbox::{Sandbox, SandboxOptions};
use token_broker::secret::MasterKey;
use token_broker::server::caller_service;
use token_broker::truora::MINTED_MESSAGE;
use tower::ServiceExt;

use common::*;

fn issued(token: &str, life: Duration, cache: CacheOutcome, now: Instant) -> Issued {
    let owner = Owner {
        caller: "c".into(),
        flow_id: "IPF1".into(),
        account_id: None,
        minted_at: std::time::SystemTime::now(),
    };
    Issued {
        entry: Arc::new(Entry::new(
            token,
            identity_prefix("https://id.example/"),
            owner,
            now + life,
            now + life,
            // 2026-11-26T02:13:31Z
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_659_211),
        )),
        cache,
    }
}

const JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjF9.c2ln-_x";

#[test]
fn the_answer_is_copied_together_from_the_token_and_its_ready_parts() {
    let now = Instant::now();
    for (secs, cache, word) in [
        (0, CacheOutcome::Hit, "hit"),
        (9, CacheOutcome::Miss, "miss"),
        (10, CacheOutcome::Hit, "hit"),
        (7199, CacheOutcome::Hit, "hit"),
        (604_800, CacheOutcome::Miss, "miss"),
    ] {
        let body = issued(JWT, Duration::from_secs(secs), cache, now).tokens_body(now);
        let expected = format!(
            r#"{{"api_key":"{JWT}","expires_at":"2026-11-26T02:13:31Z","identity_url":"https://id.example/?token={JWT}","cache":"{word}","expires_in":{secs}}}"#
        );
        assert_eq!(String::from_utf8(body.clone()).unwrap(), expected);
        // Allocated at its final size, so Bytes takes it over without another allocation.
        assert_eq!(body.capacity(), body.len());
    }
    // Less than a second left reads as 0, never as a negative or fractional number.
    let body = issued(JWT, Duration::from_millis(999), CacheOutcome::Hit, now).tokens_body(now);
    assert!(body.ends_with(br#""expires_in":0}"#));

    let dropin = issued(JWT, Duration::from_secs(60), CacheOutcome::Hit, now).dropin_body();
    let expected = format!(r#"{{"api_key":"{JWT}","message":"{MINTED_MESSAGE}"}}"#);
    assert_eq!(String::from_utf8(dropin.clone()).unwrap(), expected);
    assert_eq!(dropin.capacity(), dropin.len());
}

#[test]
fn a_token_that_is_not_a_jwt_is_escaped_in_json_and_in_its_identity_url() {
    let now = Instant::now();
    let token = "a\"b\\c d/e+f&g\u{e9}\n";
    let entry = issued(token, Duration::from_secs(60), CacheOutcome::Hit, now);
    let v: serde_json::Value = serde_json::from_slice(&entry.tokens_body(now)).unwrap();
    assert_eq!(v["api_key"], token);
    let url = v["identity_url"].as_str().unwrap();
    let query = url.strip_prefix("https://id.example/?").unwrap();
    let decoded: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    assert_eq!(decoded, [("token".to_owned(), token.to_owned())]);
    let d: serde_json::Value = serde_json::from_slice(&entry.dropin_body()).unwrap();
    assert_eq!(d["api_key"], token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_identical_misses_make_one_upstream_call() {
    let mut options = SandboxOptions::new(MASTER_KEY);
    options.delay = Duration::from_millis(500);
    let sandbox = Sandbox::start(options).await.unwrap();
    let mut cfg = config(&sandbox.url());
    cfg.upstream.timeout = Duration::from_secs(10);
    cfg.validate().unwrap();
    let server = Server::from_config(&cfg, MasterKey::new(MASTER_KEY).unwrap())
        .await
        .unwrap();
    let service = caller_service(
        Arc::clone(server.state()),
        Arc::new(token_broker::auth::Peer::default()),
    );

    // Polled together on this task (the upstream call runs in its own task either way).
    let mut tasks = Vec::new();
    for _ in 0..1_000 {
        let service = service.clone();
        tasks.push(async move {
            let req = Request::post("/v1/tokens")
                .header("authorization", format!("Bearer {CHECKOUT_SECRET}"))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Full::new(Bytes::from_static(FORM.as_bytes())))
                .unwrap();
            let response = service.oneshot(req).await.unwrap();
            assert_eq!(response.status(), 200);
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            json["api_key"].as_str().unwrap().to_owned()
        });
    }
    let tokens: std::collections::HashSet<String> = futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .collect();
    assert_eq!(tokens.len(), 1, "every request gets the one token");
    assert_eq!(
        sandbox.calls(),
        1,
        "one upstream call for a thousand requests"
    );
    let text = String::from_utf8(server.state().metrics.render()).unwrap();
    assert!(text.contains(r#"token_broker_cache_lookups_total{result="miss"} 1"#));
}
