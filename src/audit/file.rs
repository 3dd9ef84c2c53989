//! The trail's file: one writer thread appends the lines it is handed, every batch in one
//! `write(2)` followed by one `fdatasync(2)`, so that a busy broker costs one sync per batch,
//! not per event (what arrives while a sync runs makes the next batch).
//!
//! - **Opened for appending** (`O_APPEND`, created `0640` when missing); never truncated. A file
//!   moved or removed from under it (log rotation) is noticed within a second, and a new one is
//!   opened at the path.
//! - **Health**: [`TrailState::writable`] says whether the last batch (or opening) succeeded.
//!   After a failure the file is opened again for the next batch; an idle writer retries every
//!   second with a `resumed` event that says how many were lost, so health comes back without
//!   waiting for traffic. A batch taking longer than [`STALL`] counts as unwritable meanwhile.
//! - **Acknowledgements**: a line may carry a sender that learns whether its batch reached the
//!   disk: how a mint under `on_failure = "refuse"` waits for its event.
//! - **Bounded**: at most [`QUEUE`] lines wait; beyond that a line is refused at once (counted
//!   as lost), never blocking a request.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::oneshot;

use super::event::Event;
use super::AuditMetrics;

/// Lines that may wait for the writer.
pub const QUEUE: usize = 16 * 1024;
/// Most lines in one batch.
const MAX_BATCH: usize = 4096;
/// How often an unwritable trail is tried again while no event comes.
const RETRY: Duration = Duration::from_secs(1);
/// How often the path is checked for a file moved away (rotation).
const ROTATION_CHECK: Duration = Duration::from_secs(1);
/// A batch in progress for longer than this makes the trail count as unwritable.
pub const STALL: Duration = Duration::from_secs(5);

/// One line for the writer, and who waits for it to reach the disk.
pub(super) enum Msg {
    Line(Vec<u8>, Option<oneshot::Sender<bool>>),
    /// Write what came before, then stop.
    Stop,
}

/// What the writer tells the rest of the trail.
pub(super) struct TrailState {
    writable: AtomicBool,
    /// Milliseconds since `epoch` when the batch in progress started; 0 when idle.
    busy_since: AtomicU64,
    epoch: Instant,
}

impl TrailState {
    /// True when the last batch reached the disk and none has been stuck for [`STALL`].
    pub(super) fn writable(&self) -> bool {
        if !self.writable.load(Ordering::Acquire) {
            return false;
        }
        let since = self.busy_since.load(Ordering::Acquire);
        since == 0 || self.epoch.elapsed().as_millis() as u64 <= since + STALL.as_millis() as u64
    }
}

/// The file trail's handle: where lines are sent.
pub(super) struct FileTrail {
    tx: SyncSender<Msg>,
    pub(super) state: Arc<TrailState>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub(super) path: PathBuf,
}

impl FileTrail {
    /// Starts the writer for `path`; `first` is written before anything else.
    pub(super) fn start(
        path: PathBuf,
        metrics: Arc<AuditMetrics>,
        first: Vec<u8>,
        ack: oneshot::Sender<bool>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let state = Arc::new(TrailState {
            writable: AtomicBool::new(false),
            busy_since: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        let mut writer = Writer {
            path: path.clone(),
            file: None,
            checked: Instant::now(),
            lost: 0,
            failing: None,
            state: Arc::clone(&state),
            metrics,
        };
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx, Msg::Line(first, Some(ack))))?;
        Ok(Self {
            tx,
            state,
            thread: Mutex::new(Some(thread)),
            path,
        })
    }

    /// Hands a line to the writer; false when its queue is full or it has stopped.
    pub(super) fn send(&self, line: Vec<u8>, ack: Option<oneshot::Sender<bool>>) -> bool {
        match self.tx.try_send(Msg::Line(line, ack)) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }

