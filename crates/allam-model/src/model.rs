//! `Model`: Llama weights on a backend and the forward pass over one `StepBatch`.
//!
//! The forward pass is written once against `dyn Backend`; per layer:
//! `h = norm(x)`, `qkv = h Wqkv^T`, RoPE on q/k, K/V into the paged cache, paged attention,
//! `x += attn Wo^T` (all-reduced under tensor parallelism), `h = norm(x)`,
//! `x += (silu(h Wg^T) * h Wu^T) Wd^T` (all-reduced). Residual adds are fused into the next
//! norm. Only rows in `logits_rows` go through the final norm's gather and `lm_head`.
//!
//! Tensor parallelism (see `shard.rs`): each rank runs the same pass over its slices. The
//! embedding lookup of a vocabulary slice is all-reduced, o_proj and down_proj outputs are
//! all-reduced, and lm_head's vocabulary slices of the logits are all-gathered, so every rank
//! ends with the whole logits. Every rank must call `forward` with the same batch.

use std::ops::Range;

use allam_backend::{
    AttentionLayout, Backend, GraphStep, KvCache, KvCacheSpec, PreparedStep, StepBatch, Tensor,
    Weight,
};

use crate::shard::{ShardPlan, TpShard};
use crate::{Error, ModelConfig};

pub(crate) struct LayerWeights {
    pub(crate) input_norm: Weight,
    /// `[q_dim + 2 * kv_dim, hidden]`, rows `[q | k | v]`.
    pub(crate) qkv: Weight,
    pub(crate) o_proj: Weight,
    pub(crate) post_norm: Weight,
    /// `[2 * intermediate, hidden]`, rows `[gate | up]`.
    pub(crate) gate_up: Weight,
    pub(crate) down: Weight,
}

/// A Llama model whose weights live on one backend (all of them, or one tensor-parallel
/// rank's slices).
pub struct Model {
    config: ModelConfig,
    shard: TpShard,
    /// This rank's attention geometry (all heads at world size 1).
    layout: AttentionLayout,
    /// This rank's columns of the intermediate size.
    intermediate_local: usize,
    /// This rank's rows of the embedding and lm_head.
    vocab_range: Range<usize>,
    rms_norm_eps: f32,
    embed: Weight,
    layers: Vec<LayerWeights>,
    final_norm: Weight,
    /// `None` when embeddings are tied: `embed` doubles as the output projection.
    lm_head: Option<Weight>,
    rope_table: Weight,
}

/// Per-step activation buffers.
struct Activations {
    residual: Tensor,
    normed: Tensor,
    qkv: Tensor,
    attn: Tensor,
    /// Output of o_proj, then of down_proj: what the next norm adds to `residual`.
    delta: Tensor,
    gate_up: Tensor,
    act: Tensor,
}

impl Model {
    pub(crate) fn new(
        config: ModelConfig,
        plan: ShardPlan,
        embed: Weight,
        layers: Vec<LayerWeights>,
        final_norm: Weight,
        lm_head: Option<Weight>,
        rope_table: Weight,
    ) -> Model {
        Model {
            shard: plan.shard,
            layout: plan.layout,
            intermediate_local: plan.inter.len(),
            vocab_range: plan.vocab,
            rms_norm_eps: config.rms_norm_eps as f32,
            config,
            embed,
            layers,
            final_norm,
            lm_head,
            rope_table,
        }
    }

    /// The whole model's config (not this rank's slice of it).
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// This model's place in its tensor-parallel group.
    pub fn tp_shard(&self) -> TpShard {
        self.shard
    }

    /// Bytes of the checkpoint weights this rank holds on its backend, in the backend's
    /// weight dtype (about 1/N of the whole under tensor parallelism of N).
    pub fn weight_bytes(&self) -> u64 {
        let bytes = |w: &Weight| (w.numel() * w.dtype().size_in_bytes()) as u64;
        let layers: u64 = self
            .layers
            .iter()
            .map(|l| {
                [
                    &l.input_norm,
                    &l.qkv,
                    &l.o_proj,
                    &l.post_norm,
                    &l.gate_up,
                    &l.down,
                ]
                .into_iter()
                .map(bytes)
                .sum::<u64>()
            })
            .sum();
        bytes(&self.embed)
            + layers
            + bytes(&self.final_norm)
            + self.lm_head.as_ref().map_or(0, bytes)
    }

