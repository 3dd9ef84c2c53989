//! The audit trail: one event per thing an auditor asks about (a token minted, and with
//! `audit.include_hits` handed out again; tokens dropped and why; a caller revoked; a reload; a
//! webhook delivery refused; a peer failing to authenticate again and again; a pass-through
//! call), written as JSON lines to `audit.file` ([`file`]), or without one as the `audit` log
//! target on stderr. The events and what they never hold are [`event`]'s; users are named by
//! keyed tags ([`tag`]); floods are rate-limited per peer ([`peers`]).
//!
//! A leaf: the rooms that act (the issuance core, the pass-through, the webhook receiver, auth,
//! the reloader) describe what they did with plain values, and the trail writes it.
//!
//! When the file cannot be written, `audit.on_failure` decides: `continue` counts what is lost
//! (`token_broker_audit_events_lost_total`); `refuse` makes [`Audit::available`] false, so that
//! mints and pass-through calls are refused before any upstream call, and a mint in progress
//! waits for its event to reach the disk ([`Audit::record_durable`]) before its token is handed
//! out. Either way the broker runs, and `token_broker_audit_writable` says why.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::oneshot;

use crate::config::{AuditConfig, OnFailure};

pub mod event;
mod file;
mod peers;
pub mod tag;

pub use event::Event;
pub use peers::{AUTH_THRESHOLD, WEBHOOK_BURST, WINDOW};
pub use tag::{Identifier, KeySource, Tag, TagKey, TagKeyError, UserTags};

/// Who asked for what an event records: the request's id and its caller's address. Plain
/// values, so that the core can pass them on without knowing HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin<'a> {
    /// The request id (`X-Request-Id`, given or made), `-` when there is no request.
    pub request_id: &'a str,
    /// The caller's address, when the connection has one.
    pub peer: Option<IpAddr>,
}

impl Origin<'static> {
    /// No request: a test, a bench, or work of the broker's own.
    pub const NONE: Self = Self {
        request_id: "-",
        peer: None,
    };
}

/// The trail could not take an event: under `on_failure = "refuse"`, what was asked is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the audit trail cannot be written")]
pub struct Unwritable;

/// The trail's series (docs/observability.md lists them).
pub struct AuditMetrics {
    events: IntCounterVec,
    lost: IntCounterVec,
    write_failures: IntCounter,
    writable: IntGauge,
    refused: IntCounterVec,
    write_duration: Histogram,
}

impl AuditMetrics {
    fn new() -> prometheus::Result<Self> {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        let m = Self {
            events: counter(
                "token_broker_audit_events_total",
                "Audit events handed to the trail (audit.file, or stderr without it), by event: start, mint, hit, invalidation, revocation, reload, webhook_refused, auth_failures, passthrough, resumed.",
                &["event"],
            )?,
            lost: counter(
                "token_broker_audit_events_lost_total",
                "Audit events that did not reach audit.file, by reason: write_error (opening, writing or syncing failed), queue_full (the writer fell behind).",
                &["reason"],
            )?,
            write_failures: IntCounter::new(
                "token_broker_audit_write_failures_total",
                "Attempts to open, write or sync audit.file that failed (retried every second while failing).",
            )?,
            writable: IntGauge::new(
                "token_broker_audit_writable",
                "1 when the audit trail took its last write (audit.file written and synced, or stderr), 0 when not: with on_failure = refuse, mints and pass-through calls are refused meanwhile.",
            )?,
            refused: counter(
                "token_broker_audit_refused_total",
                "Requests refused with 503 audit_unavailable because the trail could not be written (audit.on_failure = refuse), by action: mint, passthrough.",
                &["action"],
            )?,
            write_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "token_broker_audit_write_duration_seconds",
                    "Time to write and sync one batch of audit.file.",
                )
                .buckets(vec![
                    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
                ]),
            )?,
        };
        for name in Event::NAMES {
            m.events.with_label_values(&[name]);
        }
        for reason in ["write_error", "queue_full"] {
            m.lost.with_label_values(&[reason]);
        }
        for action in ["mint", "passthrough"] {
            m.refused.with_label_values(&[action]);
        }
        Ok(m)
    }

    fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.events.clone()))?;
        registry.register(Box::new(self.lost.clone()))?;
        registry.register(Box::new(self.write_failures.clone()))?;
        registry.register(Box::new(self.writable.clone()))?;
        registry.register(Box::new(self.refused.clone()))?;
        registry.register(Box::new(self.write_duration.clone()))?;
        Ok(())
    }
}

