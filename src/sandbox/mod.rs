//! A sandbox imitation of Truora's `POST /v1/api-keys`, embedded so that `token-broker demo` and
//! the tests need nothing else.
//!
//! It checks the `Truora-API-Key` header and the required form fields as Truora does, mints real
//! HS256 JWTs with Truora's claims (`iat`, `exp`, `jti`, `additional_data`, ...) and answers
//! errors in Truora's documented shapes. For the demo, a flow id `IPFsandbox<status>` (for
//! instance `IPFsandbox429`) answers that error. For tests it counts calls, records what it was
//! sent (never the key itself, only whether it matched) and can fail, stall or lie on demand.
//!
//! It also plays the whole life of a verification process (one token, one process), so that the
//! demo and the tests can see the broker drop a token when Truora says its process ended:
//!
//! | file | what it owns |
//! | --- | --- |
//! | `mod.rs` | The server, its options and test hooks, `POST /v1/api-keys`, the HS256 signer. |
//! | `identity_api.rs` | `GET /v1/processes/<id>/result` and the pass-through tests' other calls. |
//! | `processes.rs` | The process each minted token stands for: pending, created, finished. |
//! | `page.rs` | The identity page `GET /?token=...` and its Approve/Decline form. |
//! | `webhook.rs` | Delivering Truora's signed webhooks to the broker. |

mod identity_api;
mod page;
mod processes;
mod webhook;

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::secret::hex;

pub use identity_api::Forwarded;
pub use processes::{ProcessInfo, SandboxError};
pub use webhook::{ClaimNames, Delivery, WebhookTarget};

/// How the sandbox misbehaves, for tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and Truora's body for it (429 carries `Retry-After: 2`).
    Status(u16),
    /// Answer 400 with Truora's "max rate limit reached" body.
    RateLimit400,
    /// Answer 429 with `Retry-After: <secs>`.
    Throttle(u64),
    /// Answer 503 with `Retry-After: <secs>`.
    Unavailable(u64),
    /// Never answer.
    Hang,
    /// Close the connection after reading the request, without an answer.
    Reset,
    /// Answer 200 with a 10 MB body.
    Huge,
    /// Answer 200 with this body.
    Body(String),
}

/// How the sandbox mints.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    /// The master key it accepts.
    pub master_key: String,
    /// `exp - iat` of minted tokens.
    pub token_lifetime: Duration,
    /// Name the token field `code` instead of `api_key` (the reference's example).
    pub code_field: bool,
    /// Shift `iat`/`exp` by this many seconds (a skewed upstream clock).
    pub clock_skew_secs: i64,
    /// Wait this long before answering.
    pub delay: Duration,
    /// Where process webhooks go (`None`: nowhere; the processes still move on).
    pub webhook: Option<WebhookTarget>,
}

impl SandboxOptions {
    /// Tokens of two hours, answered at once, for this master key.
    pub fn new(master_key: impl Into<String>) -> Self {
        Self {
            master_key: master_key.into(),
            token_lifetime: Duration::from_secs(7200),
            code_field: false,
            clock_skew_secs: 0,
            delay: Duration::ZERO,
            webhook: None,
        }
    }
}

/// One request the sandbox received.
#[derive(Debug, Clone)]
pub struct Received {
    /// Whether `Truora-API-Key` held the right key.
    pub key_matched: bool,
    /// Whether a `Truora-API-Key` header was present at all.
    pub key_present: bool,
    /// Whether an `Authorization` header reached it (it never should).
    pub authorization_present: bool,
    /// The form fields, in order.
    pub form: Vec<(String, String)>,
}

struct Shared {
    options: Mutex<SandboxOptions>,
    /// The fault, and for how many more calls (`None`: until changed).
    fault: Mutex<Option<(Fault, Option<usize>)>>,
    signing_key: [u8; 32],
    calls: AtomicUsize,
    received: Mutex<Vec<Received>>,
    forwarded: Mutex<Vec<Forwarded>>,
    processes: Mutex<processes::Processes>,
    deliveries: Mutex<VecDeque<Delivery>>,
    /// Delivers the webhooks (plain HTTP: the receiver is on loopback).
    client: Client<HttpConnector, Full<Bytes>>,
}

