//! `token-broker demo`: the broker in front of the embedded sandbox Truora (see
//! [`crate::sandbox`]), with one demo caller, its webhook listener on, and ready-to-paste curl
//! commands. Needs nothing else: no config file, no master key. The sandbox plays Truora
//! whole: it mints, serves an identity page where a person approves or declines the process,
//! and then delivers a signed webhook to the broker, which drops that process's token.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::process::{log_ready, shutdown_signal};
use super::{Broker, StartError};
use crate::config::{ClientConfig, Config, WebhooksConfig};
use crate::sandbox::{ClaimNames, Sandbox, SandboxOptions, WebhookTarget};
use crate::secret::{hex, MasterKey, SecretDigest};

/// The demo client's secret, printed in the demo's curl commands.
pub const DEMO_SECRET: &str = "demo-secret";

/// Where the demo listens.
#[derive(Debug, Clone, Copy)]
pub struct DemoAddresses {
    /// The caller API.
    pub listen: SocketAddr,
    /// The admin endpoints.
    pub admin_listen: SocketAddr,
    /// The sandbox Truora (minting, identity page, identity API).
    pub sandbox_listen: SocketAddr,
    /// The broker's webhook listener, which the sandbox delivers to.
    pub webhook_listen: SocketAddr,
}

/// The demo's webhook signing secret on disk (mode 0600), removed when the demo ends.
struct SecretFile(PathBuf);

