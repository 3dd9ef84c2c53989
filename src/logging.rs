//! Where log lines go: the format and filter of the broker's logs, and how lines reach stderr.
//!
//! Every caller request logs an access line ([`crate::access`]). Written the default way, one
//! `write(2)` per line from the request's own thread, that was a system call per request and,
//! whenever both worker threads logged at once, a futex wait on stderr's lock: 1.7 of the 11.9
//! µs of CPU a cache hit cost in `make bench-e2e` (docs/performance.md). So a runtime worker
//! thread keeps its lines in a buffer of its own and writes them in one go when it has nothing
//! else to do (tokio's park hook) or when [`BATCH_BYTES`] have gathered: under load, one write
//! per hundred lines or so; when idle, each line as soon as its request is answered.
//!
//! - **Batching threads**: only the runtime's workers, from their first park on. Any other
//!   thread (`main`, blocking pool, tests) writes each line at once.
//! - **Order**: a thread's lines keep their order; lines of two workers may interleave by up
//!   to a batch (each carries its timestamp).
//! - **Nothing left behind**: a worker writes its batch when it parks, when it stops and when
//!   it panics (before the panic's message). A process killed outright (SIGKILL) loses what
//!   its workers had not written yet: at most [`BATCH_BYTES`] each.
//! - **No extra thread and no shared lock per line**: a writer thread was tried and cost as
//!   much as it saved on two cores (docs/performance.md).

use std::cell::RefCell;
use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

use tracing_subscriber::fmt::MakeWriter;

/// Bytes a worker gathers before writing them even though it is still busy (about a hundred
/// access lines).
pub const BATCH_BYTES: usize = 16 * 1024;

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Where lines end up (stderr, or what a test reads).
#[derive(Clone)]
pub struct Output(Arc<Mutex<Box<dyn Write + Send>>>);

impl Output {
    /// Lines written to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self(Arc::new(Mutex::new(out)))
    }

    /// Writes `bytes` whole.
    fn write(&self, bytes: &[u8]) {
        // A panic while the lock was held cannot leave the output half-made: keep logging.
        let mut out = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        // Nowhere to report a failing stderr: the lines are gone either way.
        let _ = out.write_all(bytes).and_then(|()| out.flush());
    }
}

/// A worker's lines not written yet.
struct Batch {
    lines: Vec<u8>,
    out: Output,
}

impl Batch {
    fn flush(&mut self) {
        if !self.lines.is_empty() {
            self.out.write(&self.lines);
            self.lines.clear();
        }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.flush();
    }
}

thread_local! {
    /// This thread's batch, once it batches.
    static BATCH: RefCell<Option<Batch>> = const { RefCell::new(None) };
}

/// For a runtime worker when it parks: from the first park on, this thread's lines are
/// batched; every park writes what it gathered.
pub fn on_park(out: &Output) {
    let _ = BATCH.try_with(|b| {
        if let Ok(mut b) = b.try_borrow_mut() {
            match b.as_mut() {
                Some(batch) => batch.flush(),
                None => {
                    *b = Some(Batch {
                        lines: Vec::with_capacity(BATCH_BYTES + 1024),
                        out: out.clone(),
                    })
                }
            }
        }
    });
}

/// Writes this thread's batched lines now (a worker stopping, a panic).
pub fn flush_this_thread() {
    let _ = BATCH.try_with(|b| {
        if let Ok(mut b) = b.try_borrow_mut() {
            if let Some(batch) = b.as_mut() {
                batch.flush();
            }
        }
    });
}

/// Sets the hooks that make `builder`'s workers batch their lines into `out`.
pub fn batch_workers<'b>(
    builder: &'b mut tokio::runtime::Builder,
    out: &Output,
) -> &'b mut tokio::runtime::Builder {
    let out = out.clone();
    builder
        .on_thread_park(move || on_park(&out))
        .on_thread_stop(flush_this_thread)
}

/// The `tracing` writer: into this thread's batch when it has one, else straight to the output.
#[derive(Clone)]
pub struct Lines(pub Output);

