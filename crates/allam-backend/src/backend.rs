//! The `Backend` trait: one method per fused device op of the Llama forward pass.
//!
//! Granularity: coarse enough that a CUDA backend maps each method to one kernel (or one cuBLAS
//! call), fine enough that `allam-model` writes the forward pass once for every device.
//! Every op writes into caller-allocated outputs, so a backend never allocates inside a layer
//! and shapes are checked once per op against the caller's intent.
//!
//! Activation layout: 2-D row-major `[rows, cols]`, one row per query token of the step.
//! The fused attention projection output `qkv` is `[num_tokens, (n_heads + 2 * n_kv_heads) *
//! head_dim]`, each row `[q heads | k heads | v heads]`, each head `head_dim` contiguous
//! values. The fused MLP projection output is `[num_tokens, 2 * intermediate]`, each row
//! `[gate | up]`.

use crate::sampling::{sample_row, RowSampling, SampledToken};
use crate::{checks, DType, Error, KvCache, KvCacheSpec, PreparedStep, StepBatch, Tensor, Weight};

/// What a backend is and what it computes in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendInfo {
    /// Short stable name, e.g. `cpu`, `cuda`.
    pub name: &'static str,
    /// Human-readable device description (CPU model and threads, GPU name).
    pub device: String,
    /// dtype of every [`Tensor`] this backend allocates.
    pub activation_dtype: DType,
    /// dtype of the KV cache (used to size it).
    pub kv_cache_dtype: DType,
}

/// Head geometry of one attention layer on this rank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionLayout {
    /// Query heads on this rank.
    pub n_heads: usize,
    /// KV heads on this rank; divides `n_heads` (query head `j` reads KV head
    /// `j / (n_heads / n_kv_heads)`).
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies `q . k` before the softmax (`1 / sqrt(head_dim)` for Llama).
    pub softmax_scale: f32,
}