impl SecretFile {
    fn write(secret: &str) -> Result<Self, StartError> {
        let path = std::env::temp_dir().join(format!(
            "token-broker-demo-{}-webhook-signing-secret",
            std::process::id()
        ));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let written = options
            .open(&path)
            .and_then(|mut f| f.write_all(secret.as_bytes()));
        written.map_err(StartError::Sandbox)?;
        Ok(Self(path))
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Random hex of `n` bytes.
fn random_hex(n: usize) -> Result<String, StartError> {
    let mut raw = vec![0u8; n];
    getrandom::fill(&mut raw).map_err(|_| StartError::Random)?;
    Ok(hex(&raw))
}

/// Runs the demo until SIGTERM or Ctrl-C.
pub async fn run(at: DemoAddresses) -> Result<(), StartError> {
    let master_key = format!("sandbox-{}", random_hex(24)?);
    let bearer = random_hex(24)?;
    let signing_secret = random_hex(32)?;
    let secret_file = SecretFile::write(&signing_secret)?;
    let sandbox = Sandbox::start_on(at.sandbox_listen, SandboxOptions::new(master_key.clone()))
        .await
        .map_err(StartError::Sandbox)?;
    let mut config = demo_config(&sandbox.url(), at.listen, at.admin_listen);
    let mut webhooks = WebhooksConfig::new(
        at.webhook_listen,
        SecretDigest::of(bearer.as_bytes()).to_hex(),
    );
    webhooks.signing_secret_file = Some(secret_file.0.clone());
    config.webhooks = Some(webhooks);
    config.validate()?;
    // "sandbox-" and 48 hex digits: never blank.
    let key = MasterKey::new(&master_key).ok_or(StartError::Random)?;
    let fingerprint = key.fingerprint();
    let broker = Broker::from_config(&config, key).await?;
    let (caller, admin) = broker.addresses();
    let webhook = broker.webhook_addr().unwrap_or(at.webhook_listen);
    sandbox.set_webhook(Some(WebhookTarget {
        url: format!("http://{webhook}/webhooks/truora"),
        bearer,
        signing_secret: Some(signing_secret.into_bytes()),
        claims: ClaimNames::default(),
        event_in_query: false,
    }));
    log_ready(&broker, 1, &fingerprint);
    println!(
        "{}",
        demo_instructions(caller, admin, &sandbox.url(), webhook)
    );
    broker.run(shutdown_signal()).await;
    drop(secret_file);
    Ok(())
}

/// The demo's configuration: the sandbox as upstream, one client `demo` with [`DEMO_SECRET`].
pub fn demo_config(sandbox_url: &str, listen: SocketAddr, admin_listen: SocketAddr) -> Config {
    let mut config = Config::default();
    config.server.listen = listen;
    config.server.admin_listen = admin_listen;
    config.server.shutdown_timeout = Duration::from_secs(2);
    config.upstream.account_url = sandbox_url.to_owned();
    config.upstream.identity_url = sandbox_url.to_owned();
    config.upstream.web_url = sandbox_url.to_owned();
    config.clients.push(ClientConfig {
        id: "demo".into(),
        token_sha256: Some(SecretDigest::of(DEMO_SECRET.as_bytes()).to_hex()),
        passthrough: vec!["GET /truora/identity/v1/processes/*/result".into()],
        ..Default::default()
    });
    config
}

/// What `demo` prints: where things are and curl commands to paste.
pub fn demo_instructions(
    caller: SocketAddr,
    admin: SocketAddr,
    sandbox: &str,
    webhook: SocketAddr,
) -> String {
    let base = format!("http://{caller}");
    format!(
        r#"
token-broker demo is running.
  caller API : {base}   (client "demo", secret "{DEMO_SECRET}")
  admin      : http://{admin}   (status page at /, /metrics, /healthz, /readyz)
  upstream   : {sandbox}   (embedded sandbox Truora: real JWTs, Truora's error shapes)
  webhooks   : http://{webhook}/webhooks/truora   (the sandbox delivers Truora's webhooks here)

Mint a token (run it twice: the second answer says "cache":"hit" and carries the same api_key):

  curl -s -X POST {base}/v1/tokens -H 'Authorization: Bearer {DEMO_SECRET}' \
    -d country=CO -d flow_id=IPF0123456789abcdef -d redirect_url=https://example.com/done -d account_id=demo-user-1

One token is one verification process. Open the answer's identity_url in a browser and press
Approve or Decline: the sandbox then delivers Truora's signed webhook to the broker, which drops
that user's token for that flow, so the next request above is a new token ("cache":"miss").
From the shell (put the api_key in TOKEN):

  curl -s -X POST {sandbox}/sandbox/processes/finish -d outcome=decline -d "token=$TOKEN"

Ask for a new process yourself (a fresh token that replaces the cached one):

  curl -s -X POST {base}/v1/tokens -H 'Authorization: Bearer {DEMO_SECRET}' -H 'Cache-Control: no-cache' \
    -d country=CO -d flow_id=IPF0123456789abcdef -d redirect_url=https://example.com/done -d account_id=demo-user-1

The same as JSON:

  curl -s -X POST {base}/v1/tokens -H 'Authorization: Bearer {DEMO_SECRET}' -H 'Content-Type: application/json' \
    -d '{{"country":"CO","flow_id":"IPF0123456789abcdef","redirect_url":"https://example.com/done","account_id":"demo-user-1"}}'

Drop-in for Truora's own endpoint (same form, Truora's answer shape):

  curl -s -X POST {base}/v1/api-keys -H 'Authorization: Bearer {DEMO_SECRET}' \
    -d key_type=web -d grant=digital-identity -d country=CO -d flow_id=IPF0123456789abcdef \
    -d redirect_url=https://example.com/done -d account_id=demo-user-1

Forget the cached tokens of a user:

  curl -s -X DELETE '{base}/v1/tokens?account_id=demo-user-1' -H 'Authorization: Bearer {DEMO_SECRET}'

Refused before anything goes upstream (a permanent key, a bad country):

  curl -s -X POST {base}/v1/tokens -H 'Authorization: Bearer {DEMO_SECRET}' \
    -d key_type=backend -d country=CO -d flow_id=IPF1 -d redirect_url=https://example.com/done

Truora failing (flow IPFsandbox429 answers 429, IPFsandbox500 a 500, IPFsandbox401 a rejected key):

  curl -s -i -X POST {base}/v1/tokens -H 'Authorization: Bearer {DEMO_SECRET}' \
    -d country=CO -d flow_id=IPFsandbox429 -d redirect_url=https://example.com/done -d account_id=demo-user-1

Read a validation result through the broker (pass-through: the master key is added by the broker):

  curl -s {base}/truora/identity/v1/processes/IDP0123456789/result -H 'Authorization: Bearer {DEMO_SECRET}'

Metrics:

  curl -s http://{admin}/metrics | grep ^token_broker_

Ctrl-C stops the demo.
"#
    )
}
