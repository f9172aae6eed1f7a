//! `CpuBackend`: the f32 reference implementation of every `allam_backend::Backend` op.
//!
//! Weights of any checkpoint dtype are widened to f32 at upload; activations and the paged KV
//! cache are f32 host vectors. Matmuls and row-wise ops run on a private rayon pool (one
//! thread per core unless configured). The CUDA backend's kernels are tested against these
//! ops, so clarity wins over speed everywhere except `matmul.rs`.
//!
//! Memory: "free memory" is a configured KV-cache budget minus the KV caches allocated so far
//! (weights are not counted: the host has no hard limit worth modelling).
//!
//! Tensor parallelism: a backend built with [`CpuBackend::with_communicator`] is one rank of a
//! group; `all_reduce_sum` and `all_gather_cols` go through the `allam_comm::Communicator`
//! (ranks in separate processes), and a failed collective is `Error::Collective`.

mod attention;
mod error;
mod matmul;
mod rowwise;
mod storage;
mod tp;

use std::sync::Arc;

use allam_comm::Communicator;

use allam_backend::sampling::sample_row;
use allam_backend::{
    decode_to_f32, AttentionLayout, Backend, BackendInfo, DType, Error as OpError, KvCache,
    KvCacheSpec, PreparedStep, RowSampling, SampledToken, StepBatch, Tensor, Weight,
};

use allam_backend::checks;
pub use error::Error;
use storage::{CpuKv, CpuStep, CpuTensor, CpuWeight, BACKEND_NAME};

/// Construction options of a [`CpuBackend`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuBackendConfig {
    /// Worker threads; `None` = one per available core.
    pub threads: Option<usize>,
    /// Bytes the KV cache may take (what [`Backend::free_memory_bytes`] reports before any
    /// cache is allocated).
    pub kv_cache_budget_bytes: u64,
}

impl Default for CpuBackendConfig {
    fn default() -> Self {
        CpuBackendConfig {
            threads: None,
            kv_cache_budget_bytes: 1 << 30,
        }
    }
}

/// The CPU backend (f32).
pub struct CpuBackend {
    pool: Arc<rayon::ThreadPool>,
    threads: usize,
    kv_cache_budget_bytes: u64,
    kv_cache_allocated_bytes: u64,
    /// The tensor-parallel group; `None` = a group of one.
    comm: Option<Arc<dyn Communicator>>,
}

impl CpuBackend {
    pub fn new(config: &CpuBackendConfig) -> Result<CpuBackend, Error> {
        let threads = config
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("allam-cpu-{i}"))
            .build()
            .map_err(|e| Error::ThreadPool {
                threads,
                message: e.to_string(),
            })?;
        Ok(CpuBackend {
            pool: Arc::new(pool),
            threads,
            kv_cache_budget_bytes: config.kv_cache_budget_bytes,
            kv_cache_allocated_bytes: 0,
            comm: None,
        })
    }

    /// A backend that is rank `comm.rank()` of a tensor-parallel group of
    /// `comm.world_size()`: the model loaded onto it takes only this rank's slices.
    pub fn with_communicator(
        config: &CpuBackendConfig,
        comm: Arc<dyn Communicator>,
    ) -> Result<CpuBackend, Error> {
        let mut backend = CpuBackend::new(config)?;
        backend.comm = Some(comm);
        Ok(backend)
    }

    /// Worker threads of this backend's pool.
    pub fn threads(&self) -> usize {
        self.threads
    }
}

fn new_tensor(shape: &[usize], data: Vec<f32>) -> Tensor {
    Tensor::new(shape, DType::F32, Box::new(CpuTensor(data)))
}

fn check_layout(op: &'static str, layout: &AttentionLayout) -> Result<(), OpError> {
    if layout.n_kv_heads == 0
        || layout.head_dim == 0
        || !layout.n_heads.is_multiple_of(layout.n_kv_heads)
    {
        return Err(OpError::Unsupported {
            op,
            backend: BACKEND_NAME,
            detail: format!(
                "attention layout with {} heads, {} KV heads, head_dim {}",
                layout.n_heads, layout.n_kv_heads, layout.head_dim
            ),
        });
    }
    Ok(())
}

