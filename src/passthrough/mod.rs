//! Pass-through: callers reach Truora's other endpoints (process results, listings, access
//! links) under `/truora/identity/...` and `/truora/account/...` without ever holding the master
//! key. The broker authenticates the caller (the auth layer), checks method and path against
//! that caller's allowlist ([`pattern`]), relays the request with the master key injected
//! ([`forward`]), and may keep final process results for `cache.result_ttl` ([`results`]).
//! A result read through it that says its process ended (success or failure, naming its flow
//! and user) drops that user's tokens for that flow, for every caller, as Truora's webhook
//! would.
//! Truora's status and body come back as they are (they are the caller's own results), except
//! that a 401/403 (the master key refused) becomes 502, as for minting. Inside a traced request
//! the call to Truora is a span, `truora.passthrough` (method, pattern, status).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body::Body;
use http_body_util::Either;

use crate::audit::{Event, Origin};
use crate::cache::Reason;
use crate::error::{BrokerError, Refusal, RequestError};
use crate::issuance::{Ended, Issuer};
use crate::metrics::{CacheOutcome, Metrics};
use crate::telemetry;
use crate::wire::{full, x_cache, HttpResponse};

pub mod forward;
pub mod pattern;
pub mod results;

pub use forward::Forwarder;
pub use pattern::{check_path, Pattern, TruoraApi};
pub use results::{ResultCache, Verdict};

/// The pass-through as the caller API uses it.
pub struct Passthrough {
    forwarder: Forwarder,
    results: Option<ResultCache>,
    /// Told when a result read says its process ended.
    issuer: Arc<Issuer>,
    metrics: Arc<Metrics>,
}

impl Passthrough {
    /// Relays through `forwarder`, keeping final results in `results` when set, and telling
    /// `issuer` of the processes that results say ended.
    pub fn new(
        forwarder: Forwarder,
        results: Option<ResultCache>,
        issuer: Arc<Issuer>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            forwarder,
            results,
            issuer,
            metrics,
        }
    }

    /// Forgets what was kept for `caller` (revoked by a reload).
    pub fn forget_caller(&self, caller: &str) {
        if let Some(results) = &self.results {
            results.forget_caller(caller);
        }
    }

    /// Relays an authenticated `caller`'s request, if its `allowlist` allows it, counting and
    /// auditing the call (`origin`: the request's id and the caller's address). Under
    /// `audit.on_failure = "refuse"` nothing is relayed while the trail cannot be written.
    pub async fn relay<B>(
        &self,
        caller: &Arc<str>,
        allowlist: &[Pattern],
        req: Request<B>,
        origin: Origin<'_>,
    ) -> Result<HttpResponse, BrokerError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let path = req.uri().path().to_owned();
        let metrics = &self.metrics;
        if let Err(e) = check_path(&path) {
            if let RequestError::Forbidden { .. } = e {
                metrics
                    .passthrough_requests
                    .with_label_values(&["denied", "403"])
                    .inc();
            }
            return Err(e.into());
        }
        let (api, upstream_path) = TruoraApi::of(&path).ok_or(RequestError::NotFound)?;
        let Some(pattern) = allowlist.iter().find(|p| p.matches(req.method(), &path)) else {
            metrics
                .passthrough_requests
                .with_label_values(&["denied", "403"])
                .inc();
            return Err(RequestError::Forbidden {
                rule: "passthrough",
                field: None,
                message: "this caller's passthrough allowlist does not allow this method and path",
            }
            .into());
        };
        let pattern = Arc::clone(pattern.text());
        let audit = self.issuer.audit();
        if !audit.available("passthrough") {
            metrics
                .passthrough_requests
                .with_label_values(&[&pattern, "503"])
                .inc();
            return Err(Refusal::AuditUnavailable.into());
        }
        let cacheable = ResultCache::cacheable(req.method(), api, upstream_path);
        let method = req.method().clone();
        let count = |status: StatusCode| {
            metrics
                .passthrough_requests
                .with_label_values(&[&pattern, status.as_str()])
                .inc();
            audit.record(&Event::Passthrough {
                caller,
                method: method.as_str(),
                pattern: &pattern,
                status: status.as_u16(),
                request_id: origin.request_id,
                peer: origin.peer,
            });
        };
        if let (true, Some(results)) = (cacheable, &self.results) {
            if let Some(mut hit) = results.get(caller, &path) {
                count(hit.status());
                let (name, value) = x_cache(CacheOutcome::Hit);
                hit.headers_mut().insert(name, value);
                return Ok(hit);
            }
        }
        let started = Instant::now();
        let span = telemetry::child(|| {
            tracing::info_span!(
                "truora.passthrough",
                otel.kind = "client",
                http.request.method = method.as_str(),
                token_broker.passthrough.pattern = &*pattern,
                http.response.status_code = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            )
        });
        let relayed = tracing::Instrument::instrument(
            self.forwarder.forward(api, upstream_path, req, origin.peer),
            span.clone(),
        )
        .await;
        if !span.is_none() {
            let (status, failed) = match &relayed {
                Ok(r) => (r.status(), r.status().is_server_error()),
                Err(e) => (e.status(), true),
            };
            span.record("http.response.status_code", status.as_u16());
            if failed {
                span.record("otel.status_code", "error");
            }
        }
        metrics
            .passthrough_duration
            .with_label_values(&[&pattern])
            .observe(started.elapsed().as_secs_f64());
        let relayed = match relayed {
            Ok(r) => r,
            Err(e) => {
                count(e.status());
                return Err(e);
            }
        };
        count(relayed.status());
        if !cacheable {
            return Ok(relayed.map(Either::Right));
        }
        let mut response = match results::read_small(relayed).await? {
            Err(untouched) => untouched.map(Either::Right),
            Ok((parts, body)) => {
                let verdict = results::verdict(&body);
                if verdict.ended {
                    if let Some(results) = &self.results {
                        results.keep(caller, &path, &parts, body.clone());
                    }
                    self.end_process(&verdict, upstream_path).await;
                }
                http::Response::from_parts(parts, full(body))
            }
        };
        if self.results.is_some() {
            let (name, value) = x_cache(CacheOutcome::Miss);
            response.headers_mut().insert(name, value);
        }
        Ok(response)
    }

    /// A result said its process ended: that user's tokens for that flow go, for every caller
    /// and on every replica. The caller still gets its result when the shared cache cannot be
    /// reached (logged): the webhook, or the token's expiry, ends it there.
    async fn end_process(&self, verdict: &Verdict, path: &str) {
        let (Some(flow_id), Some(account_id)) = (&verdict.flow_id, &verdict.account_id) else {
            return;
        };
        // `/v1/processes/<id>/result`, which Truora just answered for.
        let ended = Ended {
            flow_id,
            account_id,
            process_id: path.split('/').nth(3),
            at: None,
        };
        if let Err(e) = self.issuer.process_ended(&ended, Reason::Result).await {
            tracing::warn!(error = %e, flow_id = %flow_id, "a result said its process ended, but the shared cache could not be reached: other replicas may serve its token until the webhook or its expiry");
        }
    }
}
