//! The two listeners and their connections: the caller listener (`server.listen`: TLS when
//! configured, the connection cap, hyper's HTTP/1.1 and HTTP/2 with their limits) and the admin
//! listener (`server.admin_listen`), both drained gracefully on shutdown.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use super::admin::{admin, Admin};
use super::api::ApiState;
use super::stack::caller_service;
use super::tls::SharedTls;
use crate::auth::Peer;
use crate::config::ServerConfig;
use crate::metrics::Metrics;

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
    http2_max_streams: u32,
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
            http2_max_streams: config.http2_max_streams,
        }
    }
}

/// Both listeners, bound; nothing is served until [`Listeners::run`].
pub struct Listeners {
    caller: TcpListener,
    admin: TcpListener,
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
            addrs: (caller_addr, admin_addr),
            settings: ConnectionSettings::of(config),
            tls,
        })
    }

    /// The caller listener's address (useful with port 0).
    pub fn caller_addr(&self) -> SocketAddr {
        self.addrs.0
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.addrs.1
    }

    /// Serves until `shutdown` completes, then stops accepting and lets in-flight requests
    /// finish for at most `server.shutdown_timeout`.
    pub async fn run(
        self,
        state: Arc<ApiState>,
        admin_state: Arc<Admin>,
        shutdown: impl Future<Output = ()>,
    ) {
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
        let admin = tower::service_fn(move |req| admin(Arc::clone(&admin_state), req));

        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = self.caller.accept() => {
                    let Some((stream, addr)) = accepted_stream(accepted) else { continue };
                    let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
                        // Over server.max_connections: close at once rather than let slow or
                        // idle clients pile up.
                        state.metrics.connections_rejected.inc();
                        continue;
                    };
                    let open = OpenConnection::new(&state.metrics, permit);
                    let state = Arc::clone(&state);
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
