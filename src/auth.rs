//! Who is calling: the tower layer that turns `Authorization: Bearer <secret>` and/or the
//! connection's client certificate into a configured [`Client`], or fails with a typed
//! [`AuthError`] before the body is read or anything is minted.
//!
//! Per caller: a `token_sha256` alone means the bearer secret suffices; a `tls_san` alone means
//! a client certificate valid for that DNS name suffices (checked with webpki's name matching,
//! the chain having been verified against `server.tls.client_ca_file` during the handshake);
//! both mean both are required.
//!
//! Secrets are digested with SHA-256 and compared, in constant time, against every configured
//! digest (no early exit), so neither the secret nor which caller matched leaks through timing.
//! A request carrying Truora's own `Truora-API-Key` header is refused outright: callers never hold
//! the master key, and a drop-in client that still sends it has not been migrated.
//!
//! The set of callers is read once per request from a swappable snapshot, so a reload
//! (revoking a caller, say) applies to the next request while in-flight ones finish as they began.

use std::future::{Future, Ready};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use http::header::AUTHORIZATION;
use http::{HeaderMap, Request};
use tower::{Layer, Service};

use crate::config::Client;
use crate::error::{AuthError, BrokerError, RequestError};
use crate::metrics::Metrics;
use crate::secret::SecretDigest;
use crate::server::{Route, Routed};
use crate::upstream::API_KEY_HEADER;

/// The configured callers.
#[derive(Debug, Clone)]
pub struct Clients {
    list: Arc<[Client]>,
}

impl Clients {
    /// The callers from the config file.
    pub fn new(list: Vec<Client>) -> Self {
        Self { list: list.into() }
    }

    /// How many callers are configured.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// True when no caller is configured.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The callers, for the reload that replaces them.
    pub fn iter(&self) -> impl Iterator<Item = &Client> {
        self.list.iter()
    }

    /// The caller presenting the secret in `headers` and/or the certificate of `peer`.
    pub fn authenticate(&self, headers: &HeaderMap, peer: &Peer) -> Result<&Client, AuthError> {
        let Some(value) = headers.get(AUTHORIZATION) else {
            return self.by_certificate(peer);
        };
        let value = value.as_bytes();
        let secret = match value.iter().position(|b| *b == b' ') {
            Some(i) if value[..i].eq_ignore_ascii_case(b"bearer") => &value[i + 1..],
            _ => return Err(AuthError::Malformed),
        };
        if secret.is_empty() || secret.iter().any(|b| b.is_ascii_whitespace()) {
            return Err(AuthError::Malformed);
        }
        let presented = SecretDigest::of(secret);
        let mut found = None;
        for client in self.list.iter() {
            if client.digest.is_some_and(|d| d.ct_eq(&presented)) {
                found = Some(client);
            }
        }
        let client = found.ok_or(AuthError::Unknown)?;
        match &client.tls_san {
            Some(san) if !peer.certificate_valid_for(san) => Err(AuthError::CertificateRequired),
            _ => Ok(client),
        }
    }

    /// Without a bearer secret: the one certificate-only caller the peer's certificate is for.
    fn by_certificate(&self, peer: &Peer) -> Result<&Client, AuthError> {
        if peer.certificate.is_none() {
            return Err(AuthError::Missing);
        }
        let mut matching = self.list.iter().filter(|c| {
            c.digest.is_none()
                && c.tls_san
                    .as_deref()
                    .is_some_and(|san| peer.certificate_valid_for(san))
        });
        match (matching.next(), matching.next()) {
            (Some(client), None) => Ok(client),
            (None, _) => Err(AuthError::Unknown),
            // A certificate valid for several callers (a wildcard, say) names none of them.
            (Some(_), Some(_)) => Err(AuthError::Unknown),
        }
    }
}

/// What the connection tells about the peer: its address, and its verified client
/// certificate if it sent one.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    /// The end-entity certificate, its chain already verified by rustls against the client CA.
    pub certificate: Option<Arc<rustls_pki_types::CertificateDer<'static>>>,
    /// The TCP peer's address (for X-Forwarded-For on pass-through).
    pub addr: Option<std::net::SocketAddr>,
}

impl Peer {
    /// True when the peer's certificate is valid for the DNS name `san`.
    pub fn certificate_valid_for(&self, san: &str) -> bool {
        let Some(der) = &self.certificate else {
            return false;
        };
        let Ok(cert) = webpki::EndEntityCert::try_from(der.as_ref()) else {
            return false;
        };
        let Ok(name) = rustls_pki_types::ServerName::try_from(san) else {
            return false;
        };
        cert.verify_is_valid_for_subject_name(&name).is_ok()
    }
}

