//! The verification processes behind the sandbox's tokens: Truora's rule is one token, one
//! process. Every successful mint records one (`IDP` and 32 hex digits, the token's flow and
//! account, pending), found again from the token by its `jti` once the token's HS256 signature
//! checks out with the sandbox's key. Opening the identity page creates it (once), finishing it
//! approves or declines it (once); each step delivers its webhook (see `webhook.rs`).
//!
//! The store is bounded: past `MAX_PROCESSES` the oldest is forgotten, and its token is then
//! unknown, as a forged one is.

use std::collections::{HashMap, VecDeque};

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::webhook::{deliver, Delivery, Event};
use super::{lock, Shared};
use crate::secret::hex;
use crate::truora::MAX_TOKEN_LEN;

/// How many processes the sandbox remembers; the oldest goes first.
pub(super) const MAX_PROCESSES: usize = 10_000;

/// Where a process stands, as Truora's result endpoint says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Status {
    Pending,
    Success,
    /// Declined by the user (`failure_status: declined`), the only failure the sandbox makes.
    Failure,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Success => "success",
            Status::Failure => "failure",
        }
    }
}

/// One process, as the sandbox keeps it.
#[derive(Debug, Clone)]
pub(super) struct Process {
    pub(super) process_id: String,
    pub(super) flow_id: String,
    pub(super) account_id: String,
    pub(super) status: Status,
    /// Whether the identity page was opened while it was pending (its created webhook is due
    /// once only).
    opened: bool,
}

impl Process {
    /// What the tests and the page read of it.
    pub(super) fn info(&self) -> ProcessInfo {
        ProcessInfo {
            process_id: self.process_id.clone(),
            flow_id: self.flow_id.clone(),
            account_id: self.account_id.clone(),
            status: self.status.as_str().to_owned(),
        }
    }

    /// The answer of `GET /v1/processes/<id>/result`.
    pub(super) fn result_json(&self) -> String {
        let mut body = serde_json::json!({
            "process_id": self.process_id,
            "flow_id": self.flow_id,
            "account_id": self.account_id,
            "status": self.status.as_str(),
            "validations": [],
        });
        if self.status == Status::Failure {
            body["failure_status"] = "declined".into();
        }
        body.to_string()
    }
}

/// A process as the sandbox's Rust API reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    /// `IDP` and 32 hex digits.
    pub process_id: String,
    /// The flow the token was minted for.
    pub flow_id: String,
    /// The account in the token's claims: the one sent, or the generated `ACC...`.
    pub account_id: String,
    /// `pending`, `success` or `failure`.
    pub status: String,
}

/// Why a token's process cannot be opened or finished.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SandboxError {
    /// Not a token this sandbox minted (bad signature, not a JWT), or its process was forgotten.
    #[error("unknown token: this sandbox did not mint it, or has forgotten its process")]
    UnknownToken,
    /// The process was already approved or declined.
    #[error("the process is already finished")]
    AlreadyFinished,
}

/// The processes, by token `jti`, with an index by process id and the order they came in.
#[derive(Debug, Default)]
pub(super) struct Processes {
    by_jti: HashMap<String, Process>,
    jti_of: HashMap<String, String>,
    order: VecDeque<String>,
}

impl Processes {
    /// Records the pending process of a token just minted; returns its process id.
    pub(super) fn record(&mut self, jti: &str, flow_id: &str, account_id: &str) -> String {
        let mut random = [0u8; 16];
        // A failed draw leaves zeros; the jti keeps the key unique regardless.
        let _ = getrandom::fill(&mut random);
        let process_id = format!("IDP{}", hex(&random));
        while self.order.len() >= MAX_PROCESSES {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(gone) = self.by_jti.remove(&oldest) {
                self.jti_of.remove(&gone.process_id);
            }
        }
        let process = Process {
            process_id: process_id.clone(),
            flow_id: flow_id.to_owned(),
            account_id: account_id.to_owned(),
            status: Status::Pending,
            opened: false,
        };
        if let Some(replaced) = self.by_jti.insert(jti.to_owned(), process) {
            // A repeated jti (never, with 128 random bits): the old process is gone.
            self.jti_of.remove(&replaced.process_id);
            self.order.retain(|j| j != jti);
        }
        self.jti_of.insert(process_id.clone(), jti.to_owned());
        self.order.push_back(jti.to_owned());
        process_id
    }

