//! Reading a minted token: its JWT claims (`exp`, `iat`) give its lifetime. The signature is not
//! checked (only Truora can), and a token that is not a readable JWT gets Truora's documented
//! default of two hours.

use std::time::Duration;

use base64::Engine;
use serde::Deserialize;

/// A token longer than this is not a Web Integration Token.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

#[derive(Deserialize)]
struct Claims {
    exp: Option<f64>,
    iat: Option<f64>,
}

/// The lifetime the token's own claims give (`exp - iat`), if it is a JWT that carries both.
///
/// `None` for an opaque token or one without the claims; `Some(Duration::ZERO)` when `exp` is not
/// after `iat`.
pub fn lifetime(token: &str) -> Option<Duration> {
    let mut parts = token.split('.');
    let (_header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || payload.len() > MAX_TOKEN_LEN {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Claims = serde_json::from_slice(&bytes).ok()?;
    let (exp, iat) = (claims.exp?, claims.iat?);
    if !exp.is_finite() || !iat.is_finite() {
        return None;
    }
    Some(Duration::from_secs_f64((exp - iat).clamp(0.0, 1e9)))
}

/// True when every byte may appear in a token we pass on unescaped (JWT and base64 alphabets).
pub fn plausible(token: &str) -> bool {
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
    fn lifetime_is_exp_minus_iat() {
        let t = jwt(r#"{"exp":1700007200,"iat":1700000000,"jti":"x"}"#);
        assert_eq!(lifetime(&t), Some(Duration::from_secs(7200)));
    }

    #[test]
    fn a_skewed_clock_does_not_change_the_lifetime() {
        // iat far in the past: only the difference counts.
        let t = jwt(r#"{"exp":1000001500,"iat":1000000000}"#);
        assert_eq!(lifetime(&t), Some(Duration::from_secs(1500)));
    }

    #[test]
    fn exp_before_iat_is_zero() {
        let t = jwt(r#"{"exp":10,"iat":20}"#);
        assert_eq!(lifetime(&t), Some(Duration::ZERO));
    }

    #[test]
    fn opaque_or_claimless_tokens_have_no_lifetime() {
        assert_eq!(lifetime("opaque-token"), None);
        assert_eq!(lifetime(&jwt(r#"{"sub":"x"}"#)), None);
        assert_eq!(lifetime("a.!!!.c"), None);
        assert_eq!(lifetime("a.b.c.d"), None);
    }

    #[test]
    fn plausible_tokens_use_the_jwt_alphabet() {
        assert!(plausible(&jwt(r#"{"exp":1,"iat":0}"#)));
        assert!(!plausible(""));
        assert!(!plausible("has space"));
        assert!(!plausible("quote\""));
    }
}