/// A running sandbox; stops when dropped.
pub struct Sandbox {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sandbox {
    /// Starts on a free loopback port.
    pub async fn start(options: SandboxOptions) -> io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), options).await
    }

    /// Starts on `addr`.
    pub async fn start_on(addr: SocketAddr, options: SandboxOptions) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let mut signing_key = [0u8; 32];
        getrandom::fill(&mut signing_key).map_err(|e| io::Error::other(e.to_string()))?;
        let shared = Arc::new(Shared {
            options: Mutex::new(options),
            fault: Mutex::new(None),
            signing_key,
            calls: AtomicUsize::new(0),
            received: Mutex::new(Vec::new()),
            forwarded: Mutex::new(Vec::new()),
            processes: Mutex::new(processes::Processes::default()),
            deliveries: Mutex::new(VecDeque::new()),
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        });
        let serving = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = Arc::clone(&serving);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = Arc::clone(&shared);
                        async move { handle(&shared, req).await }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self { addr, shared, task })
    }

    /// Base URL, for `upstream.account_url` and `upstream.web_url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `POST /v1/api-keys` calls received so far.
    pub fn calls(&self) -> usize {
        self.shared.calls.load(Ordering::SeqCst)
    }

    /// Every `POST /v1/api-keys` received so far.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.shared.received).clone()
    }

    /// Every identity-API (pass-through) request received so far.
    pub fn forwarded(&self) -> Vec<Forwarded> {
        lock(&self.shared.forwarded).clone()
    }

    /// Misbehave from now on (`None`: behave).
    pub fn set_fault(&self, fault: Option<Fault>) {
        *lock(&self.shared.fault) = fault.map(|f| (f, None));
    }

    /// Misbehave for the next `calls` calls only, then behave.
    pub fn fail_next(&self, fault: Fault, calls: usize) {
        *lock(&self.shared.fault) = Some((fault, Some(calls)));
    }

    /// Change how tokens are minted (and webhooks delivered) from now on.
    pub fn set_options(&self, f: impl FnOnce(&mut SandboxOptions)) {
        f(&mut lock(&self.shared.options));
    }

    /// Deliver process webhooks to `target` from now on (`None`: to nowhere).
    pub fn set_webhook(&self, target: Option<WebhookTarget>) {
        lock(&self.shared.options).webhook = target;
    }

    /// Every webhook delivered (or tried) so far, oldest first; the last 10 000 are kept.
    pub fn deliveries(&self) -> Vec<Delivery> {
        lock(&self.shared.deliveries).iter().cloned().collect()
    }

    /// The process of a token this sandbox minted (`None`: forged, unknown or forgotten).
    pub fn process_of(&self, token: &str) -> Option<ProcessInfo> {
        self.shared.process_of(token)
    }

    /// What opening the identity page does: the first opening of a pending process creates it
    /// and delivers `identity_process_created`. `None` when it was opened before, is finished, or
    /// no webhook target is set.
    pub async fn open(&self, token: &str) -> Result<Option<Delivery>, SandboxError> {
        Ok(self.shared.open(token).await?.1)
    }

    /// What the finish form does: the pending process succeeds (`approve`) or fails (declined),
    /// and `identity_process_succeeded` or `identity_process_failed` is delivered and its answer
    /// awaited. `None` when no webhook target is set.
    pub async fn finish(
        &self,
        token: &str,
        approve: bool,
    ) -> Result<Option<Delivery>, SandboxError> {
        Ok(self.shared.finish(token, approve).await?.1)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The sandbox's answer bodies: whole, or streamed (the large pass-through answers).
pub type SandBody = http_body_util::combinators::UnsyncBoxBody<Bytes, io::Error>;

fn whole(bytes: impl Into<Bytes>) -> SandBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn json(status: StatusCode, body: String) -> Response<SandBody> {
    let mut r = Response::new(whole(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// Truora's documented error answer for a status.
fn truora_error(status: u16) -> Response<SandBody> {
    let body = match status {
        401 => r#"{"message":"Unauthorized"}"#.to_owned(),
        403 => r#"{"code":10403,"http_code":403,"message":"Insufficient permissions: sandbox"}"#
            .to_owned(),
        429 => r#"{"code":10400,"http_code":429,"message":"Too many requests. Please try again later."}"#
            .to_owned(),
        400 => r#"{"code":10400,"http_code":400,"message":"Invalid request: missing params"}"#
            .to_owned(),
        s => format!(
            r#"{{"code":{},"http_code":{s},"message":"Internal server error, try again later"}}"#,
            10_000 + u32::from(s)
        ),
    };
    let mut r = json(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        body,
    );
    if status == 429 {
        r.headers_mut().insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("2"),
        );
    }
    r
}

/// An `Err` makes hyper close the connection without an answer (a reset, as the client sees it).
async fn handle(shared: &Shared, req: Request<Incoming>) -> io::Result<Response<SandBody>> {
    Ok(match (req.method(), req.uri().path()) {
        (&Method::POST, "/v1/api-keys") => return mint(shared, req).await,
        (&Method::GET, "/") => page::identity_page(shared, req.uri().query().unwrap_or("")).await,
        (&Method::POST, page::FINISH_PATH) => page::finish(shared, req).await,
        (_, path) if path.starts_with("/v1/") => {
            return identity_api::identity_api(shared, req).await
        }
        _ => json(
            StatusCode::FORBIDDEN,
            r#"{"message":"Missing Authentication Token"}"#.to_owned(),
        ),
    })
}

fn take_fault(shared: &Shared) -> Option<Fault> {
    let mut slot = lock(&shared.fault);
    let (fault, left) = slot.clone()?;
    match left {
        None => Some(fault),
        Some(0) => {
            *slot = None;
            None
        }
        Some(n) => {
            *slot = if n > 1 {
                Some((fault.clone(), Some(n - 1)))
            } else {
                None
            };
            Some(fault)
        }
    }
}

async fn mint(shared: &Shared, req: Request<Incoming>) -> io::Result<Response<SandBody>> {
    shared.calls.fetch_add(1, Ordering::SeqCst);
    let options = lock(&shared.options).clone();
    let presented = req
        .headers()
        .get("truora-api-key")
        .map(|v| v.as_bytes().to_vec());
    let key_matched = presented.as_deref() == Some(options.master_key.as_bytes());
    let authorization_present = req.headers().contains_key(http::header::AUTHORIZATION);
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(truora_error(400)),
    };
    let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    lock(&shared.received).push(Received {
        key_matched,
        key_present: presented.is_some(),
        authorization_present,
        form: form.clone(),
    });

    if !options.delay.is_zero() {
        tokio::time::sleep(options.delay).await;
    }
    match take_fault(shared) {
        Some(Fault::Status(s)) => return Ok(truora_error(s)),
        Some(Fault::RateLimit400) => {
            return Ok(json(
                StatusCode::BAD_REQUEST,
                r#"{"code":"11400","message":"max rate limit reached"}"#.to_owned(),
            ))
        }
        Some(Fault::Throttle(secs)) => return Ok(with_retry_after(truora_error(429), secs)),
        Some(Fault::Unavailable(secs)) => return Ok(with_retry_after(truora_error(503), secs)),
        Some(Fault::Hang) => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return Ok(truora_error(500));
        }
        Some(Fault::Reset) => return Err(io::Error::other("sandbox reset")),
        Some(Fault::Huge) => return Ok(json(StatusCode::OK, "x".repeat(10 * 1024 * 1024))),
        Some(Fault::Body(body)) => return Ok(json(StatusCode::OK, body)),
        None => {}
    }
    Ok(answer(shared, &options, key_matched, &form))
}

fn with_retry_after(mut r: Response<SandBody>, secs: u64) -> Response<SandBody> {
    r.headers_mut()
        .insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
    r
}

/// Truora's behaviour: check the key and the required fields, then mint.
fn answer(
    shared: &Shared,
    options: &SandboxOptions,
    key_matched: bool,
    form: &[(String, String)],
) -> Response<SandBody> {
    if !key_matched {
        return truora_error(401);
    }
    let get = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    };
    if get("key_type") != "web" || get("grant").is_empty() {
        return truora_error(400);
    }
    let (country, flow_id, redirect_url) = (get("country"), get("flow_id"), get("redirect_url"));
    if country.is_empty() || flow_id.is_empty() || redirect_url.is_empty() {
        return truora_error(400);
    }
    if let Some(status) = flow_id
        .strip_prefix("IPFsandbox")
        .and_then(|s| s.parse::<u16>().ok())
    {
        return truora_error(status);
    }

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
        + options.clock_skew_secs;
    let mut jti = [0u8; 16];
    let _ = getrandom::fill(&mut jti);
    let account_id = match get("account_id") {
        "" => format!("ACC{}", hex(&jti[..8])),
        a => a.to_owned(),
    };
    let additional = serde_json::json!({
        "country": country, "flow_id": flow_id, "redirect_url": redirect_url,
    })
    .to_string();
    let claims = serde_json::json!({
        "account_id": account_id,
        "additional_data": additional,
        "client_id": "TCIsandbox",
        "exp": now + options.token_lifetime.as_secs() as i64,
        "grant": get("grant"),
        "iat": now,
        "iss": "https://api.account.truora.com",
        "jti": hex(&jti),
        "key_name": "token-broker-sandbox",
        "key_type": "web",
        "username": "sandbox",
    });
    let token = sign_hs256(&shared.signing_key, &claims.to_string());
    // One token, one process: the one its identity page and webhooks will speak of.
    lock(&shared.processes).record(&hex(&jti), flow_id, &account_id);
    let field = if options.code_field {
        "code"
    } else {
        "api_key"
    };
    json(
        StatusCode::OK,
        serde_json::json!({ field: token, "message": "API key created successfully" }).to_string(),
    )
}

