//! allam-backend-cuda: `CudaBackend`, the bf16 implementation of `allam_backend::Backend` on
//! one NVIDIA GPU.
//!
//! Weights, activations and the paged KV cache are bf16 on the device; arithmetic is f32
//! (kernels in `kernels/*.cu`, GEMMs through cuBLAS with f32 accumulation). Everything runs on
//! one stream in submission order; only `to_host_f32` (and `sample`) wait for the device.
//!
//! Loading is dynamic (cudarc `dynamic-loading`): the binary builds and starts without any
//! CUDA library, and [`CudaBackend::new`] turns a missing driver, GPU, library or NVRTC into a
//! one-sentence [`Error`] instead of cudarc's panic. Kernels are compiled by NVRTC at start
//! for the device's arch and cached on disk (see allam-kernels).
//!
//! Tensor parallelism: [`CudaBackend::join_nccl`] makes a backend one rank of an NCCL group
//! (one GPU per rank; rank 0 makes the group's [`NcclId`] and the others get its bytes over
//! any channel). The model then loads only this rank's slices, `all_reduce_sum` and
//! `all_gather_cols` run as NCCL collectives on the backend's stream, and the host's waits
//! for the device (`to_host_f32`, `sample`, `synchronize`) go through a watchdog that turns a
//! dead or hung peer into `Error::Collective` after the group's timeout (see `nccl.rs`).
//! [`check_tp_devices`] checks a machine for a group before anything starts.
//!
//! [`selftest`] checks every op against the CPU twin (`allam-backend-cpu`) on random inputs;
//! `allam gpu-selftest` runs it on the GPU machine.

mod convert;
mod device;
mod error;
mod gemm;
mod graph;
mod nccl;
mod ops;
mod sampling;
mod selftest;
mod selftest_cases;
mod step;
mod storage;
mod tp;

use std::sync::Arc;
use std::time::Duration;

use allam_backend::{DType, Error as OpError, Tensor};
use allam_kernels::geometry::Launch;
use allam_kernels::{Kernel, NvrtcConfig};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

pub use allam_kernels::CacheOutcome;
pub use error::Error;
pub use graph::CudaGraphOptions;
pub use nccl::{check_nccl, NcclId, NCCL_ID_BYTES};
pub use selftest::{selftest, selftest_with_config, OpCheck};

use storage::{CudaTensor, BACKEND_NAME};

/// Construction options of a [`CudaBackend`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CudaBackendConfig {
    /// CUDA device ordinal (`--device cuda:N`).
    pub device_ordinal: usize,
    /// Where NVRTC, the CUDA headers and the PTX cache are ([`NvrtcConfig::from_env`] reads
    /// `ALLAM_NVRTC_LIB_DIR`, `ALLAM_CUDA_INCLUDE_DIR`, `ALLAM_PTX_CACHE_DIR`).
    pub nvrtc: NvrtcConfig,
    /// Replay decode steps from CUDA graphs (`--cuda-graphs`); `None` runs every step eagerly.
    pub cuda_graphs: Option<CudaGraphOptions>,
}

impl CudaBackendConfig {
    /// Device `device_ordinal`, NVRTC settings from the environment.
    pub fn from_env(device_ordinal: usize) -> CudaBackendConfig {
        CudaBackendConfig {
            device_ordinal,
            nvrtc: NvrtcConfig::from_env(),
            cuda_graphs: None,
        }
    }
}

/// The CUDA backend (bf16 on one GPU).
pub struct CudaBackend {
    /// The tensor-parallel group; `None` = a group of one without NCCL. Declared before
    /// `dev` so that it is torn down while the context still exists.
    nccl: Option<nccl::NcclGroup>,
    /// Decode graphs; `None` when they are off. Declared before `dev`: the graph executables
    /// hold kernels of `dev`'s modules and run cuBLAS kernels, so they go before the modules
    /// are unloaded and the cuBLAS handle is destroyed.
    graphs: Option<graph::Graphs>,
    /// Split-K decode workspace, grown on demand (f32). Shared with the graphs captured
    /// while it was current, which keep it alive after a larger one replaces it.
    workspace: Option<Arc<CudaSlice<f32>>>,
    dev: device::Device,
}

