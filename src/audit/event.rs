//! The events of the audit trail and their two forms: a JSON object on one line of
//! `audit.file`, or an `info` event of the `audit` log target on stderr (the form before the
//! trail had a file of its own, kept field for field).
//!
//! No field holds a token, a secret, the master key or a user's identifiers: users are
//! [`UserTags`], tokens are named by their `jti` claim, callers by their configured id, flows
//! by their id, pass-through calls by the allowlist pattern they matched (never the path), and
//! refusals by a bounded outcome and a message that never echoes a value.

use std::net::IpAddr;
use std::time::SystemTime;

use serde::Serialize;

use super::tag::UserTags;

/// One event of the trail. Every JSON line also has `ts` (RFC 3339, milliseconds, UTC) and
/// `event` (the variant's name, snake case).
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event<'a> {
    /// The trail was opened: the first line of every run.
    Start {
        /// The broker's version.
        version: &'a str,
        /// The id of the user tags' key.
        tag_key: &'a str,
        /// `file` or `generated`.
        tag_key_source: &'a str,
        /// `audit.on_failure`.
        on_failure: &'a str,
        /// `audit.include_hits`.
        include_hits: bool,
    },
    /// A token was minted at Truora for a caller.
    Mint {
        /// The caller's id.
        caller: &'a str,
        /// The flow.
        flow_id: &'a str,
        /// The user's tags (empty: the request named no user).
        #[serde(serialize_with = "tags")]
        user: &'a UserTags,
        /// The key of `user`'s tags.
        tag_key: &'a str,
        /// The token's `jti` claim, when it has a usable one.
        jti: Option<&'a str>,
        /// The request that started the mint.
        request_id: &'a str,
        /// Its caller's address.
        peer: Option<IpAddr>,
        /// The token's lifetime by its claims, in seconds.
        lifetime_s: u64,
        /// `miss`, `uncacheable` (no user named) or `no_cache` (a new process was asked for).
        cache: &'a str,
    },
    /// A cached token was handed out again (with `audit.include_hits`).
    Hit {
        /// The caller's id.
        caller: &'a str,
        /// The flow.
        flow_id: &'a str,
        /// The user's tags.
        #[serde(serialize_with = "tags")]
        user: &'a UserTags,
        /// The key of `user`'s tags.
        tag_key: &'a str,
        /// The token's `jti` claim.
        jti: Option<&'a str>,
        /// The request.
        request_id: &'a str,
        /// Its caller's address.
        peer: Option<IpAddr>,
        /// `hit` (this replica's cache or Redis) or `coalesced` (an identical request's mint).
        cache: &'a str,
    },
    /// Cached tokens were dropped.
    Invalidation {
        /// `caller` (`DELETE /v1/tokens`), `webhook`, `result` (a result read through the
        /// pass-through) or `no_cache`.
        reason: &'a str,
        /// The caller whose tokens, or `*` for every caller's.
        caller: &'a str,
        /// The flow, when the drop names one.
        flow_id: Option<&'a str>,
        /// The user's tags, when the drop names one.
        #[serde(serialize_with = "tags")]
        user: &'a UserTags,
        /// The key of `user`'s tags.
        tag_key: &'a str,
        /// Tokens dropped.
        invalidated: u64,
        /// Callers they belonged to.
        callers: u64,
        /// False when the shared cache could not be reached: other replicas may keep theirs.
        everywhere: bool,
    },
    /// A reload removed a caller (or changed its credential): its tokens were dropped.
    Revocation {
        /// The caller's id.
        caller: &'a str,
        /// Tokens dropped (`null` when the shared cache could not be reached: this replica's
        /// were dropped, how many is not known).
        invalidated: Option<u64>,
        /// False when the shared cache could not be reached.
        everywhere: bool,
    },
    /// A reload, applied or refused.
    Reload {
        /// `sighup`, `admin` (`POST /admin/reload`) or `watch` (a watched file changed).
        trigger: &'a str,
        /// `applied` or `refused`.
        result: &'a str,
        /// The watched files whose change started it (their config keys).
        files: &'a [&'a str],
        /// Callers configured now (applied).
        callers: Option<usize>,
        /// Callers removed (applied).
        revoked: &'a [String],
        /// Sections that changed and need a restart (applied).
        restart_required: &'a [&'a str],
        /// The master key's fingerprint now in use (applied).
        key_fingerprint: Option<&'a str>,
        /// The user tags' key in use now.
        tag_key: &'a str,
        /// Why it was refused: the key at fault and the rule (refused).
        error: Option<&'a str>,
    },
    /// A webhook delivery was refused (nothing dropped).
    WebhookRefused {
        /// The delivery's event, when known.
        webhook_event: &'a str,
        /// `unauthorized`, `bad_signature`, `stale`, `malformed`, `too_large`, `error`.
        outcome: &'a str,
        /// The sender's address.
        peer: Option<IpAddr>,
        /// Refusals of this peer not written since its last written one (rate limit).
        suppressed: u64,
    },
    /// One peer failed to authenticate repeatedly.
    AuthFailures {
        /// The peer's address.
        peer: IpAddr,
        /// Failures of this peer within `window_s`.
        failures: u64,
        /// The window, in seconds.
        window_s: u64,
        /// The reason of the failure that crossed the threshold (`unknown`, `expired`, ...).
        reason: &'a str,
    },
    /// A caller reached one of Truora's other endpoints through the broker.
    Passthrough {
        /// The caller's id.
        caller: &'a str,
        /// The method.
        method: &'a str,
        /// The allowlist pattern the path matched.
        pattern: &'a str,
        /// The status answered.
        status: u16,
        /// The request.
        request_id: &'a str,
        /// Its caller's address.
        peer: Option<IpAddr>,
    },
    /// The trail was written again after events were lost.
    Resumed {
        /// Events that did not reach the file since the last one that did.
        lost: u64,
    },
}

