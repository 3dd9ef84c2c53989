//! `token-broker demo`: the broker in front of the embedded sandbox Truora (see
//! [`crate::sandbox`]), with one demo caller, and ready-to-paste curl commands. Needs nothing
//! else: no config file, no master key.

use std::net::SocketAddr;
use std::time::Duration;

use super::process::{log_ready, shutdown_signal};
use super::{Broker, StartError};
use crate::config::{ClientConfig, Config};
use crate::sandbox::{Sandbox, SandboxOptions};
use crate::secret::{hex, MasterKey, SecretDigest};

/// The demo client's secret, printed in the demo's curl commands.
pub const DEMO_SECRET: &str = "demo-secret";

/// Runs the demo until SIGTERM or Ctrl-C.
pub async fn run(listen: SocketAddr, admin_listen: SocketAddr) -> Result<(), StartError> {
    let mut raw_key = [0u8; 24];
    getrandom::fill(&mut raw_key).map_err(|_| StartError::Random)?;
    let master_key = format!("sandbox-{}", hex(&raw_key));
    let sandbox = Sandbox::start(SandboxOptions::new(master_key.clone()))
        .await
        .map_err(StartError::Sandbox)?;
    let config = demo_config(&sandbox.url(), listen, admin_listen);
    config.validate()?;
    // "sandbox-" and 48 hex digits: never blank.
    let key = MasterKey::new(&master_key).ok_or(StartError::Random)?;
    let fingerprint = key.fingerprint();
    let broker = Broker::from_config(&config, key).await?;
    let (caller, admin) = broker.addresses();
    log_ready(&broker, 1, &fingerprint);
    println!("{}", demo_instructions(caller, admin, &sandbox.url()));
    broker.run(shutdown_signal()).await;
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
pub fn demo_instructions(caller: SocketAddr, admin: SocketAddr, sandbox: &str) -> String {
    let base = format!("http://{caller}");
    format!(
        r#"
token-broker demo is running.
  caller API : {base}   (client "demo", secret "{DEMO_SECRET}")
  admin      : http://{admin}   (status page at /, /metrics, /healthz, /readyz)
  upstream   : {sandbox}   (embedded sandbox Truora: real JWTs, Truora's error shapes)

Mint a token (run it twice: the second answer says "cache":"hit" and carries the same api_key):

  curl -s -X POST {base}/v1/tokens -H 'Authorization: Bearer {DEMO_SECRET}' \
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
