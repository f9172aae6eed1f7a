//! The private device storage behind the CUDA backend's opaque handles, the checked downcasts
//! every op starts with, and raw device pointers for kernel and cuBLAS arguments.
//!
//! Invariant: the context runs with cudarc's event tracking off and one stream, so a raw
//! pointer taken from a `CudaSlice` is valid for any work queued on that stream while the
//! slice is alive, and stream order is the only synchronization needed.

use std::sync::Arc;

use allam_backend::{checks, DType, Error, KvCache, PreparedStep, Tensor, Weight};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use half::bf16;

use crate::step::StepLayout;

pub(crate) const BACKEND_NAME: &str = "cuda";

/// A device buffer of one of the two element types the backend keeps.
pub(crate) enum DevBuf {
    Bf16(CudaSlice<bf16>),
    F32(CudaSlice<f32>),
}

impl DevBuf {
    pub(crate) fn dtype(&self) -> DType {
        match self {
            DevBuf::Bf16(_) => DType::BF16,
            DevBuf::F32(_) => DType::F32,
        }
    }

    /// Elements.
    pub(crate) fn len(&self) -> usize {
        match self {
            DevBuf::Bf16(s) => s.len(),
            DevBuf::F32(s) => s.len(),
        }
    }
}

/// Device address of `s`. The returned guard only records events when event tracking is on,
/// which this backend never enables, so dropping it at once is correct.
pub(crate) fn raw<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    let (ptr, _guard) = s.device_ptr(stream);
    ptr
}

/// Activation storage. Shared so that a captured graph keeps the buffers it was recorded
/// with alive after the model drops its tensors (see `graph.rs`).
pub(crate) struct CudaTensor(pub(crate) Arc<DevBuf>);
/// Weight storage (bf16 weights, f32 RoPE table).
pub(crate) struct CudaWeight(pub(crate) DevBuf);

/// Per-layer K and V arrays, each `[num_blocks, block_size, n_kv_heads, head_dim]` bf16.
pub(crate) struct CudaKv {
    pub(crate) k: Vec<CudaSlice<bf16>>,
    pub(crate) v: Vec<CudaSlice<bf16>>,
}

/// The step's packed metadata on the device plus its host-side layout.
pub(crate) struct CudaStep {
    /// Shared with the graph that replays this layout, if any.
    pub(crate) buf: Arc<CudaSlice<u32>>,
    pub(crate) layout: StepLayout,
}

impl CudaStep {
    /// Device address of word `offset` of the packed buffer.
    pub(crate) fn at(&self, stream: &CudaStream, offset: usize) -> u64 {
        raw(&self.buf, stream) + 4 * offset as u64
    }
}

fn foreign(op: &'static str, operand: &'static str) -> Error {
    checks::foreign(op, operand, BACKEND_NAME)
}

fn dtype_err(op: &'static str, operand: &'static str, expected: &str, actual: DType) -> Error {
    Error::DTypeMismatch {
        op,
        operand,
        expected: expected.to_owned(),
        actual,
    }
}

pub(crate) fn tensor<'a>(
    op: &'static str,
    operand: &'static str,
    t: &'a Tensor,
) -> Result<&'a DevBuf, Error> {
    t.storage::<CudaTensor>()
        .map(|s| s.0.as_ref())
        .ok_or_else(|| foreign(op, operand))
}

/// The tensor's shared buffer.
pub(crate) fn tensor_arc(
    op: &'static str,
    operand: &'static str,
    t: &Tensor,
) -> Result<Arc<DevBuf>, Error> {
    t.storage::<CudaTensor>()
        .map(|s| Arc::clone(&s.0))
        .ok_or_else(|| foreign(op, operand))
}

/// The tensor's buffer, which must be bf16.
pub(crate) fn tensor_bf16(
    op: &'static str,
    operand: &'static str,
    t: &Tensor,
) -> Result<u64, Error> {
    match tensor(op, operand, t)? {
        DevBuf::Bf16(s) => Ok(raw(s, s.stream())),
        DevBuf::F32(_) => Err(dtype_err(op, operand, "bf16", DType::F32)),
    }
}

pub(crate) fn weight<'a>(
    op: &'static str,
    operand: &'static str,
    w: &'a Weight,
) -> Result<&'a DevBuf, Error> {
    w.storage::<CudaWeight>()
        .map(|s| &s.0)
        .ok_or_else(|| foreign(op, operand))
}

pub(crate) fn weight_ptr(
    op: &'static str,
    operand: &'static str,
    w: &Weight,
    dtype: DType,
) -> Result<u64, Error> {
    let buf = weight(op, operand, w)?;
    if buf.dtype() != dtype {
        return Err(dtype_err(op, operand, dtype.as_str(), buf.dtype()));
    }
    Ok(match buf {
        DevBuf::Bf16(s) => raw(s, s.stream()),
        DevBuf::F32(s) => raw(s, s.stream()),
    })
}

pub(crate) fn kv<'a>(op: &'static str, kv: &'a KvCache) -> Result<&'a CudaKv, Error> {
    kv.storage::<CudaKv>().ok_or_else(|| foreign(op, "kv"))
}

pub(crate) fn step<'a>(op: &'static str, step: &'a PreparedStep) -> Result<&'a CudaStep, Error> {
    step.storage::<CudaStep>()
        .ok_or_else(|| foreign(op, "step"))
}
