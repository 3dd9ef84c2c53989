//! Reading one delivery: the body as a compact JWT (whatever its Content-Type: Truora documents
//! none), its HS256 signature when a signing secret is configured, its `iat` against
//! `webhooks.max_age`, its event (from the rule URL's `?event=` or a claim, mapped through
//! `[webhooks.events]`) and the flow and user an ending event names. Pure: no I/O, no clock of
//! its own, so the fuzz target drives it with any bytes.
//!
//! The JWT is split and decoded here rather than by `jsonwebtoken`: a delivery's faults must
//! come apart (not a JWT is 400, a bad signature 401, a missing claim 400 naming it), claims are
//! renamed by configuration and `iat` is checked against `max_age` rather than `exp`; the
//! signature itself is ring's HMAC, compared in constant time.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde_json::{Map, Value};

use crate::config::{ClaimNames, WebhooksConfig, EVENTS};
use crate::error::WebhookError;
use crate::truora::{is_account_id, is_flow_id};

/// How far ahead of the broker's clock a delivery's `iat` may be.
pub const MAX_CLOCK_AHEAD: Duration = Duration::from_secs(60);

/// At most this many claim names are listed in the debug line of a delivery.
const LISTED_CLAIMS: usize = 32;

/// What happened to the process, as the broker understands it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The process started: it goes on with its token.
    Created,
    /// It succeeded: its tokens are dropped.
    Succeeded,
    /// It failed (declined, expired, ...): its tokens are dropped.
    Failed,
    /// Any other event: accepted and ignored.
    Other,
}

impl Event {
    /// Every label of the `event` dimension of `token_broker_webhook_deliveries_total` but
    /// `unknown` (refused before the event was read).
    pub const LABELS: [&'static str; 4] = [EVENTS[0], EVENTS[1], EVENTS[2], "other"];

    /// The canonical name, or `other`.
    pub fn label(self) -> &'static str {
        match self {
            Event::Created => Self::LABELS[0],
            Event::Succeeded => Self::LABELS[1],
            Event::Failed => Self::LABELS[2],
            Event::Other => Self::LABELS[3],
        }
    }

    /// True when the process has ended and its tokens must go.
    pub fn ends_process(self) -> bool {
        matches!(self, Event::Succeeded | Event::Failed)
    }

    fn canonical(name: &str) -> Option<Self> {
        match name {
            n if n == EVENTS[0] || n == "created" => Some(Event::Created),
            n if n == EVENTS[1] || n == "succeeded" || n == "success" => Some(Event::Succeeded),
            n if n == EVENTS[2] || n == "failed" || n == "failure" => Some(Event::Failed),
            _ => None,
        }
    }
}

/// How deliveries are read, from `[webhooks]` and the signing secret.
pub struct Rules {
    claims: ClaimNames,
    /// `[webhooks.events]`, keys lower-cased.
    events: HashMap<String, Event>,
    /// The HS256 key, when `signing_secret_file` is set.
    key: Option<ring::hmac::Key>,
    max_age: Duration,
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rules")
            .field("claims", &self.claims)
            .field("signed", &self.key.is_some())
            .field("max_age", &self.max_age)
            .finish_non_exhaustive()
    }
}

impl Rules {
    /// The rules of a validated `[webhooks]`, checking signatures with `signing_secret` when
    /// given.
    pub fn new(config: &WebhooksConfig, signing_secret: Option<&[u8]>) -> Self {
        let events = config
            .events
            .iter()
            .filter_map(|(from, to)| {
                Event::canonical(to).map(|e| (from.trim().to_ascii_lowercase(), e))
            })
            .collect();
        Self {
            claims: config.claims.clone(),
            events,
            key: signing_secret.map(|s| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, s)),
            max_age: config.max_age,
        }
    }

    /// The event a name stands for: `[webhooks.events]` first, then the canonical names and
    /// their short forms (`created`, `success`/`succeeded`, `failure`/`failed`), all
    /// case-insensitive; anything else is [`Event::Other`].
    pub fn event(&self, name: &str) -> Event {
        let name = name.trim().to_ascii_lowercase();
        self.events
            .get(&name)
            .copied()
            .or_else(|| Event::canonical(&name))
            .unwrap_or(Event::Other)
    }
}

