//! How spans leave the process, and how the dropped ones are counted.
//!
//! - [`processor`]: the SDK's batch span processor (its own thread, a bounded queue, batches of
//!   [`BATCH`] every few seconds) in front of the OTLP/HTTP protobuf exporter of
//!   `opentelemetry-otlp`, with an admission count in front of it so that every span the queue
//!   cannot take is counted (`reason="queue_full"`), and a count behind it of the spans whose
//!   export failed after the exporter's own retries (`reason="export_failed"`). Ending a span
//!   never waits: a span that does not fit is dropped at once.
//! - [`Transport`]: the exporter's HTTP client is the broker's own hyper client (rustls with
//!   ring, Mozilla's roots), driven on the broker's runtime with a timeout; the exporter's thread
//!   only waits for its answer.
//! - [`ToLogs`]: events raised inside a traced request go on to the log subscriber.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::Connect;
use hyper_util::client::legacy::Client;
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SpanData, SpanExporter, SpanProcessor,
};
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tracing::subscriber::Interest;
use tracing::{Dispatch, Event, Metadata};
use tracing_subscriber::layer::{Context, Filter, Layer};

/// Spans waiting for export at most; more are dropped (and counted).
pub const QUEUE: usize = 2048;
/// Spans per export request at most.
pub const BATCH: usize = 512;
/// One export request, connect to answer; the exporter retries a failed one a few times within
/// this too.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// The collector's answer is read up to this size (it is a few bytes).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// `token_broker_telemetry_spans_dropped_total{reason}`, registered whether or not tracing is
/// on, so that it reads 0 rather than nothing.
#[derive(Clone)]
pub struct SpanMetrics {
    queue_full: IntCounter,
    export_failed: IntCounter,
}

impl SpanMetrics {
    /// Registers the series in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let dropped = IntCounterVec::new(
            Opts::new(
                "token_broker_telemetry_spans_dropped_total",
                "Spans not delivered to the collector, by reason: queue_full (the export queue was full when the span ended), export_failed (the collector could not be reached or refused the batch).",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(dropped.clone()))?;
        Ok(Self {
            queue_full: dropped.with_label_values(&["queue_full"]),
            export_failed: dropped.with_label_values(&["export_failed"]),
        })
    }
}

/// The span processor of the pipeline: bounded, batched, counted, exporting to `url`.
pub fn processor<C>(
    url: &str,
    client: Client<C, Full<Bytes>>,
    runtime: tokio::runtime::Handle,
    metrics: SpanMetrics,
) -> Result<Admit, opentelemetry_otlp::ExporterBuildError>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url)
        .with_timeout(EXPORT_TIMEOUT)
        .with_http_client(Transport {
            client,
            runtime,
            timeout: EXPORT_TIMEOUT,
        })
        .build()?;
    let pending = Arc::new(AtomicUsize::new(0));
    let counted = Counted {
        inner: exporter,
        pending: Arc::clone(&pending),
        dropped: metrics.export_failed.clone(),
        failing: AtomicBool::new(false),
    };
    let batches = BatchSpanProcessor::builder(counted)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(QUEUE)
                .with_max_export_batch_size(BATCH)
                .build(),
        )
        .build();
    Ok(Admit {
        inner: batches,
        pending,
        dropped: metrics.queue_full,
    })
}

/// In front of the batch processor: takes an ended span only while the queue has room for it,
/// else drops it and counts it. `pending` counts the spans handed on and not yet taken out of
/// the queue for export, so the queue itself is never found full.
#[derive(Debug)]
pub struct Admit {
    inner: BatchSpanProcessor,
    pending: Arc<AtomicUsize>,
    dropped: IntCounter,
}

impl SpanProcessor for Admit {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        let admitted = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < QUEUE).then_some(n + 1)
            })
            .is_ok();
        if admitted {
            self.inner.on_end(span);
        } else {
            self.dropped.inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// Behind the batch processor: frees the batch's room in the queue count, exports it, and
/// counts its spans when the export fails; says once when exports start failing and once when
/// they work again.
struct Counted<E> {
    inner: E,
    pending: Arc<AtomicUsize>,
    dropped: IntCounter,
    failing: AtomicBool,
}

impl<E> std::fmt::Debug for Counted<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Counted")
    }
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let _ = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                Some(p.saturating_sub(n))
            });
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("tracing: the collector takes spans again");
                }
            }
            Err(e) => {
                self.dropped.inc_by(n as u64);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "tracing: spans cannot be exported to the collector; they are dropped and counted in token_broker_telemetry_spans_dropped_total until it takes them again");
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// The exporter's HTTP client: the broker's hyper client, each request run on the broker's
/// runtime within `timeout`, the answer read up to a small cap.
struct Transport<C> {
    client: Client<C, Full<Bytes>>,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
}

