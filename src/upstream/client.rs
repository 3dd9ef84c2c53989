//! The call to Truora: `POST <account_url>/v1/api-keys` with the master key, and the reading of
//! its answer into a token or an [`UpstreamError`].
//!
//! [`TruoraClient`] is a pooled hyper client over rustls, one overall timeout around connect,
//! send and read, and a cap on the answer's size. Upstream bodies are read to classify them and
//! are never passed on.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use zeroize::Zeroizing;

use super::{Mint, MintFuture};
use crate::error::UpstreamError;
use crate::secret::MasterKey;
use crate::telemetry;
use crate::truora::{plausible_token, API_KEY_HEADER, MINT_PATH};

/// Largest answer read from Truora; a token answer is well under 16 KiB.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Retry-After used when Truora throttles without saying for how long.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Longest Retry-After honoured; a larger one is clamped.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// The real client for Truora's account API: one attempt per [`Mint::mint`]; retries, the
/// overall deadline, the breaker and the budgets are [`super::guard`]'s.
pub struct TruoraClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    url: Uri,
    key: Arc<arc_swap::ArcSwap<MasterKey>>,
    timeout: Duration,
    /// `telemetry.propagate_upstream`: a `traceparent` goes with each call made inside a
    /// traced request.
    propagate_trace: bool,
}

impl TruoraClient {
    /// A client for `<account_url>/v1/api-keys`: connections time out after `connect_timeout`,
    /// a whole attempt (connect, send, read) after `timeout`.
    pub fn new(
        account_url: &str,
        key: MasterKey,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let url: Uri = format!("{}{MINT_PATH}", account_url.trim_end_matches('/'))
            .parse()
            .map_err(|e: http::uri::InvalidUri| ClientError::Url {
                key: "upstream.account_url",
                reason: e.to_string(),
            })?;
        let client = pooled_client(connect_timeout.min(timeout))?;
        Ok(Self {
            client,
            url,
            key: Arc::new(arc_swap::ArcSwap::from_pointee(key)),
            timeout,
            propagate_trace: false,
        })
    }

    /// Sends the current span's `traceparent` with each mint (`telemetry.propagate_upstream`).
    pub fn with_trace_propagation(mut self, on: bool) -> Self {
        self.propagate_trace = on;
        self
    }

    /// The master key slot, shared with the pass-through forwarder so a rotation reaches both.
    pub fn key_handle(&self) -> Arc<arc_swap::ArcSwap<MasterKey>> {
        Arc::clone(&self.key)
    }

    /// Uses `key` from the next call on (a rotated master key); calls in flight keep theirs.
    pub fn set_key(&self, key: MasterKey) {
        self.key.store(Arc::new(key));
    }

    async fn call(&self, form: String) -> Result<String, UpstreamError> {
        let mut key = HeaderValue::from_str(self.key.load().expose()).map_err(|_| {
            UpstreamError::BadResponse {
                reason: "the master key holds characters not allowed in a header",
            }
        })?;
        key.set_sensitive(true);
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(self.url.clone())
            .header(API_KEY_HEADER, key)
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json")
            .header(
                USER_AGENT,
                concat!("token-broker/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(Bytes::from(form)))
            .map_err(|_| UpstreamError::Unreachable)?;
        telemetry::propagate(request.headers_mut(), self.propagate_trace);
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                if e.is_connect() {
                    UpstreamError::Unreachable
                } else {
                    UpstreamError::ConnectionLost
                }
            })?;
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            // Read at most MAX_ANSWER_BYTES: a huge or endless answer costs no memory.
            let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|_| UpstreamError::BadResponse {
                    reason: "the answer was cut off or too large",
                })?
                .to_bytes();
            read_answer(status, retry_after.as_deref(), &body)
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| UpstreamError::Timeout)?
    }
}

/// Why a client to Truora could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A base URL does not parse.
    #[error("{key}: {reason}")]
    Url { key: &'static str, reason: String },
    /// rustls could not be set up with the ring provider and Mozilla's roots.
    #[error("TLS set-up failed: {0}")]
    Tls(String),
}

/// A pooled HTTPS (or, for tests and the sandbox, HTTP) client to Truora: rustls with ring and
/// Mozilla's roots, HTTP/2 where offered, TCP keep-alive, connections kept for reuse.
/// Keep-alive connections are reused; a pooled connection that the peer closed before a
/// request was written is retried by the pool itself (nothing was sent).
pub fn pooled_client<B>(
    connect_timeout: Duration,
) -> Result<Client<HttpsConnector<HttpConnector>, B>, ClientError>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(50))
        .build(https))
}

impl Mint for Arc<TruoraClient> {
    fn mint(&self, form: String) -> MintFuture {
        let this = Arc::clone(self);
        Box::pin(async move { this.call(form).await })
    }
}

