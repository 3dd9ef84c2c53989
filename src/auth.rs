//! Who is calling: the tower layer that turns `Authorization: Bearer <secret>` into a configured
//! [`Client`], or fails with a typed [`AuthError`] before the body is read or anything is minted.
//!
//! Secrets are digested with SHA-256 and compared, in constant time, against every configured
//! digest (no early exit), so neither the secret nor which caller matched leaks through timing.
//! A request carrying Truora's own `Truora-API-Key` header is refused outright: callers never hold
//! the master key, and a drop-in client that still sends it has not been migrated.

use std::future::{Future, Ready};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

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

    /// The caller whose secret is presented in `headers`.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<&Client, AuthError> {
        let value = headers.get(AUTHORIZATION).ok_or(AuthError::Missing)?;
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
            if client.digest.ct_eq(&presented) {
                found = Some(client);
            }
        }
        found.ok_or(AuthError::Unknown)
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
}

/// Authenticates every caller request; see the module docs.
#[derive(Clone)]
pub struct AuthLayer {
    clients: Clients,
    metrics: Arc<Metrics>,
}

impl AuthLayer {
    /// A layer accepting `clients`.
    pub fn new(clients: Clients, metrics: Arc<Metrics>) -> Self {
        Self { clients, metrics }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            clients: self.clients.clone(),
            metrics: Arc::clone(&self.metrics),
        }
    }
}

/// The service [`AuthLayer`] builds.
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    clients: Clients,
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
        match self.clients.authenticate(req.headers()) {
            Ok(client) => {
                let caller = client.clone();
                AuthFuture::Authed(self.inner.call(Authed { route, caller, req }))
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
            Client {
                id: "a".into(),
                digest: SecretDigest::of(b"secret-a"),
            },
            Client {
                id: "b".into(),
                digest: SecretDigest::of(b"secret-b"),
            },
        ])
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
            &*c.authenticate(&headers("Bearer secret-b")).unwrap().id,
            "b"
        );
        assert_eq!(
            &*c.authenticate(&headers("bearer secret-a")).unwrap().id,
            "a"
        );
    }

    #[test]
    fn missing_malformed_and_unknown_credentials_are_told_apart() {
        let c = clients();
        assert_eq!(
            c.authenticate(&HeaderMap::new()).unwrap_err(),
            AuthError::Missing
        );
        for bad in ["Basic abc", "Bearer", "Bearer ", "secret-a", "Bearer a b"] {
            assert_eq!(
                c.authenticate(&headers(bad)).unwrap_err(),
                AuthError::Malformed,
                "{bad}"
            );
        }
        assert_eq!(
            c.authenticate(&headers("Bearer secret-c")).unwrap_err(),
            AuthError::Unknown
        );
    }
}
