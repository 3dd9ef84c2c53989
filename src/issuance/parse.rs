//! Reading what a caller sends into the core's types: a form-encoded or JSON body into a
//! [`TokenRequest`], and the `DELETE /v1/tokens` query into an [`InvalidationFilter`], every rule
//! checked before anything goes upstream or into a cache key.
//!
//! A caller may repeat `key_type=web` and `grant=digital-identity`, but any other value (above
//! all `key_type=backend`, a permanent master key) is refused. Unknown fields are refused too,
//! because every forwarded field is part of the cache key. Values borrow from the body wherever
//! no unescaping is needed, so a typical hit allocates little here.

use std::borrow::Cow;
use std::cell::RefCell;

use serde::Deserialize;

use super::json::{json_error, JsonObject, JsonValue};
use super::request::TokenRequest;
use crate::error::RequestError;
use crate::truora::{
    is_account_id, is_billing_hub, is_flow_id, COUNTRIES, DOCUMENT_TYPES, GRANT, KEY_TYPE,
    METADATA_PREFIX,
};

const MAX_URL_LEN: usize = 2048;
const MAX_VALUE_LEN: usize = 1024;
pub(super) const MAX_LIST_LEN: usize = 10;
const MAX_METADATA: usize = 32;

impl<'a> TokenRequest<'a> {
    /// Parses and validates a form-encoded body.
    pub fn from_form(body: &'a [u8]) -> Result<Self, RequestError> {
        let mut fields = Fields::default();
        for (name, value) in form_pairs(body) {
            fields.push(name, value)?;
        }
        fields.finish()
    }

    /// Parses and validates a JSON body: an object with the same names; lists as arrays or
    /// comma-joined strings; metadata flat (`"start_variables.metadata.x"`) or nested
    /// (`"start_variables": {"metadata": {"x": ...}}`).
    pub fn from_json(body: &'a [u8]) -> Result<Self, RequestError> {
        let mut de = serde_json::Deserializer::from_slice(body);
        let object = JsonObject::deserialize(&mut de).map_err(json_error)?;
        de.end().map_err(json_error)?;
        // Metadata written both ways could name one entry twice with two values: one way only.
        let has = |test: &dyn Fn(&str) -> bool| object.0.iter().any(|(name, _)| test(&name.0));
        if has(&|n| n == "start_variables") && has(&|n| n.starts_with(METADATA_PREFIX)) {
            return Err(RequestError::InvalidField {
                field: "start_variables".into(),
                rule: "metadata goes either nested in start_variables or flat, not both".into(),
            });
        }
        let mut fields = Fields::default();
        for (name, value) in object.0 {
            match value {
                JsonValue::Str(v) => fields.push(name.0, v.0)?,
                // The one field whose document allows a number; Truora's form reads its digits.
                JsonValue::Number(n) if name.0 == "api_key_version" => {
                    fields.push(name.0, Cow::Owned(n.to_string()))?
                }
                JsonValue::List(items) => {
                    if !is_list_field(&name.0) {
                        return Err(RequestError::InvalidField {
                            field: field_name(&name.0),
                            rule: "must be a string, not a list".into(),
                        });
                    }
                    for item in items {
                        fields.push(name.0.clone(), item.0)?;
                    }
                }
                JsonValue::Object(inner) if name.0 == "start_variables" => {
                    for (section, value) in inner {
                        let JsonValue::Object(entries) = value else {
                            return Err(RequestError::InvalidField {
                                field: "start_variables".into(),
                                rule: "must be {\"metadata\": {\"name\": \"value\"}}".into(),
                            });
                        };
                        if section.0 != "metadata" {
                            return Err(RequestError::UnknownField {
                                field: field_name(&format!("start_variables.{}", section.0)),
                            });
                        }
                        for (k, v) in entries {
                            let JsonValue::Str(v) = v else {
                                return Err(RequestError::InvalidField {
                                    field: field_name(&format!("{METADATA_PREFIX}{}", k.0)),
                                    rule: "must be a string".into(),
                                });
                            };
                            fields.push(Cow::Owned(format!("{METADATA_PREFIX}{}", k.0)), v.0)?;
                        }
                    }
                }
                JsonValue::NotStrings if is_list_field(&name.0) => {
                    return Err(RequestError::InvalidField {
                        field: field_name(&name.0),
                        rule: "must be a list of strings".into(),
                    })
                }
                JsonValue::Number(_)
                | JsonValue::NotStrings
                | JsonValue::Object(_)
                | JsonValue::Other => {
                    return Err(RequestError::InvalidField {
                        field: field_name(&name.0),
                        rule: "must be a string".into(),
                    })
                }
            }
        }
        fields.finish()
    }
}

