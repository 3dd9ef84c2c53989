//! The process around a running broker: hardening (no core dumps, not dumpable, panic messages
//! withheld), signals (SIGTERM and Ctrl-C drain, SIGHUP reloads) and the line that says it is up.

use super::{Broker, Reloader};

/// Logs the line that says the broker is up, where and with which key.
pub fn log_ready(broker: &Broker, callers: usize, key: &str) {
    let (caller, admin) = broker.addresses();
    let webhooks = broker.webhook_addr().map(|a| a.to_string());
    tracing::info!(
        listen = %caller,
        admin_listen = %admin,
        webhooks_listen = webhooks.as_deref().unwrap_or("-"),
        callers,
        key,
        "token-broker {} ready",
        env!("CARGO_PKG_VERSION")
    );
}

/// Re-reads the configuration on every SIGHUP.
pub fn reload_on_sighup(reloader: std::sync::Arc<Reloader>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        tracing::info!("SIGHUP: reloading the configuration");
                        // Reads its files on the blocking pool.
                        let _ = reloader
                            .reload_by(super::reload::Trigger::Sighup, &[])
                            .await;
                    }
                });
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGHUP, reload only via POST /admin/reload: {e}")
            }
        }
    }
    #[cfg(not(unix))]
    let _ = reloader;
}

/// A warning when the process may open fewer files than `needed` (its soft `RLIMIT_NOFILE`):
/// past it, accepting fails while the connection caps still allow more.
pub fn descriptor_limit_warning(needed: u64) -> Option<String> {
    #[cfg(target_os = "linux")]
    {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        let soft = limit.current?;
        (soft < needed).then(|| {
            format!(
                "the open-file limit is {soft}, below the {needed} that server.max_connections, server.admin_max_connections and 256 more need: raise it (ulimit -n, LimitNOFILE=) or lower the caps"
            )
        })
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = needed;
        None
    }
}

/// Keeps secrets out of core dumps and other processes' reach: no core files
/// (RLIMIT_CORE = 0), not dumpable or ptrace-attachable by other users (PR_SET_DUMPABLE = 0).
/// Panics are logged with their location only, never their message, which could hold data.
pub fn harden_process() {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{setrlimit, Resource, Rlimit};
        if let Err(e) = setrlimit(
            Resource::Core,
            Rlimit {
                current: Some(0),
                maximum: Some(0),
            },
        ) {
            eprintln!("token-broker: warning: cannot turn core dumps off: {e}");
        }
        if let Err(e) =
            rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        {
            eprintln!("token-broker: warning: cannot mark the process not dumpable: {e}");
        }
    }
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(
            location,
            "panic (message withheld: it may hold request data)"
        );
        eprintln!("token-broker: panic at {location}");
    }));
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown requested");
}
