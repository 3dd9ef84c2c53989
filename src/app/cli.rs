//! The command line: `serve`, `demo`, `check-config` and `hash-secret`.
//!
//! Exit statuses: 0 on success; 64 (EX_USAGE) for a configuration that cannot be used, reported
//! before any socket is bound; 1 for a failure at run time (a port already taken, say).

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use super::process::{
    descriptor_limit_warning, harden_process, log_ready, reload_on_sighup, shutdown_signal,
};
use super::{demo, load, Broker, Loaded, StartError};
use crate::config::ConfigError;
use crate::logging::{self, LogFormat};
use crate::secret::SecretDigest;
use crate::server::Listeners;

/// Exit status for an unusable configuration (sysexits' EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

/// Holds Truora's master API key alone and hands short-lived Web Integration Tokens to
/// authenticated internal callers, reusing each token until it nears expiry.
#[derive(Debug, Parser)]
#[command(
    name = "token-broker",
    version = env!("TOKEN_BROKER_VERSION"),
    about,
    long_about = None,
    after_help = "Run `token-broker <COMMAND> --help` for each command's options, environment and exit statuses.",
    after_long_help = TOP_AFTER_HELP
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Shown after `token-broker --help`.
const TOP_AFTER_HELP: &str = "\
Callers authenticate with `Authorization: Bearer <secret>` and ask for tokens with
POST /v1/tokens (the broker's JSON answer) or POST /v1/api-keys (a drop-in for Truora's own
endpoint); DELETE /v1/tokens forgets cached tokens. /metrics, /healthz and /readyz are served on a
separate admin listener.

Exit statuses:
  0   success; `serve` and `demo` after SIGTERM or Ctrl-C and a graceful drain
  64  unusable configuration or secret, reported before any socket is bound
  1   failure at run time, such as an address already in use

Documentation: README.md, docs/api.md, docs/configuration.md, docs/operations.md.";

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker with a config file.
    ///
    /// Reads and validates the TOML config file and the master key, binds the caller listener
    /// (`server.listen`) and the admin listener (`server.admin_listen`), and serves until SIGTERM
    /// or Ctrl-C. Then it stops accepting connections, lets in-flight requests finish for at most
    /// `server.shutdown_timeout` (10 s by default) and exits with status 0.
    #[command(after_long_help = SERVE_AFTER_HELP)]
    Serve {
        /// The TOML config file (every key: docs/configuration.md).
        #[arg(long, env = "TOKEN_BROKER_CONFIG", value_name = "FILE")]
        config: PathBuf,
        /// Log format on stderr: human-readable lines, or one JSON object per line.
        #[arg(long, env = "TOKEN_BROKER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Run the broker in front of an embedded sandbox Truora, with one demo client, and print
    /// ready-to-paste curl commands. Needs nothing else.
    ///
    /// The sandbox mints real JWTs and answers in Truora's error shapes; a flow id
    /// `IPFsandbox<status>` (for instance `IPFsandbox429`) makes it answer that error. The demo
    /// client's secret is `demo-secret`. Its identity page lets a person approve or decline the
    /// process; the sandbox then delivers Truora's signed webhook to the broker's webhook
    /// listener, which drops that process's token. No config file and no master key are read.
    /// Ctrl-C or SIGTERM stops it (exit 0); an address already in use exits with status 1.
    Demo {
        /// Address of the caller API (POST /v1/tokens, POST /v1/api-keys, DELETE /v1/tokens).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Address of the admin endpoints (/, /metrics, /healthz, /readyz, POST /admin/reload).
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: SocketAddr,
        /// Address of the sandbox Truora (minting, its identity page, the identity API).
        #[arg(long, default_value = "127.0.0.1:8081")]
        sandbox_listen: SocketAddr,
        /// Address of the broker's webhook listener, which the sandbox delivers to.
        #[arg(long, default_value = "127.0.0.1:8082")]
        webhook_listen: SocketAddr,
    },
    /// Validate a config file (and that the master key can be read), then exit: 0 when good,
    /// 64 with a message naming the bad key when not.
    ///
    /// Runs the same checks as `serve` without binding any socket and without calling Truora.
    /// The master key is read from `upstream.api_key_file`, or from TRUORA_API_KEY when that key
    /// is not set; it is never printed.
    #[command(after_long_help = CHECK_CONFIG_AFTER_HELP)]
    CheckConfig {
        /// The TOML config file (every key: docs/configuration.md).
        #[arg(long, env = "TOKEN_BROKER_CONFIG", value_name = "FILE")]
        config: PathBuf,
    },
    /// Read a caller secret on stdin (a trailing newline is not part of it) and print its hex
    /// SHA-256 for `[[clients]] token_sha256`.
    ///
    /// The caller keeps the secret and sends it as `Authorization: Bearer <secret>`; the config
    /// holds only this digest. An empty secret, or one holding white space or control characters
    /// (which a caller could not send as a bearer token), is refused with exit status 64; a secret
    /// of fewer than 16 characters gets a warning on stderr.
    #[command(after_long_help = HASH_SECRET_AFTER_HELP)]
    HashSecret,
}

