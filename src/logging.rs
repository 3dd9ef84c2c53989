//! Where log lines go: the format and filter of the broker's logs, the access line every caller
//! request writes, and how lines reach stderr.
//!
//! - **Access line**: one `info` event per caller API request, target `access`, with the
//!   request id, caller id, route, status, cache result and latency ([`AccessLine`]). Never a
//!   path, query, header or body: no token, secret, email or phone can reach it.
//!   `RUST_LOG=info,access=off` turns it off.
//! - **Batching threads**: a runtime worker keeps its lines in a buffer of its own from its first
//!   park on, and writes them in one go when it parks again or when [`BATCH_BYTES`] have
//!   gathered; any other thread (`main`, blocking pool, tests) writes each line at once. Kept by
//!   hand because one `write(2)` per line, and stderr's lock when both workers log at once, was
//!   the largest single cost of a cache hit (measured in docs/performance.md); a writer thread
//!   was tried and cost as much as it saved on two cores.
//! - **Order**: a thread's lines keep their order; lines of two workers may interleave by up
//!   to a batch (each carries its timestamp).
//! - **Nothing left behind**: a worker writes its batch when it parks, when it stops and when
//!   it panics (before the panic's message). A process killed outright (SIGKILL) loses what
//!   its workers had not written yet: at most [`BATCH_BYTES`] each.
//! - **Format**: tracing-subscriber's text and JSON formats. The access line, without colours,
//!   is written by [`Format`] to the very same bytes, by hand because the generic formatter
//!   costs about twice as much per line (`benches/parts.rs`); a test holds the two equal.

use std::cell::RefCell;
use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

use tracing_subscriber::fmt::MakeWriter;

use crate::metrics::CacheOutcome;

/// The target of the access line's event (`RUST_LOG=info,access=off` turns it off).
pub const ACCESS_TARGET: &str = "access";

/// The access line of one caller API request.
#[derive(Debug, Clone, Copy)]
pub struct AccessLine<'a> {
    /// The request id (the caller's `X-Request-Id` when acceptable, else one made for it).
    pub request_id: &'a str,
    /// The authenticated caller's id, `-` when none.
    pub caller: &'a str,
    /// The route's label.
    pub route: &'a str,
    /// The answer's status.
    pub status: u16,
    /// What the cache did.
    pub cache: CacheOutcome,
    /// From the request's arrival to its answer.
    pub latency: std::time::Duration,
}

impl AccessLine<'_> {
    /// Logs the line: one `info` event, target `access`.
    pub fn log(&self) {
        tracing::info!(
            target: ACCESS_TARGET,
            request_id = %self.request_id,
            caller = %self.caller,
            route = %self.route,
            status = self.status,
            cache = %self.cache.label(),
            latency_us = self.latency.as_micros() as u64,
            "request"
        );
    }
}

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

/// The event format: tracing-subscriber's own (`inner`), except for access lines without
/// colours, which are written here by hand to the very same bytes (see the module docs for why).
pub struct Format<F> {
    inner: F,
    json: bool,
}

impl Format<tracing_subscriber::fmt::format::Format> {
    /// Human-readable lines.
    pub fn text() -> Self {
        Self {
            inner: tracing_subscriber::fmt::format::Format::default(),
            json: false,
        }
    }
}

impl Format<tracing_subscriber::fmt::format::Format<tracing_subscriber::fmt::format::Json>> {
    /// One flat JSON object per line.
    pub fn json() -> Self {
        Self {
            inner: tracing_subscriber::fmt::format::Format::default()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false),
            json: true,
        }
    }
}

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for Format<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let plain = event.metadata().target() == ACCESS_TARGET
            && !writer.has_ansi_escapes()
            && event.parent().is_none()
            && (!event.is_contextual() || ctx.lookup_current().is_none());
        if !plain {
            return self.inner.format_event(ctx, writer, event);
        }
        let meta = event.metadata();
        let mut line = FastLine {
            out: &mut writer,
            json: self.json,
            result: Ok(()),
        };
        line.start(meta.level(), meta.target());
        event.record(&mut line);
        line.end(meta.target())
    }
}

