//! The listeners: the caller listener (`server.listen`: TLS when configured, the connection
//! caps, hyper's HTTP/1.1 and HTTP/2 with their limits), the admin listener
//! (`server.admin_listen`, capped too) and, with `[webhooks]`, the webhook listener
//! ([`super::webhook`]), each accepting in a loop of its own, all drained on shutdown. A connection's life (idle limit, age, closing) is [`super::connection`]'s.
//!
//! Accepting can fail (out of file descriptors, above all): then that listener backs off, from
//! 10 ms doubling to 1 s, and says so in the log at most every 10 s, instead of retrying at once
//! with one core at 100 % and a line per try; the other listener goes on.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::admin::{admin, Admin};
use super::api::ApiState;
use super::connection::{drive, Activity, Counted, Lifetime};
use super::stack::caller_service;
use super::tls::SharedTls;
use super::webhook::{WebhookConnections, WebhookListener};
use crate::auth::Peer;
use crate::config::ServerConfig;
use crate::metrics::Metrics;

/// The longest pause between two failed accepts.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// The least time between two log lines about failed accepts.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

/// Why a listener could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({key}): {source}")]
pub struct BindError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// The config key that names it.
    pub key: &'static str,
    /// What the OS said.
    #[source]
    pub source: io::Error,
}

/// The connection-level settings of `[server]`.
#[derive(Debug, Clone)]
pub struct ConnectionSettings {
    shutdown_timeout: Duration,
    header_read_timeout: Duration,
    max_headers: usize,
    max_header_bytes: usize,
    max_connections: usize,
    max_connections_per_peer: Option<usize>,
    max_connection_age: Duration,
    admin_max_connections: usize,
    http2_max_streams: u32,
    body_read_timeout: Duration,
}

impl ConnectionSettings {
    /// The settings of `[server]`.
    pub fn of(config: &ServerConfig) -> Self {
        Self {
            shutdown_timeout: config.shutdown_timeout,
            header_read_timeout: config.header_read_timeout,
            max_headers: config.max_headers,
            max_header_bytes: config.max_header_bytes,
            max_connections: config.max_connections,
            max_connections_per_peer: config.max_connections_per_peer,
            max_connection_age: config.max_connection_age,
            admin_max_connections: config.admin_max_connections,
            http2_max_streams: config.http2_max_streams,
            body_read_timeout: config.body_read_timeout,
        }
    }

    fn lifetime(&self) -> Lifetime {
        Lifetime {
            idle: self.header_read_timeout,
            max_age: self.max_connection_age,
        }
    }

    /// hyper's HTTP/1.1 and HTTP/2 server, with the limits of `[server]`.
    fn builder(&self) -> auto::Builder<TokioExecutor> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            .max_headers(self.max_headers)
            .max_buf_size(self.max_header_bytes);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.http2_max_streams)
            // Bounds on the HTTP/2 reset floods (CVE-2023-44487 "rapid reset" and the like).
            .max_pending_accept_reset_streams(Some(32))
            .max_local_error_reset_streams(Some(256))
            .max_header_list_size(self.max_header_bytes as u32)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(10));
        builder
    }
}

/// The listeners, bound; nothing is served until [`Listeners::run`].
pub struct Listeners {
    caller: TcpListener,
    admin: TcpListener,
    webhook: Option<WebhookListener>,
    /// The bound addresses (the ports chosen when port 0 was asked for).
    addrs: (SocketAddr, SocketAddr),
    settings: ConnectionSettings,
    tls: Option<SharedTls>,
}

