//! CI gate for the kernels without a GPU: every kernel file compiles with NVRTC for sm_80 and
//! sm_90, every `Kernel::symbol` is an `.entry` of its file's PTX, the PTX cache round-trips,
//! and, where ptxas is available, the PTX assembles for both archs (registers and spills are
//! printed).
//!
//! NVRTC and the CUDA headers come from scripts/install-nvrtc.sh (PyPI wheels); the test FAILS
//! when they are missing instead of skipping: `eval "$(scripts/install-nvrtc.sh)"` first.

use std::path::PathBuf;
use std::process::Command;

use allam_kernels::{compile_ptx, CacheOutcome, CompiledFile, Kernel, KernelFile, NvrtcConfig};

fn config() -> NvrtcConfig {
    NvrtcConfig {
        cache_dir: None,
        ..NvrtcConfig::from_env()
    }
}

fn compile_or_explain(arch: &str, cfg: &NvrtcConfig) -> Vec<CompiledFile> {
    match compile_ptx(arch, cfg) {
        Ok(files) => files,
        Err(e) => panic!(
            "compiling the kernels for {arch} failed: {e}\n\
             (NVRTC and the CUDA headers come from PyPI: run `eval \"$(scripts/install-nvrtc.sh)\"` \
             and rerun; ALLAM_NVRTC_LIB_DIR / ALLAM_CUDA_INCLUDE_DIR point elsewhere if needed)"
        ),
    }
}

fn check_entries(files: &[CompiledFile], arch: &str) {
    assert_eq!(
        files.len(),
        KernelFile::ALL.len(),
        "{arch}: one PTX per kernel file"
    );
    for k in Kernel::all() {
        let file = files
            .iter()
            .find(|f| f.file == k.file())
            .expect("file compiled");
        let needle = format!(".entry {}(", k.symbol());
        assert!(
            file.ptx.contains(&needle),
            "{arch}: `{needle}` missing from the PTX of kernels/{}",
            k.file().file_name()
        );
    }
}

fn ptxas_path() -> Option<PathBuf> {
    let p = std::env::var_os("ALLAM_PTXAS")
        .map(PathBuf::from)
        .or_else(|| allam_kernels::default_install_root().map(|r| r.join("bin").join("ptxas")))?;
    p.is_file().then_some(p)
}

/// Assembles each PTX for `sm` and prints ptxas' resource usage lines.
fn assemble(files: &[CompiledFile], sm: &str, ptxas: &PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    for f in files {
        let ptx_path = dir.path().join(f.file.file_name().replace(".cu", ".ptx"));
        std::fs::write(&ptx_path, &f.ptx).expect("write ptx");
        let out = Command::new(ptxas)
            .args([&format!("-arch={sm}"), "-v", "-o"])
            .arg(dir.path().join("out.cubin"))
            .arg(&ptx_path)
            .output()
            .expect("run ptxas");
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "ptxas -arch={sm} rejected kernels/{}:\n{log}",
            f.file.file_name()
        );
        for line in log.lines() {
            if line.contains("Compiling entry function")
                || line.contains("Used")
                || line.contains("spill")
            {
                eprintln!("[{sm}] {}", line.trim_start_matches("ptxas info    : "));
            }
        }
    }
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    let cfg = config();
    let sm90 = compile_or_explain("sm_90", &cfg);
    check_entries(&sm90, "sm_90");
    let sm80 = compile_or_explain("sm_80", &cfg);
    check_entries(&sm80, "sm_80");
    assert!(sm80.iter().all(|f| f.cache == CacheOutcome::Disabled));

    match ptxas_path() {
        Some(ptxas) => {
            assemble(&sm90, "sm_90", &ptxas);
            assemble(&sm80, "sm_80", &ptxas);
        }
        None => eprintln!("ptxas not found (ALLAM_PTXAS unset and none in the install-nvrtc.sh dir): PTX not assembled"),
    }
}

#[test]
fn ptx_cache_stores_then_hits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = NvrtcConfig {
        cache_dir: Some(dir.path().join("ptx")),
        ..config()
    };
    let first = compile_or_explain("sm_90", &cfg);
    assert!(
        first.iter().all(|f| f.cache == CacheOutcome::Stored),
        "{:?}",
        first.iter().map(|f| &f.cache).collect::<Vec<_>>()
    );
    let second = compile_or_explain("sm_90", &cfg);
    assert!(second.iter().all(|f| f.cache == CacheOutcome::Hit));
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(
            a.ptx,
            b.ptx,
            "cache returned different PTX for {}",
            a.file.file_name()
        );
    }
}
