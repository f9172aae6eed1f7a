//! Opaque device handles. Each wraps backend-private storage (`Box<dyn Any + Send + Sync>`)
//! plus the metadata every backend needs to check shapes, so the model can hold them without
//! knowing the device. A backend downcasts the storage with [`Tensor::storage`] and friends and
//! answers [`Error::ForeignHandle`](crate::Error::ForeignHandle) when the downcast fails.
//!
//! Invariant: the shape/dtype recorded in a handle always describe its storage; only the
//! backend that created a handle touches the storage.

use std::any::Any;
use std::fmt;

use crate::DType;

type Storage = Box<dyn Any + Send + Sync>;

/// A mutable activation buffer, row-major, in the backend's activation dtype.
pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    storage: Storage,
}

impl Tensor {
    /// For backend implementations: wraps `storage` that holds `shape` elements of `dtype`.
    pub fn new(shape: &[usize], dtype: DType, storage: Storage) -> Tensor {
        Tensor {
            shape: shape.to_vec(),
            dtype,
            storage,
        }
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// For backend implementations: the storage if it is a `T`.
    pub fn storage<T: 'static>(&self) -> Option<&T> {
        self.storage.downcast_ref()
    }
    /// For backend implementations: the storage if it is a `T`.
    pub fn storage_mut<T: 'static>(&mut self) -> Option<&mut T> {
        self.storage.downcast_mut()
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor({} {:?})", self.dtype, self.shape)
    }
}

/// An immutable weight, row-major. Linear weights are `[out, in]` (`y = x W^T`); the dtype is
/// whatever the backend chose to keep (CPU f32, CUDA bf16), not necessarily the checkpoint's.
pub struct Weight {
    name: String,
    shape: Vec<usize>,
    dtype: DType,
    storage: Storage,
}

impl Weight {
    /// For backend implementations: wraps `storage` for the weight called `name`.
    pub fn new(name: &str, shape: &[usize], dtype: DType, storage: Storage) -> Weight {
        Weight {
            name: name.to_owned(),
            shape: shape.to_vec(),
            dtype,
            storage,
        }
    }
    /// The name given at upload (checkpoint tensor name, or a fused name like `...qkv_proj`).
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// For backend implementations: the storage if it is a `T`.
    pub fn storage<T: 'static>(&self) -> Option<&T> {
        self.storage.downcast_ref()
    }
}

impl fmt::Debug for Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Weight({} {} {:?})", self.name, self.dtype, self.shape)
    }
}

/// Geometry of a paged KV cache.
///
/// Layout (every backend): for each layer, one K and one V array, each
/// `[num_blocks, block_size, n_kv_heads, head_dim]` row-major. Token slot `s` (as in
/// `StepBatch::slot_mapping`) is block `s / block_size`, row `s % block_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KvCacheSpec {
    pub num_layers: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    /// KV heads held by this rank (all of them at tensor-parallel size 1).
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl KvCacheSpec {
    /// Elements in one layer's K (or V) array.
    pub fn elements_per_layer(&self) -> usize {
        self.num_blocks * self.block_size * self.n_kv_heads * self.head_dim
    }
    /// Bytes one block takes over all layers, K and V, at `dtype`.
    pub fn bytes_per_block(&self, dtype: DType) -> usize {
        2 * self.num_layers
            * self.block_size
            * self.n_kv_heads
            * self.head_dim
            * dtype.size_in_bytes()
    }
    /// Bytes of the whole cache at `dtype`.
    pub fn total_bytes(&self, dtype: DType) -> usize {
        self.bytes_per_block(dtype) * self.num_blocks
    }
}

/// A paged KV cache allocated by a backend (see [`KvCacheSpec`] for the layout).
pub struct KvCache {
    spec: KvCacheSpec,
    dtype: DType,
    storage: Storage,
}

impl KvCache {
    /// For backend implementations.
    pub fn new(spec: KvCacheSpec, dtype: DType, storage: Storage) -> KvCache {
        KvCache {
            spec,
            dtype,
            storage,
        }
    }
    pub fn spec(&self) -> &KvCacheSpec {
        &self.spec
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// For backend implementations: the storage if it is a `T`.
    pub fn storage<T: 'static>(&self) -> Option<&T> {
        self.storage.downcast_ref()
    }
    /// For backend implementations: the storage if it is a `T`.
    pub fn storage_mut<T: 'static>(&mut self) -> Option<&mut T> {
        self.storage.downcast_mut()
    }
}

impl fmt::Debug for KvCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KvCache({} {:?})", self.dtype, self.spec)
    }
}

/// A validated [`StepBatch`](crate::StepBatch) whose metadata (ids, positions, slots, block
/// tables) a backend has copied to the device once for the whole step; every per-layer op
/// takes this instead of the host batch.
pub struct PreparedStep {
    num_tokens: usize,
    num_seqs: usize,
    num_logits_rows: usize,
    block_size: usize,
    storage: Storage,
}

impl PreparedStep {
    /// For backend implementations. Call only after [`StepBatch::validate`](crate::StepBatch::validate).
    pub fn new(batch: &crate::StepBatch, storage: Storage) -> PreparedStep {
        PreparedStep {
            num_tokens: batch.num_tokens(),
            num_seqs: batch.seqs.len(),
            num_logits_rows: batch.logits_rows.len(),
            block_size: batch.block_size as usize,
            storage,
        }
    }
    /// Query tokens in the step (rows of every activation).
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }
    pub fn num_seqs(&self) -> usize {
        self.num_seqs
    }
    /// Rows [`Backend::gather_rows`](crate::Backend::gather_rows) produces.
    pub fn num_logits_rows(&self) -> usize {
        self.num_logits_rows
    }
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    /// For backend implementations: the storage if it is a `T`.
    pub fn storage<T: 'static>(&self) -> Option<&T> {
        self.storage.downcast_ref()
    }
}

impl fmt::Debug for PreparedStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PreparedStep(tokens={}, seqs={}, logits_rows={})",
            self.num_tokens, self.num_seqs, self.num_logits_rows
        )
    }
}