/// A kernel argument.
#[derive(Debug, Clone, Copy)]
enum Arg {
    Ptr(u64),
    U32(u32),
    F32(f32),
}

impl CudaBackend {
    /// Opens GPU `device_ordinal` with NVRTC settings from the environment. On a machine
    /// without a driver, GPU or CUDA libraries this is an [`Error`] with one clear sentence,
    /// never a panic.
    pub fn new(device_ordinal: usize) -> Result<CudaBackend, Error> {
        CudaBackend::with_config(&CudaBackendConfig::from_env(device_ordinal))
    }

    pub fn with_config(config: &CudaBackendConfig) -> Result<CudaBackend, Error> {
        let dev = device::open(config.device_ordinal, &config.nvrtc)?;
        tracing::info!(
            gpu = %dev.name,
            ordinal = dev.ordinal,
            sm = %format!("{}.{}", dev.compute_capability.0, dev.compute_capability.1),
            sms = dev.num_sms,
            "CUDA backend ready"
        );
        for (file, outcome) in &dev.kernel_cache {
            if let CacheOutcome::StoreFailed(msg) = outcome {
                tracing::warn!(kernel_file = file, "PTX cache not written: {msg}");
            }
        }
        let mut backend = CudaBackend {
            nccl: None,
            dev,
            workspace: None,
            graphs: None,
        };
        if let Some(options) = config.cuda_graphs {
            backend
                .enable_graphs(options)
                .map_err(|e| Error::driver("turning CUDA graphs on", e))?;
        }
        Ok(backend)
    }

    /// Makes this backend rank `rank` of a tensor-parallel group of `world_size` through
    /// NCCL: every rank calls it with the same `id` (from [`NcclId::new`] on rank 0) and
    /// blocks until all have joined, at most `timeout`, which then also bounds every wait for
    /// the group's collectives. Call it before loading a model: the model takes its slices by
    /// [`allam_backend::Backend::world_size`] and [`allam_backend::Backend::rank`].
    pub fn join_nccl(
        &mut self,
        id: &NcclId,
        rank: usize,
        world_size: usize,
        timeout: Duration,
    ) -> Result<(), Error> {
        let refuse = |message: &str| Error::Nccl {
            what: format!("joining as rank {rank} of {world_size}"),
            message: message.to_owned(),
        };
        if self.nccl.is_some() {
            return Err(refuse("this backend already belongs to a group"));
        }
        self.dev
            .ctx
            .bind_to_thread()
            .map_err(|e| Error::driver("making the GPU current for NCCL", e))?;
        self.nccl = Some(nccl::NcclGroup::join(id, rank, world_size, timeout)?);
        Ok(())
    }

    /// [`CudaBackend::with_config`] then [`CudaBackend::join_nccl`].
    pub fn with_nccl(
        config: &CudaBackendConfig,
        id: &NcclId,
        rank: usize,
        world_size: usize,
        timeout: Duration,
    ) -> Result<CudaBackend, Error> {
        let mut backend = CudaBackend::with_config(config)?;
        backend.join_nccl(id, rank, world_size, timeout)?;
        Ok(backend)
    }

    /// GPU name as the driver reports it.
    pub fn device_name(&self) -> &str {
        &self.dev.name
    }

