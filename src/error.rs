//! One error type for every way a request can fail, and the one place that decides what the
//! caller sees for it.
//!
//! The kind gives the status: the caller's fault is a 4xx ([`RequestError`], [`AuthError`]; a
//! refused webhook delivery, [`WebhookError`]), Truora's is a 502/503/504 ([`UpstreamError`]),
//! ours is a 500. Upstream bodies are never echoed
//! and no variant carries a secret, so `Display` is safe to send and to log.

use std::borrow::Cow;
use std::time::Duration;

use http::StatusCode;
use serde::Serialize;

/// Anything that stops a request from being answered with a token. Cloned to every waiter of
/// a shared upstream call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The request itself is wrong (4xx).
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The caller could not be authenticated (401).
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// Truora failed or refused (502, 503, 504).
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The broker declined to call Truora at all, to protect it or the account (429, 503).
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// A webhook delivery was refused (400, 401, 404): nothing was dropped.
    #[error(transparent)]
    Webhook(#[from] WebhookError),
    /// A fault of ours (500). The text names what broke, never data.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// The caller sent something the broker will not forward.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A required field is absent or empty.
    #[error("{field} is required")]
    MissingField { field: &'static str },
    /// A field's value breaks its rule; `rule` says what the value must be.
    #[error("{field} {rule}")]
    InvalidField {
        field: Cow<'static, str>,
        rule: Cow<'static, str>,
    },
    /// A field the broker sets itself was sent with another value (e.g. `key_type=backend`).
    #[error("{field} {rule}")]
    ForbiddenValue {
        field: &'static str,
        rule: &'static str,
    },
    /// A single-valued field appears more than once.
    #[error("{field} appears more than once; send it once")]
    DuplicateField { field: Cow<'static, str> },
    /// A field Truora's token call does not take; it would also poison the cache key.
    #[error("{field} is not a field of the token request")]
    UnknownField { field: Cow<'static, str> },
    /// The body is not valid for its content type.
    #[error("malformed body: {reason}")]
    MalformedBody { reason: Cow<'static, str> },
    /// The caller sent Truora's own credential header; callers never hold the master key.
    #[error("the Truora-API-Key header is not accepted: authenticate with Authorization: Bearer <your caller secret>")]
    MasterKeyHeader,
    /// The caller's policy does not allow this request; `rule` names the `[[clients]]` key.
    #[error("{message}")]
    Forbidden {
        rule: &'static str,
        field: Option<&'static str>,
        message: &'static str,
    },
    /// Several Content-Length headers: a shape of request smuggling. The connection is closed
    /// after the answer.
    #[error("ambiguous message framing: send one Content-Length")]
    AmbiguousFraming,
    /// A body framed by Transfer-Encoding. Token requests are small and always have a length;
    /// chunked framing is refused because it is where request smuggling hides (Content-Length
    /// and Transfer-Encoding together). The connection is closed after the answer.
    #[error("send the body with a Content-Length: Transfer-Encoding is not accepted")]
    LengthRequired,
    /// The body did not arrive within `server.body_read_timeout`.
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    /// `DELETE /v1/tokens` without a filter.
    #[error("give flow_id, account_id or both as query parameters")]
    MissingFilter,
    /// The body is over the configured limit.
    #[error("body over the {limit}-byte limit")]
    PayloadTooLarge { limit: usize },
    /// Neither form-encoded nor JSON.
    #[error("send Content-Type: application/x-www-form-urlencoded or application/json")]
    UnsupportedMediaType,
    /// No such route.
    #[error("no such endpoint: use POST /v1/tokens, POST /v1/api-keys or DELETE /v1/tokens")]
    NotFound,
    /// The route exists but not for this method.
    #[error("method not allowed here; allowed: {allow}")]
    MethodNotAllowed { allow: &'static str },
}

/// Why a caller was not authenticated. All answer 401 with `WWW-Authenticate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header.
    #[error("missing credentials: send Authorization: Bearer <your caller secret>")]
    Missing,
    /// An `Authorization` header that is not `Bearer <secret>`.
    #[error("malformed credentials: send Authorization: Bearer <your caller secret>")]
    Malformed,
    /// A well-formed secret, or a client certificate, that matches no configured caller.
    #[error("unknown credentials")]
    Unknown,
    /// The secret belongs to a caller that must also present its client certificate.
    #[error("this caller must also present its client certificate")]
    CertificateRequired,
    /// A service-account token whose signature does not verify, or signed with an algorithm
    /// other than RS256 or ES256 (`none` and HMAC included).
    #[error("the service-account token's signature does not verify (RS256 or ES256 only)")]
    BadSignature,
    /// A service-account token past its `exp`, or before its `nbf` (60 s leeway either way).
    #[error("the service-account token is expired or not yet valid")]
    Expired,
    /// A service-account token made for another audience.
    #[error("the service-account token was not made for this broker's audience")]
    WrongAudience,
    /// A service-account token from another issuer (another cluster).
    #[error("the service-account token was not issued by the configured cluster")]
    WrongIssuer,
    /// A valid service-account token for an account no caller is configured with.
    #[error("no caller is configured for this service account")]
    UnknownServiceAccount,
    /// A service-account token signed with a key the broker does not know (yet): its `kid` is
    /// not in the JWKS, which is then fetched again.
    #[error(
        "the service-account token names a signing key the broker does not know; retry shortly"
    )]
    UnknownKey,
}

impl AuthError {
    /// The bounded `reason` label of `token_broker_auth_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::Unknown => "unknown",
            AuthError::CertificateRequired => "certificate_required",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "expired",
            AuthError::WrongAudience => "wrong_audience",
            AuthError::WrongIssuer => "wrong_issuer",
            AuthError::UnknownServiceAccount => "unknown_service_account",
            AuthError::UnknownKey => "unknown_key",
        }
    }

    /// Every reason (`token_broker_auth_failures_total` has a series at zero for each).
    pub const REASONS: [&'static str; 10] = [
        "missing",
        "malformed",
        "unknown",
        "certificate_required",
        "bad_signature",
        "expired",
        "wrong_audience",
        "wrong_issuer",
        "unknown_service_account",
        "unknown_key",
    ];
}

