//! The HTTP side: the two listeners, the tower stack every caller request goes through, and the
//! admin endpoints. This module turns HTTP into calls on the issuance core and back; the core
//! itself never sees hyper.
//!
//! Caller listener (`server.listen`):
//! - `POST /v1/tokens`: a token in the broker's JSON shape.
//! - `POST /v1/api-keys`: drop-in for Truora's own endpoint, Truora's shapes for answers and errors.
//! - `DELETE /v1/tokens?flow_id=..&account_id=..`: drops this caller's matching cached tokens.
//! - `/truora/identity/...`, `/truora/account/...`: pass-through to Truora, per allowlist.
//!
//! Admin listener (`server.admin_listen`): the status page `GET /`, `GET /metrics`, `/healthz`,
//! `/readyz` and `POST /admin/reload`. Never the token API, so it can be exposed to Prometheus
//! without exposing minting.

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
    HeaderValue, ALLOW, CACHE_CONTROL, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER,
    TRANSFER_ENCODING, WWW_AUTHENTICATE,
};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::{Layer, Service, ServiceBuilder};

use crate::access;
use crate::auth::{AuthLayer, Authed, Clients, Peer, SharedClients};
use crate::config::Config;
use crate::error::{BrokerError, Envelope, RequestError};
use crate::issuance::IssuerSettings;
use crate::issuance::{CacheStatus, Issuer};
use crate::metrics::Metrics;
use crate::passthrough::{check_path, Api as PassApi, Forwarder, ResultCache};
use crate::reload::Reloader;
use crate::request::{invalidation_filter, TokenRequest};
use crate::resilience::{Policy, ResilienceSettings};
use crate::secret::MasterKey;
use crate::shared_cache::{SharedSecrets, SharedTier};
use crate::status::StatusView;
use crate::upstream::TruoraClient;

/// Error of a streamed body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A response body: whole bytes for everything the broker writes itself, a stream for what
/// pass-through relays from Truora (never buffered whole).
pub type ResponseBody = Either<Full<Bytes>, UnsyncBoxBody<Bytes, BoxError>>;
/// The response type of every service here.
pub type HttpResponse = Response<ResponseBody>;

/// A body of whole bytes.
pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Either::Left(Full::new(bytes.into()))
}
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

static JSON: HeaderValue = HeaderValue::from_static("application/json");
static NO_STORE: HeaderValue = HeaderValue::from_static("no-store");
static HIT: HeaderValue = HeaderValue::from_static("HIT");
static MISS: HeaderValue = HeaderValue::from_static("MISS");
static X_CACHE: http::HeaderName = http::HeaderName::from_static("x-cache");

/// What the caller listener needs to answer requests.
pub struct State {
    /// The issuance core.
    pub issuer: Arc<Issuer>,
    /// The configured callers, swapped whole by a reload.
    pub clients: SharedClients,
    /// Every series.
    pub metrics: Arc<Metrics>,
    /// `server.max_body_bytes`.
    pub max_body_bytes: usize,
    /// `server.body_read_timeout`.
    pub body_read_timeout: Duration,
    /// Re-reads the config file on SIGHUP and `POST /admin/reload`; absent for the demo.
    pub reloader: std::sync::OnceLock<Arc<Reloader>>,
    /// Relays `/truora/...` to Truora; absent: those paths are 404.
    pub forwarder: Option<Forwarder>,
    /// Final process results, when `cache.result_ttl` is set.
    pub results: Option<ResultCache>,
}

