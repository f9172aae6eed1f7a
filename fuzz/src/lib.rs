//! Shared set-up for the fuzz targets: the fixtures' real ALLaM tokenizer, loaded once.
//!
//! The fixtures are found through env `ALLAM_FIXTURES`, else `<repo>/../shared/fixtures`
//! (the same rule as the test suites). A missing fixture stops the fuzzer at start-up with
//! the path it tried: a fuzzer that silently ran without its tokenizer would prove nothing.

use std::path::PathBuf;
use std::sync::OnceLock;

use allam_tokenizer::Tokenizer;

/// `ALLAM_FIXTURES`, else `../../shared/fixtures` from this package (`<repo>/fuzz`).
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("ALLAM_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"),
    }
}

/// The tiny-allam fixture's tokenizer (ALLaM's real vocabulary file layout and chat template).
pub fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let dir = fixtures_dir().join("tiny-allam");
        Tokenizer::from_dir(&dir).unwrap_or_else(|err| {
            panic!(
                "fuzz set-up: cannot load the fixture tokenizer from {} \
                 (set ALLAM_FIXTURES): {err}",
                dir.display()
            )
        })
    })
}
