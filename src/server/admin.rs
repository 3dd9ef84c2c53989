//! The admin listener's router: the status page `/`, `GET /metrics`, `/healthz`, `/readyz` and
//! `POST /admin/reload`. Nothing else, above all no tokens, so it can be opened to Prometheus
//! and the kubelet without opening minting.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};

use super::api::ApiState;
use super::status::StatusView;
use crate::wire::{full, HttpResponse, NO_STORE};

/// Re-reads the configuration: what `POST /admin/reload` calls. The composition root's
/// reloader implements it; a broker started without a config file has none (409).
pub trait Reload: Send + Sync {
    /// Reloads now (its files read off the runtime's workers); the status and JSON body of the
    /// answer.
    fn reload_answer(&self) -> Pin<Box<dyn Future<Output = (StatusCode, String)> + Send + '_>>;
}

/// What the admin listener serves from.
pub struct Admin {
    state: Arc<ApiState>,
    reload: OnceLock<Arc<dyn Reload>>,
}

impl Admin {
    /// The admin endpoints of the broker whose caller API is `state`, without reload yet.
    pub fn new(state: Arc<ApiState>) -> Self {
        Self {
            state,
            reload: OnceLock::new(),
        }
    }

    /// Lets `POST /admin/reload` call `reload`; false when one is set already.
    pub fn set_reload(&self, reload: Arc<dyn Reload>) -> bool {
        self.reload.set(reload).is_ok()
    }

    /// The state it reads.
    pub fn state(&self) -> &Arc<ApiState> {
        &self.state
    }
}

/// Answers one admin request.
pub async fn admin<B>(admin: Arc<Admin>, req: Request<B>) -> Result<HttpResponse, Infallible> {
    let state = &admin.state;
    let (status, content_type, body): (StatusCode, &'static str, Bytes) =
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/") => (
                StatusCode::OK,
                "text/html; charset=utf-8",
                Bytes::from(StatusView::gather(state).html()),
            ),
            (&Method::GET, "/metrics") => {
                let m = &state.metrics;
                m.cache_entries.set(state.issuer.cache().len() as i64);
                let upstream = state.issuer.guard().snapshot();
                m.breaker_state.set(upstream.breaker.gauge());
                m.throttle_remaining
                    .set(upstream.throttled_for.as_secs_f64());
                (
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    Bytes::from(state.metrics.render()),
                )
            }
            (&Method::GET, "/healthz") => {
                (StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n"))
            }
            // Ready while the broker can serve hits, whatever Truora's state: an upstream outage
            // must not take every replica out of the load balancer. The body tells why misses
            // may fail.
            (&Method::GET, "/readyz") => {
                let upstream = state.issuer.guard().snapshot();
                let body = serde_json::json!({
                    "ready": true,
                    "cache_entries": state.issuer.cache().len(),
                    "upstream": {
                        "breaker": upstream.breaker.name(),
                        "throttled_for_seconds": upstream.throttled_for.as_secs_f64().ceil(),
                        "credential_rejected": upstream.credential_rejected,
                        "in_flight": upstream.in_flight,
                    }
                });
                (
                    StatusCode::OK,
                    "application/json",
                    Bytes::from(body.to_string()),
                )
            }
            (&Method::POST, "/admin/reload") => match admin.reload.get() {
                None => (
                    StatusCode::CONFLICT,
                    "application/json",
                    Bytes::from_static(
                        b"{\"reloaded\":false,\"error\":\"reload_unavailable\",\"message\":\"this broker was not started from a config file\"}",
                    ),
                ),
                Some(reload) => {
                    let (status, body) = reload.reload_answer().await;
                    (status, "application/json", Bytes::from(body))
                }
            },
            (_, "/" | "/metrics" | "/healthz" | "/readyz") => (
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                Bytes::from_static(b"use GET\n"),
            ),
            (_, "/admin/reload") => (
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                Bytes::from_static(b"use POST\n"),
            ),
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                Bytes::from_static(
                    b"admin endpoints: / (status page), /metrics, /healthz, /readyz, POST /admin/reload\n",
                ),
            ),
        };
    let allow = match req.uri().path() {
        "/admin/reload" => "POST",
        _ => "GET",
    };
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        h.insert(ALLOW, HeaderValue::from_static(allow));
    }
    if content_type.starts_with("text/html") {
        // The status page loads nothing from anywhere: inline CSS only, no script.
        h.insert(CACHE_CONTROL, NO_STORE.clone());
        h.insert(
            http::header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
        );
    }
    Ok(response)
}
