//! The caller API as one tower stack, built in [`caller_service`], layers outermost first:
//!
//! 1. [`ObserveLayer`]: decides the route once, makes the request id, with `[telemetry]` opens
//!    the request's span (continuing the caller's `traceparent`), and when the answer comes
//!    back, whatever it is, counts and times it, counts it for its caller, records it on the span,
//!    writes the access line and sets `X-Request-Id`.
//! 2. [`CatchPanicLayer`]: a panic below answers 500 to that request alone.
//! 3. [`ErrorLayer`]: turns every [`Failure`] below into the route's JSON error shape.
//! 4. [`AuthLayer`]: who the caller is, before the body is read.
//! 5. [`Api`]: framing, the body, the core (see [`super::api`]).
//!
//! What the layers below learn about a request (its caller, what the cache did) comes back up
//! as data, in the [`Note`] of the [`Answer`] or [`Failure`]: nothing travels on the side.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{
    HeaderValue, ALLOW, CACHE_CONTROL, CONNECTION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use http::{Request, Response};
use http_body::Body;
use tower::{Layer, Service, ServiceBuilder};

use super::access;
use super::api::{Api, ApiState};
use crate::auth::{AuthLayer, Peer};
use crate::error::{BrokerError, RequestError, WebhookError};
use crate::logging::AccessLine;
use crate::metrics::Metrics;
use crate::telemetry::{Telemetry, Traced};
use crate::wire::{full, Answer, Failure, HttpResponse, Note, Route, Routed, JSON, NO_STORE};

/// The caller API for one connection from `peer`, as one tower stack, layers outermost first.
/// What hyper sees cannot fail.
pub fn caller_service<B>(
    state: Arc<ApiState>,
    peer: Arc<Peer>,
) -> impl Service<Request<B>, Response = HttpResponse, Error = Infallible, Future: Send> + Clone + Send
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    ServiceBuilder::new()
        // Outermost: decides the route once and counts and times every answer, errors
        // included, so `requests_total` and the latency histogram see exactly what callers see.
        .layer(ObserveLayer::new(
            Arc::clone(&state.metrics),
            state.telemetry.clone(),
        ))
        // A panic below answers 500 to that request alone; the connection and the process
        // carry on.
        .layer(CatchPanicLayer)
        // Turns every error below into the route's JSON error shape; nothing below needs to
        // know how errors look on the wire.
        .layer(ErrorLayer)
        // Authenticates before the body is read: an unknown caller costs no body read, no
        // parse and never an upstream call.
        .layer(AuthLayer::new(
            Arc::clone(&state.callers),
            peer,
            Arc::clone(&state.metrics),
            Arc::clone(state.issuer.audit()),
        ))
        .service(Api::new(state))
}

/// Layer: route, count, time and trace. See [`caller_service`].
#[derive(Clone)]
pub struct ObserveLayer {
    metrics: Arc<Metrics>,
    telemetry: Option<Arc<Telemetry>>,
}

impl ObserveLayer {
    /// Counts into `metrics`; with `telemetry`, each request also gets its span.
    pub fn new(metrics: Arc<Metrics>, telemetry: Option<Arc<Telemetry>>) -> Self {
        Self { metrics, telemetry }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            metrics: Arc::clone(&self.metrics),
            telemetry: self.telemetry.clone(),
        }
    }
}

/// The service [`ObserveLayer`] builds.
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    metrics: Arc<Metrics>,
    telemetry: Option<Arc<Telemetry>>,
}

impl<S, B> Service<Request<B>> for Observe<S>
where
    S: Service<Routed<B>, Response = Answer, Error = Infallible>,
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
        let span = match &self.telemetry {
            None => tracing::Span::none(),
            Some(telemetry) => {
                let (name, method, template) = span_name(route, req.method());
                telemetry.request_span(
                    &name,
                    method,
                    template,
                    request_id.to_str().unwrap_or("-"),
                    req.headers(),
                )
            }
        };
        let routed = Routed {
            route,
            req,
            request_id: request_id.clone(),
        };
        let inner = match &self.telemetry {
            None => Traced::plain(self.inner.call(routed)),
            Some(telemetry) => telemetry.within(span.clone(), self.inner.call(routed)),
        };
        ObserveFuture {
            inner,
            route,
            started,
            request_id,
            in_flight,
            span,
        }
    }
}

