//! The HTTP side: the two listeners, the tower stack every caller request goes through, and the
//! admin endpoints. This module turns HTTP into calls on the issuance core and back; the core
//! itself never sees hyper.
//!
//! Caller listener (`server.listen`):
//! - `POST /v1/tokens`: a token in the broker's JSON shape.
//! - `POST /v1/api-keys`: drop-in for Truora's own endpoint, Truora's shapes for answers and errors.
//! - `DELETE /v1/tokens?flow_id=..&account_id=..`: drops this caller's matching cached tokens.
//!
//! Admin listener (`server.admin_listen`): `GET /metrics`, `/healthz`, `/readyz`. Never the token
//! API, so it can be exposed to Prometheus without exposing minting.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{
    HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::{Layer, Service, ServiceBuilder};

use crate::auth::{AuthLayer, Authed, Clients};
use crate::config::Config;
use crate::error::{BrokerError, Envelope, RequestError};
use crate::issuance::IssuerSettings;
use crate::issuance::{CacheStatus, Issuer};
use crate::metrics::Metrics;
use crate::request::{invalidation_filter, TokenRequest};
use crate::secret::MasterKey;
use crate::upstream::TruoraClient;

/// The response type of every service here.
pub type HttpResponse = Response<Full<Bytes>>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// How long a connection may take to send its request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

static JSON: HeaderValue = HeaderValue::from_static("application/json");
static NO_STORE: HeaderValue = HeaderValue::from_static("no-store");
static HIT: HeaderValue = HeaderValue::from_static("HIT");
static MISS: HeaderValue = HeaderValue::from_static("MISS");
static X_CACHE: http::HeaderName = http::HeaderName::from_static("x-cache");

/// What the caller listener needs to answer requests.
pub struct State {
    /// The issuance core.
    pub issuer: Arc<Issuer>,
    /// The configured callers.
    pub clients: Clients,
    /// Every series.
    pub metrics: Arc<Metrics>,
    /// `server.max_body_bytes`.
    pub max_body_bytes: usize,
}

/// The endpoint a request is for, decided once from its method and path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `POST /v1/tokens`
    Tokens,
    /// `POST /v1/api-keys`
    ApiKeys,
    /// `DELETE /v1/tokens`
    Invalidate,
    /// A known path with another method; holds the `Allow` value.
    MethodNotAllowed(&'static str),
    /// Anything else.
    NotFound,
}

impl Route {
    /// Classifies a request.
    pub fn of(method: &Method, path: &str) -> Self {
        match (path, method) {
            ("/v1/tokens", &Method::POST) => Route::Tokens,
            ("/v1/tokens", &Method::DELETE) => Route::Invalidate,
            ("/v1/tokens", _) => Route::MethodNotAllowed("POST, DELETE"),
            ("/v1/api-keys", &Method::POST) => Route::ApiKeys,
            ("/v1/api-keys", _) => Route::MethodNotAllowed("POST"),
            _ => Route::NotFound,
        }
    }

    /// The bounded `route` label.
    pub fn label(self) -> &'static str {
        match self {
            Route::Tokens => "tokens",
            Route::ApiKeys => "api_keys",
            Route::Invalidate => "invalidate",
            Route::MethodNotAllowed(_) | Route::NotFound => "other",
        }
    }

    /// The error shape this route speaks: Truora's for the drop-in, ours elsewhere.
    pub fn envelope(self) -> Envelope {
        match self {
            Route::ApiKeys => Envelope::Truora,
            _ => Envelope::Broker,
        }
    }
}

/// A request with its route decided.
pub struct Routed<B> {
    /// The endpoint.
    pub route: Route,
    /// The request.
    pub req: Request<B>,
}

/// The caller API as one tower stack, layers outermost first. What hyper sees cannot fail.
pub fn caller_service<B>(
    state: Arc<State>,
) -> impl Service<Request<B>, Response = HttpResponse, Error = Infallible, Future: Send> + Clone + Send
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    ServiceBuilder::new()
        // Outermost: decides the route once and counts and times every answer, errors
        // included, so `requests_total` and the latency histogram see exactly what callers see.
        .layer(ObserveLayer(Arc::clone(&state.metrics)))
        // Turns every error below into the route's JSON error shape; nothing below needs to
        // know how errors look on the wire.
        .layer(ErrorLayer)
        // Authenticates before the body is read: an unknown caller costs no body read, no
        // parse and never an upstream call.
        .layer(AuthLayer::new(
            state.clients.clone(),
            Arc::clone(&state.metrics),
        ))
        .service(Api { state })
}

