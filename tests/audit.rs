//! The audit trail end to end: a broker with `[audit] file` in front of the sandbox Truora,
//! driven through every kind of event, then its file read back line by line.
//!
//! - every line is one JSON object, and each event the issue names is there with what it must
//!   say (the mint's `jti`, request id and peer among them);
//! - users are keyed tags: the same user under the same key has the same tag (also across a
//!   restart), under another key another one, and it is the HMAC docs/security.md computes;
//! - nothing in the file is a token, a secret, the master key, the tag key or a user's
//!   identifier;
//! - `on_failure = "refuse"` answers 503 `audit_unavailable` without calling Truora while the
//!   file cannot be written, and mints again once it can; `continue` mints and counts.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use common::*;
use http::{Method, StatusCode};
use token_broker::app::Broker as Server;
use token_broker::audit::{Identifier, KeySource, TagKey};
use token_broker::config::{Config, OnFailure};
use token_broker::sandbox::{Sandbox, SandboxOptions};
use token_broker::secret::from_hex;
use tokio::sync::oneshot;

const TAG_KEY: &str = "8f2d0c4b6a1e3f5d7c9b0a2e4f6d8c1b3a5e7f9d0c2b4a6e8f1d3c5b7a9e0f2d";
const OTHER_TAG_KEY: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const EMAIL: &str = "Ana.Canary@Example.com";
const PHONE: &str = "+573001234567";
const RESULT: &str = "GET /truora/identity/v1/processes/*/result";

/// A broker started from a config file (so that it reloads), with its audit file in `dir`.
struct Audited {
    url: String,
    admin: String,
    webhooks: Option<String>,
    sandbox: Sandbox,
    path: PathBuf,
    audit: PathBuf,
    config: Config,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Audited {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn key_file(dir: &Path, name: &str, hex: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{hex}\n")).unwrap();
    path
}

impl Audited {
    async fn start(dir: &Path, tweak: impl FnOnce(&mut Config)) -> Self {
        let sandbox = Sandbox::start(SandboxOptions::new(MASTER_KEY))
            .await
            .unwrap();
        let mut cfg = config(&sandbox.url());
        cfg.upstream.identity_url = sandbox.url();
        cfg.upstream.api_key_file = Some(key_file(dir, "api-key", MASTER_KEY));
        cfg.audit.file = Some(dir.join("audit.jsonl"));
        cfg.audit.hmac_key_file = Some(key_file(dir, "tag-key", TAG_KEY));
        // These tests reload by hand; tests/rotation.rs has the watcher's.
        cfg.server.watch_files = false;
        tweak(&mut cfg);
        let path = dir.join("broker.toml");
        std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
        let config = Config::load(&path).unwrap();
        let server = Server::from_config(&config, config.master_key().unwrap())
            .await
            .unwrap();
        server.reload_from(path.clone(), config.clone());
        let Running {
            url,
            admin,
            webhooks,
            stop,
            task,
        } = Running::run(server);
        Audited {
            url,
            admin,
            webhooks,
            sandbox,
            path,
            audit: config.audit.file.clone().unwrap(),
            config,
            stop: Some(stop),
            task,
        }
    }

    /// Stops the broker (its last events written) and reads its file.
    async fn stop(mut self) -> Vec<serde_json::Value> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(20), &mut self.task)
            .await
            .expect("the broker stops")
            .unwrap();
        lines(&self.audit)
    }

    async fn tokens(
        &self,
        secret: &str,
        form: &str,
        request_id: &str,
        extra: &[(&str, &str)],
    ) -> Resp {
        let auth = format!("Bearer {secret}");
        let mut headers = vec![
            ("authorization", auth.as_str()),
            ("content-type", "application/x-www-form-urlencoded"),
            ("x-request-id", request_id),
        ];
        headers.extend_from_slice(extra);
        send(
            Method::POST,
            &format!("{}/v1/tokens", self.url),
            &headers,
            form,
        )
        .await
    }
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    assert_no_canary_in(&text);
    text.lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object ({e}): {l}"))
        })
        .collect()
}