/// The `(name, value)` pairs of a form body, decoded exactly as `form_urlencoded::parse` decodes
/// them (split on `&`, empty pieces skipped, first `=` splits, `+` is a space, `%XX` is a byte, a
/// `%` not followed by two hex digits stays, invalid UTF-8 becomes U+FFFD), but faster on a hit:
/// a value without `+` or `%` is borrowed after one UTF-8 check, and an escaped one is decoded
/// into a buffer of its final size at once, where that crate grows its buffer from the text before
/// the first escape (four allocations for an escaped `redirect_url`, one here).
///
/// The body is scanned whole, once for its UTF-8 check and once (memchr) for where its `&`
/// and its escapes are: a field then needs no scan of its own, where a check per field was a
/// fifth of a hit's parse (docs/performance.md).
fn form_pairs(body: &[u8]) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
    let text = std::str::from_utf8(body).ok();
    let mut ends = memchr::memchr_iter(b'&', body).chain(std::iter::once(body.len()));
    let mut escapes = memchr::memchr2_iter(b'+', b'%', body).peekable();
    let mut start = 0;
    std::iter::from_fn(move || loop {
        let end = ends.next()?;
        let piece = start..end;
        start = end + 1;
        if piece.is_empty() {
            continue;
        }
        let (name, value) = match memchr::memchr(b'=', &body[piece.clone()]) {
            Some(i) => (piece.start..piece.start + i, piece.start + i + 1..end),
            None => (piece, end..end),
        };
        let mut field = |range: std::ops::Range<usize>| {
            while escapes.next_if(|&at| at < range.start).is_some() {}
            let escaped = escapes.peek().is_some_and(|&at| at < range.end);
            match text {
                Some(text) if !escaped => Cow::Borrowed(&text[range]),
                _ => form_decode(&body[range]),
            }
        };
        let name = field(name);
        return Some((name, field(value)));
    })
}

fn form_decode(input: &[u8]) -> Cow<'_, str> {
    if !input.iter().any(|b| matches!(b, b'+' | b'%')) {
        return match std::str::from_utf8(input) {
            Ok(s) => Cow::Borrowed(s),
            Err(_) => Cow::Owned(String::from_utf8_lossy(input).into_owned()),
        };
    }
    let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16)).map(|d| d as u8);
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'+' => out.push(b' '),
            b'%' => {
                if let (Some(hi), Some(lo)) = (hex(input.get(i + 1)), hex(input.get(i + 2))) {
                    out.push(hi * 16 + lo);
                    i += 2;
                } else {
                    out.push(b'%');
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    match String::from_utf8(out) {
        Ok(s) => Cow::Owned(s),
        Err(e) => Cow::Owned(String::from_utf8_lossy(e.as_bytes()).into_owned()),
    }
}

/// What `DELETE /v1/tokens` drops: the caller's tokens for this flow and/or this account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidationFilter<'a> {
    /// Only tokens minted for this flow.
    pub flow_id: Option<Cow<'a, str>>,
    /// Only tokens minted for this account_id.
    pub account_id: Option<Cow<'a, str>>,
}

/// Parses a `DELETE /v1/tokens` query: `flow_id`, `account_id`, at least one of the two.
pub fn invalidation_filter(query: &str) -> Result<InvalidationFilter<'_>, RequestError> {
    let mut flow_id = None;
    let mut account_id = None;
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        let slot = match name.as_ref() {
            "flow_id" => &mut flow_id,
            "account_id" => &mut account_id,
            _ => {
                return Err(RequestError::UnknownField {
                    field: field_name(&name),
                })
            }
        };
        if slot.is_some() {
            return Err(RequestError::DuplicateField {
                field: field_name(&name),
            });
        }
        let field = if name == "flow_id" {
            "flow_id"
        } else {
            "account_id"
        };
        check_text(field, &value)?;
        if field == "flow_id" {
            check_flow_id(&value)?;
        } else {
            check_account_id(&value)?;
        }
        *slot = Some(value);
    }
    if flow_id.is_none() && account_id.is_none() {
        return Err(RequestError::MissingFilter);
    }
    Ok(InvalidationFilter {
        flow_id,
        account_id,
    })
}

/// The fields as they arrive, before the whole-request rules are applied.
#[derive(Default)]
struct Fields<'a> {
    key_type: bool,
    grant: bool,
    req: TokenRequest<'a>,
    country: bool,
}

