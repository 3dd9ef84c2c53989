//! Invariants over hostile input, checked by the fuzz targets in `fuzz/` and, for every input a
//! fuzzer ever found, by `tests/fuzz_regressions.rs` in `make test`. Each function takes
//! arbitrary bytes and panics only when an invariant breaks:
//!
//! - the form and JSON parsers never panic, and whatever they accept is a valid request that
//!   survives the trip to Truora's form and back unchanged, with the same cache key;
//! - reading Truora's answer never panics, and a token it accepts is safe to embed unescaped;
//! - reading a bearer value as a Kubernetes service-account token (its header, then the whole
//!   verification) or as a JWKS never panics, and nothing is accepted without a signature of a
//!   key whose private half nobody has;
//! - reading a webhook delivery never panics, nothing passes a signing secret nobody has, and
//!   an ending event always names a well-formed flow and user.

use std::sync::OnceLock;

use crate::audit::{KeySource, TagKey};
use crate::auth::kubernetes::{read_header, ServiceAccounts, MAX_TOKEN_BYTES};
use crate::auth::KeySet;
use crate::config::KubernetesConfig;
use crate::issuance::key::key;
use crate::issuance::TokenRequest;
use crate::truora::{self, ArrayEncoding};
use crate::upstream;
use crate::webhooks::{delivery, Rules};

/// Parses `data` as a form body; what parses must round-trip through the upstream form.
pub fn form_body(data: &[u8]) {
    if let Ok(req) = TokenRequest::from_form(data) {
        round_trip(&req);
    }
}

/// Parses `data` as a JSON body; what parses must round-trip through the upstream form.
pub fn json_body(data: &[u8]) {
    if let Ok(req) = TokenRequest::from_json(data) {
        round_trip(&req);
    }
}

fn round_trip(req: &TokenRequest<'_>) {
    let form = req.upstream_form(ArrayEncoding::Repeat);
    let again = TokenRequest::from_form(form.as_bytes())
        .unwrap_or_else(|e| panic!("an accepted request does not re-parse: {e}"));
    assert_eq!(&again, req, "the upstream form changes the request");
    assert_eq!(key("c", &again), key("c", req));
    assert_ne!(key("c", req), key("d", req));
    // The user's tags: one per identifier, the same after the trip.
    static KEY: OnceLock<TagKey> = OnceLock::new();
    let tag_key = KEY.get_or_init(|| TagKey::new(&[0x42; 32], KeySource::File));
    let tags = req.user_tags(tag_key);
    assert_eq!(tags.tags.len(), req.identifiers().count());
    assert_eq!(again.user_tags(tag_key), tags);
}

/// Splits `data` on newlines into field values (country, flow_id, host, account_id, then
/// metadata), builds a form in that order and in reverse: when it parses, both orders must give
/// one key, and moving a byte between two metadata values must change it.
pub fn cache_key(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut values = text.split('\n');
    let mut fields: Vec<(String, String)> = Vec::new();
    for name in ["country", "flow_id", "redirect_url", "account_id"] {
        let Some(v) = values.next() else { return };
        let v = if name == "redirect_url" {
            format!("https://{v}.example/")
        } else {
            v.to_owned()
        };
        fields.push((name.to_owned(), v));
    }
    for (i, v) in values.take(8).enumerate() {
        fields.push((format!("start_variables.metadata.m{i}"), v.to_owned()));
    }
    let encode = |fields: &mut dyn Iterator<Item = &(String, String)>| {
        let mut s = form_urlencoded::Serializer::new(String::new());
        for (k, v) in fields {
            s.append_pair(k, v);
        }
        s.finish()
    };
    let forward = encode(&mut fields.iter());
    let backward = encode(&mut fields.iter().rev());
    let (Ok(a), Ok(b)) = (
        TokenRequest::from_form(forward.as_bytes()),
        TokenRequest::from_form(backward.as_bytes()),
    ) else {
        return;
    };
    assert_eq!(key("c", &a), key("c", &b), "field order changed the key");
    // Shift the last byte of metadata m0 to the front of m1: same bytes, other request.
    if fields.len() >= 6 {
        let (m0, m1) = (fields[4].1.clone(), fields[5].1.clone());
        if let Some(last) = m0.chars().last() {
            let mut shifted = fields.clone();
            shifted[4].1 = m0[..m0.len() - last.len_utf8()].to_owned();
            shifted[5].1 = format!("{last}{m1}");
            let body = encode(&mut shifted.iter());
            if let Ok(c) = TokenRequest::from_form(body.as_bytes()) {
                assert_ne!(key("c", &a), key("c", &c), "a delimiter collision");
            }
        }
    }
}

/// Reads `data` as Truora's answer: first byte picks the status, the rest is the body.
pub fn upstream_answer(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let status = [200, 201, 400, 401, 403, 404, 429, 500, 503][usize::from(selector) % 9];
    let retry_after = std::str::from_utf8(body)
        .ok()
        .and_then(|s| s.lines().next());
    if let Ok(token) = upstream::read_answer(status, retry_after, body) {
        assert!(
            truora::plausible_token(&token),
            "an implausible token was accepted"
        );
        let _ = truora::token_lifetime(&token);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = truora::token_lifetime(text);
    }
}