    /// Writes what is queued and stops the writer, waiting at most `limit` for it.
    pub(super) fn close(&self, limit: Duration) {
        let _ = self.tx.try_send(Msg::Stop);
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(thread) = thread {
            let deadline = Instant::now() + limit;
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for FileTrail {
    fn drop(&mut self) {
        let _ = self.tx.try_send(Msg::Stop);
    }
}

/// The writer thread's own state.
struct Writer {
    path: PathBuf,
    /// The open file and its (device, inode).
    file: Option<(File, (u64, u64))>,
    checked: Instant,
    /// Lines lost since the last batch that reached the disk.
    lost: u64,
    /// The error of the failure in progress, logged once.
    failing: Option<String>,
    state: Arc<TrailState>,
    metrics: Arc<AuditMetrics>,
}

impl Writer {
    fn run(&mut self, rx: Receiver<Msg>, first: Msg) {
        let mut batch = vec![first];
        loop {
            let mut stop = false;
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(Msg::Stop) => {
                        stop = true;
                        break;
                    }
                    Ok(msg) => batch.push(msg),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() || self.lost > 0 {
                self.write(&mut batch);
            }
            if stop {
                return;
            }
            let next = if self.lost > 0 {
                rx.recv_timeout(RETRY)
            } else {
                rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
            };
            match next {
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => {
                    // Whatever is still queued is written before leaving.
                    while let Ok(Msg::Line(line, ack)) = rx.try_recv() {
                        batch.push(Msg::Line(line, ack));
                    }
                    if !batch.is_empty() {
                        self.write(&mut batch);
                    }
                    return;
                }
                Ok(msg) => batch.push(msg),
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    /// Writes and syncs `batch` (after a `resumed` line when events were lost), and tells
    /// everyone waiting how it went.
    fn write(&mut self, batch: &mut Vec<Msg>) {
        let started = Instant::now();
        self.state.busy_since.store(
            (self.state.epoch.elapsed().as_millis() as u64).max(1),
            Ordering::Release,
        );
        let mut buf = Vec::with_capacity(batch.len() * 256);
        if self.lost > 0 {
            buf.extend(Event::Resumed { lost: self.lost }.line(SystemTime::now()));
        }
        let mut lines = 0u64;
        for msg in batch.iter() {
            if let Msg::Line(line, _) = msg {
                buf.extend_from_slice(line);
                lines += 1;
            }
        }
        let outcome = self.append(&buf);
        self.state.busy_since.store(0, Ordering::Release);
        self.metrics
            .write_duration
            .observe(started.elapsed().as_secs_f64());
        match outcome {
            Ok(()) => {
                if self.lost > 0 {
                    self.metrics.events.with_label_values(&["resumed"]).inc();
                }
                if let Some(error) = self.failing.take() {
                    tracing::warn!(
                        path = %self.path.display(),
                        lost = self.lost,
                        "audit.file is written again (it failed with: {error})"
                    );
                }
                self.lost = 0;
                self.state.writable.store(true, Ordering::Release);
                self.metrics.writable.set(1);
            }
            Err(e) => {
                self.file = None;
                self.lost += lines;
                self.metrics
                    .lost
                    .with_label_values(&["write_error"])
                    .inc_by(lines);
                self.metrics.write_failures.inc();
                self.state.writable.store(false, Ordering::Release);
                self.metrics.writable.set(0);
                let error = e.to_string();
                if self.failing.as_deref() != Some(error.as_str()) {
                    tracing::error!(
                        path = %self.path.display(),
                        "audit.file cannot be written: {error}; its events are lost until it can (audit.on_failure says whether mints go on meanwhile)"
                    );
                    self.failing = Some(error);
                }
            }
        }
        let ok = outcome_ok(&self.state);
        for msg in batch.drain(..) {
            if let Msg::Line(_, Some(ack)) = msg {
                let _ = ack.send(ok);
            }
        }
    }

    fn append(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if self.checked.elapsed() >= ROTATION_CHECK {
            self.checked = Instant::now();
            if let Some((_, id)) = &self.file {
                if identity(&self.path).ok() != Some(*id) {
                    // Moved or removed (rotated): the next lines go to a new file at the path.
                    self.file = None;
                }
            }
        }
        if self.file.is_none() {
            let file = open(&self.path)?;
            let id = file_identity(&file)?;
            self.file = Some((file, id));
        }
        let Some((file, _)) = self.file.as_mut() else {
            return Err(std::io::Error::other("the audit file is not open"));
        };
        file.write_all(buf)?;
        file.sync_data()
    }
}

fn outcome_ok(state: &TrailState) -> bool {
    state.writable.load(Ordering::Acquire)
}

fn open(path: &Path) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o640);
    }
    options.open(path)
}

#[cfg(unix)]
fn file_identity(file: &File) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata()?;
    Ok((m.dev(), m.ino()))
}

#[cfg(unix)]
fn identity(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_identity(_: &File) -> std::io::Result<(u64, u64)> {
    Ok((0, 0))
}

#[cfg(not(unix))]
fn identity(_: &Path) -> std::io::Result<(u64, u64)> {
    Ok((0, 0))
}