/// A delivery read and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// What happened.
    pub event: Event,
    /// The process's flow; always set for an ending event.
    pub flow_id: Option<String>,
    /// The user; always set for an ending event.
    pub account_id: Option<String>,
    /// The identity process id, when the delivery names a well-formed one.
    pub process_id: Option<String>,
    /// When it was made (its `iat`).
    pub made_at: SystemTime,
}

impl Delivery {
    /// The flow and user whose tokens go, for an ending event.
    pub fn ended(&self) -> Option<(&str, &str)> {
        match (self.event.ends_process(), &self.flow_id, &self.account_id) {
            (true, Some(flow), Some(account)) => Some((flow, account)),
            _ => None,
        }
    }

    /// The latest a token of this process can have been minted, by the broker's clock: the
    /// delivery's `iat`, plus the minute a clock may be off by.
    pub fn ended_by(&self) -> SystemTime {
        self.made_at + MAX_CLOCK_AHEAD
    }
}

/// Reads `body` (a compact JWT) with `rules`, the event from `query_event` when the rule's URL
/// carries one, at wall-clock time `now`.
pub fn read(
    body: &[u8],
    query_event: Option<&str>,
    rules: &Rules,
    now: SystemTime,
) -> Result<Delivery, WebhookError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| not_jwt("the body is not UTF-8 text"))?
        .trim();
    let mut parts = text.split('.');
    let (Some(h), Some(p), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(not_jwt(
            "expected three dot-separated base64url parts (header.claims.signature)",
        ));
    };
    let header = object(&decode(h)?, "the header is not a JSON object")?;
    let claims = object(&decode(p)?, "the claims are not a JSON object")?;
    let signature = decode(sig)?;
    if let Some(key) = &rules.key {
        let signed_with_hs256 = header.get("alg").and_then(Value::as_str) == Some("HS256");
        let signed_input = &text[..h.len() + 1 + p.len()];
        if !signed_with_hs256
            || ring::hmac::verify(key, signed_input.as_bytes(), &signature).is_err()
        {
            return Err(WebhookError::BadSignature);
        }
    }
    let names: Vec<&str> = claims
        .keys()
        .take(LISTED_CLAIMS)
        .map(|k| k.get(..64).unwrap_or(k))
        .collect();
    // For checking a first real delivery against [webhooks.claims]: names only, never values.
    tracing::debug!(claims = ?names, "webhook delivery claims");

    let c = &rules.claims;
    let iat = match claims.get(&c.iat) {
        None => return Err(missing(&c.iat)),
        Some(v) => seconds(v).ok_or_else(|| invalid(&c.iat, "must be Unix seconds"))?,
    };
    let now = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    if now - iat > rules.max_age.as_secs_f64() || iat - now > MAX_CLOCK_AHEAD.as_secs_f64() {
        return Err(WebhookError::Stale);
    }
    let event = match query_event {
        Some(name) => name.to_owned(),
        None => text_claim(&claims, &c.event)?.ok_or_else(|| missing(&c.event))?,
    };
    let event = rules.event(&event);
    let flow_id = text_claim(&claims, &c.flow_id)?;
    let account_id = text_claim(&claims, &c.account_id)?;
    let process_id = text_claim(&claims, &c.process_id)?.filter(|p| is_account_id(p));
    if event.ends_process() {
        match &flow_id {
            None => return Err(missing(&c.flow_id)),
            Some(f) if !is_flow_id(f) => {
                return Err(invalid(
                    &c.flow_id,
                    "must be 1 to 64 characters of A-Z, a-z, 0-9, '_', '-'",
                ))
            }
            Some(_) => {}
        }
        match &account_id {
            None => return Err(missing(&c.account_id)),
            Some(a) if !is_account_id(a) => {
                return Err(invalid(
                    &c.account_id,
                    "must be 1 to 128 characters of [a-zA-Z0-9_.-]",
                ))
            }
            Some(_) => {}
        }
    }
    Ok(Delivery {
        event,
        flow_id,
        account_id,
        process_id,
        made_at: UNIX_EPOCH + Duration::from_secs_f64(iat.max(0.0)),
    })
}

