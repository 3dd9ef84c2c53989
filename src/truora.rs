//! Truora's vocabulary: the names, sets and rules of its Web Integration Token API that the
//! broker speaks (docs/api.md), and the reading of a minted token's JWT claims for its lifetime.
//!
//! A leaf: it imports nothing of the broker's, so the request parser, the config checks, the
//! upstream client and the pass-through all say "country" or "flow id" with the same rule.
//!
//! A token's signature is not checked (only Truora can); a token that is not a readable JWT gets
//! Truora's documented default life of two hours.

use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};

/// Truora's credential header, holding the master key (lower case, as HTTP/2 sends it).
pub const API_KEY_HEADER: &str = "truora-api-key";
/// The path of the token call under the account API's base URL.
pub const MINT_PATH: &str = "/v1/api-keys";
/// Countries Truora's token call accepts.
pub const COUNTRIES: [&str; 10] = ["ALL", "BR", "CL", "CO", "CR", "EC", "MX", "PE", "AR", "SV"];
/// Document types Truora's token call accepts.
pub const DOCUMENT_TYPES: [&str; 5] = [
    "passport",
    "driver-license",
    "foreign-id",
    "national-id",
    "pep",
];
/// The only `key_type` the broker mints: a Web Integration Token (`backend` would be a
/// permanent master key).
pub const KEY_TYPE: &str = "web";
/// The only `grant` the broker mints.
pub const GRANT: &str = "digital-identity";
/// Prefix of the free-form metadata handed to the validation process.
pub const METADATA_PREFIX: &str = "start_variables.metadata.";
/// Truora's tokens live two hours by default ("a 2 hours shelf life"); the broker assumes this
/// for a token whose claims do not say.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(2 * 60 * 60);
/// The `message` of Truora's answer to a mint, repeated by the drop-in `POST /v1/api-keys`.
pub const MINTED_MESSAGE: &str = "API key created successfully";

/// How a list field (`emails`, `phones`) is written into the form sent to Truora. Truora's docs
/// do not settle it, so it is configurable (`upstream.array_encoding`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ArrayEncoding {
    /// One `name=value` pair per element (`emails=a&emails=b`), what integrators send.
    #[default]
    Repeat,
    /// One pair, the elements joined with commas (`emails=a,b`).
    Comma,
}