/// A request span's name (`{method} {route}`, HTTP's semantic conventions), method and route
/// template: fixed strings, never the path a caller sent. Methods HTTP does not define are
/// `_OTHER` (the name says `HTTP`), and a request matching no route has no template and is named
/// by its method alone.
fn span_name(
    route: Route,
    method: &http::Method,
) -> (
    std::borrow::Cow<'static, str>,
    &'static str,
    Option<&'static str>,
) {
    use http::Method;
    let template = match route {
        Route::Tokens => return ("POST /v1/tokens".into(), "POST", Some("/v1/tokens")),
        Route::Invalidate => return ("DELETE /v1/tokens".into(), "DELETE", Some("/v1/tokens")),
        Route::ApiKeys => return ("POST /v1/api-keys".into(), "POST", Some("/v1/api-keys")),
        Route::Passthrough => Some("/truora/*"),
        Route::MethodNotAllowed("POST") => Some("/v1/api-keys"),
        Route::MethodNotAllowed(_) => Some("/v1/tokens"),
        Route::NotFound => None,
    };
    let method = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::CONNECT,
    ]
    .iter()
    .find(|m| *m == method)
    .map_or("_OTHER", Method::as_str);
    let shown = if method == "_OTHER" { "HTTP" } else { method };
    let name = match template {
        Some(t) => format!("{shown} {t}").into(),
        None => shown.into(),
    };
    (name, method, template)
}

pin_project_lite::pin_project! {
    /// The future of [`Observe`]. Named rather than boxed, so it costs no allocation.
    ///
    /// - Built: the request is counted in flight and its id decided; with tracing, its span is
    ///   open and the inner future runs inside it.
    /// - Each poll: polls the inner future.
    /// - Ready: counts and times the answer by route and status, counts it for the caller its
    ///   note names (by what the cache did), records the same on the span, writes the access
    ///   line and sets `X-Request-Id`.
    /// - Dropped (answered or abandoned): leaves in flight; the span ends.
    pub struct ObserveFuture<F> {
        #[pin]
        inner: Traced<F>,
        route: Route,
        started: Instant,
        request_id: HeaderValue,
        in_flight: InFlight,
        span: tracing::Span,
    }
}