    /// The KV cache geometry for `num_blocks` blocks of `block_size` tokens.
    pub fn kv_cache_spec(&self, num_blocks: usize, block_size: usize) -> KvCacheSpec {
        KvCacheSpec {
            num_layers: self.config.num_hidden_layers,
            num_blocks,
            block_size,
            n_kv_heads: self.layout.n_kv_heads,
            head_dim: self.layout.head_dim,
        }
    }

    /// Bytes one KV block of `block_size` tokens takes over all layers (K and V), in the
    /// backend's cache dtype.
    pub fn kv_cache_bytes_per_block(&self, backend: &dyn Backend, block_size: usize) -> usize {
        self.kv_cache_spec(1, block_size)
            .bytes_per_block(backend.info().kv_cache_dtype)
    }

    pub fn alloc_kv_cache(
        &self,
        backend: &mut dyn Backend,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<KvCache, Error> {
        backend
            .alloc_kv_cache(&self.kv_cache_spec(num_blocks, block_size))
            .map_err(Error::backend(format!(
                "allocating a KV cache of {num_blocks} blocks x {block_size} tokens"
            )))
    }

    /// Runs one step; returns host f32 logits, row-major `[batch.logits_rows.len(), vocab_size]`
    /// (empty when no rows are asked for, e.g. a prefill chunk that is not the last).
    pub fn forward(
        &self,
        backend: &mut dyn Backend,
        kv: &mut KvCache,
        batch: &StepBatch,
    ) -> Result<Vec<f32>, Error> {
        match self.forward_logits(backend, kv, batch)? {
            Some(logits) => backend
                .to_host_f32(&logits)
                .map_err(Error::backend("copying logits to the host")),
            None => Ok(Vec::new()),
        }
    }

    /// Runs one step and leaves the logits on the device: an f32 `[batch.logits_rows.len(),
    /// vocab_size]` tensor for [`Backend::sample`] or [`Backend::to_host_f32`] (on every rank
    /// with tensor parallelism); `None` when the step asks for no rows.
    pub fn forward_logits(
        &self,
        backend: &mut dyn Backend,
        kv: &mut KvCache,
        batch: &StepBatch,
    ) -> Result<Option<Tensor>, Error> {
        let graph = backend
            .graph_step(batch, kv)
            .map_err(Error::backend("preparing the step"))?;
        let step = match graph {
            GraphStep::Eager => backend
                .prepare_step(batch, kv)
                .map_err(Error::backend("preparing the step"))?,
            GraphStep::Replayed(logits) => return Ok(Some(logits)),
            GraphStep::Capture(step) => return self.forward_and_capture(backend, kv, &step),
        };
        self.forward_step(backend, kv, &step)
    }

    /// A [`GraphStep::Capture`]: the real pass, then the recorded one. A failed recording
    /// costs only the graph (logged); the step's result is the real pass's either way.
    fn forward_and_capture(
        &self,
        backend: &mut dyn Backend,
        kv: &mut KvCache,
        step: &PreparedStep,
    ) -> Result<Option<Tensor>, Error> {
        let Some(eager) = self.forward_step(backend, kv, step)? else {
            return Ok(None);
        };
        let captured = match backend.graph_capture_begin() {
            Ok(()) => match self.forward_step(backend, kv, step) {
                Ok(logits) => logits,
                Err(e) => {
                    tracing::warn!(error = %e, "recording a step graph failed; this batch size runs eagerly");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "starting a step graph failed; this batch size runs eagerly");
                None
            }
        };
        backend
            .graph_capture_end(captured.as_ref(), eager)
            .map(Some)
            .map_err(Error::backend("finishing a step graph"))
    }

    /// The layers over a prepared step.
    fn forward_step(
        &self,
        backend: &mut dyn Backend,
        kv: &mut KvCache,
        step: &PreparedStep,
    ) -> Result<Option<Tensor>, Error> {
        let n = step.num_tokens();
        if n == 0 {
            return Ok(None);
        }
        let err = |op: &'static str, layer: usize| {
            move |source| Error::Backend {
                context: format!("layer {layer}: {op}"),
                source,
            }
        };
        let mut a = self.alloc_activations(backend, n)?;
        let eps = self.rms_norm_eps;
        let layout = &self.layout;
        if self.shard.world_size == 1 {
            backend
                .embedding(&self.embed, step, &mut a.residual)
                .map_err(Error::backend("embedding"))?;
        } else {
            backend
                .embedding_shard(
                    &self.embed,
                    self.vocab_range.start,
                    self.config.vocab_size,
                    step,
                    &mut a.residual,
                )
                .map_err(Error::backend("embedding"))?;
            backend
                .all_reduce_sum(&mut a.residual)
                .map_err(Error::backend("embedding all-reduce"))?;
        }
        for (i, layer) in self.layers.iter().enumerate() {
            if i == 0 {
                backend.rms_norm(&a.residual, &layer.input_norm, eps, &mut a.normed)
            } else {
                backend.add_rms_norm(
                    &mut a.residual,
                    &a.delta,
                    &layer.input_norm,
                    eps,
                    &mut a.normed,
                )
            }
            .map_err(err("input norm", i))?;
            backend
                .linear(&a.normed, &layer.qkv, &mut a.qkv)
                .map_err(err("qkv projection", i))?;
            backend
                .rope(&mut a.qkv, layout, &self.rope_table, step)
                .map_err(err("rope", i))?;
            backend
                .kv_write(&a.qkv, layout, kv, i, step)
                .map_err(err("kv write", i))?;
            backend
                .attention(&a.qkv, layout, kv, i, step, &mut a.attn)
                .map_err(err("attention", i))?;
            backend
                .linear(&a.attn, &layer.o_proj, &mut a.delta)
                .map_err(err("o projection", i))?;
            backend
                .all_reduce_sum(&mut a.delta)
                .map_err(err("attention all-reduce", i))?;
            backend
                .add_rms_norm(
                    &mut a.residual,
                    &a.delta,
                    &layer.post_norm,
                    eps,
                    &mut a.normed,
                )
                .map_err(err("post-attention norm", i))?;
            backend
                .linear(&a.normed, &layer.gate_up, &mut a.gate_up)
                .map_err(err("gate/up projection", i))?;
            backend
                .silu_mul(&a.gate_up, &mut a.act)
                .map_err(err("silu-mul", i))?;
            backend
                .linear(&a.act, &layer.down, &mut a.delta)
                .map_err(err("down projection", i))?;
            backend
                .all_reduce_sum(&mut a.delta)
                .map_err(err("mlp all-reduce", i))?;
        }
        backend
            .add_rms_norm(
                &mut a.residual,
                &a.delta,
                &self.final_norm,
                eps,
                &mut a.normed,
            )
            .map_err(Error::backend("final norm"))?;
        let rows = step.num_logits_rows();
        if rows == 0 {
            return Ok(None);
        }
        let hidden = self.config.hidden_size;
        let mut picked = backend
            .alloc(&[rows, hidden])
            .map_err(Error::backend("allocating logits rows"))?;
        backend
            .gather_rows(&a.normed, step, &mut picked)
            .map_err(Error::backend("gathering logits rows"))?;
        let mut logits = backend
            .alloc_logits(&[rows, self.vocab_range.len()])
            .map_err(Error::backend("allocating logits"))?;
        let lm_head = self.lm_head.as_ref().unwrap_or(&self.embed);
        backend
            .linear(&picked, lm_head, &mut logits)
            .map_err(Error::backend("lm_head"))?;
        if self.shard.world_size > 1 {
            let mut all = backend
                .alloc_logits(&[rows, self.config.vocab_size])
                .map_err(Error::backend("allocating gathered logits"))?;
            backend
                .all_gather_cols(&logits, &mut all)
                .map_err(Error::backend("logits all-gather"))?;
            logits = all;
        }
        Ok(Some(logits))
    }

    fn alloc_activations(&self, backend: &mut dyn Backend, n: usize) -> Result<Activations, Error> {
        let h = self.config.hidden_size;
        let inter = self.intermediate_local;
        let mut alloc = |cols: usize| {
            backend.alloc(&[n, cols]).map_err(Error::backend(format!(
                "allocating activations [{n}, {cols}]"
            )))
        };
        Ok(Activations {
            residual: alloc(h)?,
            normed: alloc(h)?,
            qkv: alloc(self.layout.qkv_width())?,
            attn: alloc(self.layout.q_width())?,
            delta: alloc(h)?,
            gate_up: alloc(2 * inter)?,
            act: alloc(inter)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_and_cache_can_move_to_the_engine_thread() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Model>();
        assert_send_sync::<KvCache>();
    }
}
