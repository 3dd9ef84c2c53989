//! Truora's "Notification via webhook", as the sandbox delivers it when a process is created or
//! finished: `POST <url>` with `Authorization: Bearer <bearer>` and, as the body, a compact HS256
//! JWT whose payload names the event, the flow, the account, the process and when (`iat`).
//!
//! Where it goes and how the JWT is spelled is a [`WebhookTarget`] in the sandbox's options, so a
//! test can speak to a receiver configured any way Truora allows (claim names, the event in the
//! query). Every delivery is recorded as a [`Delivery`], whatever came of it. The bearer and the
//! signing secret are never logged, recorded or shown (`Debug` redacts them).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Full, Limited};

use super::processes::{Process, Status};
use super::{lock, sign_hs256, Shared};

/// How long a delivery may take, connection to the end of the receiver's answer.
pub(super) const DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);
/// How many deliveries [`super::Sandbox::deliveries`] remembers; the oldest goes first.
const MAX_DELIVERIES: usize = 10_000;
/// How much of a receiver's answer is read (and thrown away) before the connection is reused.
const ANSWER_LIMIT: usize = 64 * 1024;

/// The claim names of the webhook JWT's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimNames {
    /// The event (`identity_process_created`, `..._succeeded`, `..._failed`).
    pub event: String,
    /// The flow id.
    pub flow_id: String,
    /// The account id.
    pub account_id: String,
    /// The process id.
    pub process_id: String,
    /// When it was sent, in Unix seconds.
    pub iat: String,
}

impl Default for ClaimNames {
    /// `event`, `flow_id`, `account_id`, `process_id`, `iat`.
    fn default() -> Self {
        Self {
            event: "event".into(),
            flow_id: "flow_id".into(),
            account_id: "account_id".into(),
            process_id: "process_id".into(),
            iat: "iat".into(),
        }
    }
}

/// Where and how the sandbox delivers its webhooks.
#[derive(Clone)]
pub struct WebhookTarget {
    /// The full URL, e.g. `http://127.0.0.1:8082/webhooks/truora` (plain HTTP: loopback).
    pub url: String,
    /// Sent as `Authorization: Bearer <bearer>`.
    pub bearer: String,
    /// The HS256 key of the JWT; `None` signs with the sandbox's own random key (a receiver
    /// without a secret ignores the signature).
    pub signing_secret: Option<Vec<u8>>,
    /// The claim names of the payload.
    pub claims: ClaimNames,
    /// Put the event in `?event=<name>` appended to the URL, and not in the payload.
    pub event_in_query: bool,
}

impl fmt::Debug for WebhookTarget {
    /// The bearer and the secret are secrets: only whether they are set shows.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookTarget")
            .field("url", &self.url)
            .field("bearer", &"[redacted]")
            .field(
                "signing_secret",
                &self.signing_secret.as_ref().map(|_| "[redacted]"),
            )
            .field("claims", &self.claims)
            .field("event_in_query", &self.event_in_query)
            .finish()
    }
}

/// One webhook the sandbox delivered, or tried to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The event name.
    pub event: String,
    /// The process it was about.
    pub process_id: String,
    /// The receiver's answer status, when it answered.
    pub status: Option<u16>,
    /// Why there was no answer (unreachable, timed out, bad URL).
    pub error: Option<String>,
}

/// What happened to a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Event {
    /// Its identity page was opened.
    Created,
    /// It was approved.
    Succeeded,
    /// It was declined.
    Failed,
}

impl Event {
    pub(super) fn name(self) -> &'static str {
        match self {
            Event::Created => "identity_process_created",
            Event::Succeeded => "identity_process_succeeded",
            Event::Failed => "identity_process_failed",
        }
    }
}