/// Why a webhook delivery was refused. The texts name claims by their configured names and
/// never echo a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// No `Authorization: Bearer` with the webhook secret.
    #[error("missing or wrong credential: the webhook action must send Authorization: Bearer <its secret>")]
    Unauthorized,
    /// The JWT's signature does not verify with `webhooks.signing_secret_file` (or is not
    /// HS256).
    #[error("the delivery's signature does not verify (HS256 with webhooks.signing_secret_file)")]
    BadSignature,
    /// The JWT's `iat` is older than `webhooks.max_age`, or more than a minute ahead.
    #[error("the delivery's iat is outside webhooks.max_age (or more than a minute ahead): refused as a possible replay")]
    Stale,
    /// The body is not a compact JWT with JSON header and claims.
    #[error("the body is not a compact JWT: {reason}")]
    NotJwt { reason: &'static str },
    /// A claim the event needs is absent (named as configured in `[webhooks.claims]`).
    #[error("the delivery has no {claim} claim (see [webhooks.claims] to rename it)")]
    MissingClaim { claim: String },
    /// A claim is present but unusable.
    #[error("the delivery's {claim} claim {rule}")]
    InvalidClaim { claim: String, rule: &'static str },
    /// Anything but the configured path on the webhook listener.
    #[error("no such endpoint on the webhook listener")]
    NotFound,
}

impl WebhookError {
    /// The bounded `outcome` label of `token_broker_webhook_deliveries_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            WebhookError::Unauthorized => "unauthorized",
            WebhookError::BadSignature => "bad_signature",
            WebhookError::Stale => "stale",
            WebhookError::NotJwt { .. }
            | WebhookError::MissingClaim { .. }
            | WebhookError::InvalidClaim { .. } => "malformed",
            WebhookError::NotFound => "not_found",
        }
    }
}

