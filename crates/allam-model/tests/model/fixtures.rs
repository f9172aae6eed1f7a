//! Where the test fixtures live: `$ALLAM_FIXTURES`, else `<workspace>/../shared/fixtures`.
//! The one place that knows; the benchmark includes this file too.

use std::path::PathBuf;

/// The fixtures directory; panics loudly when it is missing.
pub fn fixtures_dir() -> PathBuf {
    let dir = match std::env::var_os("ALLAM_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"),
    };
    assert!(
        dir.join("tiny-allam/config.json").is_file(),
        "test fixtures not found at {} (set ALLAM_FIXTURES)",
        dir.display()
    );
    dir
}

/// `fixtures_dir()/name`, e.g. `tiny-allam`.
pub fn model_dir(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}
