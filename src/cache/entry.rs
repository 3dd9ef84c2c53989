//! A cached token: who it was minted for ([`Owner`]), when it dies, and its answers' parts made
//! ready once, so a hit parses and escapes nothing: it copies. The token is kept once (keeping
//! both answers rendered would hold it three times per entry; the memory per cached token is
//! measured in docs/performance.md) and wiped when the last holder lets go.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use zeroize::Zeroizing;

/// Who a token was minted for: what invalidation matches entries on.
#[derive(Debug, Clone)]
pub struct Owner {
    /// The caller it was minted for.
    pub caller: Arc<str>,
    /// The flow it was minted for.
    pub flow_id: Box<str>,
    /// The user it was minted for, when named by account_id.
    pub account_id: Option<Box<str>>,
    /// When it was minted (received from Truora), on the wall clock of the replica that minted
    /// it: a process that ended at some time drops only the tokens minted before.
    pub minted_at: SystemTime,
}

/// A minted token with everything needed to answer with it again (see the module docs).
pub struct Entry {
    /// Who it was minted for.
    pub owner: Owner,
    /// When the token dies, on the local monotonic clock.
    pub expires: Instant,
    /// The last moment it may be handed out (`expires - min_remaining`).
    pub serve_until: Instant,
    /// When the token dies, on the wall clock.
    pub expires_at: SystemTime,
    token: Zeroizing<Box<str>>,
    /// `expires_at` in RFC 3339 to the second (`2026-11-26T02:13:31Z`).
    expires_at_text: [u8; 20],
    /// `{upstream.web_url}/?token=`, JSON-escaped without quotes; one allocation shared by
    /// every entry of an issuer.
    identity_prefix: Arc<str>,
    /// The token is all `A-Z a-z 0-9 - _ .`: the same bytes in JSON and in a URL query.
    plain: bool,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("caller", &self.owner.caller)
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

impl Entry {
    /// An entry for `token`, answered with `identity_prefix` (see [`identity_prefix`]) before
    /// the token in its `identity_url`.
    pub fn new(
        token: &str,
        identity_prefix: Arc<str>,
        owner: Owner,
        expires: Instant,
        serve_until: Instant,
        expires_at: SystemTime,
    ) -> Self {
        let mut expires_at_text = [b'0'; 20];
        // RFC 3339 to the second is 20 bytes for every year a token can end in (before 10000).
        let _ = write!(
            &mut expires_at_text[..],
            "{}",
            humantime::format_rfc3339_seconds(expires_at)
        );
        Self {
            owner,
            expires,
            serve_until,
            expires_at,
            plain: token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')),
            token: Zeroizing::new(token.into()),
            expires_at_text,
            identity_prefix,
        }
    }

    /// The token's `jti` claim, when it has a plain one (for the audit trail's hit events).
    pub fn jti(&self) -> Option<String> {
        crate::truora::token_claims(&self.token)?.jti
    }

    /// Life left at `now`.
    pub fn remaining(&self, now: Instant) -> Duration {
        self.expires.saturating_duration_since(now)
    }

    /// `expires_at` as the answer says it.
    pub fn expires_at_text(&self) -> &[u8] {
        &self.expires_at_text
    }

    /// The JSON-escaped `identity_url` before the token.
    pub fn identity_prefix(&self) -> &[u8] {
        self.identity_prefix.as_bytes()
    }

    /// Calls `f` with the token JSON-escaped (without quotes) and the token escaped for a URL
    /// query (which JSON needs no further escaping for). Both are the token itself unless it
    /// holds other bytes than a JWT's; then they are made here, in buffers wiped after use.
    pub fn with_escaped_token<R>(&self, f: impl FnOnce(&[u8], &[u8]) -> R) -> R {
        if self.plain {
            return f(self.token.as_bytes(), self.token.as_bytes());
        }
        let mut json = Zeroizing::new(Vec::with_capacity(self.token.len() + 16));
        // Serialising a str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *json, &**self.token);
        let inner = json
            .get(1..json.len().saturating_sub(1))
            .unwrap_or_default();
        let url: Zeroizing<String> =
            Zeroizing::new(form_urlencoded::byte_serialize(self.token.as_bytes()).collect());
        f(inner, url.as_bytes())
    }
}

/// The JSON-escaped `identity_url` before the token (`{web_url}/?token=`), for [`Entry::new`].
pub fn identity_prefix(web_url: &str) -> Arc<str> {
    let url = format!("{}/?token=", web_url.trim_end_matches('/'));
    let quoted = serde_json::to_string(&url).unwrap_or_default();
    quoted
        .get(1..quoted.len().saturating_sub(1))
        .unwrap_or_default()
        .into()
}
