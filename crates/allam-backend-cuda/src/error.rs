//! Errors of bringing up the CUDA backend (driver, GPU, cuBLAS, kernels). Op failures after
//! construction use `allam_backend::Error`, the type the `Backend` trait returns.
//! Each message is one sentence an operator can act on; none of them is a panic.

/// The CUDA backend could not be created (or the self-check could not run).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// libcuda.so is not loadable: no NVIDIA driver on this machine.
    #[error(
        "no CUDA driver found (libcuda.so): --device cuda needs an NVIDIA GPU; use --device cpu"
    )]
    NoDriver,
    /// The driver is there but reports no GPU, or fewer than the ordinal asked for.
    #[error("CUDA device {ordinal} not found: the driver reports {count} GPU(s); use --device cuda:N with N < {count}, or --device cpu")]
    NoDevice { ordinal: usize, count: usize },
    /// A CUDA library other than the driver is missing.
    #[error("{library} not found: install the CUDA {cuda_major} libraries (or the nvidia-*-cu{cuda_major} wheels) and put their lib directory on LD_LIBRARY_PATH")]
    MissingLibrary {
        library: &'static str,
        cuda_major: i32,
    },
    /// The GPU is older than the kernels support.
    #[error("GPU {ordinal} ({name}) has compute capability {major}.{minor}; the bf16 kernels need 8.0 or newer")]
    ComputeCapability {
        ordinal: usize,
        name: String,
        major: i32,
        minor: i32,
    },
    /// A driver or cuBLAS call failed during start-up.
    #[error("CUDA call failed while {what}: {message}")]
    Driver { what: String, message: String },
    /// NVRTC could not produce the kernels.
    #[error("compiling the CUDA kernels: {0}")]
    Kernels(#[from] allam_kernels::Error),
    /// The CPU reference backend of the self-check could not start.
    #[error("starting the CPU reference backend for the self-check: {0}")]
    CpuReference(#[from] allam_backend_cpu::Error),
    /// A backend op failed outside a single check (self-check set-up).
    #[error("self-check set-up: {0}")]
    Op(#[from] allam_backend::Error),
}

impl Error {
    /// A short stable label for metrics and exit-code mapping.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::NoDriver => "no_driver",
            Error::NoDevice { .. } => "no_device",
            Error::MissingLibrary { .. } => "missing_library",
            Error::ComputeCapability { .. } => "compute_capability",
            Error::Driver { .. } => "driver",
            Error::Kernels(_) => "kernels",
            Error::CpuReference(_) => "cpu_reference",
            Error::Op(_) => "op",
        }
    }

    pub(crate) fn driver(what: impl Into<String>, e: impl std::fmt::Debug) -> Error {
        Error::Driver {
            what: what.into(),
            message: format!("{e:?}"),
        }
    }
}
