//! Who is calling: the tower layer that turns `Authorization: Bearer <secret or token>` and/or
//! the connection's client certificate into a configured [`Caller`] ([`callers`]), or fails
//! with a typed [`AuthError`](crate::error::AuthError) before the body is read or anything is
//! minted. Kubernetes service-account tokens are verified by [`kubernetes`] against the keys
//! [`jwks`] reads or fetches; SPIFFE IDs are read from the certificate by [`Peer`].
//!
//! A request carrying Truora's own `Truora-API-Key` header is refused outright: callers never
//! hold the master key, and a drop-in client that still sends it has not been migrated.
//!
//! The set of callers is read once per request from a swappable snapshot, so a reload
//! (revoking a caller, say) applies to the next request while in-flight ones finish as they
//! began. The caller's metrics slot goes back up with the answer or the failure, so the access
//! line and the per-caller series name it even when a later step refuses the request.

use std::future::{Future, Ready};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use http::header::HeaderValue;
use http::Request;
use tower::{Layer, Service};

use crate::audit::Audit;
use crate::error::RequestError;
use crate::metrics::Metrics;
use crate::truora::API_KEY_HEADER;
use crate::wire::{Answer, Failure, Route, Routed};

pub mod callers;
pub mod jwks;
pub mod kubernetes;

pub use callers::{Caller, Callers, KnownToken, Peer};
pub use jwks::{JwksError, JwksSource, KeySet, Refresher};
pub use kubernetes::ServiceAccounts;

/// A request whose caller is known.
pub struct Authed<B> {
    /// The endpoint, from [`Route::of`].
    pub route: Route,
    /// The authenticated caller.
    pub caller: Arc<Caller>,
    /// The request, body unread.
    pub req: Request<B>,
    /// The caller's IP address, when the connection has one.
    pub peer_ip: Option<std::net::IpAddr>,
    /// The request id, for the audit trail.
    pub request_id: HeaderValue,
}

/// The callers as of the last (re)load, swapped whole by a reload.
pub type SharedCallers = Arc<ArcSwap<Callers>>;

/// Authenticates every caller request; see the module docs.
#[derive(Clone)]
pub struct AuthLayer {
    callers: SharedCallers,
    peer: Arc<Peer>,
    metrics: Arc<Metrics>,
    audit: Arc<Audit>,
}

impl AuthLayer {
    /// A layer for one connection from `peer`, accepting the current `callers`; a peer that
    /// fails again and again is recorded in `audit`.
    pub fn new(
        callers: SharedCallers,
        peer: Arc<Peer>,
        metrics: Arc<Metrics>,
        audit: Arc<Audit>,
    ) -> Self {
        Self {
            callers,
            peer,
            metrics,
            audit,
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            callers: Arc::clone(&self.callers),
            peer: Arc::clone(&self.peer),
            metrics: Arc::clone(&self.metrics),
            audit: Arc::clone(&self.audit),
            known: KnownToken::default(),
        }
    }
}

/// The service [`AuthLayer`] builds.
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    callers: SharedCallers,
    peer: Arc<Peer>,
    metrics: Arc<Metrics>,
    audit: Arc<Audit>,
    /// The service-account token this connection last proved itself with.
    known: KnownToken,
}

impl<S, B> Service<Routed<B>> for AuthService<S>
where
    S: Service<Authed<B>, Response = Answer, Error = Failure>,
    S::Future: Unpin,
{
    type Response = Answer;
    type Error = Failure;
    type Future = AuthFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, routed: Routed<B>) -> Self::Future {
        let Routed {
            route,
            req,
            request_id,
        } = routed;
        if req.headers().contains_key(API_KEY_HEADER) {
            return AuthFuture::Refused(std::future::ready(Err(
                RequestError::MasterKeyHeader.into()
            )));
        }
        let callers = self.callers.load();
        match Callers::authenticate_on(&callers, req.headers(), &self.peer, &mut self.known) {
            Ok(caller) => {
                let slot = self.metrics.caller_slot(&caller.id);
                let caller = Arc::clone(caller);
                let peer_ip = self.peer.addr.map(|a| a.ip());
                AuthFuture::Authed {
                    inner: self.inner.call(Authed {
                        route,
                        caller,
                        req,
                        peer_ip,
                        request_id,
                    }),
                    slot,
                }
            }
            Err(e) => {
                self.metrics
                    .auth_failures
                    .with_label_values(&[e.reason()])
                    .inc();
                self.audit
                    .auth_failure(self.peer.addr.map(|a| a.ip()), e.reason());
                AuthFuture::Refused(std::future::ready(Err(e.into())))
            }
        }
    }
}

/// The future of [`AuthService`]: the inner service's, its note naming the caller, or a refusal
/// ready at once. Named rather than boxed, so an authenticated request costs no allocation here.
pub enum AuthFuture<F> {
    /// Refused before the inner service was called.
    Refused(Ready<Result<Answer, Failure>>),
    /// The inner service's answer, for the caller in metrics slot `slot`.
    Authed { inner: F, slot: usize },
}

impl<F> Future for AuthFuture<F>
where
    F: Future<Output = Result<Answer, Failure>> + Unpin,
{
    type Output = Result<Answer, Failure>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            AuthFuture::Refused(ready) => Pin::new(ready).poll(cx),
            AuthFuture::Authed { inner, slot } => {
                let mut done = std::task::ready!(Pin::new(inner).poll(cx));
                match &mut done {
                    Ok(answer) => answer.note.caller = Some(*slot),
                    Err(failure) => failure.note.caller = Some(*slot),
                }
                Poll::Ready(done)
            }
        }
    }
}
