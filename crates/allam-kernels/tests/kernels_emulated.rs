//! Runs the real `kernels/*.cu` on the CPU: `tests/emu/` holds a tiny CUDA emulator (one fiber
//! per CUDA thread, switching only at barriers and shuffles, pseudo-random order between
//! barriers) and C++ checks of every kernel against double-precision references. This is the
//! numerical test of the kernels on machines without a GPU; `allam gpu-selftest` repeats the
//! comparison on real hardware.
//!
//! What it cannot see: races between threads that happen to read stale shared memory left by
//! the previous block, and anything about performance or the real memory model.
//!
//! Needs a C++17 compiler for x86-64 (`$CXX`, default `c++`); it fails, not skips, without one.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn kernels_match_references_under_the_cpu_emulator() {
    if !cfg!(all(target_arch = "x86_64", target_os = "linux")) {
        panic!(
            "the kernel emulator's context switch is x86-64 Linux assembly; run this test there"
        );
    }
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let emu = manifest.join("tests").join("emu");
    let kernels = manifest.join("..").join("..").join("kernels");
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = dir.path().join("emu_tests");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_owned());
    let build = Command::new(&cxx)
        .args([
            "-O2",
            "-std=c++17",
            "-fno-strict-aliasing",
            "-Wno-unknown-pragmas",
            "-I",
        ])
        .arg(&emu)
        .arg("-I")
        .arg(&kernels)
        .arg(emu.join("emu_tests.cpp"))
        .arg(emu.join("emu_switch.S"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| {
            panic!("running the C++ compiler `{cxx}` failed ({e}): install g++ or set CXX")
        });
    assert!(
        build.status.success(),
        "compiling the kernels for the emulator failed:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let run = Command::new(&exe)
        .output()
        .expect("run the emulated kernel checks");
    let stdout = String::from_utf8_lossy(&run.stdout);
    println!("{stdout}");
    assert!(
        run.status.success(),
        "emulated kernel checks failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("0 failure(s)"), "{stdout}");
    // Every kernel symbol must have been exercised.
    let src = std::fs::read_to_string(emu.join("emu_tests.cpp")).expect("read emu_tests.cpp");
    for k in allam_kernels::Kernel::all() {
        assert!(
            src.contains(k.symbol()),
            "emu_tests.cpp never launches {}",
            k.symbol()
        );
    }
}
