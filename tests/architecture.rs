//! The layering of `src/`, written down where a newcomer reads it, and held.
//!
//! A request flows from the composition root through the HTTP side and auth to the issuance
//! core, then to the cache and Truora; the leaves at the bottom are the vocabulary everyone
//! shares. Imports run the same way, downwards only:
//!
//! ```text
//!   app                         the composition root: knows every room
//!    └─ server                  the HTTP side: listeners, TLS, tower stack, handlers, admin
//!        └─ auth                who the caller is
//!            └─ passthrough     Truora's other endpoints, relayed
//!                └─ issuance    the core: request, policy, key, issuer, answer (no HTTP)
//!                    ├─ cache       local tier, Redis tier
//!                    └─ upstream    Truora's client and the guard around it
//!   sandbox                     the fake Truora: only the composition root (and tests) use it
//!   invariants                  the fuzz targets' checks: the core, the upstream reader, the
//!                               service-account token reader
//!   leaves: wire, logging, config, telemetry, audit, then error, metrics, breaker, rate, truora,
//!   secret
//! ```
//!
//! [`ALLOWED`] is the whole rule: each room with the rooms it may import. Every `crate::` path
//! (and `super::` path that leaves its room) in `src/`, outside comments, strings and test
//! modules, must be on its room's line. A change that needs another arrow moves the type to
//! where it belongs rather than adding one against the flow.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The leaves every room may use. They import only other leaves, as their own lines say.
const LEAVES: &[&str] = &[
    "wire",
    "logging",
    "config",
    "telemetry",
    "audit",
    "error",
    "metrics",
    "breaker",
    "rate",
    "truora",
    "secret",
];

/// Each room of `src/` and the rooms it may import; `LEAVES` stands for all of them.
const ALLOWED: &[(&str, &[&str])] = &[
    // The composition root: builds everything, so it may name everything.
    (
        "app",
        &[
            "server",
            "auth",
            "passthrough",
            "webhooks",
            "issuance",
            "cache",
            "upstream",
            "sandbox",
            "LEAVES",
        ],
    ),
    // The HTTP side turns requests into calls on auth, the pass-through and the core, and reads
    // the upstream guard's state for the admin endpoints.
    (
        "server",
        &[
            "auth",
            "passthrough",
            "webhooks",
            "issuance",
            "upstream",
            "LEAVES",
        ],
    ),
    // A caller carries its policy (the core's) and its pass-through allowlist. Not upstream.
    ("auth", &["passthrough", "issuance", "LEAVES"]),
    // Relays with the upstream client; keeps results in a cache of the cache room's kind.
    ("passthrough", &["issuance", "cache", "upstream", "LEAVES"]),
    // Deliveries end processes through the core; no HTTP server types, no auth.
    ("webhooks", &["issuance", "cache", "LEAVES"]),
    // The core: no HTTP side (not even the wire types), no auth, no sandbox.
    (
        "issuance",
        &[
            "cache",
            "upstream",
            "logging",
            "config",
            "telemetry",
            "audit",
            "error",
            "metrics",
            "breaker",
            "rate",
            "truora",
            "secret",
        ],
    ),
    ("cache", &["LEAVES"]),
    ("upstream", &["LEAVES"]),
    ("sandbox", &["secret", "truora"]),
    // The fuzz targets' checks call the readers of untrusted input where they live.
    (
        "invariants",
        &[
            "auth", "webhooks", "issuance", "upstream", "config", "audit", "secret", "truora",
        ],
    ),
    // Leaves, from the top of the bottom floor down.
    ("wire", &["error", "metrics"]),
    ("logging", &["metrics"]),
    ("config", &["truora", "secret"]),
    // Traces: built from its config section; spans and headers, no domain type.
    ("telemetry", &["config"]),
    // The trail is built from its config section and writes hex through `secret`.
    ("audit", &["config", "secret"]),
    ("error", &[]),
    ("metrics", &[]),
    ("breaker", &[]),
    ("rate", &[]),
    ("truora", &[]),
    ("secret", &[]),
];

/// External crates the core may not use: it knows nothing of HTTP servers or connections.
const NOT_IN_THE_CORE: &[&str] = &[
    "hyper",
    "hyper_util",
    "hyper_rustls",
    "http_body",
    "http_body_util",
    "tower",
    "tokio_rustls",
];

