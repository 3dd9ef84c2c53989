//! `token-broker --version` and the help of every command, as operators read them.

use std::path::Path;
use std::process::Command;

use clap::CommandFactory;
use token_broker::app::cli::Cli;

const BIN: &str = env!("CARGO_BIN_EXE_token-broker");

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("TOKEN_BROKER_CONFIG")
        .env_remove("TOKEN_BROKER_LOG_FORMAT")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The commit the build should carry: what build.rs computes, computed again here.
fn expected_commit() -> String {
    if let Some(c) = option_env!("TOKEN_BROKER_COMMIT").filter(|c| !c.trim().is_empty()) {
        return c.trim().to_owned();
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(dir)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "--show-toplevel"]) {
        Some(top) if Path::new(&top).canonicalize().ok() == dir.canonicalize().ok() => {
            git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into())
        }
        _ => "unknown".into(),
    }
}

#[test]
fn version_prints_the_version_and_the_commit() {
    let (code, out) = run(&["--version"]);
    assert_eq!(code, 0);
    assert_eq!(
        out,
        format!(
            "token-broker {} (commit {})\n",
            env!("CARGO_PKG_VERSION"),
            expected_commit()
        )
    );
}

#[test]
fn every_command_and_option_has_help() {
    let cli = Cli::command();
    let subcommands: Vec<_> = cli.get_subcommands().collect();
    assert_eq!(
        subcommands.len(),
        4,
        "serve, demo, check-config, hash-secret"
    );
    for sub in subcommands {
        let name = sub.get_name();
        assert!(sub.get_about().is_some(), "{name}: no summary");
        assert!(
            sub.get_long_about().is_some(),
            "{name}: no long description for --help"
        );
        for arg in sub.get_arguments() {
            assert!(
                arg.get_help().is_some(),
                "{name} --{}: no help",
                arg.get_id()
            );
        }
    }
}

#[test]
fn each_help_runs_and_names_what_operators_need() {
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--help"],
            &[
                "serve",
                "demo",
                "check-config",
                "hash-secret",
                "Exit statuses",
                "64",
            ],
        ),
        (
            &["serve", "--help"],
            &[
                "--config <FILE>",
                "--log-format",
                "TOKEN_BROKER_CONFIG",
                "TOKEN_BROKER_LOG_FORMAT",
                "TRUORA_API_KEY",
                "RUST_LOG",
                "SIGTERM",
                "server.shutdown_timeout",
                "64",
            ],
        ),
        (
            &["demo", "--help"],
            &[
                "--listen",
                "--admin-listen",
                "127.0.0.1:8080",
                "127.0.0.1:9090",
                "demo-secret",
                "IPFsandbox",
            ],
        ),
        (
            &["check-config", "--help"],
            &[
                "--config <FILE>",
                "TOKEN_BROKER_CONFIG",
                "TRUORA_API_KEY",
                "64",
            ],
        ),
        (
            &["hash-secret", "--help"],
            &["stdin", "token_sha256", "64", "hash-secret"],
        ),
    ];
    for (args, needles) in cases {
        let (code, out) = run(args);
        assert_eq!(code, 0, "{args:?}");
        for needle in *needles {
            assert!(
                out.contains(needle),
                "{args:?} does not mention {needle}:\n{out}"
            );
        }
    }
}

#[test]
fn the_help_names_only_documents_that_exist() {
    let (_, out) = run(&["--help"]);
    let docs: Vec<&str> = out
        .split(|c: char| c.is_whitespace() || c == ',')
        .map(|w| w.trim_end_matches('.'))
        .filter(|w| w.ends_with(".md"))
        .collect();
    assert!(!docs.is_empty(), "{out}");
    for doc in docs {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(doc);
        assert!(path.is_file(), "--help names {doc}, which does not exist");
    }
}
