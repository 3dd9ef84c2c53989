//! docs/configuration.md and deploy/config.example.toml against the config structs, so neither
//! can drift from the code.
//!
//! The keys are taken from the code two ways, and both must be documented:
//! - a `Config` with every optional value set and one client, serialised: every key path;
//! - for every table, the list of accepted keys that the parser itself gives when it meets an
//!   unknown one (`deny_unknown_fields`), which also finds keys skipped when serialising.
//!
//! A key added to the structs fails these tests until it has its row in docs/configuration.md
//! (as `section.key` in backticks; clients as `clients.id`) and a line, commented out or not, in
//! deploy/config.example.toml. A documented key that no longer exists fails them too.

use std::collections::BTreeSet;
use std::path::PathBuf;

use token_broker::config::Config;

fn read(rel: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A config with one client and the optional master-key file set, parsed from TOML rather than
/// built field by field, so that it keeps compiling as fields are added. Options left unset
/// serialise as `null` and still show up as keys; keys skipped when serialising are found by
/// [`accepted_keys`].
fn full_config() -> Config {
    Config::parse(&format!(
        "[upstream]\napi_key_file = \"/run/secrets/truora-api-key\"\n\
         [webhooks]\nlisten = \"0.0.0.0:8443\"\ntoken_sha256 = \"{0}\"\n\
         [webhooks.tls]\ncert_file = \"/c\"\nkey_file = \"/k\"\n\
         [[clients]]\nid = \"checkout\"\ntoken_sha256 = \"{0}\"\n",
        "0".repeat(64)
    ))
    .expect("a minimal config parses")
}

/// Tables whose keys are the user's own (a map of names): documented as one key.
const MAPS: &[&str] = &["webhooks.events"];

/// Every key path of a serialised value: tables are walked, arrays of tables are walked through
/// their first element under the array's own name (`clients.id`).
fn walk(
    prefix: &str,
    value: &serde_json::Value,
    keys: &mut BTreeSet<String>,
    tables: &mut Vec<String>,
) {
    match value {
        serde_json::Value::Object(_) if MAPS.contains(&prefix) => {
            keys.insert(prefix.to_owned());
        }
        serde_json::Value::Object(map) => {
            if !prefix.is_empty() {
                tables.push(prefix.to_owned());
            }
            for (k, v) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                walk(&path, v, keys, tables);
            }
        }
        serde_json::Value::Array(items)
            if items.iter().all(|i| i.is_object()) && !items.is_empty() =>
        {
            walk(prefix, &items[0], keys, tables);
        }
        _ => {
            keys.insert(prefix.to_owned());
        }
    }
}

/// The keys the parser accepts in a table, from its error on an unknown key. `None` when the
/// table does not refuse unknown keys or the message has no list.
fn accepted_keys(table: &str) -> Option<Vec<String>> {
    const PROBE: &str = "zz_not_a_key";
    let text = if table == "clients" {
        format!("[[clients]]\n{PROBE} = 1\n")
    } else if table.is_empty() {
        format!("{PROBE} = 1\n")
    } else {
        format!("[{table}]\n{PROBE} = 1\n")
    };
    let err = Config::parse(&text).err()?.to_string();
    // Only a struct's refusal lists keys: an enum lists variants ("unknown variant"), a scalar
    // says what type it wanted.
    if !err.contains("unknown field") {
        return None;
    }
    let (_, list) = err.split_once("expected ")?;
    let list = list.lines().next().unwrap_or("");
    let names: Vec<String> = list
        .split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s.to_owned())
        .collect();
    (!names.is_empty() && err.contains(PROBE)).then_some(names)
}

/// Every key path of the configuration, from the code.
fn config_keys() -> BTreeSet<String> {
    let value = serde_json::to_value(full_config()).expect("Config serialises");
    let mut keys = BTreeSet::new();
    let mut tables = Vec::new();
    walk("", &value, &mut keys, &mut tables);
    // An optional table left unset serialises as a bare `null`: when the parser takes it as a
    // table that lists its keys, its keys are documented, not the table's name.
    for key in keys.clone() {
        if accepted_keys(&key).is_some() {
            keys.remove(&key);
            tables.push(key);
        }
    }
    for table in &tables {
        let accepted = accepted_keys(table).unwrap_or_else(|| {
            panic!("[{table}] should refuse unknown keys and list the valid ones")
        });
        for key in accepted {
            let path = format!("{table}.{key}");
            // A key that is itself a table was walked above; only leaves are keys.
            if !tables.contains(&path) {
                keys.insert(path);
            }
        }
    }
    keys
}