impl AttentionLayout {
    /// Width of one `qkv` row.
    pub fn qkv_width(&self) -> usize {
        (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
    }
    /// Width of one attention output row (`n_heads * head_dim`).
    pub fn q_width(&self) -> usize {
        self.n_heads * self.head_dim
    }
    /// Width of the K (or V) part of a `qkv` row.
    pub fn kv_width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// How [`Backend::graph_step`] wants a step run.
pub enum GraphStep {
    /// Run the ops one by one, with a step from [`Backend::prepare_step`].
    Eager,
    /// The backend replayed a captured forward pass for this batch; these are its logits,
    /// `[batch.logits_rows.len(), vocab]`, as the eager pass would have returned them.
    Replayed(Tensor),
    /// Capture this batch's shape: run the forward pass with this (padded) step for real,
    /// then again between [`Backend::graph_capture_begin`] and [`Backend::graph_capture_end`]
    /// while the backend records it; the second pass computes nothing.
    Capture(PreparedStep),
}

/// The device operations the model is written against. Object safe; the engine holds a
/// `Box<dyn Backend>` on its own thread (hence `Send`, not `Sync`).
///
/// Contract shared by every op: shapes are checked and a mismatch is
/// [`Error::ShapeMismatch`] naming the op and operand; a handle made by another backend is
/// [`Error::ForeignHandle`]; ops may run asynchronously on the device, and only
/// [`Backend::to_host_f32`] synchronizes.
pub trait Backend: Send {
    fn info(&self) -> BackendInfo;

    /// Bytes still available for the KV cache: free device memory on a GPU, the configured
    /// budget minus what is allocated on the CPU.
    fn free_memory_bytes(&mut self) -> Result<u64, Error>;

    /// Uploads a weight from little-endian row-major `bytes` of `dtype` and `shape`, converting
    /// to the backend's weight dtype. `name` is kept for messages.
    fn upload_weight(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<Weight, Error>;

    /// Uploads the RoPE table: `[max_positions, rotary_dim]` f32, row `p` =
    /// `[cos(p * f_0) .. cos(p * f_{d/2-1}), sin(p * f_0) .. sin(p * f_{d/2-1})]`.
    /// Kept in f32 on every backend (angles at large positions need it).
    fn upload_rope_table(
        &mut self,
        max_positions: usize,
        rotary_dim: usize,
        cos_sin: &[f32],
    ) -> Result<Weight, Error>;

    /// Allocates an activation tensor of the activation dtype; contents unspecified.
    fn alloc(&mut self, shape: &[usize]) -> Result<Tensor, Error>;

    /// Allocates the `lm_head` output. Logits reach ±50 on ALLaM-like models, where bf16's
    /// step is 0.25: a bf16 backend must keep them in f32 ([`Backend::linear`] writes f32
    /// when given an f32 output) or the logprobs and greedy margins lose their precision.
    fn alloc_logits(&mut self, shape: &[usize]) -> Result<Tensor, Error> {
        self.alloc(shape)
    }

    /// Uploads host f32 data as an activation tensor (tests, debugging).
    fn upload_f32(&mut self, shape: &[usize], data: &[f32]) -> Result<Tensor, Error>;

    /// Copies a tensor to the host as f32, waiting for queued work.
    fn to_host_f32(&mut self, x: &Tensor) -> Result<Vec<f32>, Error>;

    /// Waits for every queued op and reports a failure among them (an asynchronous device
    /// fault, or a collective that timed out). Tensor-parallel followers call it once per step,
    /// since they never read results back. A synchronous backend has nothing to wait for.
    fn synchronize(&mut self) -> Result<(), Error> {
        Ok(())
    }

    /// Copies rows `rows` (each `< x.shape()[0]`) of the 2-D tensor `x` to the host as f32,
    /// one after another, waiting for queued work: the logits rows the engine handles on the
    /// host, without the rest of the batch's. The default copies the whole tensor.
    fn rows_to_host_f32(&mut self, x: &Tensor, rows: &[usize]) -> Result<Vec<f32>, Error> {
        let (_, cols) = checks::check_row_picks("rows_to_host_f32", x.shape(), rows)?;
        let all = self.to_host_f32(x)?;
        Ok(rows
            .iter()
            .flat_map(|&r| all[r * cols..(r + 1) * cols].iter().copied())
            .collect())
    }

    /// Allocates a zeroed paged KV cache (layout in [`KvCacheSpec`]).
    fn alloc_kv_cache(&mut self, spec: &KvCacheSpec) -> Result<KvCache, Error>;

    /// Copies whole blocks `src -> dst` in every layer, K and V (copy-on-write of shared
    /// prefix blocks). Pairs are applied in order.
    fn copy_kv_blocks(&mut self, kv: &mut KvCache, pairs: &[(u32, u32)]) -> Result<(), Error>;

    /// Validates `batch` ([`StepBatch::validate`]) against `kv` and copies its metadata to
    /// the device, once per step.
    fn prepare_step(&mut self, batch: &StepBatch, kv: &KvCache) -> Result<PreparedStep, Error>;

    /// `out[t] = table[token_ids[t]]`; table `[vocab, hidden]`, out `[num_tokens, hidden]`.
    /// A token id outside the table is [`Error::InvalidBatch`].
    fn embedding(
        &mut self,
        table: &Weight,
        step: &PreparedStep,
        out: &mut Tensor,
    ) -> Result<(), Error>;

    /// `out = x / sqrt(mean(x^2) + eps) * weight`, row-wise; x, out `[rows, hidden]`.
    fn rms_norm(
        &mut self,
        x: &Tensor,
        weight: &Weight,
        eps: f32,
        out: &mut Tensor,
    ) -> Result<(), Error>;

    /// Fused residual add + norm: `residual += x; out = rms_norm(residual)`.
    fn add_rms_norm(
        &mut self,
        residual: &mut Tensor,
        x: &Tensor,
        weight: &Weight,
        eps: f32,
        out: &mut Tensor,
    ) -> Result<(), Error>;

    /// `out = x W^T`; x `[rows, in]`, weight `[out, in]`, out `[rows, out]`.
    fn linear(&mut self, x: &Tensor, weight: &Weight, out: &mut Tensor) -> Result<(), Error>;

    /// Rotates the q and k heads of `qkv` in place at each token's position (HF half-split
    /// "rotate_half" convention: element `i < d/2` pairs with `i + d/2`).
    /// `rope_table` comes from [`Backend::upload_rope_table`]; a position past its rows is
    /// [`Error::InvalidBatch`].
    fn rope(
        &mut self,
        qkv: &mut Tensor,
        layout: &AttentionLayout,
        rope_table: &Weight,
        step: &PreparedStep,
    ) -> Result<(), Error>;

    /// Writes the k and v heads of `qkv` into `layer` of the cache at `slot_mapping`.
    fn kv_write(
        &mut self,
        qkv: &Tensor,
        layout: &AttentionLayout,
        kv: &mut KvCache,
        layer: usize,
        step: &PreparedStep,
    ) -> Result<(), Error>;

    /// Causal paged attention for a mixed prefill/decode step: the query heads of `qkv` attend
    /// to positions `0..=position` of their sequence, read from `layer` of the cache through
    /// the block table (their own K/V must already be written by [`Backend::kv_write`]).
    /// Softmax in f32. out `[num_tokens, n_heads * head_dim]`.
    fn attention(
        &mut self,
        qkv: &Tensor,
        layout: &AttentionLayout,
        kv: &KvCache,
        layer: usize,
        step: &PreparedStep,
        out: &mut Tensor,
    ) -> Result<(), Error>;

    /// Vocabulary-parallel embedding: `table` holds rows `vocab_start .. vocab_start + rows`
    /// of the full `[vocab_size, hidden]` table. `out[t]` is the table row of `token_ids[t]`
    /// when the id falls in this slice and zeros otherwise, so an [`Backend::all_reduce_sum`]
    /// over the ranks completes the lookup. An id `>= vocab_size` is [`Error::InvalidBatch`].
    /// The default serves only the whole table (world size 1) through [`Backend::embedding`].
    fn embedding_shard(
        &mut self,
        table: &Weight,
        vocab_start: usize,
        vocab_size: usize,
        step: &PreparedStep,
        out: &mut Tensor,
    ) -> Result<(), Error> {
        if vocab_start == 0 && table.shape().first() == Some(&vocab_size) {
            return self.embedding(table, step, out);
        }
        Err(Error::Unsupported {
            op: "embedding_shard",
            backend: self.info().name,
            detail: format!(
                "a vocabulary slice from row {vocab_start} of {vocab_size} (tensor parallelism)"
            ),
        })
    }

    /// `out = silu(gate) * up` over `gate_up` `[rows, 2 * n]` = `[gate | up]`; out `[rows, n]`.
    fn silu_mul(&mut self, gate_up: &Tensor, out: &mut Tensor) -> Result<(), Error>;

    /// `out[i] = x[logits_rows[i]]`; x `[num_tokens, cols]`, out `[num_logits_rows, cols]`.
    fn gather_rows(
        &mut self,
        x: &Tensor,
        step: &PreparedStep,
        out: &mut Tensor,
    ) -> Result<(), Error>;

    /// Picks one token per row of `logits` (the f32 `[rows.len(), vocab]` `lm_head` output of
    /// [`Backend::alloc_logits`]) by the rules of [`crate::sampling`]; with `logprobs:
    /// Some(n)` (`n <= MAX_TOP_LOGPROBS`) also each pick's raw logprob and the row's `n`
    /// largest. Waits for queued work. Only ids and a few floats come back: a GPU backend
    /// samples in a kernel so the logits never cross to the host. The default reads them to
    /// the host and applies [`sample_row`], which is the statement every override must match.
    fn sample(
        &mut self,
        logits: &Tensor,
        rows: &[RowSampling],
        logprobs: Option<usize>,
    ) -> Result<Vec<SampledToken>, Error> {
        let vocab = checks::sample_args(
            "sample",
            self.info().name,
            logits.shape(),
            rows.len(),
            logprobs,
        )?;
        let host = self.to_host_f32(logits)?;
        Ok(rows
            .iter()
            .zip(host.chunks_exact(vocab))
            .map(|(p, row)| sample_row(row, p, logprobs))
            .collect())
    }

    /// Decides whether `batch` replays captured device work (CUDA graphs for decode steps):
    /// validates it as [`Backend::prepare_step`] does, then answers [`GraphStep`]. The
    /// default, for backends without graphs, is [`GraphStep::Eager`].
    fn graph_step(&mut self, batch: &StepBatch, kv: &KvCache) -> Result<GraphStep, Error> {
        let _ = (batch, kv);
        Ok(GraphStep::Eager)
    }

    /// The decode batch sizes this backend replays from captured graphs (empty without
    /// graphs). The engine runs one padding-only step of each before serving, so captures
    /// happen, and run out of memory if they must, at start-up rather than under load.
    fn graph_batch_sizes(&self) -> Vec<usize> {
        Vec::new()
    }

    /// After the real pass of a [`GraphStep::Capture`]: starts recording.
    fn graph_capture_begin(&mut self) -> Result<(), Error> {
        Err(Error::Unsupported {
            op: "graph_capture_begin",
            backend: self.info().name,
            detail: "captured graphs".to_owned(),
        })
    }

    /// Ends the recording of a [`GraphStep::Capture`] (keeping the graph when the recording
    /// pass gave `captured` logits, dropping it otherwise) and returns the real pass's
    /// logits `eager` cut to the batch's own rows.
    fn graph_capture_end(
        &mut self,
        captured: Option<&Tensor>,
        eager: Tensor,
    ) -> Result<Tensor, Error> {
        let _ = captured;
        Ok(eager)
    }

    /// Ranks in this backend's tensor-parallel group (1 = no parallelism).
    fn world_size(&self) -> usize {
        1
    }

    /// This backend's rank in its tensor-parallel group.
    fn rank(&self) -> usize {
        0
    }

    /// Sums `x` elementwise over all ranks, in place (after row-parallel `o_proj` and
    /// `down_proj`). The model calls it unconditionally; at world size 1 it is a no-op, and a
    /// backend with more ranks must override it.
    fn all_reduce_sum(&mut self, x: &mut Tensor) -> Result<(), Error> {
        let _ = x;
        if self.world_size() == 1 {
            Ok(())
        } else {
            Err(Error::Unsupported {
                op: "all_reduce_sum",
                backend: self.info().name,
                detail: format!("world size {} without an all-reduce", self.world_size()),
            })
        }
    }

    /// Concatenates every rank's `x` (`[rows, cols_r]`, same `rows` everywhere) along the
    /// columns, in rank order, into `out` `[rows, sum of cols_r]`: the vocabulary-parallel
    /// `lm_head` gathers its logits with it. The model calls it only at world size > 1; a
    /// backend with more ranks must override it.
    fn all_gather_cols(&mut self, x: &Tensor, out: &mut Tensor) -> Result<(), Error> {
        let _ = (x, out);
        Err(Error::Unsupported {
            op: "all_gather_cols",
            backend: self.info().name,
            detail: format!("world size {} without an all-gather", self.world_size()),
        })
    }
}
