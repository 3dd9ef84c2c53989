//! A TOML file that does not parse, said by line, column and key, never by the line's text or
//! the value's: a typo on the line of a Redis URL must not print its password in
//! `check-config`, the log of a reload, or the answer of `POST /admin/reload`.

use std::fmt;

/// Where and why the file does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line of the fault, when the parser said where.
    pub line: Option<usize>,
    /// 1-based column (in characters) of the fault.
    pub column: Option<usize>,
    /// The key at fault as the file spells it (`cache.shared.url`, `clients[1].id`), when the
    /// fault is on a `key = value` line.
    pub key: Option<String>,
    /// The parser's reason, with any string value it quoted taken out.
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(line), Some(column)) => write!(f, "line {line}, column {column}")?,
            _ => f.write_str("somewhere in the file")?,
        }
        if let Some(key) = &self.key {
            write!(f, ", key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ParseError {}

impl ParseError {
    /// The error `toml` gave for `text`, told without quoting `text`.
    pub fn of(text: &str, e: &toml::de::Error) -> Self {
        let at = e.span().map(|s| s.start.min(text.len()));
        let (line, column) = match at {
            Some(at) => {
                let before = &text[..floor_char_boundary(text, at)];
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                (Some(line), Some(column))
            }
            None => (None, None),
        };
        Self {
            key: line.and_then(|l| key_at(text, l)),
            line,
            column,
            message: redacted(e.message()),
        }
    }
}

fn floor_char_boundary(text: &str, mut at: usize) -> usize {
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// The `key` of a `key = value` line (bare or dotted keys only), under the table header above it:
/// `[cache.shared]` and `url` make `cache.shared.url`; the second `[[clients]]` makes
/// `clients[1]`.
fn key_at(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let here = lines.get(line - 1)?;
    let key = here
        .split_once('=')
        .map(|(k, _)| k.trim())
        .filter(|k| bare(k))?;
    let mut table = String::new();
    for (i, l) in lines[..line - 1].iter().enumerate().rev() {
        let l = l.trim();
        if let Some(name) = l
            .strip_prefix("[[")
            .and_then(|r| r.split_once("]]"))
            .map(|(n, _)| n.trim())
        {
            if !bare(name) {
                return Some(key.to_owned());
            }
            let header = format!("[[{name}]]");
            let index = lines[..i]
                .iter()
                .filter(|p| p.trim().starts_with(&header))
                .count();
            table = format!("{name}[{index}]");
            break;
        }
        if let Some(name) = l
            .strip_prefix('[')
            .and_then(|r| r.split_once(']'))
            .map(|(n, _)| n.trim())
        {
            if !bare(name) {
                return Some(key.to_owned());
            }
            table = name.to_owned();
            break;
        }
    }
    Some(if table.is_empty() {
        key.to_owned()
    } else {
        format!("{table}.{key}")
    })
}

/// Bare or dotted TOML keys: `a`, `a.b_c-1`.
fn bare(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// The parser's message on one line, with every string it quoted (`string "..."`, as serde
/// names a value of the wrong type or shape) replaced: that string is the file's text.
fn redacted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find("string \"") {
        out.push_str(&rest[..i]);
        out.push_str("string (value not shown)");
        let quoted = &rest[i + "string \"".len()..];
        let mut end = quoted.len();
        let mut escaped = false;
        for (k, c) in quoted.char_indices() {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => {
                    end = k + 1;
                    break;
                }
                _ => {}
            }
        }
        rest = &quoted[end..];
    }
    out.push_str(rest);
    out.split('\n')
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        #[serde(default)]
        port: Option<u16>,
        #[serde(default)]
        section: Option<Section>,
        #[serde(default)]
        items: Vec<Section>,
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Section {
        #[serde(default)]
        url: Option<String>,
        #[serde(default)]
        n: Option<u32>,
    }

    fn error(text: &str) -> ParseError {
        let e = toml::from_str::<Doc>(text).unwrap_err();
        ParseError::of(text, &e)
    }

    #[test]
    fn a_broken_line_is_told_by_line_column_and_key_never_by_its_text() {
        let text = "port = 1\n[section]\nurl = \"redis://:hunter2@h\" junk\n";
        let e = error(text);
        assert_eq!((e.line, e.key.as_deref()), (Some(3), Some("section.url")));
        let shown = e.to_string();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.starts_with("line 3, column "), "{shown}");
    }

    #[test]
    fn a_value_of_the_wrong_type_is_not_quoted() {
        for text in [
            "[section]\nn = \"hunter2 \\\" still secret\"\n",
            "port = \"hunter2\"\n",
        ] {
            let shown = error(text).to_string();
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("value not shown"), "{shown}");
        }
    }

    #[test]
    fn an_unterminated_string_does_not_echo_the_line() {
        let shown = error("[section]\nurl = \"redis://:hunter2@h\n").to_string();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("line 2"), "{shown}");
    }

    #[test]
    fn array_tables_are_counted_and_unknown_keys_named() {
        let e = error("[[items]]\nn = 1\n[[items]]\nzz = 2\n");
        assert_eq!(e.key.as_deref(), Some("items[1].zz"));
        assert!(e.message.contains("unknown field `zz`"), "{}", e.message);
    }
}
