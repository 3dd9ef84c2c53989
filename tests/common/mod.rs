//! Shared by the end-to-end tests: a broker in this process in front of the sandbox Truora, both
//! on loopback port 0, and a small HTTP client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use token_broker::app::Broker as Server;
use token_broker::config::{ClientConfig, Config};
use token_broker::sandbox::{Sandbox, SandboxOptions};
use token_broker::secret::{MasterKey, SecretDigest};
use tokio::sync::oneshot;

/// Polls `ready` every `every` until it holds, and fails with `what()` once `limit` has
/// passed: for what a test waits on that happens a moment later (a process listening, a
/// reload, a line read from a pipe by another thread).
pub async fn wait_for<F, Fut>(
    limit: Duration,
    every: Duration,
    mut ready: F,
    what: impl Fn() -> String,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + limit;
    while !ready().await {
        assert!(std::time::Instant::now() < deadline, "{}", what());
        tokio::time::sleep(every).await;
    }
}

/// [`wait_for`] a process to accept connections on loopback `port`.
pub async fn wait_for_port(port: u16, limit: Duration, every: Duration, what: impl Fn() -> String) {
    wait_for(
        limit,
        every,
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        },
        what,
    )
    .await;
}

/// A master key that is easy to spot in any output.
pub const MASTER_KEY: &str = "CANARY-master-key-7f3a9c1e5b";
pub const CHECKOUT_SECRET: &str = "checkout-secret-0123456789abcdef";
pub const BILLING_SECRET: &str = "billing-secret-0123456789abcdef";
pub const FORM: &str =
    "country=CO&flow_id=IPF0a1b2c&redirect_url=https%3A%2F%2Fshop.example%2Fdone&account_id=user-1";

/// The bearer secret Truora's webhook action sends in these tests.
pub const WEBHOOK_SECRET: &str = "webhook-secret-0123456789abcdef";

/// Turns on `[webhooks]` on loopback port 0, authenticated by [`WEBHOOK_SECRET`].
pub fn with_webhooks(c: &mut Config) {
    c.webhooks = Some(token_broker::config::WebhooksConfig::new(
        loopback(),
        SecretDigest::of(WEBHOOK_SECRET.as_bytes()).to_hex(),
    ));
}

pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A config for `upstream_url`, on port 0, with callers `checkout` and `billing`.
pub fn config(upstream_url: &str) -> Config {
    let mut c = Config::default();
    c.server.listen = loopback();
    c.server.admin_listen = loopback();
    c.upstream.account_url = upstream_url.to_owned();
    c.upstream.web_url = "https://identity.truora.com".to_owned();
    c.upstream.timeout = Duration::from_secs(5);
    for (id, secret) in [("checkout", CHECKOUT_SECRET), ("billing", BILLING_SECRET)] {
        c.clients.push(ClientConfig {
            id: id.into(),
            token_sha256: Some(SecretDigest::of(secret.as_bytes()).to_hex()),
            ..Default::default()
        });
    }
    c
}

pub struct Broker {
    pub url: String,
    pub admin: String,
    /// The webhook listener's base URL, with `[webhooks]`.
    pub webhooks: Option<String>,
    pub sandbox: Sandbox,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

/// A broker of `cfg` (validated first) running in this process.
pub struct Running {
    pub url: String,
    pub admin: String,
    pub webhooks: Option<String>,
    pub stop: oneshot::Sender<()>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Running {
    pub async fn start(cfg: &Config) -> Self {
        cfg.validate().unwrap();
        let server = Server::from_config(cfg, MasterKey::new(MASTER_KEY).unwrap())
            .await
            .unwrap();
        Self::run(server)
    }

    /// Runs a broker already built, until `stop` is sent.
    pub fn run(server: Server) -> Self {
        let url = format!("http://{}", server.caller_addr().unwrap());
        let admin = format!("http://{}", server.admin_addr().unwrap());
        let webhooks = server.webhook_addr().map(|a| format!("http://{a}"));
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Running {
            url,
            admin,
            webhooks,
            stop,
            task,
        }
    }
}

/// A free loopback port (free when asked; bind it soon).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Broker {
    /// A sandbox and a broker in front of it; `tweak` adjusts the config and sandbox first.
    pub async fn start(tweak: impl FnOnce(&mut Config, &mut SandboxOptions)) -> Self {
        let mut options = SandboxOptions::new(MASTER_KEY);
        let mut cfg = config("http://placeholder");
        tweak(&mut cfg, &mut options);
        let sandbox = Sandbox::start(options).await.unwrap();
        cfg.upstream.account_url = sandbox.url();
        cfg.upstream.identity_url = sandbox.url();
        let Running {
            url,
            admin,
            webhooks,
            stop,
            task,
        } = Running::start(&cfg).await;
        Broker {
            url,
            admin,
            webhooks,
            sandbox,
            stop: Some(stop),
            task,
        }
    }

