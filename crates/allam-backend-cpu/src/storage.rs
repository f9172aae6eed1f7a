//! The private storage types behind the CPU backend's opaque handles, and the checked
//! downcasts every op starts with. Distinct newtypes per handle kind so a weight can never be
//! mistaken for an activation.

use allam_backend::{checks, Error, KvCache, PreparedStep, StepBatch, Tensor, Weight};

pub(crate) const BACKEND_NAME: &str = "cpu";

/// Activation storage: `numel` f32 values, row-major.
pub(crate) struct CpuTensor(pub(crate) Vec<f32>);

/// Weight storage, widened to f32 at upload.
pub(crate) struct CpuWeight(pub(crate) Vec<f32>);

/// Per-layer K and V arrays, each `[num_blocks, block_size, n_kv_heads, head_dim]`.
pub(crate) struct CpuKv {
    pub(crate) k: Vec<Vec<f32>>,
    pub(crate) v: Vec<Vec<f32>>,
}

/// The host batch plus, per query token, the index of its sequence.
pub(crate) struct CpuStep {
    pub(crate) batch: StepBatch,
    pub(crate) token_seq: Vec<u32>,
}

fn foreign(op: &'static str, operand: &'static str) -> Error {
    checks::foreign(op, operand, BACKEND_NAME)
}

pub(crate) fn tensor<'a>(
    op: &'static str,
    operand: &'static str,
    t: &'a Tensor,
) -> Result<&'a [f32], Error> {
    t.storage::<CpuTensor>()
        .map(|s| s.0.as_slice())
        .ok_or_else(|| foreign(op, operand))
}

pub(crate) fn tensor_mut<'a>(
    op: &'static str,
    operand: &'static str,
    t: &'a mut Tensor,
) -> Result<&'a mut [f32], Error> {
    t.storage_mut::<CpuTensor>()
        .map(|s| s.0.as_mut_slice())
        .ok_or_else(|| foreign(op, operand))
}

pub(crate) fn weight<'a>(
    op: &'static str,
    operand: &'static str,
    w: &'a Weight,
) -> Result<&'a [f32], Error> {
    w.storage::<CpuWeight>()
        .map(|s| s.0.as_slice())
        .ok_or_else(|| foreign(op, operand))
}

pub(crate) fn kv<'a>(op: &'static str, kv: &'a KvCache) -> Result<&'a CpuKv, Error> {
    kv.storage::<CpuKv>().ok_or_else(|| foreign(op, "kv"))
}

pub(crate) fn kv_mut<'a>(op: &'static str, kv: &'a mut KvCache) -> Result<&'a mut CpuKv, Error> {
    kv.storage_mut::<CpuKv>().ok_or_else(|| foreign(op, "kv"))
}

pub(crate) fn step<'a>(op: &'static str, step: &'a PreparedStep) -> Result<&'a CpuStep, Error> {
    step.storage::<CpuStep>().ok_or_else(|| foreign(op, "step"))
}
