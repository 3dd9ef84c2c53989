//! The observability kit, checked with the real tools: the metrics page against
//! `promtool check metrics`, the rule files against `promtool check rules` and their unit tests,
//! every PromQL expression of the dashboard and the rules against promtool's parser and against
//! the series a running broker really exports, the status page in headless Chromium, the access
//! log of the real binary, request ids, and series that do not grow with traffic.
//!
//! promtool and chromium come from Debian's `prometheus` and `chromium` packages (.ci/run
//! installs them). Every process started here is bounded in time and killed when it overruns.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use token_broker::sandbox::{Fault, Sandbox, SandboxOptions};
use token_broker::secret::SecretDigest;
use tokio::io::AsyncWriteExt;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_token-broker");
const REDIRECT: &str = "redirect_url=https%3A%2F%2Fshop.example%2Fdone";

fn path(rel: &str) -> PathBuf {
    Path::new(ROOT).join(rel)
}

// ---------------------------------------------------------------------------------------------
// Running tools, bounded.

/// Runs `program` to completion within `limit` and returns (success, stdout, stderr). A program
/// that overruns is killed with its whole process group.
async fn run_tool(
    program: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    limit: Duration,
) -> (bool, String, String) {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap_or_else(|e| {
        panic!(
            "cannot run {program}: {e}. Install it: Debian packages `prometheus` (promtool) and `chromium`; .ci/run does"
        )
    });
    let pid = child.id().expect("a fresh child has an id");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input).await.unwrap();
        drop(pipe);
    }
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(out) => {
            let out = out.unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
        Err(_) => {
            // The leader is still running (not reaped), so its group id is still ours.
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
            panic!("{program} {args:?} ran longer than {limit:?} and was killed");
        }
    }
}

async fn promtool(args: &[&str], stdin: Option<&[u8]>) -> (bool, String) {
    let (ok, out, err) = run_tool("promtool", args, stdin, Duration::from_secs(120)).await;
    (ok, format!("{out}{err}"))
}

// ---------------------------------------------------------------------------------------------
// Traffic.

fn user_form(flow: &str, user: &str) -> String {
    format!("country=CO&flow_id={flow}&{REDIRECT}&account_id={user}")
}

async fn post(b: &Broker, path: &str, secret: &str, form: &str) -> Resp {
    send(
        Method::POST,
        &format!("{}{path}", b.url),
        &[
            ("authorization", &format!("Bearer {secret}")),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        form,
    )
    .await
}

async fn delete(b: &Broker, secret: &str, query: &str) -> Resp {
    send(
        Method::DELETE,
        &format!("{}/v1/tokens?{query}", b.url),
        &[("authorization", &format!("Bearer {secret}"))],
        "",
    )
    .await
}

/// One of every kind of request, for `users` distinct users named `<tag>-<n>` on two flows:
/// misses then hits (both endpoints), a request naming no user, a refused secret, an invalid
/// request, an invalidation and an upstream failure. Every round answers the same set of
/// (route, status) pairs, whatever `users`.
async fn round(b: &Broker, tag: &str, users: usize) {
    for n in 0..users {
        for flow in [format!("IPF{tag}a{n}"), format!("IPF{tag}b{n}")] {
            let form = user_form(&flow, &format!("user-{tag}-{n}"));
            let first = b.tokens(CHECKOUT_SECRET, &form).await;
            assert_eq!(first.status, StatusCode::OK, "{}", first.text());
            assert_eq!(first.header("x-cache"), "MISS");
            let again = post(b, "/v1/api-keys", CHECKOUT_SECRET, &form).await;
            assert_eq!(again.header("x-cache"), "HIT");
        }
    }
    let billing = b
        .tokens(
            BILLING_SECRET,
            &user_form("IPFbill", &format!("user-{tag}")),
        )
        .await;
    assert_eq!(billing.status, StatusCode::OK);
    let anonymous = b
        .tokens(
            CHECKOUT_SECRET,
            &format!("country=CO&flow_id=IPF{tag}&{REDIRECT}"),
        )
        .await;
    assert_eq!(anonymous.status, StatusCode::OK);
    let refused = b.tokens("not-a-configured-secret-0123456789", FORM).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    let invalid = b.tokens(CHECKOUT_SECRET, "country=XX").await;
    assert_eq!(invalid.status, StatusCode::BAD_REQUEST);
    let dropped = delete(b, CHECKOUT_SECRET, &format!("account_id=user-{tag}-0")).await;
    assert_eq!(dropped.status, StatusCode::OK);
    b.sandbox.fail_next(Fault::Status(500), 1);
    let failed = b
        .tokens(
            CHECKOUT_SECRET,
            &user_form("IPFfail", &format!("user-{tag}-f")),
        )
        .await;
    assert_eq!(failed.status, StatusCode::BAD_GATEWAY);
}

/// (name with labels) -> value, for every sample of a scrape.
fn samples(scrape: &str) -> BTreeMap<String, f64> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_owned(), value.parse().unwrap())
        })
        .collect()
}

fn value(scrape: &str, series: &str) -> f64 {
    *samples(scrape)
        .get(series)
        .unwrap_or_else(|| panic!("no {series} in\n{scrape}"))
}

