//! Stamps the build with the git commit it came from, for `token-broker --version`.
//!
//! Sets `TOKEN_BROKER_VERSION` to `<crate version> (commit <short hash>)`. The commit is, in order:
//! - the environment variable `TOKEN_BROKER_COMMIT`, when set and not empty (a Docker build, whose
//!   context carries no `.git`, passes it as a build argument);
//! - `git rev-parse --short HEAD`, when this crate is the top of a git work tree (a worktree
//!   included) and git is installed;
//! - `unknown` otherwise.
//!
//! Rebuild triggers are kept narrow: this script reruns when `TOKEN_BROKER_COMMIT` changes, when
//! `HEAD` moves (a checkout, a commit) or the branch it points to moves, and not on every edited
//! file. A commit hash therefore says which commit the sources were checked out at; edits not yet
//! committed are not flagged.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=TOKEN_BROKER_COMMIT");

    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let commit = match std::env::var("TOKEN_BROKER_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c.trim().to_owned(),
        _ => git_commit().unwrap_or_else(|| "unknown".to_owned()),
    };
    println!("cargo:rustc-env=TOKEN_BROKER_VERSION={version} (commit {commit})");
}

/// The short hash of `HEAD`, when this crate is the top of a git work tree. Also registers the
/// files whose change means `HEAD` moved.
fn git_commit() -> Option<String> {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    // Built from inside some other repository (vendored, unpacked into a monorepo): that
    // repository's commit would be a lie.
    let top = git(&manifest_dir, &["rev-parse", "--show-toplevel"])?;
    if !same_dir(Path::new(&top), &manifest_dir) {
        return None;
    }
    // `--git-path` resolves correctly in linked worktrees, whose HEAD lives apart from the
    // shared refs.
    let head = git(&manifest_dir, &["rev-parse", "--git-path", "HEAD"])?;
    let head = manifest_dir.join(head);
    watch(&head);
    if let Ok(text) = std::fs::read_to_string(&head) {
        if let Some(reference) = text.trim().strip_prefix("ref: ") {
            for path in [reference, "packed-refs"] {
                if let Some(p) = git(&manifest_dir, &["rev-parse", "--git-path", path]) {
                    watch(&manifest_dir.join(p));
                }
            }
        }
    }
    let hash = git(&manifest_dir, &["rev-parse", "--short", "HEAD"])?;
    hash.bytes().all(|b| b.is_ascii_hexdigit()).then_some(hash)
}

/// Registers a rebuild trigger, only for files that exist: cargo reruns a build script on every
/// build when a watched path is missing.
fn watch(path: &Path) {
    if path.exists() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}
