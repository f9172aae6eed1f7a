//! Errors of bringing up the CUDA backend (driver, GPU, cuBLAS, kernels, NCCL). Op failures after
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
    /// libnccl is not loadable (cudarc looks for `libnccl.so`, the PyPI wheel ships only
    /// `libnccl.so.2`).
    #[error("NCCL (libnccl.so) not found: tensor parallelism on --device cuda needs it; install the nvidia-nccl-cu{cuda_major} wheel and put a libnccl.so symlink to its libnccl.so.2 in a directory on LD_LIBRARY_PATH, or use --tp 1")]
    NcclMissing { cuda_major: i32 },
    /// The NCCL found is older than the non-blocking communicator API this backend needs.
    #[error("the NCCL library found lacks `{symbol}`: tensor parallelism on --device cuda needs NCCL 2.14 or newer on LD_LIBRARY_PATH")]
    NcclTooOld { symbol: &'static str },
    /// A tensor-parallel group wants more GPUs than the driver reports.
    #[error("--tp {world_size} on cuda:{base} needs GPUs {base}..={last} (rank r uses cuda:{base}+r) but the driver reports {count}; lower --tp or the device ordinal")]
    NotEnoughGpus {
        base: usize,
        world_size: usize,
        last: usize,
        count: usize,
    },
    /// Bytes that should be an NCCL unique id are not one.
    #[error("an NCCL unique id is {expected} bytes, got {actual}: the ranks run different allam builds or the exchange was corrupted")]
    NcclId { expected: usize, actual: usize },
    /// Creating or joining the NCCL communicator failed or timed out.
    #[error("NCCL failed while {what}: {message}")]
    Nccl { what: String, message: String },
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
            Error::NcclMissing { .. } => "nccl_missing",
            Error::NcclTooOld { .. } => "nccl_too_old",
            Error::NotEnoughGpus { .. } => "not_enough_gpus",
            Error::NcclId { .. } => "nccl_id",
            Error::Nccl { .. } => "nccl",
        }
    }

    pub(crate) fn driver(what: impl Into<String>, e: impl std::fmt::Debug) -> Error {
        Error::Driver {
            what: what.into(),
            message: format!("{e:?}"),
        }
    }
}