/// Truora failed, refused or answered something unusable. Cloned to every coalesced waiter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// 401/403: the master key is bad, revoked or lacks permission. Not the caller's fault.
    #[error("Truora rejected the broker's master API key; operators have been alerted")]
    CredentialRejected { status: u16 },
    /// 429, or a 400 whose message says the rate limit was reached.
    #[error("Truora is rate limiting the account; retry after {} s", retry_after.as_secs())]
    Throttled { retry_after: Duration },
    /// 5xx from Truora; `retry_after` when it said when to come back.
    #[error("Truora answered with a server error ({status})")]
    ServerError {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// Another 4xx: Truora refused a request the broker had accepted.
    #[error("Truora refused the token request ({status})")]
    Rejected { status: u16 },
    /// A 200 that holds no usable token.
    #[error("Truora's answer was unusable: {reason}")]
    BadResponse { reason: &'static str },
    /// No complete answer within `upstream.timeout`.
    #[error("Truora did not answer within the timeout")]
    Timeout,
    /// No connection could be made (the request was never sent, so it is safe to retry).
    #[error("Truora could not be reached")]
    Unreachable,
    /// The connection failed after the request was sent: Truora may have minted, so this is
    /// never retried.
    #[error("the connection to Truora broke before it answered")]
    ConnectionLost,
}

/// Why the broker declined to call Truora for a miss. Hits are never refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Consecutive upstream failures opened the circuit breaker.
    #[error("Truora is failing; the broker is not calling it for {} s", retry_after.as_secs().max(1))]
    CircuitOpen { retry_after: Duration },
    /// As many upstream calls are in flight as `upstream.max_concurrent` allows.
    #[error("too many calls to Truora in flight; retry shortly")]
    Saturated,
    /// `DELETE /v1/tokens` with `[cache.shared]` while Redis cannot be reached: the tokens were
    /// dropped on this replica only, other replicas may still hold them. Retry.
    #[error("the shared cache could not be reached: the tokens were dropped on this replica only; retry")]
    SharedCacheUnavailable,
    /// The caller sends `DELETE /v1/tokens` faster than `cache.invalidate_rate` a second.
    #[error("too many invalidations from this caller; retry after {} s", retry_after.as_secs().max(1))]
    InvalidationRateExceeded { retry_after: Duration },
    /// The mint budget (`upstream.mint_rate`, or the caller's `mint_rate`) is spent.
    #[error("{scope} mint budget exhausted; retry after {} s", retry_after.as_secs().max(1))]
    BudgetExceeded {
        scope: BudgetScope,
        retry_after: Duration,
    },
    /// `audit.on_failure = "refuse"` and the audit trail cannot be written: nothing is minted
    /// (or relayed) that would go unrecorded.
    #[error("the audit trail cannot be written, and this broker mints nothing it cannot record; retry shortly")]
    AuditUnavailable,
}

/// Whose mint budget ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetScope {
    /// `upstream.mint_rate`, shared by all callers.
    Global,
    /// The caller's own `[[clients]] mint_rate`.
    Caller,
}

impl std::fmt::Display for BudgetScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BudgetScope::Global => "the broker's",
            BudgetScope::Caller => "this caller's",
        })
    }
}

impl Refusal {
    /// The bounded `reason` label of `token_broker_upstream_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::CircuitOpen { .. } => "circuit_open",
            Refusal::Saturated => "saturated",
            Refusal::SharedCacheUnavailable => "shared_cache_unavailable",
            Refusal::InvalidationRateExceeded { .. } => "invalidation_rate",
            Refusal::AuditUnavailable => "audit_unavailable",
            Refusal::BudgetExceeded {
                scope: BudgetScope::Global,
                ..
            } => "budget_global",
            Refusal::BudgetExceeded {
                scope: BudgetScope::Caller,
                ..
            } => "budget_caller",
        }
    }
}

impl UpstreamError {
    /// The bounded `outcome` label of `token_broker_upstream_requests_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            UpstreamError::CredentialRejected { .. } => "credential_rejected",
            UpstreamError::Throttled { .. } => "throttled",
            UpstreamError::ServerError { .. } => "server_error",
            UpstreamError::Rejected { .. } => "rejected",
            UpstreamError::BadResponse { .. } => "bad_response",
            UpstreamError::Timeout => "timeout",
            UpstreamError::Unreachable => "unreachable",
            UpstreamError::ConnectionLost => "connection_lost",
        }
    }
}

