//! Traces: one span per caller request, with children for the upstream mint, each Redis call and
//! the pass-through call, exported over OTLP/HTTP to a collector (`[telemetry]`).
//!
//! - **Off costs nothing.** Without `telemetry.otlp_endpoint` no [`Telemetry`] exists: the
//!   request layer makes no span, [`child`] makes none either (there is no span to be a child
//!   of), and [`traced`] hands futures back as they are.
//! - **Its own subscriber.** The spans live in a `tracing` dispatcher of their own (a registry
//!   with the OpenTelemetry layer), entered only around a traced request and the tasks it
//!   spawns. The process's log subscriber is left as it is: log lines do not change, and every
//!   event raised inside a traced request is handed on to it as if no tracing were there
//!   ([`export::ToLogs`]). Events never become span events, so a log line's text (an error's
//!   message, an audit line's fields) never reaches the collector.
//! - **What a span holds.** Only what the broker chose: the route (never the path or query),
//!   the method, the status, the caller's configured id, what the cache did, the request id, the
//!   mint's attempts and outcome, the Redis operation, the pass-through pattern. Never a token,
//!   a secret, the master key, a user's identifiers or a redirect URL.
//! - **Never blocks a request.** Ended spans go to a bounded queue that a thread of the SDK
//!   empties in batches; a full queue or a failed export drops spans and counts them in
//!   `token_broker_telemetry_spans_dropped_total{reason}` ([`export`]).
//! - **Context.** A W3C `traceparent` from the caller continues its trace (parent-based
//!   sampling follows its decision); with `propagate_upstream`, [`traceparent`] gives the one
//!   sent to Truora. Trace headers from callers never travel to Truora
//!   ([`strip_trace_headers`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body_util::Full;
use hyper_util::client::legacy::connect::Connect;
use hyper_util::client::legacy::Client;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing::instrument::{Instrument, Instrumented, WithDispatch, WithSubscriber};
use tracing::{Dispatch, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

use crate::config::TelemetryConfig;

pub mod export;

pub use export::SpanMetrics;

/// The W3C trace-context headers a caller may send: none of them is relayed to Truora.
pub const TRACE_HEADERS: [&str; 3] = ["traceparent", "tracestate", "baggage"];
/// How long the broker waits, after the drain, for its last spans to be exported.
pub const FLUSH_LIMIT: Duration = Duration::from_secs(5);

/// A running trace pipeline: the spans' own dispatcher and the provider that exports them.
pub struct Telemetry {
    dispatch: Dispatch,
    provider: SdkTracerProvider,
    propagate_upstream: bool,
}

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("telemetry.otlp_endpoint: {0}")]
pub struct TelemetryError(String);

