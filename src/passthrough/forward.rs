//! Relaying one request to Truora: the caller's credentials, the hop-by-hop headers and the
//! caller's trace context stripped, Host rewritten, X-Forwarded-For appended, the master key
//! injected (and with `telemetry.propagate_upstream` the broker's `traceparent`), both bodies
//! streamed (the request's cut off past `upstream.passthrough_max_body_bytes`).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONNECTION, HOST};
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use http_body::Body;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;

use super::pattern::TruoraApi;
use crate::error::{BrokerError, RequestError, UpstreamError};
use crate::secret::MasterKey;
use crate::telemetry;
use crate::truora::API_KEY_HEADER;
use crate::upstream::{pooled_client, ClientError};
use crate::wire::BoxError;

/// Headers that belong to one connection and are never forwarded (RFC 9110 7.6.1), plus the
/// caller's own credentials.
const NOT_FORWARDED: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
    "authorization",
];

/// Request headers that ask a server or proxy on the way to read the request as another method
/// or another URL, or to believe another host or client. A caller could use them to reach past
/// its allowlist at Truora's edge, so they never travel upstream.
const REWRITING: [&str; 9] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-prefix",
    "forwarded",
];

/// Removes from a request to Truora what could make it mean another method, URL or host.
pub fn strip_rewriting(headers: &mut HeaderMap) {
    for name in REWRITING {
        headers.remove(name);
    }
}

/// Removes hop-by-hop headers (those named by `Connection` too) and credentials.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in NOT_FORWARDED {
        headers.remove(name);
    }
    headers.remove(API_KEY_HEADER);
}

/// Appends the caller's address to `X-Forwarded-For`.
pub fn append_forwarded_for(headers: &mut HeaderMap, peer: Option<IpAddr>) {
    let Some(ip) = peer else { return };
    let name = HeaderName::from_static("x-forwarded-for");
    let value = match headers.get(&name).and_then(|v| v.to_str().ok()) {
        Some(existing) => format!("{existing}, {ip}"),
        None => ip.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(name, v);
    }
}

/// A streamed body, either way.
type Streamed = UnsyncBoxBody<Bytes, BoxError>;

/// The streaming client to Truora's identity and account APIs.
pub struct Forwarder {
    client: Client<HttpsConnector<HttpConnector>, Streamed>,
    identity: String,
    account: String,
    key: Arc<arc_swap::ArcSwap<MasterKey>>,
    timeout: Duration,
    max_body: usize,
    /// `telemetry.propagate_upstream`.
    propagate_trace: bool,
}

/// A relayed answer: status, headers, and the body as a stream.
pub type Relayed = Response<Streamed>;

impl Forwarder {
    /// A forwarder to `identity_url` and `account_url`, injecting the current `key`.
    pub fn new(
        identity_url: &str,
        account_url: &str,
        key: Arc<arc_swap::ArcSwap<MasterKey>>,
        connect_timeout: Duration,
        timeout: Duration,
        max_body: usize,
    ) -> Result<Self, ClientError> {
        let base = |key: &'static str, url: &str| -> Result<String, ClientError> {
            let trimmed = url.trim_end_matches('/');
            trimmed.parse::<Uri>().map_err(|e| ClientError::Url {
                key,
                reason: e.to_string(),
            })?;
            Ok(trimmed.to_owned())
        };
        Ok(Self {
            client: pooled_client(connect_timeout)?,
            identity: base("upstream.identity_url", identity_url)?,
            account: base("upstream.account_url", account_url)?,
            key,
            timeout,
            max_body,
            propagate_trace: false,
        })
    }

    /// Sends the current span's `traceparent` with each relayed request
    /// (`telemetry.propagate_upstream`); either way a caller's own trace headers are not relayed.
    pub fn with_trace_propagation(mut self, on: bool) -> Self {
        self.propagate_trace = on;
        self
    }

    /// Relays `req` (already authorised) to Truora's `api` at `path`.
    pub async fn forward<B>(
        &self,
        api: TruoraApi,
        path: &str,
        req: Request<B>,
        peer: Option<IpAddr>,
    ) -> Result<Relayed, BrokerError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let (mut parts, body) = req.into_parts();
        if let Some(len) = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            if len > self.max_body as u64 {
                return Err(RequestError::PayloadTooLarge {
                    limit: self.max_body,
                }
                .into());
            }
        }
        let base = match api {
            TruoraApi::Identity => &self.identity,
            TruoraApi::Account => &self.account,
        };
        let query = parts
            .uri
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        let uri: Uri = format!("{base}{path}{query}")
            .parse()
            .map_err(|_| BrokerError::Internal("a pass-through URI did not parse"))?;
        strip_hop_by_hop(&mut parts.headers);
        strip_rewriting(&mut parts.headers);
        // The caller's trace context stays inside; the broker's own goes only when asked for.
        telemetry::propagate(&mut parts.headers, self.propagate_trace);
        // The client sets Host from the URI: Truora's, not the broker's.
        parts.headers.remove(HOST);
        append_forwarded_for(&mut parts.headers, peer);
        let mut key = HeaderValue::from_str(self.key.load().expose())
            .map_err(|_| BrokerError::Internal("the master key is not a valid header value"))?;
        key.set_sensitive(true);
        parts.headers.insert(API_KEY_HEADER, key);
        parts.uri = uri;
        parts.version = http::Version::HTTP_11;
        // Streamed as it arrives, cut off past the cap.
        let body = Limited::new(body, self.max_body).boxed_unsync();
        let request = Request::from_parts(parts, body);

        let response = tokio::time::timeout(self.timeout, self.client.request(request))
            .await
            .map_err(|_| UpstreamError::Timeout)?
            .map_err(|e| {
                if e.is_connect() {
                    UpstreamError::Unreachable
                } else {
                    UpstreamError::ConnectionLost
                }
            })?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(UpstreamError::CredentialRejected {
                status: status.as_u16(),
            }
            .into());
        }
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(
            parts,
            body.map_err(|e| Box::new(e) as BoxError).boxed_unsync(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_credentials_are_stripped() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "x-private, keep-alive"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("authorization", "Bearer secret"),
            ("truora-api-key", "nope"),
            ("accept", "application/json"),
        ] {
            h.insert(k, HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("accept"));
    }

    #[test]
    fn headers_that_rewrite_the_method_url_or_host_are_stripped() {
        let mut h = HeaderMap::new();
        for name in REWRITING {
            h.insert(name, HeaderValue::from_static("x"));
        }
        h.insert("accept", HeaderValue::from_static("application/json"));
        strip_rewriting(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("accept"));
    }

    #[test]
    fn x_forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, Some("10.0.0.1".parse().unwrap()));
        append_forwarded_for(&mut h, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
    }
}