/// Sum of the samples of `name` whose label set contains every `labels` pair.
fn sum(scrape: &str, name: &str, labels: &[&str]) -> f64 {
    samples(scrape)
        .iter()
        .filter(|(series, _)| {
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            n == name && labels.iter().all(|l| rest.contains(l))
        })
        .map(|(_, v)| v)
        .sum()
}

/// Every metric and sample name of a scrape (families and their _bucket/_sum/_count).
fn exported_names(scrape: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in scrape.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            names.insert(rest.split(' ').next().unwrap().to_owned());
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap();
            names.insert(line[..end].to_owned());
        }
    }
    names
}

// ---------------------------------------------------------------------------------------------
// Metrics.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_series_count_does_not_grow_with_users_flows_or_tokens() {
    let b = Broker::start(|c, _| c.upstream.mint_rate = 100_000).await;
    round(&b, "warm", 2).await;
    let before = b.metrics().await;
    round(&b, "many", 40).await;
    let after = b.metrics().await;
    let (n_before, n_after) = (samples(&before).len(), samples(&after).len());
    assert_eq!(
        n_before, n_after,
        "80 more users, 80 more flows and 80 more tokens added series"
    );
    // The traffic really went through (so the equality above means something).
    assert!(
        value(&after, r#"token_broker_cache_lookups_total{result="miss"}"#)
            >= value(
                &before,
                r#"token_broker_cache_lookups_total{result="miss"}"#
            ) + 80.0
    );
    for never in ["user-many-", "IPFmany", "eyJ"] {
        assert!(!after.contains(never), "{never} reached /metrics");
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_new_series_count_what_happened() {
    let b = Broker::start(|_, s| s.delay = Duration::from_millis(1000)).await;
    let b = Arc::new(b);
    // 12 identical misses at once (the sandbox answers after 1 s): one fill, 12 waiters.
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let b = Arc::clone(&b);
        tasks.push(tokio::spawn(async move {
            b.tokens(CHECKOUT_SECRET, FORM).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().status, StatusCode::OK);
    }
    b.sandbox.set_options(|o| o.delay = Duration::ZERO);
    // Two hits, a request naming no user, a billing miss, an invalidation.
    for _ in 0..2 {
        assert_eq!(
            b.tokens(CHECKOUT_SECRET, FORM).await.header("x-cache"),
            "HIT"
        );
    }
    let anonymous = format!("country=CO&flow_id=IPF1&{REDIRECT}");
    assert_eq!(
        b.tokens(CHECKOUT_SECRET, &anonymous).await.status,
        StatusCode::OK
    );
    assert_eq!(b.tokens(BILLING_SECRET, FORM).await.status, StatusCode::OK);
    assert_eq!(
        delete(&b, CHECKOUT_SECRET, "account_id=user-1")
            .await
            .status,
        StatusCode::OK
    );
    let m = b.metrics().await;

    // Coalesced waiters per fill: the checkout fill served 12, the billing one 1.
    assert_eq!(value(&m, "token_broker_cache_fill_waiters_count"), 2.0);
    assert_eq!(value(&m, "token_broker_cache_fill_waiters_sum"), 13.0);
    assert_eq!(
        value(&m, r#"token_broker_cache_fill_waiters_bucket{le="10"}"#),
        1.0
    );
    // Remaining lifetime at serve time: every token answered (12 + 2 + 1 + 1), all with nearly
    // two hours left.
    assert_eq!(
        value(&m, "token_broker_token_remaining_seconds_count"),
        16.0
    );
    assert_eq!(
        value(
            &m,
            r#"token_broker_token_remaining_seconds_bucket{le="6300"}"#
        ),
        0.0
    );
    // Evictions by cause: the invalidation.
    assert_eq!(
        value(
            &m,
            r#"token_broker_cache_evictions_total{cause="explicit"}"#
        ),
        1.0
    );
    assert_eq!(value(&m, "token_broker_cache_entries"), 1.0);
    // Per caller.
    let checkout = |cache: &str| {
        value(
            &m,
            &format!(r#"token_broker_caller_requests_total{{cache="{cache}",caller="checkout"}}"#),
        )
    };
    assert_eq!(checkout("miss"), 12.0);
    assert_eq!(checkout("hit"), 2.0);
    assert_eq!(checkout("uncacheable"), 1.0);
    assert_eq!(checkout("none"), 1.0);
    assert_eq!(
        value(&m, r#"token_broker_caller_mints_total{caller="checkout"}"#),
        2.0
    );
    assert_eq!(
        value(&m, r#"token_broker_caller_mints_total{caller="billing"}"#),
        1.0
    );
    // Nothing in flight once answered; the last mint is recent; the build is named.
    assert_eq!(value(&m, "token_broker_requests_in_flight"), 0.0);
    let last = value(&m, "token_broker_upstream_last_success_timestamp_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(last > now - 60.0 && last <= now + 1.0, "{last} vs {now}");
    assert!(m.contains(&format!(
        r#"token_broker_build_info{{revision="unknown",version="{}"}} 1"#,
        env!("CARGO_PKG_VERSION")
    )));
    assert!(value(&m, "process_resident_memory_bytes") > 1e6);
    assert_eq!(
        value(&m, "token_broker_cache_max_entries"),
        token_broker::config::Config::default().cache.max_entries as f64
    );
    match Arc::try_unwrap(b) {
        Ok(b) => b.stop().await,
        Err(_) => panic!("a request task still holds the broker"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_counts_requests_being_answered() {
    let b = Broker::start(|_, s| s.delay = Duration::from_millis(800)).await;
    let b = Arc::new(b);
    let slow = {
        let b = Arc::clone(&b);
        tokio::spawn(async move { b.tokens(CHECKOUT_SECRET, FORM).await })
    };
    let broker = &*b;
    let in_flight = || async move {
        let m = broker.metrics().await;
        value(&m, "token_broker_requests_in_flight") == 1.0
            && value(&m, "token_broker_upstream_in_flight") == 1.0
    };
    let what = || "the slow request was never in flight".to_owned();
    wait_for(
        Duration::from_secs(5),
        Duration::from_millis(20),
        in_flight,
        what,
    )
    .await;
    assert_eq!(slow.await.unwrap().status, StatusCode::OK);
    assert_eq!(
        value(&b.metrics().await, "token_broker_requests_in_flight"),
        0.0
    );
}

// ---------------------------------------------------------------------------------------------
// Request ids.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incoming_request_id_is_returned_and_one_is_made_when_absent_or_unsafe() {
    let b = Broker::start(|_, _| {}).await;
    let kept = with_request_id(&b, "3f2c9a1e-7b4d-4c2a-9e1f-0a1b2c3d4e5f").await;
    assert_eq!(kept.status, StatusCode::OK);
    assert_eq!(
        kept.header("x-request-id"),
        "3f2c9a1e-7b4d-4c2a-9e1f-0a1b2c3d4e5f"
    );
    // Errors carry it too.
    let refused = b.tokens("wrong-secret-0123456789abcdef", FORM).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    let generated = refused.header("x-request-id").to_owned();
    assert!(
        token_broker::server::access::acceptable(generated.as_bytes()),
        "{generated:?}"
    );
    let another = b.tokens(CHECKOUT_SECRET, FORM).await;
    let next = another.header("x-request-id").to_owned();
    assert_ne!(generated, next);
    assert_eq!(
        generated.split_once('-').unwrap().0,
        next.split_once('-').unwrap().0,
        "one prefix per process"
    );
    for unsafe_id in ["has spaces", "jane@example.com", &*"x".repeat(65)] {
        let r = with_request_id(&b, unsafe_id).await;
        let id = r.header("x-request-id");
        assert_ne!(id, unsafe_id);
        assert!(
            token_broker::server::access::acceptable(id.as_bytes()),
            "{id:?}"
        );
    }
    b.stop().await;
}

async fn with_request_id(b: &Broker, id: &str) -> Resp {
    send(
        Method::POST,
        &format!("{}/v1/tokens", b.url),
        &[
            ("authorization", &format!("Bearer {CHECKOUT_SECRET}")),
            ("content-type", "application/x-www-form-urlencoded"),
            ("x-request-id", id),
        ],
        FORM,
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// promtool.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rule_files_pass_promtool_check_and_their_unit_tests() {
    let rules = [
        path("deploy/prometheus/recording.rules.yml"),
        path("deploy/prometheus/alerts.rules.yml"),
    ];
    let rules: Vec<&str> = rules.iter().map(|p| p.to_str().unwrap()).collect();
    let mut args = vec!["check", "rules"];
    args.extend(&rules);
    let (ok, out) = promtool(&args, None).await;
    assert!(ok, "promtool check rules:\n{out}");
    assert!(out.contains("SUCCESS"), "{out}");

    let mut tests: Vec<String> = std::fs::read_dir(path("deploy/prometheus/tests"))
        .unwrap()
        .map(|e| e.unwrap().path().to_str().unwrap().to_owned())
        .filter(|p| p.ends_with(".test.yml"))
        .collect();
    tests.sort();
    assert!(tests.len() >= 2, "{tests:?}");
    let mut args = vec!["test", "rules"];
    args.extend(tests.iter().map(String::as_str));
    let (ok, out) = promtool(&args, None).await;
    assert!(ok, "promtool test rules:\n{out}");

    // Every alert the rules define is exercised by a unit test and has a runbook entry.
    let alerts = rule_names("alert");
    let issue_alerts = [
        "TokenBrokerUpstreamCredentialRejected",
        "TokenBrokerBreakerOpen",
        "TokenBrokerHighErrorRatio",
        "TokenBrokerHitRatioCollapse",
        "TokenBrokerHighLatency",
        "TokenBrokerUpstreamThrottled",
    ];
    for a in issue_alerts {
        assert!(alerts.contains(a), "no alert {a}");
    }
    // Alerts some unit test expects to fire.
    let mut fired = BTreeSet::new();
    for t in &tests {
        let doc: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(t).unwrap()).unwrap();
        for case in doc["tests"].as_sequence().unwrap() {
            for check in case["alert_rule_test"].as_sequence().into_iter().flatten() {
                if check["exp_alerts"]
                    .as_sequence()
                    .is_some_and(|a| !a.is_empty())
                {
                    fired.insert(check["alertname"].as_str().unwrap().to_owned());
                }
            }
        }
    }
    let runbook = std::fs::read_to_string(path("docs/observability.md")).unwrap();
    for a in &alerts {
        assert!(fired.contains(a), "no unit test expects {a} to fire");
        assert!(
            runbook.contains(&format!("### {a}\n")),
            "no runbook entry for {a} in docs/observability.md"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_scrape_passes_promtool_check_metrics_and_every_promql_names_exported_series() {
    let b = Broker::start(|c, _| with_webhooks(c)).await;
    round(&b, "scrape", 2).await;
    let scrape = b.metrics().await;
    b.stop().await;

    let (ok, out) = promtool(&["check", "metrics"], Some(scrape.as_bytes())).await;
    assert!(
        ok,
        "promtool check metrics:\n{out}\n--- scrape ---\n{scrape}"
    );

    let exprs = all_expressions();
    assert!(exprs.len() >= 50, "{} expressions", exprs.len());
    // Every expression parses: promtool checks the rule files' own; the dashboard's go through
    // a temporary rule file.
    let dashboard: Vec<&Expr> = exprs
        .iter()
        .filter(|e| e.origin.starts_with("dashboard") && !e.template)
        .collect();
    let (ok, out) = check_parses(dashboard.iter().map(|e| e.promql.as_str())).await;
    assert!(ok, "a dashboard expression does not parse:\n{out}");

    let mut known = exported_names(&scrape);
    known.extend(rule_names("record"));
    // Prometheus makes `up` itself for every target.
    known.insert("up".to_owned());
    // The Redis tier's and the fleet limits' series exist only with [cache.shared] and a Redis:
    // the dashboard may name those documented in docs/observability.md, and
    // tests/shared_cache.rs checks both the docs and the dashboard against a live scrape.
    let docs = std::fs::read_to_string(path("docs/observability.md")).unwrap();
    for row in docs.lines().filter_map(|l| l.strip_prefix("| `")) {
        let name = row.split('`').next().unwrap();
        if name.starts_with("token_broker_shared_cache_") || name.starts_with("token_broker_fleet_")
        {
            known.insert(name.to_owned());
        }
    }
    let unknown = unknown_names(&exprs, &known);
    assert!(
        unknown.is_empty(),
        "PromQL naming series the broker does not export:\n{unknown:#?}"
    );
    // docs/observability.md describes every family the broker exports.
    for family in scrape.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let name = family.split(' ').next().unwrap();
        assert!(
            docs.contains(&format!("| `{name}` |")),
            "{name} is not in the metrics tables of docs/observability.md"
        );
    }
    // The issue's contract names are among the exports.
    for name in [
        "token_broker_token_remaining_seconds_bucket",
        "token_broker_build_info",
        "process_resident_memory_bytes",
    ] {
        assert!(known.contains(name), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_promql_checks_catch_a_broken_or_unknown_expression() {
    let (ok, out) = check_parses(["sum(rate(token_broker_requests_total[5m])"].into_iter()).await;
    assert!(!ok, "an unbalanced expression passed:\n{out}");
    let exprs = vec![Expr {
        origin: "test".into(),
        promql: "sum by (route, le) (rate(token_broker_nope_seconds_bucket[5m])) / on (job) up"
            .into(),
        template: false,
    }];
    let known: BTreeSet<String> = ["up".to_owned()].into();
    assert_eq!(
        unknown_names(&exprs, &known),
        vec!["test: token_broker_nope_seconds_bucket".to_owned()]
    );
}

#[test]
fn metric_names_are_told_from_functions_labels_and_keywords() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (job, route, le) (rate(a_bucket{route=~"x|y", le!="1"}[5m] offset 1h)))"#
        ),
        ["a_bucket"]
    );
    assert_eq!(
        names("sum without (instance) (b) / ignoring (x) group_left (y) c and on (job) d:rec:ratio > bool 0.5"),
        ["b", "c", "d:rec:ratio"]
    );
    assert_eq!(
        names(r#"max(min_over_time(e[3m:1m])) >= 1 unless count(f{s="a\"b{c"}) == 0"#),
        ["e", "f"]
    );
    assert_eq!(names(r#"time() - max(g > 0) * 1e3"#), ["g"]);
}

// ---------------------------------------------------------------------------------------------
// Dashboard and rules: the expressions.

#[derive(Debug)]
struct Expr {
    origin: String,
    promql: String,
    /// A Grafana variable query (`label_values(...)`), not PromQL itself.
    template: bool,
}

fn yaml(rel: &str) -> serde_yaml::Value {
    serde_yaml::from_str(&std::fs::read_to_string(path(rel)).unwrap()).unwrap()
}

fn rule_files() -> Vec<(&'static str, serde_yaml::Value)> {
    [
        "deploy/prometheus/recording.rules.yml",
        "deploy/prometheus/alerts.rules.yml",
    ]
    .into_iter()
    .map(|f| (f, yaml(f)))
    .collect()
}

fn rules_of(doc: &serde_yaml::Value) -> impl Iterator<Item = &serde_yaml::Value> {
    doc["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap())
}

/// The `record` (or `alert`) names of the rule files.
fn rule_names(kind: &str) -> BTreeSet<String> {
    rule_files()
        .iter()
        .flat_map(|(_, doc)| rules_of(doc).filter_map(|r| r[kind].as_str().map(str::to_owned)))
        .collect()
}

/// Grafana's variables, as a panel would see them with every value selected.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
        .replace("${job}", ".*")
        .replace("$job", ".*")
        .replace("$instance", ".*")
        .replace("$caller", ".*")
}

fn collect_dashboard(value: &serde_json::Value, at: &str, out: &mut Vec<Expr>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let here = format!("{at}/{k}");
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(Expr {
                        origin: here,
                        promql: substitute(e),
                        template: false,
                    }),
                    ("definition", serde_json::Value::String(e)) => out.push(Expr {
                        origin: here,
                        promql: substitute(e),
                        template: true,
                    }),
                    _ => collect_dashboard(v, &here, out),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                collect_dashboard(v, &format!("{at}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(path("deploy/grafana/token-broker.json")).unwrap(),
    )
    .unwrap()
}

fn all_expressions() -> Vec<Expr> {
    let mut out = Vec::new();
    collect_dashboard(&dashboard(), "dashboard", &mut out);
    for (file, doc) in rule_files() {
        for rule in rules_of(&doc) {
            let name = rule["record"].as_str().or(rule["alert"].as_str()).unwrap();
            out.push(Expr {
                origin: format!("{file}: {name}"),
                promql: rule["expr"].as_str().unwrap().to_owned(),
                template: false,
            });
        }
    }
    out
}

/// Parses every expression with promtool, as recording rules of a temporary file.
async fn check_parses<'a>(exprs: impl Iterator<Item = &'a str>) -> (bool, String) {
    let mut file = String::from("groups:\n  - name: parse-check\n    rules:\n");
    for (i, e) in exprs.enumerate() {
        // A JSON string is a YAML double-quoted string.
        file.push_str(&format!(
            "      - record: parse_check:expr_{i}\n        expr: {}\n",
            serde_json::to_string(e).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("parse-check.rules.yml");
    std::fs::write(&rules, file).unwrap();
    promtool(&["check", "rules", rules.to_str().unwrap()], None).await
}

fn unknown_names(exprs: &[Expr], known: &BTreeSet<String>) -> Vec<String> {
    let mut unknown = Vec::new();
    for e in exprs {
        let promql = match e.promql.strip_prefix("label_values(") {
            // label_values(<selector>, <label>): the selector is PromQL.
            Some(rest) if e.template => rest.rsplit_once(',').unwrap().0.to_owned(),
            _ => e.promql.clone(),
        };
        let names = metric_names(&promql);
        assert!(!names.is_empty(), "{}: names no series: {promql}", e.origin);
        for n in names {
            if !known.contains(&n) {
                unknown.push(format!("{}: {n}", e.origin));
            }
        }
    }
    unknown
}

/// The series names a PromQL expression selects: identifiers outside strings, label matchers
/// and ranges that are neither functions (followed by `(`), nor keywords or aggregation
/// operators, nor the label lists of `by`, `without`, `on`, `ignoring`, `group_left/right`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const NOT_SERIES: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
        "inf",
        "nan",
        "Inf",
        "NaN",
    ];
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let c: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // Skips from an opening char to just past its closing one, minding quoted strings.
    let skip = |mut i: usize, close: char| -> usize {
        i += 1;
        while i < c.len() && c[i] != close {
            if matches!(c[i], '"' | '\'' | '`') {
                let q = c[i];
                i += 1;
                while i < c.len() && c[i] != q {
                    i += if c[i] == '\\' { 2 } else { 1 };
                }
            }
            i += 1;
        }
        i + 1
    };
    while i < c.len() {
        let ch = c[i];
        if matches!(ch, '"' | '\'' | '`') {
            let q = ch;
            i += 1;
            while i < c.len() && c[i] != q {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if ch == '{' {
            i = skip(i, '}');
        } else if ch == '[' {
            i = skip(i, ']');
        } else if ch.is_ascii_digit()
            || (ch == '.' && c.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.') {
                i += 1;
            }
        } else if ch.is_ascii_alphabetic() || ch == '_' || ch == ':' {
            let start = i;
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_' || c[i] == ':') {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let mut j = i;
            while j < c.len() && c[j].is_whitespace() {
                j += 1;
            }
            let called = c.get(j) == Some(&'(');
            if called && LABEL_LISTS.contains(&word.as_str()) {
                i = skip(j, ')');
            } else if !called && !NOT_SERIES.contains(&word.as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn the_dashboard_has_the_views_platform_teams_need() {
    let d = dashboard();
    let panels = d["panels"].as_array().unwrap();
    let titles: Vec<&str> = panels
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for row in [
        "Traffic",
        "Cache",
        "Truora (upstream)",
        "Per caller",
        "Process",
    ] {
        assert!(
            titles.iter().any(|t| t.starts_with(row)),
            "no {row} row in {titles:?}"
        );
    }
    for panel in [
        "Hit ratio",
        "Latency by route",
        "Breaker",
        "Requests by caller",
    ] {
        assert!(titles.contains(&panel), "no {panel} panel");
    }
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id");
        for t in p["targets"].as_array().into_iter().flatten() {
            assert_eq!(t["datasource"]["uid"], "${datasource}");
        }
    }
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["datasource", "job", "instance", "caller"]);
}

// ---------------------------------------------------------------------------------------------
// The status page, in a real browser.

/// `data-value` of the element whose id is `id`.
fn shown(dom: &str, id: &str) -> String {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page:\n{dom}"));
    let tag_start = dom[..at].rfind('<').unwrap();
    let tag = &dom[tag_start..tag_start + dom[tag_start..].find('>').unwrap()];
    let v = tag.split("data-value=\"").nth(1).unwrap();
    v[..v.find('"').unwrap()].to_owned()
}

/// The per-caller `data-value` of `field` in `caller`'s row.
fn caller_cell(dom: &str, caller: &str, field: &str) -> u64 {
    let row = dom
        .split("<tr")
        .find(|r| r.contains(&format!("data-caller=\"{caller}\"")))
        .unwrap_or_else(|| panic!("no row for {caller}"));
    let cell = row
        .split(&format!("data-field=\"{field}\""))
        .nth(1)
        .unwrap();
    let v = cell.split("data-value=\"").nth(1).unwrap();
    v[..v.find('"').unwrap()].parse().unwrap()
}

fn chromium_args(profile: &Path) -> Vec<String> {
    [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("--user-data-dir={}", profile.display())])
    .collect()
}

async fn chromium(extra: &[String], url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut args = chromium_args(profile.path());
    args.extend(extra.iter().cloned());
    args.push(url.to_owned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = run_tool("chromium", &args, None, Duration::from_secs(90)).await;
    assert!(ok, "chromium failed:\n{err}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_brokers_state_in_a_real_browser() {
    let started = Instant::now();
    let b = Broker::start(|_, _| {}).await;
    round(&b, "page", 3).await;
    // Truora throttles: the page must say so.
    b.sandbox.set_fault(Some(Fault::Throttle(600)));
    let throttled = b
        .tokens(CHECKOUT_SECRET, &user_form("IPFthrottle", "user-page-t"))
        .await;
    assert_eq!(throttled.status, StatusCode::SERVICE_UNAVAILABLE);

    let headers = send(Method::GET, &format!("{}/", b.admin), &[], "").await;
    assert_eq!(headers.status, StatusCode::OK);
    assert_eq!(headers.header("content-type"), "text/html; charset=utf-8");
    assert!(headers
        .header("content-security-policy")
        .starts_with("default-src 'none'"));

    let dom = chromium(&["--dump-dom".to_owned()], &format!("{}/", b.admin)).await;
    // No caller request since: the scrape reads the same state the page showed.
    let m = b.metrics().await;

    assert!(dom.contains("<title>token-broker status</title>"), "{dom}");
    assert!(
        dom.contains(r#"<meta http-equiv="refresh" content="5">"#),
        "the page does not refresh itself"
    );
    for external in ["<script", "<link", "src=", "@import", "url("] {
        assert!(!dom.contains(external), "{external} in the page");
    }
    let hits = value(&m, r#"token_broker_cache_lookups_total{result="hit"}"#);
    let lookups = hits
        + value(&m, r#"token_broker_cache_lookups_total{result="miss"}"#)
        + value(
            &m,
            r#"token_broker_cache_lookups_total{result="coalesced"}"#,
        );
    assert_eq!(shown(&dom, "hit-ratio"), format!("{:.4}", hits / lookups));
    assert_eq!(
        shown(&dom, "entries"),
        value(&m, "token_broker_cache_entries").to_string()
    );
    assert_eq!(shown(&dom, "hits"), hits.to_string());
    assert_eq!(
        shown(&dom, "requests"),
        sum(&m, "token_broker_requests_total", &[]).to_string()
    );
    assert_eq!(
        shown(&dom, "requests-5xx"),
        sum(&m, "token_broker_requests_total", &[r#"status="5"#]).to_string()
    );
    assert_eq!(
        shown(&dom, "evictions-explicit"),
        value(
            &m,
            r#"token_broker_cache_evictions_total{cause="explicit"}"#
        )
        .to_string()
    );
    assert_eq!(shown(&dom, "upstream-health"), "throttled");
    assert_eq!(shown(&dom, "breaker"), "closed");
    // Truora asked for 600 s; the broker believes at most upstream::MAX_RETRY_AFTER.
    let throttled_for: f64 = shown(&dom, "throttled-for").parse().unwrap();
    let most = token_broker::upstream::MAX_RETRY_AFTER.as_secs_f64();
    assert!(
        (most - 60.0..=most).contains(&throttled_for),
        "{throttled_for}"
    );
    assert_eq!(
        shown(&dom, "upstream-ok"),
        value(&m, r#"token_broker_upstream_requests_total{outcome="ok"}"#).to_string()
    );
    assert_eq!(shown(&dom, "version"), env!("CARGO_PKG_VERSION"));
    let uptime: u64 = shown(&dom, "uptime").parse().unwrap();
    assert!(uptime <= started.elapsed().as_secs() + 1, "{uptime}");
    for caller in ["checkout", "billing"] {
        let requests = sum(
            &m,
            "token_broker_caller_requests_total",
            &[&format!(r#"caller="{caller}""#)],
        );
        assert!(requests > 0.0);
        assert_eq!(caller_cell(&dom, caller, "requests") as f64, requests);
        assert_eq!(
            caller_cell(&dom, caller, "mints") as f64,
            value(
                &m,
                &format!(r#"token_broker_caller_mints_total{{caller="{caller}"}}"#)
            )
        );
        assert_eq!(
            caller_cell(&dom, caller, "hits") as f64,
            value(
                &m,
                &format!(r#"token_broker_caller_requests_total{{cache="hit",caller="{caller}"}}"#)
            )
        );
    }

    // A screenshot: the page renders. TOKEN_BROKER_STATUS_SCREENSHOT=<file> keeps a copy
    // (docs/status-page.png is made so).
    let dir = tempfile::tempdir().unwrap();
    let shot = dir.path().join("status.png");
    chromium(
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1200,900".to_owned(),
            "--hide-scrollbars".to_owned(),
        ],
        &format!("{}/", b.admin),
    )
    .await;
    let png = std::fs::read(&shot).expect("chromium wrote no screenshot");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000);
    if let Ok(keep) = std::env::var("TOKEN_BROKER_STATUS_SCREENSHOT") {
        std::fs::write(keep, &png).unwrap();
    }
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The access log of the real binary.

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The binary serving a config on free ports, its stderr collected; killed when dropped.
struct Served {
    child: std::process::Child,
    err: Arc<Mutex<String>>,
    url: String,
    admin: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Served {
    async fn start(upstream: &str, log_format: &str, rust_log: &str) -> Self {
        let (listen, admin) = (free_port(), free_port());
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("broker.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[server]
listen = "127.0.0.1:{listen}"
admin_listen = "127.0.0.1:{admin}"
[upstream]
account_url = "{upstream}"
web_url = "https://identity.truora.com"
[[clients]]
id = "checkout"
token_sha256 = "{}"
"#,
                SecretDigest::of(CHECKOUT_SECRET.as_bytes()).to_hex()
            ),
        )
        .unwrap();
        let mut child = std::process::Command::new(BIN)
            .args(["serve", "--config", config.to_str().unwrap()])
            .args(["--log-format", log_format])
            .env("TRUORA_API_KEY", MASTER_KEY)
            .env("RUST_LOG", rust_log)
            .env_remove("TOKEN_BROKER_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&err);
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let served = Served {
            child,
            err,
            url: format!("http://127.0.0.1:{listen}"),
            admin: format!("http://127.0.0.1:{admin}"),
        };
        wait_for_port(
            admin,
            Duration::from_secs(20),
            Duration::from_millis(50),
            || format!("broker not ready: {}", served.log()),
        )
        .await;
        drop(dir);
        served
    }

    fn log(&self) -> String {
        self.err.lock().unwrap().clone()
    }

    /// Waits (at most 10 s) until `n` access lines are written, and returns the whole log.
    async fn log_with_access_lines(&self, n: usize, is_access: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            let count = log.lines().filter(|l| is_access(l)).count();
            if count >= n || Instant::now() > deadline {
                return log;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

const EMAIL: &str = "jane.doe@example.com";
const PHONE: &str = "+573001234567";
const PHONE2: &str = "+573009876543";
const WRONG_SECRET: &str = "wrong-secret-but-secret-0123456789";

/// A session of requests carrying emails, phones and secrets; returns the answers with what was
/// sent as `X-Request-Id` (if anything).
async fn session(s: &Served) -> Vec<(Option<&'static str>, Resp)> {
    let enc = |v: &str| form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>();
    let with_person = format!(
        "country=CO&flow_id=IPF0a1b2c&{REDIRECT}&emails={}&phone={}",
        enc(EMAIL),
        enc(PHONE)
    );
    let requests: Vec<(Method, &str, &str, String, Option<&'static str>)> = vec![
        (
            Method::POST,
            "/v1/tokens",
            CHECKOUT_SECRET,
            with_person.clone(),
            Some("obs-req-0001"),
        ),
        (
            Method::POST,
            "/v1/tokens",
            CHECKOUT_SECRET,
            with_person.clone(),
            None,
        ),
        (
            Method::POST,
            "/v1/api-keys",
            CHECKOUT_SECRET,
            format!(
                "country=CO&flow_id=IPF0a1b2c&{REDIRECT}&account_id=user-log-1&phones={}",
                enc(PHONE2)
            ),
            None,
        ),
        (
            Method::POST,
            "/v1/tokens",
            CHECKOUT_SECRET,
            format!("country=CO&flow_id=IPF1&{REDIRECT}"),
            None,
        ),
        (
            Method::POST,
            "/v1/tokens",
            WRONG_SECRET,
            with_person.clone(),
            None,
        ),
        (
            Method::POST,
            "/v1/tokens",
            CHECKOUT_SECRET,
            format!("country=CO&flow_id=IPF1&{REDIRECT}&emails=jane.doe%40example"),
            Some("bad id with spaces"),
        ),
        (
            Method::DELETE,
            "/v1/tokens?account_id=user-log-1",
            CHECKOUT_SECRET,
            String::new(),
            None,
        ),
        (
            Method::POST,
            "/v1/tokens",
            CHECKOUT_SECRET,
            format!(
                "country=CO&flow_id=IPFsandbox500&{REDIRECT}&emails={}",
                enc(EMAIL)
            ),
            None,
        ),
    ];
    let mut answers = Vec::new();
    for (method, path, secret, body, id) in requests {
        let auth = format!("Bearer {secret}");
        let mut headers = vec![
            ("authorization", auth.as_str()),
            ("content-type", "application/x-www-form-urlencoded"),
        ];
        if let Some(id) = id {
            headers.push(("x-request-id", id));
        }
        let r = send(method, &format!("{}{path}", s.url), &headers, &body).await;
        answers.push((id, r));
    }
    let statuses: Vec<u16> = answers.iter().map(|(_, r)| r.status.as_u16()).collect();
    assert_eq!(statuses, [200, 200, 200, 200, 401, 400, 200, 502]);
    answers
}

/// What must never be in a log line.
fn forbidden(answers: &[(Option<&str>, Resp)]) -> Vec<String> {
    let mut never: Vec<String> = [
        CHECKOUT_SECRET,
        WRONG_SECRET,
        MASTER_KEY,
        EMAIL,
        "jane.doe%40example",
        "jane.doe@example",
        PHONE,
        &PHONE[1..],
        PHONE2,
        &PHONE2[1..],
        "%2B57300",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (_, r) in answers {
        if r.status == StatusCode::OK {
            if let Some(token) = r.json()["api_key"].as_str() {
                never.push(token.to_owned());
                // Any one part of the JWT is as telling.
                never.extend(token.split('.').map(str::to_owned));
            }
        }
    }
    never
}

/// `lines` in the order of the answers they log, matched by request id: the runtime's workers
/// write their lines in batches, so the lines of two workers may come out of order.
fn in_answer_order<'a, L>(
    answers: &[(Option<&'static str>, Resp)],
    lines: &[&'a L],
    id: impl Fn(&L) -> String,
) -> Vec<&'a L> {
    answers
        .iter()
        .map(|(_, r)| {
            let want = r.header("x-request-id");
            let found: Vec<&L> = lines.iter().copied().filter(|l| id(l) == want).collect();
            assert_eq!(found.len(), 1, "one access line for request {want}");
            found[0]
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_have_one_access_line_per_request_and_never_a_secret_even_at_debug() {
    let upstream = Sandbox::start(SandboxOptions::new(MASTER_KEY))
        .await
        .unwrap();
    let s = Served::start(&upstream.url(), "text", "debug").await;
    let answers = session(&s).await;
    let is_access = |l: &str| l.contains(" access: request ");
    let log = s.log_with_access_lines(answers.len(), is_access).await;
    let access: Vec<&str> = log.lines().filter(|l| is_access(l)).collect();
    assert_eq!(access.len(), answers.len(), "{log}");
    let lines: Vec<&&str> = access.iter().collect();
    let access: Vec<&str> = in_answer_order(&answers, &lines, |l: &&str| {
        let id = l.split("request_id=").nth(1).unwrap_or("");
        id.split(' ').next().unwrap_or("").to_owned()
    })
    .into_iter()
    .copied()
    .collect();
    for ((sent, r), line) in answers.iter().zip(&access) {
        let id = r.header("x-request-id");
        assert!(!id.is_empty());
        if let Some(sent) = sent.filter(|s| token_broker::server::access::acceptable(s.as_bytes()))
        {
            assert_eq!(id, sent);
        }
        for field in [
            format!("request_id={id} "),
            format!("status={} ", r.status.as_u16()),
            "route=".to_owned(),
            "cache=".to_owned(),
            "latency_us=".to_owned(),
        ] {
            assert!(line.contains(&field), "{field} not in: {line}");
        }
    }
    // The request refused by validation (6th) names its caller only once the auth layer
    // notes it (see docs/observability.md); "-" until then, so its caller is not checked.
    let expected = [
        (Some("checkout"), "tokens", "miss"),
        (Some("checkout"), "tokens", "hit"),
        (Some("checkout"), "api_keys", "miss"),
        (Some("checkout"), "tokens", "uncacheable"),
        (Some("-"), "tokens", "-"),
        (None, "tokens", "-"),
        (Some("checkout"), "invalidate", "-"),
        (Some("checkout"), "tokens", "miss"),
    ];
    for (line, (caller, route, cache)) in access.iter().zip(expected) {
        let mut fields = vec![format!("route={route} "), format!("cache={cache} ")];
        fields.extend(caller.map(|c| format!("caller={c} ")));
        for f in fields {
            assert!(line.contains(&f), "{f} not in: {line}");
        }
    }
    assert!(access[0].contains("request_id=obs-req-0001 "));
    // Logs at debug include the refusals and the upstream failure; none of it is sensitive.
    assert!(log.contains("upstream failure"), "{log}");
    for never in forbidden(&answers) {
        assert!(!log.contains(&never), "{never:?} is in the log:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_flat_object_per_line_with_the_access_fields() {
    let upstream = Sandbox::start(SandboxOptions::new(MASTER_KEY))
        .await
        .unwrap();
    let s = Served::start(&upstream.url(), "json", "info").await;
    let answers = session(&s).await;
    let is_access = |l: &str| l.contains(r#""target":"access""#);
    let log = s.log_with_access_lines(answers.len(), is_access).await;
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let access: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["target"] == "access").collect();
    assert_eq!(access.len(), answers.len(), "{log}");
    let access = in_answer_order(&answers, &access, |l| {
        l["request_id"].as_str().unwrap_or("").to_owned()
    });
    for ((_, r), line) in answers.iter().zip(&access) {
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["message"], "request");
        assert_eq!(line["request_id"], r.header("x-request-id"));
        assert_eq!(line["status"], r.status.as_u16());
        assert!(line["latency_us"].is_u64());
        for field in ["caller", "route", "cache", "timestamp"] {
            assert!(line[field].is_string(), "{field} in {line}");
        }
    }
    assert_eq!(access[0]["request_id"], "obs-req-0001");
    assert_eq!(access[1]["cache"], "hit");
    assert_eq!(access[4]["caller"], "-");
    for never in forbidden(&answers) {
        assert!(!log.contains(&never), "{never:?} is in the log:\n{log}");
    }
    // The admin endpoints are not access-logged (a scrape every few seconds would drown them).
    let before = s.log().lines().count();
    send(Method::GET, &format!("{}/metrics", s.admin), &[], "").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.log().lines().count(), before);
}
