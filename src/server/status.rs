//! The status page served at `/` on the admin listener: one self-contained HTML page (inline CSS,
//! no script, no external asset, refreshing itself every [`REFRESH_SECONDS`]) for a person who
//! wants to know, at a glance, whether this broker is well: uptime and build, traffic, hit ratio,
//! cache entries, Truora's health and the breaker, and per-caller counts.
//!
//! Every figure comes from the same counters `/metrics` exports (or from the live state the
//! scrape reads), so the page and Prometheus never disagree. Each figure's element carries an
//! `id` and its exact value in `data-value`, for scripts and the browser test.

use std::fmt::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::core::Collector;
use prometheus::IntCounterVec;

use super::api::ApiState;
use crate::breaker::BreakerState;
use crate::metrics::{CacheOutcome, Metrics, EVICTION_CAUSES, REVISION, VERSION};
use crate::upstream::Snapshot;

/// How often the page reloads itself.
pub const REFRESH_SECONDS: u32 = 5;

/// One caller's row.
#[derive(Debug, Clone, PartialEq)]
pub struct CallerRow {
    /// `[[clients]] id`.
    pub id: String,
    /// Requests answered.
    pub requests: u64,
    /// Of which served from the cache.
    pub hits: u64,
    /// Of which minted (or waited on an identical mint).
    pub misses: u64,
    /// Of which named no user.
    pub uncacheable: u64,
    /// Of which made no cache lookup (invalidations, requests refused before the lookup).
    pub other: u64,
    /// Tokens minted at Truora for this caller.
    pub mints: u64,
}

/// Everything the page shows, read at one moment.
#[derive(Debug, Clone)]
pub struct StatusView {
    /// Crate version.
    pub version: &'static str,
    /// Build revision, or `unknown`.
    pub revision: &'static str,
    /// Time since start.
    pub uptime: Duration,
    /// Caller API requests answered, all and by status class (2xx, 4xx, 5xx).
    pub requests: u64,
    /// 2xx answers.
    pub requests_2xx: u64,
    /// 4xx answers.
    pub requests_4xx: u64,
    /// 5xx answers.
    pub requests_5xx: u64,
    /// Requests being answered now.
    pub in_flight: i64,
    /// Cache lookups that hit.
    pub hits: u64,
    /// Cache lookups that made the upstream call.
    pub misses: u64,
    /// Cache lookups that waited on an identical call.
    pub coalesced: u64,
    /// Requests that named no user.
    pub uncacheable: u64,
    /// Tokens held.
    pub entries: u64,
    /// `cache.max_entries`.
    pub max_entries: i64,
    /// Evictions by cause, as [`EVICTION_CAUSES`].
    pub evictions: [u64; 4],
    /// The resilience policy's state.
    pub upstream: Snapshot,
    /// Upstream calls that minted.
    pub upstream_ok: u64,
    /// Upstream calls that failed, whatever the way.
    pub upstream_failed: u64,
    /// Misses refused without calling Truora (throttle window, breaker, saturation, budgets).
    pub upstream_refused: u64,
    /// Time since the last successful mint, if any.
    pub last_success_ago: Option<Duration>,
    /// Per caller, in order of first request.
    pub callers: Vec<CallerRow>,
}

/// True when the breaker is open but its cooldown has passed: the next miss will be let
/// through as a probe. The breaker (and its gauge) still say "open" until that miss comes.
pub fn cooldown_over(upstream: &Snapshot) -> bool {
    matches!(upstream.breaker, BreakerState::Open { until } if until <= tokio::time::Instant::now())
}

fn sum_by(vec: &IntCounterVec, mut keep: impl FnMut(&str) -> bool, label: &str) -> u64 {
    let mut total = 0.0;
    for family in vec.collect() {
        for m in family.get_metric() {
            let value = m
                .get_label()
                .iter()
                .find(|l| l.name() == label)
                .map_or("", |l| l.value());
            if keep(value) {
                total += m.get_counter().get_value();
            }
        }
    }
    total as u64
}