impl<'a> Fields<'a> {
    fn push(&mut self, name: Cow<'a, str>, value: Cow<'a, str>) -> Result<(), RequestError> {
        let name_str: &str = &name;
        match name_str {
            "key_type" => {
                once(&mut self.key_type, "key_type")?;
                if value != KEY_TYPE {
                    return Err(RequestError::ForbiddenValue {
                        field: "key_type",
                        rule: "must be \"web\" or left out: the broker mints Web Integration Tokens only",
                    });
                }
            }
            "grant" => {
                once(&mut self.grant, "grant")?;
                if value != GRANT {
                    return Err(RequestError::ForbiddenValue {
                        field: "grant",
                        rule: "must be \"digital-identity\" or left out",
                    });
                }
            }
            "country" => {
                once(&mut self.country, "country")?;
                if value.is_empty() {
                    return Err(RequestError::MissingField { field: "country" });
                }
                self.req.country =
                    COUNTRIES
                        .iter()
                        .find(|c| **c == value)
                        .ok_or(RequestError::InvalidField {
                            field: "country".into(),
                            rule: "must be one of ALL, BR, CL, CO, CR, EC, MX, PE, AR, SV".into(),
                        })?;
            }
            "flow_id" => {
                set_once(&mut self.req.flow_id, "flow_id", value)?;
                check_flow_id(&self.req.flow_id)?;
            }
            "redirect_url" => {
                set_once(&mut self.req.redirect_url, "redirect_url", value)?;
                check_redirect_url(&self.req.redirect_url)?;
            }
            "document_type" => {
                if self.req.document_type.is_some() {
                    return Err(duplicate("document_type"));
                }
                self.req.document_type = Some(
                    DOCUMENT_TYPES
                        .iter()
                        .find(|d| **d == value)
                        .ok_or(RequestError::InvalidField {
                        field: "document_type".into(),
                        rule:
                            "must be one of passport, driver-license, foreign-id, national-id, pep"
                                .into(),
                    })?,
                );
            }
            "account_id" => {
                check_text("account_id", &value)?;
                check_account_id(&value)?;
                set_option_once(&mut self.req.account_id, "account_id", value)?;
            }
            "emails" | "email" => {
                for email in split_list(value) {
                    check_text("emails", &email)?;
                    if !valid_email(&email) {
                        return Err(RequestError::InvalidField {
                            field: "emails".into(),
                            rule: "must be email addresses like user@example.com".into(),
                        });
                    }
                    push_list(&mut self.req.emails, "emails", email)?;
                }
            }
            "phone" => {
                check_phone("phone", &value)?;
                set_option_once(&mut self.req.phone, "phone", value)?;
            }
            "phones" => {
                for phone in split_list(value) {
                    check_phone("phones", &phone)?;
                    push_list(&mut self.req.phones, "phones", phone)?;
                }
            }
            "api_key_version" => {
                check_text("api_key_version", &value)?;
                if value.is_empty() || value.len() > 3 || !value.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(RequestError::InvalidField {
                        field: "api_key_version".into(),
                        rule: "must be a small whole number such as 1".into(),
                    });
                }
                set_option_once(&mut self.req.api_key_version, "api_key_version", value)?;
            }
            "billing_hub" => {
                check_text("billing_hub", &value)?;
                if !is_billing_hub(&value) {
                    return Err(RequestError::InvalidField {
                        field: "billing_hub".into(),
                        rule: "must be 1 to 128 characters of [a-zA-Z0-9_.-]".into(),
                    });
                }
                set_option_once(&mut self.req.billing_hub, "billing_hub", value)?;
            }
            _ => {
                let Some(key) = name_str.strip_prefix(METADATA_PREFIX) else {
                    return Err(RequestError::UnknownField {
                        field: field_name(name_str),
                    });
                };
                if key.is_empty()
                    || key.len() > 64
                    || !key
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
                {
                    return Err(RequestError::InvalidField {
                        field: field_name(name_str),
                        rule:
                            "metadata names must be 1 to 64 characters of A-Z, a-z, 0-9, '_', '-'"
                                .into(),
                    });
                }
                check_text_len(name_str, &value, MAX_VALUE_LEN)?;
                if self.req.metadata.iter().any(|(k, _)| k == key) {
                    return Err(RequestError::DuplicateField {
                        field: field_name(name_str),
                    });
                }
                if self.req.metadata.len() >= MAX_METADATA {
                    return Err(RequestError::InvalidField {
                        field: "start_variables.metadata".into(),
                        rule: "at most 32 metadata entries".into(),
                    });
                }
                let key = match name {
                    Cow::Borrowed(n) => Cow::Borrowed(&n[METADATA_PREFIX.len()..]),
                    Cow::Owned(n) => Cow::Owned(n[METADATA_PREFIX.len()..].to_owned()),
                };
                self.req.metadata.push((key, value));
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Result<TokenRequest<'a>, RequestError> {
        if !self.country {
            return Err(RequestError::MissingField { field: "country" });
        }
        if self.req.flow_id.is_empty() {
            return Err(RequestError::MissingField { field: "flow_id" });
        }
        if self.req.redirect_url.is_empty() {
            return Err(RequestError::MissingField {
                field: "redirect_url",
            });
        }
        self.req.metadata.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(self.req)
    }
}

fn duplicate(field: &'static str) -> RequestError {
    RequestError::DuplicateField {
        field: field.into(),
    }
}

fn once(seen: &mut bool, field: &'static str) -> Result<(), RequestError> {
    if std::mem::replace(seen, true) {
        return Err(duplicate(field));
    }
    Ok(())
}

fn set_once<'a>(
    slot: &mut Cow<'a, str>,
    field: &'static str,
    value: Cow<'a, str>,
) -> Result<(), RequestError> {
    if !slot.is_empty() {
        return Err(duplicate(field));
    }
    if value.is_empty() {
        return Err(RequestError::MissingField { field });
    }
    *slot = value;
    Ok(())
}

fn set_option_once<'a>(
    slot: &mut Option<Cow<'a, str>>,
    field: &'static str,
    value: Cow<'a, str>,
) -> Result<(), RequestError> {
    if slot.is_some() {
        return Err(duplicate(field));
    }
    *slot = Some(value);
    Ok(())
}

fn push_list<'a>(
    list: &mut Vec<Cow<'a, str>>,
    field: &'static str,
    value: Cow<'a, str>,
) -> Result<(), RequestError> {
    if list.len() >= MAX_LIST_LEN {
        return Err(RequestError::InvalidField {
            field: field.into(),
            rule: "at most 10 entries".into(),
        });
    }
    list.push(value);
    Ok(())
}

