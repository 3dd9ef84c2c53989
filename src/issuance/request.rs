//! The caller's token request as the core works with it: validated, borrowing from the body
//! where it can, and walked in one canonical order ([`TokenRequest::visit`]) from which both the
//! cache key and the form sent to Truora are built, so the two cannot disagree.
//!
//! Field names are Truora's (`country`, `flow_id`, `redirect_url`, ...). The broker sets
//! `key_type=web` and `grant=digital-identity` itself. Reading a body into a request is
//! [`super::parse`]'s.

use std::borrow::Cow;

use crate::audit::{Identifier, TagKey, UserTags};
use crate::truora::{ArrayEncoding, GRANT, KEY_TYPE, METADATA_PREFIX};

/// A validated token request. Lists keep the caller's order; metadata is sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenRequest<'a> {
    /// One of [`crate::truora::COUNTRIES`].
    pub country: &'static str,
    /// The dashboard flow, `[A-Za-z0-9_-]{1,64}`.
    pub flow_id: Cow<'a, str>,
    /// Absolute `https` URL the user lands on afterwards.
    pub redirect_url: Cow<'a, str>,
    /// One of [`crate::truora::DOCUMENT_TYPES`].
    pub document_type: Option<&'static str>,
    /// The end user's id at Truora, `[a-zA-Z0-9_.-]{1,128}`.
    pub account_id: Option<Cow<'a, str>>,
    /// The user's email addresses.
    pub emails: Vec<Cow<'a, str>>,
    /// The user's phone in E.164 (`phone`).
    pub phone: Option<Cow<'a, str>>,
    /// The user's phones in E.164 (`phones`).
    pub phones: Vec<Cow<'a, str>>,
    /// Truora's `api_key_version`, digits.
    pub api_key_version: Option<Cow<'a, str>>,
    /// Truora's `billing_hub` (separate counters and billing), as sent or as pinned by the
    /// caller's `[[clients]] billing_hub`.
    pub billing_hub: Option<Cow<'a, str>>,
    /// `start_variables.metadata.<name>` pairs, sorted by name.
    pub metadata: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

/// One forwarded field, in canonical order, as [`TokenRequest::visit`] yields it.
#[derive(Debug, Clone, Copy)]
pub enum Field<'r> {
    /// A single-valued field.
    One(&'r str, &'r str),
    /// A list field and its elements.
    List(&'r str, &'r [Cow<'r, str>]),
    /// A metadata entry: its name without the prefix, and its value.
    Metadata(&'r str, &'r str),
}

impl<'a> TokenRequest<'a> {
    /// The same request, owning its strings.
    pub fn into_owned(self) -> TokenRequest<'static> {
        fn own(c: Cow<'_, str>) -> Cow<'static, str> {
            Cow::Owned(c.into_owned())
        }
        TokenRequest {
            country: self.country,
            flow_id: own(self.flow_id),
            redirect_url: own(self.redirect_url),
            document_type: self.document_type,
            account_id: self.account_id.map(own),
            emails: self.emails.into_iter().map(own).collect(),
            phone: self.phone.map(own),
            phones: self.phones.into_iter().map(own).collect(),
            api_key_version: self.api_key_version.map(own),
            billing_hub: self.billing_hub.map(own),
            metadata: self
                .metadata
                .into_iter()
                .map(|(k, v)| (own(k), own(v)))
                .collect(),
        }
    }

    /// The identifiers of the user this request names, in canonical order: `account_id`, each
    /// email, `phone`, each of `phones`. Empty when it names none.
    pub fn identifiers(&self) -> impl Iterator<Item = Identifier<'_>> {
        let account = self.account_id.as_deref().map(Identifier::AccountId);
        let emails = self.emails.iter().map(|e| Identifier::Email(e));
        let phone = self.phone.as_deref().map(Identifier::Phone);
        let phones = self.phones.iter().map(|p| Identifier::Phone(p));
        account.into_iter().chain(emails).chain(phone).chain(phones)
    }

    /// The keyed tags of the user this request names, for the audit trail (see
    /// [`crate::audit::tag`]): one per identifier, none when it names no user.
    pub fn user_tags(&self, key: &TagKey) -> UserTags {
        UserTags::of(key, self.identifiers())
    }

    /// The tag of the first identifier under a fixed key, `-` when none: what the parser's
    /// tests check of the tags (stable, one-way, user-specific).
    #[cfg(test)]
    pub(crate) fn user_tag(&self) -> String {
        let key = TagKey::new(&[0x5a; 32], crate::audit::KeySource::File);
        self.user_tags(&key)
            .tags
            .first()
            .map_or_else(|| "-".to_owned(), ToString::to_string)
    }

    /// True when the request names its user (account_id, an email or a phone). Only such
    /// requests are cached: without a user, two users would share one token.
    pub fn names_user(&self) -> bool {
        self.account_id.is_some()
            || !self.emails.is_empty()
            || self.phone.is_some()
            || !self.phones.is_empty()
    }

    /// Every forwarded field in one fixed order (the caller's order does not matter). The cache
    /// key and the upstream form are both built from this, so they cannot disagree.
    pub fn visit(&self, mut f: impl FnMut(Field<'_>)) {
        f(Field::One("country", self.country));
        f(Field::One("flow_id", &self.flow_id));
        f(Field::One("redirect_url", &self.redirect_url));
        if let Some(v) = self.document_type {
            f(Field::One("document_type", v));
        }
        if let Some(v) = &self.account_id {
            f(Field::One("account_id", v));
        }
        if !self.emails.is_empty() {
            f(Field::List("emails", &self.emails));
        }
        if let Some(v) = &self.phone {
            f(Field::One("phone", v));
        }
        if !self.phones.is_empty() {
            f(Field::List("phones", &self.phones));
        }
        if let Some(v) = &self.api_key_version {
            f(Field::One("api_key_version", v));
        }
        if let Some(v) = &self.billing_hub {
            f(Field::One("billing_hub", v));
        }
        for (k, v) in &self.metadata {
            f(Field::Metadata(k, v));
        }
    }

    /// The form body for Truora's `POST /v1/api-keys`, with `key_type` and `grant` set by us.
    pub fn upstream_form(&self, encoding: ArrayEncoding) -> String {
        let mut form = form_urlencoded::Serializer::new(String::with_capacity(256));
        form.append_pair("key_type", KEY_TYPE);
        form.append_pair("grant", GRANT);
        self.visit(|field| match field {
            Field::One(name, value) => {
                form.append_pair(name, value);
            }
            Field::List(name, values) => match encoding {
                ArrayEncoding::Repeat => {
                    for v in values {
                        form.append_pair(name, v);
                    }
                }
                ArrayEncoding::Comma => {
                    form.append_pair(name, &values.join(","));
                }
            },
            Field::Metadata(name, value) => {
                form.append_pair(&format!("{METADATA_PREFIX}{name}"), value);
            }
        });
        form.finish()
    }
}

/// A form body parsed and owned: the request the unit tests of the core start from.
#[cfg(test)]
pub(crate) fn owned_form(body: &str) -> TokenRequest<'static> {
    TokenRequest::from_form(body.as_bytes())
        .unwrap()
        .into_owned()
}
