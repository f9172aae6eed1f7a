//! Test harness: locates the repo and fixtures, spawns the real `allam` binary on free
//! loopback ports, and kills what it started on drop.

use std::path::PathBuf;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `ALLAM_FIXTURES` or `../shared/fixtures` beside the repo; panics with a clear message
/// when missing, because a silently skipped golden test proves nothing.
#[allow(dead_code)]
pub fn fixtures_dir() -> PathBuf {
    let dir = std::env::var_os("ALLAM_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/fixtures"));
    assert!(
        dir.join("tiny-allam/goldens.json").exists(),
        "fixtures not found at {} (set ALLAM_FIXTURES)",
        dir.display()
    );
    dir
}
