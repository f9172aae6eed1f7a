//! allam-kernels: the CUDA kernels of allam-serve as data, plus everything about them that
//! can be decided without a GPU.
//!
//! - [`Kernel`] / [`KernelFile`]: the typed table of `kernels/*.cu` (embedded with
//!   `include_str!`) and their `extern "C"` symbols, spelled once.
//! - [`geometry`]: launch geometry, split-K partitioning, prefill tiling and workspace sizes
//!   as pure functions.
//! - [`compile_ptx`]: NVRTC at run time for the device's arch, with a disk cache keyed by
//!   source hash + arch. NVRTC and the CUDA headers are found without panicking (see
//!   [`NvrtcConfig`]); scripts/install-nvrtc.sh installs both from PyPI.
//!
//! Invariant: the math lives in the `.cu` files; this crate never launches anything
//! (allam-backend-cuda does).

mod error;
pub mod geometry;
mod kernel;
mod nvrtc;
mod ptx_cache;

pub use error::Error;
pub use kernel::{HeadDim, Kernel, KernelFile};
pub use nvrtc::{
    arch_of_compute_capability, compile_ptx, default_install_root, find_include_dirs, load_nvrtc,
    normalize_arch, CompiledFile, NvrtcConfig, NvrtcInfo, CUDA_MAJOR, ENV_ALLAM_CACHE,
    ENV_CUDA_INCLUDE_DIR, ENV_NVRTC_LIB_DIR, ENV_PTX_CACHE_DIR,
};
pub use ptx_cache::CacheOutcome;