impl Listeners {
    /// Binds `server.listen` and `server.admin_listen`, serving TLS from `tls` when given.
    pub async fn bind(config: &ServerConfig, tls: Option<SharedTls>) -> Result<Self, BindError> {
        let bind = |addr: SocketAddr, key: &'static str| async move {
            let fail = |source| BindError { addr, key, source };
            let listener = TcpListener::bind(addr).await.map_err(fail)?;
            let bound = listener.local_addr().map_err(fail)?;
            Ok::<_, BindError>((listener, bound))
        };
        let (caller, caller_addr) = bind(config.listen, "server.listen").await?;
        let (admin, admin_addr) = bind(config.admin_listen, "server.admin_listen").await?;
        Ok(Self {
            caller,
            admin,
            webhook: None,
            addrs: (caller_addr, admin_addr),
            settings: ConnectionSettings::of(config),
            tls,
        })
    }

    /// Serves Truora's deliveries on `webhook` too.
    pub fn add_webhooks(&mut self, webhook: WebhookListener) {
        self.webhook = Some(webhook);
    }

    /// The webhook listener's address, with `[webhooks]`.
    pub fn webhook_addr(&self) -> Option<SocketAddr> {
        self.webhook.as_ref().map(WebhookListener::addr)
    }

    /// The caller listener's address (useful with port 0).
    pub fn caller_addr(&self) -> SocketAddr {
        self.addrs.0
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.addrs.1
    }

    /// File descriptors the configured caps can take at once: every caller and admin
    /// connection, and room for the rest (outbound pools, Redis, files, logs).
    pub fn descriptors_needed(config: &ServerConfig) -> u64 {
        (config.max_connections + config.admin_max_connections + 256) as u64
    }

    /// Serves until `shutdown` completes, then stops accepting, closes idle connections and
    /// lets requests in progress finish for at most `server.shutdown_timeout`.
    pub async fn run(
        self,
        state: Arc<ApiState>,
        admin_state: Arc<Admin>,
        shutdown: impl Future<Output = ()>,
    ) {
        let s = &self.settings;
        let (stop, stopping) = watch::channel(false);
        let caller_places = Arc::new(Semaphore::new(s.max_connections));
        let admin_places = Arc::new(Semaphore::new(s.admin_max_connections));
        let caller = CallerListener {
            state,
            tls: self.tls.clone(),
            builder: s.builder(),
            lifetime: s.lifetime(),
            handshake_timeout: s.header_read_timeout,
            places: Arc::clone(&caller_places),
            per_peer: s.max_connections_per_peer.map(PeerCounts::new),
            stopping: stopping.clone(),
        };
        let admin = AdminListener {
            admin: admin_state,
            builder: s.builder(),
            lifetime: s.lifetime(),
            places: Arc::clone(&admin_places),
            stopping: stopping.clone(),
        };
        let metrics = Arc::clone(&caller.state.metrics);
        let webhook_places = Arc::new(Semaphore::new(
            self.webhook.as_ref().map_or(0, |w| w.max_connections),
        ));
        let webhook = self.webhook.as_ref().map(|w| WebhookConnections {
            webhooks: Arc::clone(&w.webhooks),
            metrics: Arc::clone(&metrics),
            tls: w.tls.clone(),
            builder: s.builder(),
            lifetime: s.lifetime(),
            handshake_timeout: s.header_read_timeout,
            body_read_timeout: s.body_read_timeout,
            places: Arc::clone(&webhook_places),
            stopping: stopping.clone(),
        });
        let accepting_webhooks = async {
            if let (Some(w), Some(connections)) = (&self.webhook, &webhook) {
                accept_loop(
                    &w.listener,
                    "webhook",
                    &metrics,
                    stopping.clone(),
                    |stream, _| connections.serve(stream),
                )
                .await;
            }
        };
        let accepting = async {
            tokio::join!(
                accept_loop(
                    &self.caller,
                    "caller",
                    &metrics,
                    stopping.clone(),
                    |stream, addr| { caller.serve(stream, addr) }
                ),
                accept_loop(
                    &self.admin,
                    "admin",
                    &metrics,
                    stopping.clone(),
                    |stream, _| { admin.serve(stream) }
                ),
                accepting_webhooks,
            )
        };
        {
            tokio::pin!(accepting);
            tokio::select! {
                _ = &mut accepting => {}
                () = shutdown => {}
            }
            let _ = stop.send(true);
            // The accept loops end at once on `stop`.
            accepting.await;
        }
        drop(self.caller);
        drop(self.admin);
        let webhook_max = self.webhook.as_ref().map_or(0, |w| w.max_connections);
        drop(self.webhook);
        tracing::info!("shutting down: no new connections, waiting for in-flight requests");
        let drained = async {
            let all = |places: &Arc<Semaphore>, n: usize| {
                let places = Arc::clone(places);
                async move { places.acquire_many_owned(n as u32).await.map(drop) }
            };
            let _ = tokio::join!(
                all(&caller_places, s.max_connections),
                all(&admin_places, s.admin_max_connections),
                all(&webhook_places, webhook_max),
            );
        };
        if tokio::time::timeout(s.shutdown_timeout, drained)
            .await
            .is_err()
        {
            tracing::warn!(
                "in-flight requests still running after server.shutdown_timeout; exiting anyway"
            );
        }
    }
}

