//! Secrets that rotate by themselves (`server.watch_files`): every file the broker reads a
//! secret or a certificate from is watched, and a change is applied as SIGHUP applies it.
//!
//! - **Which files**: [`secret_files`], one list for the watcher and for the "readable by other
//!   users" warning. Each says whether a reload applies it; the Redis tier's password and keys,
//!   and `auth.kubernetes.ca_file`, are read at start only: a change of theirs is reported as
//!   needing a restart (log, `token_broker_secret_file_changes_total{result="restart_required"}`,
//!   `token_broker_secret_files_pending`), never half-applied.
//! - **How they are watched**: through their directories (notify's inotify backend, debounced),
//!   the configured one and, for a symbolic link, its target's: Kubernetes swaps a Secret's
//!   `..data` link in the mounted directory, cert-manager and Vault Agent rewrite or rename files.
//!   A slow rescan every [`RESCAN`] stands in for events a filesystem does not send.
//! - **When a change is applied**: once the directory has been quiet for [`DEBOUNCE`], the files'
//!   contents are compared by SHA-256 with what is in force; a difference in a file a reload
//!   applies makes one reload (trigger `watch`), which checks everything whole as SIGHUP does. A
//!   half-written or invalid file is refused like a bad SIGHUP: the old one stays in force, the log
//!   and the reload's audit event say why, and the same content is not tried again; the next
//!   change is.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use notify_debouncer_full::notify::{RecommendedWatcher, RecursiveMode};
use notify_debouncer_full::{new_debouncer, DebounceEventResult, Debouncer, RecommendedCache};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use super::reload::{Reloader, Trigger};
use crate::config::Config;

/// How long a directory must be quiet before its changes are looked at.
pub const DEBOUNCE: Duration = Duration::from_secs(1);
/// How often the files are compared even without an event.
pub const RESCAN: Duration = Duration::from_secs(60);

/// The config key of every kind of secret file, and whether a reload applies it: the `file`
/// label's values of `token_broker_secret_file_changes_total`, exported at zero from the start.
pub const FILE_KEYS: [(&str, bool); 14] = [
    ("upstream.api_key_file", true),
    ("server.tls.cert_file", true),
    ("server.tls.key_file", true),
    ("server.tls.client_ca_file", true),
    ("cache.shared.password_file", false),
    ("cache.shared.encryption_key_file", false),
    ("cache.shared.sentinel_password_file", false),
    ("cache.shared.previous_encryption_key_files", false),
    ("auth.kubernetes.jwks_file", true),
    ("auth.kubernetes.ca_file", false),
    ("webhooks.signing_secret_file", true),
    ("webhooks.tls.cert_file", true),
    ("webhooks.tls.key_file", true),
    ("audit.hmac_key_file", true),
];

/// One file the broker reads a secret or a certificate from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretFile {
    /// The config key that names it (`upstream.api_key_file`).
    pub key: &'static str,
    /// Its path, as configured.
    pub path: PathBuf,
    /// Whether a reload reads it again (else only a restart does).
    pub reloadable: bool,
    /// Whether it holds a secret (a key, a password), not a certificate or a public key set:
    /// such a file should be readable by the broker's user alone.
    pub secret: bool,
}

/// Every file of `config` that holds a secret or a certificate, in a fixed order.
pub fn secret_files(config: &Config) -> Vec<SecretFile> {
    let mut files = Vec::new();
    let mut add = |key: &'static str, path: Option<&PathBuf>, reloadable: bool, secret: bool| {
        if let Some(path) = path {
            files.push(SecretFile {
                key,
                path: path.clone(),
                reloadable,
                secret,
            });
        }
    };
    add(
        "upstream.api_key_file",
        config.upstream.api_key_file.as_ref(),
        true,
        true,
    );
    if let Some(tls) = &config.server.tls {
        add("server.tls.cert_file", Some(&tls.cert_file), true, false);
        add("server.tls.key_file", Some(&tls.key_file), true, true);
        add(
            "server.tls.client_ca_file",
            tls.client_ca_file.as_ref(),
            true,
            false,
        );
    }
    if let Some(shared) = &config.cache.shared {
        add(
            "cache.shared.password_file",
            shared.password_file.as_ref(),
            false,
            true,
        );
        add(
            "cache.shared.encryption_key_file",
            shared.encryption_key_file.as_ref(),
            false,
            true,
        );
        add(
            "cache.shared.sentinel_password_file",
            shared.sentinel_password_file.as_ref(),
            false,
            true,
        );
        for path in &shared.previous_encryption_key_files {
            add(
                "cache.shared.previous_encryption_key_files",
                Some(path),
                false,
                true,
            );
        }
    }
    if let Some(k) = &config.auth.kubernetes {
        add(
            "auth.kubernetes.jwks_file",
            k.jwks_file.as_ref(),
            true,
            false,
        );
        add("auth.kubernetes.ca_file", k.ca_file.as_ref(), false, false);
    }
    if let Some(w) = &config.webhooks {
        add(
            "webhooks.signing_secret_file",
            w.signing_secret_file.as_ref(),
            true,
            true,
        );
        if let Some(tls) = &w.tls {
            add("webhooks.tls.cert_file", Some(&tls.cert_file), true, false);
            add("webhooks.tls.key_file", Some(&tls.key_file), true, true);
        }
    }
    add(
        "audit.hmac_key_file",
        config.audit.hmac_key_file.as_ref(),
        true,
        true,
    );
    files
}