enum Sink {
    /// The `audit` log target on stderr.
    Log,
    /// `audit.file`.
    File(file::FileTrail),
}

/// The trail, shared by every room that records events.
pub struct Audit {
    sink: Sink,
    key: ArcSwap<TagKey>,
    on_failure: OnFailure,
    include_hits: bool,
    metrics: Arc<AuditMetrics>,
    auth: peers::PeerWindows,
    webhooks: peers::PeerWindows,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sink = match &self.sink {
            Sink::Log => "stderr".to_owned(),
            Sink::File(t) => t.path.display().to_string(),
        };
        write!(f, "Audit({sink}, {})", self.on_failure.name())
    }
}

/// How long [`Audit::start`] waits for the file's first line, and a refused-mode mint for its
/// event, before taking the trail as unwritable.
pub const WRITE_WAIT: Duration = file::STALL;

impl Audit {
    /// A trail on stderr with a key made now, mints only, `continue`, its series in no registry:
    /// for the tests and benches that build a core without a config.
    pub fn stderr() -> Arc<Self> {
        let key = TagKey::generate().unwrap_or_else(|_| {
            // No randomness: a key from the clock still keeps tags from being precomputed.
            let nanos = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
                .to_le_bytes();
            let mut key = [0u8; 32];
            key[..16].copy_from_slice(&nanos);
            TagKey::new(&key, KeySource::Generated)
        });
        let metrics = AuditMetrics::new()
            .unwrap_or_else(|e| unreachable!("the audit series are well formed: {e}"));
        metrics.writable.set(1);
        Arc::new(Self::assemble(
            Sink::Log,
            key,
            OnFailure::Continue,
            false,
            metrics,
        ))
    }

    fn assemble(
        sink: Sink,
        key: TagKey,
        on_failure: OnFailure,
        include_hits: bool,
        metrics: AuditMetrics,
    ) -> Self {
        Self {
            sink,
            key: ArcSwap::from_pointee(key),
            on_failure,
            include_hits,
            metrics: Arc::new(metrics),
            auth: peers::PeerWindows::default(),
            webhooks: peers::PeerWindows::default(),
        }
    }

    /// Opens the trail of `config` with `key`, its series in `registry`, and writes its `start`
    /// event. A file that cannot be opened or written is not an error: the trail starts
    /// unwritable, logs why, and keeps trying.
    pub async fn start(
        config: &AuditConfig,
        key: TagKey,
        registry: &Registry,
    ) -> Result<Arc<Self>, AuditStartError> {
        let metrics = AuditMetrics::new()?;
        metrics.register(registry)?;
        if key.source() == KeySource::Generated {
            tracing::warn!(
                tag_key = key.id(),
                "audit.hmac_key_file is not set: user tags are made with a key generated at start, so the same user's tags differ across restarts and replicas"
            );
        }
        let start = |key: &TagKey| {
            Event::Start {
                version: env!("CARGO_PKG_VERSION"),
                tag_key: key.id(),
                tag_key_source: key.source().name(),
                on_failure: config.on_failure.name(),
                include_hits: config.include_hits,
            }
            .line(SystemTime::now())
        };
        let Some(path) = &config.file else {
            metrics.writable.set(1);
            let audit = Self::assemble(
                Sink::Log,
                key,
                config.on_failure,
                config.include_hits,
                metrics,
            );
            audit.record(&Event::Start {
                version: env!("CARGO_PKG_VERSION"),
                tag_key: audit.key().id(),
                tag_key_source: audit.key().source().name(),
                on_failure: config.on_failure.name(),
                include_hits: config.include_hits,
            });
            return Ok(Arc::new(audit));
        };
        let line = start(&key);
        let metrics = Arc::new(metrics);
        let (ack, written) = oneshot::channel();
        let trail = file::FileTrail::start(path.clone(), Arc::clone(&metrics), line, ack)
            .map_err(AuditStartError::Writer)?;
        metrics.events.with_label_values(&["start"]).inc();
        let audit = Self {
            sink: Sink::File(trail),
            key: ArcSwap::from_pointee(key),
            on_failure: config.on_failure,
            include_hits: config.include_hits,
            metrics,
            auth: peers::PeerWindows::default(),
            webhooks: peers::PeerWindows::default(),
        };
        let opened = matches!(
            tokio::time::timeout(WRITE_WAIT, written).await,
            Ok(Ok(true))
        );
        if opened {
            tracing::info!(path = %path.display(), tag_key = audit.key().id(), "audit trail opened");
        } else {
            tracing::error!(
                path = %path.display(),
                on_failure = config.on_failure.name(),
                "the audit trail cannot be written at start; the broker runs, and tries again every second"
            );
        }
        Ok(Arc::new(audit))
    }

