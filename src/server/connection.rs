//! One connection's life, on either listener: it is closed once it has had no request in progress
//! for `server.header_read_timeout` (from its first byte on, and between requests; HTTP/1 and
//! HTTP/2 alike, so a socket that sends nothing, half a preface, or an HTTP/2 session that only
//! answers pings cannot hold a place), once it is older than `server.max_connection_age`, and
//! when the broker shuts down.
//!
//! "In progress" runs from the moment a request's head is in until its response body has been
//! sent ([`Counted`]), so a slow upstream call or a long pass-through download is never cut.
//! Closing is graceful first (hyper finishes what is in progress, HTTP/2 says GOAWAY); a
//! connection that is still open, with nothing in progress, one more idle period later is
//! dropped.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::watch;
use tokio::time::Instant;
use tower::Service;

use crate::wire::{BoxError, ResponseBody};

/// How long a connection may idle and live.
#[derive(Debug, Clone, Copy)]
pub struct Lifetime {
    /// `server.header_read_timeout`: the longest stretch with no request in progress.
    pub idle: Duration,
    /// `server.max_connection_age`.
    pub max_age: Duration,
}

/// What a connection's requests tell its watchdog.
#[derive(Debug)]
pub struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `opened` when the last request in progress ended.
    idle_since_ms: AtomicU64,
}

impl Activity {
    /// A connection opened now, idle.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
        })
    }

    fn enter(self: &Arc<Self>) -> InProgress {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InProgress(Arc::clone(self))
    }

    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }

    /// When the connection will have idled for `idle`, if nothing starts meanwhile; `None`
    /// while a request is in progress.
    fn idle_at(&self, idle: Duration) -> Option<Instant> {
        if self.busy() {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        Some(self.opened + since + idle)
    }
}

/// A request in progress on its connection, until dropped.
struct InProgress(Arc<Activity>);

impl Drop for InProgress {
    fn drop(&mut self) {
        let a = &self.0;
        let ms = u64::try_from(a.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        a.idle_since_ms.store(ms, Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts a connection's requests in progress, from the head in to the body sent.
#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Counted<S> {
    /// `inner`, counting on `activity`.
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }
}

impl<S, B> Service<Request<B>> for Counted<S>
where
    S: Service<Request<B>, Response = Response<ResponseBody>, Error = Infallible>,
{
    type Response = Response<CountedBody>;
    type Error = Infallible;
    type Future = CountedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        CountedFuture {
            progress: Some(self.activity.enter()),
            inner: self.inner.call(req),
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Counted`]: the inner answer, its body carrying the request's place in
    /// progress until it ends.
    pub struct CountedFuture<F> {
        #[pin]
        inner: F,
        progress: Option<InProgress>,
    }
}

impl<F> Future for CountedFuture<F>
where
    F: Future<Output = Result<Response<ResponseBody>, Infallible>>,
{
    type Output = Result<Response<CountedBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(response) = std::task::ready!(this.inner.poll(cx));
        let progress = this.progress.take();
        Poll::Ready(Ok(response.map(|inner| CountedBody {
            inner,
            _progress: progress,
        })))
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request in progress until it is sent (or dropped).
    pub struct CountedBody {
        #[pin]
        inner: ResponseBody,
        _progress: Option<InProgress>,
    }
}

impl Body for CountedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.project().inner.poll_frame(cx).map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves `conn` until it ends, closing it when it idles or ages past `lifetime` or when
/// `shutdown` says so; see the module docs. Says why the broker closed it, when it did for idling
/// (`"idle"`) or age (`"age"`).
pub async fn drive<C: GracefulConnection>(
    conn: C,
    activity: &Activity,
    lifetime: Lifetime,
    mut shutdown: watch::Receiver<bool>,
) -> Option<&'static str> {
    tokio::pin!(conn);
    let old_at = activity.opened + lifetime.max_age;
    let mut closing: Option<Option<&'static str>> = None;
    if *shutdown.borrow() {
        conn.as_mut().graceful_shutdown();
        closing = Some(None);
    }
    loop {
        let wake = match closing {
            Some(_) => Instant::now() + lifetime.idle,
            None => activity
                .idle_at(lifetime.idle)
                .unwrap_or_else(|| Instant::now() + lifetime.idle)
                .min(old_at),
        };
        tokio::select! {
            // hyper's own head-read timeout (the same `idle`) may close a silent connection a
            // moment before this watchdog does: an end past the idle deadline is an idle close.
            _ = conn.as_mut() => {
                return closing.flatten().or_else(|| {
                    let now = Instant::now();
                    activity.idle_at(lifetime.idle).is_some_and(|at| now >= at).then_some("idle")
                })
            }
            () = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                match closing {
                    // Still open one idle period after closing began: with nothing in
                    // progress, nothing is lost by dropping it.
                    Some(why) => if !activity.busy() {
                        return why;
                    },
                    None => {
                        let why = if now >= old_at {
                            Some("age")
                        } else if activity.idle_at(lifetime.idle).is_some_and(|at| now >= at) {
                            Some("idle")
                        } else {
                            None
                        };
                        if why.is_some() {
                            conn.as_mut().graceful_shutdown();
                            closing = Some(why);
                        }
                    }
                }
            }
            changed = shutdown.changed(), if closing.is_none() => {
                if changed.is_err() || *shutdown.borrow() {
                    conn.as_mut().graceful_shutdown();
                    closing = Some(None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_with_nothing_in_progress() {
        let a = Activity::new();
        let idle = Duration::from_secs(1);
        assert_eq!(a.idle_at(idle), Some(a.opened + idle));
        let progress = a.enter();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(a.idle_at(idle), None, "busy: not idle");
        drop(progress);
        assert_eq!(
            a.idle_at(idle),
            Some(Instant::now() + idle),
            "idle from the end"
        );
    }
}