/// Writes one event's line by hand, as tracing-subscriber's formats would.
struct FastLine<'w, 'a> {
    out: &'w mut tracing_subscriber::fmt::format::Writer<'a>,
    json: bool,
    result: std::fmt::Result,
}

impl FastLine<'_, '_> {
    fn put(&mut self, s: &str) {
        if self.result.is_ok() {
            self.result = self.out.write_str(s);
        }
    }

    /// Text: `2026-11-26T02:25:26.770287Z  INFO access: `. JSON: `{"timestamp":..,"level":..`.
    fn start(&mut self, level: &tracing::Level, target: &str) {
        let mut ts = [0u8; 27];
        let ts = timestamp(std::time::SystemTime::now(), &mut ts);
        if self.json {
            self.put("{\"timestamp\":\"");
            self.put(ts);
            self.put("\",\"level\":\"");
            self.put(level.as_str());
            self.put("\"");
        } else {
            self.put(ts);
            self.put(match *level {
                tracing::Level::TRACE => " TRACE ",
                tracing::Level::DEBUG => " DEBUG ",
                tracing::Level::INFO => "  INFO ",
                tracing::Level::WARN => "  WARN ",
                tracing::Level::ERROR => " ERROR ",
            });
            self.put(target);
            self.put(":");
        }
    }

    fn field(&mut self, name: &str, value: &dyn std::fmt::Display, quoted: bool) {
        if self.result.is_err() {
            return;
        }
        if self.json {
            self.put(",\"");
            self.put(name);
            self.put("\":");
            if quoted {
                self.put("\"");
                let mut escaper = JsonEscape(&mut *self.out);
                self.result = std::fmt::write(&mut escaper, format_args!("{value}"));
                self.put("\"");
            } else {
                self.result = write!(self.out, "{value}");
            }
        } else {
            self.put(" ");
            if name != "message" {
                self.put(name);
                self.put("=");
            }
            self.result = write!(self.out, "{value}");
        }
    }

    fn end(mut self, target: &str) -> std::fmt::Result {
        if self.json {
            self.put(",\"target\":\"");
            self.put(target);
            self.put("\"}");
        }
        self.put("\n");
        self.result
    }
}

impl tracing::field::Visit for FastLine<'_, '_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        struct AsDisplay<'a>(&'a dyn std::fmt::Debug);
        impl std::fmt::Display for AsDisplay<'_> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
        self.field(field.name(), &AsDisplay(value), true);
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if self.json || field.name() == "message" {
            self.field(field.name(), &value, true);
        } else {
            self.field(field.name(), &format_args!("{value:?}"), true);
        }
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.field(field.name(), &value, false);
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.field(field.name(), &value, false);
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.field(field.name(), &value, false);
    }
}

/// JSON string escaping of what is written through it.
struct JsonEscape<'w, 'a>(&'w mut tracing_subscriber::fmt::format::Writer<'a>);

impl std::fmt::Write for JsonEscape<'_, '_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let mut start = 0;
        for (i, c) in s.char_indices() {
            let escaped = match c {
                '"' => "\\\"",
                '\\' => "\\\\",
                '\n' => "\\n",
                '\r' => "\\r",
                '\t' => "\\t",
                c if (c as u32) < 0x20 => {
                    self.0.write_str(&s[start..i])?;
                    write!(self.0, "\\u{:04x}", c as u32)?;
                    start = i + c.len_utf8();
                    continue;
                }
                _ => continue,
            };
            self.0.write_str(&s[start..i])?;
            self.0.write_str(escaped)?;
            start = i + 1;
        }
        self.0.write_str(&s[start..])
    }
}

