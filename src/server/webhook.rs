//! The webhook listener (`webhooks.listen`): the one port that faces beyond the company network,
//! so it serves Truora's deliveries and nothing else. Its connections have their own cap
//! (`webhooks.max_connections`) and the same first-request deadline, idle limit and age as the
//! caller listener's ([`super::connection`]); TLS when `[webhooks.tls]` is set.
//!
//! One delivery, in order: the path (anything but `webhooks.path` is 404) and the method (POST,
//! else 405); the bearer secret (401), before any of the body is read; the body, at most 64 KiB
//! (413) within `server.body_read_timeout` (408); then [`crate::webhooks::Webhooks::take`]
//! decides. Answers are JSON: `{"outcome":"taken"|"ignored","event":...,"invalidated":n}`, or
//! the broker's error shape.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body::Body;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use super::connection::{drive, Activity, Counted, Lifetime};
use super::listener::BindError;
use super::stack::error_response;
use super::tls::SharedTls;
use crate::config::WebhooksConfig;
use crate::error::{BrokerError, RequestError, WebhookError};
use crate::metrics::Metrics;
use crate::webhooks::{Webhooks, MAX_DELIVERY_BYTES};
use crate::wire::{json_response, read_body, HttpResponse, Route};

/// The webhook listener, bound; served by [`super::Listeners::run`] once added to them.
pub struct WebhookListener {
    pub(super) listener: TcpListener,
    pub(super) addr: SocketAddr,
    pub(super) tls: Option<SharedTls>,
    pub(super) max_connections: usize,
    pub(super) webhooks: Arc<Webhooks>,
}

impl WebhookListener {
    /// Binds `webhooks.listen`, serving TLS from `tls` when given, deliveries to `webhooks`.
    pub async fn bind(
        config: &WebhooksConfig,
        tls: Option<SharedTls>,
        webhooks: Arc<Webhooks>,
    ) -> Result<Self, BindError> {
        let fail = |source| BindError {
            addr: config.listen,
            key: "webhooks.listen",
            source,
        };
        let listener = TcpListener::bind(config.listen).await.map_err(fail)?;
        let addr = listener.local_addr().map_err(fail)?;
        Ok(Self {
            listener,
            addr,
            tls,
            max_connections: config.max_connections,
            webhooks,
        })
    }

    /// The bound address (the port chosen when port 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// What the webhook listener needs for each connection.
pub(super) struct WebhookConnections {
    pub(super) webhooks: Arc<Webhooks>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) tls: Option<SharedTls>,
    pub(super) builder: auto::Builder<TokioExecutor>,
    pub(super) lifetime: Lifetime,
    pub(super) handshake_timeout: Duration,
    pub(super) body_read_timeout: Duration,
    pub(super) places: Arc<Semaphore>,
    pub(super) stopping: watch::Receiver<bool>,
}

impl WebhookConnections {
    /// Takes a place for the connection (or closes it at once) and serves it in its own task.
    pub(super) fn serve(&self, stream: TcpStream) {
        let Ok(place) = Arc::clone(&self.places).try_acquire_owned() else {
            // Over webhooks.max_connections: close at once.
            self.metrics.webhook_connections_rejected.inc();
            return;
        };
        let webhooks = Arc::clone(&self.webhooks);
        let metrics = Arc::clone(&self.metrics);
        let builder = self.builder.clone();
        let (lifetime, stopping) = (self.lifetime, self.stopping.clone());
        let (handshake_timeout, body_timeout) = (self.handshake_timeout, self.body_read_timeout);
        let tls = self.tls.as_ref().map(|t| t.load_full());
        let peer = stream.peer_addr().ok().map(|a| a.ip());
        tokio::spawn(async move {
            let activity = Activity::new();
            let svc = tower::service_fn(move |req| {
                answer(Arc::clone(&webhooks), req, body_timeout, peer)
            });
            let svc = TowerToHyperService::new(Counted::new(svc, Arc::clone(&activity)));
            let closed = match tls {
                None => {
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    drive(conn, &activity, lifetime, stopping).await
                }
                Some(config) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    let handshake =
                        tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await;
                    let Ok(Ok(tls_stream)) = handshake else {
                        metrics.tls_handshake_failures.inc();
                        return;
                    };
                    let conn = builder.serve_connection(TokioIo::new(tls_stream), svc);
                    drive(conn, &activity, lifetime, stopping).await
                }
            };
            if let Some(reason) = closed {
                metrics
                    .connections_closed
                    .with_label_values(&["webhook", reason])
                    .inc();
            }
            drop(place);
        });
    }
}

/// [`deliver`] as a service that cannot fail.
async fn answer(
    webhooks: Arc<Webhooks>,
    req: Request<hyper::body::Incoming>,
    body_timeout: Duration,
    peer: Option<IpAddr>,
) -> Result<HttpResponse, Infallible> {
    Ok(deliver(&webhooks, req, body_timeout, peer).await)
}

/// One request on the webhook listener from `peer`, answered whatever happens.
pub async fn deliver<B>(
    webhooks: &Webhooks,
    req: Request<B>,
    body_timeout: Duration,
    peer: Option<IpAddr>,
) -> HttpResponse
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    match take(webhooks, req, body_timeout, peer).await {
        Ok(response) => response,
        Err(e) => error_response(Route::NotFound, &e),
    }
}

async fn take<B>(
    webhooks: &Webhooks,
    req: Request<B>,
    body_timeout: Duration,
    peer: Option<IpAddr>,
) -> Result<HttpResponse, BrokerError>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    if !webhooks.is_delivery_path(req.uri().path()) {
        return Err(WebhookError::NotFound.into());
    }
    if req.method() != Method::POST {
        return Err(RequestError::MethodNotAllowed { allow: "POST" }.into());
    }
    let query_event = req.uri().query().and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "event")
            .map(|(_, v)| v.into_owned())
    });
    let query_event = query_event.as_deref();
    let authorization = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    webhooks.authenticate(authorization, query_event, peer)?;
    let body = read_body(req, MAX_DELIVERY_BYTES, body_timeout)
        .await
        .inspect_err(|e| {
            let outcome = match e {
                RequestError::PayloadTooLarge { .. } => "too_large",
                _ => "error",
            };
            webhooks.refused(query_event, outcome, peer);
        })?;
    let taken = webhooks.take(&body, query_event, peer).await?;
    let outcome = if taken.event.ends_process() {
        "taken"
    } else {
        "ignored"
    };
    Ok(json_response(
        serde_json::json!({
            "outcome": outcome,
            "event": taken.event.label(),
            "invalidated": taken.invalidated,
        })
        .to_string(),
    ))
}