    /// (major, minor) compute capability.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.dev.compute_capability
    }

    /// PTX cache outcome per kernel file at start-up.
    pub fn kernel_cache(&self) -> &[(&'static str, CacheOutcome)] {
        &self.dev.kernel_cache
    }

    /// Allocates a zeroed f32 tensor. `linear` into an f32 tensor keeps the lm_head output
    /// (logits) in f32, which `sample` and accurate logprobs need.
    pub fn alloc_f32(&mut self, shape: &[usize]) -> Result<Tensor, OpError> {
        let len = shape.iter().product::<usize>().max(1);
        let buf = self.activation("alloc_f32", DType::F32, len)?;
        Ok(Tensor::new(shape, DType::F32, Box::new(CudaTensor(buf))))
    }

    /// Waits for all queued work: under the NCCL watchdog in a group (a hung collective is
    /// `Error::Collective` after the group's timeout, and the group is aborted), else a plain
    /// stream synchronize.
    pub(crate) fn wait_idle(&mut self, op: &'static str) -> Result<(), OpError> {
        self.bind(op)?;
        match &mut self.nccl {
            Some(group) => group.wait_stream(op, &self.dev.stream),
            None => self.dev.stream.synchronize().map_err(|e| device_err(op, e)),
        }
    }

    /// In a group, waits for the queued collectives under the watchdog; else nothing. Called
    /// before a copy to pageable host memory, which blocks the thread until the stream
    /// drains, so a dead peer would hang it beyond any timeout.
    pub(crate) fn settle_collectives(&mut self, op: &'static str) -> Result<(), OpError> {
        if self.nccl.is_some() {
            self.wait_idle(op)?;
        }
        Ok(())
    }

    /// Makes this backend's context current on the calling thread (the engine thread may not
    /// be the thread that built the backend).
    fn bind(&self, op: &'static str) -> Result<(), OpError> {
        self.dev.ctx.bind_to_thread().map_err(|e| device_err(op, e))
    }

    fn launch(
        &self,
        op: &'static str,
        kernel: Kernel,
        l: Launch,
        args: &[Arg],
    ) -> Result<(), OpError> {
        if l.grid.contains(&0) {
            return Ok(()); // nothing to do; a zero grid is a launch error
        }
        let func = self
            .dev
            .kernels
            .get(&kernel)
            .ok_or_else(|| OpError::Unsupported {
                op,
                backend: BACKEND_NAME,
                detail: format!("kernel {} was not loaded", kernel.symbol()),
            })?;
        let cfg = LaunchConfig {
            grid_dim: (l.grid[0], l.grid[1], l.grid[2]),
            block_dim: (l.block[0], l.block[1], l.block[2]),
            shared_mem_bytes: l.shared_mem_bytes,
        };
        let mut b = self.dev.stream.launch_builder(func);
        for a in args {
            match a {
                Arg::Ptr(p) => b.arg(p),
                Arg::U32(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
            };
        }
        // SAFETY: every caller passes the argument list of `kernel`'s signature in order
        // (pointers as u64), with buffers sized by the shape checks before the call; the
        // kernels' launch contracts are in their file headers.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| device_err(op, e))
    }

    /// A zero-filled f32 workspace of at least `len` elements (contents unspecified after the
    /// first use).
    fn workspace(&mut self, op: &'static str, len: usize) -> Result<u64, OpError> {
        let big_enough = self.workspace.as_ref().is_some_and(|w| w.len() >= len);
        if !big_enough && self.capturing() {
            // The recorded pass sized it; growing now would allocate inside the capture.
            return Err(OpError::Unsupported {
                op,
                backend: storage::BACKEND_NAME,
                detail: "a split-K workspace larger than the recorded pass used".to_owned(),
            });
        }
        if !big_enough {
            // Grow by 2x to amortise. Graphs captured with the old buffer hold it; otherwise it
            // is freed in stream order.
            let want = len
                .max(self.workspace.as_ref().map_or(0, |w| 2 * w.len()))
                .max(1);
            let buf = self
                .dev
                .stream
                .alloc_zeros::<f32>(want)
                .map_err(|e| device_err(op, e))?;
            self.workspace = Some(Arc::new(buf));
        }
        let w = self
            .workspace
            .as_ref()
            .expect("workspace allocated just above");
        Ok(storage::raw(w, &self.dev.stream))
    }
}

/// Checks, opening nothing, that this machine can run a tensor-parallel group of `world_size`
/// ranks on GPUs `base..base + world_size` (rank `r` on `cuda:{base + r}`): the CUDA
/// libraries, enough GPUs, and NCCL. Each failure is the one-sentence [`Error`] that
/// [`CudaBackend::new`] or [`NcclId::new`] would give, before any rank is started.
pub fn check_tp_devices(base: usize, world_size: usize) -> Result<(), Error> {
    device::check_libraries()?;
    let count = device::device_count()?;
    let last = base + world_size.max(1) - 1;
    if last >= count {
        return Err(if world_size <= 1 {
            Error::NoDevice {
                ordinal: base,
                count,
            }
        } else {
            Error::NotEnoughGpus {
                base,
                world_size,
                last,
                count,
            }
        });
    }
    check_nccl()?;
    Ok(())
}

fn device_err(op: &'static str, e: impl std::fmt::Debug) -> OpError {
    OpError::Device {
        op,
        backend: BACKEND_NAME,
        message: format!("{e:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine (CI) has no NVIDIA driver: construction must fail with the one-sentence
    /// error, not panic. On a GPU machine the same call must succeed instead, so the test
    /// checks whichever holds, and never passes vacuously.
    #[test]
    fn new_fails_cleanly_without_a_gpu() {
        // SAFETY: the probe only dlopens and closes candidate names.
        let has_driver = unsafe { cudarc::driver::sys::is_culib_present() };
        match CudaBackend::new(0) {
            Err(Error::NoDriver) => {
                assert!(!has_driver);
                let msg = Error::NoDriver.to_string();
                assert!(msg.contains("--device cpu"), "{msg}");
                assert_eq!(msg.matches(". ").count(), 0, "one sentence: {msg}");
            }
            Err(Error::NoDevice { count: 0, .. }) => assert!(has_driver),
            Err(other) => assert!(has_driver, "driver missing but got {other}"),
            Ok(b) => assert!(has_driver && !b.device_name().is_empty()),
        }
    }

    #[test]
    fn error_messages_name_the_fix() {
        let e = Error::NoDevice {
            ordinal: 2,
            count: 1,
        };
        assert!(e.to_string().contains("cuda:N with N < 1"), "{e}");
        let e = Error::MissingLibrary {
            library: "cuBLAS (libcublas.so.13)",
            cuda_major: 13,
        };
        assert!(
            e.to_string().contains("libcublas.so.13") && e.to_string().contains("LD_LIBRARY_PATH"),
            "{e}"
        );
        let e = Error::ComputeCapability {
            ordinal: 0,
            name: "Tesla T4".into(),
            major: 7,
            minor: 5,
        };
        assert!(e.to_string().contains("7.5"), "{e}");
        let e = Error::NotEnoughGpus {
            base: 1,
            world_size: 4,
            last: 4,
            count: 2,
        };
        let msg = e.to_string();
        assert!(
            msg.contains("--tp 4") && msg.contains("1..=4") && msg.contains("reports 2"),
            "{msg}"
        );
        assert_eq!(msg.matches(". ").count(), 0, "one sentence: {msg}");
    }

    /// The pre-start check of a tensor-parallel group gives the same clean errors: no driver
    /// here (CI); elsewhere whichever holds, never a panic.
    #[test]
    fn tp_device_check_fails_cleanly_without_a_gpu() {
        // SAFETY: the probe only dlopens and closes candidate names.
        let has_driver = unsafe { cudarc::driver::sys::is_culib_present() };
        match check_tp_devices(0, 2) {
            Err(Error::NoDriver) => assert!(!has_driver),
            Err(other) => assert!(has_driver, "driver missing but got {other}"),
            Ok(()) => assert!(has_driver),
        }
    }
}