/// Layer: route, count and time. See [`caller_service`].
#[derive(Clone)]
pub struct ObserveLayer(Arc<Metrics>);

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            metrics: Arc::clone(&self.0),
        }
    }
}

/// The service [`ObserveLayer`] builds.
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B> Service<Request<B>> for Observe<S>
where
    S: Service<Routed<B>, Response = HttpResponse, Error = Infallible>,
    S::Future: Unpin,
{
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = ObserveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let started = Instant::now();
        let route = Route::of(req.method(), req.uri().path());
        ObserveFuture {
            inner: self.inner.call(Routed { route, req }),
            started,
            route,
            metrics: Arc::clone(&self.metrics),
        }
    }
}

/// The future of [`Observe`]: the inner answer, counted and timed when it is ready. A named
/// future rather than a box, as are those of the layers below it: one allocation per request
/// fewer for each layer.
pub struct ObserveFuture<F> {
    inner: F,
    started: Instant,
    route: Route,
    metrics: Arc<Metrics>,
}

impl<F> Future for ObserveFuture<F>
where
    F: Future<Output = Result<HttpResponse, Infallible>> + Unpin,
{
    type Output = Result<HttpResponse, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let response = std::task::ready!(Pin::new(&mut this.inner).poll(cx))?;
        let elapsed = this.started.elapsed();
        let label = this.route.label();
        this.metrics
            .observe_request(label, response.status(), elapsed.as_secs_f64());
        tracing::debug!(
            route = label,
            status = response.status().as_u16(),
            latency_us = elapsed.as_micros() as u64,
            "request"
        );
        Poll::Ready(Ok(response))
    }
}

/// Layer: errors to responses. See [`caller_service`].
#[derive(Clone)]
pub struct ErrorLayer;

impl<S> Layer<S> for ErrorLayer {
    type Service = Errors<S>;
    fn layer(&self, inner: S) -> Errors<S> {
        Errors { inner }
    }
}

/// The service [`ErrorLayer`] builds.
#[derive(Clone)]
pub struct Errors<S> {
    inner: S,
}

impl<S, B> Service<Routed<B>> for Errors<S>
where
    S: Service<Routed<B>, Response = HttpResponse, Error = BrokerError>,
    S::Future: Unpin,
{
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = ErrorsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match self.inner.poll_ready(cx) {
            Poll::Ready(Err(_)) => Poll::Ready(Ok(())),
            other => other.map(|_| Ok(())),
        }
    }

    fn call(&mut self, routed: Routed<B>) -> Self::Future {
        ErrorsFuture {
            route: routed.route,
            inner: self.inner.call(routed),
        }
    }
}

/// The future of [`Errors`]: the inner answer, or the error's answer in the route's shape.
pub struct ErrorsFuture<F> {
    inner: F,
    route: Route,
}

impl<F> Future for ErrorsFuture<F>
where
    F: Future<Output = Result<HttpResponse, BrokerError>> + Unpin,
{
    type Output = Result<HttpResponse, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        Poll::Ready(Ok(
            match std::task::ready!(Pin::new(&mut this.inner).poll(cx)) {
                Ok(response) => response,
                Err(e) => error_response(this.route, &e),
            },
        ))
    }
}

/// The answer for an error: status from its kind, body in the route's shape.
pub fn error_response(route: Route, err: &BrokerError) -> HttpResponse {
    match err {
        BrokerError::Upstream(_) => tracing::warn!(code = err.code(), "upstream failure: {err}"),
        BrokerError::Internal(_) => tracing::error!("{err}"),
        _ => tracing::debug!(code = err.code(), "refused: {err}"),
    }
    let mut response = Response::new(Full::new(Bytes::from(err.body(route.envelope()))));
    *response.status_mut() = err.status();
    let h = response.headers_mut();
    h.insert(CONTENT_TYPE, JSON.clone());
    h.insert(CACHE_CONTROL, NO_STORE.clone());
    if let BrokerError::Auth(_) = err {
        h.insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"token-broker\""),
        );
    }
    if let Some(secs) = err.retry_after() {
        h.insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    if let BrokerError::Request(RequestError::MethodNotAllowed { allow }) = err {
        h.insert(ALLOW, HeaderValue::from_static(allow));
    }
    response
}