impl Telemetry {
    /// The pipeline of `config`, or none when it names no collector. Exports through `client`
    /// on the current tokio runtime; counts what it drops in `metrics`. Events raised inside
    /// traced requests go on to the log subscriber in force now.
    pub fn start<C>(
        config: &TelemetryConfig,
        client: Client<C, Full<Bytes>>,
        metrics: SpanMetrics,
    ) -> Result<Option<Self>, TelemetryError>
    where
        C: Connect + Clone + Send + Sync + 'static,
    {
        let Some(url) = config.traces_url() else {
            return Ok(None);
        };
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| TelemetryError("no runtime to export on".into()))?;
        let processor = export::processor(&url, client, runtime, metrics)
            .map_err(|e| TelemetryError(e.to_string()))?;
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .with_attribute(opentelemetry::KeyValue::new(
                "service.version",
                env!("CARGO_PKG_VERSION"),
            ))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio,
            ))))
            .with_resource(resource)
            .build();
        let otel = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("token-broker"))
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                meta.is_span() && meta.target().starts_with("token_broker")
            }));
        let logs = tracing::dispatcher::get_default(Dispatch::clone);
        let subscriber = tracing_subscriber::registry()
            .with(otel)
            .with(export::ToLogs::layer(logs));
        tracing::info!(
            endpoint = %url,
            service_name = %config.service_name,
            sample_ratio = config.sample_ratio,
            propagate_upstream = config.propagate_upstream,
            "tracing: spans are exported over OTLP/HTTP"
        );
        Ok(Some(Self {
            dispatch: Dispatch::new(subscriber),
            provider,
            propagate_upstream: config.propagate_upstream,
        }))
    }

    /// The span of one caller request, named `name` (`POST /v1/tokens`), with its route
    /// template when it has one, a child of the caller's trace when `headers` carry a valid
    /// `traceparent`, else the root of a new one. Its status, caller and cache result are
    /// recorded by [`Telemetry::answered`].
    pub fn request_span(
        &self,
        name: &str,
        method: &str,
        route: Option<&str>,
        request_id: &str,
        headers: &HeaderMap,
    ) -> Span {
        let span = tracing::dispatcher::with_default(&self.dispatch, || {
            tracing::info_span!(
                parent: None,
                "request",
                otel.name = name,
                otel.kind = "server",
                http.request.method = method,
                http.route = route,
                token_broker.request_id = request_id,
                http.response.status_code = tracing::field::Empty,
                token_broker.caller = tracing::field::Empty,
                token_broker.cache = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            )
        });
        let parent = TraceContextPropagator::new().extract(&Headers(headers));
        if parent.span().span_context().is_remote() {
            let _ = span.set_parent(parent);
        }
        span
    }

    /// Records the answer on a request's span: its status (5xx marks the span as an error),
    /// the caller's configured id when it authenticated, and what the cache did.
    pub fn answered(span: &Span, status: u16, caller: Option<&str>, cache: &'static str) {
        span.record("http.response.status_code", status);
        if let Some(caller) = caller {
            span.record("token_broker.caller", caller);
        }
        if cache != "-" {
            span.record("token_broker.cache", cache);
        }
        if status >= 500 {
            span.record("otel.status_code", "error");
        }
    }

    /// `fut` inside `span` and this pipeline's dispatcher: what it does is traced.
    pub fn within<F: Future>(&self, span: Span, fut: F) -> Traced<F> {
        Traced::Span {
            fut: fut.instrument(span).with_subscriber(self.dispatch.clone()),
        }
    }

    /// Whether Truora is sent a `traceparent` (`telemetry.propagate_upstream`).
    pub fn propagates_upstream(&self) -> bool {
        self.propagate_upstream
    }

    /// Exports what is queued now and waits for it (at most a few seconds); for tests.
    pub async fn flush(&self) {
        let provider = self.provider.clone();
        let _ = tokio::task::spawn_blocking(move || provider.force_flush()).await;
    }

    /// Exports the spans still queued and stops, within `limit` whatever the collector does.
    pub async fn shutdown(&self, limit: Duration) {
        let provider = self.provider.clone();
        let stop = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(limit));
        match tokio::time::timeout(limit + Duration::from_secs(1), stop).await {
            Ok(Ok(Ok(()))) => tracing::debug!("tracing: the last spans were exported"),
            _ => tracing::warn!(
                "tracing: the last spans could not all be exported before the broker stopped"
            ),
        }
    }
}

/// `make()`'s span when a traced request is in progress here, else none (and `make` is not
/// called): how every span below the request one is made, so that nothing is spent on spans
/// when tracing is off or outside a traced request.
pub fn child(make: impl FnOnce() -> Span) -> Span {
    // A subscriber that tracks spans (the broker's log subscriber does) knows that there is no
    // current span: only an actual one, the traced request's, gets children.
    if tracing::dispatcher::get_default(|d| d.current_span().id().is_some()) {
        make()
    } else {
        Span::none()
    }
}