    /// The user tags' key now in use.
    pub fn key(&self) -> Arc<TagKey> {
        self.key.load_full()
    }

    /// Uses `key` for the tags from now on (a reload read `audit.hmac_key_file` again).
    pub fn set_key(&self, key: TagKey) {
        self.key.store(Arc::new(key));
    }

    /// True when hits are recorded too (`audit.include_hits`).
    pub fn include_hits(&self) -> bool {
        self.include_hits
    }

    /// True when a mint must wait for its event to reach the disk (`on_failure = "refuse"`
    /// with a file).
    pub fn refuses(&self) -> bool {
        self.on_failure == OnFailure::Refuse && matches!(self.sink, Sink::File(_))
    }

    /// True when the trail takes events now (always, on stderr).
    pub fn writable(&self) -> bool {
        match &self.sink {
            Sink::Log => true,
            Sink::File(trail) => trail.state.writable(),
        }
    }

    /// False when an audited action must be refused now: `refuse`, and the file not writable.
    /// Counts the refusal of `action` (`mint`, `passthrough`) when it is.
    pub fn available(&self, action: &'static str) -> bool {
        if !self.refuses() || self.writable() {
            return true;
        }
        self.metrics.refused.with_label_values(&[action]).inc();
        false
    }

    /// Records `event`, not waiting for it to be written (what is lost is counted).
    pub fn record(&self, event: &Event<'_>) {
        self.metrics.events.with_label_values(&[event.name()]).inc();
        match &self.sink {
            Sink::Log => event.log(),
            Sink::File(trail) => {
                if !trail.send(event.line(SystemTime::now()), None) {
                    self.metrics.lost.with_label_values(&["queue_full"]).inc();
                }
            }
        }
    }

    /// Records `event` and waits (at most [`WRITE_WAIT`]) until it is on disk.
    pub async fn record_durable(&self, event: &Event<'_>) -> Result<(), Unwritable> {
        self.metrics.events.with_label_values(&[event.name()]).inc();
        let trail = match &self.sink {
            Sink::Log => {
                event.log();
                return Ok(());
            }
            Sink::File(trail) => trail,
        };
        let (ack, written) = oneshot::channel();
        if !trail.send(event.line(SystemTime::now()), Some(ack)) {
            self.metrics.lost.with_label_values(&["queue_full"]).inc();
            return Err(Unwritable);
        }
        match tokio::time::timeout(WRITE_WAIT, written).await {
            Ok(Ok(true)) => Ok(()),
            _ => Err(Unwritable),
        }
    }

    /// Counts an action refused for the trail (see [`Audit::available`]).
    pub fn count_refusal(&self, action: &'static str) {
        self.metrics.refused.with_label_values(&[action]).inc();
    }

    /// One failed authentication of `peer` for `reason`: an `auth_failures` event when it
    /// repeats (see [`peers`]).
    pub fn auth_failure(&self, peer: Option<IpAddr>, reason: &str) {
        let Some(peer) = peer else { return };
        if let Some(failures) = self.auth.auth_failure(peer, Instant::now()) {
            self.record(&Event::AuthFailures {
                peer,
                failures,
                window_s: WINDOW.as_secs(),
                reason,
            });
        }
    }

    /// A refused webhook delivery of `peer`, rate-limited per peer (see [`peers`]).
    pub fn webhook_refused(&self, event: &str, outcome: &str, peer: Option<IpAddr>) {
        let suppressed = match peer {
            Some(p) => match self.webhooks.webhook_refusal(p, Instant::now()) {
                Some(s) => s,
                None => return,
            },
            None => 0,
        };
        self.record(&Event::WebhookRefused {
            webhook_event: event,
            outcome,
            peer,
            suppressed,
        });
    }

    /// Writes what is queued and stops the file's writer (at shutdown). Blocks up to
    /// [`WRITE_WAIT`].
    pub fn close(&self) {
        if let Sink::File(trail) = &self.sink {
            trail.close(WRITE_WAIT);
        }
    }

    /// The file, when the trail has one.
    pub fn path(&self) -> Option<&PathBuf> {
        match &self.sink {
            Sink::Log => None,
            Sink::File(trail) => Some(&trail.path),
        }
    }
}