/// Nothing of a token, a secret, the master key, the tag key or a user's identifiers.
fn assert_no_canary_in(text: &str) {
    assert_no_secret_in(text);
    for canary in [
        "eyJ",
        TAG_KEY,
        OTHER_TAG_KEY,
        "user-1",
        "user-2",
        EMAIL,
        &EMAIL.to_ascii_lowercase(),
        PHONE,
        "573001234567",
        WEBHOOK_SECRET,
    ] {
        assert!(
            !text.contains(canary),
            "{canary} is in the audit file:\n{text}"
        );
    }
}

fn events<'a>(lines: &'a [serde_json::Value], name: &str) -> Vec<&'a serde_json::Value> {
    lines.iter().filter(|l| l["event"] == name).collect()
}

fn tag(hex: &str, id: Identifier<'_>) -> String {
    TagKey::new(&from_hex::<32>(hex).unwrap(), KeySource::File)
        .tag(id)
        .to_string()
}

fn jti_of(token: &str) -> String {
    let payload = token.split('.').nth(1).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    claims["jti"].as_str().unwrap().to_owned()
}

fn user_form(user: &str) -> String {
    format!(
        "country=CO&flow_id=IPF0a1b2c&redirect_url=https%3A%2F%2Fshop.example%2Fdone&account_id={user}&emails={}&phone={}",
        EMAIL.replace('@', "%40"),
        PHONE.replace('+', "%2B")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_file_holds_one_parseable_line_per_event_and_no_secret_or_identifier() {
    let dir = tempfile::tempdir().unwrap();
    let b = Audited::start(dir.path(), |c| {
        c.audit.include_hits = true;
        c.clients[0].passthrough = vec![RESULT.into()];
        with_webhooks(c);
    })
    .await;

    // A mint, then the same token from the cache.
    let minted = b
        .tokens(CHECKOUT_SECRET, &user_form("user-1"), "audit-mint-1", &[])
        .await;
    assert_eq!(minted.status, StatusCode::OK, "{}", minted.text());
    let token = minted.json()["api_key"].as_str().unwrap().to_owned();
    let hit = b
        .tokens(CHECKOUT_SECRET, &user_form("user-1"), "audit-hit-1", &[])
        .await;
    assert_eq!(hit.header("x-cache"), "HIT");
    // A new process asked for, and one naming no user.
    let renewed = b
        .tokens(
            CHECKOUT_SECRET,
            &user_form("user-1"),
            "audit-renew-1",
            &[("cache-control", "no-cache")],
        )
        .await;
    assert_eq!(renewed.status, StatusCode::OK);
    let anonymous = b
        .tokens(
            CHECKOUT_SECRET,
            "country=CO&flow_id=IPF0a1b2c&redirect_url=https%3A%2F%2Fshop.example%2Fdone",
            "audit-anon-1",
            &[],
        )
        .await;
    assert_eq!(anonymous.status, StatusCode::OK);
    // The caller drops its tokens of user-2.
    let dropped = send(
        Method::DELETE,
        &format!("{}/v1/tokens?account_id=user-2", b.url),
        &[("authorization", &format!("Bearer {CHECKOUT_SECRET}"))],
        "",
    )
    .await;
    assert_eq!(dropped.status, StatusCode::OK);
    // A pass-through call.
    let relayed = send(
        Method::GET,
        &format!("{}/truora/identity/v1/processes/IDP1/result", b.url),
        &[
            ("authorization", &format!("Bearer {CHECKOUT_SECRET}")),
            ("x-request-id", "audit-pass-1"),
        ],
        "",
    )
    .await;
    assert_eq!(relayed.status, StatusCode::OK, "{}", relayed.text());
    // A webhook delivery with the wrong secret.
    let hook = send(
        Method::POST,
        &format!("{}/webhooks/truora", b.webhooks.as_ref().unwrap()),
        &[("authorization", "Bearer not-the-webhook-secret-0123456789")],
        "x.y.z",
    )
    .await;
    assert_eq!(hook.status, StatusCode::UNAUTHORIZED);
    // One peer failing to authenticate again and again.
    for _ in 0..token_broker::audit::AUTH_THRESHOLD + 3 {
        let r = b
            .tokens("not-a-configured-secret-0123456789", FORM, "audit-bad", &[])
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    // A reload that revokes billing.
    let mut cfg = b.config.clone();
    cfg.clients.retain(|c| c.id != "billing");
    std::fs::write(&b.path, toml::to_string(&cfg).unwrap()).unwrap();
    let reload = send(Method::POST, &format!("{}/admin/reload", b.admin), &[], "").await;
    assert_eq!(reload.status, StatusCode::OK, "{}", reload.text());

    let lines = b.stop().await;
    let names: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
    assert_eq!(names[0], "start", "{names:?}");
    for line in &lines {
        assert!(line["ts"].as_str().unwrap().ends_with('Z'), "{line}");
    }
    assert_eq!(lines[0]["tag_key_source"], "file");
    let tag_key = lines[0]["tag_key"].as_str().unwrap();

    let user = [
        tag(TAG_KEY, Identifier::AccountId("user-1")),
        tag(TAG_KEY, Identifier::Email(EMAIL)),
        tag(TAG_KEY, Identifier::Phone(PHONE)),
    ];
    let mints = events(&lines, "mint");
    assert_eq!(mints.len(), 3, "{lines:#?}");
    let first = mints
        .iter()
        .find(|m| m["request_id"] == "audit-mint-1")
        .unwrap();
    assert_eq!(first["caller"], "checkout");
    assert_eq!(first["flow_id"], "IPF0a1b2c");
    assert_eq!(first["user"], serde_json::json!(user));
    assert_eq!(first["tag_key"], tag_key);
    assert_eq!(first["jti"], jti_of(&token));
    assert_eq!(first["peer"], "127.0.0.1");
    assert_eq!(first["cache"], "miss");
    assert!(first["lifetime_s"].as_u64().unwrap() > 0);
    let renew = mints
        .iter()
        .find(|m| m["request_id"] == "audit-renew-1")
        .unwrap();
    assert_eq!(renew["cache"], "no_cache");
    let anon = mints
        .iter()
        .find(|m| m["request_id"] == "audit-anon-1")
        .unwrap();
    assert_eq!(anon["cache"], "uncacheable");
    assert_eq!(anon["user"], serde_json::json!([]));

    let hits = events(&lines, "hit");
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(hits[0]["request_id"], "audit-hit-1");
    assert_eq!(hits[0]["jti"], jti_of(&token));
    assert_eq!(hits[0]["user"], serde_json::json!(user));

    let drops = events(&lines, "invalidation");
    let reasons: Vec<&str> = drops
        .iter()
        .map(|d| d["reason"].as_str().unwrap())
        .collect();
    assert!(
        reasons.contains(&"no_cache") && reasons.contains(&"caller"),
        "{reasons:?}"
    );
    let by_caller = drops.iter().find(|d| d["reason"] == "caller").unwrap();
    assert_eq!(by_caller["caller"], "checkout");
    assert_eq!(
        by_caller["user"],
        serde_json::json!([tag(TAG_KEY, Identifier::AccountId("user-2"))])
    );

    let relayed = events(&lines, "passthrough");
    assert_eq!(relayed.len(), 1);
    assert_eq!(relayed[0]["pattern"], RESULT);
    assert_eq!(relayed[0]["status"], 200);
    assert_eq!(relayed[0]["request_id"], "audit-pass-1");

    let refused = events(&lines, "webhook_refused");
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["outcome"], "unauthorized");
    assert_eq!(refused[0]["peer"], "127.0.0.1");

    let failures = events(&lines, "auth_failures");
    assert_eq!(
        failures.len(),
        1,
        "rate-limited to one per window: {failures:?}"
    );
    assert_eq!(failures[0]["failures"], token_broker::audit::AUTH_THRESHOLD);
    assert_eq!(failures[0]["reason"], "unknown");

    let reloads = events(&lines, "reload");
    assert_eq!(reloads.len(), 1);
    assert_eq!(reloads[0]["trigger"], "admin");
    assert_eq!(reloads[0]["result"], "applied");
    assert_eq!(reloads[0]["revoked"], serde_json::json!(["billing"]));
    let revoked = events(&lines, "revocation");
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0]["caller"], "billing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_user_has_the_same_tag_under_the_same_key_and_another_under_another() {
    let dir = tempfile::tempdir().unwrap();
    let mint_tags = |lines: &[serde_json::Value]| -> Vec<serde_json::Value> {
        events(lines, "mint")
            .iter()
            .map(|m| m["user"][0].clone())
            .collect()
    };
    // Two callers, then a restart with the same key: one tag.
    let b = Audited::start(dir.path(), |_| {}).await;
    for secret in [CHECKOUT_SECRET, BILLING_SECRET] {
        let r = b.tokens(secret, &user_form("user-1"), "r", &[]).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let first = mint_tags(&b.stop().await);
    let b = Audited::start(dir.path(), |_| {}).await;
    b.tokens(CHECKOUT_SECRET, &user_form("user-1"), "r", &[])
        .await;
    let lines = b.stop().await;
    let again = mint_tags(&lines);
    let expected = serde_json::json!(tag(TAG_KEY, Identifier::AccountId("user-1")));
    assert_eq!(first, [expected.clone(), expected.clone()]);
    // The file was appended to, not truncated: both runs are in it.
    assert_eq!(
        again,
        [expected.clone(), expected.clone(), expected.clone()]
    );
    assert_eq!(events(&lines, "start").len(), 2);

    // Another key, another tag; another user, another tag.
    let other = tempfile::tempdir().unwrap();
    let b = Audited::start(other.path(), |c| {
        c.audit.hmac_key_file = Some(key_file(other.path(), "other-key", OTHER_TAG_KEY));
    })
    .await;
    b.tokens(CHECKOUT_SECRET, &user_form("user-1"), "r", &[])
        .await;
    b.tokens(CHECKOUT_SECRET, &user_form("user-2"), "r", &[])
        .await;
    let tags = mint_tags(&b.stop().await);
    assert_eq!(
        tags[0],
        serde_json::json!(tag(OTHER_TAG_KEY, Identifier::AccountId("user-1")))
    );
    assert_ne!(tags[0], expected);
    assert_ne!(tags[1], tags[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reads_the_tag_key_again_and_later_tags_use_it() {
    let dir = tempfile::tempdir().unwrap();
    let b = Audited::start(dir.path(), |_| {}).await;
    b.tokens(CHECKOUT_SECRET, &user_form("user-1"), "before", &[])
        .await;
    key_file(dir.path(), "tag-key", OTHER_TAG_KEY);
    let r = send(Method::POST, &format!("{}/admin/reload", b.admin), &[], "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    b.tokens(CHECKOUT_SECRET, &user_form("user-2"), "after", &[])
        .await;
    let lines = b.stop().await;
    let mint = |id: &str| {
        events(&lines, "mint")
            .into_iter()
            .find(|m| m["request_id"] == id)
            .unwrap()
            .clone()
    };
    let (before, after) = (mint("before"), mint("after"));
    assert_eq!(
        before["user"][0],
        tag(TAG_KEY, Identifier::AccountId("user-1"))
    );
    assert_eq!(
        after["user"][0],
        tag(OTHER_TAG_KEY, Identifier::AccountId("user-2"))
    );
    assert_ne!(before["tag_key"], after["tag_key"]);
    assert_eq!(events(&lines, "reload")[0]["tag_key"], after["tag_key"]);
}

/// Paths the broker cannot write: a directory that does not exist, and (Linux) a full disk.
fn unwritable(dir: &Path) -> Vec<PathBuf> {
    let mut paths = vec![dir.join("removed").join("audit.jsonl")];
    if cfg!(target_os = "linux") {
        paths.push(PathBuf::from("/dev/full"));
    }
    paths
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuse_answers_503_without_an_upstream_call_when_the_file_cannot_be_written() {
    let dir = tempfile::tempdir().unwrap();
    for path in unwritable(dir.path()) {
        let b = Audited::start(dir.path(), |c| {
            c.audit.file = Some(path.clone());
            c.audit.on_failure = OnFailure::Refuse;
            c.clients[0].passthrough = vec![RESULT.into()];
        })
        .await;
        // The broker started: its admin listener answers and says why.
        let metrics = send(Method::GET, &format!("{}/metrics", b.admin), &[], "").await;
        assert!(
            metrics.text().contains("token_broker_audit_writable 0"),
            "{}",
            path.display()
        );
        let r = b
            .tokens(CHECKOUT_SECRET, &user_form("user-1"), "r", &[])
            .await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
        assert_eq!(r.json()["error"], "audit_unavailable");
        assert_eq!(r.header("retry-after"), "5");
        let relayed = send(
            Method::GET,
            &format!("{}/truora/identity/v1/processes/IDP1/result", b.url),
            &[("authorization", &format!("Bearer {CHECKOUT_SECRET}"))],
            "",
        )
        .await;
        assert_eq!(relayed.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(b.sandbox.calls(), 0, "no mint reached Truora");
        assert!(
            b.sandbox.forwarded().is_empty(),
            "no pass-through reached Truora"
        );
        let metrics = send(Method::GET, &format!("{}/metrics", b.admin), &[], "").await;
        assert!(
            metrics
                .text()
                .contains(r#"token_broker_audit_refused_total{action="mint"} 1"#),
            "{}",
            metrics.text()
        );
        drop(b);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuse_mints_again_once_the_file_can_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let later = dir.path().join("later");
    let b = Audited::start(dir.path(), |c| {
        c.audit.file = Some(later.join("audit.jsonl"));
        c.audit.on_failure = OnFailure::Refuse;
    })
    .await;
    let r = b
        .tokens(CHECKOUT_SECRET, &user_form("user-1"), "r", &[])
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    std::fs::create_dir(&later).unwrap();
    // The writer tries again every second: within a few, mints are back.
    let mut status = StatusCode::SERVICE_UNAVAILABLE;
    for _ in 0..100 {
        status = b
            .tokens(CHECKOUT_SECRET, &user_form("user-1"), "back", &[])
            .await
            .status;
        if status == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, StatusCode::OK);
    let lines = b.stop().await;
    assert_eq!(lines[0]["event"], "resumed");
    assert!(lines[0]["lost"].as_u64().unwrap() >= 1);
    assert!(events(&lines, "mint")
        .iter()
        .any(|m| m["request_id"] == "back"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continue_mints_while_the_file_cannot_be_written_and_counts_what_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    for path in unwritable(dir.path()) {
        let b = Audited::start(dir.path(), |c| c.audit.file = Some(path.clone())).await;
        let r = b
            .tokens(CHECKOUT_SECRET, &user_form("user-1"), "r", &[])
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(b.sandbox.calls(), 1);
        // The start line and the mint's: lost, and counted.
        let mut lost = 0.0;
        for _ in 0..100 {
            let metrics = send(Method::GET, &format!("{}/metrics", b.admin), &[], "").await;
            lost = metrics
                .text()
                .lines()
                .find_map(|l| {
                    l.strip_prefix(r#"token_broker_audit_events_lost_total{reason="write_error"} "#)
                })
                .map_or(0.0, |v| v.parse().unwrap());
            if lost >= 2.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(lost >= 2.0, "{lost}");
        drop(b);
    }
}