    pub(super) fn get(&self, jti: &str) -> Option<&Process> {
        self.by_jti.get(jti)
    }

    pub(super) fn by_process_id(&self, process_id: &str) -> Option<&Process> {
        self.by_jti.get(self.jti_of.get(process_id)?)
    }

    /// Opens the identity page of the process: the process, and whether this opening creates it
    /// (the first one while it is pending).
    fn open(&mut self, jti: &str) -> Result<(Process, bool), SandboxError> {
        let process = self.by_jti.get_mut(jti).ok_or(SandboxError::UnknownToken)?;
        let creates = process.status == Status::Pending && !process.opened;
        process.opened = true;
        Ok((process.clone(), creates))
    }

    /// Ends a pending process: approved, it succeeds; declined, it fails.
    fn finish(&mut self, jti: &str, approve: bool) -> Result<Process, SandboxError> {
        let process = self.by_jti.get_mut(jti).ok_or(SandboxError::UnknownToken)?;
        if process.status != Status::Pending {
            return Err(SandboxError::AlreadyFinished);
        }
        process.status = if approve {
            Status::Success
        } else {
            Status::Failure
        };
        Ok(process.clone())
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.by_jti.len()
    }
}

/// The `jti` of a token this key signed: an HS256 JWT whose signature checks out, and whose
/// payload carries a string `jti`. `None` for anything else (forged, altered, not a JWT).
pub(super) fn verified_jti(key: &[u8], token: &str) -> Option<String> {
    if token.len() > MAX_TOKEN_LEN {
        return None;
    }
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let (signing_input, signature) = token.rsplit_once('.')?;
    let (_header, payload) = signing_input.split_once('.')?;
    if payload.contains('.') {
        return None;
    }
    let signature = b64.decode(signature).ok()?;
    let mut mac = Hmac::<Sha256>::new_from_slice(key).ok()?;
    mac.update(signing_input.as_bytes());
    // Constant time, as any signature check should be.
    mac.verify_slice(&signature).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&b64.decode(payload).ok()?).ok()?;
    claims.get("jti")?.as_str().map(str::to_owned)
}

impl Shared {
    /// The process of a token this sandbox minted.
    pub(super) fn process_of(&self, token: &str) -> Option<ProcessInfo> {
        let jti = verified_jti(&self.signing_key, token)?;
        lock(&self.processes).get(&jti).map(Process::info)
    }

    /// What opening the identity page does: the first opening of a pending process creates it and
    /// delivers `identity_process_created` (when a webhook target is set).
    pub(super) async fn open(
        &self,
        token: &str,
    ) -> Result<(ProcessInfo, Option<Delivery>), SandboxError> {
        let jti = verified_jti(&self.signing_key, token).ok_or(SandboxError::UnknownToken)?;
        // Marked opened under the lock, so two openings at once deliver once.
        let (process, creates) = lock(&self.processes).open(&jti)?;
        let delivery = if creates {
            deliver(self, Event::Created, &process).await
        } else {
            None
        };
        Ok((process.info(), delivery))
    }