impl StatusView {
    /// Reads the broker's state now.
    pub fn gather(state: &ApiState) -> Self {
        let m: &Metrics = &state.metrics;
        let upstream = state.issuer.guard().snapshot();
        let last_success = m.upstream_last_success.get();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let status_class = |class: char| sum_by(&m.requests, |s| s.starts_with(class), "status");
        let callers = m
            .callers()
            .map(|c| CallerRow {
                id: c.id.to_string(),
                requests: c.total(),
                hits: c.requests(CacheOutcome::Hit),
                misses: c.requests(CacheOutcome::Miss),
                uncacheable: c.requests(CacheOutcome::Uncacheable),
                other: c.requests(CacheOutcome::None),
                mints: c.mints.get(),
            })
            .collect();
        Self {
            version: VERSION,
            revision: REVISION,
            uptime: m.uptime(),
            requests: sum_by(&m.requests, |_| true, "status"),
            requests_2xx: status_class('2'),
            requests_4xx: status_class('4'),
            requests_5xx: status_class('5'),
            in_flight: m.requests_in_flight.get(),
            hits: m.lookups(CacheOutcome::Hit),
            misses: m.lookups(CacheOutcome::Miss),
            coalesced: m.lookups(CacheOutcome::Coalesced),
            uncacheable: m.lookups(CacheOutcome::Uncacheable),
            entries: state.issuer.cache().len(),
            max_entries: m.cache_max_entries.get(),
            evictions: std::array::from_fn(|i| m.evictions[i].get()),
            upstream,
            upstream_ok: sum_by(&m.upstream_requests, |o| o == "ok", "outcome"),
            upstream_failed: sum_by(&m.upstream_requests, |o| o != "ok", "outcome"),
            upstream_refused: sum_by(&m.upstream_refused, |_| true, "reason"),
            last_success_ago: (last_success > 0.0)
                .then(|| Duration::from_secs_f64((now - last_success).max(0.0))),
            callers,
        }
    }

    /// Hits over cacheable lookups (hit, miss, coalesced), or `None` before the first one.
    /// The same ratio as the `job:token_broker_cache_hit:ratio_rate5m` recording rule, since
    /// start instead of over 5 minutes.
    pub fn hit_ratio(&self) -> Option<f64> {
        let lookups = self.hits + self.misses + self.coalesced;
        (lookups > 0).then(|| self.hits as f64 / lookups as f64)
    }

    /// One word for Truora's health, and whether it is bad.
    pub fn upstream_health(&self) -> (&'static str, Level) {
        let u = &self.upstream;
        if u.credential_rejected {
            ("master key rejected", Level::Bad)
        } else if matches!(u.breaker, BreakerState::Open { .. }) {
            ("failing", Level::Bad)
        } else if !u.throttled_for.is_zero() {
            ("throttled", Level::Warn)
        } else if matches!(u.breaker, BreakerState::HalfOpen { .. }) {
            ("recovering", Level::Warn)
        } else if matches!(u.breaker, BreakerState::Closed { failures } if failures > 0) {
            ("failures", Level::Warn)
        } else {
            ("ok", Level::Good)
        }
    }