impl State {
    /// State for `issuer` and `clients` with the default limits.
    pub fn new(issuer: Arc<Issuer>, clients: Clients, metrics: Arc<Metrics>) -> Self {
        let defaults = crate::config::ServerConfig::default();
        Self {
            issuer,
            clients: Arc::new(arc_swap::ArcSwap::from_pointee(clients)),
            metrics,
            max_body_bytes: defaults.max_body_bytes,
            body_read_timeout: defaults.body_read_timeout,
            reloader: std::sync::OnceLock::new(),
            forwarder: None,
            results: None,
        }
    }
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
    /// `/truora/identity/...` and `/truora/account/...`: relayed to Truora.
    Passthrough,
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
            (p, _) if p.starts_with("/truora/identity/") || p.starts_with("/truora/account/") => {
                Route::Passthrough
            }
            _ => Route::NotFound,
        }
    }

    /// The bounded `route` label.
    pub fn label(self) -> &'static str {
        match self {
            Route::Tokens => "tokens",
            Route::ApiKeys => "api_keys",
            Route::Invalidate => "invalidate",
            Route::Passthrough => "passthrough",
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

/// The caller API for one connection from `peer`, as one tower stack, layers outermost first.
/// What hyper sees cannot fail.
pub fn caller_service<B>(
    state: Arc<State>,
    peer: Arc<Peer>,
) -> impl Service<Request<B>, Response = HttpResponse, Error = Infallible, Future: Send> + Clone + Send
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    ServiceBuilder::new()
        // Outermost: decides the route once and counts and times every answer, errors
        // included, so `requests_total` and the latency histogram see exactly what callers see.
        .layer(ObserveLayer(Arc::clone(&state.metrics)))
        // A panic below answers 500 to that request alone; the connection and the process
        // carry on.
        .layer(CatchPanicLayer)
        // Turns every error below into the route's JSON error shape; nothing below needs to
        // know how errors look on the wire.
        .layer(ErrorLayer)
        // Authenticates before the body is read: an unknown caller costs no body read, no
        // parse and never an upstream call.
        .layer(AuthLayer::new(
            Arc::clone(&state.clients),
            peer,
            Arc::clone(&state.metrics),
        ))
        .service(Api { state })
}

/// Layer: a panic in a handler becomes a 500 for that request. See [`caller_service`].
#[derive(Clone)]
pub struct CatchPanicLayer;

impl<S> Layer<S> for CatchPanicLayer {
    type Service = CatchPanic<S>;
    fn layer(&self, inner: S) -> CatchPanic<S> {
        CatchPanic { inner }
    }
}

/// The service [`CatchPanicLayer`] builds.
#[derive(Clone)]
pub struct CatchPanic<S> {
    inner: S,
}

impl<S, B> Service<Routed<B>> for CatchPanic<S>
where
    S: Service<Routed<B>, Response = HttpResponse, Error = Infallible>,
{
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = CatchPanicFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, routed: Routed<B>) -> Self::Future {
        let route = routed.route;
        // A panic while building the inner future: no future, the 500 is answered when polled.
        let inner =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.inner.call(routed))).ok();
        CatchPanicFuture { inner, route }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`CatchPanic`]: the inner answer, or a 500 in the route's shape if the
    /// inner service panicked. Named rather than boxed, so it costs no allocation.
    ///
    /// - Built: holds the inner future, or none when building it panicked.
    /// - Each poll: polls the inner future, catching a panic; pending while it is.
    /// - Ready: the inner answer; a 500 (`internal_error`) when building it or this poll
    ///   panicked. The inner future, panicked or not, is dropped with this one.
    pub struct CatchPanicFuture<F> {
        #[pin]
        inner: Option<F>,
        route: Route,
    }
}