/// Why the trail could not be set up (never because of the file: see [`Audit::start`]).
#[derive(Debug, thiserror::Error)]
pub enum AuditStartError {
    /// Its series could not be registered.
    #[error("audit metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The writer thread could not be started.
    #[error("cannot start the audit writer: {0}")]
    Writer(#[source] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(file: Option<PathBuf>, on_failure: OnFailure) -> AuditConfig {
        AuditConfig {
            file,
            hmac_key_file: None,
            on_failure,
            include_hits: false,
        }
    }

    /// A trail writing to `file`, with a generated key and a registry of its own.
    async fn started(file: PathBuf, on_failure: OnFailure) -> Arc<Audit> {
        Audit::start(
            &config(Some(file), on_failure),
            TagKey::generate().unwrap(),
            &Registry::new(),
        )
        .await
        .unwrap()
    }

    fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    fn revocation(caller: &str) -> Event<'_> {
        Event::Revocation {
            caller,
            invalidated: Some(1),
            everywhere: true,
        }
    }

    async fn eventually(mut ok: impl FnMut() -> bool, what: &str) {
        for _ in 0..400 {
            if ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{what}");
    }

    #[tokio::test]
    async fn the_file_holds_one_parseable_line_per_event_after_the_start_line_and_is_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, "{\"event\":\"earlier\"}\n").unwrap();
        let audit = started(path.clone(), OnFailure::Continue).await;
        assert!(audit.writable());
        for n in 0..50 {
            audit.record(&revocation(&format!("c{n}")));
        }
        audit.record_durable(&revocation("last")).await.unwrap();
        audit.close();
        let lines = lines(&path);
        assert_eq!(lines.len(), 1 + 1 + 51, "{lines:?}");
        assert_eq!(lines[0]["event"], "earlier");
        assert_eq!(lines[1]["event"], "start");
        assert_eq!(lines[1]["tag_key"], audit.key().id());
        assert_eq!(lines[2]["caller"], "c0");
        assert_eq!(lines[52]["caller"], "last");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let fresh = dir.path().join("fresh.jsonl");
            let a = started(fresh.clone(), OnFailure::Continue).await;
            a.close();
            let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o007, 0, "{mode:o}");
        }
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_full_disk_makes_the_trail_unwritable_and_refuse_unavailable() {
        let registry = Registry::new();
        let audit = Audit::start(
            &config(Some("/dev/full".into()), OnFailure::Refuse),
            TagKey::generate().unwrap(),
            &registry,
        )
        .await
        .unwrap();
        assert!(!audit.writable());
        assert!(!audit.available("mint"));
        assert_eq!(
            audit.record_durable(&revocation("c")).await,
            Err(Unwritable)
        );
        assert_eq!(audit.metrics.writable.get(), 0);
        assert!(audit.metrics.lost.with_label_values(&["write_error"]).get() >= 2);
        assert_eq!(audit.metrics.refused.with_label_values(&["mint"]).get(), 1);
        audit.close();
    }

    #[tokio::test]
    async fn continue_keeps_the_broker_available_while_the_file_cannot_be_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("audit.jsonl");
        let audit = started(path, OnFailure::Continue).await;
        assert!(!audit.writable());
        assert!(audit.available("mint"));
        audit.close();
    }

    #[tokio::test]
    async fn the_trail_comes_back_by_itself_and_says_how_many_events_were_lost() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("later");
        let path = sub.join("audit.jsonl");
        let audit = started(path.clone(), OnFailure::Refuse).await;
        assert!(!audit.writable());
        audit.record(&revocation("lost"));
        let lost = || audit.metrics.lost.with_label_values(&["write_error"]).get();
        eventually(|| lost() >= 2, "the second event was not tried").await;
        std::fs::create_dir(&sub).unwrap();
        eventually(|| audit.writable(), "the trail did not come back").await;
        audit.record_durable(&revocation("kept")).await.unwrap();
        audit.close();
        let lines = lines(&path);
        assert_eq!(lines[0]["event"], "resumed");
        // The start line and the one recorded meanwhile.
        assert_eq!(lines[0]["lost"], 2);
        assert_eq!(lines.last().unwrap()["caller"], "kept");
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_rotated_file_is_followed_by_a_new_one_at_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let audit = started(path.clone(), OnFailure::Continue).await;
        std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        audit.record_durable(&revocation("after")).await.unwrap();
        audit.close();
        let lines = lines(&path);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["caller"], "after");
    }

    #[test]
    fn stderr_never_refuses() {
        let audit = Audit::stderr();
        assert!(audit.writable());
        assert!(audit.available("mint"));
        assert!(!audit.refuses());
        assert!(audit.path().is_none());
    }
}
