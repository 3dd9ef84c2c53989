//! `[telemetry]` end to end: a broker in this process exports its spans over OTLP/HTTP to a
//! collector of the test's own (a loopback hyper server that decodes the protobuf as a real
//! collector would), and the test reads the spans: their names, kinds, attributes and links,
//! the caller's `traceparent` continued, the broker's sent to Truora only when asked for, no
//! secret or user data anywhere, and a collector that is down or hung costing dropped spans,
//! not latency. The spans are flushed by stopping the broker (the graceful shutdown exports
//! the last ones), except where the test reads the dropped-spans counter of a running broker.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use token_broker::config::Config;
use tokio::net::TcpListener;

/// Every test as a whole is bounded by this.
const TEST_BOUND: Duration = Duration::from_secs(90);

/// A span as the collector received it, with its resource's attributes.
#[derive(Debug, Clone)]
struct Got {
    resource: Vec<KeyValue>,
    span: opentelemetry_proto::tonic::trace::v1::Span,
}

impl Got {
    fn name(&self) -> &str {
        &self.span.name
    }
    fn kind(&self) -> SpanKind {
        SpanKind::try_from(self.span.kind).unwrap_or(SpanKind::Unspecified)
    }
    fn attr(&self, key: &str) -> Option<String> {
        shown(&self.span.attributes, key)
    }
    fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }
    fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }
    fn parent_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }
    fn is_error(&self) -> bool {
        self.span.status.as_ref().is_some_and(|s| s.code == 2)
    }
    /// Every string the span carries: name, trace state, attributes, events, links, status,
    /// and its resource's attributes.
    fn strings(&self) -> Vec<String> {
        let s = &self.span;
        let mut out = vec![s.name.clone(), s.trace_state.clone()];
        let mut kvs: Vec<&KeyValue> = s.attributes.iter().chain(&self.resource).collect();
        for e in &s.events {
            out.push(e.name.clone());
            kvs.extend(&e.attributes);
        }
        for l in &s.links {
            out.push(l.trace_state.clone());
            kvs.extend(&l.attributes);
        }
        if let Some(status) = &s.status {
            out.push(status.message.clone());
        }
        for kv in kvs {
            out.push(kv.key.clone());
            out.push(value(kv.value.as_ref()));
        }
        out
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn value(v: Option<&AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn shown(kvs: &[KeyValue], key: &str) -> Option<String> {
    kvs.iter()
        .find(|kv| kv.key == key)
        .map(|kv| value(kv.value.as_ref()))
}

/// An HTTP/1 server on a loopback port that answers each request with `answer`; stopped when
/// dropped.
struct Loopback {
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Loopback {
    async fn serve<F, Fut>(answer: F) -> Self
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let answer = answer.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let answer = answer.clone();
                        async move { Ok::<_, Infallible>(answer(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Loopback { url, task }
    }
}

impl Drop for Loopback {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback OTLP/HTTP receiver: `POST /v1/traces` with a protobuf body, decoded and kept.
struct Collector {
    server: Loopback,
    spans: Arc<Mutex<Vec<Got>>>,
}

impl Collector {
    async fn start() -> Self {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&spans);
        let server = Loopback::serve(move |req: Request<Incoming>| {
            let kept = Arc::clone(&kept);
            async move {
                let ok = req.method() == Method::POST
                    && req.uri().path() == "/v1/traces"
                    && req.headers()["content-type"] == "application/x-protobuf";
                let body = req.into_body().collect().await.unwrap().to_bytes();
                if !ok {
                    return Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                }
                let export = ExportTraceServiceRequest::decode(body).unwrap();
                let mut kept = kept.lock().unwrap();
                for rs in export.resource_spans {
                    let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
                    for ss in rs.scope_spans {
                        for span in ss.spans {
                            kept.push(Got {
                                resource: resource.clone(),
                                span,
                            });
                        }
                    }
                }
                Response::builder()
                    .header("content-type", "application/x-protobuf")
                    .body(Full::new(Bytes::new()))
                    .unwrap()
            }
        })
        .await;
        Collector { server, spans }
    }

    fn spans(&self) -> Vec<Got> {
        self.spans.lock().unwrap().clone()
    }
}

/// Turns tracing on towards `endpoint` (service name `tb-test`).
fn traced(c: &mut Config, endpoint: &str) {
    c.telemetry.otlp_endpoint = Some(endpoint.to_owned());
    c.telemetry.service_name = "tb-test".into();
}

const RESULT: &str = "GET /truora/identity/v1/processes/*/result";

fn bearer() -> String {
    format!("Bearer {CHECKOUT_SECRET}")
}

async fn tokens_with(b: &str, form: &str, extra: &[(&str, &str)]) -> Resp {
    let auth = bearer();
    let mut headers = vec![
        ("authorization", auth.as_str()),
        ("content-type", "application/x-www-form-urlencoded"),
    ];
    headers.extend_from_slice(extra);
    send(Method::POST, &format!("{b}/v1/tokens"), &headers, form).await
}

/// The one request span (kind server) named `name` whose `token_broker.cache` is `cache`.
fn request<'a>(spans: &'a [Got], name: &str, cache: Option<&str>) -> &'a Got {
    let found: Vec<&Got> = spans
        .iter()
        .filter(|s| s.kind() == SpanKind::Server && s.name() == name)
        .filter(|s| cache.is_none() || s.attr("token_broker.cache").as_deref() == cache)
        .collect();
    assert_eq!(found.len(), 1, "{name} {cache:?} in {spans:#?}");
    found[0]
}

fn children<'a>(spans: &'a [Got], parent: &Got) -> Vec<&'a Got> {
    spans
        .iter()
        .filter(|s| s.parent_id() == parent.span_id() && s.trace_id() == parent.trace_id())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_is_a_request_span_with_the_mint_as_its_child_and_a_hit_has_none() {
    tokio::time::timeout(TEST_BOUND, async {
        let collector = Collector::start().await;
        let b = Broker::start(|c, _| {
            traced(c, &collector.server.url);
            c.clients[0].passthrough = vec![RESULT.into()];
        })
        .await;
        assert_eq!(
            b.tokens(CHECKOUT_SECRET, FORM).await.header("x-cache"),
            "MISS"
        );
        assert_eq!(
            b.tokens(CHECKOUT_SECRET, FORM).await.header("x-cache"),
            "HIT"
        );
        let auth = bearer();
        let r = send(
            Method::GET,
            &format!("{}/truora/identity/v1/processes/IDP1/result", b.url),
            &[("authorization", &auth)],
            "",
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let refused = tokens_with(&b.url, "country=XX", &[]).await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST);
        b.stop().await;

        let spans = collector.spans();
        let miss = request(&spans, "POST /v1/tokens", Some("miss"));
        assert_eq!(miss.attr("http.request.method").as_deref(), Some("POST"));
        assert_eq!(miss.attr("http.route").as_deref(), Some("/v1/tokens"));
        assert_eq!(
            miss.attr("http.response.status_code").as_deref(),
            Some("200")
        );
        assert_eq!(
            miss.attr("token_broker.caller").as_deref(),
            Some("checkout")
        );
        assert!(miss.attr("token_broker.request_id").is_some());
        assert!(miss.parent_id().is_empty(), "a new trace's root");
        assert_eq!(
            shown(&miss.resource, "service.name").as_deref(),
            Some("tb-test")
        );
        let below = children(&spans, miss);
        assert_eq!(below.len(), 1, "{below:#?}");
        let mint = below[0];
        assert_eq!(mint.name(), "truora.mint");
        assert_eq!(mint.kind(), SpanKind::Client);
        assert_eq!(
            mint.attr("token_broker.upstream.attempts").as_deref(),
            Some("1")
        );
        assert_eq!(
            mint.attr("token_broker.upstream.outcome").as_deref(),
            Some("ok")
        );
        assert!(mint.span.start_time_unix_nano >= miss.span.start_time_unix_nano);
        assert!(mint.span.end_time_unix_nano <= miss.span.end_time_unix_nano);

        let hit = request(&spans, "POST /v1/tokens", Some("hit"));
        assert!(children(&spans, hit).is_empty(), "a hit calls nobody");
        assert_ne!(hit.trace_id(), miss.trace_id());

        let relay = request(&spans, "GET /truora/*", None);
        assert_eq!(relay.attr("http.route").as_deref(), Some("/truora/*"));
        let below = children(&spans, relay);
        assert_eq!(below.len(), 1, "{below:#?}");
        assert_eq!(below[0].name(), "truora.passthrough");
        assert_eq!(below[0].kind(), SpanKind::Client);
        assert_eq!(
            below[0].attr("token_broker.passthrough.pattern").as_deref(),
            Some(RESULT)
        );
        assert_eq!(
            below[0].attr("http.response.status_code").as_deref(),
            Some("200")
        );

        // Refused before any lookup: no cache result, no child, and a 4xx is not a server error.
        let refused: Vec<&Got> = spans
            .iter()
            .filter(|s| s.attr("http.response.status_code").as_deref() == Some("400"))
            .collect();
        assert_eq!(refused.len(), 1, "{spans:#?}");
        assert_eq!(refused[0].attr("token_broker.cache"), None);
        assert_eq!(
            refused[0].attr("token_broker.caller").as_deref(),
            Some("checkout")
        );
        assert!(children(&spans, refused[0]).is_empty());
        assert!(!refused[0].is_error());
        assert_eq!(
            spans.len(),
            6,
            "4 requests, a mint, a pass-through call: {spans:#?}"
        );
    })
    .await
    .expect("test timed out");
}

/// A `traceparent` of the caller's: a trace id and a parent span id of its own, sampled or not.
fn caller_trace(sampled: bool) -> (String, String, String) {
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736".to_owned();
    let parent = "00f067aa0ba902b7".to_owned();
    let header = format!("00-{trace}-{parent}-{}", if sampled { "01" } else { "00" });
    (trace, parent, header)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_traceparent_is_continued_and_its_sampling_decision_followed() {
    tokio::time::timeout(TEST_BOUND, async {
        let collector = Collector::start().await;
        // No trace of its own is ever started: only callers' sampled traces are recorded.
        let b = Broker::start(|c, _| {
            traced(c, &collector.server.url);
            c.telemetry.sample_ratio = 0.0;
        })
        .await;
        let (trace, parent, sampled) = caller_trace(true);
        let r = tokens_with(&b.url, FORM, &[("traceparent", &sampled)]).await;
        assert_eq!(r.status, StatusCode::OK);
        let (_, _, unsampled) = caller_trace(false);
        let other = FORM.replace("user-1", "user-2");
        tokens_with(&b.url, &other, &[("traceparent", &unsampled)]).await;
        tokens_with(&b.url, &FORM.replace("user-1", "user-3"), &[]).await;
        // A malformed one is ignored: a new trace, which this ratio does not record.
        tokens_with(
            &b.url,
            &FORM.replace("user-1", "user-4"),
            &[("traceparent", "00-zz-00f067aa0ba902b7-01")],
        )
        .await;
        b.stop().await;

        let spans = collector.spans();
        assert_eq!(
            spans.len(),
            2,
            "the sampled request and its mint only: {spans:#?}"
        );
        let root = request(&spans, "POST /v1/tokens", Some("miss"));
        assert_eq!(root.trace_id(), trace);
        assert_eq!(root.parent_id(), parent, "the caller's span is the parent");
        let mint = children(&spans, root);
        assert_eq!(mint.len(), 1);
        assert_eq!(mint[0].trace_id(), trace);
    })
    .await
    .expect("test timed out");
}

/// Each request's path and trace headers.
type Seen = Vec<(String, HashMap<String, String>)>;

/// A fake Truora that records the trace headers of every request: it mints (a two-hour JWT)
/// on `POST /v1/api-keys` and answers `{}` anywhere else.
struct FakeTruora {
    server: Loopback,
    seen: Arc<Mutex<Seen>>,
}

impl FakeTruora {
    async fn start() -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&seen);
        let server = Loopback::serve(move |req: Request<Incoming>| {
            let trace: HashMap<String, String> = ["traceparent", "tracestate", "baggage"]
                .into_iter()
                .filter_map(|h| {
                    let v = req.headers().get(h)?.to_str().ok()?;
                    Some((h.to_owned(), v.to_owned()))
                })
                .collect();
            let path = req.uri().path().to_owned();
            kept.lock().unwrap().push((path.clone(), trace));
            let body = if path == "/v1/api-keys" {
                use base64::Engine;
                let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                format!(
                    r#"{{"api_key":"{}.{}.sig"}}"#,
                    e.encode(r#"{"alg":"HS256"}"#),
                    e.encode(format!(r#"{{"iat":{now},"exp":{}}}"#, now + 7200))
                )
            } else {
                "{}".to_owned()
            };
            std::future::ready(
                Response::builder()
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap(),
            )
        })
        .await;
        FakeTruora { server, seen }
    }

    fn seen(&self) -> Seen {
        self.seen.lock().unwrap().clone()
    }
}

/// A broker in front of `truora` (mints and pass-through), with `tweak` applied.
async fn in_front_of(truora: &FakeTruora, tweak: impl FnOnce(&mut Config)) -> Running {
    let mut cfg = config(&truora.server.url);
    cfg.upstream.identity_url = truora.server.url.clone();
    cfg.clients[0].passthrough = vec![RESULT.into()];
    tweak(&mut cfg);
    Running::start(&cfg).await
}

async fn stopped(running: Running) {
    let _ = running.stop.send(());
    tokio::time::timeout(Duration::from_secs(20), running.task)
        .await
        .expect("the broker did not stop in time")
        .unwrap();
}

/// A mint and a pass-through call, each sent with the caller's trace context (sampled).
async fn mint_and_relay(url: &str) {
    let (_, _, header) = caller_trace(true);
    let context = [
        ("traceparent", header.as_str()),
        ("tracestate", "vendor=caller-state"),
        ("baggage", "user=caller-baggage"),
    ];
    let r = tokens_with(url, FORM, &context).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let auth = bearer();
    let mut headers = vec![("authorization", auth.as_str())];
    headers.extend_from_slice(&context);
    let r = send(
        Method::GET,
        &format!("{url}/truora/identity/v1/processes/IDP1/result"),
        &headers,
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propagate_upstream_sends_truora_the_brokers_traceparent_and_nothing_else() {
    tokio::time::timeout(TEST_BOUND, async {
        let collector = Collector::start().await;
        let truora = FakeTruora::start().await;
        let running = in_front_of(&truora, |c| {
            traced(c, &collector.server.url);
            c.telemetry.propagate_upstream = true;
        })
        .await;
        mint_and_relay(&running.url).await;
        stopped(running).await;

        let spans = collector.spans();
        let (trace, _, _) = caller_trace(true);
        let seen = truora.seen();
        assert_eq!(seen.len(), 2, "{seen:#?}");
        for (path, name) in [
            ("/v1/api-keys", "truora.mint"),
            ("/v1/processes/IDP1/result", "truora.passthrough"),
        ] {
            let (_, headers) = seen.iter().find(|(p, _)| p == path).unwrap();
            let span = spans.iter().find(|s| s.name() == name).unwrap();
            // The call's own span is the parent Truora sees, in the caller's trace.
            assert_eq!(
                headers.get("traceparent"),
                Some(&format!("00-{trace}-{}-01", span.span_id())),
                "{path}: {headers:?}"
            );
            assert_eq!(
                headers.len(),
                1,
                "no tracestate, no baggage: {path}: {headers:?}"
            );
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_propagate_upstream_truora_sees_no_trace_context_not_even_the_callers() {
    tokio::time::timeout(TEST_BOUND, async {
        let truora = FakeTruora::start().await;
        let collector = Collector::start().await;
        for on in [false, true] {
            let running = in_front_of(&truora, |c| {
                if on {
                    traced(c, &collector.server.url);
                }
            })
            .await;
            mint_and_relay(&running.url).await;
            stopped(running).await;
        }
        let seen = truora.seen();
        // Tracing off, then on: the first mint and both relays reached Truora (the second
        // broker's mint too: each broker has its own cache).
        assert_eq!(seen.len(), 4, "{seen:#?}");
        for (path, headers) in seen {
            assert!(headers.is_empty(), "{path}: {headers:?}");
        }
        assert!(!collector.spans().is_empty());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_span_holds_a_secret_a_token_or_a_users_data() {
    tokio::time::timeout(TEST_BOUND, async {
        let collector = Collector::start().await;
        let b = Broker::start(|c, _| {
            traced(c, &collector.server.url);
            c.clients[0].passthrough = vec![RESULT.into()];
        })
        .await;
        let canaries = [
            "canary-account-7d1e",
            "canary.mail.3f9a@example.com",
            "+573001234567",
            "+573009876543",
            "canary-query-91bc",
            "canary-meta-44d0",
            "IDPcanary5e2f",
            "canary-lang-0a7b",
        ];
        let redirect = "https%3A%2F%2Fshop.example%2Fdone%3Forder%3Dcanary-query-91bc";
        let form = format!(
            "country=CO&flow_id=IPF0a1b2c&redirect_url={redirect}&account_id=canary-account-7d1e\
             &emails=canary.mail.3f9a%40example.com&phone=%2B573001234567&phones=%2B573009876543\
             &start_variables.metadata.note=canary-meta-44d0"
        );
        let mut tokens = Vec::new();
        let r = tokens_with(&b.url, &form, &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        tokens.push(r.json()["api_key"].as_str().unwrap().to_owned());
        let auth = bearer();
        let json = serde_json::json!({
            "country": "CO",
            "flow_id": "IPF0a1b2c",
            "redirect_url": "https://shop.example/done?order=canary-query-91bc",
            "account_id": "canary-account-7d1e",
            "emails": ["canary.mail.3f9a@example.com"],
            "phone": "+573001234567",
        });
        let r = send(
            Method::POST,
            &format!("{}/v1/api-keys", b.url),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            &json.to_string(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        tokens.push(r.json()["api_key"].as_str().unwrap().to_owned());
        // Refused ones: a bad value, the master key sent by a caller, a wrong secret.
        let bad = form.replace(
            "account_id=canary-account-7d1e",
            "account_id=canary-account-7d1e%0A",
        );
        assert_eq!(
            tokens_with(&b.url, &bad, &[]).await.status,
            StatusCode::BAD_REQUEST
        );
        let r = tokens_with(&b.url, &form, &[("truora-api-key", MASTER_KEY)]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        let r = send(
            Method::POST,
            &format!("{}/v1/tokens", b.url),
            &[
                ("authorization", &format!("Bearer {BILLING_SECRET}x")),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            &form,
        )
        .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        let r = send(
            Method::DELETE,
            &format!("{}/v1/tokens?account_id=canary-account-7d1e", b.url),
            &[("authorization", &auth)],
            "",
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        let r = send(
            Method::GET,
            &format!(
                "{}/truora/identity/v1/processes/IDPcanary5e2f/result?lang=canary-lang-0a7b",
                b.url
            ),
            &[("authorization", &auth)],
            "",
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        b.stop().await;

        let spans = collector.spans();
        assert!(spans.len() >= 9, "{spans:#?}");
        let everything = spans
            .iter()
            .flat_map(Got::strings)
            .collect::<Vec<_>>()
            .join("\n");
        assert_no_secret_in(&everything);
        for canary in canaries.iter().map(|c| c.to_string()).chain(tokens) {
            assert!(
                !everything.contains(&canary),
                "{canary} is in a span:\n{everything}"
            );
            // The token's signature alone, or a URL-encoded user value, would do as much harm.
            let encoded: String = form_urlencoded::byte_serialize(canary.as_bytes()).collect();
            assert!(!everything.contains(&encoded), "{encoded} is in a span");
        }
        assert!(!everything.contains("redirect"), "{everything}");
    })
    .await
    .expect("test timed out");
}

/// A redis-server of the test's own on a free loopback port, killed when dropped.
struct Redis {
    child: tokio::process::Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Redis {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = tokio::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}): .ci/run installs it (apt-get install redis-server)")
            });
        wait_for_port(
            port,
            Duration::from_secs(10),
            Duration::from_millis(50),
            || "redis-server did not come up".to_owned(),
        )
        .await;
        Redis { child, port, dir }
    }

    /// `[cache.shared]` for it.
    fn section(&self) -> token_broker::config::SharedCacheConfig {
        let key_file = self.dir.path().join("cache-key");
        std::fs::write(&key_file, format!("{}\n", "ab".repeat(32))).unwrap();
        let text = format!(
            "[cache.shared]\nurl = \"redis://127.0.0.1:{}\"\nencryption_key_file = \"{}\"\n\
             [[clients]]\nid = \"c\"\ntoken_sha256 = \"{}\"\n",
            self.port,
            key_file.display(),
            "0".repeat(64)
        );
        Config::parse(&text).unwrap().cache.shared.unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_redis_call_of_a_request_is_a_child_span_naming_its_operation_only() {
    tokio::time::timeout(TEST_BOUND, async {
        let redis = Redis::start().await;
        let collector = Collector::start().await;
        let b = Broker::start(|c, _| {
            traced(c, &collector.server.url);
            c.cache.shared = Some(redis.section());
        })
        .await;
        let r = b.tokens(CHECKOUT_SECRET, FORM).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        b.stop().await;

        let spans = collector.spans();
        let root = request(&spans, "POST /v1/tokens", Some("miss"));
        let mint = spans.iter().find(|s| s.name() == "truora.mint").unwrap();
        assert_eq!(mint.parent_id(), root.span_id());
        let calls: Vec<&Got> = spans.iter().filter(|s| s.name() == "redis").collect();
        assert!(
            calls.len() >= 2,
            "a lookup and a store at least: {spans:#?}"
        );
        let mut ops = Vec::new();
        for call in calls {
            assert_eq!(call.trace_id(), root.trace_id());
            assert!(
                call.parent_id() == root.span_id() || call.parent_id() == mint.span_id(),
                "{call:#?}"
            );
            assert_eq!(call.kind(), SpanKind::Client);
            assert_eq!(call.attr("db.system.name").as_deref(), Some("redis"));
            assert_eq!(call.attr("token_broker.outcome").as_deref(), Some("ok"));
            ops.push(call.attr("db.operation.name").unwrap());
            let attrs: Vec<&str> = call
                .span
                .attributes
                .iter()
                .map(|kv| kv.key.as_str())
                .collect();
            assert_eq!(attrs.len(), 3, "nothing but these: {attrs:?}");
        }
        assert!(ops.iter().any(|op| op == "get"), "{ops:?}");
    })
    .await
    .expect("test timed out");
}

/// `token_broker_telemetry_spans_dropped_total{reason}` in a scrape.
fn dropped(scrape: &str, reason: &str) -> f64 {
    let series = format!("token_broker_telemetry_spans_dropped_total{{reason=\"{reason}\"}} ");
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no {series} in the scrape"))
        .parse()
        .unwrap()
}

/// Twenty requests (one miss, then hits), each well within `limit`.
async fn quick_requests(url: &str, limit: Duration) {
    for i in 0..20 {
        let started = Instant::now();
        let r = tokens_with(url, FORM, &[]).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(
            started.elapsed() < limit,
            "request {i} took {:?} with the collector away",
            started.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_dropped_spans_not_latency() {
    tokio::time::timeout(TEST_BOUND, async {
        // Nothing listens there.
        let port = free_port();
        let b = Broker::start(|c, _| traced(c, &format!("http://127.0.0.1:{port}"))).await;
        assert_eq!(dropped(&b.metrics().await, "export_failed"), 0.0);
        quick_requests(&b.url, Duration::from_secs(2)).await;
        // A batch goes out within the processor's delay (5 s); it fails at once and is counted.
        wait_for(
            Duration::from_secs(60),
            Duration::from_millis(250),
            || async { dropped(&b.metrics().await, "export_failed") >= 20.0 },
            || "the failed export's spans were not counted".to_owned(),
        )
        .await;
        let stopping = Instant::now();
        b.stop().await;
        assert!(stopping.elapsed() < Duration::from_secs(10));
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_neither_slows_requests_nor_holds_up_the_stop() {
    tokio::time::timeout(TEST_BOUND, async {
        // Takes connections and never reads or answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let hung = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let sandbox = token_broker::sandbox::Sandbox::start(
            token_broker::sandbox::SandboxOptions::new(MASTER_KEY),
        )
        .await
        .unwrap();
        let mut cfg = config(&sandbox.url());
        traced(&mut cfg, &url);
        let running = Running::start(&cfg).await;
        quick_requests(&running.url, Duration::from_secs(2)).await;
        // The drain is immediate; the last export may hang, the stop may not.
        let stopping = Instant::now();
        let _ = running.stop.send(());
        let stopped = tokio::time::timeout(Duration::from_secs(30), running.task).await;
        assert!(stopped.is_ok(), "the broker did not stop");
        assert!(
            stopping.elapsed() < token_broker::telemetry::FLUSH_LIMIT + Duration::from_secs(3),
            "stopping took {:?}",
            stopping.elapsed()
        );
        hung.abort();
    })
    .await
    .expect("test timed out");
}

/// What the process's log subscriber wrote, for the test that needs it (set up once: it is
/// the global one).
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = Arc::clone(&buf);
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || Sink(Arc::clone(&writer)))
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        buf
    })
    .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_events_inside_a_traced_request_still_reach_the_logs() {
    tokio::time::timeout(TEST_BOUND, async {
        let logs = logs();
        let collector = Collector::start().await;
        let b = Broker::start(|c, _| {
            traced(c, &collector.server.url);
            c.upstream.max_retries = 0;
        })
        .await;
        // The sandbox answers 418 for this flow: the broker logs the upstream failure (a warning
        // raised in the traced request, inside the spans' own dispatcher).
        let form = FORM.replace("IPF0a1b2c", "IPFsandbox418");
        let r = b.tokens(CHECKOUT_SECRET, &form).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
        b.stop().await;
        let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
        assert!(text.contains("upstream failure"), "{text}");
        // And it did not become a span event.
        for span in collector.spans() {
            assert!(span.span.events.is_empty(), "{span:#?}");
        }
    })
    .await
    .expect("test timed out");
}
