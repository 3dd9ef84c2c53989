//! The caller API's handlers: the innermost service of the stack ([`Api`]), turning an
//! authenticated request into a call on the issuance core (or the pass-through) and the result
//! back into a response. The core never sees HTTP; this is where HTTP ends.
//!
//! - `POST /v1/tokens`: a token in the broker's JSON shape; with `Cache-Control: no-cache`, a
//!   new process's token that replaces the cached one (also on the drop-in).
//! - `POST /v1/api-keys`: drop-in for Truora's own endpoint, Truora's shapes for answers and
//!   errors.
//! - `DELETE /v1/tokens?flow_id=..&account_id=..`: drops this caller's matching cached tokens.
//! - `/truora/identity/...`, `/truora/account/...`: pass-through to Truora, per allowlist.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::Body;

use crate::audit::Origin;
use crate::auth::{Authed, Callers, SharedCallers};
use crate::config::ServerConfig;
use crate::error::{BrokerError, RequestError};
use crate::issuance::{invalidation_filter, Issuer, TokenRequest};
use crate::metrics::{CacheOutcome, Metrics};
use crate::passthrough::Passthrough;
use crate::telemetry::Telemetry;
use crate::wire::{
    asks_no_cache, check_framing, json_response, read_body, x_cache, Answer, BodyFormat, Failure,
    HttpResponse, Note, Route,
};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What the caller API needs to answer requests.
pub struct ApiState {
    /// The issuance core.
    pub issuer: Arc<Issuer>,
    /// The configured callers, swapped whole by a reload.
    pub callers: SharedCallers,
    /// Every series.
    pub metrics: Arc<Metrics>,
    /// `server.max_body_bytes`.
    pub max_body_bytes: usize,
    /// `server.body_read_timeout`.
    pub body_read_timeout: Duration,
    /// Relays `/truora/...` to Truora; absent: those paths are 404.
    pub passthrough: Option<Passthrough>,
    /// The trace pipeline, with `[telemetry]`: each request gets a span.
    pub telemetry: Option<Arc<Telemetry>>,
}

impl ApiState {
    /// State for `issuer` and `callers` with the default limits and no pass-through.
    pub fn new(issuer: Arc<Issuer>, callers: Callers, metrics: Arc<Metrics>) -> Self {
        let defaults = ServerConfig::default();
        Self {
            issuer,
            callers: Arc::new(arc_swap::ArcSwap::from_pointee(callers)),
            metrics,
            max_body_bytes: defaults.max_body_bytes,
            body_read_timeout: defaults.body_read_timeout,
            passthrough: None,
            telemetry: None,
        }
    }
}

/// The innermost service: reads the body and calls the core.
#[derive(Clone)]
pub struct Api {
    state: Arc<ApiState>,
}

impl Api {
    /// The handlers of `state`.
    pub fn new(state: Arc<ApiState>) -> Self {
        Self { state }
    }
}

impl<B> tower::Service<Authed<B>> for Api
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    type Response = Answer;
    type Error = Failure;
    type Future = BoxFuture<Result<Answer, Failure>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, authed: Authed<B>) -> Self::Future {
        let state = Arc::clone(&self.state);
        Box::pin(async move {
            let mut note = Note::default();
            match handle(&state, authed, &mut note.cache).await {
                Ok(response) => Ok(Answer { response, note }),
                Err(error) => Err(Failure { error, note }),
            }
        })
    }
}

/// One request, by route; `outcome` learns what the cache did.
async fn handle<B>(
    state: &ApiState,
    authed: Authed<B>,
    outcome: &mut CacheOutcome,
) -> Result<HttpResponse, BrokerError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    check_framing(authed.req.headers())?;
    match authed.route {
        Route::Tokens | Route::ApiKeys => issue(state, authed, outcome).await,
        // The cold routes are boxed: their futures (Redis, the relay's client) are kilobytes,
        // and every hit would otherwise allocate and move room for them.
        Route::Invalidate => {
            let query = authed.req.uri().query().unwrap_or("");
            Box::pin(invalidate(state, &authed.caller.id, query)).await
        }
        Route::Passthrough => {
            let passthrough = state.passthrough.as_ref().ok_or(RequestError::NotFound)?;
            let request_id = authed.request_id.clone();
            let origin = Origin {
                request_id: request_id.to_str().unwrap_or("-"),
                peer: authed.peer_ip,
            };
            let Authed { caller, req, .. } = authed;
            Box::pin(passthrough.relay(&caller.id, &caller.passthrough, req, origin)).await
        }
        Route::MethodNotAllowed(allow) => Err(RequestError::MethodNotAllowed { allow }.into()),
        Route::NotFound => Err(RequestError::NotFound.into()),
    }
}

/// `POST /v1/tokens` and `POST /v1/api-keys`: the body into a request, the caller's policy, the
/// core, the answer in the route's shape.
async fn issue<B>(
    state: &ApiState,
    authed: Authed<B>,
    outcome: &mut CacheOutcome,
) -> Result<HttpResponse, BrokerError>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let Authed {
        route,
        caller,
        req,
        peer_ip,
        request_id,
    } = authed;
    let origin = Origin {
        request_id: request_id.to_str().unwrap_or("-"),
        peer: peer_ip,
    };
    if route == Route::ApiKeys {
        caller.policy.check_drop_in()?;
    }
    let new_process = asks_no_cache(req.headers());
    let format = BodyFormat::of(req.headers())?;
    let body = read_body(req, state.max_body_bytes, state.body_read_timeout).await?;
    let mut request = match format {
        BodyFormat::Form => TokenRequest::from_form(&body)?,
        BodyFormat::Json => TokenRequest::from_json(&body)?,
    };
    caller.policy.admit(&mut request)?;
    let issued = if new_process {
        Box::pin(
            state
                .issuer
                .renew_for(&caller.id, &request, origin, outcome),
        )
        .await?
    } else {
        state
            .issuer
            .issue_for(&caller.id, &request, origin, outcome)
            .await?
    };
    let body = match route {
        Route::ApiKeys => issued.dropin_body(),
        _ => issued.tokens_body(Instant::now()),
    };
    let mut response = json_response(body);
    let (name, value) = x_cache(issued.cache);
    response.headers_mut().insert(name, value);
    Ok(response)
}

/// `DELETE /v1/tokens`: this caller's matching tokens, here and (with a shared tier) everywhere.
async fn invalidate(
    state: &ApiState,
    caller: &str,
    query: &str,
) -> Result<HttpResponse, BrokerError> {
    let filter = invalidation_filter(query)?;
    let n = state
        .issuer
        .invalidate_for_caller(
            caller,
            filter.flow_id.as_deref(),
            filter.account_id.as_deref(),
        )
        .await?
        .tokens;
    Ok(json_response(format!("{{\"invalidated\":{n}}}")))
}