    /// The page.
    pub fn html(&self) -> String {
        let mut h = String::with_capacity(8 * 1024);
        let (health, level) = self.upstream_health();
        let _ = write!(
            h,
            r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>token-broker status</title>
<style>{CSS}</style>
</head>
<body>
<header><h1>token-broker</h1><p>version <span id="version" data-value="{version}">{version}</span> · revision <span id="revision" data-value="{revision}">{revision}</span> · up <span id="uptime" data-value="{uptime_s}">{uptime}</span> · refreshes every {REFRESH_SECONDS} s</p></header>
<main>
<section class="tiles">
"#,
            version = esc(self.version),
            revision = esc(self.revision),
            uptime_s = self.uptime.as_secs(),
            uptime = human(self.uptime),
        );
        let ratio = self.hit_ratio();
        tile(
            &mut h,
            "Hit ratio",
            "hit-ratio",
            &ratio.map_or("none".into(), |r| format!("{r:.4}")),
            &ratio.map_or("no lookups yet".into(), |r| format!("{:.1} %", r * 100.0)),
            &format!(
                "{} hits, {} misses, {} coalesced",
                self.hits, self.misses, self.coalesced
            ),
            Level::Neutral,
        );
        tile(
            &mut h,
            "Cache entries",
            "entries",
            &self.entries.to_string(),
            &self.entries.to_string(),
            &format!("of at most {}", self.max_entries),
            Level::Neutral,
        );
        tile(
            &mut h,
            "Truora",
            "upstream-health",
            health,
            health,
            &match self.last_success_ago {
                Some(ago) => format!("last mint {} ago", human(ago)),
                None => "no mint yet".into(),
            },
            level,
        );
        tile(
            &mut h,
            "Breaker",
            "breaker",
            self.upstream.breaker.name(),
            &self.upstream.breaker.name().replace('_', "-"),
            &match self.upstream.breaker {
                BreakerState::Closed { failures } => {
                    format!("{failures} consecutive failure(s)")
                }
                BreakerState::Open { .. } if cooldown_over(&self.upstream) => {
                    "cooldown over: the next miss probes".into()
                }
                BreakerState::Open { .. } => "misses refused".into(),
                BreakerState::HalfOpen { .. } => "one probe allowed".into(),
            },
            match self.upstream.breaker {
                BreakerState::Closed { .. } => Level::Good,
                BreakerState::HalfOpen { .. } => Level::Warn,
                BreakerState::Open { .. } => Level::Bad,
            },
        );
        tile(
            &mut h,
            "Requests",
            "requests",
            &self.requests.to_string(),
            &self.requests.to_string(),
            &format!("{} in flight", self.in_flight),
            Level::Neutral,
        );
        h.push_str("</section>\n<div class=\"cols\">\n");

        h.push_str("<section><h2>Traffic</h2><table>\n");
        row(&mut h, "2xx answers", "requests-2xx", self.requests_2xx);
        row(&mut h, "4xx answers", "requests-4xx", self.requests_4xx);
        row(&mut h, "5xx answers", "requests-5xx", self.requests_5xx);
        row(&mut h, "Cache hits", "hits", self.hits);
        row(&mut h, "Cache misses (minted)", "misses", self.misses);
        row(
            &mut h,
            "Coalesced (waited on a mint)",
            "coalesced",
            self.coalesced,
        );
        row(
            &mut h,
            "Uncacheable (no user named)",
            "uncacheable",
            self.uncacheable,
        );
        for (cause, n) in EVICTION_CAUSES.iter().zip(self.evictions) {
            row(
                &mut h,
                &format!("Evicted: {cause}"),
                &format!("evictions-{cause}"),
                n,
            );
        }
        h.push_str("</table></section>\n");

        let u = &self.upstream;
        let _ = write!(
            h,
            "<section><h2>Truora</h2><table>\n\
             <tr><th>Throttle window left</th><td id=\"throttled-for\" data-value=\"{}\">{} s</td></tr>\n\
             <tr><th>Master key rejected</th><td id=\"credential-rejected\" data-value=\"{}\">{}</td></tr>\n\
             <tr><th>Calls in flight</th><td id=\"upstream-in-flight\" data-value=\"{}\">{}</td></tr>\n",
            u.throttled_for.as_secs_f64().ceil(),
            u.throttled_for.as_secs_f64().ceil(),
            u.credential_rejected,
            if u.credential_rejected { "yes" } else { "no" },
            u.in_flight,
            u.in_flight,
        );
        row(&mut h, "Calls that minted", "upstream-ok", self.upstream_ok);
        row(
            &mut h,
            "Calls that failed",
            "upstream-failed",
            self.upstream_failed,
        );
        row(
            &mut h,
            "Misses refused without a call",
            "upstream-refused",
            self.upstream_refused,
        );
        h.push_str("</table></section>\n</div>\n");

        h.push_str(
            "<section><h2>Callers</h2><table id=\"callers\">\n<tr><th>Caller</th><th>Requests</th>\
             <th>Hits</th><th>Misses</th><th>Uncacheable</th><th>No lookup</th><th>Minted</th>\
             <th>Hit ratio</th></tr>\n",
        );
        if self.callers.is_empty() {
            h.push_str("<tr><td colspan=\"8\">no caller request yet</td></tr>\n");
        }
        for c in &self.callers {
            let id = esc(&c.id);
            let cached = c.hits + c.misses;
            let ratio = if cached == 0 {
                "-".to_string()
            } else {
                format!("{:.1} %", c.hits as f64 * 100.0 / cached as f64)
            };
            let _ = write!(h, "<tr class=\"caller\" data-caller=\"{id}\"><th>{id}</th>");
            for (field, n) in [
                ("requests", c.requests),
                ("hits", c.hits),
                ("misses", c.misses),
                ("uncacheable", c.uncacheable),
                ("other", c.other),
                ("mints", c.mints),
            ] {
                let _ = write!(h, "<td data-field=\"{field}\" data-value=\"{n}\">{n}</td>");
            }
            let _ = writeln!(h, "<td>{ratio}</td></tr>");
        }
        h.push_str(
            "</table></section>\n</main>\n<footer>Prometheus series: <a href=\"/metrics\">/metrics</a> · \
             <a href=\"/readyz\">/readyz</a> · <a href=\"/healthz\">/healthz</a></footer>\n</body>\n</html>\n",
        );
        h
    }
}

