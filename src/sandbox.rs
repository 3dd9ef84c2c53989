//! A sandbox imitation of Truora's `POST /v1/api-keys`, embedded so that `token-broker demo` and
//! the tests need nothing else.
//!
//! It checks the `Truora-API-Key` header and the required form fields as Truora does, mints real
//! HS256 JWTs with Truora's claims (`iat`, `exp`, `jti`, `additional_data`, ...) and answers
//! errors in Truora's documented shapes. For the demo, a flow id `IPFsandbox<status>` (for
//! instance `IPFsandbox429`) answers that error. For tests it counts calls, records what it was
//! sent (never the key itself, only whether it matched) and can fail, stall or lie on demand.
//! `GET /?token=...` serves a small page standing in for Truora's identity page.

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
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::secret::hex;

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

    /// Change how tokens are minted from now on.
    pub fn set_options(&self, f: impl FnOnce(&mut SandboxOptions)) {
        f(&mut lock(&self.shared.options));
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
        (&Method::GET, "/") => identity_page(req.uri().query().unwrap_or("")),
        (_, path) if path.starts_with("/v1/") => return identity_api(shared, req).await,
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

/// What a pass-through request looked like when it reached the sandbox.
#[derive(Debug, Clone)]
pub struct Forwarded {
    /// Method.
    pub method: String,
    /// Path and query.
    pub path_and_query: String,
    /// Whether `Truora-API-Key` held the right key.
    pub key_matched: bool,
    /// The Host header.
    pub host: String,
    /// The X-Forwarded-For header.
    pub forwarded_for: String,
    /// Every header name received, lower-case.
    pub header_names: Vec<String>,
    /// Body bytes received.
    pub body_bytes: u64,
}

/// A body of `left` bytes of `x`, produced 64 KiB at a time as it is read.
struct Stream {
    left: u64,
}

impl http_body::Body for Stream {
    type Data = Bytes;
    type Error = io::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, io::Error>>> {
        const CHUNK: &[u8] = &[b'x'; 64 * 1024];
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.left.min(CHUNK.len() as u64);
        self.left -= n;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
            &CHUNK[..n as usize],
        )))))
    }
}

/// Truora's identity API, as far as the pass-through tests need it:
/// `GET /v1/processes/<id>/result` (`pending...` ids are pending, `missing` is 404),
/// `GET /v1/stream?bytes=N` (N bytes, streamed), and any other call echoing what it received.
async fn identity_api(shared: &Shared, req: Request<Incoming>) -> io::Result<Response<SandBody>> {
    let options = lock(&shared.options).clone();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let key_matched = req.headers().get("truora-api-key").map(|v| v.as_bytes())
        == Some(options.master_key.as_bytes());
    let mut forwarded = Forwarded {
        method: req.method().to_string(),
        path_and_query: req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default(),
        key_matched,
        host: header("host"),
        forwarded_for: header("x-forwarded-for"),
        header_names: req
            .headers()
            .keys()
            .map(|k| k.as_str().to_owned())
            .collect(),
        body_bytes: 0,
    };
    let query = req.uri().query().unwrap_or("").to_owned();
    let path = req.uri().path().to_owned();
    let mut body = req.into_body();
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame.map_err(io::Error::other)?.data_ref() {
            forwarded.body_bytes += data.len() as u64;
        }
    }
    lock(&shared.forwarded).push(forwarded.clone());
    if !key_matched {
        return Ok(truora_error(401));
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let mut response = match segments.as_slice() {
        ["v1", "processes", "missing", "result"] => json(
            StatusCode::NOT_FOUND,
            r#"{"code":10404,"http_code":404,"message":"process not found"}"#.to_owned(),
        ),
        ["v1", "processes", id, "result"] => {
            let status = if id.starts_with("pending") { "pending" } else { "success" };
            json(
                StatusCode::OK,
                serde_json::json!({ "process_id": id, "status": status, "validations": [] })
                    .to_string(),
            )
        }
        ["v1", "stream"] => {
            let bytes = form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == "bytes")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            let mut r = Response::new(Stream { left: bytes }.boxed_unsync());
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/octet-stream"),
            );
            r
        }
        _ => json(
            StatusCode::OK,
            serde_json::json!({ "method": forwarded.method, "path": forwarded.path_and_query, "received_bytes": forwarded.body_bytes }).to_string(),
        ),
    };
    // Hop-by-hop headers a proxy must not pass on.
    response.headers_mut().insert(
        http::header::HeaderName::from_static("keep-alive"),
        http::HeaderValue::from_static("timeout=5"),
    );
    response.headers_mut().insert(
        http::header::HeaderName::from_static("proxy-authenticate"),
        http::HeaderValue::from_static("Basic"),
    );
    Ok(response)
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
    let token = sign(&shared.signing_key, &claims.to_string());
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

/// An HS256 JWT over `claims`.
fn sign(key: &[u8], claims: &str) -> String {
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

fn identity_page(query: &str) -> Response<SandBody> {
    let has_token =
        form_urlencoded::parse(query.as_bytes()).any(|(k, v)| k == "token" && !v.is_empty());
    let body = if has_token {
        "<!doctype html><title>Sandbox identity page</title><h1>Sandbox identity page</h1>\
         <p>This stands in for Truora's identity validation: a real token would start the \
         document, selfie or OTP steps here.</p>"
    } else {
        "<!doctype html><title>Sandbox identity page</title><p>No token given.</p>"
    };
    let mut r = Response::new(whole(Bytes::from_static(body.as_bytes())));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_are_jwts_whose_claims_give_the_lifetime() {
        let t = sign(b"k", r#"{"iat":100,"exp":7300}"#);
        assert_eq!(
            crate::truora::token_lifetime(&t),
            Some(Duration::from_secs(7200))
        );
        assert!(crate::truora::plausible_token(&t));
    }
}
