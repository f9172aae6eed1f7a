//! On-disk PTX cache: one file per (kernel file, arch, options), named by the sha256 of the
//! exact source NVRTC would compile plus the arch and options, so an edited kernel or header
//! can never be served stale. Writes go to a temp file and are renamed into place, so
//! concurrent processes (several ranks starting at once) never read a torn file.
//! The cache is an optimisation: any IO failure degrades to a recompile, reported to the caller.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::KernelFile;

/// What happened with the cache for one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheOutcome {
    /// No cache directory configured.
    Disabled,
    /// Served from the cache.
    Hit,
    /// Compiled and written to the cache.
    Stored,
    /// Compiled, but writing the cache failed (message says where and why).
    StoreFailed(String),
}

pub(crate) fn cache_key(source: &str, arch: &str, options: &[String]) -> String {
    let mut h = Sha256::new();
    h.update(source.as_bytes());
    h.update([0u8]);
    h.update(arch.as_bytes());
    for o in options {
        h.update([0u8]);
        h.update(o.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn entry_path(dir: &Path, file: KernelFile, arch: &str, key: &str) -> PathBuf {
    let stem = file.file_name().trim_end_matches(".cu");
    dir.join(format!("{stem}-{arch}-{key}.ptx"))
}

/// The cached PTX, if present and readable.
pub(crate) fn load(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    // A PTX file always declares its version; anything else is junk from a crashed writer of
    // an older layout, and recompiling is the safe answer.
    text.contains(".version").then_some(text)
}

pub(crate) fn store(path: &Path, ptx: &str) -> Result<(), String> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let tmp = path.with_extension(format!("ptx.tmp{}", std::process::id()));
    std::fs::write(&tmp, ptx).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("renaming into {}: {e}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_changes_with_source_arch_and_options() {
        let opts = vec!["--std=c++17".to_owned()];
        let k = cache_key("src", "compute_90", &opts);
        assert_eq!(k.len(), 64);
        assert_ne!(k, cache_key("src2", "compute_90", &opts));
        assert_ne!(k, cache_key("src", "compute_80", &opts));
        assert_ne!(k, cache_key("src", "compute_90", &[]));
        assert_eq!(k, cache_key("src", "compute_90", &opts));
    }

    #[test]
    fn store_then_load_round_trips_and_junk_is_a_miss() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = entry_path(
            &dir.path().join("nested"),
            KernelFile::Rope,
            "compute_90",
            "abc",
        );
        assert!(path.ends_with("rope-compute_90-abc.ptx"));
        assert_eq!(load(&path), None);
        let ptx = "//\n.version 9.0\n.target sm_90\n";
        store(&path, ptx).expect("store");
        assert_eq!(load(&path).as_deref(), Some(ptx));
        std::fs::write(&path, "garbage").expect("write");
        assert_eq!(load(&path), None);
    }

    #[test]
    fn store_into_an_unwritable_place_reports_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "x").expect("write");
        // A regular file where the cache directory should be.
        let path = entry_path(&blocker, KernelFile::Rope, "compute_90", "abc");
        let err = store(&path, ".version 9.0").expect_err("must fail");
        assert!(err.contains(&blocker.display().to_string()), "{err}");
    }
}