impl<F> Future for ObserveFuture<F>
where
    F: Future<Output = Result<Answer, Infallible>>,
{
    type Output = Result<HttpResponse, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(Answer { mut response, note }) = std::task::ready!(this.inner.poll(cx));
        let metrics = &*this.in_flight.0;
        let elapsed = this.started.elapsed();
        let label = this.route.label();
        let status = response.status().as_u16();
        metrics.request_done(label, status, elapsed);
        let caller = note.caller.and_then(|slot| metrics.caller(slot));
        if let Some(c) = caller {
            c.count(note.cache);
        }
        if !this.span.is_none() {
            Telemetry::answered(
                this.span,
                status,
                caller.map(|c| &*c.id),
                note.cache.label(),
            );
        }
        // Ready once: the id moves to the response, leaving a placeholder that costs nothing.
        let request_id = std::mem::replace(this.request_id, HeaderValue::from_static("-"));
        AccessLine {
            request_id: request_id.to_str().unwrap_or("-"),
            caller: caller.map_or("-", |c| &*c.id),
            route: label.as_str(),
            status,
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
    S: Service<Routed<B>, Response = Answer, Error = Infallible>,
{
    type Response = Answer;
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
    F: Future<Output = Result<Answer, Infallible>>,
{
    type Output = Result<Answer, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(inner) = this.inner.as_pin_mut() {
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
                Ok(Poll::Pending) => return Poll::Pending,
                Ok(Poll::Ready(answer)) => return Poll::Ready(answer),
                Err(_) => {}
            }
        }
        Poll::Ready(Ok(Answer {
            response: error_response(
                *this.route,
                &BrokerError::Internal("a request handler panicked"),
            ),
            note: Note::default(),
        }))
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
    S: Service<Routed<B>, Response = Answer, Error = Failure>,
    S::Future: Unpin,
{
    type Response = Answer;
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
    F: Future<Output = Result<Answer, Failure>> + Unpin,
{
    type Output = Result<Answer, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        Poll::Ready(Ok(
            match std::task::ready!(Pin::new(&mut this.inner).poll(cx)) {
                Ok(answer) => answer,
                Err(Failure { error, note }) => Answer {
                    response: error_response(this.route, &error),
                    note,
                },
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
    if let BrokerError::Auth(_) | BrokerError::Webhook(WebhookError::Unauthorized) = err {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Caller, Callers};
    use crate::error::UpstreamError;
    use crate::issuance::{Issuer, IssuerSettings};
    use crate::server::access;
    use crate::server::admin::{admin, Admin};
    use crate::truora::ArrayEncoding;
    use crate::upstream::{Guard, GuardSettings, Mint, MintFuture};
    use http::header::{CONTENT_LENGTH, RETRY_AFTER};
    use http::StatusCode;
    use http_body_util::{BodyExt, Full};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;
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

    fn state() -> (Arc<ApiState>, Arc<Fake>) {
        let fake = Arc::new(Fake::default());
        let state = state_with(Arc::new(Handle(Arc::clone(&fake))));
        (state, fake)
    }

    /// A caller listener's state for one caller, minting through `mint`, without retries.
    fn state_with(mint: Arc<dyn Mint>) -> Arc<ApiState> {
        let metrics = Arc::new(Metrics::new(prometheus::Registry::new()).unwrap());
        let issuer = Issuer::new(
            IssuerSettings {
                min_remaining: Duration::from_secs(900),
                max_entries: 100,
                web_url: "https://identity.truora.com".into(),
                array_encoding: ArrayEncoding::Repeat,
                invalidate_rate: 10,
            },
            mint,
            Guard::new(
                GuardSettings {
                    max_retries: 0,
                    ..GuardSettings::from_config(&crate::config::Config::default())
                },
                Arc::clone(&metrics),
            ),
            Arc::clone(&metrics),
        );
        let callers = Callers::new(vec![Caller::with_secret("checkout", SECRET.as_bytes())]);
        let mut state = ApiState::new(issuer, callers, metrics);
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
        state: &Arc<ApiState>,
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

    #[test]
    fn span_names_are_the_method_and_route_template_never_the_path() {
        let cases = [
            ("POST", "/v1/tokens", "POST /v1/tokens", Some("/v1/tokens")),
            (
                "DELETE",
                "/v1/tokens",
                "DELETE /v1/tokens",
                Some("/v1/tokens"),
            ),
            ("PUT", "/v1/tokens", "PUT /v1/tokens", Some("/v1/tokens")),
            (
                "GET",
                "/v1/api-keys",
                "GET /v1/api-keys",
                Some("/v1/api-keys"),
            ),
            (
                "GET",
                "/truora/identity/v1/processes/IDP1/result",
                "GET /truora/*",
                Some("/truora/*"),
            ),
            (
                "BREW",
                "/truora/identity/x",
                "HTTP /truora/*",
                Some("/truora/*"),
            ),
            ("GET", "/v1/users/someone@example.com", "GET", None),
            ("BREW", "/elsewhere", "HTTP", None),
        ];
        for (method, path, name, template) in cases {
            let method = http::Method::from_bytes(method.as_bytes()).unwrap();
            let (got, m, t) = span_name(Route::of(&method, path), &method);
            assert_eq!((got.as_ref(), t), (name, template), "{method} {path}");
            assert!(m == method.as_str() || m == "_OTHER");
        }
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
    async fn what_the_lower_layers_learn_comes_back_up_with_failures_too() {
        let (state, fake) = state();
        // Refused by validation after authentication: the caller is known, no lookup was made.
        call(&state, form("/v1/tokens", "country=XX")).await;
        // A miss whose mint fails: the caller and the miss are both reported.
        *fake.fail.lock().unwrap() = Some(UpstreamError::Timeout);
        let (status, _, _) = call(&state, form("/v1/tokens", FORM)).await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        // Unauthenticated: no caller to count.
        let mut anonymous = form("/v1/tokens", FORM);
        anonymous.headers_mut().remove(http::header::AUTHORIZATION);
        call(&state, anonymous).await;
        let text = String::from_utf8(state.metrics.render()).unwrap();
        let count = |cache: &str| {
            format!(r#"token_broker_caller_requests_total{{cache="{cache}",caller="checkout"}} 1"#)
        };
        assert!(text.contains(&count("none")), "{text}");
        assert!(text.contains(&count("miss")), "{text}");
        assert!(text.contains(r#"token_broker_cache_lookups_total{result="miss"} 1"#));
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
                Ok::<_, Infallible>(Answer {
                    response: Response::new(full(Bytes::from_static(b"fine"))),
                    note: Note::default(),
                })
            }
        });
        let svc = ServiceBuilder::new()
            .layer(ObserveLayer::new(Arc::clone(&state.metrics), None))
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
        let state = Arc::new(Admin::new(state));
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