    pub async fn tokens(&self, secret: &str, form: &str) -> Resp {
        post_tokens(&self.url, secret, form).await
    }

    pub async fn metrics(&self) -> String {
        let r = send(Method::GET, &format!("{}/metrics", self.admin), &[], "").await;
        assert_eq!(r.status, StatusCode::OK);
        r.text()
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Debug, Clone)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON: {}", self.text()))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    /// Status line, headers and body, for looking for leaks.
    pub fn everything(&self) -> String {
        let mut s = format!("{}\n", self.status);
        for (k, v) in &self.headers {
            s.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
        }
        s.push_str(&self.text());
        s
    }
}

/// `POST <base>/v1/tokens` with a bearer secret and a form body.
pub async fn post_tokens(base: &str, secret: &str, form: &str) -> Resp {
    send(
        Method::POST,
        &format!("{base}/v1/tokens"),
        &[
            ("authorization", &format!("Bearer {secret}")),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        form,
    )
    .await
}

/// Fails if the master key or a caller secret appears in `text`, raw or encoded (base64,
/// URL, hex): the canary check every end-to-end answer goes through.
pub fn assert_no_secret_in(text: &str) {
    use base64::Engine;
    for secret in [MASTER_KEY, CHECKOUT_SECRET, BILLING_SECRET] {
        let forms = [
            secret.to_owned(),
            base64::engine::general_purpose::STANDARD.encode(secret),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret),
            form_urlencoded::byte_serialize(secret.as_bytes()).collect(),
            token_broker::secret::hex(secret.as_bytes()),
        ];
        for form in forms {
            assert!(
                !text.contains(&form),
                "a secret ({form}) appears in the output"
            );
        }
    }
}

/// One request on a fresh connection, bounded to 20 s.
pub async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    let resp = Resp {
        status: parts.status,
        headers: parts.headers,
        body,
    };
    assert_no_secret_in(&resp.everything());
    resp
}

/// A `token-broker serve` process of its own for `cfg` (on free loopback ports, its file in
/// `dir`), ready when returned, killed when dropped.
pub struct Process {
    pub child: tokio::process::Child,
    pub url: String,
}

impl Process {
    pub async fn start(dir: &std::path::Path, name: &str, mut cfg: Config) -> Self {
        let (listen, admin) = (free_port(), free_port());
        cfg.server.listen = format!("127.0.0.1:{listen}").parse().unwrap();
        cfg.server.admin_listen = format!("127.0.0.1:{admin}").parse().unwrap();
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_token-broker"))
            .args(["serve", "--config", path.to_str().unwrap()])
            .env("TRUORA_API_KEY", MASTER_KEY)
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        wait_for_port(
            admin,
            Duration::from_secs(20),
            Duration::from_millis(20),
            || format!("{name} did not start"),
        )
        .await;
        let health = send(
            Method::GET,
            &format!("http://127.0.0.1:{admin}/healthz"),
            &[],
            "",
        )
        .await;
        assert_eq!(health.status, StatusCode::OK);
        Process {
            child,
            url: format!("http://127.0.0.1:{listen}"),
        }
    }
}