impl<F> Future for CatchPanicFuture<F>
where
    F: Future<Output = Result<HttpResponse, Infallible>>,
{
    type Output = Result<HttpResponse, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(inner) = this.inner.as_pin_mut() {
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
                Ok(Poll::Pending) => return Poll::Pending,
                Ok(Poll::Ready(answer)) => return Poll::Ready(answer),
                Err(_) => {}
            }
        }
        Poll::Ready(Ok(error_response(
            *this.route,
            &BrokerError::Internal("a request handler panicked"),
        )))
    }
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
        let request_id = access::request_id(req.headers());
        let in_flight = InFlight::enter(Arc::clone(&self.metrics));
        // The layers below note the caller and what the cache did (see `access`), whether
        // they learn it while building the future or while it runs.
        let (inner, noted) = access::sync_scope(|| self.inner.call(Routed { route, req }));
        ObserveFuture {
            inner: access::scope(noted, inner),
            route,
            started,
            request_id,
            in_flight,
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Observe`]. Named rather than boxed, so it costs no allocation.
    ///
    /// - Built: the request is counted in flight, its id decided, and what the layers below
    ///   noted while building the inner future is kept as the request's note.
    /// - Each poll: polls the inner future with that note as the current one, so the layers
    ///   below can add to it while they run.
    /// - Ready: counts and times the answer by route and status, counts it for the caller
    ///   noted (by what the cache did), writes the access line and sets `X-Request-Id`.
    /// - Dropped (answered or abandoned): leaves in flight.
    pub struct ObserveFuture<F> {
        #[pin]
        inner: access::Scoped<F>,
        route: Route,
        started: Instant,
        request_id: HeaderValue,
        in_flight: InFlight,
    }
}

impl<F> Future for ObserveFuture<F>
where
    F: Future<Output = Result<HttpResponse, Infallible>>,
{
    type Output = Result<HttpResponse, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let Ok(mut response) = std::task::ready!(this.inner.as_mut().poll(cx));
        let note = access::take_note(this.inner);
        let metrics = &*this.in_flight.0;
        let elapsed = this.started.elapsed();
        let label = this.route.label();
        let status = response.status();
        metrics.request_done(label, status, elapsed);
        let caller = note.caller.and_then(|slot| metrics.caller(slot));
        if let Some(c) = caller {
            c.requests[note.cache.caller_cache() as usize].inc();
        }
        // Ready once: the id moves to the response, leaving a placeholder that costs nothing.
        let request_id = std::mem::replace(this.request_id, HeaderValue::from_static("-"));
        access::AccessLine {
            request_id: request_id.to_str().unwrap_or("-"),
            caller: caller.map_or("-", |c| &*c.id),
            route: label,
            status: status.as_u16(),
            cache: note.cache,
            latency: elapsed,
        }
        .log();
        response
            .headers_mut()
            .insert(access::X_REQUEST_ID.clone(), request_id);
        Poll::Ready(Ok(response))
    }
}

/// Counts a request in `token_broker_requests_in_flight` until dropped (answered or abandoned).
struct InFlight(Arc<Metrics>);

impl InFlight {
    fn enter(metrics: Arc<Metrics>) -> Self {
        metrics.requests_in_flight.inc();
        Self(metrics)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.requests_in_flight.dec();
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
    let mut response = Response::new(full(err.body(route.envelope())));
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
    // After a request whose framing is doubtful, nothing more on this connection can be
    // trusted to start where it seems to: close it.
    if let BrokerError::Request(
        RequestError::AmbiguousFraming | RequestError::LengthRequired | RequestError::BodyTimeout,
    ) = err
    {
        h.insert(CONNECTION, HeaderValue::from_static("close"));
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
            check_framing(authed.req.headers())?;
            match authed.route {
                Route::Tokens | Route::ApiKeys => issue(&state, authed).await,
                Route::Invalidate => {
                    let query = authed.req.uri().query().unwrap_or("").to_owned();
                    invalidate(&state, &authed.caller.id, &query).await
                }
                Route::Passthrough => passthrough(&state, authed).await,
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

/// Refuses the request-smuggling shapes. hyper refuses differing Content-Lengths itself and,
/// given Content-Length and Transfer-Encoding together, drops the length before we see the
/// request: so any Transfer-Encoding is refused here (411), as is any repeated length that
/// reaches us.
fn check_framing(headers: &http::HeaderMap) -> Result<(), RequestError> {
    if headers.contains_key(TRANSFER_ENCODING) {
        return Err(RequestError::LengthRequired);
    }
    if headers.get_all(CONTENT_LENGTH).iter().count() > 1 {
        return Err(RequestError::AmbiguousFraming);
    }
    Ok(())
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
    let Authed {
        route, caller, req, ..
    } = authed;
    if route == Route::ApiKeys {
        caller.policy.check_drop_in()?;
    }
    let format = format_of(&req)?;
    let body = tokio::time::timeout(
        state.body_read_timeout,
        read_body(req, state.max_body_bytes),
    )
    .await
    .map_err(|_| RequestError::BodyTimeout)??;
    let request = match format {
        Format::Form => TokenRequest::from_form(&body)?,
        Format::Json => TokenRequest::from_json(&body)?,
    };
    caller.policy.check(&request)?;
    let issued = state.issuer.issue(&caller.id, &request).await?;
    let body = match route {
        Route::ApiKeys => Bytes::from(issued.dropin_body()),
        _ => Bytes::from(issued.tokens_body(Instant::now())),
    };
    let mut response = Response::new(full(body));
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

/// Relays an allowed `/truora/...` request to Truora; see [`crate::passthrough`].
async fn passthrough<B>(state: &State, authed: Authed<B>) -> Result<HttpResponse, BrokerError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let Authed {
        caller,
        req,
        peer_ip,
        ..
    } = authed;
    let forwarder = state.forwarder.as_ref().ok_or(RequestError::NotFound)?;
    let path = req.uri().path().to_owned();
    check_path(&path)?;
    let (api, upstream_path) = PassApi::of(&path).ok_or(RequestError::NotFound)?;
    let metrics = &state.metrics;
    let Some(pattern) = caller
        .passthrough
        .iter()
        .find(|p| p.matches(req.method(), &path))
    else {
        metrics
            .passthrough_requests
            .with_label_values(&["denied", "403"])
            .inc();
        return Err(RequestError::Forbidden {
            rule: "passthrough",
            field: None,
            message: "this caller's passthrough allowlist does not allow this method and path",
        }
        .into());
    };
    let pattern = Arc::clone(pattern.text());
    let path_and_query = req
        .uri()
        .path_and_query()
        .map_or(path.clone(), |pq| pq.as_str().to_owned());
    let cacheable = ResultCache::cacheable(req.method(), api, upstream_path);
    let method = req.method().clone();
    let count = |status: StatusCode| {
        metrics
            .passthrough_requests
            .with_label_values(&[&pattern, status.as_str()])
            .inc();
        tracing::info!(
            target: "audit",
            caller = &*caller.id,
            method = %method,
            pattern = &*pattern,
            status = status.as_u16(),
            "pass-through"
        );
    };
    if let (true, Some(results)) = (cacheable, &state.results) {
        if let Some(mut hit) = results.get(&caller.id, &path_and_query) {
            count(hit.status());
            hit.headers_mut().insert(X_CACHE.clone(), HIT.clone());
            return Ok(hit);
        }
    }
    let started = Instant::now();
    let relayed = forwarder.forward(api, upstream_path, req, peer_ip).await;
    metrics
        .passthrough_duration
        .with_label_values(&[&pattern])
        .observe(started.elapsed().as_secs_f64());
    let relayed = match relayed {
        Ok(r) => r,
        Err(e) => {
            count(e.status());
            return Err(e);
        }
    };
    count(relayed.status());
    match (cacheable, &state.results) {
        (true, Some(results)) => {
            let mut response = results.fill(&caller.id, &path_and_query, relayed).await?;
            response.headers_mut().insert(X_CACHE.clone(), MISS.clone());
            Ok(response)
        }
        _ => Ok(relayed.map(Either::Right)),
    }
}

async fn invalidate(state: &State, caller: &str, query: &str) -> Result<HttpResponse, BrokerError> {
    let filter = invalidation_filter(query)?;
    let n = state
        .issuer
        .invalidate_everywhere(
            caller,
            filter.flow_id.as_deref(),
            filter.account_id.as_deref(),
        )
        .await?;
    let mut response = Response::new(full(format!("{{\"invalidated\":{n}}}")));
    let h = response.headers_mut();
    h.insert(CONTENT_TYPE, JSON.clone());
    h.insert(CACHE_CONTROL, NO_STORE.clone());
    Ok(response)
}

/// The admin endpoints: the status page `/`, `/metrics`, `/healthz`, `/readyz`,
/// `POST /admin/reload`. Nothing else,
/// above all no tokens.
pub async fn admin<B>(state: Arc<State>, req: Request<B>) -> Result<HttpResponse, Infallible> {
    let (status, content_type, body): (StatusCode, &'static str, Bytes) =
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/") => (
                StatusCode::OK,
                "text/html; charset=utf-8",
                Bytes::from(StatusView::gather(&state).html()),
            ),
            (&Method::GET, "/metrics") => {
                let m = &state.metrics;
                m.cache_entries.set(state.issuer.cache().len() as i64);
                let upstream = state.issuer.policy().snapshot();
                m.breaker_state.set(upstream.breaker.gauge());
                m.throttle_remaining
                    .set(upstream.throttled_for.as_secs_f64());
                (
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    Bytes::from(state.metrics.render()),
                )
            }
            (&Method::GET, "/healthz") => {
                (StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n"))
            }
            // Ready while the broker can serve hits, whatever Truora's state: an upstream outage
            // must not take every replica out of the load balancer. The body tells why misses
            // may fail.
            (&Method::GET, "/readyz") => {
                let upstream = state.issuer.policy().snapshot();
                let body = serde_json::json!({
                    "ready": true,
                    "cache_entries": state.issuer.cache().len(),
                    "upstream": {
                        "breaker": upstream.breaker.name(),
                        "throttled_for_seconds": upstream.throttled_for.as_secs_f64().ceil(),
                        "credential_rejected": upstream.credential_rejected,
                        "in_flight": upstream.in_flight,
                    }
                });
                (
                    StatusCode::OK,
                    "application/json",
                    Bytes::from(body.to_string()),
                )
            }
            (&Method::POST, "/admin/reload") => match state.reloader.get() {
                None => (
                    StatusCode::CONFLICT,
                    "application/json",
                    Bytes::from_static(
                        b"{\"reloaded\":false,\"error\":\"reload_unavailable\",\"message\":\"this broker was not started from a config file\"}",
                    ),
                ),
                Some(reloader) => {
                    let (status, body) = reloader.reload_answer();
                    (status, "application/json", Bytes::from(body))
                }
            },
            (_, "/" | "/metrics" | "/healthz" | "/readyz") => (
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                Bytes::from_static(b"use GET\n"),
            ),
            (_, "/admin/reload") => (
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                Bytes::from_static(b"use POST\n"),
            ),
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                Bytes::from_static(
                    b"admin endpoints: / (status page), /metrics, /healthz, /readyz, POST /admin/reload\n",
                ),
            ),
        };
    let allow = match req.uri().path() {
        "/admin/reload" => "POST",
        _ => "GET",
    };
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        h.insert(ALLOW, HeaderValue::from_static(allow));
    }
    if content_type.starts_with("text/html") {
        // The status page loads nothing from anywhere: inline CSS only, no script.
        h.insert(CACHE_CONTROL, NO_STORE.clone());
        h.insert(
            http::header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
        );
    }
    Ok(response)
}

/// The connection-level settings of `[server]`.
#[derive(Debug, Clone)]
struct ConnectionSettings {
    shutdown_timeout: Duration,
    header_read_timeout: Duration,
    max_headers: usize,
    max_header_bytes: usize,
    max_connections: usize,
    http2_max_streams: u32,
}

impl ConnectionSettings {
    fn of(config: &crate::config::ServerConfig) -> Self {
        Self {
            shutdown_timeout: config.shutdown_timeout,
            header_read_timeout: config.header_read_timeout,
            max_headers: config.max_headers,
            max_header_bytes: config.max_header_bytes,
            max_connections: config.max_connections,
            http2_max_streams: config.http2_max_streams,
        }
    }
}

/// The rustls configuration of the caller listener, swapped by a reload.
pub type SharedTls = Arc<arc_swap::ArcSwap<rustls::ServerConfig>>;

/// A broker with both listeners bound, ready to run.
pub struct Server {
    state: Arc<State>,
    caller: TcpListener,
    admin: TcpListener,
    tls: Option<SharedTls>,
    client: Option<Arc<TruoraClient>>,
    settings: ConnectionSettings,
}

impl Server {
    /// Assembles a broker from a validated config and binds its listeners.
    pub async fn from_config(config: &Config, key: MasterKey) -> io::Result<Self> {
        let registry = prometheus::Registry::new();
        let metrics =
            Arc::new(Metrics::new(registry.clone()).map_err(|e| io::Error::other(e.to_string()))?);
        let tls = match &config.server.tls {
            Some(tls) => Some(Arc::new(arc_swap::ArcSwap::new(
                crate::tls::server_config(tls).map_err(|e| io::Error::other(e.to_string()))?,
            ))),
            None => None,
        };
        let client = Arc::new(
            TruoraClient::new(
                &config.upstream.account_url,
                key,
                config.upstream.connect_timeout,
                config.upstream.timeout,
            )
            .map_err(io::Error::other)?,
        );
        let policy = Policy::new(
            ResilienceSettings::from_config(config),
            Arc::clone(&metrics),
        );
        let shared = match &config.cache.shared {
            Some(shared) => Some(
                SharedTier::new(
                    shared,
                    SharedSecrets::load(shared).map_err(|e| io::Error::other(e.to_string()))?,
                    &registry,
                )
                .map_err(io::Error::other)?,
            ),
            None => None,
        };
        let issuer = Issuer::with_shared(
            IssuerSettings {
                min_remaining: config.cache.min_remaining,
                max_entries: config.cache.max_entries,
                web_url: config.upstream.web_url.clone(),
                array_encoding: config.upstream.array_encoding,
            },
            Arc::new(Arc::clone(&client)),
            policy,
            Arc::clone(&metrics),
            shared,
        );
        let clients = config.clients();
        metrics.register_callers(clients.iter().map(|c| &c.id));
        // Every pass-through pattern's series exist from the start, at zero.
        for pattern in clients.iter().flat_map(|c| c.passthrough.iter()) {
            metrics
                .passthrough_duration
                .with_label_values(&[pattern.text()]);
        }
        let mut state = State::new(issuer, Clients::new(clients), metrics);
        state.max_body_bytes = config.server.max_body_bytes;
        state.body_read_timeout = config.server.body_read_timeout;
        let u = &config.upstream;
        state.forwarder = Some(
            Forwarder::new(
                &u.identity_url,
                &u.account_url,
                client.key_handle(),
                u.connect_timeout,
                u.passthrough_timeout,
                u.passthrough_max_body_bytes,
            )
            .map_err(io::Error::other)?,
        );
        if !config.cache.result_ttl.is_zero() {
            state.results = Some(ResultCache::new(config.cache.result_ttl));
        }
        let mut server = Self::bind(
            Arc::new(state),
            config.server.listen,
            config.server.admin_listen,
            Duration::ZERO,
        )
        .await?;
        server.settings = ConnectionSettings::of(&config.server);
        server.tls = tls;
        server.client = Some(client);
        Ok(server)
    }

    /// Lets SIGHUP and `POST /admin/reload` re-read `path` (the file this server was built from,
    /// as `config`).
    pub fn reload_from(&self, path: std::path::PathBuf, config: Config) -> Option<Arc<Reloader>> {
        let client = self.client.as_ref()?;
        let reloader = Arc::new(Reloader::new(
            path,
            config,
            Arc::clone(&self.state),
            Arc::clone(client),
            self.tls.clone(),
        ));
        self.state.reloader.set(Arc::clone(&reloader)).ok()?;
        Some(reloader)
    }

    /// The shared state, for tests.
    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// Binds both listeners for `state`, plain HTTP, default connection limits. Nothing is
    /// served until [`Server::run`].
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
        let mut settings = ConnectionSettings::of(&crate::config::ServerConfig::default());
        settings.shutdown_timeout = shutdown_timeout;
        Ok(Self {
            state,
            caller,
            admin,
            tls: None,
            client: None,
            settings,
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
        let s = &self.settings;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(s.header_read_timeout)
            .max_headers(s.max_headers)
            .max_buf_size(s.max_header_bytes);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(s.http2_max_streams)
            // Bounds on the HTTP/2 reset floods (CVE-2023-44487 "rapid reset" and the like).
            .max_pending_accept_reset_streams(Some(32))
            .max_local_error_reset_streams(Some(256))
            .max_header_list_size(s.max_header_bytes as u32)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(10));
        let connections = Arc::new(tokio::sync::Semaphore::new(s.max_connections));

        let admin_state = Arc::clone(&self.state);
        let admin = tower::service_fn(move |req| admin(Arc::clone(&admin_state), req));

        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = self.caller.accept() => {
                    let Some((stream, addr)) = accepted_stream(accepted) else { continue };
                    let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
                        // Over server.max_connections: close at once rather than let slow or
                        // idle clients pile up.
                        self.state.metrics.connections_rejected.inc();
                        continue;
                    };
                    let open = OpenConnection::new(&self.state.metrics, permit);
                    let state = Arc::clone(&self.state);
                    match &self.tls {
                        None => {
                            let svc = caller_service(state, Arc::new(Peer { certificate: None, addr: Some(addr) }));
                            let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
                            let conn = graceful.watch(conn.into_owned());
                            tokio::spawn(async move {
                                let _ = conn.await;
                                drop(open);
                            });
                        }
                        Some(tls) => {
                            let acceptor = tokio_rustls::TlsAcceptor::from(tls.load_full());
                            let builder = builder.clone();
                            let watcher = graceful.watcher();
                            let handshake_timeout = s.header_read_timeout;
                            tokio::spawn(async move {
                                let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await;
                                let Ok(Ok(tls_stream)) = handshake else {
                                    state.metrics.tls_handshake_failures.inc();
                                    return;
                                };
                                let certificate = tls_stream
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|chain| chain.first())
                                    .map(|c| Arc::new(c.clone().into_owned()));
                                let svc = caller_service(state, Arc::new(Peer { certificate, addr: Some(addr) }));
                                let conn = builder.serve_connection(TokioIo::new(tls_stream), TowerToHyperService::new(svc));
                                let _ = watcher.watch(conn.into_owned()).await;
                                drop(open);
                            });
                        }
                    }
                }
                accepted = self.admin.accept() => {
                    if let Some((stream, _)) = accepted_stream(accepted) {
                        let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(admin.clone()));
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
        if tokio::time::timeout(self.settings.shutdown_timeout, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                "in-flight requests still running after server.shutdown_timeout; exiting anyway"
            );
        }
    }
}

/// Counts an open caller connection for as long as it lives, holding its place under
/// `server.max_connections`.
struct OpenConnection {
    metrics: Arc<Metrics>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl OpenConnection {
    fn new(metrics: &Arc<Metrics>, permit: tokio::sync::OwnedSemaphorePermit) -> Self {
        metrics.connections_open.inc();
        Self {
            metrics: Arc::clone(metrics),
            _permit: permit,
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.metrics.connections_open.dec();
    }
}

fn accepted_stream(
    accepted: io::Result<(tokio::net::TcpStream, SocketAddr)>,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    match accepted {
        Ok((stream, addr)) => {
            let _ = stream.set_nodelay(true);
            Some((stream, addr))
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
    use crate::resilience::{Policy, ResilienceSettings};
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
        let state = state_with(Arc::new(Handle(Arc::clone(&fake))));
        (state, fake)
    }

    /// A caller listener's state for one caller, minting through `mint`, without retries.
    fn state_with(mint: Arc<dyn Mint>) -> Arc<State> {
        let metrics = Arc::new(Metrics::new(prometheus::Registry::new()).unwrap());
        let issuer = Issuer::new(
            IssuerSettings {
                min_remaining: Duration::from_secs(900),
                max_entries: 100,
                web_url: "https://identity.truora.com".into(),
                array_encoding: ArrayEncoding::Repeat,
            },
            mint,
            Policy::new(
                ResilienceSettings {
                    max_retries: 0,
                    ..ResilienceSettings::from_config(&crate::config::Config::default())
                },
                Arc::clone(&metrics),
            ),
            Arc::clone(&metrics),
        );
        let clients = Clients::new(vec![Client::with_secret("checkout", SECRET.as_bytes())]);
        let mut state = State::new(issuer, clients, metrics);
        state.max_body_bytes = 1024;
        Arc::new(state)
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
        let response = caller_service(Arc::clone(state), Arc::new(Peer::default()))
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
                UpstreamError::ServerError {
                    status: 500,
                    retry_after: None,
                },
                502,
                "upstream_unavailable",
            ),
            (UpstreamError::Timeout, 504, "upstream_timeout"),
        ];
        for (err, status, code) in cases {
            *fake.fail.lock().unwrap() = Some(err);
            let (got, headers, json) = call(&state, form("/v1/tokens", FORM)).await;
            assert_eq!(got.as_u16(), status, "{code}");
            assert_eq!(json["error"], code);
            assert!(json["message"].is_string());
            assert!(headers.get(RETRY_AFTER).is_none());
        }
        // Failures are not cached: the next request mints.
        *fake.fail.lock().unwrap() = None;
        let (got, headers, _) = call(&state, form("/v1/tokens", FORM)).await;
        assert_eq!(got, StatusCode::OK);
        assert_eq!(headers["x-cache"], "MISS");
        assert_eq!(fake.calls.load(Ordering::SeqCst), 4);
        // Throttling: 503 with Truora's Retry-After.
        *fake.fail.lock().unwrap() = Some(UpstreamError::Throttled {
            retry_after: Duration::from_secs(9),
        });
        let (got, headers, json) =
            call(&state, form("/v1/tokens", &FORM.replace("u1", "u2"))).await;
        assert_eq!(got, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json["error"], "upstream_throttled");
        assert_eq!(headers[RETRY_AFTER], "9");
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
    async fn a_panic_in_a_handler_answers_500_to_that_request_only() {
        let (state, _) = state();
        // Panics while building its future on /build, and on /poll while polling it, after
        // it was pending once.
        let panicking = tower::service_fn(|routed: Routed<Full<Bytes>>| {
            let path = routed.req.uri().path().to_owned();
            if path == "/build" {
                panic!("handler bug");
            }
            async move {
                tokio::task::yield_now().await;
                if path == "/poll" {
                    panic!("handler bug");
                }
                Ok::<_, Infallible>(Response::new(full(Bytes::from_static(b"fine"))))
            }
        });
        let svc = ServiceBuilder::new()
            .layer(ObserveLayer(Arc::clone(&state.metrics)))
            .layer(CatchPanicLayer)
            .service(panicking);
        for path in ["/build", "/poll"] {
            let boom = svc.clone().oneshot(form(path, "")).await.unwrap();
            assert_eq!(boom.status(), StatusCode::INTERNAL_SERVER_ERROR, "{path}");
            assert!(boom.headers().contains_key(&access::X_REQUEST_ID), "{path}");
            let body = boom.into_body().collect().await.unwrap().to_bytes();
            assert!(String::from_utf8_lossy(&body).contains("internal_error"));
            assert!(!String::from_utf8_lossy(&body).contains("handler bug"));
        }
        let fine = svc.oneshot(form("/v1/tokens", "")).await.unwrap();
        assert_eq!(fine.status(), StatusCode::OK);
        // Both panics were answered, counted and timed like any other answer.
        let text = String::from_utf8(state.metrics.render()).unwrap();
        assert!(text.contains(r#"token_broker_requests_total{route="other",status="500"} 2"#));
        assert!(text.contains("token_broker_requests_in_flight 0"));
    }

    #[tokio::test]
    async fn a_panicking_upstream_call_is_500_and_the_next_request_is_served() {
        struct Panics(AtomicUsize);
        impl Mint for Panics {
            fn mint(&self, _: String) -> MintFuture {
                let first = self.0.fetch_add(1, Ordering::SeqCst) == 0;
                Box::pin(async move {
                    assert!(!first, "a bug in the upstream path");
                    use base64::Engine;
                    let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
                    Ok(format!("h.{}.s", e.encode(r#"{"iat":0,"exp":7200}"#)))
                })
            }
        }
        let state = state_with(Arc::new(Panics(AtomicUsize::new(0))));
        let (status, _, body) = call(&state, form("/v1/tokens", FORM)).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["error"], "internal_error");
        let (status, _, _) = call(&state, form("/v1/tokens", FORM)).await;
        assert_eq!(status, StatusCode::OK);
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
        let r = admin(Arc::clone(&state), form("/metrics", ""))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[ALLOW], "GET");
        let r = admin(Arc::clone(&state), get("/admin/reload"))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[ALLOW], "POST");
    }
}