/// Splits a comma-joined list (one reading of Truora's arrays) into its elements.
fn split_list(value: Cow<'_, str>) -> Vec<Cow<'_, str>> {
    if !value.contains(',') {
        return vec![value];
    }
    match value {
        Cow::Borrowed(v) => v.split(',').map(|s| Cow::Borrowed(s.trim())).collect(),
        Cow::Owned(v) => v
            .split(',')
            .map(|s| Cow::Owned(s.trim().to_owned()))
            .collect(),
    }
}

fn is_list_field(name: &str) -> bool {
    matches!(name, "emails" | "email" | "phones")
}

/// A field name safe to put in an error: no control characters, at most 64 characters.
fn field_name(name: &str) -> Cow<'static, str> {
    let clean: String = name.chars().filter(|c| !c.is_control()).take(64).collect();
    Cow::Owned(clean)
}

fn check_text(field: &'static str, value: &str) -> Result<(), RequestError> {
    check_text_len(field, value, MAX_VALUE_LEN)
}

/// At most `max` characters (as the API document counts them: a byte count over `max` is
/// checked again in characters), valid UTF-8, no control characters.
fn check_text_len(field: &str, value: &str, max: usize) -> Result<(), RequestError> {
    let rule = if value.len() > max && value.chars().count() > max {
        "is too long"
    } else if value.is_ascii() {
        // The common case, checked a byte at a time: the ASCII control characters are exactly
        // those `char::is_control` finds in ASCII, and U+FFFD is not ASCII.
        if value.bytes().any(|b| b.is_ascii_control()) {
            "must not contain control characters"
        } else {
            return Ok(());
        }
    } else if value.chars().any(char::is_control) {
        "must not contain control characters"
    } else if value.contains('\u{FFFD}') {
        "must be valid UTF-8"
    } else {
        return Ok(());
    };
    Err(RequestError::InvalidField {
        field: field_name(field),
        rule: rule.into(),
    })
}

fn check_flow_id(value: &str) -> Result<(), RequestError> {
    if !is_flow_id(value) {
        return Err(RequestError::InvalidField {
            field: "flow_id".into(),
            rule:
                "must be 1 to 64 characters of A-Z, a-z, 0-9, '_', '-' (a flow id such as IPF...)"
                    .into(),
        });
    }
    Ok(())
}

fn check_account_id(value: &str) -> Result<(), RequestError> {
    if !is_account_id(value) {
        return Err(RequestError::InvalidField {
            field: "account_id".into(),
            rule: "must be 1 to 128 characters of [a-zA-Z0-9_.-]".into(),
        });
    }
    Ok(())
}

fn check_redirect_url(value: &str) -> Result<(), RequestError> {
    // Callers send the same few redirect URLs over and over (one per flow), and parsing one as a
    // URI copies it twice. So each thread remembers the last URL that passed and does not parse
    // it again: the check is a pure function of the text, and only a URL that passed is kept.
    thread_local! {
        static LAST_PASSED: RefCell<String> = const { RefCell::new(String::new()) };
    }
    if !value.is_empty() && LAST_PASSED.with(|last| last.borrow().as_str() == value) {
        return Ok(());
    }
    check_redirect_url_uncached(value)?;
    LAST_PASSED.with(|last| {
        let mut last = last.borrow_mut();
        last.clear();
        last.push_str(value);
    });
    Ok(())
}

fn check_redirect_url_uncached(value: &str) -> Result<(), RequestError> {
    check_text_len("redirect_url", value, MAX_URL_LEN)?;
    if !is_redirect_url(value) {
        return Err(RequestError::InvalidField {
            field: "redirect_url".into(),
            rule: "must be an absolute https URL with a host, such as https://example.com/done"
                .into(),
        });
    }
    Ok(())
}

/// The redirect URL docs/openapi.yaml describes: `https://`, a host of dot-separated labels of
/// `A-Z a-z 0-9 -`, an optional port of 1 to 5 digits, then an optional path or query and an
/// optional fragment, written in RFC 3986's characters (unreserved, sub-delims, `:`, `@`, `/`,
/// `?`) or `%XX` escapes. No user info, no IP literal, nothing a URL parser would have to guess.
fn is_redirect_url(value: &str) -> bool {
    let Some(rest) = value.strip_prefix("https://") else {
        return false;
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    let (host, port) = match authority.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    };
    let host_ok = host.split('.').all(|label| {
        !label.is_empty()
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    });
    let port_ok =
        port.is_none_or(|p| (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()));
    let (before, fragment) = tail.split_once('#').unwrap_or((tail, ""));
    host_ok && port_ok && uri_text(before) && uri_text(fragment)
}

/// URI characters of a path, query or fragment, and `%XX` escapes.
fn uri_text(text: &str) -> bool {
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if !(b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
            {
                return false;
            }
            i += 3;
        } else if b[i].is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?".contains(&b[i]) {
            i += 1;
        } else {
            return false;
        }
    }
    true
}

fn check_phone(field: &'static str, value: &str) -> Result<(), RequestError> {
    let digits = value.strip_prefix('+').unwrap_or("");
    let ok = (6..=15).contains(&digits.len())
        && !digits.starts_with('0')
        && digits.bytes().all(|b| b.is_ascii_digit());
    if !ok {
        return Err(RequestError::InvalidField {
            field: field.into(),
            rule: "must be an E.164 number such as +573100000000".into(),
        });
    }
    Ok(())
}