/// A file's content digest; `None` when it cannot be read (missing, in the middle of a swap).
pub type ContentDigest = Option<[u8; 32]>;

/// The digest of `path`'s content now, for a regular file (a link is followed); `None` for
/// anything else, which is never read here: a FIFO would block, and give its content away.
pub fn digest(path: &Path) -> ContentDigest {
    use std::io::Read;
    if !std::fs::metadata(path).ok()?.is_file() {
        return None;
    }
    let mut file = std::fs::File::open(path).ok()?;
    let mut hasher = Sha256::new();
    // Secrets pass through this buffer: wiped after use.
    let mut buf = zeroize::Zeroizing::new([0u8; 4096]);
    loop {
        match file.read(&mut buf[..]) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    Some(hasher.finalize().into())
}

/// The digests of `files`' contents now, by path.
pub fn digests<'a>(
    files: impl IntoIterator<Item = &'a SecretFile>,
) -> HashMap<PathBuf, ContentDigest> {
    files
        .into_iter()
        .map(|f| (f.path.clone(), digest(&f.path)))
        .collect()
}

/// The watcher's series (docs/observability.md lists them).
pub struct WatchMetrics {
    watched: IntGauge,
    pending: IntGauge,
    changes: IntCounterVec,
}

impl WatchMetrics {
    /// Creates the series and registers them in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Arc<Self>> {
        let m = Self {
            watched: IntGauge::new(
                "token_broker_secret_files_watched",
                "Secret and certificate files watched for changes (server.watch_files); 0 when off, or when watching could not be set up.",
            )?,
            pending: IntGauge::new(
                "token_broker_secret_files_pending",
                "Watched files whose content on disk is not the one in force: a change refused as invalid (the old content is kept), or one only a restart applies.",
            )?,
            changes: IntCounterVec::new(
                Opts::new(
                    "token_broker_secret_file_changes_total",
                    "Changes seen in watched files, by config key (file) and result: applied (by the reload they started), refused (invalid or incomplete: the old content is kept), restart_required (read at start only).",
                ),
                &["file", "result"],
            )?,
        };
        // Every file kind and the results it can have, at zero, so that rates have a start.
        for (file, reloadable) in FILE_KEYS {
            let results: &[&str] = if reloadable {
                &["applied", "refused"]
            } else {
                &["restart_required"]
            };
            for result in results {
                m.changes.with_label_values(&[file, result]);
            }
        }
        registry.register(Box::new(m.watched.clone()))?;
        registry.register(Box::new(m.pending.clone()))?;
        registry.register(Box::new(m.changes.clone()))?;
        Ok(Arc::new(m))
    }
}

/// Keeps the directories watched; dropped with its reloader.
pub struct Watcher {
    debouncer: Mutex<Debouncer<RecommendedWatcher, RecommendedCache>>,
    /// Directories watched now.
    dirs: Mutex<BTreeSet<PathBuf>>,
}

/// A watcher whose events wake `poke`: what keeps the watch alive (its reloader holds it), or
/// `None` when watching cannot be set up (logged; the broker runs on, reloaded by SIGHUP and
/// `POST /admin/reload` only). [`spawn`] starts looking.
pub fn watcher(poke: &Arc<Notify>) -> Option<Watcher> {
    let events = Arc::clone(poke);
    let debouncer = new_debouncer(DEBOUNCE, None, move |result: DebounceEventResult| {
        if let Err(errors) = result {
            for e in errors {
                tracing::warn!("watching secret files: {e}");
            }
        }
        events.notify_one();
    });
    let debouncer = match debouncer {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(
                "cannot watch secret files ({e}): changes apply on SIGHUP or POST /admin/reload only"
            );
            return None;
        }
    };
    Some(Watcher {
        debouncer: Mutex::new(debouncer),
        dirs: Mutex::new(BTreeSet::new()),
    })
}