#[derive(Deserialize)]
struct Answer {
    api_key: Option<String>,
    code: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ErrorAnswer {
    message: Option<String>,
}

/// Classifies Truora's answer: the token on success, else what went wrong.
///
/// The token is read from `api_key`, falling back to `code` (the reference's own example).
/// `message` is free text and is only looked at to recognise a rate limit reported as a 400.
pub fn read_answer(
    status: u16,
    retry_after: Option<&str>,
    body: &[u8],
) -> Result<String, UpstreamError> {
    match status {
        200 | 201 => {
            let answer: Answer = serde_json::from_slice(body)
                .map_err(|_| UpstreamError::BadResponse { reason: "not JSON" })?;
            let token = match (answer.api_key, answer.code) {
                (Some(t), _) => t,
                (None, Some(serde_json::Value::String(t))) => t,
                _ => {
                    return Err(UpstreamError::BadResponse {
                        reason: "no api_key field",
                    })
                }
            };
            let token = Zeroizing::new(token);
            if !plausible_token(&token) {
                return Err(UpstreamError::BadResponse {
                    reason: "the token is empty, too long or holds unexpected characters",
                });
            }
            Ok(token.to_string())
        }
        401 | 403 => Err(UpstreamError::CredentialRejected { status }),
        // A rate limit, whether Truora says it with 429 or with a 400 and its message.
        429 | 400 if status == 429 || says_rate_limited(body) => Err(UpstreamError::Throttled {
            retry_after: parse_retry_after(retry_after, SystemTime::now()),
        }),
        500..=599 => Err(UpstreamError::ServerError {
            status,
            retry_after: retry_after.map(|v| parse_retry_after(Some(v), SystemTime::now())),
        }),
        _ => Err(UpstreamError::Rejected { status }),
    }
}

fn says_rate_limited(body: &[u8]) -> bool {
    let message = serde_json::from_slice::<ErrorAnswer>(body)
        .ok()
        .and_then(|a| a.message)
        .unwrap_or_default();
    message.to_ascii_lowercase().contains("rate limit")
}

/// Reads `Retry-After` (seconds or an HTTP date), clamped to [1 s, 5 min]; 1 s when absent.
pub fn parse_retry_after(value: Option<&str>, now: SystemTime) -> Duration {
    let Some(value) = value.map(str::trim) else {
        return DEFAULT_RETRY_AFTER;
    };
    let wait = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else if let Ok(when) = httpdate::parse_http_date(value) {
        when.duration_since(now).unwrap_or_default()
    } else {
        DEFAULT_RETRY_AFTER
    };
    wait.clamp(DEFAULT_RETRY_AFTER, MAX_RETRY_AFTER)
}

#[cfg(test)]
mod tests {
    use super::*;

    const JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjF9.c2ln";

    #[test]
    fn api_key_field_is_read() {
        let body = format!(r#"{{"api_key":"{JWT}","message":"API key created successfully"}}"#);
        assert_eq!(read_answer(200, None, body.as_bytes()).unwrap(), JWT);
    }

    #[test]
    fn code_field_is_the_fallback() {
        let body = format!(r#"{{"code":"{JWT}","message":"whatever"}}"#);
        assert_eq!(read_answer(200, None, body.as_bytes()).unwrap(), JWT);
    }

    #[test]
    fn a_200_without_a_token_is_a_bad_response() {
        for body in [
            &br#"{"message":"ok"}"#[..],
            b"<html>",
            br#"{"code":10400}"#,
            br#"{"api_key":""}"#,
            br#"{"api_key":"has \" quote"}"#,
        ] {
            assert!(matches!(
                read_answer(200, None, body),
                Err(UpstreamError::BadResponse { .. })
            ));
        }
    }

    #[test]
    fn rejected_master_key_is_a_credential_error() {
        assert_eq!(
            read_answer(401, None, br#"{"message":"Unauthorized"}"#),
            Err(UpstreamError::CredentialRejected { status: 401 })
        );
        assert_eq!(
            read_answer(403, None, br#"{"message":"User is not authorized to access this resource with an explicit deny"}"#),
            Err(UpstreamError::CredentialRejected { status: 403 })
        );
    }

    #[test]
    fn a_429_is_throttling_with_its_retry_after() {
        assert_eq!(
            read_answer(429, Some("7"), b"{}"),
            Err(UpstreamError::Throttled {
                retry_after: Duration::from_secs(7)
            })
        );
    }

    #[test]
    fn a_400_saying_rate_limit_is_throttling() {
        let body = br#"{"code":"11400","message":"max rate limit reached"}"#;
        assert!(matches!(
            read_answer(400, None, body),
            Err(UpstreamError::Throttled { .. })
        ));
        let body = br#"{"code":10400,"http_code":400,"message":"Invalid request: missing params"}"#;
        assert_eq!(
            read_answer(400, None, body),
            Err(UpstreamError::Rejected { status: 400 })
        );
    }

    #[test]
    fn a_5xx_is_a_server_error() {
        assert_eq!(
            read_answer(500, None, b"down"),
            Err(UpstreamError::ServerError {
                status: 500,
                retry_after: None
            })
        );
        assert_eq!(
            read_answer(503, Some("4"), b"down"),
            Err(UpstreamError::ServerError {
                status: 503,
                retry_after: Some(Duration::from_secs(4))
            })
        );
    }

    #[test]
    fn retry_after_reads_seconds_and_dates_and_clamps() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after(Some("30"), now), Duration::from_secs(30));
        assert_eq!(parse_retry_after(None, now), DEFAULT_RETRY_AFTER);
        assert_eq!(parse_retry_after(Some("junk"), now), DEFAULT_RETRY_AFTER);
        assert_eq!(parse_retry_after(Some("0"), now), DEFAULT_RETRY_AFTER);
        assert_eq!(parse_retry_after(Some("99999"), now), MAX_RETRY_AFTER);
        let date = httpdate::fmt_http_date(now + Duration::from_secs(20));
        assert_eq!(parse_retry_after(Some(&date), now), Duration::from_secs(20));
    }
}