/// A compact HS256 JWT (`{"alg":"HS256","typ":"JWT"}`) over `claims`, a JSON text: what the
/// sandbox mints and delivers, and what tests use to craft their own webhooks (a bad signature,
/// a stale `iat`).
pub fn sign_hs256(key: &[u8], claims: &str) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let signing_input = format!(
        "{}.{}",
        b64.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
        b64.encode(claims)
    );
    let signature = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mut mac) => {
            mac.update(signing_input.as_bytes());
            mac.finalize().into_bytes().to_vec()
        }
        Err(_) => Vec::new(),
    };
    format!("{signing_input}.{}", b64.encode(signature))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_are_jwts_whose_claims_give_the_lifetime() {
        let t = sign_hs256(b"k", r#"{"iat":100,"exp":7300}"#);
        assert_eq!(
            crate::truora::token_lifetime(&t),
            Some(Duration::from_secs(7200))
        );
        assert!(crate::truora::plausible_token(&t));
    }
}

/// What the sandbox's tests share: a started sandbox, an HTTP client, minting through the real
/// endpoint, and a webhook receiver that records what reaches it.
#[cfg(test)]
mod testkit {
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use base64::Engine;
    use bytes::Bytes;
    use hmac::{Hmac, Mac};
    use http::{HeaderMap, Method, Request, Response, StatusCode};
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use sha2::Sha256;