fn tags<S: serde::Serializer>(tags: &&UserTags, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(&tags.tags)
}

impl Event<'_> {
    /// The event's name, also the `event` label of `token_broker_audit_events_total`.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Start { .. } => "start",
            Event::Mint { .. } => "mint",
            Event::Hit { .. } => "hit",
            Event::Invalidation { .. } => "invalidation",
            Event::Revocation { .. } => "revocation",
            Event::Reload { .. } => "reload",
            Event::WebhookRefused { .. } => "webhook_refused",
            Event::AuthFailures { .. } => "auth_failures",
            Event::Passthrough { .. } => "passthrough",
            Event::Resumed { .. } => "resumed",
        }
    }

    /// Every name, for the series created at start.
    pub const NAMES: [&'static str; 10] = [
        "start",
        "mint",
        "hit",
        "invalidation",
        "revocation",
        "reload",
        "webhook_refused",
        "auth_failures",
        "passthrough",
        "resumed",
    ];

    /// The JSON line, newline included: `ts` first, then `event`, then the event's fields in
    /// the order above.
    pub fn line(&self, at: SystemTime) -> Vec<u8> {
        use std::io::Write;
        let mut out = Vec::with_capacity(320);
        let _ = write!(
            out,
            "{{\"ts\":\"{}\",",
            humantime::format_rfc3339_millis(at)
        );
        let fields = out.len();
        // Strings, numbers and addresses only: serialising cannot fail.
        if serde_json::to_writer(&mut out, self).is_err() {
            out.truncate(fields);
            out.extend_from_slice(br#""event":"unwritable"}"#);
        } else {
            // The event's own object opens with `{`: the line's has opened already.
            out.remove(fields);
        }
        out.push(b'\n');
        out
    }

    /// Writes the event as an `info` event of the `audit` target (the trail without a file).
    pub fn log(&self) {
        match self {
            Event::Start {
                tag_key,
                tag_key_source,
                include_hits,
                ..
            } => tracing::info!(
                target: "audit",
                tag_key,
                tag_key_source,
                include_hits,
                "audit trail on stderr"
            ),
            Event::Mint {
                caller,
                flow_id,
                user,
                tag_key,
                jti,
                request_id,
                peer,
                lifetime_s,
                cache,
            } => tracing::info!(
                target: "audit",
                caller,
                flow_id,
                user = %user.joined(),
                tag_key,
                jti = jti.unwrap_or("-"),
                request_id,
                peer = ?peer,
                lifetime_s,
                cache,
                "token minted"
            ),
            Event::Hit {
                caller,
                flow_id,
                user,
                tag_key,
                jti,
                request_id,
                peer,
                cache,
            } => tracing::info!(
                target: "audit",
                caller,
                flow_id,
                user = %user.joined(),
                tag_key,
                jti = jti.unwrap_or("-"),
                request_id,
                peer = ?peer,
                cache,
                "token handed out from the cache"
            ),
            Event::Invalidation {
                reason,
                caller,
                flow_id,
                user,
                tag_key,
                invalidated,
                callers,
                everywhere,
            } => tracing::info!(
                target: "audit",
                reason,
                caller,
                flow_id,
                user = %user.joined(),
                tag_key,
                invalidated,
                callers,
                everywhere,
                "tokens invalidated"
            ),
            Event::Revocation {
                caller,
                invalidated,
                everywhere,
            } => tracing::info!(
                target: "audit",
                caller,
                dropped = ?invalidated,
                everywhere,
                "caller revoked"
            ),
            Event::Reload {
                trigger,
                result,
                files,
                tag_key,
                error,
                ..
            } => tracing::info!(
                target: "audit",
                trigger,
                result,
                files = ?files,
                tag_key,
                error = error.unwrap_or("-"),
                "configuration reload"
            ),
            Event::WebhookRefused {
                webhook_event,
                outcome,
                peer,
                suppressed,
            } => tracing::info!(
                target: "audit",
                event = webhook_event,
                outcome,
                peer = ?peer,
                suppressed,
                "webhook delivery refused"
            ),
            Event::AuthFailures {
                peer,
                failures,
                window_s,
                reason,
            } => tracing::info!(
                target: "audit",
                peer = %peer,
                failures,
                window_s,
                reason,
                "repeated authentication failures"
            ),
            Event::Passthrough {
                caller,
                method,
                pattern,
                status,
                request_id,
                peer,
            } => tracing::info!(
                target: "audit",
                caller,
                method,
                pattern,
                status,
                request_id,
                peer = ?peer,
                "pass-through"
            ),
            Event::Resumed { lost } => tracing::info!(target: "audit", lost, "audit trail resumed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::tag::{Identifier, KeySource, TagKey};

    #[test]
    fn a_line_is_one_json_object_with_ts_event_and_the_fields() {
        let key = TagKey::new(&[7; 32], KeySource::File);
        let user = UserTags::of(&key, [Identifier::AccountId("user-1")]);
        let event = Event::Mint {
            caller: "checkout",
            flow_id: "IPF1",
            user: &user,
            tag_key: key.id(),
            jti: Some("abc"),
            request_id: "r-1",
            peer: Some("127.0.0.1".parse().unwrap()),
            lifetime_s: 7200,
            cache: "miss",
        };
        let line = event.line(SystemTime::UNIX_EPOCH);
        assert!(
            line.starts_with(
                br#"{"ts":"1970-01-01T00:00:00.000Z","event":"mint","caller":"checkout","#
            ),
            "{}",
            String::from_utf8_lossy(&line)
        );
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        assert!(line.ends_with(b"\n"));
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["ts"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["event"], "mint");
        assert_eq!(v["caller"], "checkout");
        assert_eq!(v["user"][0], user.tags[0].to_string());
        assert_eq!(v["tag_key"], key.id());
        assert_eq!(v["jti"], "abc");
        assert_eq!(v["peer"], "127.0.0.1");
        assert_eq!(v["lifetime_s"], 7200);
        assert!(!String::from_utf8(line).unwrap().contains("user-1"));
    }

    #[test]
    fn every_event_has_a_counted_name() {
        let user = UserTags::default();
        let events = [
            Event::Resumed { lost: 1 },
            Event::Revocation {
                caller: "c",
                invalidated: Some(0),
                everywhere: true,
            },
            Event::Invalidation {
                reason: "caller",
                caller: "c",
                flow_id: None,
                user: &user,
                tag_key: "k",
                invalidated: 0,
                callers: 0,
                everywhere: true,
            },
        ];
        for e in &events {
            assert!(Event::NAMES.contains(&e.name()));
            let v: serde_json::Value = serde_json::from_slice(&e.line(SystemTime::now())).unwrap();
            assert_eq!(v["event"], e.name());
        }
    }
}