/// Shown after `token-broker serve --help`.
const SERVE_AFTER_HELP: &str = "\
Environment:
  TOKEN_BROKER_CONFIG      the config file, when --config is not given
  TOKEN_BROKER_LOG_FORMAT  text or json, when --log-format is not given
  TRUORA_API_KEY           Truora's master API key, read only when upstream.api_key_file is not set
  RUST_LOG                 log level filter (default: info)

Exit statuses:
  0   stopped by SIGTERM or Ctrl-C after the drain
  64  the config file or the master key cannot be used; the message names the key at fault
  1   failure at run time, such as an address already in use

Example:
  token-broker serve --config /etc/token-broker/config.toml --log-format json";

/// Shown after `token-broker check-config --help`.
const CHECK_CONFIG_AFTER_HELP: &str = "\
Environment:
  TOKEN_BROKER_CONFIG  the config file, when --config is not given
  TRUORA_API_KEY       Truora's master API key, read only when upstream.api_key_file is not set

Exit statuses:
  0   usable; prints `<file>: ok (<n> caller(s); callers on <addr>, admin on <addr>)`
  64  not usable; prints `token-broker: bad configuration: <key>: <reason>` on stderr

Example:
  token-broker check-config --config /etc/token-broker/config.toml";

/// Shown after `token-broker hash-secret --help`.
const HASH_SECRET_AFTER_HELP: &str = "\
Exit statuses:
  0   the digest was printed on stdout
  64  the secret is empty or holds white space or control characters

Example:
  SECRET=$(openssl rand -hex 32)
  printf '%s' \"$SECRET\" | token-broker hash-secret";

/// Runs the command line and returns the process exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Serve { .. } | Command::Demo { .. }) {
        harden_process();
    }
    match cli.command {
        Command::Serve { config, log_format } => {
            let logs = logging::init(log_format);
            match load(&config) {
                Ok(loaded) => run(&logs, serve(config, loaded)),
                Err(e) => config_failure(&e),
            }
        }
        Command::Demo {
            listen,
            admin_listen,
            sandbox_listen,
            webhook_listen,
        } => {
            let logs = logging::init(LogFormat::Text);
            run(
                &logs,
                demo::run(demo::DemoAddresses {
                    listen,
                    admin_listen,
                    sandbox_listen,
                    webhook_listen,
                }),
            )
        }
        Command::CheckConfig { config } => match load(&config) {
            Ok(Loaded {
                config: c,
                warnings,
                ..
            }) => {
                for warning in warnings {
                    eprintln!("token-broker: warning: {warning}");
                }
                println!(
                    "{}: ok ({} caller(s); callers on {}, admin on {})",
                    config.display(),
                    c.clients.len(),
                    c.server.listen,
                    c.server.admin_listen
                );
                ExitCode::SUCCESS
            }
            Err(e) => config_failure(&e),
        },
        Command::HashSecret => hash_secret(),
    }
}

fn config_failure(e: &ConfigError) -> ExitCode {
    eprintln!("token-broker: bad configuration: {e}");
    ExitCode::from(EXIT_CONFIG)
}

/// Runs `fut` on the multi-threaded runtime whose workers batch their log lines into `logs`.
fn run(
    logs: &logging::Output,
    fut: impl std::future::Future<Output = Result<(), StartError>>,
) -> ExitCode {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    let runtime = match logging::batch_workers(&mut builder, logs).build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("token-broker: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(StartError::Config(e)) => config_failure(&e),
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("token-broker: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(path: PathBuf, loaded: Loaded) -> Result<(), StartError> {
    let Loaded {
        config,
        key,
        warnings,
    } = loaded;
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    let fingerprint = key.fingerprint();
    let broker = Broker::from_config(&config, key).await?;
    if let Some(warning) = descriptor_limit_warning(Listeners::descriptors_needed(&config.server)) {
        tracing::warn!("{warning}");
    }
    if let Some(reloader) = broker.reload_from(path, config.clone()) {
        reload_on_sighup(reloader);
    }
    if config.upstream.account_url.starts_with("http://") {
        tracing::warn!(
            account_url = %config.upstream.account_url,
            "upstream.account_url is plain http: the master key crosses the network unencrypted"
        );
    }
    log_ready(&broker, config.clients.len(), &fingerprint);
    broker.run(shutdown_signal()).await;
    tracing::info!("stopped");
    Ok(())
}

fn hash_secret() -> ExitCode {
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        eprintln!("token-broker: cannot read stdin: {e}");
        return ExitCode::FAILURE;
    }
    let secret = zeroize::Zeroizing::new(input);
    let mut end = secret.len();
    if secret[..end].ends_with(b"\n") {
        end -= 1;
        if secret[..end].ends_with(b"\r") {
            end -= 1;
        }
    }
    let secret = &secret[..end];
    if secret.is_empty() {
        eprintln!("token-broker: the secret on stdin is empty");
        return ExitCode::from(EXIT_CONFIG);
    }
    if secret
        .iter()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        eprintln!("token-broker: the secret holds white space or control characters; callers could not send it as a bearer token");
        return ExitCode::from(EXIT_CONFIG);
    }
    if secret.len() < 16 {
        eprintln!("token-broker: warning: a secret of fewer than 16 characters is easy to guess");
    }
    println!("{}", SecretDigest::of(secret).to_hex());
    ExitCode::SUCCESS
}