fn not_jwt(reason: &'static str) -> WebhookError {
    WebhookError::NotJwt { reason }
}

fn missing(claim: &str) -> WebhookError {
    WebhookError::MissingClaim {
        claim: claim.to_owned(),
    }
}

fn invalid(claim: &str, rule: &'static str) -> WebhookError {
    WebhookError::InvalidClaim {
        claim: claim.to_owned(),
        rule,
    }
}

/// A base64url part, with or without padding.
fn decode(part: &str) -> Result<Vec<u8>, WebhookError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| not_jwt("a part is not base64url"))
}

fn object(bytes: &[u8], what: &'static str) -> Result<Map<String, Value>, WebhookError> {
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(not_jwt(what)),
    }
}

/// A number of seconds, as a JSON number or a numeric string.
fn seconds(v: &Value) -> Option<f64> {
    let n = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }?;
    n.is_finite().then_some(n)
}

/// A claim as text: a string, or a whole number written as one. Absent or null: `None`.
fn text_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<String>, WebhookError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim().to_owned())),
        Some(Value::Number(n)) if n.is_u64() || n.is_i64() => Ok(Some(n.to_string())),
        Some(_) => Err(invalid(name, "must be a string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"truora-signing-secret";

    fn config() -> WebhooksConfig {
        WebhooksConfig::new("127.0.0.1:0".parse().unwrap(), "ab".repeat(32))
    }

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    fn jwt(claims: &Value, key: &[u8]) -> String {
        let input = format!(
            "{}.{}",
            b64(br#"{"alg":"HS256","typ":"JWT"}"#),
            b64(claims.to_string().as_bytes())
        );
        let tag = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key),
            input.as_bytes(),
        );
        format!("{input}.{}", b64(tag.as_ref()))
    }

    fn ended(event: &str) -> Value {
        serde_json::json!({
            "event": event, "flow_id": "IPF1", "account_id": "user-1",
            "process_id": "IDP1", "iat": 1_800_000_000u64 - 30,
        })
    }

    fn signed() -> Rules {
        Rules::new(&config(), Some(SECRET))
    }

    #[test]
    fn a_signed_success_names_the_flow_and_user_whose_tokens_go() {
        let d = read(
            jwt(&ended("identity_process_succeeded"), SECRET).as_bytes(),
            None,
            &signed(),
            now(),
        )
        .unwrap();
        assert_eq!(d.event, Event::Succeeded);
        assert_eq!(d.ended(), Some(("IPF1", "user-1")));
        assert_eq!(d.process_id.as_deref(), Some("IDP1"));
    }

    #[test]
    fn events_are_read_case_insensitively_with_short_forms_and_the_configured_map() {
        let mut c = config();
        c.events.insert(
            "Proceso Aprobado".into(),
            "identity_process_succeeded".into(),
        );
        let rules = Rules::new(&c, None);
        for (name, event) in [
            ("IDENTITY_PROCESS_FAILED", Event::Failed),
            ("Success", Event::Succeeded),
            ("failure", Event::Failed),
            ("created", Event::Created),
            ("proceso aprobado", Event::Succeeded),
            ("identity_process_step_completed", Event::Other),
        ] {
            assert_eq!(rules.event(name), event, "{name}");
        }
    }

    #[test]
    fn the_event_may_come_from_the_query_and_claims_may_be_renamed() {
        let mut c = config();
        c.claims.flow_id = "FlowID".into();
        c.claims.account_id = "AccountID".into();
        let rules = Rules::new(&c, None);
        let claims =
            serde_json::json!({"FlowID": "IPF9", "AccountID": "u9", "iat": 1_800_000_000u64});
        let d = read(
            jwt(&claims, b"any").as_bytes(),
            Some("failure"),
            &rules,
            now(),
        )
        .unwrap();
        assert_eq!(d.ended(), Some(("IPF9", "u9")));
        // Without the rename the same delivery lacks flow_id, named as configured.
        let err = read(
            jwt(&claims, b"any").as_bytes(),
            Some("failure"),
            &Rules::new(&config(), None),
            now(),
        )
        .unwrap_err();
        assert_eq!(err, missing("flow_id"));
    }

    #[test]
    fn a_wrong_key_a_tampered_claim_or_another_algorithm_is_a_bad_signature() {
        let good = jwt(&ended("success"), SECRET);
        let wrong_key = jwt(&ended("success"), b"another");
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        parts[1] = b64(ended("success")
            .to_string()
            .replace("user-1", "user-2")
            .as_bytes());
        let tampered = parts.join(".");
        let none = format!(
            "{}.{}.",
            b64(br#"{"alg":"none"}"#),
            b64(ended("success").to_string().as_bytes())
        );
        for body in [wrong_key, tampered, none] {
            assert_eq!(
                read(body.as_bytes(), None, &signed(), now()),
                Err(WebhookError::BadSignature)
            );
        }
        // Without a signing secret the signature is not checked.
        read(
            jwt(&ended("success"), b"another").as_bytes(),
            None,
            &Rules::new(&config(), None),
            now(),
        )
        .unwrap();
    }

    #[test]
    fn an_iat_older_than_max_age_or_a_minute_ahead_is_stale() {
        let at = |iat: u64| {
            let mut c = ended("success");
            c["iat"] = iat.into();
            read(jwt(&c, SECRET).as_bytes(), None, &signed(), now())
        };
        let now_s = 1_800_000_000u64;
        assert!(at(now_s - 599).is_ok());
        assert_eq!(at(now_s - 601), Err(WebhookError::Stale));
        assert!(at(now_s + 59).is_ok());
        assert_eq!(at(now_s + 61), Err(WebhookError::Stale));
        let mut no_iat = ended("success");
        no_iat.as_object_mut().unwrap().remove("iat");
        assert_eq!(
            read(jwt(&no_iat, SECRET).as_bytes(), None, &signed(), now()),
            Err(missing("iat"))
        );
    }

    #[test]
    fn bodies_that_are_not_jwts_are_malformed_and_say_why() {
        for body in [
            &b"{\"event\":\"success\"}"[..],
            b"a.b",
            b"a.b.c.d",
            b"!!.e30.",
            b"\xff.e30.",
            b"",
        ] {
            assert!(
                matches!(
                    read(body, None, &signed(), now()),
                    Err(WebhookError::NotJwt { .. })
                ),
                "{body:?}"
            );
        }
    }

    #[test]
    fn an_ending_event_needs_a_well_formed_flow_and_user_and_created_does_not() {
        for (claim, value) in [
            ("flow_id", Value::Null),
            ("account_id", Value::Null),
            ("flow_id", "a/b".into()),
        ] {
            let mut c = ended("failure");
            c[claim] = value;
            let err = read(jwt(&c, SECRET).as_bytes(), None, &signed(), now()).unwrap_err();
            assert!(err.to_string().contains(claim), "{err}");
        }
        let created = serde_json::json!({"event": "created", "iat": 1_800_000_000u64});
        let d = read(jwt(&created, SECRET).as_bytes(), None, &signed(), now()).unwrap();
        assert_eq!((d.event, d.ended()), (Event::Created, None));
    }
}