/// Starts the loop that checks `reloader`'s files: at once, on every event and reload (`poke`),
/// and every [`RESCAN`]. It ends when the reloader is dropped.
pub fn spawn(reloader: &Arc<Reloader>, poke: Arc<Notify>) {
    tokio::spawn(run(Arc::downgrade(reloader), poke));
}

impl Watcher {
    /// Watches the directories of `files` (and of their links' targets), and no others.
    fn watch(&self, files: &[SecretFile]) -> usize {
        let wanted: BTreeSet<PathBuf> = files.iter().flat_map(|f| directories(&f.path)).collect();
        let mut dirs = self.dirs.lock().unwrap_or_else(|p| p.into_inner());
        let mut debouncer = self.debouncer.lock().unwrap_or_else(|p| p.into_inner());
        for gone in dirs.difference(&wanted) {
            // A directory that went away (an old `..2024_...` of a Secret) is unwatched already.
            let _ = debouncer.unwatch(gone);
        }
        dirs.retain(|d| wanted.contains(d));
        for dir in wanted {
            if dirs.contains(&dir) {
                continue;
            }
            match debouncer.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    dirs.insert(dir);
                }
                Err(e) => tracing::debug!(dir = %dir.display(), "cannot watch yet: {e}"),
            }
        }
        files.len()
    }
}