/// `t` as RFC 3339 in UTC to the microsecond (`2026-11-26T02:25:26.770287Z`), as
/// tracing-subscriber writes it.
fn timestamp(t: std::time::SystemTime, buf: &mut [u8; 27]) -> &str {
    let mut w = &mut buf[..];
    // 27 bytes for every year before 10000; a later clock writes what fits.
    let _ = write!(w, "{}", humantime::format_rfc3339_micros(t));
    let len = 27 - w.len();
    std::str::from_utf8(&buf[..len]).unwrap_or("")
}

/// Sets up the logs: stderr, filtered by `RUST_LOG` (default `info`). Every caller request
/// writes one access line (target `access`, see [`AccessLine`]); `RUST_LOG=info,access=off`
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
        LogFormat::Text => builder.event_format(Format::text()).try_init(),
        LogFormat::Json => builder
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(Format::json())
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

    /// The lines `format` writes for a few events, each with its timestamp cut off.
    fn lines_of<F>(json: bool, format: F) -> Vec<String>
    where
        F: tracing_subscriber::fmt::FormatEvent<
                tracing_subscriber::Registry,
                tracing_subscriber::fmt::format::DefaultFields,
            > + tracing_subscriber::fmt::FormatEvent<
                tracing_subscriber::Registry,
                tracing_subscriber::fmt::format::JsonFields,
            > + Send
            + Sync
            + 'static,
    {
        let sink = Sink::default();
        let builder = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .with_writer(Lines(sink.output()));
        let emit = || {
            AccessLine {
                request_id: "3f9a0c1b2d4e-12",
                caller: "checkout",
                route: "tokens",
                status: 200,
                cache: CacheOutcome::Hit,
                latency: Duration::from_micros(41),
            }
            .log();
            let odd = "quote\" back\\slash\nline\ttab\u{1}é";
            tracing::warn!(target: "access", text = odd, shown = %"a b=c é", n = -3i64, ok = true, "odd {}", 1);
            tracing::error!(target: "access", "bare");
            tracing::debug!(target: "other", caller = "x", "not an access line");
        };
        if json {
            let subscriber = builder
                .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
                .event_format(format)
                .finish();
            tracing::subscriber::with_default(subscriber, emit);
        } else {
            tracing::subscriber::with_default(builder.event_format(format).finish(), emit);
        }
        let text = sink.text();
        text.lines()
            .map(|l| {
                let ts = if json {
                    l.find("Z\"").unwrap()
                } else {
                    l.find('Z').unwrap()
                };
                l[ts + 1..].to_owned()
            })
            .collect()
    }

    #[test]
    fn access_lines_written_by_hand_match_tracing_subscribers_own_text_and_json() {
        let plain = tracing_subscriber::fmt::format::Format::default();
        let ours = lines_of(false, Format::text());
        assert_eq!(ours, lines_of(false, plain.clone()));
        assert_eq!(ours.len(), 4);
        assert_eq!(
            ours[0],
            "  INFO access: request request_id=3f9a0c1b2d4e-12 caller=checkout route=tokens status=200 cache=hit latency_us=41"
        );
        let json = plain
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false);
        let ours = lines_of(true, Format::json());
        assert_eq!(ours, lines_of(true, json));
        for line in &ours {
            let whole = format!("{{\"timestamp\":\"2026-01-01T00:00:00.000000Z{line}");
            serde_json::from_str::<serde_json::Value>(&whole).unwrap();
        }
    }

    #[test]
    fn timestamps_are_rfc3339_to_the_microsecond_in_utc() {
        let mut buf = [0u8; 27];
        let t = std::time::UNIX_EPOCH + Duration::new(1_795_659_211, 770_287_000);
        assert_eq!(timestamp(t, &mut buf), "2026-11-26T02:13:31.770287Z");
        let t = std::time::UNIX_EPOCH + Duration::new(951_782_400, 1_000);
        assert_eq!(timestamp(t, &mut buf), "2000-02-29T00:00:00.000001Z");
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
