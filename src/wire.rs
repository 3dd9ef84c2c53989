//! The wire types every HTTP-facing room shares: the route a request is for, the body and
//! response types, the few header values the broker writes, what the layers of the caller stack
//! hand each other ([`Routed`], [`Answer`], [`Failure`]), and the checks on a request's framing
//! and body. A leaf: nothing here knows the core, the cache or Truora.

use std::future::Future;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
use http::{HeaderMap, Method, Request, Response};
use http_body::Body;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};

use crate::error::{BrokerError, Envelope, RequestError};
use crate::metrics::{CacheOutcome, RouteLabel};

/// Error of a streamed body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A response body: whole bytes for everything the broker writes itself, a stream for what
/// pass-through relays from Truora (never buffered whole).
pub type ResponseBody = Either<Full<Bytes>, UnsyncBoxBody<Bytes, BoxError>>;
/// The response type of every service here.
pub type HttpResponse = Response<ResponseBody>;

/// A body of whole bytes.
pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Either::Left(Full::new(bytes.into()))
}

/// `application/json`.
pub static JSON: HeaderValue = HeaderValue::from_static("application/json");
/// `no-store`: nothing the broker answers may be kept by a cache on the way.
pub static NO_STORE: HeaderValue = HeaderValue::from_static("no-store");
/// `X-Cache`.
pub static X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// The `X-Cache` header of an answer: `HIT` when the cache served it, else `MISS`.
pub fn x_cache(outcome: CacheOutcome) -> (HeaderName, HeaderValue) {
    let value = if outcome.is_hit() { "HIT" } else { "MISS" };
    (X_CACHE.clone(), HeaderValue::from_static(value))
}

/// The credential of an `Authorization: Bearer <value>` header value (scheme case-insensitive);
/// `None` for another scheme, an empty value or one holding whitespace.
pub fn bearer_value(header: &[u8]) -> Option<&[u8]> {
    let i = memchr::memchr(b' ', header)?;
    let value = &header[i + 1..];
    // ASCII white space is these five bytes; a header value can hold only the first two.
    let white = memchr::memchr2(b' ', b'\t', value).is_some()
        || memchr::memchr3(b'\n', b'\r', b'\x0c', value).is_some();
    (header[..i].eq_ignore_ascii_case(b"bearer") && !value.is_empty() && !white).then_some(value)
}

/// True when the request's `Cache-Control` has the `no-cache` directive (names are
/// case-insensitive; several headers and comma-separated lists count): the caller asks for a
/// new process rather than the cached token.
pub fn asks_no_cache(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|directive| directive.trim().eq_ignore_ascii_case("no-cache"))
}

/// A JSON answer of the broker's own (200, `Cache-Control: no-store`).
pub fn json_response(body: impl Into<Bytes>) -> HttpResponse {
    let mut response = Response::new(full(body));
    let h = response.headers_mut();
    h.insert(CONTENT_TYPE, JSON.clone());
    h.insert(http::header::CACHE_CONTROL, NO_STORE.clone());
    response
}

/// The endpoint a caller request is for, decided once from its method and path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `POST /v1/tokens`
    Tokens,
    /// `POST /v1/api-keys`
    ApiKeys,
    /// `DELETE /v1/tokens`
    Invalidate,
    /// `/truora/identity/...` and `/truora/account/...`: relayed to Truora.
    Passthrough,
    /// A known path with another method; holds the `Allow` value.
    MethodNotAllowed(&'static str),
    /// Anything else.
    NotFound,
}

impl Route {
    /// Classifies a request.
    pub fn of(method: &Method, path: &str) -> Self {
        match (path, method) {
            ("/v1/tokens", &Method::POST) => Route::Tokens,
            ("/v1/tokens", &Method::DELETE) => Route::Invalidate,
            ("/v1/tokens", _) => Route::MethodNotAllowed("POST, DELETE"),
            ("/v1/api-keys", &Method::POST) => Route::ApiKeys,
            ("/v1/api-keys", _) => Route::MethodNotAllowed("POST"),
            (p, _) if p.starts_with("/truora/identity/") || p.starts_with("/truora/account/") => {
                Route::Passthrough
            }
            _ => Route::NotFound,
        }
    }