/// How a figure looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Nothing to judge.
    Neutral,
    /// Well.
    Good,
    /// Worth a look.
    Warn,
    /// Broken.
    Bad,
}

impl Level {
    fn class(self) -> &'static str {
        match self {
            Level::Neutral => "neutral",
            Level::Good => "good",
            Level::Warn => "warn",
            Level::Bad => "bad",
        }
    }
}

const CSS: &str = "\
body{font:15px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;background:#f4f5f7;color:#1d2330}\
header{background:#1d2330;color:#fff;padding:12px 24px}header h1{margin:0;font-size:20px}\
header p{margin:4px 0 0;color:#c5cad6;font-size:13px}main{padding:16px 24px;max-width:1100px}\
.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:12px}\
.tile{background:#fff;border-radius:6px;padding:12px 14px;border-left:6px solid #9aa3b5}\
.tile h2{margin:0;font-size:13px;font-weight:600;color:#5a6275;text-transform:uppercase}\
.tile .v{font-size:26px;font-weight:700;margin:4px 0}.tile .sub{font-size:12px;color:#5a6275}\
.good{border-left-color:#2e9e5b}.warn{border-left-color:#e0a100}.bad{border-left-color:#d03b3b}\
.bad .v{color:#d03b3b}section h2{font-size:16px;margin:18px 0 6px}\
.cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(360px,1fr));gap:0 24px}\
table{border-collapse:collapse;background:#fff;border-radius:6px;width:100%}\
th,td{padding:3px 12px;text-align:left;border-bottom:1px solid #e6e8ee;font-size:14px}\
td{font-variant-numeric:tabular-nums;text-align:right}#callers th{text-align:right}\
#callers th:first-child{text-align:left}\
footer{padding:8px 24px 24px;font-size:12px;color:#5a6275}";

fn tile(h: &mut String, title: &str, id: &str, value: &str, shown: &str, sub: &str, level: Level) {
    let _ = writeln!(
        h,
        "<div class=\"tile {}\"><h2>{}</h2><div class=\"v\" id=\"{id}\" data-value=\"{}\">{}</div><div class=\"sub\">{}</div></div>",
        level.class(),
        esc(title),
        esc(value),
        esc(shown),
        esc(sub),
    );
}

fn row(h: &mut String, label: &str, id: &str, n: u64) {
    let _ = writeln!(
        h,
        "<tr><th>{}</th><td id=\"{id}\" data-value=\"{n}\">{n}</td></tr>",
        esc(label)
    );
}