/// Accepts on `listener` until `stopping`, handing each connection to `serve`; backs off after
/// a failed accept and logs failures at most every [`ACCEPT_LOG_EVERY`].
async fn accept_loop(
    listener: &TcpListener,
    name: &'static str,
    metrics: &Metrics,
    mut stopping: watch::Receiver<bool>,
    serve: impl Fn(TcpStream, SocketAddr),
) {
    let mut backoff = Duration::ZERO;
    let mut last_logged: Option<tokio::time::Instant> = None;
    let mut suppressed = 0u64;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, addr)) => {
                    backoff = Duration::ZERO;
                    let _ = stream.set_nodelay(true);
                    serve(stream, addr);
                }
                Err(e) => {
                    metrics.accept_errors.with_label_values(&[name]).inc();
                    let now = tokio::time::Instant::now();
                    if last_logged.is_none_or(|t| now - t >= ACCEPT_LOG_EVERY) {
                        tracing::warn!(
                            listener = name,
                            suppressed,
                            "accept failed: {e}; backing off (more in token_broker_server_accept_errors_total)"
                        );
                        last_logged = Some(now);
                        suppressed = 0;
                    } else {
                        suppressed += 1;
                    }
                    backoff = (backoff * 2).clamp(Duration::from_millis(10), MAX_ACCEPT_BACKOFF);
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = stopping.changed() => return,
                    }
                }
            },
            _ = stopping.changed() => return,
        }
    }
}

/// What the caller listener needs for each connection.
struct CallerListener {
    state: Arc<ApiState>,
    tls: Option<SharedTls>,
    builder: auto::Builder<TokioExecutor>,
    lifetime: Lifetime,
    handshake_timeout: Duration,
    places: Arc<Semaphore>,
    per_peer: Option<PeerCounts>,
    stopping: watch::Receiver<bool>,
}

impl CallerListener {
    /// Takes a place for the connection (or closes it at once) and serves it in its own task.
    fn serve(&self, stream: TcpStream, addr: SocketAddr) {
        let metrics = &self.state.metrics;
        let Ok(place) = Arc::clone(&self.places).try_acquire_owned() else {
            // Over server.max_connections: close at once rather than let clients pile up.
            metrics.connections_rejected.inc();
            return;
        };
        let peer_place = match &self.per_peer {
            None => None,
            Some(counts) => match counts.enter(addr.ip()) {
                Some(p) => Some(p),
                None => {
                    metrics.connections_rejected.inc();
                    return;
                }
            },
        };
        let open = OpenConnection::new(metrics, place, peer_place);
        let state = Arc::clone(&self.state);
        let builder = self.builder.clone();
        let lifetime = self.lifetime;
        let stopping = self.stopping.clone();
        match &self.tls {
            None => {
                tokio::spawn(async move {
                    let peer = Peer {
                        certificate: None,
                        addr: Some(addr),
                    };
                    serve_caller(
                        builder,
                        TokioIo::new(stream),
                        state,
                        peer,
                        lifetime,
                        stopping,
                    )
                    .await;
                    drop(open);
                });
            }
            Some(tls) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.load_full());
                let handshake_timeout = self.handshake_timeout;
                tokio::spawn(async move {
                    let handshake =
                        tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await;
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
                    let peer = Peer {
                        certificate,
                        addr: Some(addr),
                    };
                    serve_caller(
                        builder,
                        TokioIo::new(tls_stream),
                        state,
                        peer,
                        lifetime,
                        stopping,
                    )
                    .await;
                    drop(open);
                });
            }
        }
    }
}