    /// The bounded `route` label.
    pub fn label(self) -> RouteLabel {
        match self {
            Route::Tokens => RouteLabel::Tokens,
            Route::ApiKeys => RouteLabel::ApiKeys,
            Route::Invalidate => RouteLabel::Invalidate,
            Route::Passthrough => RouteLabel::Passthrough,
            Route::MethodNotAllowed(_) | Route::NotFound => RouteLabel::Other,
        }
    }

    /// The error shape this route speaks: Truora's for the drop-in, ours elsewhere.
    pub fn envelope(self) -> Envelope {
        match self {
            Route::ApiKeys => Envelope::Truora,
            _ => Envelope::Broker,
        }
    }
}

/// A request with its route decided (what the outermost layer hands the rest of the stack).
pub struct Routed<B> {
    /// The endpoint.
    pub route: Route,
    /// The request.
    pub req: Request<B>,
    /// The request id (given or made), for the audit trail. A clone of the outermost layer's:
    /// sharing its bytes, so passing it down costs no allocation.
    pub request_id: HeaderValue,
}

/// What the layers under the outermost one learn about a request, handed back up with its
/// answer for the metrics and the access line: who the caller was, what the cache did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Note {
    /// The authenticated caller's metrics slot, once known.
    pub caller: Option<usize>,
    /// What the cache did.
    pub cache: CacheOutcome,
}

/// An answer on its way up the stack, with what was learnt while making it.
pub struct Answer {
    /// The response.
    pub response: HttpResponse,
    /// The request's note.
    pub note: Note,
}

/// A failure on its way up to the layer that turns it into a response, with what was learnt
/// before it failed.
#[derive(Debug)]
pub struct Failure {
    /// What went wrong.
    pub error: BrokerError,
    /// The request's note.
    pub note: Note,
}

impl<E: Into<BrokerError>> From<E> for Failure {
    fn from(error: E) -> Self {
        Self {
            error: error.into(),
            note: Note::default(),
        }
    }
}

/// The body formats a token request may come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// `application/x-www-form-urlencoded`
    Form,
    /// `application/json`
    Json,
}

impl BodyFormat {
    /// The format `Content-Type` announces; anything else is 415.
    pub fn of(headers: &HeaderMap) -> Result<Self, RequestError> {
        let value = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .ok_or(RequestError::UnsupportedMediaType)?;
        let essence = value.split(';').next().unwrap_or("").trim();
        if essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
            Ok(BodyFormat::Form)
        } else if essence.eq_ignore_ascii_case("application/json") {
            Ok(BodyFormat::Json)
        } else {
            Err(RequestError::UnsupportedMediaType)
        }
    }
}

/// Refuses the request-smuggling shapes. Given Content-Length and Transfer-Encoding together,
/// hyper drops the length before we see the request: so any Transfer-Encoding is refused here
/// (411). A repeated Content-Length never reaches us on HTTP/1 (hyper merges identical values
/// and refuses differing ones), but identical ones do on HTTP/2: refused here (400).
pub fn check_framing(headers: &HeaderMap) -> Result<(), RequestError> {
    if headers.contains_key(TRANSFER_ENCODING) {
        return Err(RequestError::LengthRequired);
    }
    if headers.get_all(CONTENT_LENGTH).iter().count() > 1 {
        return Err(RequestError::AmbiguousFraming);
    }
    Ok(())
}

/// Reads a body of at most `limit` bytes within `timeout`: refused from its Content-Length
/// before reading when that is over, and cut off while reading when there is none.
pub async fn read_body<B>(
    req: Request<B>,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, RequestError>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    // A small body nearly always came in with the head: a first poll reads it without arming
    // a timer (a timer entry per request was a measurable part of a cache hit); only a body
    // still on its way gets the deadline.
    let mut read = std::pin::pin!(read_limited(req, limit));
    let first = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await;
    match first {
        Poll::Ready(done) => done,
        Poll::Pending => tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| RequestError::BodyTimeout)?,
    }
}