    use super::{ClaimNames, Sandbox, SandboxOptions, WebhookTarget};

    pub const MASTER_KEY: &str = "sandbox-test-key";
    pub const RECEIVER_BEARER: &str = "receiver-bearer";
    /// No test waits on the network longer than this.
    const LIMIT: Duration = Duration::from_secs(10);

    pub async fn start() -> Sandbox {
        Sandbox::start(SandboxOptions::new(MASTER_KEY))
            .await
            .unwrap()
    }

    pub struct Answer {
        pub status: StatusCode,
        pub headers: HeaderMap,
        pub body: Bytes,
    }

    impl Answer {
        pub fn text(&self) -> String {
            String::from_utf8_lossy(&self.body).into_owned()
        }
        pub fn json(&self) -> serde_json::Value {
            serde_json::from_slice(&self.body)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
        }
    }

    /// One request; a body is sent as a form.
    pub async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: &str) -> Answer {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let mut request = Request::builder().method(method).uri(url);
        if !body.is_empty() {
            request = request.header("content-type", "application/x-www-form-urlencoded");
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let exchange = async {
            let response = client.request(request).await.unwrap();
            let status = response.status();
            let headers = response.headers().clone();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            Answer {
                status,
                headers,
                body,
            }
        };
        tokio::time::timeout(LIMIT, exchange).await.unwrap()
    }

    /// Mints through `POST /v1/api-keys` as the broker does; the token.
    pub async fn mint(sandbox: &Sandbox, flow_id: &str, account_id: Option<&str>) -> String {
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("key_type", "web")
            .append_pair("grant", "digital-identity")
            .append_pair("country", "CO")
            .append_pair("flow_id", flow_id)
            .append_pair("redirect_url", "https://example.com/done");
        if let Some(account_id) = account_id {
            form.append_pair("account_id", account_id);
        }
        let answer = send(
            Method::POST,
            &format!("{}/v1/api-keys", sandbox.url()),
            &[(crate::truora::API_KEY_HEADER, MASTER_KEY)],
            &form.finish(),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        answer.json()["api_key"].as_str().unwrap().to_owned()
    }

    /// `GET /v1/processes/<id>/result` with the master key.
    pub async fn result(sandbox: &Sandbox, process_id: &str) -> Answer {
        send(
            Method::GET,
            &format!("{}/v1/processes/{process_id}/result", sandbox.url()),
            &[(crate::truora::API_KEY_HEADER, MASTER_KEY)],
            "",
        )
        .await
    }

    /// Submits the finish form as a browser (`accept` with text/html) or a script would.
    pub async fn finish_form(
        sandbox: &Sandbox,
        token: &str,
        outcome: &str,
        accept: &str,
    ) -> Answer {
        let form = form_urlencoded::Serializer::new(String::new())
            .append_pair("token", token)
            .append_pair("outcome", outcome)
            .finish();
        send(
            Method::POST,
            &format!("{}/sandbox/processes/finish", sandbox.url()),
            &[("accept", accept)],
            &form,
        )
        .await
    }

    fn decode(part: &str) -> Vec<u8> {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap()
    }

    /// A JWT's payload, unverified.
    pub fn claims_of(jwt: &str) -> serde_json::Value {
        serde_json::from_slice(&decode(jwt.split('.').nth(1).unwrap())).unwrap()
    }

    /// A compact HS256 JWT's payload, after checking its header and its signature with `key`.
    pub fn verified_claims(jwt: &str, key: &[u8]) -> serde_json::Value {
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3, "{jwt}");
        let header: serde_json::Value = serde_json::from_slice(&decode(parts[0])).unwrap();
        assert_eq!(header, serde_json::json!({ "alg": "HS256", "typ": "JWT" }));
        let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
        mac.update(format!("{}.{}", parts[0], parts[1]).as_bytes());
        mac.verify_slice(&decode(parts[2]))
            .expect("the signature verifies with the key");
        claims_of(jwt)
    }

    /// One request the receiver got.
    #[derive(Debug, Clone)]
    pub struct Hook {
        pub method: String,
        pub path_and_query: String,
        pub authorization: String,
        pub content_type: String,
        pub body: String,
    }

    /// A webhook receiver on 127.0.0.1:0 answering every request with one status.
    pub struct Receiver {
        addr: SocketAddr,
        hooks: Arc<Mutex<Vec<Hook>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Receiver {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl Receiver {
        pub async fn start(status: u16) -> Self {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let hooks = Arc::new(Mutex::new(Vec::new()));
            let recorded = Arc::clone(&hooks);
            let task = tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let recorded = Arc::clone(&recorded);
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let recorded = Arc::clone(&recorded);
                            async move {
                                let header = |name| {
                                    req.headers()
                                        .get(name)
                                        .and_then(|v: &http::HeaderValue| v.to_str().ok())
                                        .unwrap_or("")
                                        .to_owned()
                                };
                                let mut hook = Hook {
                                    method: req.method().to_string(),
                                    path_and_query: req.uri().to_string(),
                                    authorization: header(http::header::AUTHORIZATION),
                                    content_type: header(http::header::CONTENT_TYPE),
                                    body: String::new(),
                                };
                                let body = req.into_body().collect().await?.to_bytes();
                                hook.body = String::from_utf8_lossy(&body).into_owned();
                                recorded.lock().unwrap().push(hook);
                                let mut answer =
                                    Response::new(Full::new(Bytes::from_static(b"ok")));
                                *answer.status_mut() = StatusCode::from_u16(status).unwrap();
                                Ok::<_, hyper::Error>(answer)
                            }
                        });
                    tokio::spawn(
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service),
                    );
                }
            });
            Self { addr, hooks, task }
        }

        /// A target at `/webhooks/truora`, with the receiver's bearer.
        pub fn target(&self, signing_secret: Option<&[u8]>) -> WebhookTarget {
            WebhookTarget {
                url: format!("http://{}/webhooks/truora", self.addr),
                bearer: RECEIVER_BEARER.into(),
                signing_secret: signing_secret.map(<[u8]>::to_vec),
                claims: ClaimNames::default(),
                event_in_query: false,
            }
        }

        pub fn requests(&self) -> Vec<Hook> {
            self.hooks.lock().unwrap().clone()
        }
    }
}