/// What `tracing` writes one event through.
pub struct LineWriter<'a>(&'a Output);

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let batched = BATCH
            .try_with(|b| {
                let Ok(mut b) = b.try_borrow_mut() else {
                    return false;
                };
                let Some(batch) = b.as_mut() else {
                    return false;
                };
                batch.lines.extend_from_slice(buf);
                if batch.lines.len() >= BATCH_BYTES {
                    batch.flush();
                }
                true
            })
            .unwrap_or(false);
        if !batched {
            self.0.write(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Lines {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter(&self.0)
    }
}

/// Sets up the logs: stderr, filtered by `RUST_LOG` (default `info`). Every caller request
/// writes one access line (target `access`, see [`crate::access`]); `RUST_LOG=info,access=off`
/// silences it. In JSON each line is one flat object: `timestamp`, `level`, `target`,
/// `message` and the event's own fields side by side, ready for a log pipeline to index.
/// Returns the output, for [`batch_workers`] on the runtime.
pub fn init(format: LogFormat) -> Output {
    let out = Output::new(Box::new(std::io::stderr()));
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        flush_this_thread();
        previous(info);
    }));
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(Lines(out.clone()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// An output the test can read, counting the writes it gets.
    #[derive(Clone, Default)]
    struct Sink {
        bytes: Arc<Mutex<Vec<u8>>>,
        writes: Arc<Mutex<usize>>,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.bytes.lock().unwrap().extend_from_slice(buf);
            *self.writes.lock().unwrap() += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.bytes.lock().unwrap().clone()).unwrap()
        }
        fn writes(&self) -> usize {
            *self.writes.lock().unwrap()
        }
        fn output(&self) -> Output {
            Output::new(Box::new(self.clone()))
        }
    }

    fn line(out: &Output, text: &str) {
        Lines(out.clone())
            .make_writer()
            .write_all(text.as_bytes())
            .unwrap();
    }

    #[test]
    fn a_thread_that_never_parked_writes_each_line_at_once() {
        let sink = Sink::default();
        let out = sink.output();
        std::thread::spawn(move || {
            line(&out, "one\n");
            assert_eq!(sink.text(), "one\n");
            line(&out, "two\n");
            assert_eq!(sink.writes(), 2);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_parked_worker_gathers_lines_until_it_parks_again() {
        let sink = Sink::default();
        let out = sink.output();
        std::thread::spawn(move || {
            on_park(&out);
            for i in 0..50 {
                line(&out, &format!("line {i}\n"));
            }
            assert_eq!(sink.text(), "", "written before the worker was idle");
            on_park(&out);
            assert_eq!(sink.text().lines().count(), 50);
            assert_eq!(sink.writes(), 1);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_busy_worker_writes_once_a_batch_is_full_and_what_is_left_when_it_ends() {
        let sink = Sink::default();
        let out = sink.output();
        let check = sink.clone();
        std::thread::spawn(move || {
            on_park(&out);
            let text = format!("{}\n", "x".repeat(1023));
            for _ in 0..40 {
                line(&out, &text);
            }
            // 40 KiB without a park: two full batches written, the rest still gathering.
            assert_eq!(sink.writes(), 2);
            assert_eq!(sink.text().lines().count(), 32);
        })
        .join()
        .unwrap();
        // The thread's end wrote the rest.
        assert_eq!(check.text().lines().count(), 40);
        assert_eq!(check.writes(), 3);
    }

    #[test]
    fn flushing_a_thread_writes_its_batch_in_order() {
        let sink = Sink::default();
        let out = sink.output();
        std::thread::spawn(move || {
            on_park(&out);
            line(&out, "a\n");
            line(&out, "b\n");
            flush_this_thread();
            assert_eq!(sink.text(), "a\nb\n");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn runtime_workers_write_their_lines_when_idle() {
        let sink = Sink::default();
        let out = sink.output();
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(2).enable_all();
        let runtime = batch_workers(&mut builder, &out).build().unwrap();
        let writer = out.clone();
        runtime.block_on(async move {
            // Let the workers park once, so they batch.
            tokio::time::sleep(Duration::from_millis(50)).await;
            tokio::spawn(async move {
                for i in 0..100 {
                    line(&writer, &format!("request {i}\n"));
                }
            })
            .await
            .unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            while sink.text().lines().count() < 100 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(sink.text().lines().count(), 100);
            assert!(sink.writes() < 10, "{} writes", sink.writes());
        });
    }

    #[test]
    fn tracing_events_are_one_line_each() {
        let sink = Sink::default();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(Lines(sink.output()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "access", status = 200, "request");
            tracing::info!(target: "access", status = 404, "request");
        });
        let text = sink.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].contains("access: request status=200"), "{text}");
        assert!(lines[1].contains("access: request status=404"), "{text}");
    }
}