/// The only external crate `metrics` may use (besides `std`).
const METRICS_MAY_USE: &[&str] = &["prometheus"];

fn allowed(room: &str) -> BTreeSet<&'static str> {
    let (_, list) = ALLOWED.iter().find(|(r, _)| *r == room).unwrap_or_else(|| {
        panic!("room `{room}` of src/ is not in ALLOWED: place it in the layering")
    });
    list.iter()
        .flat_map(|r| {
            if *r == "LEAVES" {
                LEAVES.to_vec()
            } else {
                vec![*r]
            }
        })
        .filter(|r| *r != room)
        .collect()
}

/// One source file: its module path and its code with comments, strings and test modules gone.
struct Source {
    path: PathBuf,
    module: Vec<String>,
    code: String,
}

fn sources() -> Vec<Source> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&root, &mut files);
    assert!(
        files.len() > 30,
        "found only {} files under src/",
        files.len()
    );
    files
        .into_iter()
        .filter(|p| {
            !matches!(
                p.file_name().and_then(|n| n.to_str()),
                Some("lib.rs" | "main.rs")
            ) || p.parent() != Some(&root)
        })
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            Source {
                module: module_path(&root, &path),
                code: without_test_modules(&strip(&text)),
                path,
            }
        })
        .collect()
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            walk(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/a/b/mod.rs` and `src/a/b.rs` are `a::b`.
fn module_path(root: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(root).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The code without comments and without the contents of string and char literals.
fn strip(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < b.len() {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'r' | b'b' if raw_string_start(b, i).is_some() => {
                let (hashes, open) = raw_string_start(b, i).unwrap();
                let close: Vec<u8> = std::iter::once(b'"')
                    .chain(std::iter::repeat_n(b'#', hashes))
                    .collect();
                i = open + 1;
                while i < b.len() && !b[i..].starts_with(&close) {
                    i += 1;
                }
                i += close.len();
                out.push_str("\"\"");
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                out.push_str("\"\"");
            }
            b'\'' => {
                // A char literal ('x', '\n', '\''), or a lifetime ('a), which is kept.
                if b.get(i + 1) == Some(&b'\\') {
                    i += 2;
                    while i < b.len() && b[i] != b'\'' {
                        i += 1;
                    }
                    i += 1;
                    out.push_str("' '");
                } else {
                    let c = text[i + 1..].chars().next().map_or(1, char::len_utf8);
                    if b.get(i + 1 + c) == Some(&b'\'') {
                        i += 2 + c;
                        out.push_str("' '");
                    } else {
                        out.push('\'');
                        i += 1;
                    }
                }
            }
            _ => {
                let c = text[i..].chars().next().unwrap();
                out.push(c);
                i += c.len_utf8();
            }
        }
    }
    out
}

/// `r"`, `r#"`, `br"`, `br#"` at `i` (and not the end of an identifier): the number of `#`s
/// and the index of the opening quote.
fn raw_string_start(b: &[u8], i: usize) -> Option<(usize, usize)> {
    if i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_') {
        return None;
    }
    let mut j = i;
    if b[j] == b'b' {
        j += 1;
    }
    if b.get(j) != Some(&b'r') {
        return None;
    }
    j += 1;
    let hashes = b[j..].iter().take_while(|c| **c == b'#').count();
    (b.get(j + hashes) == Some(&b'"')).then_some((hashes, j + hashes))
}