/// The innermost service: reads the body and calls the core.
#[derive(Clone)]
pub struct Api {
    state: Arc<State>,
}

impl<B> Service<Authed<B>> for Api
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    type Response = HttpResponse;
    type Error = BrokerError;
    type Future = BoxFuture<Result<HttpResponse, BrokerError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BrokerError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, authed: Authed<B>) -> Self::Future {
        let state = Arc::clone(&self.state);
        Box::pin(async move {
            match authed.route {
                Route::Tokens | Route::ApiKeys => issue(&state, authed).await,
                Route::Invalidate => invalidate(&state, &authed),
                Route::MethodNotAllowed(allow) => {
                    Err(RequestError::MethodNotAllowed { allow }.into())
                }
                Route::NotFound => Err(RequestError::NotFound.into()),
            }
        })
    }
}

/// The body formats a token request may come in.
enum Format {
    Form,
    Json,
}

fn format_of<B>(req: &Request<B>) -> Result<Format, RequestError> {
    let value = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .ok_or(RequestError::UnsupportedMediaType)?;
    let essence = value.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        Ok(Format::Form)
    } else if essence.eq_ignore_ascii_case("application/json") {
        Ok(Format::Json)
    } else {
        Err(RequestError::UnsupportedMediaType)
    }
}

/// Reads a body of at most `limit` bytes: refused from its Content-Length before reading when
/// that is over, and cut off while reading when there is none.
pub async fn read_body<B>(req: Request<B>, limit: usize) -> Result<Bytes, RequestError>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    if let Some(len) = req.headers().get(CONTENT_LENGTH) {
        let len: u64 =
            len.to_str()
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or(RequestError::MalformedBody {
                    reason: "bad Content-Length".into(),
                })?;
        if len > limit as u64 {
            return Err(RequestError::PayloadTooLarge { limit });
        }
    }
    // A small body comes in one frame, whose bytes are taken as they are; only a body in
    // several frames is copied into one buffer.
    let mut body = std::pin::pin!(Limited::new(req.into_body(), limit));
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            if e.is::<LengthLimitError>() {
                RequestError::PayloadTooLarge { limit }
            } else {
                RequestError::MalformedBody {
                    reason: "the body could not be read".into(),
                }
            }
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        match (&mut first, &mut joined) {
            (None, _) => first = Some(data),
            (Some(head), None) => {
                let mut all = BytesMut::with_capacity(head.len() + data.len());
                all.extend_from_slice(head);
                all.extend_from_slice(&data);
                joined = Some(all);
            }
            (Some(_), Some(all)) => all.extend_from_slice(&data),
        }
    }
    Ok(match joined {
        Some(all) => all.freeze(),
        None => first.unwrap_or_default(),
    })
}

async fn issue<B>(state: &State, authed: Authed<B>) -> Result<HttpResponse, BrokerError>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let Authed { route, caller, req } = authed;
    let format = format_of(&req)?;
    let body = read_body(req, state.max_body_bytes).await?;
    let request = match format {
        Format::Form => TokenRequest::from_form(&body)?,
        Format::Json => TokenRequest::from_json(&body)?,
    };
    let issued = state.issuer.issue(&caller.id, &request).await?;
    let body = match route {
        Route::ApiKeys => Bytes::copy_from_slice(issued.dropin_body()),
        _ => Bytes::from(issued.tokens_body(Instant::now())),
    };
    let mut response = Response::new(Full::new(body));
    let h = response.headers_mut();
    h.insert(CONTENT_TYPE, JSON.clone());
    h.insert(CACHE_CONTROL, NO_STORE.clone());
    h.insert(
        X_CACHE.clone(),
        match issued.cache {
            CacheStatus::Hit => HIT.clone(),
            CacheStatus::Miss => MISS.clone(),
        },
    );
    Ok(response)
}