    /// What the finish form does: a pending process succeeds (approve) or fails (decline), then
    /// its webhook is delivered and its answer awaited.
    pub(super) async fn finish(
        &self,
        token: &str,
        approve: bool,
    ) -> Result<(ProcessInfo, Option<Delivery>), SandboxError> {
        let jti = verified_jti(&self.signing_key, token).ok_or(SandboxError::UnknownToken)?;
        let process = lock(&self.processes).finish(&jti, approve)?;
        let event = if approve {
            Event::Succeeded
        } else {
            Event::Failed
        };
        let delivery = deliver(self, event, &process).await;
        Ok((process.info(), delivery))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::*;
    use http::StatusCode;

    #[test]
    fn the_store_keeps_the_newest_ten_thousand_processes() {
        let mut store = Processes::default();
        let first = store.record("jti-0", "IPF1", "acc");
        for i in 1..=MAX_PROCESSES {
            store.record(&format!("jti-{i}"), "IPF1", "acc");
        }
        assert_eq!(store.len(), MAX_PROCESSES);
        assert!(store.get("jti-0").is_none());
        assert!(store.by_process_id(&first).is_none());
        assert!(store.get(&format!("jti-{MAX_PROCESSES}")).is_some());
    }

    #[test]
    fn process_ids_are_idp_and_32_hex_digits() {
        let id = Processes::default().record("j", "IPF1", "acc");
        let digits = id.strip_prefix("IDP").unwrap();
        assert_eq!(digits.len(), 32);
        assert!(digits.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn only_tokens_signed_with_the_key_give_their_jti() {
        let token = crate::sandbox::sign_hs256(b"key", r#"{"jti":"abc"}"#);
        assert_eq!(verified_jti(b"key", &token).as_deref(), Some("abc"));
        assert_eq!(verified_jti(b"other", &token), None);
        let (head, _) = token.rsplit_once('.').unwrap();
        assert_eq!(verified_jti(b"key", &format!("{head}.AAAA")), None);
        for junk in ["", "a", "a.b", "a.b.c.d", "..", "é.é.é"] {
            assert_eq!(verified_jti(b"key", junk), None, "{junk}");
        }
        let no_jti = crate::sandbox::sign_hs256(b"key", r#"{"sub":"x"}"#);
        assert_eq!(verified_jti(b"key", &no_jti), None);
    }

    #[tokio::test]
    async fn a_mint_records_a_pending_process_the_result_endpoint_reports() {
        let sandbox = start().await;
        let token = mint(&sandbox, "IPFflow1", Some("user-1")).await;
        let info = sandbox.process_of(&token).unwrap();
        assert_eq!(info.flow_id, "IPFflow1");
        assert_eq!(info.account_id, "user-1");
        assert_eq!(info.status, "pending");

        let answer = result(&sandbox, &info.process_id).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert!(answer.headers.contains_key(http::header::CONTENT_LENGTH));
        let body = answer.json();
        assert_eq!(body["process_id"], info.process_id.as_str());
        assert_eq!(body["flow_id"], "IPFflow1");
        assert_eq!(body["account_id"], "user-1");
        assert_eq!(body["status"], "pending");
        assert!(body.get("failure_status").is_none());
        assert_eq!(body["validations"], serde_json::json!([]));
        assert_eq!(sandbox.forwarded().len(), 1);
    }

    #[tokio::test]
    async fn a_mint_without_an_account_records_the_generated_one_of_the_claims() {
        let sandbox = start().await;
        let token = mint(&sandbox, "IPFflow1", None).await;
        let claims = claims_of(&token);
        let info = sandbox.process_of(&token).unwrap();
        assert!(info.account_id.starts_with("ACC"));
        assert_eq!(claims["account_id"], info.account_id.as_str());
    }

    #[tokio::test]
    async fn a_refused_mint_records_no_process() {
        let sandbox = start().await;
        let answer = send(
            http::Method::POST,
            &format!("{}/v1/api-keys", sandbox.url()),
            &[(crate::truora::API_KEY_HEADER, MASTER_KEY)],
            "key_type=web&grant=digital-identity&country=CO&flow_id=IPFsandbox429&redirect_url=https://example.com",
        )
        .await;
        assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(lock(&sandbox.shared.processes).len(), 0);
    }

    #[tokio::test]
    async fn the_result_endpoint_still_needs_the_key_and_keeps_its_fixed_ids() {
        let sandbox = start().await;
        let token = mint(&sandbox, "IPFflow1", Some("user-1")).await;
        let id = sandbox.process_of(&token).unwrap().process_id;
        let url = format!("{}/v1/processes/{id}/result", sandbox.url());
        let unkeyed = send(http::Method::GET, &url, &[], "").await;
        assert_eq!(unkeyed.status, StatusCode::UNAUTHORIZED);

        let missing = result(&sandbox, "missing").await;
        assert_eq!(missing.status, StatusCode::NOT_FOUND);
        let pending = result(&sandbox, "pending-1").await.json();
        assert_eq!(pending["status"], "pending");
        assert!(pending.get("flow_id").is_none());
        let other = result(&sandbox, "IDP0123").await.json();
        assert_eq!(other["status"], "success");
        assert!(other.get("account_id").is_none());
        assert_eq!(sandbox.forwarded().len(), 4);
    }

    #[tokio::test]
    async fn declining_fails_the_process_with_failure_status_declined() {
        let receiver = Receiver::start(200).await;
        let sandbox = start().await;
        sandbox.set_webhook(Some(receiver.target(Some(b"secret"))));
        let token = mint(&sandbox, "IPFflow1", Some("user-1")).await;
        let delivery = sandbox.finish(&token, false).await.unwrap().unwrap();
        assert_eq!(delivery.event, "identity_process_failed");
        assert_eq!(delivery.status, Some(200));

        let info = sandbox.process_of(&token).unwrap();
        assert_eq!(info.status, "failure");
        let body = result(&sandbox, &info.process_id).await.json();
        assert_eq!(body["status"], "failure");
        assert_eq!(body["failure_status"], "declined");

        let hooks = receiver.requests();
        assert_eq!(hooks.len(), 1);
        let claims = verified_claims(&hooks[0].body, b"secret");
        assert_eq!(claims["event"], "identity_process_failed");
        assert_eq!(claims["failure_status"], "declined");
        assert_eq!(claims["process_id"], info.process_id.as_str());
    }

    #[tokio::test]
    async fn finishing_twice_is_already_finished_and_delivers_nothing_more() {
        let receiver = Receiver::start(200).await;
        let sandbox = start().await;
        sandbox.set_webhook(Some(receiver.target(None)));
        let token = mint(&sandbox, "IPFflow1", Some("user-1")).await;
        assert!(sandbox.finish(&token, true).await.unwrap().is_some());
        assert_eq!(
            sandbox.finish(&token, false).await,
            Err(SandboxError::AlreadyFinished)
        );
        assert_eq!(sandbox.process_of(&token).unwrap().status, "success");
        assert_eq!(receiver.requests().len(), 1);
        assert_eq!(sandbox.deliveries().len(), 1);
    }

    #[tokio::test]
    async fn opening_delivers_created_once_and_never_after_the_end() {
        let receiver = Receiver::start(200).await;
        let sandbox = start().await;
        sandbox.set_webhook(Some(receiver.target(None)));
        let token = mint(&sandbox, "IPFflow1", Some("user-1")).await;
        let created = sandbox.open(&token).await.unwrap().unwrap();
        assert_eq!(created.event, "identity_process_created");
        assert_eq!(sandbox.open(&token).await, Ok(None));

        let other = mint(&sandbox, "IPFflow1", Some("user-2")).await;
        sandbox.finish(&other, true).await.unwrap();
        assert_eq!(sandbox.open(&other).await, Ok(None));
        let events: Vec<String> = sandbox.deliveries().into_iter().map(|d| d.event).collect();
        assert_eq!(
            events,
            ["identity_process_created", "identity_process_succeeded"]
        );
    }

    #[tokio::test]
    async fn without_a_target_the_process_moves_on_and_nothing_is_delivered() {
        let sandbox = start().await;
        let token = mint(&sandbox, "IPFflow1", Some("user-1")).await;
        assert_eq!(sandbox.open(&token).await, Ok(None));
        assert_eq!(sandbox.finish(&token, true).await, Ok(None));
        assert_eq!(sandbox.process_of(&token).unwrap().status, "success");
        assert!(sandbox.deliveries().is_empty());
    }

    #[tokio::test]
    async fn an_unknown_or_forged_token_has_no_process_and_delivers_nothing() {
        let receiver = Receiver::start(200).await;
        let sandbox = start().await;
        sandbox.set_webhook(Some(receiver.target(None)));
        let token = mint(&sandbox, "IPFflow1", Some("user-1")).await;
        let (head, _) = token.rsplit_once('.').unwrap();
        let payload = head.split_once('.').unwrap().1;
        let claims = String::from_utf8(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap();
        let forged = crate::sandbox::sign_hs256(b"not the sandbox's key", &claims);
        for bad in [forged.as_str(), "not-a-token", ""] {
            assert_eq!(sandbox.process_of(bad), None);
            assert_eq!(sandbox.open(bad).await, Err(SandboxError::UnknownToken));
            assert_eq!(
                sandbox.finish(bad, true).await,
                Err(SandboxError::UnknownToken)
            );
        }
        assert!(receiver.requests().is_empty());
        assert!(sandbox.deliveries().is_empty());
        assert_eq!(sandbox.process_of(&token).unwrap().status, "pending");
    }
}