/// A P-256 public key whose private half was thrown away when it was made.
const ORPHAN_JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","use":"sig","alg":"ES256","kid":"orphan","x":"EDEIa1MgEezgz85eQdmiMGthbMuQooky6l7U1qw4Hg4","y":"tTA4zC447_zylmtsHtM2EuYj1g2gGoGqr2j6ChbVcN8"}]}"#;

/// Reads `data` as a bearer value (a service-account token) and as a JWKS document: neither
/// panics, a header read is one the broker may act on, and no token verifies against a key
/// nobody can sign with.
pub fn service_account_token(data: &[u8]) {
    static VERIFIER: OnceLock<ServiceAccounts> = OnceLock::new();
    let verifier = VERIFIER.get_or_init(|| {
        let Ok(keys) = KeySet::parse(ORPHAN_JWKS.as_bytes()) else {
            panic!("the embedded JWKS does not parse");
        };
        let k = KubernetesConfig {
            issuer: "https://kubernetes.default.svc.cluster.local".into(),
            audiences: vec!["token-broker".into()],
            jwks_file: None,
            jwks_url: None,
            ca_file: None,
            jwks_token_file: None,
            jwks_refresh: std::time::Duration::from_secs(300),
        };
        ServiceAccounts::new(&k, keys)
    });
    if let Ok(header) = read_header(data) {
        assert!(data.len() <= MAX_TOKEN_BYTES, "an oversized token was read");
        assert!(!header.kid.is_empty(), "a header without kid was read");
        assert!(
            matches!(
                header.alg,
                jsonwebtoken::Algorithm::RS256 | jsonwebtoken::Algorithm::ES256
            ),
            "an algorithm other than RS256 or ES256 was read"
        );
    }
    let digest = crate::secret::SecretDigest::of(data);
    assert!(
        verifier.verify(data, &digest).is_err(),
        "a token verified without its key's private half"
    );
    if let Ok(keys) = KeySet::parse(data) {
        assert!(!keys.is_empty(), "a JWKS without a usable key was accepted");
    }
}

/// The signing secret of the webhook seeds in `fuzz/seeds/webhook_delivery/`.
pub const WEBHOOK_FUZZ_SECRET: &[u8] = b"fuzz-signing-secret";

/// The clock the webhook seeds were made for (their `iat`s are near it).
pub const WEBHOOK_FUZZ_NOW: u64 = 1_800_000_000;

/// Reads `data` as a webhook delivery (a first line, when the input has one, is the `?event=`
/// of the rule's URL; the rest the body), without a signing secret, with the seeds' secret, and
/// with a secret nobody has: nothing panics, nothing passes the last, and what is accepted as
/// an ended process names a well-formed flow and user.
pub fn webhook_delivery(data: &[u8]) {
    static RULES: OnceLock<[Rules; 3]> = OnceLock::new();
    let rules = RULES.get_or_init(|| {
        let mut c = crate::config::WebhooksConfig::new(
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            "0".repeat(64),
        );
        c.events.insert(
            "Proceso exitoso".into(),
            "identity_process_succeeded".into(),
        );
        let mut orphan = [0u8; 32];
        if getrandom::fill(&mut orphan).is_err() {
            panic!("the OS random source failed");
        }
        [
            Rules::new(&c, None),
            Rules::new(&c, Some(WEBHOOK_FUZZ_SECRET)),
            Rules::new(&c, Some(&orphan)),
        ]
    });
    let (query, body) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (
            std::str::from_utf8(&data[..i])
                .ok()
                .filter(|q| !q.is_empty()),
            &data[i + 1..],
        ),
        None => (None, data),
    };
    let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(WEBHOOK_FUZZ_NOW);
    for (i, r) in rules.iter().enumerate() {
        let read = delivery::read(body, query, r, now);
        if i == 2 {
            assert!(
                read.is_err(),
                "a delivery passed a signing secret nobody has"
            );
        }
        if let Ok(d) = read {
            assert_eq!(d.ended().is_some(), d.event.ends_process());
            if let Some((flow, account)) = d.ended() {
                assert!(truora::is_flow_id(flow), "an ill-formed flow was accepted");
                assert!(
                    truora::is_account_id(account),
                    "an ill-formed user was accepted"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_inputs_pass_every_invariant() {
        form_body(b"country=CO&flow_id=IPF1&redirect_url=https://a.example&emails=a@b.co,c@d.co&start_variables.metadata.x=1");
        json_body(br#"{"country":"CO","flow_id":"IPF1","redirect_url":"https://a.example","phones":["+573100000000"]}"#);
        upstream_answer(b"\x00{\"api_key\":\"a.b.c\"}");
        cache_key(b"CO\nIPF1\nshop\nu1\nab\ncd");
        service_account_token(ORPHAN_JWKS.as_bytes());
        service_account_token(b"eyJhbGciOiJFUzI1NiIsImtpZCI6Im9ycGhhbiJ9.e30.AAAA");
        webhook_delivery(b"success\neyJhbGciOiJub25lIn0.eyJpYXQiOjE4MDAwMDAwMDAsImZsb3dfaWQiOiJJUEYxIiwiYWNjb3VudF9pZCI6InUxIn0.");
    }

    #[test]
    fn garbage_is_refused_without_panicking() {
        for data in [
            &b""[..],
            b"\xff\xfe",
            b"=&=&",
            b"%",
            b"{\"country\":",
            b"[[[[",
            b"\x05",
        ] {
            form_body(data);
            json_body(data);
            upstream_answer(data);
            cache_key(data);
            service_account_token(data);
            webhook_delivery(data);
        }
    }
}