/// A request whose caller is known.
pub struct Authed<B> {
    /// The endpoint, from [`Route::of`].
    pub route: Route,
    /// The authenticated caller.
    pub caller: Client,
    /// The request, body unread.
    pub req: Request<B>,
    /// The caller's IP address, when the connection has one.
    pub peer_ip: Option<std::net::IpAddr>,
}

/// The callers as of the last (re)load, swapped whole by a reload.
pub type SharedClients = Arc<ArcSwap<Clients>>;

/// Authenticates every caller request; see the module docs.
#[derive(Clone)]
pub struct AuthLayer {
    clients: SharedClients,
    peer: Arc<Peer>,
    metrics: Arc<Metrics>,
}

impl AuthLayer {
    /// A layer for one connection from `peer`, accepting the current `clients`.
    pub fn new(clients: SharedClients, peer: Arc<Peer>, metrics: Arc<Metrics>) -> Self {
        Self {
            clients,
            peer,
            metrics,
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            clients: Arc::clone(&self.clients),
            peer: Arc::clone(&self.peer),
            metrics: Arc::clone(&self.metrics),
        }
    }
}

/// The service [`AuthLayer`] builds.
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    clients: SharedClients,
    peer: Arc<Peer>,
    metrics: Arc<Metrics>,
}

impl<S, B> Service<Routed<B>> for AuthService<S>
where
    S: Service<Authed<B>, Error = BrokerError>,
    S::Future: Unpin,
{
    type Response = S::Response;
    type Error = BrokerError;
    type Future = AuthFuture<S::Future, S::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, routed: Routed<B>) -> Self::Future {
        let Routed { route, req } = routed;
        if req.headers().contains_key(API_KEY_HEADER) {
            return AuthFuture::Refused(std::future::ready(Err(
                RequestError::MasterKeyHeader.into()
            )));
        }
        let clients = self.clients.load();
        match clients.authenticate(req.headers(), &self.peer) {
            Ok(client) => {
                // The access line and per-caller series name the caller from here on, even
                // when a later step refuses the request.
                crate::access::note_caller(self.metrics.caller_slot(&client.id));
                let caller = client.clone();
                let peer_ip = self.peer.addr.map(|a| a.ip());
                AuthFuture::Authed(self.inner.call(Authed {
                    route,
                    caller,
                    req,
                    peer_ip,
                }))
            }
            Err(e) => {
                self.metrics
                    .auth_failures
                    .with_label_values(&[e.reason()])
                    .inc();
                AuthFuture::Refused(std::future::ready(Err(e.into())))
            }
        }
    }
}

/// The future of [`AuthService`]: the inner service's, or a refusal ready at once. Named rather
/// than boxed, so an authenticated request costs no allocation here.
pub enum AuthFuture<F, R> {
    /// Refused before the inner service was called.
    Refused(Ready<Result<R, BrokerError>>),
    /// The inner service's answer.
    Authed(F),
}

impl<F, R> Future for AuthFuture<F, R>
where
    F: Future<Output = Result<R, BrokerError>> + Unpin,
{
    type Output = Result<R, BrokerError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            AuthFuture::Refused(ready) => Pin::new(ready).poll(cx),
            AuthFuture::Authed(inner) => Pin::new(inner).poll(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn clients() -> Clients {
        Clients::new(vec![
            Client::with_secret("a", b"secret-a"),
            Client::with_secret("b", b"secret-b"),
        ])
    }

    fn no_cert() -> Peer {
        Peer::default()
    }

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        h
    }

    #[test]
    fn the_right_secret_names_its_caller() {
        let c = clients();
        assert_eq!(
            &*c.authenticate(&headers("Bearer secret-b"), &no_cert())
                .unwrap()
                .id,
            "b"
        );
        assert_eq!(
            &*c.authenticate(&headers("bearer secret-a"), &no_cert())
                .unwrap()
                .id,
            "a"
        );
    }

    #[test]
    fn missing_malformed_and_unknown_credentials_are_told_apart() {
        let c = clients();
        assert_eq!(
            c.authenticate(&HeaderMap::new(), &no_cert()).unwrap_err(),
            AuthError::Missing
        );
        for bad in ["Basic abc", "Bearer", "Bearer ", "secret-a", "Bearer a b"] {
            assert_eq!(
                c.authenticate(&headers(bad), &no_cert()).unwrap_err(),
                AuthError::Malformed,
                "{bad}"
            );
        }
        assert_eq!(
            c.authenticate(&headers("Bearer secret-c"), &no_cert())
                .unwrap_err(),
            AuthError::Unknown
        );
    }
}