async fn read_limited<B>(req: Request<B>, limit: usize) -> Result<Bytes, RequestError>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    if let Some(len) = req.headers().get(CONTENT_LENGTH) {
        let len: u64 =
            len.to_str()
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or(RequestError::MalformedBody {
                    reason: "bad Content-Length".into(),
                })?;
        if len > limit as u64 {
            return Err(RequestError::PayloadTooLarge { limit });
        }
    }
    // A small body comes in one frame, whose bytes are taken as they are; only a body in
    // several frames is copied into one buffer.
    let mut body = std::pin::pin!(Limited::new(req.into_body(), limit));
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            if e.is::<LengthLimitError>() {
                RequestError::PayloadTooLarge { limit }
            } else {
                RequestError::MalformedBody {
                    reason: "the body could not be read".into(),
                }
            }
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        match (&mut first, &mut joined) {
            (None, _) => first = Some(data),
            (Some(head), None) => {
                let mut all = BytesMut::with_capacity(head.len() + data.len());
                all.extend_from_slice(head);
                all.extend_from_slice(&data);
                joined = Some(all);
            }
            (Some(_), Some(all)) => all.extend_from_slice(&data),
        }
    }
    Ok(match joined {
        Some(all) => all.freeze(),
        None => first.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_decided_from_method_and_path() {
        assert_eq!(Route::of(&Method::POST, "/v1/tokens"), Route::Tokens);
        assert_eq!(Route::of(&Method::DELETE, "/v1/tokens"), Route::Invalidate);
        assert_eq!(Route::of(&Method::POST, "/v1/api-keys"), Route::ApiKeys);
        assert_eq!(
            Route::of(&Method::GET, "/v1/tokens"),
            Route::MethodNotAllowed("POST, DELETE")
        );
        assert_eq!(
            Route::of(&Method::GET, "/truora/identity/v1/processes"),
            Route::Passthrough
        );
        assert_eq!(Route::of(&Method::GET, "/v1/nope"), Route::NotFound);
        assert_eq!(Route::ApiKeys.envelope(), Envelope::Truora);
        assert_eq!(Route::NotFound.label(), RouteLabel::Other);
    }

    #[test]
    fn the_content_type_picks_the_parser() {
        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("Application/JSON; charset=utf-8"),
        );
        assert_eq!(BodyFormat::of(&h), Ok(BodyFormat::Json));
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert_eq!(BodyFormat::of(&h), Err(RequestError::UnsupportedMediaType));
    }

    #[test]
    fn no_cache_is_found_in_any_cache_control_directive_and_nothing_else_counts() {
        let with = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(
                    http::header::CACHE_CONTROL,
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            asks_no_cache(&h)
        };
        assert!(with(&["no-cache"]));
        assert!(with(&["max-age=0, No-Cache"]));
        assert!(with(&["max-age=0", "no-cache"]));
        assert!(!with(&[]));
        assert!(!with(&["no-store"]));
        assert!(!with(&["max-age=0, no-cache-please"]));
    }

    #[test]
    fn a_bearer_value_is_what_follows_the_scheme_without_white_space() {
        assert_eq!(bearer_value(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_value(b"bEaReR a.b-c_d"), Some(&b"a.b-c_d"[..]));
        for bad in [
            &b"Basic abc"[..],
            b"Bearer",
            b"Bearer ",
            b"abc",
            b"Bearerabc",
        ] {
            assert_eq!(bearer_value(bad), None, "{bad:?}");
        }
        for white in [b' ', b'\t', b'\n', b'\r', b'\x0c'] {
            let mut long = b"Bearer ".to_vec();
            long.extend(std::iter::repeat_n(b'x', 700));
            long.push(white);
            long.extend(b"yz");
            assert_eq!(
                bearer_value(&long),
                None,
                "white space {white:#x} let through"
            );
        }
    }
}