/// `fut` carrying the current span and its dispatcher along, for a task spawned on behalf of a
/// traced request (a mint in its own task); as it is when there is none.
pub fn traced<F: Future>(fut: F) -> Traced<F> {
    let span = Span::current();
    match Span::with_subscriber(&span, |(_, dispatch)| dispatch.clone()) {
        Some(dispatch) => Traced::Span {
            fut: fut.instrument(span).with_subscriber(dispatch),
        },
        None => Traced::Plain { fut },
    }
}

/// The W3C `traceparent` of the current span, for a call to Truora; none outside a traced
/// request. Only `traceparent`: no `tracestate` or baggage, which could carry a caller's data.
pub fn traceparent() -> Option<HeaderValue> {
    let span = Span::current();
    if span.is_none() {
        return None;
    }
    let cx = span.context();
    let context = cx.span().span_context().clone();
    if !context.is_valid() {
        return None;
    }
    HeaderValue::from_str(&format!(
        "00-{}-{}-{:02x}",
        context.trace_id(),
        context.span_id(),
        context.trace_flags().to_u8()
    ))
    .ok()
}

/// Removes the trace-context headers ([`TRACE_HEADERS`]) from a request bound for Truora.
pub fn strip_trace_headers(headers: &mut HeaderMap) {
    for name in TRACE_HEADERS {
        headers.remove(name);
    }
}

/// Sets the current span's `traceparent` on a request bound for Truora when `propagate`, after
/// removing whatever trace context it carried.
pub fn propagate(headers: &mut HeaderMap, propagate: bool) {
    strip_trace_headers(headers);
    if propagate {
        if let Some(value) = traceparent() {
            headers.insert("traceparent", value);
        }
    }
}

/// Request headers as the propagator reads them.
struct Headers<'a>(&'a HeaderMap);

impl opentelemetry::propagation::Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

pin_project_lite::pin_project! {
    /// A future as it is, or inside a span and a dispatcher ([`traced`], [`Telemetry::within`]).
    #[project = TracedProj]
    pub enum Traced<F> {
        /// Not traced: polled as it is.
        Plain { #[pin] fut: F },
        /// Traced: each poll enters the span, in the pipeline's dispatcher.
        Span { #[pin] fut: WithDispatch<Instrumented<F>> },
    }
}

impl<F> Traced<F> {
    /// `fut`, not traced.
    pub fn plain(fut: F) -> Self {
        Traced::Plain { fut }
    }
}

impl<F: Future> Future for Traced<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        match self.project() {
            TracedProj::Plain { fut } => fut.poll(cx),
            TracedProj::Span { fut } => fut.poll(cx),
        }
    }
}

/// A shared handle: the caller stack, the clients and the composition root hold one each.
pub type SharedTelemetry = Option<Arc<Telemetry>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn no_span_is_made_and_futures_are_left_alone() {
        let made = std::cell::Cell::new(false);
        let span = child(|| {
            made.set(true);
            tracing::info_span!("never")
        });
        assert!(span.is_none());
        assert!(!made.get());
        assert!(matches!(traced(async {}), Traced::Plain { .. }));
        assert!(traceparent().is_none());
    }

    #[test]
    fn without_a_traced_request_no_span_is_made_and_futures_are_left_alone() {
        no_span_is_made_and_futures_are_left_alone();
    }

    #[test]
    fn under_the_log_subscriber_without_a_traced_request_no_span_is_made_either() {
        // The broker's log subscriber tracks spans, so it knows there is none: no request span
        // is current when tracing is off, and a Redis call or a mint must not make one.
        let subscriber = tracing_subscriber::fmt()
            .with_writer(std::io::sink)
            .finish();
        tracing::subscriber::with_default(subscriber, no_span_is_made_and_futures_are_left_alone);
    }

    #[test]
    fn trace_headers_are_stripped_and_replaced_only_when_propagating() {
        let mut h = HeaderMap::new();
        for name in TRACE_HEADERS {
            h.insert(name, HeaderValue::from_static("x"));
        }
        h.insert("accept", HeaderValue::from_static("application/json"));
        propagate(&mut h, true);
        // No current span: nothing of the broker's to send either.
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("accept"));
    }
}