/// The directory of `path`, and the directory of what it resolves to when that differs.
fn directories(path: &Path) -> Vec<PathBuf> {
    let parent = |p: &Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut dirs = vec![parent(path)];
    if let Ok(real) = std::fs::canonicalize(path) {
        let dir = parent(&real);
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    dirs
}

/// The watch loop: a check on every debounced event, on every reload, and every [`RESCAN`];
/// ends when the reloader is gone.
async fn run(reloader: Weak<Reloader>, poke: Arc<Notify>) {
    // What was last tried for each file, so that the same refused content is not tried again.
    let mut tried: HashMap<PathBuf, ContentDigest> = HashMap::new();
    // Restart-only changes already reported.
    let mut reported: HashMap<PathBuf, ContentDigest> = HashMap::new();
    loop {
        {
            let Some(reloader) = reloader.upgrade() else {
                return;
            };
            check(&reloader, &mut tried, &mut reported).await;
        }
        tokio::select! {
            () = poke.notified() => {}
            () = tokio::time::sleep(RESCAN) => {}
        }
    }
}

/// Compares the files with what is in force and applies what changed.
async fn check(
    reloader: &Arc<Reloader>,
    tried: &mut HashMap<PathBuf, ContentDigest>,
    reported: &mut HashMap<PathBuf, ContentDigest>,
) {
    let files = reloader.secret_files().await;
    let watched = reloader.watching(&files);
    let on_disk = {
        let files = files.clone();
        match tokio::task::spawn_blocking(move || digests(&files)).await {
            Ok(d) => d,
            Err(_) => return,
        }
    };
    let in_force = reloader.in_force();
    let differs = |f: &SecretFile| in_force.get(&f.path) != on_disk.get(&f.path);
    let metrics = reloader.watch_metrics();

    // Files a reload applies: one reload for everything that changed since it was last tried.
    let changed: Vec<&SecretFile> = files
        .iter()
        .filter(|f| f.reloadable && differs(f) && tried.get(&f.path) != on_disk.get(&f.path))
        .collect();
    if !changed.is_empty() {
        let keys: Vec<&str> = changed.iter().map(|f| f.key).collect();
        tracing::info!(files = ?keys, "watched files changed: reloading");
        let result = reloader.reload_by(Trigger::Watch, &keys).await;
        let label = if result.is_ok() { "applied" } else { "refused" };
        for f in &changed {
            tried.insert(f.path.clone(), on_disk.get(&f.path).cloned().flatten());
            metrics.changes.with_label_values(&[f.key, label]).inc();
        }
    }

    // Files only a restart reads: said once per content.
    for f in files.iter().filter(|f| !f.reloadable && differs(f)) {
        let now = on_disk.get(&f.path).cloned().flatten();
        if reported.get(&f.path) != Some(&now) {
            reported.insert(f.path.clone(), now);
            metrics
                .changes
                .with_label_values(&[f.key, "restart_required"])
                .inc();
            tracing::warn!(
                file = f.key,
                path = %f.path.display(),
                "a watched file changed that only a restart reads: the running broker keeps what it read at start until it is restarted"
            );
        }
    }

    let in_force = reloader.in_force();
    let pending = files
        .iter()
        .filter(|f| in_force.get(&f.path) != on_disk.get(&f.path))
        .count();
    metrics
        .pending
        .set(i64::try_from(pending).unwrap_or(i64::MAX));
    metrics
        .watched
        .set(i64::try_from(watched).unwrap_or(i64::MAX));
}

impl Reloader {
    /// Watches `files`' directories, when this reloader watches at all; how many files.
    fn watching(&self, files: &[SecretFile]) -> usize {
        self.watcher().map_or(0, |w| w.watch(files))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_secret_and_certificate_file_is_listed_with_whether_a_reload_applies_it() {
        let text = r#"
[upstream]
api_key_file = "/s/api-key"
[server.tls]
cert_file = "/t/tls.crt"
key_file = "/t/tls.key"
client_ca_file = "/t/ca.crt"
[cache.shared]
url = "redis://r:6379"
password_file = "/r/password"
sentinel_password_file = "/r/sentinel-password"
encryption_key_file = "/r/key"
previous_encryption_key_files = ["/r/old"]
[auth.kubernetes]
issuer = "https://kubernetes.default.svc"
audiences = ["token-broker"]
jwks_file = "/k/jwks.json"
ca_file = "/k/ca.crt"
[webhooks]
listen = "127.0.0.1:8443"
token_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
signing_secret_file = "/w/signing"
[webhooks.tls]
cert_file = "/w/tls.crt"
key_file = "/w/tls.key"
[audit]
hmac_key_file = "/a/key"
"#;
        let config = Config::parse(text).unwrap();
        let files = secret_files(&config);
        let by_key = |key: &str| files.iter().find(|f| f.key == key).unwrap();
        for key in [
            "upstream.api_key_file",
            "server.tls.cert_file",
            "server.tls.key_file",
            "server.tls.client_ca_file",
            "auth.kubernetes.jwks_file",
            "webhooks.signing_secret_file",
            "webhooks.tls.cert_file",
            "webhooks.tls.key_file",
            "audit.hmac_key_file",
        ] {
            assert!(by_key(key).reloadable, "{key}");
        }
        for key in [
            "cache.shared.password_file",
            "cache.shared.encryption_key_file",
            "cache.shared.previous_encryption_key_files",
        ] {
            assert!(!by_key(key).reloadable, "{key}");
            assert!(by_key(key).secret, "{key}");
        }
        assert!(!by_key("server.tls.cert_file").secret);
        assert!(by_key("server.tls.key_file").secret);
        // One of each kind, and the metric's label set says the same of each.
        assert_eq!(files.len(), FILE_KEYS.len());
        for f in &files {
            assert!(FILE_KEYS.contains(&(f.key, f.reloadable)), "{}", f.key);
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_link_is_watched_in_its_own_directory_and_in_its_targets() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("..2026_01");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("api-key"), "k").unwrap();
        std::os::unix::fs::symlink("..2026_01", dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/api-key", dir.path().join("api-key")).unwrap();
        let dirs = directories(&dir.path().join("api-key"));
        assert_eq!(dirs[0], dir.path());
        assert_eq!(dirs[1], std::fs::canonicalize(&data).unwrap());
        assert_eq!(directories(Path::new("key")), [PathBuf::from(".")]);
    }

    #[test]
    fn a_digest_tells_contents_apart_and_a_missing_file_has_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "one").unwrap();
        let one = digest(&path);
        std::fs::write(&path, "two").unwrap();
        assert_ne!(digest(&path), one);
        assert!(one.is_some());
        assert_eq!(digest(&dir.path().join("missing")), None);
        // Large enough for several reads.
        std::fs::write(&path, "x".repeat(10_000)).unwrap();
        assert_eq!(
            digest(&path),
            Some(Sha256::digest("x".repeat(10_000)).into())
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_is_never_read_for_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("key.fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        // Reading it would block this test for ever.
        assert_eq!(digest(&fifo), None);
        assert_eq!(digest(dir.path()), None);
    }
}