/// A flow id as the broker accepts it, in requests and in `allowed_flows`: 1 to 64 of
/// `A-Z a-z 0-9 _ -` (Truora's look like `IPF` and hex).
pub fn is_flow_id(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

/// An `account_id` as Truora documents it (`[a-zA-Z0-9_.-]+`), at most 128 characters.
pub fn is_account_id(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 128
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// A `billing_hub` as the broker accepts it, in requests and in `[[clients]]`: 1 to 128 of
/// `A-Z a-z 0-9 _ . -`. Truora documents the field ("Required if the customer uses billing
/// hubs") but not its form; identifiers of this shape pass, and nothing that could smuggle
/// another form field.
pub fn is_billing_hub(value: &str) -> bool {
    is_account_id(value)
}

/// A token longer than this is not a Web Integration Token.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

#[derive(Deserialize)]
struct Claims {
    exp: Option<f64>,
    iat: Option<f64>,
    /// Any JSON value: a number here must not make the lifetime unreadable.
    jti: Option<serde_json::Value>,
}

/// The longest `jti` the audit trail takes from a token.
pub const MAX_JTI_LEN: usize = 128;

/// What the broker reads of a minted token's claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenClaims {
    /// `exp - iat`, when the claims carry both (zero when `exp` is not after `iat`).
    pub lifetime: Option<Duration>,
    /// The token's id, when it is a string of 1 to [`MAX_JTI_LEN`] of `A-Z a-z 0-9 . _ : -`
    /// (anything else is not written into the audit trail).
    pub jti: Option<String>,
}

/// The claims of a token that is a JWT; `None` for an opaque token or unreadable claims.
pub fn token_claims(token: &str) -> Option<TokenClaims> {
    let mut parts = token.split('.');
    let (_header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || payload.len() > MAX_TOKEN_LEN {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Claims = serde_json::from_slice(&bytes).ok()?;
    let lifetime = match (claims.exp, claims.iat) {
        (Some(exp), Some(iat)) if exp.is_finite() && iat.is_finite() => {
            Some(Duration::from_secs_f64((exp - iat).clamp(0.0, 1e9)))
        }
        _ => None,
    };
    let jti = match claims.jti {
        Some(serde_json::Value::String(j)) if is_jti(&j) => Some(j),
        _ => None,
    };
    Some(TokenClaims { lifetime, jti })
}

/// True for a `jti` the audit trail may carry as it is.
pub fn is_jti(value: &str) -> bool {
    (1..=MAX_JTI_LEN).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// The lifetime the token's own claims give (`exp - iat`), if it is a JWT that carries both.
///
/// `None` for an opaque token or one without the claims; `Some(Duration::ZERO)` when `exp` is not
/// after `iat`.
pub fn token_lifetime(token: &str) -> Option<Duration> {
    token_claims(token)?.lifetime
}

/// True when every byte may appear in a token we pass on unescaped (JWT and base64 alphabets).
pub fn plausible_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= MAX_TOKEN_LEN
        && token.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+' | b'/' | b'=')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: &str) -> String {
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.sig",
            e.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
            e.encode(payload)
        )
    }

    #[test]
    fn the_jti_is_read_when_it_is_a_plain_string_and_never_spoils_the_lifetime() {
        let t = jwt(r#"{"exp":1700007200,"iat":1700000000,"jti":"a1b2-c3"}"#);
        let c = token_claims(&t).unwrap();
        assert_eq!(c.jti.as_deref(), Some("a1b2-c3"));
        assert_eq!(c.lifetime, Some(Duration::from_secs(7200)));
        for odd in [
            r#""a b""#,
            "42",
            r#""""#,
            &format!(r#""{}""#, "x".repeat(129)),
        ] {
            let t = jwt(&format!(
                r#"{{"exp":1700007200,"iat":1700000000,"jti":{odd}}}"#
            ));
            let c = token_claims(&t).unwrap();
            assert_eq!(c.jti, None, "{odd}");
            assert_eq!(c.lifetime, Some(Duration::from_secs(7200)), "{odd}");
        }
        assert_eq!(token_claims("opaque"), None);
    }

    #[test]
    fn lifetime_is_exp_minus_iat() {
        let t = jwt(r#"{"exp":1700007200,"iat":1700000000,"jti":"x"}"#);
        assert_eq!(token_lifetime(&t), Some(Duration::from_secs(7200)));
    }

    #[test]
    fn a_skewed_clock_does_not_change_the_lifetime() {
        // iat far in the past: only the difference counts.
        let t = jwt(r#"{"exp":1000001500,"iat":1000000000}"#);
        assert_eq!(token_lifetime(&t), Some(Duration::from_secs(1500)));
    }

    #[test]
    fn exp_before_iat_is_zero() {
        let t = jwt(r#"{"exp":10,"iat":20}"#);
        assert_eq!(token_lifetime(&t), Some(Duration::ZERO));
    }

    #[test]
    fn opaque_or_claimless_tokens_have_no_lifetime() {
        assert_eq!(token_lifetime("opaque-token"), None);
        assert_eq!(token_lifetime(&jwt(r#"{"sub":"x"}"#)), None);
        assert_eq!(token_lifetime("a.!!!.c"), None);
        assert_eq!(token_lifetime("a.b.c.d"), None);
    }

    #[test]
    fn plausible_tokens_use_the_jwt_alphabet() {
        assert!(plausible_token(&jwt(r#"{"exp":1,"iat":0}"#)));
        assert!(!plausible_token(""));
        assert!(!plausible_token("has space"));
        assert!(!plausible_token("quote\""));
    }
}
