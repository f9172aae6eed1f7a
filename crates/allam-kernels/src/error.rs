//! The one error type of allam-kernels: finding NVRTC and the CUDA headers, compiling.
//! (A PTX cache that cannot be read or written is not an error: see `CacheOutcome`.)
//! Messages name the file, arch or path involved and, for missing pieces, the fix.

/// A failure to produce PTX for the kernels.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No loadable NVRTC library (libnvrtc.so.13).
    #[error(
        "NVRTC library not found (looked for libnvrtc.so.13 in {searched}): run \
         scripts/install-nvrtc.sh, or set ALLAM_NVRTC_LIB_DIR to the directory holding it"
    )]
    NvrtcMissing { searched: String },
    /// NVRTC was found but is not the major version this build's bindings were made for.
    #[error("NVRTC {found_major}.{found_minor} found at {path}, but this build needs CUDA {needed_major}.x")]
    NvrtcVersion {
        path: String,
        found_major: i32,
        found_minor: i32,
        needed_major: i32,
    },
    /// No directory with `cuda_bf16.h` (NVRTC has no built-in CUDA headers).
    #[error(
        "CUDA headers not found (no cuda_bf16.h in {searched}): run scripts/install-nvrtc.sh, \
         or set ALLAM_CUDA_INCLUDE_DIR to the CUDA include directory"
    )]
    HeadersMissing { searched: String },
    /// The arch string is not `sm_XY` / `compute_XY` with XY >= 80.
    #[error("unsupported GPU architecture `{arch}`: expected sm_80 or newer (e.g. sm_90)")]
    UnsupportedArch { arch: String },
    /// NVRTC rejected a kernel file.
    #[error("NVRTC failed to compile kernels/{file} for {arch}: {log}")]
    Compile {
        file: &'static str,
        arch: String,
        log: String,
    },
    /// The PTX NVRTC returned lacks an entry point the kernel table expects.
    #[error("PTX of kernels/{file} for {arch} has no `.entry {symbol}`")]
    MissingEntry {
        file: &'static str,
        arch: String,
        symbol: &'static str,
    },
}
