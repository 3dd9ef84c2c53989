//! The fast fake Truora of `make bench-e2e` and `make bench-misses`: the broker's embedded
//! sandbox ([`token_broker::sandbox::Sandbox`]) run alone, answering at once with real JWTs.
//!
//! `cargo run --release --example fake_truora -- KEY_FILE ADDR_FILE`: accepts the master key held
//! in KEY_FILE (never printed), serves on a free loopback port and writes two lines to ADDR_FILE:
//! its base URL, then the address of a control port whose every answer is the number of
//! `POST /v1/api-keys` calls so far. Runs until SIGTERM or Ctrl-C.

use std::sync::Arc;

use token_broker::sandbox::{Sandbox, SandboxOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(key_file), Some(addr_file)) = (args.next(), args.next()) else {
        return Err("usage: fake_truora KEY_FILE ADDR_FILE".into());
    };
    let key = std::fs::read_to_string(key_file)?;
    let sandbox = Arc::new(Sandbox::start(SandboxOptions::new(key.trim())).await?);
    let control = TcpListener::bind(("127.0.0.1", 0)).await?;
    std::fs::write(
        addr_file,
        format!("{}\n{}\n", sandbox.url(), control.local_addr()?),
    )?;

    let serve_control = async {
        loop {
            let Ok((mut stream, _)) = control.accept().await else {
                continue;
            };
            let calls = sandbox.calls().to_string();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{calls}",
                    calls.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    };
    tokio::select! {
        () = serve_control => {}
        () = token_broker::app::process::shutdown_signal() => {}
    }
    Ok(())
}