/// The code without `#[cfg(test)] mod name { ... }` blocks: what tests use is not the layering.
fn without_test_modules(code: &str) -> String {
    let mut out = code.to_owned();
    while let Some(start) = out.find("#[cfg(test)]") {
        let rest = &out[start + "#[cfg(test)]".len()..];
        let trimmed = rest.trim_start();
        if !trimmed.starts_with("mod ") {
            // A test-only item that is not a module: blank the attribute, keep the item.
            out.replace_range(start..start + "#[cfg(test)]".len(), "");
            continue;
        }
        let open = start
            + "#[cfg(test)]".len()
            + (rest.len() - trimmed.len())
            + trimmed.find('{').unwrap();
        let mut depth = 0;
        let mut end = open;
        for (k, c) in out[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + k + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        out.replace_range(start..end, "");
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The rooms a file's code names outside its own: `crate::x`, `crate::{x, y::z}`, and `super::`
/// paths that climb out of the file's room.
fn rooms_named(src: &Source) -> BTreeSet<String> {
    let code = &src.code;
    let mut found = BTreeSet::new();
    let own = src.module[0].clone();
    let mut at = 0;
    while let Some(k) = code[at..].find("crate::") {
        let start = at + k;
        at = start + "crate::".len();
        if code[..start]
            .chars()
            .next_back()
            .is_some_and(|c| is_ident(c) || c == ':')
        {
            continue; // `$crate::`, `my_crate::`, `a::crate::`
        }
        let rest = &code[at..];
        if let Some(group) = rest.strip_prefix('{') {
            let body = &group[..group.find('}').unwrap_or(group.len())];
            for item in body.split(',') {
                let name: String = item.trim().chars().take_while(|c| is_ident(*c)).collect();
                if !name.is_empty() && name != "self" {
                    found.insert(name);
                }
            }
        } else {
            let name: String = rest.chars().take_while(|c| is_ident(*c)).collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    let mut at = 0;
    while let Some(k) = code[at..].find("super::") {
        let start = at + k;
        if code[..start]
            .chars()
            .next_back()
            .is_some_and(|c| is_ident(c) || c == ':')
        {
            at = start + 1;
            continue;
        }
        let mut climbs = 0;
        let mut rest = &code[start..];
        while let Some(r) = rest.strip_prefix("super::") {
            climbs += 1;
            rest = r;
        }
        at = start + climbs * "super::".len();
        if climbs >= src.module.len() {
            let name: String = rest.chars().take_while(|c| is_ident(*c)).collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found.remove(&own);
    found
}

/// External crates the code names: `name::` at the start of a path, for names that are
/// dependencies in Cargo.toml.
fn crates_named(code: &str) -> BTreeSet<String> {
    let deps = dependencies();
    let mut found = BTreeSet::new();
    for (k, _) in code.match_indices("::") {
        let before = &code[..k];
        let name: String = before
            .chars()
            .rev()
            .take_while(|c| is_ident(*c))
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let head = &before[..before.len() - name.len()];
        let starts_path = !head.ends_with("::") && !head.chars().next_back().is_some_and(is_ident);
        if starts_path && deps.contains(&name) {
            found.insert(name);
        }
    }
    found
}

/// The names of `[dependencies]` as code spells them.
fn dependencies() -> BTreeSet<String> {
    let toml =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    let section = toml
        .split("\n[dependencies]\n")
        .nth(1)
        .and_then(|s| s.split("\n[").next())
        .unwrap();
    section
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(name, _)| name.trim())
        .filter(|name| !name.is_empty() && !name.starts_with('#'))
        .map(|name| name.replace('-', "_"))
        .collect()
}

fn rooms() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for src in sources() {
        graph
            .entry(src.module[0].clone())
            .or_default()
            .extend(rooms_named(&src));
    }
    graph
}

#[test]
fn every_import_follows_the_layering() {
    let mut against = Vec::new();
    for src in sources() {
        let room = &src.module[0];
        let may = allowed(room);
        for named in rooms_named(&src) {
            if !may.contains(named.as_str()) {
                against.push(format!(
                    "{} ({room}) imports `{named}`: {room} may import only {may:?}",
                    src.path.display()
                ));
            }
        }
    }
    assert!(
        against.is_empty(),
        "imports against the layering (see the top of tests/architecture.rs):\n{}",
        against.join("\n")
    );
}

#[test]
fn every_room_of_src_is_placed_in_the_layering() {
    for room in rooms().keys() {
        allowed(room);
    }
}

#[test]
fn no_two_rooms_import_each_other_even_through_others() {
    let graph = rooms();
    // Depth-first search for a way back to where it started.
    fn reaches(
        graph: &BTreeMap<String, BTreeSet<String>>,
        from: &str,
        to: &str,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in graph.get(from).into_iter().flatten() {
            if next == to || (seen.insert(next.clone()) && reaches(graph, next, to, seen)) {
                return true;
            }
        }
        false
    }
    for room in graph.keys() {
        assert!(
            !reaches(&graph, room, room, &mut BTreeSet::new()),
            "`{room}` is in an import circle: {graph:#?}"
        );
    }
    // The rule itself has no circle either, so following it can never make one.
    let rule: BTreeMap<String, BTreeSet<String>> = ALLOWED
        .iter()
        .map(|(r, _)| {
            (
                r.to_string(),
                allowed(r).into_iter().map(String::from).collect(),
            )
        })
        .collect();
    for room in rule.keys() {
        assert!(
            !reaches(&rule, room, room, &mut BTreeSet::new()),
            "ALLOWED lets `{room}` import itself through others"
        );
    }
}

#[test]
fn the_core_knows_nothing_of_http_servers_the_sandbox_or_auth() {
    let may = allowed("issuance");
    for forbidden in ["server", "wire", "auth", "passthrough", "sandbox", "app"] {
        assert!(!may.contains(forbidden), "{forbidden}");
    }
    for src in sources().iter().filter(|s| s.module[0] == "issuance") {
        let crates = crates_named(&src.code);
        for c in NOT_IN_THE_CORE {
            assert!(!crates.contains(*c), "{} uses `{c}`", src.path.display());
        }
    }
}

#[test]
fn only_the_composition_root_imports_the_sandbox() {
    for (room, named) in rooms() {
        if named.contains("sandbox") {
            assert_eq!(room, "app", "{room} imports the sandbox");
        }
    }
}

#[test]
fn metrics_imports_only_prometheus_and_std() {
    for src in sources().iter().filter(|s| s.module[0] == "metrics") {
        assert!(rooms_named(src).is_empty(), "{:?}", rooms_named(src));
        let crates = crates_named(&src.code);
        let extra: Vec<_> = crates
            .iter()
            .filter(|c| !METRICS_MAY_USE.contains(&c.as_str()))
            .collect();
        assert!(extra.is_empty(), "metrics uses {extra:?}");
    }
}

#[test]
fn auth_does_not_import_upstream() {
    assert!(!allowed("auth").contains("upstream"));
    assert!(!rooms()
        .get("auth")
        .is_some_and(|named| named.contains("upstream")));
}

#[test]
fn no_source_file_is_over_700_lines_outside_its_tests() {
    for src in sources() {
        let lines = src.code.lines().count();
        assert!(
            lines <= 750,
            "{} has {lines} lines outside its tests: split it by concern",
            src.path.display()
        );
    }
}

/// The reader itself: what it must find, and what it must not take for an import.
#[test]
fn the_reader_finds_imports_and_nothing_in_comments_strings_or_tests() {
    let text = r###"
        use crate::{alpha, beta::Gamma, self};
        use crate::delta::epsilon;
        fn f() { crate::zeta::run(); let s = "crate::eta"; let r = r#"crate::theta"#; }
        // crate::iota
        /* crate::kappa /* nested */ crate::lambda */
        fn g<'a>(x: &'a str) -> char { let _ = super::super::mu::x; '"' }
        #[cfg(test)]
        mod tests { use crate::nu; }
        fn h() { my_crate::xi(); }
    "###;
    let src = Source {
        path: "x.rs".into(),
        module: vec!["room".into(), "inner".into()],
        code: without_test_modules(&strip(text)),
    };
    let named: Vec<String> = rooms_named(&src).into_iter().collect();
    assert_eq!(named, ["alpha", "beta", "delta", "mu", "zeta"]);
    assert!(
        crates_named("use http::Method; let x = a::http::y; tokio::spawn(f);").contains("tokio")
    );
    assert!(!crates_named("let x = a::http::y;").contains("http"));
}

/// The rooms `src/lib.rs` declares, the rows of its module table and the rows of the tables in
/// docs/architecture.md are one and the same list.
#[test]
fn the_module_tables_of_lib_rs_and_the_architecture_doc_match_the_tree() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = std::fs::read_to_string(root.join("src/lib.rs")).unwrap();
    let declared: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';').to_owned())
        .collect();
    let in_lib_table: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("//! | [`"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect();
    let doc = std::fs::read_to_string(root.join("docs/architecture.md")).unwrap();
    let in_doc_tables: BTreeSet<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect();
    let rooms: BTreeSet<String> = rooms().keys().cloned().collect();
    assert_eq!(
        declared, rooms,
        "src/lib.rs declares other modules than src/ holds"
    );
    assert_eq!(in_lib_table, rooms, "src/lib.rs's table");
    assert_eq!(in_doc_tables, rooms, "docs/architecture.md's tables");
    let placed: BTreeSet<String> = ALLOWED.iter().map(|(r, _)| r.to_string()).collect();
    assert_eq!(placed, rooms, "ALLOWED");
}