/// HTML-escapes text and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `3 d 4 h`, `2 h 5 min`, `7 min 3 s`, `42 s`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    let (days, hours, mins, secs) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    if days > 0 {
        format!("{days} d {hours} h")
    } else if hours > 0 {
        format!("{hours} h {mins} min")
    } else if mins > 0 {
        format!("{mins} min {secs} s")
    } else {
        format!("{secs} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> StatusView {
        StatusView {
            version: "1.2.3",
            revision: "abc",
            uptime: Duration::from_secs(3725),
            requests: 10,
            requests_2xx: 8,
            requests_4xx: 1,
            requests_5xx: 1,
            in_flight: 0,
            hits: 6,
            misses: 2,
            coalesced: 0,
            uncacheable: 1,
            entries: 2,
            max_entries: 100,
            evictions: [0, 1, 0, 0],
            upstream: Snapshot {
                breaker: BreakerState::Closed { failures: 0 },
                throttled_for: Duration::ZERO,
                credential_rejected: false,
                in_flight: 0,
            },
            upstream_ok: 3,
            upstream_failed: 1,
            upstream_refused: 0,
            last_success_ago: Some(Duration::from_secs(5)),
            callers: vec![CallerRow {
                id: "<b>&".into(),
                requests: 10,
                hits: 6,
                misses: 2,
                uncacheable: 1,
                other: 1,
                mints: 3,
            }],
        }
    }

    #[test]
    fn the_page_shows_each_figure_with_its_exact_value() {
        let html = view().html();
        for needle in [
            r#"id="hit-ratio" data-value="0.7500">75.0 %"#,
            r#"id="entries" data-value="2">2"#,
            r#"id="uptime" data-value="3725">1 h 2 min"#,
            r#"id="version" data-value="1.2.3""#,
            r#"id="upstream-health" data-value="ok""#,
            r#"id="breaker" data-value="closed""#,
            r#"id="evictions-explicit" data-value="1""#,
            r#"<meta http-equiv="refresh" content="5">"#,
            r#"<td data-field="mints" data-value="3">3</td>"#,
        ] {
            assert!(html.contains(needle), "{needle}\n{html}");
        }
    }

    #[test]
    fn the_page_is_self_contained_and_escapes_what_it_shows() {
        let html = view().html();
        assert!(html.contains("&lt;b&gt;&amp;"));
        assert!(!html.contains("<b>&"));
        assert!(!html.contains("<script"));
        assert!(!html.contains("src="));
        assert!(!html.contains("http://") && !html.contains("https://"));
        assert!(!html.contains("<link"));
    }

    #[test]
    fn upstream_health_says_the_worst_first() {
        let mut v = view();
        assert_eq!(v.upstream_health(), ("ok", Level::Good));
        v.upstream.throttled_for = Duration::from_secs(3);
        assert_eq!(v.upstream_health().0, "throttled");
        v.upstream.breaker = BreakerState::Open {
            until: tokio::time::Instant::now(),
        };
        assert_eq!(v.upstream_health(), ("failing", Level::Bad));
        v.upstream.credential_rejected = true;
        assert_eq!(v.upstream_health(), ("master key rejected", Level::Bad));
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_past_its_cooldown_says_the_next_miss_probes() {
        let mut v = view();
        v.upstream.breaker = BreakerState::Open {
            until: tokio::time::Instant::now() + Duration::from_secs(10),
        };
        assert!(v.html().contains("misses refused"));
        tokio::time::advance(Duration::from_secs(11)).await;
        let html = v.html();
        assert!(html.contains(r#"id="breaker" data-value="open""#));
        assert!(
            html.contains("cooldown over: the next miss probes"),
            "{html}"
        );
    }

    #[test]
    fn no_lookup_yet_is_not_a_zero_ratio() {
        let mut v = view();
        (v.hits, v.misses, v.coalesced) = (0, 0, 0);
        assert_eq!(v.hit_ratio(), None);
        assert!(v
            .html()
            .contains(r#"id="hit-ratio" data-value="none">no lookups yet"#));
    }

    #[test]
    fn durations_read_as_a_person_says_them() {
        assert_eq!(human(Duration::from_secs(42)), "42 s");
        assert_eq!(human(Duration::from_secs(423)), "7 min 3 s");
        assert_eq!(human(Duration::from_secs(7500)), "2 h 5 min");
        assert_eq!(human(Duration::from_secs(3 * 86400 + 4 * 3600)), "3 d 4 h");
    }
}