impl<C> std::fmt::Debug for Transport<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Transport")
    }
}

type Sent<'a> = Pin<Box<dyn Future<Output = Result<Response<Bytes>, HttpError>> + Send + 'a>>;

impl<C> HttpClient for Transport<C>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    fn send_bytes<'life0, 'async_trait>(&'life0 self, request: Request<Bytes>) -> Sent<'async_trait>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let client = self.client.clone();
        let timeout = self.timeout;
        let task = self.runtime.spawn(async move {
            let exchange = async {
                let (parts, body) = request.into_parts();
                let response = client
                    .request(Request::from_parts(parts, Full::new(body)))
                    .await?;
                let (parts, body) = response.into_parts();
                let body = Limited::new(body, MAX_ANSWER_BYTES)
                    .collect()
                    .await?
                    .to_bytes();
                Ok::<_, HttpError>(Response::from_parts(parts, body))
            };
            match tokio::time::timeout(timeout, exchange).await {
                Ok(answer) => answer,
                Err(_) => Err("the collector did not answer in time".into()),
            }
        });
        Box::pin(async move { task.await.map_err(|e| Box::new(e) as HttpError)? })
    }
}

/// Hands the events of a traced request on to the log subscriber (which decides, as it always
/// does, whether to write them).
pub struct ToLogs(Dispatch);

impl ToLogs {
    /// A layer for the spans' own subscriber that sees events only, those `logs` wants.
    pub fn layer<S>(logs: Dispatch) -> impl Layer<S>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        Layer::with_filter(ToLogs(logs.clone()), Wanted(logs))
    }
}

impl<S: tracing::Subscriber> Layer<S> for ToLogs {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        self.0.event(event);
    }
}

/// The events the log subscriber wants; no spans.
struct Wanted(Dispatch);

impl<S> Filter<S> for Wanted {
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        meta.is_event() && self.0.enabled(meta)
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if meta.is_event() {
            Interest::sometimes()
        } else {
            Interest::never()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{Span as _, Tracer as _, TracerProvider as _};
    use opentelemetry_sdk::error::OTelSdkError;
    use opentelemetry_sdk::trace::SdkTracerProvider;

    /// Refuses every batch, as a collector that cannot be reached does.
    #[derive(Debug)]
    struct Unreachable;
    impl SpanExporter for Unreachable {
        async fn export(&self, _: Vec<SpanData>) -> OTelSdkResult {
            Err(OTelSdkError::InternalFailure("connection refused".into()))
        }
    }

    fn value(registry: &Registry, reason: &str) -> f64 {
        let text = String::from_utf8(
            prometheus::TextEncoder::new()
                .encode_to_string(&registry.gather())
                .unwrap()
                .into_bytes(),
        )
        .unwrap();
        let series = format!("token_broker_telemetry_spans_dropped_total{{reason=\"{reason}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .unwrap()
            .parse()
            .unwrap()
    }

    #[test]
    fn spans_beyond_the_queue_and_spans_whose_export_failed_are_counted() {
        let registry = Registry::new();
        let metrics = SpanMetrics::register(&registry).unwrap();
        let pending = Arc::new(AtomicUsize::new(QUEUE));
        let counted = Counted {
            inner: Unreachable,
            pending: Arc::clone(&pending),
            dropped: metrics.export_failed.clone(),
            failing: AtomicBool::new(false),
        };
        let admit = Admit {
            inner: BatchSpanProcessor::builder(counted).build(),
            pending: Arc::clone(&pending),
            dropped: metrics.queue_full.clone(),
        };
        let provider = SdkTracerProvider::builder()
            .with_span_processor(admit)
            .build();
        let tracer = provider.tracer("test");
        // The queue is full: three spans dropped at once, nothing handed on.
        for _ in 0..3 {
            tracer.start("full").end();
        }
        assert_eq!(value(&registry, "queue_full"), 3.0);
        assert_eq!(pending.load(Ordering::SeqCst), QUEUE);
        // Room again: two spans queued, then their export fails and they are counted.
        pending.store(0, Ordering::SeqCst);
        for _ in 0..2 {
            tracer.start("room").end();
        }
        assert_eq!(pending.load(Ordering::SeqCst), 2);
        let _ = provider.force_flush();
        assert_eq!(value(&registry, "export_failed"), 2.0);
        assert_eq!(value(&registry, "queue_full"), 3.0);
        assert_eq!(pending.load(Ordering::SeqCst), 0);
        let _ = provider.shutdown();
    }
}