impl Backend for CpuBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            name: BACKEND_NAME,
            device: match &self.comm {
                Some(comm) if comm.world_size() > 1 => format!(
                    "host CPU, {} threads, rank {} of {}",
                    self.threads,
                    comm.rank(),
                    comm.world_size()
                ),
                _ => format!("host CPU, {} threads", self.threads),
            },
            activation_dtype: DType::F32,
            kv_cache_dtype: DType::F32,
        }
    }

    fn free_memory_bytes(&mut self) -> Result<u64, OpError> {
        Ok(self
            .kv_cache_budget_bytes
            .saturating_sub(self.kv_cache_allocated_bytes))
    }

    fn upload_weight(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<Weight, OpError> {
        checks::check_weight_bytes(name, dtype, shape, bytes.len())?;
        let data = decode_to_f32(dtype, bytes).expect("byte length checked against dtype above");
        Ok(Weight::new(
            name,
            shape,
            DType::F32,
            Box::new(CpuWeight(data)),
        ))
    }

    fn upload_rope_table(
        &mut self,
        max_positions: usize,
        rotary_dim: usize,
        cos_sin: &[f32],
    ) -> Result<Weight, OpError> {
        checks::check_rope_cos_sin(max_positions, rotary_dim, cos_sin.len(), false)?;
        Ok(Weight::new(
            "rope_table",
            &[max_positions, rotary_dim],
            DType::F32,
            Box::new(CpuWeight(cos_sin.to_vec())),
        ))
    }

    fn alloc(&mut self, shape: &[usize]) -> Result<Tensor, OpError> {
        Ok(new_tensor(shape, vec![0.0; shape.iter().product()]))
    }

    fn upload_f32(&mut self, shape: &[usize], data: &[f32]) -> Result<Tensor, OpError> {
        checks::check_upload_f32(shape, data.len())?;
        Ok(new_tensor(shape, data.to_vec()))
    }

    fn to_host_f32(&mut self, x: &Tensor) -> Result<Vec<f32>, OpError> {
        Ok(storage::tensor("to_host_f32", "x", x)?.to_vec())
    }

    /// The trait's rules, rows in parallel on the backend's pool and read in place (a top-p
    /// row at 64k vocabulary costs most of a millisecond).
    fn sample(
        &mut self,
        logits: &Tensor,
        rows: &[RowSampling],
        logprobs: Option<usize>,
    ) -> Result<Vec<SampledToken>, OpError> {
        use rayon::prelude::*;
        let vocab =
            checks::sample_args("sample", BACKEND_NAME, logits.shape(), rows.len(), logprobs)?;
        let data = storage::tensor("sample", "logits", logits)?;
        Ok(self.pool.install(|| {
            rows.par_iter()
                .zip(data.par_chunks_exact(vocab))
                .map(|(p, row)| sample_row(row, p, logprobs))
                .collect()
        }))
    }

    fn alloc_kv_cache(&mut self, spec: &KvCacheSpec) -> Result<KvCache, OpError> {
        let bytes = spec.total_bytes(DType::F32) as u64;
        let free = self.free_memory_bytes()?;
        checks::check_kv_fits(spec, bytes, free)?;
        let per_layer = spec.elements_per_layer();
        let kv = CpuKv {
            k: (0..spec.num_layers).map(|_| vec![0.0; per_layer]).collect(),
            v: (0..spec.num_layers).map(|_| vec![0.0; per_layer]).collect(),
        };
        self.kv_cache_allocated_bytes += bytes;
        Ok(KvCache::new(*spec, DType::F32, Box::new(kv)))
    }

    fn copy_kv_blocks(&mut self, kv: &mut KvCache, pairs: &[(u32, u32)]) -> Result<(), OpError> {
        let spec = *kv.spec();
        checks::check_copy_pairs("copy_kv_blocks", pairs, spec.num_blocks)?;
        let block_elems = spec.block_size * spec.n_kv_heads * spec.head_dim;
        let cache = storage::kv_mut("copy_kv_blocks", kv)?;
        for layer in cache.k.iter_mut().chain(cache.v.iter_mut()) {
            attention::copy_blocks(layer, block_elems, pairs);
        }
        Ok(())
    }

    fn prepare_step(&mut self, batch: &StepBatch, kv: &KvCache) -> Result<PreparedStep, OpError> {
        storage::kv("prepare_step", kv)?;
        checks::check_step_batch("prepare_step", batch, kv.spec())?;
        let mut token_seq = Vec::with_capacity(batch.num_tokens());
        for (i, seq) in batch.seqs.iter().enumerate() {
            token_seq.extend(std::iter::repeat_n(i as u32, seq.query_len as usize));
        }
        let step = CpuStep {
            batch: batch.clone(),
            token_seq,
        };
        Ok(PreparedStep::new(batch, Box::new(step)))
    }

    fn embedding(
        &mut self,
        table: &Weight,
        step: &PreparedStep,
        out: &mut Tensor,
    ) -> Result<(), OpError> {
        const OP: &str = "embedding";
        let (vocab, hidden) = checks::check_embedding(OP, table, step, out)?;
        let ids = &storage::step(OP, step)?.batch.token_ids;
        checks::check_token_ids(OP, ids.iter().copied(), vocab)?;
        let table = storage::weight(OP, "table", table)?;
        rowwise::embedding(table, hidden, ids, storage::tensor_mut(OP, "out", out)?);
        Ok(())
    }

    fn rms_norm(
        &mut self,
        x: &Tensor,
        weight: &Weight,
        eps: f32,
        out: &mut Tensor,
    ) -> Result<(), OpError> {
        const OP: &str = "rms_norm";
        checks::check_rms_norm(OP, x, weight, out)?;
        let (x, w) = (
            storage::tensor(OP, "x", x)?,
            storage::weight(OP, "weight", weight)?,
        );
        let out = storage::tensor_mut(OP, "out", out)?;
        self.pool.install(|| rowwise::rms_norm(x, w, eps, out));
        Ok(())
    }

    fn add_rms_norm(
        &mut self,
        residual: &mut Tensor,
        x: &Tensor,
        weight: &Weight,
        eps: f32,
        out: &mut Tensor,
    ) -> Result<(), OpError> {
        const OP: &str = "add_rms_norm";
        checks::check_add_rms_norm(OP, residual, x, weight, out)?;
        let (x, w) = (
            storage::tensor(OP, "x", x)?,
            storage::weight(OP, "weight", weight)?,
        );
        let residual = storage::tensor_mut(OP, "residual", residual)?;
        let out = storage::tensor_mut(OP, "out", out)?;
        self.pool
            .install(|| rowwise::add_rms_norm(residual, x, w, eps, out));
        Ok(())
    }

    fn linear(&mut self, x: &Tensor, weight: &Weight, out: &mut Tensor) -> Result<(), OpError> {
        const OP: &str = "linear";
        let (rows, k, n) = checks::check_linear(OP, x, weight, out)?;
        let (x, w) = (
            storage::tensor(OP, "x", x)?,
            storage::weight(OP, "weight", weight)?,
        );
        let out = storage::tensor_mut(OP, "out", out)?;
        self.pool.install(|| matmul::linear(x, rows, k, w, n, out));
        Ok(())
    }

    fn rope(
        &mut self,
        qkv: &mut Tensor,
        layout: &AttentionLayout,
        rope_table: &Weight,
        step: &PreparedStep,
    ) -> Result<(), OpError> {
        const OP: &str = "rope";
        check_layout(OP, layout)?;
        checks::check_qkv(OP, qkv, layout, step)?;
        let (max_positions, _) = checks::check_rope_table(OP, rope_table, layout)?;
        let positions = &storage::step(OP, step)?.batch.positions;
        checks::check_positions(OP, positions.iter().copied(), max_positions)?;
        let table = storage::weight(OP, "rope_table", rope_table)?;
        let qkv = storage::tensor_mut(OP, "qkv", qkv)?;
        self.pool
            .install(|| attention::rope(qkv, layout, table, positions));
        Ok(())
    }

    fn kv_write(
        &mut self,
        qkv: &Tensor,
        layout: &AttentionLayout,
        kv: &mut KvCache,
        layer: usize,
        step: &PreparedStep,
    ) -> Result<(), OpError> {
        const OP: &str = "kv_write";
        check_layout(OP, layout)?;
        checks::check_kv_write(OP, qkv, layout, kv, layer, step)?;
        let slots = &storage::step(OP, step)?.batch.slot_mapping;
        let qkv = storage::tensor(OP, "qkv", qkv)?;
        let cache = storage::kv_mut(OP, kv)?;
        attention::kv_write(qkv, layout, &mut cache.k[layer], &mut cache.v[layer], slots);
        Ok(())
    }

    fn attention(
        &mut self,
        qkv: &Tensor,
        layout: &AttentionLayout,
        kv: &KvCache,
        layer: usize,
        step: &PreparedStep,
        out: &mut Tensor,
    ) -> Result<(), OpError> {
        const OP: &str = "attention";
        check_layout(OP, layout)?;
        checks::check_attention(OP, qkv, layout, kv, layer, step, out)?;
        let cpu_step = storage::step(OP, step)?;
        let qkv = storage::tensor(OP, "qkv", qkv)?;
        let cache = storage::kv(OP, kv)?;
        let out = storage::tensor_mut(OP, "out", out)?;
        self.pool.install(|| {
            attention::attention(
                qkv,
                layout,
                &cache.k[layer],
                &cache.v[layer],
                &cpu_step.batch,
                &cpu_step.token_seq,
                out,
            )
        });
        Ok(())
    }

    fn silu_mul(&mut self, gate_up: &Tensor, out: &mut Tensor) -> Result<(), OpError> {
        const OP: &str = "silu_mul";
        let (_, inter) = checks::check_silu_mul(OP, gate_up, out)?;
        let gate_up = storage::tensor(OP, "gate_up", gate_up)?;
        let out = storage::tensor_mut(OP, "out", out)?;
        self.pool.install(|| rowwise::silu_mul(gate_up, inter, out));
        Ok(())
    }

    fn gather_rows(
        &mut self,
        x: &Tensor,
        step: &PreparedStep,
        out: &mut Tensor,
    ) -> Result<(), OpError> {
        const OP: &str = "gather_rows";
        let (_, cols) = checks::check_gather_rows(OP, x, step, out)?;
        let rows = &storage::step(OP, step)?.batch.logits_rows;
        let x = storage::tensor(OP, "x", x)?;
        rowwise::gather_rows(x, cols, rows, storage::tensor_mut(OP, "out", out)?);
        Ok(())
    }

    fn embedding_shard(
        &mut self,
        table: &Weight,
        vocab_start: usize,
        vocab_size: usize,
        step: &PreparedStep,
        out: &mut Tensor,
    ) -> Result<(), OpError> {
        tp::embedding_shard(table, vocab_start, vocab_size, step, out)
    }

    fn world_size(&self) -> usize {
        self.comm.as_ref().map_or(1, |c| c.world_size())
    }

    fn rank(&self) -> usize {
        self.comm.as_ref().map_or(0, |c| c.rank())
    }

    fn all_reduce_sum(&mut self, x: &mut Tensor) -> Result<(), OpError> {
        match &self.comm {
            Some(comm) => tp::all_reduce_sum(comm.as_ref(), x),
            None => Ok(()),
        }
    }

    fn all_gather_cols(&mut self, x: &Tensor, out: &mut Tensor) -> Result<(), OpError> {
        tp::all_gather_cols(self.comm.as_deref(), x, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> Box<dyn Backend> {
        let config = CpuBackendConfig {
            threads: Some(2),
            kv_cache_budget_bytes: 1 << 20,
        };
        Box::new(CpuBackend::new(&config).expect("backend"))
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn parallel_sampling_is_the_rules_row_by_row() {
        let mut b = backend();
        let (rows, vocab) = (9usize, 50usize);
        let data: Vec<f32> = (0..rows * vocab)
            .map(|i| ((i * 7919 % 101) as f32 - 50.0) / 9.0)
            .collect();
        let logits = b.upload_f32(&[rows, vocab], &data).expect("logits");
        let params: Vec<RowSampling> = (0..rows)
            .map(|r| RowSampling {
                temperature: [0.0, 0.7, 1.5][r % 3],
                top_k: [0, 5][r % 2],
                top_p: [1.0, 0.8, 0.95][(r / 3) % 3],
                uniform: r as f32 / rows as f32,
            })
            .collect();
        let got = b.sample(&logits, &params, Some(3)).expect("sample");
        for (r, (pick, p)) in got.iter().zip(&params).enumerate() {
            let want = sample_row(&data[r * vocab..(r + 1) * vocab], p, Some(3));
            assert_eq!(pick, &want, "row {r}");
        }
        let err = b
            .sample(&logits, &params[..2], None)
            .expect_err("row count");
        assert!(err.to_string().contains("logits"), "{err}");
    }

    #[test]
    fn chosen_rows_come_back_in_the_order_asked() {
        let mut b = backend();
        let data: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let x = b.upload_f32(&[4, 3], &data).expect("x");
        let rows = b.rows_to_host_f32(&x, &[3, 1, 3]).expect("rows");
        assert_eq!(rows, [9.0, 10.0, 11.0, 3.0, 4.0, 5.0, 9.0, 10.0, 11.0]);
        assert!(b.rows_to_host_f32(&x, &[]).expect("none").is_empty());
        let err = b.rows_to_host_f32(&x, &[4]).expect_err("row 4 of 4");
        assert!(err.to_string().contains("rows_to_host_f32"), "{err}");
    }

    #[test]
    fn shape_errors_name_op_operand_and_shapes() {
        let mut b = backend();
        let x = b.upload_f32(&[2, 4], &[0.0; 8]).expect("x");
        let w = b
            .upload_weight("w", DType::F32, &[3, 5], &f32_bytes(&[0.0; 15]))
            .expect("w");
        let mut out = b.alloc(&[2, 3]).expect("out");
        let err = b.linear(&x, &w, &mut out).expect_err("k mismatch");
        let msg = err.to_string();
        assert!(
            msg.contains("linear") && msg.contains("`weight`") && msg.contains("[3, 5]"),
            "{msg}"
        );
        let mut wrong_out = b.alloc(&[2, 4]).expect("out");
        let w_ok = b
            .upload_weight("w", DType::F32, &[3, 4], &f32_bytes(&[0.0; 12]))
            .expect("w");
        let msg = b
            .linear(&x, &w_ok, &mut wrong_out)
            .expect_err("out")
            .to_string();
        assert!(
            msg.contains("`out`") && msg.contains("[2, 4]") && msg.contains("[2, 3]"),
            "{msg}"
        );
    }

    #[test]
    fn foreign_handles_and_bad_weight_bytes_are_typed_errors() {
        let mut b = backend();
        let alien = Tensor::new(&[1, 2], DType::F32, Box::new(0u8));
        let w = b
            .upload_weight("w", DType::F32, &[1, 2], &f32_bytes(&[1.0, 2.0]))
            .expect("w");
        let mut out = b.alloc(&[1, 1]).expect("out");
        let err = b.linear(&alien, &w, &mut out).expect_err("foreign");
        assert!(
            matches!(err, OpError::ForeignHandle { op: "linear", .. }),
            "{err:?}"
        );
        let err = b
            .upload_weight("model.norm.weight", DType::BF16, &[4], &[0u8; 6])
            .expect_err("6 bytes for 4 bf16");
        assert!(err.to_string().contains("model.norm.weight"), "{err}");
    }

    #[test]
    fn bf16_weights_widen_exactly() {
        let mut b = backend();
        let values = [1.5f32, -0.375, 3.0e-3];
        let bytes: Vec<u8> = values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let w = b
            .upload_weight("w", DType::BF16, &[1, 3], &bytes)
            .expect("w");
        let x = b.upload_f32(&[1, 3], &[1.0, 0.0, 0.0]).expect("x");
        let mut out = b.alloc(&[1, 1]).expect("out");
        b.linear(&x, &w, &mut out).expect("linear");
        assert_eq!(b.to_host_f32(&out).expect("host"), vec![1.5]);
    }

    #[test]
    fn kv_cache_respects_the_budget() {
        let mut b = backend();
        let spec = KvCacheSpec {
            num_layers: 2,
            num_blocks: 4,
            block_size: 16,
            n_kv_heads: 2,
            head_dim: 8,
        };
        // 2 (K, V) * 2 layers * 16 tokens * 2 heads * 8 dims * 4 bytes per block.
        assert_eq!(spec.bytes_per_block(DType::F32), 2 * 2 * 16 * 2 * 8 * 4);
        let before = b.free_memory_bytes().expect("free");
        let _kv = b.alloc_kv_cache(&spec).expect("fits");
        assert_eq!(
            b.free_memory_bytes().expect("free"),
            before - spec.total_bytes(DType::F32) as u64
        );
        let huge = KvCacheSpec {
            num_blocks: 1 << 20,
            ..spec
        };
        let err = b.alloc_kv_cache(&huge).expect_err("over budget");
        assert!(matches!(err, OpError::OutOfMemory { .. }), "{err:?}");
    }

    fn layout() -> AttentionLayout {
        AttentionLayout {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 4,
            softmax_scale: 0.5,
        }
    }

    fn spec(num_blocks: usize) -> KvCacheSpec {
        KvCacheSpec {
            num_layers: 1,
            num_blocks,
            block_size: 4,
            n_kv_heads: 1,
            head_dim: 4,
        }
    }

    #[test]
    fn malformed_batches_and_ids_are_rejected_before_any_op() {
        let mut b = backend();
        let kv = b.alloc_kv_cache(&spec(2)).expect("kv");
        let mut batch = StepBatch {
            block_size: 4,
            ..StepBatch::default()
        };
        batch.push_seq(&[1, 2, 3], 3, vec![1]);
        b.prepare_step(&batch, &kv).expect("valid");
        let mut bad_slot = batch.clone();
        bad_slot.slot_mapping[2] = 0;
        let msg = b
            .prepare_step(&bad_slot, &kv)
            .expect_err("slot")
            .to_string();
        assert!(msg.contains("slot"), "{msg}");
        let mut bad_block = batch.clone();
        bad_block.seqs[0].block_table = vec![5];
        assert!(b.prepare_step(&bad_block, &kv).is_err(), "block 5 of 2");

        let step = b.prepare_step(&batch, &kv).expect("valid");
        let table = b
            .upload_weight("embed", DType::F32, &[3, 2], &f32_bytes(&[0.0; 6]))
            .expect("w");
        let mut out = b.alloc(&[3, 2]).expect("out");
        let err = b.embedding(&table, &step, &mut out).expect_err("id 3 of 3");
        assert!(
            matches!(
                err,
                OpError::InvalidBatch {
                    op: "embedding",
                    ..
                }
            ),
            "{err:?}"
        );
        let rope = b.upload_rope_table(2, 4, &[0.0; 8]).expect("rope");
        let mut qkv = b.alloc(&[3, layout().qkv_width()]).expect("qkv");
        let err = b
            .rope(&mut qkv, &layout(), &rope, &step)
            .expect_err("position 2 of 2");
        assert!(
            matches!(err, OpError::InvalidBatch { op: "rope", .. }),
            "{err:?}"
        );
    }

    #[test]
    fn copied_blocks_attend_like_the_originals() {
        let mut b = backend();
        let l = layout();
        let mut kv = b.alloc_kv_cache(&spec(3)).expect("kv");
        let data: Vec<f32> = (0..3 * l.qkv_width())
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let qkv = b.upload_f32(&[3, l.qkv_width()], &data).expect("qkv");
        let run = |b: &mut Box<dyn Backend>, kv: &mut KvCache, block: u32, write: bool| {
            let mut batch = StepBatch {
                block_size: 4,
                ..StepBatch::default()
            };
            batch.push_seq(&[1, 2, 3], 3, vec![block]);
            let step = b.prepare_step(&batch, kv).expect("step");
            if write {
                b.kv_write(&qkv, &l, kv, 0, &step).expect("kv_write");
            }
            let mut out = b.alloc(&[3, l.q_width()]).expect("out");
            b.attention(&qkv, &l, kv, 0, &step, &mut out)
                .expect("attention");
            b.to_host_f32(&out).expect("host")
        };
        let original = run(&mut b, &mut kv, 0, true);
        b.copy_kv_blocks(&mut kv, &[(0, 2)]).expect("copy");
        assert_eq!(run(&mut b, &mut kv, 2, false), original);
        assert!(
            b.copy_kv_blocks(&mut kv, &[(0, 3)]).is_err(),
            "block 3 of 3"
        );
    }
}