/// Serves one caller connection (after its TLS handshake, if any) to its end.
async fn serve_caller<I>(
    builder: auto::Builder<TokioExecutor>,
    io: TokioIo<I>,
    state: Arc<ApiState>,
    peer: Peer,
    lifetime: Lifetime,
    stopping: watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let activity = Activity::new();
    let metrics = Arc::clone(&state.metrics);
    let svc = Counted::new(caller_service(state, Arc::new(peer)), Arc::clone(&activity));
    let conn = builder.serve_connection(io, TowerToHyperService::new(svc));
    if let Some(reason) = drive(conn, &activity, lifetime, stopping).await {
        metrics
            .connections_closed
            .with_label_values(&["caller", reason])
            .inc();
    }
}

/// What the admin listener needs for each connection.
struct AdminListener {
    admin: Arc<Admin>,
    builder: auto::Builder<TokioExecutor>,
    lifetime: Lifetime,
    places: Arc<Semaphore>,
    stopping: watch::Receiver<bool>,
}

impl AdminListener {
    fn serve(&self, stream: TcpStream) {
        let metrics = Arc::clone(&self.admin.state().metrics);
        let Ok(place) = Arc::clone(&self.places).try_acquire_owned() else {
            metrics.admin_connections_rejected.inc();
            return;
        };
        let state = Arc::clone(&self.admin);
        let builder = self.builder.clone();
        let lifetime = self.lifetime;
        let stopping = self.stopping.clone();
        tokio::spawn(async move {
            let activity = Activity::new();
            let svc = tower::service_fn(move |req| admin(Arc::clone(&state), req));
            let svc = Counted::new(svc, Arc::clone(&activity));
            let conn =
                builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
            if let Some(reason) = drive(conn, &activity, lifetime, stopping).await {
                metrics
                    .connections_closed
                    .with_label_values(&["admin", reason])
                    .inc();
            }
            drop(place);
        });
    }
}

/// Open caller connections per address, for `server.max_connections_per_peer`.
#[derive(Clone)]
struct PeerCounts {
    cap: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PeerCounts {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            open: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// A place for one more connection from `ip`, or `None` at the cap.
    fn enter(&self, ip: IpAddr) -> Option<PeerPlace> {
        let mut open = lock(&self.open);
        let n = open.entry(ip).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(PeerPlace {
            counts: self.clone(),
            ip,
        })
    }
}

/// One connection's place under its address's cap, until dropped.
struct PeerPlace {
    counts: PeerCounts,
    ip: IpAddr,
}

impl Drop for PeerPlace {
    fn drop(&mut self) {
        let mut open = lock(&self.counts.open);
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A count is updated in one step: a panic elsewhere cannot leave it half-made.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Counts an open caller connection for as long as it lives, holding its places under
/// `server.max_connections` and `server.max_connections_per_peer`.
struct OpenConnection {
    metrics: Arc<Metrics>,
    _place: OwnedSemaphorePermit,
    _peer_place: Option<PeerPlace>,
}

impl OpenConnection {
    fn new(metrics: &Arc<Metrics>, place: OwnedSemaphorePermit, peer: Option<PeerPlace>) -> Self {
        metrics.connections_open.inc();
        Self {
            metrics: Arc::clone(metrics),
            _place: place,
            _peer_place: peer,
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.metrics.connections_open.dec();
    }
}
