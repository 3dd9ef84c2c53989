//! The floor of `make bench-e2e`: a bare hyper 1.x server on the same stack as the broker
//! (hyper-util's auto h1/h2 builder, the same header-read timer, `TCP_NODELAY`, tokio's
//! multi-threaded runtime) that reads each request's body and answers fixed bytes with the
//! broker's headers. It authenticates nothing, parses nothing and caches nothing: what the
//! broker does beyond this is what the broker costs.
//!
//! `cargo run --release --example floor -- BODY_FILE ADDR_FILE [WORK_NS]`: serves the bytes of
//! BODY_FILE on a free loopback port, writes `127.0.0.1:PORT` to ADDR_FILE, and runs until SIGTERM
//! or Ctrl-C. With WORK_NS, each request first keeps its worker busy for that many nanoseconds
//! (a spin on the clock): `make bench-e2e`'s `floor+N` rows, which show what a given amount of
//! CPU added to each request costs in requests/s on the benchmark's machine.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(body_file), Some(addr_file)) = (args.next(), args.next()) else {
        return Err("usage: floor BODY_FILE ADDR_FILE [WORK_NS]".into());
    };
    let work = match args.next() {
        Some(ns) => Duration::from_nanos(
            ns.parse()
                .map_err(|_| format!("WORK_NS {ns:?}: not a number"))?,
        ),
        None => Duration::ZERO,
    };
    let body = Bytes::from(std::fs::read(body_file)?);
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    std::fs::write(addr_file, listener.local_addr()?.to_string())?;

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    builder.http2().timer(TokioTimer::new());

    let serve = async {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let body = body.clone();
            let builder = builder.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let body = body.clone();
                    async move {
                        // Read the body, as the broker must, then answer the fixed bytes.
                        let _ = req.into_body().collect().await;
                        busy(work);
                        let mut r = Response::new(Full::new(body));
                        let h = r.headers_mut();
                        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
                        h.insert("x-cache", HeaderValue::from_static("HIT"));
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    };
    tokio::select! {
        () = serve => {}
        () = token_broker::app::process::shutdown_signal() => {}
    }
    Ok(())
}

/// Keeps this thread busy for `work` (nothing when zero).
fn busy(work: Duration) {
    if work.is_zero() {
        return;
    }
    let start = std::time::Instant::now();
    while start.elapsed() < work {
        std::hint::spin_loop();
    }
}