/// Which error body shape a route speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Envelope {
    /// `{"error", "message", "field"}`: the broker's own API.
    Broker,
    /// `{"code", "http_code", "message"}`: Truora's, for the `/v1/api-keys` drop-in.
    Truora,
}

impl BrokerError {
    /// The HTTP status this error answers with. Exhaustive: a new variant must choose one.
    pub fn status(&self) -> StatusCode {
        match self {
            BrokerError::Request(e) => match e {
                RequestError::MissingField { .. }
                | RequestError::InvalidField { .. }
                | RequestError::ForbiddenValue { .. }
                | RequestError::DuplicateField { .. }
                | RequestError::UnknownField { .. }
                | RequestError::MalformedBody { .. }
                | RequestError::MasterKeyHeader
                | RequestError::AmbiguousFraming
                | RequestError::MissingFilter => StatusCode::BAD_REQUEST,
                RequestError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                RequestError::LengthRequired => StatusCode::LENGTH_REQUIRED,
                RequestError::Forbidden { .. } => StatusCode::FORBIDDEN,
                RequestError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
                RequestError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                RequestError::NotFound => StatusCode::NOT_FOUND,
                RequestError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            },
            BrokerError::Auth(_) => StatusCode::UNAUTHORIZED,
            BrokerError::Upstream(e) => match e {
                UpstreamError::CredentialRejected { .. }
                | UpstreamError::ServerError { .. }
                | UpstreamError::Rejected { .. }
                | UpstreamError::BadResponse { .. }
                | UpstreamError::Unreachable
                | UpstreamError::ConnectionLost => StatusCode::BAD_GATEWAY,
                UpstreamError::Throttled { .. } => StatusCode::SERVICE_UNAVAILABLE,
                UpstreamError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            },
            BrokerError::Refused(r) => match r {
                Refusal::CircuitOpen { .. }
                | Refusal::Saturated
                | Refusal::SharedCacheUnavailable
                | Refusal::AuditUnavailable => StatusCode::SERVICE_UNAVAILABLE,
                Refusal::BudgetExceeded { .. } | Refusal::InvalidationRateExceeded { .. } => {
                    StatusCode::TOO_MANY_REQUESTS
                }
            },
            BrokerError::Webhook(w) => match w {
                WebhookError::Unauthorized | WebhookError::BadSignature | WebhookError::Stale => {
                    StatusCode::UNAUTHORIZED
                }
                WebhookError::NotJwt { .. }
                | WebhookError::MissingClaim { .. }
                | WebhookError::InvalidClaim { .. } => StatusCode::BAD_REQUEST,
                WebhookError::NotFound => StatusCode::NOT_FOUND,
            },
            BrokerError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code in the `error` field.
    pub fn code(&self) -> &'static str {
        match self {
            BrokerError::Request(e) => match e {
                RequestError::MissingField { .. } => "missing_field",
                RequestError::InvalidField { .. } => "invalid_field",
                RequestError::ForbiddenValue { .. } => "forbidden_value",
                RequestError::DuplicateField { .. } => "duplicate_field",
                RequestError::UnknownField { .. } => "unknown_field",
                RequestError::MalformedBody { .. } => "malformed_body",
                RequestError::MasterKeyHeader => "master_key_header_forbidden",
                RequestError::MissingFilter => "missing_filter",
                RequestError::AmbiguousFraming => "ambiguous_framing",
                RequestError::LengthRequired => "length_required",
                RequestError::PayloadTooLarge { .. } => "payload_too_large",
                RequestError::Forbidden { .. } => "forbidden_by_policy",
                RequestError::BodyTimeout => "body_timeout",
                RequestError::UnsupportedMediaType => "unsupported_media_type",
                RequestError::NotFound => "not_found",
                RequestError::MethodNotAllowed { .. } => "method_not_allowed",
            },
            BrokerError::Auth(_) => "unauthorized",
            BrokerError::Upstream(e) => match e {
                UpstreamError::CredentialRejected { .. } => "upstream_credential_rejected",
                UpstreamError::Throttled { .. } => "upstream_throttled",
                UpstreamError::ServerError { .. } => "upstream_unavailable",
                UpstreamError::Rejected { .. } => "upstream_rejected_request",
                UpstreamError::BadResponse { .. } => "upstream_bad_response",
                UpstreamError::Timeout => "upstream_timeout",
                UpstreamError::Unreachable => "upstream_unreachable",
                UpstreamError::ConnectionLost => "upstream_connection_lost",
            },
            BrokerError::Refused(r) => match r {
                Refusal::CircuitOpen { .. } => "upstream_circuit_open",
                Refusal::Saturated => "upstream_saturated",
                Refusal::SharedCacheUnavailable => "shared_cache_unavailable",
                Refusal::InvalidationRateExceeded { .. } => "invalidation_rate_exceeded",
                Refusal::BudgetExceeded { .. } => "mint_budget_exceeded",
                Refusal::AuditUnavailable => "audit_unavailable",
            },
            BrokerError::Webhook(w) => match w {
                WebhookError::Unauthorized => "unauthorized",
                WebhookError::BadSignature => "bad_signature",
                WebhookError::Stale => "stale_delivery",
                WebhookError::NotJwt { .. } => "not_a_jwt",
                WebhookError::MissingClaim { .. } => "missing_claim",
                WebhookError::InvalidClaim { .. } => "invalid_claim",
                WebhookError::NotFound => "not_found",
            },
            BrokerError::Internal(_) => "internal_error",
        }
    }

    /// The one field at fault, when there is one.
    pub fn field(&self) -> Option<&str> {
        match self {
            BrokerError::Request(RequestError::MissingField { field })
            | BrokerError::Request(RequestError::ForbiddenValue { field, .. }) => Some(field),
            BrokerError::Request(RequestError::Forbidden {
                field: Some(field), ..
            }) => Some(field),
            BrokerError::Request(RequestError::InvalidField { field, .. })
            | BrokerError::Request(RequestError::DuplicateField { field })
            | BrokerError::Request(RequestError::UnknownField { field }) => Some(field),
            _ => None,
        }
    }

    /// Seconds for a `Retry-After` header, when the caller should come back later.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            BrokerError::Upstream(UpstreamError::Throttled { retry_after })
            | BrokerError::Refused(Refusal::CircuitOpen { retry_after })
            | BrokerError::Refused(Refusal::BudgetExceeded { retry_after, .. })
            | BrokerError::Refused(Refusal::InvalidationRateExceeded { retry_after }) => {
                Some(retry_after.as_secs_f64().ceil().max(1.0) as u64)
            }
            BrokerError::Refused(Refusal::Saturated | Refusal::SharedCacheUnavailable) => Some(1),
            // The trail retries every second; a caller need not come back sooner than this.
            BrokerError::Refused(Refusal::AuditUnavailable) => Some(5),
            _ => None,
        }
    }

    /// The JSON body in the route's envelope.
    pub fn body(&self, envelope: Envelope) -> Vec<u8> {
        #[derive(Serialize)]
        struct Broker<'a> {
            error: &'a str,
            message: String,
            #[serde(skip_serializing_if = "Option::is_none")]
            field: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            rule: Option<&'a str>,
        }
        #[derive(Serialize)]
        struct Truora {
            code: u32,
            http_code: u16,
            message: String,
        }
        let message = self.to_string();
        let body = match envelope {
            Envelope::Broker => serde_json::to_vec(&Broker {
                error: self.code(),
                message,
                field: self.field(),
                rule: match self {
                    BrokerError::Request(RequestError::Forbidden { rule, .. }) => Some(rule),
                    _ => None,
                },
            }),
            Envelope::Truora => {
                let status = self.status().as_u16();
                serde_json::to_vec(&Truora {
                    code: 10_000 + u32::from(status),
                    http_code: status,
                    message,
                })
            }
        };
        // Serialising plain strings and integers cannot fail; keep a valid body regardless.
        body.unwrap_or_else(|_| br#"{"error":"internal_error"}"#.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(err: impl Into<BrokerError>, status: u16, code: &str) {
        let err = err.into();
        assert_eq!(err.status().as_u16(), status, "{err:?}");
        assert_eq!(err.code(), code, "{err:?}");
        let body: serde_json::Value = serde_json::from_slice(&err.body(Envelope::Broker)).unwrap();
        assert_eq!(body["error"], code);
        assert!(!body["message"].as_str().unwrap().is_empty());
        let truora: serde_json::Value =
            serde_json::from_slice(&err.body(Envelope::Truora)).unwrap();
        assert_eq!(truora["http_code"], status);
        assert_eq!(truora["code"], 10_000 + u32::from(status));
    }

    #[test]
    fn missing_field_is_400_and_names_the_field() {
        let err = BrokerError::from(RequestError::MissingField { field: "flow_id" });
        check(err, 400, "missing_field");
        let err = BrokerError::from(RequestError::MissingField { field: "flow_id" });
        let body: serde_json::Value = serde_json::from_slice(&err.body(Envelope::Broker)).unwrap();
        assert_eq!(body["field"], "flow_id");
    }

    #[test]
    fn invalid_field_is_400() {
        check(
            RequestError::InvalidField {
                field: "country".into(),
                rule: "must be one of ...".into(),
            },
            400,
            "invalid_field",
        );
    }

    #[test]
    fn forbidden_value_is_400() {
        check(
            RequestError::ForbiddenValue {
                field: "key_type",
                rule: "must be web",
            },
            400,
            "forbidden_value",
        );
    }

    #[test]
    fn duplicate_unknown_and_malformed_are_400() {
        check(
            RequestError::DuplicateField {
                field: "country".into(),
            },
            400,
            "duplicate_field",
        );
        check(
            RequestError::UnknownField { field: "x".into() },
            400,
            "unknown_field",
        );
        check(
            RequestError::MalformedBody {
                reason: "not JSON".into(),
            },
            400,
            "malformed_body",
        );
    }

    #[test]
    fn master_key_header_and_missing_filter_are_400() {
        check(
            RequestError::MasterKeyHeader,
            400,
            "master_key_header_forbidden",
        );
        check(RequestError::MissingFilter, 400, "missing_filter");
        check(RequestError::AmbiguousFraming, 400, "ambiguous_framing");
    }

    #[test]
    fn oversized_body_is_413() {
        check(
            RequestError::PayloadTooLarge { limit: 16384 },
            413,
            "payload_too_large",
        );
    }

    #[test]
    fn a_policy_denial_is_403_naming_the_rule() {
        let err = BrokerError::from(RequestError::Forbidden {
            rule: "allowed_flows",
            field: Some("flow_id"),
            message: "flow_id is not in this caller's allowed_flows",
        });
        let body: serde_json::Value = serde_json::from_slice(&err.body(Envelope::Broker)).unwrap();
        assert_eq!(body["rule"], "allowed_flows");
        assert_eq!(body["field"], "flow_id");
        check(err, 403, "forbidden_by_policy");
    }

    #[test]
    fn a_chunked_body_is_411() {
        check(RequestError::LengthRequired, 411, "length_required");
    }

    #[test]
    fn a_slow_body_is_408() {
        check(RequestError::BodyTimeout, 408, "body_timeout");
    }

    #[test]
    fn wrong_content_type_is_415() {
        check(
            RequestError::UnsupportedMediaType,
            415,
            "unsupported_media_type",
        );
    }

    #[test]
    fn unknown_route_is_404_and_wrong_method_405() {
        check(RequestError::NotFound, 404, "not_found");
        check(
            RequestError::MethodNotAllowed { allow: "POST" },
            405,
            "method_not_allowed",
        );
    }

    #[test]
    fn every_auth_failure_is_401() {
        for e in [
            AuthError::Missing,
            AuthError::Malformed,
            AuthError::Unknown,
            AuthError::CertificateRequired,
            AuthError::BadSignature,
            AuthError::Expired,
            AuthError::WrongAudience,
            AuthError::WrongIssuer,
            AuthError::UnknownServiceAccount,
            AuthError::UnknownKey,
        ] {
            assert!(AuthError::REASONS.contains(&e.reason()), "{e:?}");
            check(e, 401, "unauthorized");
        }
    }

    #[test]
    fn rejected_master_key_is_502_not_the_callers_401() {
        for status in [401, 403] {
            check(
                UpstreamError::CredentialRejected { status },
                502,
                "upstream_credential_rejected",
            );
        }
    }

    #[test]
    fn upstream_server_error_is_502() {
        check(
            UpstreamError::ServerError {
                status: 500,
                retry_after: None,
            },
            502,
            "upstream_unavailable",
        );
        check(
            UpstreamError::ConnectionLost,
            502,
            "upstream_connection_lost",
        );
        check(
            UpstreamError::Rejected { status: 400 },
            502,
            "upstream_rejected_request",
        );
        check(
            UpstreamError::BadResponse { reason: "not JSON" },
            502,
            "upstream_bad_response",
        );
        check(UpstreamError::Unreachable, 502, "upstream_unreachable");
    }

    #[test]
    fn upstream_timeout_is_504() {
        check(UpstreamError::Timeout, 504, "upstream_timeout");
    }

    #[test]
    fn upstream_throttling_is_503_with_retry_after() {
        let err = BrokerError::from(UpstreamError::Throttled {
            retry_after: Duration::from_secs(7),
        });
        assert_eq!(err.retry_after(), Some(7));
        check(err, 503, "upstream_throttled");
    }

    #[test]
    fn an_open_circuit_is_503_with_retry_after() {
        let err = BrokerError::from(Refusal::CircuitOpen {
            retry_after: Duration::from_millis(2500),
        });
        assert_eq!(err.retry_after(), Some(3));
        check(err, 503, "upstream_circuit_open");
    }

    #[test]
    fn saturation_is_503_with_retry_after() {
        let err = BrokerError::from(Refusal::Saturated);
        assert_eq!(err.retry_after(), Some(1));
        check(err, 503, "upstream_saturated");
    }

    #[test]
    fn an_unreachable_shared_cache_on_invalidation_is_503_with_retry_after() {
        let err = BrokerError::from(Refusal::SharedCacheUnavailable);
        assert_eq!(err.retry_after(), Some(1));
        check(err, 503, "shared_cache_unavailable");
    }

    #[test]
    fn an_unwritable_audit_trail_under_refuse_is_503_audit_unavailable_with_retry_after() {
        let err = BrokerError::from(Refusal::AuditUnavailable);
        assert_eq!(err.retry_after(), Some(5));
        assert!(err.to_string().contains("audit trail"), "{err}");
        check(err, 503, "audit_unavailable");
    }

    #[test]
    fn a_spent_mint_budget_is_429_with_retry_after() {
        for scope in [BudgetScope::Global, BudgetScope::Caller] {
            let err = BrokerError::from(Refusal::BudgetExceeded {
                scope,
                retry_after: Duration::from_millis(200),
            });
            assert_eq!(err.retry_after(), Some(1));
            check(err, 429, "mint_budget_exceeded");
        }
    }

    #[test]
    fn too_many_invalidations_is_429_with_retry_after() {
        let err = BrokerError::from(Refusal::InvalidationRateExceeded {
            retry_after: Duration::from_millis(300),
        });
        assert_eq!(err.retry_after(), Some(1));
        check(err, 429, "invalidation_rate_exceeded");
    }

    #[test]
    fn internal_fault_is_500() {
        check(BrokerError::Internal("flight lost"), 500, "internal_error");
    }

    #[test]
    fn a_webhook_delivery_refused_for_its_credential_signature_or_age_is_401() {
        check(WebhookError::Unauthorized, 401, "unauthorized");
        check(WebhookError::BadSignature, 401, "bad_signature");
        check(WebhookError::Stale, 401, "stale_delivery");
    }

    #[test]
    fn a_webhook_body_that_is_not_a_usable_jwt_is_400_naming_the_claim_not_its_value() {
        check(
            WebhookError::NotJwt {
                reason: "three parts",
            },
            400,
            "not_a_jwt",
        );
        check(
            WebhookError::MissingClaim {
                claim: "FlowID".into(),
            },
            400,
            "missing_claim",
        );
        let invalid = BrokerError::from(WebhookError::InvalidClaim {
            claim: "account_id".into(),
            rule: "must be 1 to 128 characters of [a-zA-Z0-9_.-]",
        });
        check(invalid.clone(), 400, "invalid_claim");
        assert!(invalid.to_string().contains("account_id"));
    }

    #[test]
    fn anything_but_the_webhook_path_is_404() {
        check(WebhookError::NotFound, 404, "not_found");
    }
}