/// The `section.key` names in the first column of the tables of docs/configuration.md.
fn documented_rows(doc: &str) -> BTreeSet<String> {
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`').map(|(k, _)| k.to_owned()))
        .filter(|k| {
            k.contains('.')
                && k.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
        })
        .collect()
}

#[test]
fn the_key_list_is_taken_from_the_code() {
    // Guards the walker itself: were it to find nothing, the tests below would prove nothing.
    let keys = config_keys();
    for known in [
        "server.listen",
        "server.shutdown_timeout",
        "upstream.api_key_file",
        "upstream.array_encoding",
        "cache.min_remaining",
        "clients.id",
        "clients.token_sha256",
    ] {
        assert!(keys.contains(known), "{known} not found in {keys:?}");
    }
    assert!(
        keys.iter().all(|k| k.contains('.')),
        "a key outside any table: {keys:?}"
    );
    // And the parser's own list of accepted keys is read, not silently empty.
    let upstream = accepted_keys("upstream").expect("[upstream] lists its keys");
    assert!(upstream.iter().any(|k| k == "api_key_file"), "{upstream:?}");
}

#[test]
fn every_config_key_is_documented_in_configuration_md() {
    let doc = read("docs/configuration.md");
    let rows = documented_rows(&doc);
    let missing: Vec<_> = config_keys()
        .into_iter()
        .filter(|k| !rows.contains(k))
        .collect();
    assert!(
        missing.is_empty(),
        "keys without a row in docs/configuration.md (add `| `section.key` | type | default | meaning | rule |`): {missing:?}"
    );
}

#[test]
fn every_documented_key_exists() {
    let keys = config_keys();
    let stale: Vec<_> = documented_rows(&read("docs/configuration.md"))
        .into_iter()
        .filter(|k| !keys.contains(k))
        .collect();
    assert!(
        stale.is_empty(),
        "docs/configuration.md documents keys the code does not have: {stale:?}"
    );
}

/// `section.key` for every `key = ...` line of a TOML file, commented out or not, under the
/// `[section]` or `[[section]]` header above it (also commented out or not).
fn example_keys(text: &str) -> BTreeSet<String> {
    let mut section = String::new();
    let mut keys = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim_start_matches('#').trim();
        if let Some(header) = line.strip_prefix('[') {
            let header = header.trim_start_matches('[');
            if let Some((name, _)) = header.split_once(']') {
                section = name.trim().to_owned();
            }
            continue;
        }
        if let Some((key, _)) = line.split_once('=') {
            let key = key.trim();
            if !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                keys.insert(format!("{section}.{key}"));
            }
        }
    }
    keys
}

#[test]
fn the_example_config_shows_every_key() {
    let example = example_keys(&read("deploy/config.example.toml"));
    let missing: Vec<_> = config_keys()
        .into_iter()
        .filter(|k| !example.contains(k))
        .collect();
    assert!(
        missing.is_empty(),
        "deploy/config.example.toml has no line (commented out or not) for: {missing:?}"
    );
}

#[test]
fn every_environment_variable_of_the_command_line_is_documented() {
    use clap::CommandFactory;
    let doc = read("docs/configuration.md");
    let cli = token_broker::app::cli::Cli::command();
    let mut vars = vec![
        token_broker::config::API_KEY_ENV.to_owned(),
        "RUST_LOG".to_owned(),
    ];
    for sub in cli.get_subcommands() {
        for arg in sub.get_arguments() {
            if let Some(env) = arg.get_env() {
                vars.push(env.to_string_lossy().into_owned());
            }
        }
    }
    assert!(
        vars.len() > 2,
        "no environment variable found on the command line"
    );
    for var in vars {
        assert!(
            doc.contains(&format!("| `{var}` |")),
            "{var} has no row in the environment table of docs/configuration.md"
        );
    }
}
