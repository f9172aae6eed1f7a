//! Bringing up one GPU: library checks (cudarc panics on a missing library, so each is probed
//! first), context and stream, cuBLAS handle, and the kernel table compiled by NVRTC for the
//! device's arch (allam-kernels, cached on disk).

use std::collections::HashMap;
use std::sync::Arc;

use allam_kernels::{
    arch_of_compute_capability, compile_ptx, CacheOutcome, Kernel, NvrtcConfig, CUDA_MAJOR,
};
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::{CUdevice_attribute, CUresult};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, DriverError};
use cudarc::nvrtc::Ptx;

use crate::Error;

/// Everything tied to the device that ops need.
pub(crate) struct Device {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) blas: CudaBlas,
    pub(crate) kernels: HashMap<Kernel, CudaFunction>,
    pub(crate) ordinal: usize,
    pub(crate) name: String,
    pub(crate) compute_capability: (i32, i32),
    pub(crate) num_sms: u32,
    /// PTX cache outcome per kernel file, for start-up logs.
    pub(crate) kernel_cache: Vec<(&'static str, CacheOutcome)>,
}

/// The driver, cuBLAS and cuBLASLt must all be loadable before cudarc touches them.
pub(crate) fn check_libraries() -> Result<(), Error> {
    // SAFETY: each probe only dlopens candidate names and closes them again.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::NoDriver);
    }
    // SAFETY: as above.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(Error::MissingLibrary {
            library: "cuBLAS (libcublas.so.13)",
            cuda_major: CUDA_MAJOR,
        });
    }
    // SAFETY: as above.
    if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
        return Err(Error::MissingLibrary {
            library: "cuBLASLt (libcublasLt.so.13)",
            cuda_major: CUDA_MAJOR,
        });
    }
    Ok(())
}

/// GPUs the driver reports; call after [`check_libraries`].
pub(crate) fn device_count() -> Result<usize, Error> {
    match CudaContext::device_count() {
        Ok(n) => Ok(n.max(0) as usize),
        // cuInit answers CUDA_ERROR_NO_DEVICE when the driver sees no GPU.
        Err(DriverError(CUresult::CUDA_ERROR_NO_DEVICE)) => Ok(0),
        Err(e) => Err(Error::driver("initialising the CUDA driver", e)),
    }
}

pub(crate) fn open(ordinal: usize, nvrtc: &NvrtcConfig) -> Result<Device, Error> {
    check_libraries()?;
    let count = device_count()?;
    if ordinal >= count {
        return Err(Error::NoDevice { ordinal, count });
    }
    let ctx = CudaContext::new(ordinal)
        .map_err(|e| Error::driver(format!("creating a context on GPU {ordinal}"), e))?;
    // SAFETY: called before any allocation; this backend uses one stream, so stream order
    // alone orders every use of every buffer (see storage.rs).
    unsafe { ctx.disable_event_tracking() };
    let name = ctx
        .name()
        .map_err(|e| Error::driver("reading the GPU name", e))?;
    let compute_capability = ctx
        .compute_capability()
        .map_err(|e| Error::driver("reading the compute capability", e))?;
    if compute_capability.0 < 8 {
        return Err(Error::ComputeCapability {
            ordinal,
            name,
            major: compute_capability.0,
            minor: compute_capability.1,
        });
    }
    let num_sms = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(|e| Error::driver("reading the SM count", e))?
        .max(1) as u32;
    let stream = ctx
        .new_stream()
        .map_err(|e| Error::driver("creating a stream", e))?;
    let blas = CudaBlas::new(stream.clone())
        .map_err(|e| Error::driver("creating the cuBLAS handle", e))?;

    let arch = arch_of_compute_capability(compute_capability.0 as u32, compute_capability.1 as u32);
    let files = compile_ptx(&arch, nvrtc)?;
    let mut kernels = HashMap::new();
    let mut kernel_cache = Vec::new();
    for file in files {
        let module = ctx
            .load_module(Ptx::from_src(file.ptx.clone()))
            .map_err(|e| {
                Error::driver(
                    format!(
                        "loading the PTX of kernels/{} for {arch}",
                        file.file.file_name()
                    ),
                    e,
                )
            })?;
        for kernel in file.file.kernels() {
            let function = module.load_function(kernel.symbol()).map_err(|e| {
                Error::driver(
                    format!(
                        "finding kernel {} in kernels/{}",
                        kernel.symbol(),
                        file.file.file_name()
                    ),
                    e,
                )
            })?;
            kernels.insert(kernel, function);
        }
        kernel_cache.push((file.file.file_name(), file.cache));
    }
    Ok(Device {
        ctx,
        stream,
        blas,
        kernels,
        ordinal,
        name,
        compute_capability,
        num_sms,
        kernel_cache,
    })
}
