//! `[server]`: the caller and admin listeners, their limits, and TLS on the caller listener.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};

/// `[server]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the caller API (`POST /v1/tokens`, `POST /v1/api-keys`, `DELETE /v1/tokens`).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Address of the admin endpoints (the status page `/`, `/metrics`, `/healthz`, `/readyz`,
    /// `POST /admin/reload`); never the token API.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// Largest request body accepted, in bytes; larger bodies get 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// How long in-flight requests may run after SIGTERM or Ctrl-C before the broker exits anyway.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// How long a client may take to send a request's head, and the longest a connection may
    /// go with no request in progress (from its first byte on, between requests, HTTP/1 and
    /// HTTP/2 alike); past it the connection is closed.
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// How long a client may take to send a request's body once its head is in; past it, 408.
    #[serde(default = "default_body_read_timeout", with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Most headers in one request; more get 431.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// Largest request head (request line and headers) in bytes; larger gets 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Most open connections on the caller listener; beyond it new connections are closed at
    /// once (counted in `token_broker_server_connections_rejected_total`).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Most open caller connections from one IP address; beyond it that address's new
    /// connections are closed at once. Absent: no cap per address (the right choice behind a
    /// load balancer or a mesh sidecar, where every caller comes from a few addresses).
    #[serde(default)]
    pub max_connections_per_peer: Option<usize>,
    /// The longest a connection may live; then it is closed gracefully (what is in progress
    /// finishes; HTTP/2 says GOAWAY), so that clients reconnect and spread over replicas.
    #[serde(default = "default_max_connection_age", with = "humantime_serde")]
    pub max_connection_age: Duration,
    /// Most open connections on the admin listener; beyond it new ones are closed at once.
    #[serde(default = "default_admin_max_connections")]
    pub admin_max_connections: usize,
    /// Most concurrent HTTP/2 streams per connection.
    #[serde(default = "default_http2_max_streams")]
    pub http2_max_streams: u32,
    /// TLS on the caller listener. Absent: plain HTTP (behind a trusted network only).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Watch every file a secret or certificate is read from (through its directory, so a
    /// Kubernetes Secret's `..data` swap is seen too) and reload, as SIGHUP does, once a changed
    /// file has been quiet for a moment. A change that is not valid keeps what runs, and says
    /// why; a file only a restart reads (the Redis ones) is reported as needing one.
    #[serde(default = "default_watch_files")]
    pub watch_files: bool,
}

/// `[server.tls]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the listener's certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM file with the listener's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM file with the CA certificates that sign callers' client certificates. Present: client
    /// certificates are checked, and callers with `tls_san` are identified by them.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}
fn default_max_body_bytes() -> usize {
    16 * 1024
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_body_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_headers() -> usize {
    64
}
fn default_max_header_bytes() -> usize {
    16 * 1024
}
fn default_max_connections() -> usize {
    10_000
}
fn default_max_connection_age() -> Duration {
    Duration::from_secs(60 * 60)
}
fn default_admin_max_connections() -> usize {
    64
}
fn default_http2_max_streams() -> u32 {
    128
}
fn default_watch_files() -> bool {
    true
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            admin_listen: default_admin_listen(),
            max_body_bytes: default_max_body_bytes(),
            shutdown_timeout: default_shutdown_timeout(),
            header_read_timeout: default_header_read_timeout(),
            body_read_timeout: default_body_read_timeout(),
            max_headers: default_max_headers(),
            max_header_bytes: default_max_header_bytes(),
            max_connections: default_max_connections(),
            max_connections_per_peer: None,
            max_connection_age: default_max_connection_age(),
            admin_max_connections: default_admin_max_connections(),
            http2_max_streams: default_http2_max_streams(),
            tls: None,
            watch_files: default_watch_files(),
        }
    }
}

impl ServerConfig {
    /// Checks the section's own rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = self;
        if s.listen == s.admin_listen && s.listen.port() != 0 {
            return Err(invalid(
                "server.admin_listen",
                "must differ from server.listen: the admin endpoints never share the token API's port",
            ));
        }
        if !(256..=1024 * 1024).contains(&s.max_body_bytes) {
            return Err(invalid(
                "server.max_body_bytes",
                "must be between 256 and 1048576",
            ));
        }
        if s.shutdown_timeout > Duration::from_secs(300) {
            return Err(invalid("server.shutdown_timeout", "must be at most 5m"));
        }
        for (key, d) in [
            ("server.header_read_timeout", s.header_read_timeout),
            ("server.body_read_timeout", s.body_read_timeout),
        ] {
            if d.is_zero() || d > Duration::from_secs(300) {
                return Err(invalid(key, "must be more than 0s and at most 5m"));
            }
        }
        if !(8..=1024).contains(&s.max_headers) {
            return Err(invalid("server.max_headers", "must be between 8 and 1024"));
        }
        if !(8192..=1024 * 1024).contains(&s.max_header_bytes) {
            return Err(invalid(
                "server.max_header_bytes",
                "must be between 8192 and 1048576",
            ));
        }
        if s.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be at least 1"));
        }
        if s.max_connections_per_peer == Some(0) {
            return Err(invalid(
                "server.max_connections_per_peer",
                "must be at least 1 (leave it out for no cap per address)",
            ));
        }
        if s.max_connection_age < Duration::from_secs(1)
            || s.max_connection_age > Duration::from_secs(7 * 24 * 3600)
        {
            return Err(invalid(
                "server.max_connection_age",
                "must be at least 1s and at most 7 days",
            ));
        }
        if !(1..=10_000).contains(&s.admin_max_connections) {
            return Err(invalid(
                "server.admin_max_connections",
                "must be between 1 and 10000",
            ));
        }
        if !(1..=10_000).contains(&s.http2_max_streams) {
            return Err(invalid(
                "server.http2_max_streams",
                "must be between 1 and 10000",
            ));
        }
        if let Some(tls) = &s.tls {
            for (key, path) in [
                ("server.tls.cert_file", Some(&tls.cert_file)),
                ("server.tls.key_file", Some(&tls.key_file)),
                ("server.tls.client_ca_file", tls.client_ca_file.as_ref()),
            ] {
                if let Some(path) = path {
                    if let Err(e) = std::fs::metadata(path) {
                        return Err(invalid(key, format!("cannot read {}: {e}", path.display())));
                    }
                }
            }
        }
        Ok(())
    }

    /// True when client certificates are checked (`server.tls.client_ca_file` is set).
    pub fn checks_client_certificates(&self) -> bool {
        self.tls
            .as_ref()
            .is_some_and(|t| t.client_ca_file.is_some())
    }
}