/// A practical email check: one `@`, a sane local part, a dotted domain of DNS labels.
fn valid_email(value: &str) -> bool {
    if value.len() > 254 {
        return false;
    }
    let Some((local, domain)) = value.rsplit_once('@') else {
        return false;
    };
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+/=?^_`{|}~.-".contains(&b));
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    local_ok && domain_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::truora::ArrayEncoding;

    /// The hot-path form decoder reads every body exactly as `form_urlencoded::parse` does.
    #[test]
    fn form_pairs_decode_exactly_as_form_urlencoded() {
        let alphabet: &[u8] = b"a=&+%2F7gG \xc3\xa9\xff";
        let mut fixed: Vec<Vec<u8>> = [
            &b""[..],
            b"&",
            b"&&a",
            b"=",
            b"a=",
            b"=b",
            b"a=b=c",
            b"%",
            b"%2",
            b"%2F",
            b"%2f%2F",
            b"%zz",
            b"%%41",
            b"%+1",
            b"a+b",
            b"%C3%A9",
            b"%C3",
            b"%FF%FE",
            b"\xff",
            b"%2+",
            b"a%3Db=c%26d",
            b"k=%E2%82%AC&k2=+%2B+",
        ]
        .iter()
        .map(|s| s.to_vec())
        .collect();
        // A fixed pseudo-random walk over the tricky bytes, so a failure is reproducible.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let len = (next() % 14) as usize;
            let piece = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            fixed.push(piece);
        }
        for input in fixed {
            let ours: Vec<_> = form_pairs(&input).collect();
            let theirs: Vec<_> = form_urlencoded::parse(&input).collect();
            assert_eq!(ours, theirs, "{:?}", String::from_utf8_lossy(&input));
        }
    }

    const BASE: &str =
        "country=CO&flow_id=IPF123abc&redirect_url=https%3A%2F%2Fshop.example%2Fdone&account_id=user-1";

    fn form(body: &str) -> Result<TokenRequest<'static>, RequestError> {
        TokenRequest::from_form(body.as_bytes()).map(TokenRequest::into_owned)
    }

    fn field_of(err: RequestError) -> String {
        crate::error::BrokerError::from(err)
            .field()
            .unwrap_or("")
            .to_owned()
    }

    #[test]
    fn a_minimal_form_parses() {
        let r = form(BASE).unwrap();
        assert_eq!(r.country, "CO");
        assert_eq!(r.flow_id, "IPF123abc");
        assert_eq!(r.redirect_url, "https://shop.example/done");
        assert_eq!(r.account_id.as_deref(), Some("user-1"));
        assert!(r.names_user());
    }

    #[test]
    fn key_type_web_and_grant_digital_identity_may_be_repeated_by_the_caller() {
        let body = format!("{BASE}&key_type=web&grant=digital-identity");
        assert!(form(&body).is_ok());
    }

    #[test]
    fn key_type_backend_is_refused() {
        let err = form(&format!("{BASE}&key_type=backend")).unwrap_err();
        assert!(matches!(
            err,
            RequestError::ForbiddenValue {
                field: "key_type",
                ..
            }
        ));
        let err = form(&format!("{BASE}&key_type=sdk")).unwrap_err();
        assert_eq!(field_of(err), "key_type");
    }

    #[test]
    fn other_grant_is_refused() {
        let err = form(&format!("{BASE}&grant=signals")).unwrap_err();
        assert_eq!(field_of(err), "grant");
    }

    #[test]
    fn each_required_field_is_named_when_missing() {
        for (field, body) in [
            ("country", "flow_id=IPF1&redirect_url=https://a.example"),
            ("flow_id", "country=CO&redirect_url=https://a.example"),
            ("redirect_url", "country=CO&flow_id=IPF1"),
        ] {
            let err = form(body).unwrap_err();
            assert_eq!(err, RequestError::MissingField { field }, "{body}");
        }
    }

    #[test]
    fn empty_required_field_counts_as_missing() {
        let err = form("country=CO&flow_id=&redirect_url=https://a.example").unwrap_err();
        assert_eq!(err, RequestError::MissingField { field: "flow_id" });
    }

    #[test]
    fn country_outside_the_set_is_refused() {
        for c in ["US", "co", ""] {
            let err = form(&BASE.replace("country=CO", &format!("country={c}"))).unwrap_err();
            assert_eq!(field_of(err), "country", "{c}");
        }
    }

    #[test]
    fn every_country_in_the_set_is_accepted() {
        for c in COUNTRIES {
            form(&BASE.replace("country=CO", &format!("country={c}"))).unwrap();
        }
    }

    #[test]
    fn document_type_outside_the_set_is_refused() {
        form(&format!("{BASE}&document_type=passport")).unwrap();
        let err = form(&format!("{BASE}&document_type=selfie")).unwrap_err();
        assert_eq!(field_of(err), "document_type");
    }

    #[test]
    fn redirect_url_must_be_absolute_https() {
        for url in [
            "http://shop.example/done",
            "/done",
            "shop.example",
            "https://",
            "https://user@evil.example/",
            "javascript:alert(1)",
            "HTTPS://shop.example/",
            "https://shop..example/",
            "https://shop.example:/",
            "https://shop.example:123456/",
            "https://[::1]/done",
            "https://shop.example/d\u{e9}j\u{e0}",
            "https://shop.example/a b",
            "https://shop.example/{x}",
            "https://shop.example/%zz",
            "https://shop.example/?q=%4",
            "https://shop.example/#a#b",
        ] {
            let body = BASE.replace(
                "redirect_url=https%3A%2F%2Fshop.example%2Fdone",
                &format!(
                    "redirect_url={}",
                    form_urlencoded::byte_serialize(url.as_bytes()).collect::<String>()
                ),
            );
            let err = form(&body).unwrap_err();
            assert_eq!(field_of(err), "redirect_url", "{url}");
        }
    }

    /// The redirect URL pattern of docs/openapi.yaml, as written there.
    fn documented_redirect_pattern() -> String {
        let doc = include_str!("../../docs/openapi.yaml");
        let section = &doc[doc.find("\n    RedirectUrl:").unwrap()..];
        let line = section
            .lines()
            .find(|l| l.trim_start().starts_with("pattern:"))
            .unwrap();
        let quoted = line.trim_start().trim_start_matches("pattern:").trim();
        quoted.trim_matches('\'').replace("''", "'")
    }

    #[test]
    fn every_redirect_url_the_api_document_allows_is_accepted_and_read_for_its_host() {
        use proptest::strategy::{Strategy, ValueTree};
        let pattern = documented_redirect_pattern();
        let inner = pattern.strip_prefix('^').and_then(|p| p.strip_suffix('$'));
        let strategy = proptest::string::string_regex(inner.unwrap()).unwrap();
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        for _ in 0..2000 {
            let url = strategy.new_tree(&mut runner).unwrap().current();
            assert!(is_redirect_url(&url), "{url}");
            if url.len() <= MAX_URL_LEN {
                check_redirect_url_uncached(&url).unwrap();
            }
            // The policy reads the host with http's parser: the same host.
            let host = url["https://".len()..].split(['/', '?', '#', ':']).next();
            assert_eq!(url.parse::<http::Uri>().unwrap().host(), host, "{url}");
        }
        for url in [
            "https://a.b",
            "https://shop-1.example.com:8443/done?x=1&y=%2F#top",
            "https://1.2.3.4/a/b;c=d?e=f/g?h#i/j?k",
            "https://a.b/!$&'()*+,;=:@~._-",
        ] {
            assert!(is_redirect_url(url), "{url}");
        }
    }

    #[test]
    fn the_remembered_redirect_url_never_lets_a_bad_one_through() {
        let urls = [
            "https://shop.example/done",
            "https://shop.example/done ",
            "http://shop.example/done",
            "https://shop.example/done",
            "https://user@shop.example/done",
            "https://shop.example/done",
            "https://other.example/",
            "",
            "https://shop.example/done\u{7}",
        ];
        // Twice over, so that each is also checked right after itself.
        for url in urls.iter().flat_map(|u| [u, u]) {
            assert_eq!(
                check_redirect_url(url).is_ok(),
                check_redirect_url_uncached(url).is_ok(),
                "{url:?}"
            );
        }
    }

    #[test]
    fn the_ascii_text_check_agrees_with_the_char_check() {
        for b in 0u8..128 {
            let value = format!("a{}b", b as char);
            let by_char = value.chars().any(char::is_control);
            assert_eq!(check_text("flow_id", &value).is_err(), by_char, "{b:#x}");
        }
    }

    #[test]
    fn account_id_must_match_its_pattern() {
        for id in ["a b", "a/b", "ü", "x".repeat(129).as_str()] {
            let body = BASE.replace(
                "account_id=user-1",
                &format!(
                    "account_id={}",
                    form_urlencoded::byte_serialize(id.as_bytes()).collect::<String>()
                ),
            );
            let err = form(&body).unwrap_err();
            assert_eq!(field_of(err), "account_id", "{id}");
        }
        form(&BASE.replace("user-1", "A_b.c-9")).unwrap();
    }

    #[test]
    fn phone_must_be_e164() {
        form(&format!("{BASE}&phone=%2B573100000000")).unwrap();
        for p in ["573100000000", "%2B0573100000000", "%2B57-310", "%2B1"] {
            let err = form(&format!("{BASE}&phone={p}")).unwrap_err();
            assert_eq!(field_of(err), "phone", "{p}");
        }
        let err = form(&format!("{BASE}&phones=%2B573100000000,123")).unwrap_err();
        assert_eq!(field_of(err), "phones");
    }

    #[test]
    fn emails_must_be_well_formed() {
        for e in ["user@example.com", "first.last%2Btag@sub.example.co"] {
            form(&format!("{BASE}&emails={e}")).unwrap();
        }
        for e in [
            "nope",
            "a@b",
            "@example.com",
            "a..b@example.com",
            "a@-x.com",
            "a b@x.com",
        ] {
            let err = form(&format!("{BASE}&emails={e}")).unwrap_err();
            assert_eq!(field_of(err), "emails", "{e}");
        }
    }

    #[test]
    fn repeated_and_comma_joined_emails_read_the_same() {
        let a = form(&format!("{BASE}&emails=a@x.com&emails=b@y.com")).unwrap();
        let b = form(&format!("{BASE}&emails=a@x.com,b@y.com")).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.emails, vec!["a@x.com", "b@y.com"]);
    }

    #[test]
    fn control_characters_are_refused() {
        let err = form(&format!("{BASE}&start_variables.metadata.note=a%0Ab")).unwrap_err();
        assert_eq!(field_of(err), "start_variables.metadata.note");
        let err = form(&BASE.replace("user-1", "user%00")).unwrap_err();
        assert_eq!(field_of(err), "account_id");
    }

    #[test]
    fn invalid_utf8_is_refused() {
        let err = form(&format!("{BASE}&start_variables.metadata.note=%FF")).unwrap_err();
        assert!(matches!(err, RequestError::InvalidField { .. }));
    }

    #[test]
    fn duplicated_single_valued_field_is_refused() {
        for dup in [
            "country=CO",
            "flow_id=IPF9",
            "account_id=x",
            "redirect_url=https://b.example",
            "key_type=web&key_type=web",
        ] {
            let err = form(&format!("{BASE}&{dup}")).unwrap_err();
            assert!(
                matches!(err, RequestError::DuplicateField { .. }),
                "{dup}: {err:?}"
            );
        }
        let err = form(&format!(
            "{BASE}&start_variables.metadata.a=1&start_variables.metadata.a=2"
        ))
        .unwrap_err();
        assert!(matches!(err, RequestError::DuplicateField { .. }));
    }

    #[test]
    fn unknown_field_is_refused_and_named() {
        let err = form(&format!("{BASE}&expires_in=99999")).unwrap_err();
        assert_eq!(
            err,
            RequestError::UnknownField {
                field: "expires_in".into()
            }
        );
    }

    #[test]
    fn metadata_is_sorted_so_order_does_not_matter() {
        let a = form(&format!(
            "{BASE}&start_variables.metadata.b=2&start_variables.metadata.a=1"
        ))
        .unwrap();
        let b = form(&format!(
            "start_variables.metadata.a=1&{BASE}&start_variables.metadata.b=2"
        ))
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.metadata[0].0, "a");
    }

    #[test]
    fn a_request_without_account_email_or_phone_names_no_user() {
        let r = form("country=CO&flow_id=IPF1&redirect_url=https://a.example").unwrap();
        assert!(!r.names_user());
        let r =
            form("country=CO&flow_id=IPF1&redirect_url=https://a.example&phone=%2B573100000000")
                .unwrap();
        assert!(r.names_user());
    }

    #[test]
    fn the_user_tag_is_stable_one_way_and_user_specific() {
        let a = form(BASE).unwrap();
        let tag = a.user_tag();
        assert_eq!(tag.len(), 16);
        assert!(!tag.contains("user-1"));
        assert_eq!(form(BASE).unwrap().user_tag(), tag);
        assert_ne!(
            form(&BASE.replace("user-1", "user-2")).unwrap().user_tag(),
            tag
        );
        let anon = form("country=CO&flow_id=IPF1&redirect_url=https://a.example").unwrap();
        assert_eq!(anon.user_tag(), "-");
    }

    #[test]
    fn json_body_reads_like_the_form() {
        let json = r#"{"account_id":"user-1","redirect_url":"https://shop.example/done","flow_id":"IPF123abc","country":"CO"}"#;
        assert_eq!(
            TokenRequest::from_json(json.as_bytes()).unwrap(),
            form(BASE).unwrap()
        );
    }

    #[test]
    fn json_lists_numbers_and_nested_metadata_are_accepted() {
        let json = r#"{"country":"CO","flow_id":"IPF1","redirect_url":"https://a.example",
            "emails":["a@x.com","b@y.com"],"api_key_version":1,
            "start_variables":{"metadata":{"order":"42"}}}"#;
        let r = TokenRequest::from_json(json.as_bytes()).unwrap();
        assert_eq!(r.emails, vec!["a@x.com", "b@y.com"]);
        assert_eq!(r.api_key_version.as_deref(), Some("1"));
        for whole in ["1.0", "1e0", "0.1e1"] {
            let same = json.replace(
                r#""api_key_version":1"#,
                &format!(r#""api_key_version":{whole}"#),
            );
            assert_eq!(
                TokenRequest::from_json(same.as_bytes()).unwrap(),
                r,
                "{whole}"
            );
        }
        let empty = json.replace(r#""emails":["a@x.com","b@y.com"]"#, r#""emails":[]"#);
        assert!(TokenRequest::from_json(empty.as_bytes())
            .unwrap()
            .emails
            .is_empty());
        assert_eq!(r.metadata, vec![("order".into(), "42".into())]);
        let flat = r#"{"country":"CO","flow_id":"IPF1","redirect_url":"https://a.example",
            "emails":"a@x.com,b@y.com","api_key_version":"1","start_variables.metadata.order":"42"}"#;
        assert_eq!(TokenRequest::from_json(flat.as_bytes()).unwrap(), r);
    }

    #[test]
    fn json_values_of_another_type_than_the_fields_are_refused_naming_the_field() {
        let base = r#""country":"CO","flow_id":"IPF1","redirect_url":"https://a.example""#;
        for (extra, field) in [
            (r#""account_id":0"#, "account_id"),
            (r#""account_id":7"#, "account_id"),
            (r#""phone":573100000000"#, "phone"),
            (r#""document_type":1"#, "document_type"),
            (
                r#""start_variables.metadata.order":42"#,
                "start_variables.metadata.order",
            ),
            (
                r#""start_variables":{"metadata":{"order":42}}"#,
                "start_variables.metadata.order",
            ),
            (r#""emails":["a@x.com",1]"#, "emails"),
            (r#""phones":[null]"#, "phones"),
            (r#""emails":[["a@x.com"]]"#, "emails"),
            (r#""account_id":["u1",2]"#, "account_id"),
            (r#""api_key_version":-1"#, "api_key_version"),
            (r#""api_key_version":1.5"#, "api_key_version"),
        ] {
            let body = format!("{{{base},{extra}}}");
            let err = TokenRequest::from_json(body.as_bytes()).unwrap_err();
            assert_eq!(field_of(err), field, "{body}");
        }
        let flow = br#"{"country":"CO","flow_id":1,"redirect_url":"https://a.example"}"#;
        assert_eq!(
            field_of(TokenRequest::from_json(flow).unwrap_err()),
            "flow_id"
        );
    }

    #[test]
    fn json_metadata_is_written_nested_or_flat_never_both() {
        let base = r#""country":"CO","flow_id":"IPF1","redirect_url":"https://a.example""#;
        for both in [
            r#""start_variables":{"metadata":{"a":"1"}},"start_variables.metadata.b":"2""#,
            r#""start_variables.metadata.a":"1","start_variables":{}"#,
        ] {
            let body = format!("{{{base},{both}}}");
            let err = TokenRequest::from_json(body.as_bytes()).unwrap_err();
            assert_eq!(field_of(err), "start_variables", "{body}");
        }
    }

    #[test]
    fn json_duplicate_keys_are_refused() {
        let json = r#"{"country":"CO","country":"BR","flow_id":"IPF1","redirect_url":"https://a.example"}"#;
        let err = TokenRequest::from_json(json.as_bytes()).unwrap_err();
        assert!(matches!(err, RequestError::DuplicateField { .. }));
    }

    #[test]
    fn json_of_the_wrong_shape_is_a_clear_error() {
        for body in ["[1]", "{", "nope", r#"{"country":"CO"} trailing"#] {
            let err = TokenRequest::from_json(body.as_bytes()).unwrap_err();
            assert!(
                matches!(err, RequestError::MalformedBody { .. }),
                "{body}: {err:?}"
            );
        }
        let err = TokenRequest::from_json(br#"{"country":["CO"]}"#).unwrap_err();
        assert_eq!(field_of(err), "country");
        let err = TokenRequest::from_json(br#"{"country":true}"#).unwrap_err();
        assert_eq!(field_of(err), "country");
    }

    #[test]
    fn upstream_form_sets_key_type_and_grant_and_forwards_every_field() {
        let r = form(&format!(
            "{BASE}&emails=a@x.com&emails=b@y.com&start_variables.metadata.k=v"
        ))
        .unwrap();
        let f = r.upstream_form(ArrayEncoding::Repeat);
        let pairs: Vec<(String, String)> =
            form_urlencoded::parse(f.as_bytes()).into_owned().collect();
        assert_eq!(pairs[0], ("key_type".into(), "web".into()));
        assert_eq!(pairs[1], ("grant".into(), "digital-identity".into()));
        assert!(pairs.contains(&("emails".into(), "a@x.com".into())));
        assert!(pairs.contains(&("emails".into(), "b@y.com".into())));
        assert!(pairs.contains(&("start_variables.metadata.k".into(), "v".into())));
        assert!(pairs.contains(&("redirect_url".into(), "https://shop.example/done".into())));
        let f = r.upstream_form(ArrayEncoding::Comma);
        assert!(f.contains("emails=a%40x.com%2Cb%40y.com"), "{f}");
    }

    #[test]
    fn invalidation_filter_needs_flow_or_account() {
        assert_eq!(
            invalidation_filter("").unwrap_err(),
            RequestError::MissingFilter
        );
        let f = invalidation_filter("flow_id=IPF1").unwrap();
        assert_eq!((f.flow_id.as_deref(), f.account_id), (Some("IPF1"), None));
        assert!(invalidation_filter("account_id=a%20b").is_err());
        assert!(invalidation_filter("user=x").is_err());
        assert!(invalidation_filter("flow_id=a&flow_id=b").is_err());
    }

    #[test]
    fn billing_hub_is_read_from_form_and_json_forwarded_and_checked() {
        let f = form(&format!("{BASE}&billing_hub=hub-1")).unwrap();
        let j = TokenRequest::from_json(
            br#"{"country":"CO","flow_id":"IPF123abc","redirect_url":"https://shop.example/done","account_id":"user-1","billing_hub":"hub-1"}"#,
        )
        .unwrap();
        assert_eq!(f.billing_hub.as_deref(), Some("hub-1"));
        assert_eq!(f, j);
        assert!(f
            .upstream_form(ArrayEncoding::Repeat)
            .contains("&billing_hub=hub-1"));
        for bad in ["", "a%26key_type%3Dbackend", "hub%201"] {
            let err = form(&format!("{BASE}&billing_hub={bad}")).unwrap_err();
            assert_eq!(field_of(err), "billing_hub", "{bad}");
        }
        let err = form(&format!("{BASE}&billing_hub=a&billing_hub=b")).unwrap_err();
        assert!(
            matches!(err, RequestError::DuplicateField { .. }),
            "{err:?}"
        );
    }
}