fn invalidate<B>(state: &State, authed: &Authed<B>) -> Result<HttpResponse, BrokerError> {
    let filter = invalidation_filter(authed.req.uri().query().unwrap_or(""))?;
    let n = state.issuer.invalidate(
        &authed.caller.id,
        filter.flow_id.as_deref(),
        filter.account_id.as_deref(),
    );
    let mut response = Response::new(Full::new(Bytes::from(format!("{{\"invalidated\":{n}}}"))));
    let h = response.headers_mut();
    h.insert(CONTENT_TYPE, JSON.clone());
    h.insert(CACHE_CONTROL, NO_STORE.clone());
    Ok(response)
}

/// The admin endpoints: `/metrics`, `/healthz`, `/readyz`. Nothing else, above all no tokens.
pub async fn admin<B>(state: Arc<State>, req: Request<B>) -> Result<HttpResponse, Infallible> {
    let (status, content_type, body): (StatusCode, &'static str, Bytes) =
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/metrics") => {
                state
                    .metrics
                    .cache_entries
                    .set(state.issuer.cache().len() as i64);
                (
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    Bytes::from(state.metrics.render()),
                )
            }
            (&Method::GET, "/healthz") => {
                (StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n"))
            }
            (&Method::GET, "/readyz") => (
                StatusCode::OK,
                "application/json",
                Bytes::from_static(b"{\"ready\":true}"),
            ),
            (_, "/metrics" | "/healthz" | "/readyz") => (
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                Bytes::from_static(b"use GET\n"),
            ),
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                Bytes::from_static(b"admin endpoints: /metrics, /healthz, /readyz\n"),
            ),
        };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(response)
}

/// A broker with both listeners bound, ready to run.
pub struct Server {
    state: Arc<State>,
    caller: TcpListener,
    admin: TcpListener,
    shutdown_timeout: Duration,
}

impl Server {
    /// Assembles a broker from a validated config and binds its listeners.
    pub async fn from_config(config: &Config, key: MasterKey) -> io::Result<Self> {
        let metrics = Arc::new(
            Metrics::new(prometheus::Registry::new())
                .map_err(|e| io::Error::other(e.to_string()))?,
        );
        let client = TruoraClient::new(
            &config.upstream.account_url,
            key,
            config.upstream.timeout,
            Arc::clone(&metrics),
        )
        .map_err(io::Error::other)?;
        let issuer = Issuer::new(
            IssuerSettings {
                min_remaining: config.cache.min_remaining,
                max_entries: config.cache.max_entries,
                web_url: config.upstream.web_url.clone(),
                array_encoding: config.upstream.array_encoding,
            },
            Arc::new(Arc::new(client)),
            Arc::clone(&metrics),
        );
        let state = Arc::new(State {
            issuer,
            clients: Clients::new(config.clients()),
            metrics,
            max_body_bytes: config.server.max_body_bytes,
        });
        Self::bind(
            state,
            config.server.listen,
            config.server.admin_listen,
            config.server.shutdown_timeout,
        )
        .await
    }

    /// The shared state, for tests.
    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// Binds both listeners. Nothing is served until [`Server::run`].
    pub async fn bind(
        state: Arc<State>,
        listen: SocketAddr,
        admin_listen: SocketAddr,
        shutdown_timeout: Duration,
    ) -> io::Result<Self> {
        let caller = TcpListener::bind(listen).await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on {listen} (server.listen): {e}"),
            )
        })?;
        let admin = TcpListener::bind(admin_listen).await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on {admin_listen} (server.admin_listen): {e}"),
            )
        })?;
        Ok(Self {
            state,
            caller,
            admin,
            shutdown_timeout,
        })
    }

    /// The caller listener's address (useful with port 0).
    pub fn caller_addr(&self) -> io::Result<SocketAddr> {
        self.caller.local_addr()
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> io::Result<SocketAddr> {
        self.admin.local_addr()
    }

    /// Serves until `shutdown` completes, then stops accepting and lets in-flight requests
    /// finish for at most `server.shutdown_timeout`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let graceful = GracefulShutdown::new();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        builder.http2().timer(TokioTimer::new());

        let callers = caller_service(Arc::clone(&self.state));
        let admin_state = Arc::clone(&self.state);
        let admin = tower::service_fn(move |req| admin(Arc::clone(&admin_state), req));

        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = self.caller.accept() => {
                    if let Some(io) = connection(accepted) {
                        let conn = builder.serve_connection(io, TowerToHyperService::new(callers.clone()));
                        let conn = graceful.watch(conn.into_owned());
                        tokio::spawn(conn);
                    }
                }
                accepted = self.admin.accept() => {
                    if let Some(io) = connection(accepted) {
                        let conn = builder.serve_connection(io, TowerToHyperService::new(admin.clone()));
                        let conn = graceful.watch(conn.into_owned());
                        tokio::spawn(conn);
                    }
                }
                () = &mut shutdown => break,
            }
        }
        drop(self.caller);
        drop(self.admin);
        tracing::info!("shutting down: no new connections, waiting for in-flight requests");
        if tokio::time::timeout(self.shutdown_timeout, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                "in-flight requests still running after server.shutdown_timeout; exiting anyway"
            );
        }
    }
}

