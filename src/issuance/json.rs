//! The JSON body's reader for [`super::parse`]: one object whose keys keep their order (and
//! their duplicates, so that they can be refused), whose strings borrow from the body when they
//! hold no escapes, and whose values say their shape (a string, a whole number, a list of
//! strings, a list of anything else, an object, anything else) so that the parser can refuse a
//! value of the wrong type naming its field. Lists and objects are bounded as they are read.

use std::borrow::Cow;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::parse::MAX_LIST_LEN;
use crate::error::RequestError;

pub(super) fn json_error(e: serde_json::Error) -> RequestError {
    let what = match e.classify() {
        serde_json::error::Category::Data => "must be a JSON object of string fields",
        serde_json::error::Category::Eof => "JSON ends early",
        serde_json::error::Category::Syntax | serde_json::error::Category::Io => "not valid JSON",
    };
    RequestError::MalformedBody {
        reason: format!("{what} (line {}, column {})", e.line(), e.column()).into(),
    }
}

/// A JSON string that borrows from the body when it holds no escapes.
pub(super) struct CowStr<'a>(pub(super) Cow<'a, str>);

impl<'de> Deserialize<'de> for CowStr<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CowStr<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// A JSON value as the token request reads it: a field is refused (naming it) unless its value
/// has the shape the field takes.
pub(super) enum JsonValue<'a> {
    Str(CowStr<'a>),
    /// A non-negative whole number (`api_key_version` only).
    Number(u64),
    List(Vec<CowStr<'a>>),
    /// A list holding something other than strings.
    NotStrings,
    Object(Vec<(CowStr<'a>, JsonValue<'a>)>),
    Other,
}

/// A JSON object with its keys in order and duplicates kept, so they can be refused.
pub(super) struct JsonObject<'a>(pub(super) Vec<(CowStr<'a>, JsonValue<'a>)>);

impl<'de> Deserialize<'de> for JsonObject<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match JsonValue::deserialize(d)? {
            JsonValue::Object(entries) => Ok(JsonObject(entries)),
            _ => Err(de::Error::custom("expected an object")),
        }
    }
}

impl<'de> Deserialize<'de> for JsonValue<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = JsonValue<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string, a number, a list of strings or an object")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(JsonValue::Str(CowStr(Cow::Borrowed(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(JsonValue::Str(CowStr(Cow::Owned(v.to_owned()))))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(JsonValue::Str(CowStr(Cow::Owned(v))))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(JsonValue::Number(v))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(JsonValue::Other)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                // JSON has one kind of number: `263.0` and `2.63e2` are the whole number 263,
                // as JSON Schema's `integer` says.
                Ok(if v.fract() == 0.0 && (0.0..=9.0e15).contains(&v) {
                    JsonValue::Number(v as u64)
                } else {
                    JsonValue::Other
                })
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(JsonValue::Other)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(JsonValue::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let (mut items, mut strings) = (Vec::new(), true);
                while let Some(item) = seq.next_element::<JsonValue<'de>>()? {
                    if items.len() >= MAX_LIST_LEN {
                        return Err(de::Error::custom("list too long"));
                    }
                    match item {
                        JsonValue::Str(s) => items.push(s),
                        _ => strings = false,
                    }
                }
                Ok(if strings {
                    JsonValue::List(items)
                } else {
                    JsonValue::NotStrings
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<CowStr<'de>>()? {
                    if entries.len() >= 64 {
                        return Err(de::Error::custom("too many fields"));
                    }
                    let value = map.next_value::<JsonValue<'de>>()?;
                    entries.push((key, value));
                }
                Ok(JsonValue::Object(entries))
            }
        }
        d.deserialize_any(V)
    }
}