/// Delivers `event` about `process` to the configured target and records the delivery; `None`
/// (and nothing recorded) when no target is configured.
pub(super) async fn deliver(shared: &Shared, event: Event, process: &Process) -> Option<Delivery> {
    let target = lock(&shared.options).webhook.clone()?;
    let (status, error) = match send(shared, &target, event, process).await {
        Ok(status) => (Some(status), None),
        Err(error) => (None, Some(error)),
    };
    let delivery = Delivery {
        event: event.name().to_owned(),
        process_id: process.process_id.clone(),
        status,
        error,
    };
    let mut log = lock(&shared.deliveries);
    if log.len() >= MAX_DELIVERIES {
        log.pop_front();
    }
    log.push_back(delivery.clone());
    Some(delivery)
}

/// The webhook's JWT payload, with the target's claim names.
fn payload(target: &WebhookTarget, event: Event, process: &Process) -> String {
    let names = &target.claims;
    let iat = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut claims = serde_json::Map::new();
    if !target.event_in_query {
        claims.insert(names.event.clone(), event.name().into());
    }
    claims.insert(names.flow_id.clone(), process.flow_id.clone().into());
    claims.insert(names.account_id.clone(), process.account_id.clone().into());
    claims.insert(names.process_id.clone(), process.process_id.clone().into());
    claims.insert(names.iat.clone(), iat.into());
    if process.status == Status::Failure {
        claims.insert("failure_status".into(), "declined".into());
    }
    serde_json::Value::Object(claims).to_string()
}

/// The URL delivered to: the target's, with `event=<name>` added to its query when asked.
fn url_for(target: &WebhookTarget, event: Event) -> String {
    if !target.event_in_query {
        return target.url.clone();
    }
    let (base, fragment) = match target.url.split_once('#') {
        Some((base, fragment)) => (base, Some(fragment)),
        None => (target.url.as_str(), None),
    };
    let joiner = match base.find('?') {
        None => "?",
        Some(at) if at + 1 == base.len() || base.ends_with('&') => "",
        Some(_) => "&",
    };
    let mut url = format!("{base}{joiner}event={}", event.name());
    if let Some(fragment) = fragment {
        url = format!("{url}#{fragment}");
    }
    url
}

/// One POST to the receiver: its answer's status, or why there was none. The error texts never
/// carry the bearer or the secret.
async fn send(
    shared: &Shared,
    target: &WebhookTarget,
    event: Event,
    process: &Process,
) -> Result<u16, String> {
    let key = target
        .signing_secret
        .as_deref()
        .unwrap_or(&shared.signing_key);
    let jwt = sign_hs256(key, &payload(target, event, process));
    let uri: http::Uri = url_for(target, event)
        .parse()
        .map_err(|_| "the webhook url is not a valid URL".to_owned())?;
    let mut authorization = HeaderValue::from_str(&format!("Bearer {}", target.bearer))
        .map_err(|_| "the webhook bearer is not a valid header value".to_owned())?;
    authorization.set_sensitive(true);
    let request = Request::post(uri)
        .header(http::header::AUTHORIZATION, authorization)
        .header(http::header::CONTENT_TYPE, "text/plain")
        .body(Full::new(Bytes::from(jwt)))
        .map_err(|_| "the webhook request could not be built".to_owned())?;
    let exchange = async {
        let answer = shared
            .client
            .request(request)
            .await
            .map_err(|e| format!("unreachable: {}", causes(&e)))?;
        let status = answer.status().as_u16();
        // Read to the end so the connection can be reused; what it says does not matter.
        let _ = Limited::new(answer.into_body(), ANSWER_LIMIT)
            .collect()
            .await;
        Ok(status)
    };
    tokio::time::timeout(DELIVERY_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("timed out after {}s", DELIVERY_TIMEOUT.as_secs()))?
}