fn connection(
    accepted: io::Result<(tokio::net::TcpStream, SocketAddr)>,
) -> Option<TokioIo<tokio::net::TcpStream>> {
    match accepted {
        Ok((stream, _)) => {
            let _ = stream.set_nodelay(true);
            Some(TokioIo::new(stream))
        }
        Err(e) => {
            // Out of file descriptors and the like: keep serving the connections we have.
            tracing::warn!("accept failed: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ArrayEncoding, Client};
    use crate::error::UpstreamError;
    use crate::issuance::IssuerSettings;
    use crate::secret::SecretDigest;
    use crate::upstream::{Mint, MintFuture};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use tower::ServiceExt;

    const SECRET: &str = "s3cret-checkout-0123456789";
    const FORM: &str =
        "country=CO&flow_id=IPF1&redirect_url=https%3A%2F%2Fshop.example%2Fdone&account_id=u1";

    /// Counts calls; answers a two-hour JWT, or the error set in `fail`.
    #[derive(Default)]
    struct Fake {
        calls: AtomicUsize,
        fail: Mutex<Option<UpstreamError>>,
    }

    struct Handle(Arc<Fake>);
    impl Mint for Handle {
        fn mint(&self, _form: String) -> MintFuture {
            let n = self.0.calls.fetch_add(1, Ordering::SeqCst);
            let fail = self.0.fail.lock().unwrap().clone();
            Box::pin(async move {
                match fail {
                    Some(e) => Err(e),
                    None => {
                        use base64::Engine;
                        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
                        Ok(format!(
                            "h.{}.s",
                            e.encode(format!(r#"{{"iat":0,"exp":7200,"jti":"{n}"}}"#))
                        ))
                    }
                }
            })
        }
    }

    fn state() -> (Arc<State>, Arc<Fake>) {
        let fake = Arc::new(Fake::default());
        let metrics = Arc::new(Metrics::new(prometheus::Registry::new()).unwrap());
        let issuer = Issuer::new(
            IssuerSettings {
                min_remaining: Duration::from_secs(900),
                max_entries: 100,
                web_url: "https://identity.truora.com".into(),
                array_encoding: ArrayEncoding::Repeat,
            },
            Arc::new(Handle(Arc::clone(&fake))),
            Arc::clone(&metrics),
        );
        let clients = Clients::new(vec![Client {
            id: "checkout".into(),
            digest: SecretDigest::of(SECRET.as_bytes()),
        }]);
        let state = Arc::new(State {
            issuer,
            clients,
            metrics,
            max_body_bytes: 1024,
        });
        (state, fake)
    }

    fn post(path: &str, content_type: &str, body: &str) -> Request<Full<Bytes>> {
        Request::post(path)
            .header(http::header::AUTHORIZATION, format!("Bearer {SECRET}"))
            .header(CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap()
    }

    fn form(path: &str, body: &str) -> Request<Full<Bytes>> {
        post(path, "application/x-www-form-urlencoded", body)
    }

    async fn call<B>(
        state: &Arc<State>,
        req: Request<B>,
    ) -> (StatusCode, http::HeaderMap, serde_json::Value)
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let response = caller_service(Arc::clone(state))
            .oneshot(req)
            .await
            .unwrap();
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (parts.status, parts.headers, json)
    }

    #[tokio::test]
    async fn a_form_request_is_minted_then_served_from_cache() {
        let (state, fake) = state();
        let (status, headers, first) = call(&state, form("/v1/tokens", FORM)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[CACHE_CONTROL], "no-store");
        assert_eq!(headers["x-cache"], "MISS");
        assert_eq!(first["cache"], "miss");
        let (_, headers, second) = call(&state, form("/v1/tokens", FORM)).await;
        assert_eq!(headers["x-cache"], "HIT");
        assert_eq!(second["cache"], "hit");
        assert_eq!(first["api_key"], second["api_key"]);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_json_request_shares_the_form_requests_token() {
        let (state, fake) = state();
        let (_, _, a) = call(&state, form("/v1/tokens", FORM)).await;
        let json = r#"{"account_id":"u1","country":"CO","flow_id":"IPF1","redirect_url":"https://shop.example/done"}"#;
        let (status, _, b) = call(
            &state,
            post("/v1/tokens", "application/json; charset=utf-8", json),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(a["api_key"], b["api_key"]);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn no_credentials_is_401_with_www_authenticate_and_no_upstream_call() {
        let (state, fake) = state();
        let mut req = form("/v1/tokens", FORM);
        req.headers_mut().remove(http::header::AUTHORIZATION);
        let (status, headers, body) = call(&state, req).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(headers[WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .starts_with("Bearer"));
        assert_eq!(body["error"], "unauthorized");
        assert_eq!(fake.calls.load(Ordering::SeqCst), 0);
        let text = String::from_utf8(state.metrics.render()).unwrap();
        assert!(text.contains(r#"token_broker_auth_failures_total{reason="missing"} 1"#));
    }

    #[tokio::test]
    async fn a_wrong_secret_is_401() {
        let (state, fake) = state();
        let mut req = form("/v1/tokens", FORM);
        req.headers_mut().insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer not-the-secret"),
        );
        let (status, _, _) = call(&state, req).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_truora_api_key_header_is_400() {
        let (state, fake) = state();
        let mut req = form("/v1/tokens", FORM);
        req.headers_mut()
            .insert("truora-api-key", HeaderValue::from_static("anything"));
        let (status, _, body) = call(&state, req).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"], "master_key_header_forbidden");
        assert_eq!(fake.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn key_type_backend_is_400_naming_the_field_with_no_upstream_call() {
        let (state, fake) = state();
        let (status, _, body) = call(
            &state,
            form("/v1/tokens", &format!("{FORM}&key_type=backend")),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["field"], "key_type");
        assert_eq!(fake.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn another_content_type_is_415() {
        let (state, _) = state();
        let (status, _, body) = call(&state, post("/v1/tokens", "text/plain", FORM)).await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(body["error"], "unsupported_media_type");
        let mut req = form("/v1/tokens", FORM);
        req.headers_mut().remove(CONTENT_TYPE);
        assert_eq!(
            call(&state, req).await.0,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
    }

    /// A body that fails the test if anyone reads it.
    struct Untouchable;
    impl Body for Untouchable {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
            panic!("the body was read although its Content-Length is over the limit");
        }
    }

    #[tokio::test]
    async fn an_oversized_content_length_is_413_before_the_body_is_read() {
        let (state, _) = state();
        let req = Request::post("/v1/tokens")
            .header(http::header::AUTHORIZATION, format!("Bearer {SECRET}"))
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(CONTENT_LENGTH, "1000000")
            .body(Untouchable)
            .unwrap();
        let (status, _, body) = call(&state, req).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(body["error"], "payload_too_large");
    }

    /// A body of `n` chunks of 256 bytes with no length announced.
    struct Chunks(usize);
    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
            if self.0 == 0 {
                return Poll::Ready(None);
            }
            self.0 -= 1;
            Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(vec![
                b'a';
                256
            ])))))
        }
    }

    #[tokio::test]
    async fn an_oversized_body_without_length_is_413_while_reading() {
        let (state, fake) = state();
        let req = Request::post("/v1/tokens")
            .header(http::header::AUTHORIZATION, format!("Bearer {SECRET}"))
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Chunks(1000))
            .unwrap();
        let (status, _, _) = call(&state, req).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn the_drop_in_answers_in_truoras_shapes() {
        let (state, _) = state();
        let body = format!("key_type=web&grant=digital-identity&{FORM}");
        let (status, headers, ok) = call(&state, form("/v1/api-keys", &body)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-cache"], "MISS");
        assert!(ok["api_key"].is_string());
        assert_eq!(ok["message"], "API key created successfully");
        let (status, _, err) = call(&state, form("/v1/api-keys", "country=XX")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(err["code"], 10400);
        assert_eq!(err["http_code"], 400);
        assert!(err["message"].as_str().unwrap().contains("country"));
    }

    #[tokio::test]
    async fn upstream_failures_map_to_502_503_and_504() {
        let (state, fake) = state();
        let cases = [
            (
                UpstreamError::CredentialRejected { status: 401 },
                502,
                "upstream_credential_rejected",
            ),
            (
                UpstreamError::ServerError { status: 500 },
                502,
                "upstream_unavailable",
            ),
            (UpstreamError::Timeout, 504, "upstream_timeout"),
            (
                UpstreamError::Throttled {
                    retry_after: Duration::from_secs(9),
                },
                503,
                "upstream_throttled",
            ),
        ];
        for (err, status, code) in cases {
            *fake.fail.lock().unwrap() = Some(err);
            let (got, headers, json) = call(&state, form("/v1/tokens", FORM)).await;
            assert_eq!(got.as_u16(), status, "{code}");
            assert_eq!(json["error"], code);
            assert!(json["message"].is_string());
            if status == 503 {
                assert_eq!(headers[RETRY_AFTER], "9");
            }
        }
        // Failures are not cached: the next request mints.
        *fake.fail.lock().unwrap() = None;
        let (got, headers, _) = call(&state, form("/v1/tokens", FORM)).await;
        assert_eq!(got, StatusCode::OK);
        assert_eq!(headers["x-cache"], "MISS");
        assert_eq!(fake.calls.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn unknown_paths_are_404_and_wrong_methods_405_with_allow() {
        let (state, _) = state();
        let (status, _, _) = call(&state, form("/v1/nope", FORM)).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let req = Request::get("/v1/tokens")
            .header(http::header::AUTHORIZATION, format!("Bearer {SECRET}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (status, headers, _) = call(&state, req).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(headers[ALLOW], "POST, DELETE");
    }

    #[tokio::test]
    async fn delete_drops_the_callers_matching_tokens() {
        let (state, fake) = state();
        call(&state, form("/v1/tokens", FORM)).await;
        let req = Request::delete("/v1/tokens?account_id=u1")
            .header(http::header::AUTHORIZATION, format!("Bearer {SECRET}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (status, headers, body) = call(&state, req).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[CACHE_CONTROL], "no-store");
        assert_eq!(body["invalidated"], 1);
        let (_, headers, _) = call(&state, form("/v1/tokens", FORM)).await;
        assert_eq!(headers["x-cache"], "MISS");
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
        let req = Request::delete("/v1/tokens")
            .header(http::header::AUTHORIZATION, format!("Bearer {SECRET}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (status, _, body) = call(&state, req).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"], "missing_filter");
    }

    #[tokio::test]
    async fn every_answer_is_counted_by_route_and_status() {
        let (state, _) = state();
        call(&state, form("/v1/tokens", FORM)).await;
        call(&state, form("/v1/tokens", "country=XX")).await;
        let text = String::from_utf8(state.metrics.render()).unwrap();
        assert!(text.contains(r#"token_broker_requests_total{route="tokens",status="200"} 1"#));
        assert!(text.contains(r#"token_broker_requests_total{route="tokens",status="400"} 1"#));
        assert!(text.contains(r#"token_broker_request_duration_seconds_count{route="tokens"} 2"#));
    }

    #[tokio::test]
    async fn the_admin_listener_serves_metrics_and_health_but_never_tokens() {
        let (state, _) = state();
        let get = |path: &str| Request::get(path).body(Full::new(Bytes::new())).unwrap();
        let r = admin(Arc::clone(&state), get("/metrics")).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("token_broker_cache_entries"));
        for path in ["/healthz", "/readyz"] {
            let r = admin(Arc::clone(&state), get(path)).await.unwrap();
            assert_eq!(r.status(), StatusCode::OK, "{path}");
        }
        let r = admin(Arc::clone(&state), form("/v1/tokens", FORM))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    }
}
