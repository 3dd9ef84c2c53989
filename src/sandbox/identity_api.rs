//! The sandbox's imitation of Truora's identity API, as far as the pass-through tests and the
//! process life need it: `GET /v1/processes/<id>/result` (the processes this sandbox minted
//! tokens for, plus the fixed `missing` and `pending...` ids), `GET /v1/stream?bytes=N` (N bytes,
//! streamed), and any other call echoing what it received. Every call is recorded as a
//! [`Forwarded`], and answered only with the right `Truora-API-Key`.

use std::io;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::{json, lock, truora_error, SandBody, Shared};

/// What a pass-through request looked like when it reached the sandbox.
#[derive(Debug, Clone)]
pub struct Forwarded {
    /// Method.
    pub method: String,
    /// Path and query.
    pub path_and_query: String,
    /// Whether `Truora-API-Key` held the right key.
    pub key_matched: bool,
    /// The Host header.
    pub host: String,
    /// The X-Forwarded-For header.
    pub forwarded_for: String,
    /// Every header name received, lower-case.
    pub header_names: Vec<String>,
    /// Body bytes received.
    pub body_bytes: u64,
}

/// A body of `left` bytes of `x`, produced 64 KiB at a time as it is read.
struct Stream {
    left: u64,
}

impl http_body::Body for Stream {
    type Data = Bytes;
    type Error = io::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, io::Error>>> {
        const CHUNK: &[u8] = &[b'x'; 64 * 1024];
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.left.min(CHUNK.len() as u64);
        self.left -= n;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
            &CHUNK[..n as usize],
        )))))
    }
}

/// Answers one identity-API call (see the module's doc).
pub(super) async fn identity_api(
    shared: &Shared,
    req: Request<Incoming>,
) -> io::Result<Response<SandBody>> {
    let options = lock(&shared.options).clone();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let key_matched = req.headers().get("truora-api-key").map(|v| v.as_bytes())
        == Some(options.master_key.as_bytes());
    let mut forwarded = Forwarded {
        method: req.method().to_string(),
        path_and_query: req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default(),
        key_matched,
        host: header("host"),
        forwarded_for: header("x-forwarded-for"),
        header_names: req
            .headers()
            .keys()
            .map(|k| k.as_str().to_owned())
            .collect(),
        body_bytes: 0,
    };
    let query = req.uri().query().unwrap_or("").to_owned();
    let path = req.uri().path().to_owned();
    let mut body = req.into_body();
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame.map_err(io::Error::other)?.data_ref() {
            forwarded.body_bytes += data.len() as u64;
        }
    }
    lock(&shared.forwarded).push(forwarded.clone());
    if !key_matched {
        return Ok(truora_error(401));
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let mut response = match segments.as_slice() {
        ["v1", "processes", id, "result"] => process_result(shared, id),
        ["v1", "stream"] => {
            let bytes = form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == "bytes")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            let mut r = Response::new(Stream { left: bytes }.boxed_unsync());
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/octet-stream"),
            );
            r
        }
        _ => json(
            StatusCode::OK,
            serde_json::json!({ "method": forwarded.method, "path": forwarded.path_and_query, "received_bytes": forwarded.body_bytes }).to_string(),
        ),
    };
    // Hop-by-hop headers a proxy must not pass on.
    response.headers_mut().insert(
        http::header::HeaderName::from_static("keep-alive"),
        http::HeaderValue::from_static("timeout=5"),
    );
    response.headers_mut().insert(
        http::header::HeaderName::from_static("proxy-authenticate"),
        http::HeaderValue::from_static("Basic"),
    );
    Ok(response)
}

/// A process this sandbox minted a token for answers its own state; for any other id, `missing`
/// is 404, `pending...` is pending and the rest have succeeded (the pass-through tests' fixtures).
fn process_result(shared: &Shared, id: &str) -> Response<SandBody> {
    if let Some(process) = lock(&shared.processes).by_process_id(id) {
        return json(StatusCode::OK, process.result_json());
    }
    if id == "missing" {
        return json(
            StatusCode::NOT_FOUND,
            r#"{"code":10404,"http_code":404,"message":"process not found"}"#.to_owned(),
        );
    }
    let status = if id.starts_with("pending") {
        "pending"
    } else {
        "success"
    };
    json(
        StatusCode::OK,
        serde_json::json!({ "process_id": id, "status": status, "validations": [] }).to_string(),
    )
}