/// An error and its causes, `: `-joined (hyper's own text says only "client error (Connect)").
fn causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        next = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::*;
    use http::StatusCode;

    fn target(url: &str, event_in_query: bool) -> WebhookTarget {
        WebhookTarget {
            url: url.into(),
            bearer: "b".into(),
            signing_secret: None,
            claims: ClaimNames::default(),
            event_in_query,
        }
    }

    #[test]
    fn the_event_goes_in_the_query_only_when_asked() {
        let e = Event::Succeeded;
        assert_eq!(url_for(&target("http://h/w", false), e), "http://h/w");
        assert_eq!(
            url_for(&target("http://h/w", true), e),
            "http://h/w?event=identity_process_succeeded"
        );
        assert_eq!(
            url_for(&target("http://h/w?a=1", true), e),
            "http://h/w?a=1&event=identity_process_succeeded"
        );
        assert_eq!(
            url_for(&target("http://h/w?", true), e),
            "http://h/w?event=identity_process_succeeded"
        );
    }

    #[test]
    fn debug_never_shows_the_bearer_or_the_secret() {
        let mut t = target("http://h/w", false);
        t.bearer = "the-bearer-value".into();
        t.signing_secret = Some(b"the-secret-value".to_vec());
        let mut options = crate::sandbox::SandboxOptions::new("k");
        options.webhook = Some(t);
        let shown = format!("{options:?}");
        assert!(!shown.contains("the-bearer-value"), "{shown}");
        assert!(!shown.contains("the-secret-value"), "{shown}");
    }

    #[tokio::test]
    async fn approving_delivers_one_signed_succeeded_webhook_and_the_result_says_success() {
        let receiver = Receiver::start(200).await;
        let sandbox = start().await;
        sandbox.set_webhook(Some(receiver.target(Some(b"hook-secret"))));
        let token = mint(&sandbox, "IPFflow1", Some("user-1")).await;
        let process_id = sandbox.process_of(&token).unwrap().process_id;

        let answer = finish_form(&sandbox, &token, "approve", "application/json").await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        let body = answer.json();
        assert_eq!(body["process_id"], process_id.as_str());
        assert_eq!(body["status"], "success");
        assert_eq!(body["webhook"], serde_json::json!({ "status": 200 }));

        let hooks = receiver.requests();
        assert_eq!(hooks.len(), 1);
        let hook = &hooks[0];
        assert_eq!(hook.method, "POST");
        assert_eq!(hook.path_and_query, "/webhooks/truora");
        assert_eq!(hook.authorization, format!("Bearer {RECEIVER_BEARER}"));
        assert_eq!(hook.content_type, "text/plain");
        let claims = verified_claims(&hook.body, b"hook-secret");
        assert_eq!(claims["event"], "identity_process_succeeded");
        assert_eq!(claims["flow_id"], "IPFflow1");
        assert_eq!(claims["account_id"], "user-1");
        assert_eq!(claims["process_id"], process_id.as_str());
        assert!(claims.get("failure_status").is_none());
        let iat = claims["iat"].as_u64().unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(now.abs_diff(iat) <= 5, "iat {iat}, now {now}");

        let result = result(&sandbox, &process_id).await.json();
        assert_eq!(result["status"], "success");
        assert_eq!(
            sandbox.deliveries(),
            [Delivery {
                event: "identity_process_succeeded".into(),
                process_id,
                status: Some(200),
                error: None,
            }]
        );
    }

    #[tokio::test]
    async fn event_in_query_and_renamed_claims_are_honoured() {
        let receiver = Receiver::start(202).await;
        let sandbox = start().await;
        let mut target = receiver.target(Some(b"s"));
        target.url.push_str("?source=sandbox");
        target.event_in_query = true;
        target.claims = ClaimNames {
            event: "evt".into(),
            flow_id: "flow".into(),
            account_id: "acct".into(),
            process_id: "proc".into(),
            iat: "issued".into(),
        };
        sandbox.set_webhook(Some(target));
        let token = mint(&sandbox, "IPFflow1", Some("user-1")).await;
        let delivery = sandbox.finish(&token, true).await.unwrap().unwrap();
        assert_eq!(delivery.status, Some(202));

        let hooks = receiver.requests();
        assert_eq!(
            hooks[0].path_and_query,
            "/webhooks/truora?source=sandbox&event=identity_process_succeeded"
        );
        let claims = verified_claims(&hooks[0].body, b"s");
        let mut names: Vec<&String> = claims.as_object().unwrap().keys().collect();
        names.sort();
        assert_eq!(names, ["acct", "flow", "issued", "proc"]);
        assert_eq!(claims["flow"], "IPFflow1");
        assert_eq!(claims["acct"], "user-1");
        assert_eq!(claims["proc"], delivery.process_id.as_str());
    }

    #[tokio::test]
    async fn without_a_secret_the_webhook_is_signed_with_the_sandbox_key() {
        let receiver = Receiver::start(200).await;
        let sandbox = start().await;
        sandbox.set_webhook(Some(receiver.target(None)));
        let token = mint(&sandbox, "IPFflow1", Some("user-1")).await;
        sandbox.finish(&token, true).await.unwrap();
        let claims = verified_claims(&receiver.requests()[0].body, &sandbox.shared.signing_key);
        assert_eq!(claims["event"], "identity_process_succeeded");
    }

    #[tokio::test]
    async fn an_unreachable_receiver_is_reported_and_the_process_still_ends() {
        let sandbox = start().await;
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/webhooks/truora", closed.local_addr().unwrap());
        drop(closed);
        sandbox.set_webhook(Some(WebhookTarget {
            bearer: "never-shown".into(),
            ..target(&url, false)
        }));
        let token = mint(&sandbox, "IPFflow1", Some("user-1")).await;
        let answer = finish_form(&sandbox, &token, "decline", "*/*").await;
        assert_eq!(answer.status, StatusCode::OK);
        let body = answer.json();
        assert_eq!(body["status"], "failure");
        let error = body["webhook"]["error"].as_str().unwrap();
        assert!(error.starts_with("unreachable"), "{error}");
        assert!(!error.contains("never-shown"));
        let delivery = &sandbox.deliveries()[0];
        assert_eq!(delivery.status, None);
        assert_eq!(delivery.error.as_deref(), Some(error));
    }

    #[tokio::test(start_paused = true)]
    async fn a_receiver_that_never_answers_times_out_after_five_seconds() {
        let sandbox = start().await;
        // Connections wait in the backlog, never accepted: the request is never answered.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/webhooks/truora", silent.local_addr().unwrap());
        sandbox.set_webhook(Some(target(&url, false)));
        // A process recorded directly: minting over HTTP would race the paused clock.
        lock(&sandbox.shared.processes).record("jti-1", "IPFflow1", "user-1");
        let token = sign_hs256(&sandbox.shared.signing_key, r#"{"jti":"jti-1"}"#);
        let delivery = sandbox.finish(&token, true).await.unwrap().unwrap();
        assert_eq!(delivery.status, None);
        assert_eq!(delivery.error.as_deref(), Some("timed out after 5s"));
        assert_eq!(sandbox.process_of(&token).unwrap().status, "success");
    }

    #[tokio::test]
    async fn a_bad_url_or_bearer_is_a_failed_delivery_not_a_panic() {
        let sandbox = start().await;
        let token = mint(&sandbox, "IPFflow1", Some("user-1")).await;
        sandbox.set_webhook(Some(target("not a url", false)));
        let delivery = sandbox.open(&token).await.unwrap().unwrap();
        assert_eq!(delivery.status, None);
        assert!(delivery.error.unwrap().contains("url"));
        sandbox.set_webhook(Some(WebhookTarget {
            bearer: "line\nbreak".into(),
            ..target("http://127.0.0.1:9/", false)
        }));
        let delivery = sandbox.finish(&token, true).await.unwrap().unwrap();
        let error = delivery.error.unwrap();
        assert!(
            error.contains("bearer") && !error.contains("line"),
            "{error}"
        );
    }
}
