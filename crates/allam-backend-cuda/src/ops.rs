//! `impl Backend for CudaBackend`: each op checks shapes, dtypes and handle kinds, computes
//! launch geometry (allam-kernels) and enqueues one kernel or cuBLAS call. The math is in
//! `kernels/*.cu`; the same-named op of `allam-backend-cpu` is the reference.

use std::sync::Arc;

use allam_backend::checks;
use allam_backend::{
    AttentionLayout, Backend, BackendInfo, DType, Error as OpError, GraphStep, KvCache,
    KvCacheSpec, PreparedStep, RowSampling, SampledToken, StepBatch, Tensor, Weight,
};
use allam_kernels::geometry::{self, decode_workspace};
use allam_kernels::{HeadDim, Kernel};
use cudarc::driver::CudaSlice;
use half::bf16;

use crate::convert::{bf16_to_f32, bytes_to_bf16, f32_to_bf16};
use crate::gemm::{gemm_bf16, gemm_dims, GemmOut};
use crate::step::pack_step;
use crate::storage::{self, raw, CudaKv, CudaStep, CudaTensor, CudaWeight, DevBuf, BACKEND_NAME};
use crate::{device_err, Arg, CudaBackend};

fn unsupported(op: &'static str, detail: String) -> OpError {
    OpError::Unsupported {
        op,
        backend: BACKEND_NAME,
        detail,
    }
}

fn check_layout(op: &'static str, layout: &AttentionLayout) -> Result<HeadDim, OpError> {
    if let Some(why) =
        geometry::attention_unsupported(layout.n_heads, layout.n_kv_heads, layout.head_dim)
    {
        return Err(unsupported(op, why));
    }
    Ok(HeadDim::new(layout.head_dim).expect("attention_unsupported checked the head dim"))
}

pub(crate) fn u32_of(op: &'static str, what: &str, v: usize) -> Result<u32, OpError> {
    u32::try_from(v)
        .map_err(|_| unsupported(op, format!("{what} = {v} exceeds the kernels' u32 range")))
}

impl CudaBackend {
    fn upload_bf16(&mut self, op: &'static str, data: &[bf16]) -> Result<CudaSlice<bf16>, OpError> {
        if data.is_empty() {
            return self
                .dev
                .stream
                .alloc_zeros::<bf16>(1)
                .map_err(|e| device_err(op, e));
        }
        self.dev
            .stream
            .clone_htod(data)
            .map_err(|e| device_err(op, e))
    }
}

impl Backend for CudaBackend {
    fn info(&self) -> BackendInfo {
        let (major, minor) = self.dev.compute_capability;
        let group = match &self.nccl {
            Some(g) => format!(", NCCL rank {} of {}", g.rank(), g.world_size()),
            None => String::new(),
        };
        BackendInfo {
            name: BACKEND_NAME,
            device: format!(
                "{} (cuda:{}, sm_{major}{minor}, {} SMs{group})",
                self.dev.name, self.dev.ordinal, self.dev.num_sms
            ),
            activation_dtype: DType::BF16,
            kv_cache_dtype: DType::BF16,
        }
    }

    fn free_memory_bytes(&mut self) -> Result<u64, OpError> {
        let (free, _total) = self
            .dev
            .ctx
            .mem_get_info()
            .map_err(|e| device_err("free_memory_bytes", e))?;
        Ok(free as u64)
    }

    fn upload_weight(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<Weight, OpError> {
        const OP: &str = "upload_weight";
        self.bind(OP)?;
        checks::check_weight_bytes(name, dtype, shape, bytes.len())?;
        let Some(data) = bytes_to_bf16(dtype, bytes) else {
            return Err(checks::weight_bytes_error(name, dtype, shape, bytes.len()));
        };
        let buf = self.upload_bf16(OP, &data)?;
        Ok(Weight::new(
            name,
            shape,
            DType::BF16,
            Box::new(CudaWeight(DevBuf::Bf16(buf))),
        ))
    }

    fn upload_rope_table(
        &mut self,
        max_positions: usize,
        rotary_dim: usize,
        cos_sin: &[f32],
    ) -> Result<Weight, OpError> {
        const OP: &str = "upload_rope_table";
        self.bind(OP)?;
        checks::check_rope_cos_sin(max_positions, rotary_dim, cos_sin.len(), true)?;
        let buf = self
            .dev
            .stream
            .clone_htod(cos_sin)
            .map_err(|e| device_err(OP, e))?;
        if let Some(graphs) = self.graphs.as_mut() {
            graphs.note_max_positions(max_positions);
        }
        Ok(Weight::new(
            "rope_table",
            &[max_positions, rotary_dim],
            DType::F32,
            Box::new(CudaWeight(DevBuf::F32(buf))),
        ))
    }

    fn alloc_logits(&mut self, shape: &[usize]) -> Result<Tensor, OpError> {
        self.alloc_f32(shape)
    }

    fn alloc(&mut self, shape: &[usize]) -> Result<Tensor, OpError> {
        let len = shape.iter().product::<usize>().max(1);
        let buf = self.activation("alloc", DType::BF16, len)?;
        Ok(Tensor::new(shape, DType::BF16, Box::new(CudaTensor(buf))))
    }

    fn upload_f32(&mut self, shape: &[usize], data: &[f32]) -> Result<Tensor, OpError> {
        const OP: &str = "upload_f32";
        self.bind(OP)?;
        checks::check_upload_f32(shape, data.len())?;
        let buf = self.upload_bf16(OP, &f32_to_bf16(data))?;
        Ok(Tensor::new(
            shape,
            DType::BF16,
            Box::new(CudaTensor(Arc::new(DevBuf::Bf16(buf)))),
        ))
    }

    fn to_host_f32(&mut self, x: &Tensor) -> Result<Vec<f32>, OpError> {
        const OP: &str = "to_host_f32";
        self.bind(OP)?;
        // The copy below blocks until the stream drains: in a group, bound that wait first.
        self.settle_collectives(OP)?;
        let n = x.numel();
        let stream = &self.dev.stream;
        let mut host = match storage::tensor(OP, "x", x)? {
            DevBuf::Bf16(s) => bf16_to_f32(&stream.clone_dtoh(s).map_err(|e| device_err(OP, e))?),
            DevBuf::F32(s) => stream.clone_dtoh(s).map_err(|e| device_err(OP, e))?,
        };
        stream.synchronize().map_err(|e| device_err(OP, e))?;
        host.truncate(n); // zero-element tensors hold one pad element
        Ok(host)
    }

    fn rows_to_host_f32(&mut self, x: &Tensor, rows: &[usize]) -> Result<Vec<f32>, OpError> {
        const OP: &str = "rows_to_host_f32";
        self.bind(OP)?;
        let (_, cols) = checks::check_row_picks(OP, x.shape(), rows)?;
        self.settle_collectives(OP)?;
        let buf = storage::tensor(OP, "x", x)?;
        let stream = &self.dev.stream;
        let mut host = Vec::with_capacity(rows.len() * cols);
        // One copy per row: rows are contiguous, and a batch asks for few of them.
        for &r in rows {
            let span = r * cols..(r + 1) * cols;
            match buf {
                DevBuf::Bf16(s) => host.extend(bf16_to_f32(
                    &stream
                        .clone_dtoh(&s.slice(span))
                        .map_err(|e| device_err(OP, e))?,
                )),
                DevBuf::F32(s) => host.extend(
                    stream
                        .clone_dtoh(&s.slice(span))
                        .map_err(|e| device_err(OP, e))?,
                ),
            }
        }
        stream.synchronize().map_err(|e| device_err(OP, e))?;
        Ok(host)
    }

    fn alloc_kv_cache(&mut self, spec: &KvCacheSpec) -> Result<KvCache, OpError> {
        const OP: &str = "alloc_kv_cache";
        self.bind(OP)?;
        let bytes = spec.total_bytes(DType::BF16) as u64;
        let free = self.free_memory_bytes()?;
        checks::check_kv_fits(spec, bytes, free)?;
        let per_layer = spec.elements_per_layer().max(1);
        let alloc = || {
            self.dev
                .stream
                .alloc_zeros::<bf16>(per_layer)
                .map_err(|e| device_err(OP, e))
        };
        let mut k = Vec::with_capacity(spec.num_layers);
        let mut v = Vec::with_capacity(spec.num_layers);
        for _ in 0..spec.num_layers {
            k.push(alloc()?);
            v.push(alloc()?);
        }
        Ok(KvCache::new(*spec, DType::BF16, Box::new(CudaKv { k, v })))
    }

    fn copy_kv_blocks(&mut self, kv: &mut KvCache, pairs: &[(u32, u32)]) -> Result<(), OpError> {
        const OP: &str = "copy_kv_blocks";
        self.bind(OP)?;
        let spec = *kv.spec();
        checks::check_copy_pairs(OP, pairs, spec.num_blocks)?;
        let block_bytes = (spec.block_size * spec.n_kv_heads * spec.head_dim * 2) as u64;
        let cache = storage::kv(OP, kv)?;
        let stream = &self.dev.stream;
        for layer in cache.k.iter().chain(cache.v.iter()) {
            let base = raw(layer, stream);
            for &(src, dst) in pairs {
                // SAFETY: both blocks lie inside this layer's allocation (checked above) and
                // the copy is ordered on the backend's only stream.
                unsafe {
                    cudarc::driver::result::memcpy_dtod_async(
                        base + u64::from(dst) * block_bytes,
                        base + u64::from(src) * block_bytes,
                        block_bytes as usize,
                        stream.cu_stream(),
                    )
                }
                .map_err(|e| device_err(OP, e))?;
            }
        }
        Ok(())
    }

    fn prepare_step(&mut self, batch: &StepBatch, kv: &KvCache) -> Result<PreparedStep, OpError> {
        const OP: &str = "prepare_step";
        self.bind(OP)?;
        storage::kv(OP, kv)?;
        checks::check_step_batch(OP, batch, kv.spec())?;
        let layout = pack_step(batch, kv.spec().n_kv_heads as u32, self.dev.num_sms);
        let buf = self
            .dev
            .stream
            .clone_htod(&layout.words)
            .map_err(|e| device_err(OP, e))?;
        Ok(PreparedStep::new(
            batch,
            Box::new(CudaStep {
                buf: Arc::new(buf),
                layout,
            }),
        ))
    }

    fn embedding(
        &mut self,
        table: &Weight,
        step: &PreparedStep,
        out: &mut Tensor,
    ) -> Result<(), OpError> {
        // The whole table: ids 0..vocab, every one of them in it.
        let vocab = table.shape().first().copied().unwrap_or(0);
        self.gather_embedding("embedding", table, 0, vocab, step, out)
    }

    fn rms_norm(
        &mut self,
        x: &Tensor,
        weight: &Weight,
        eps: f32,
        out: &mut Tensor,
    ) -> Result<(), OpError> {
        const OP: &str = "rms_norm";
        self.bind(OP)?;
        let (rows, hidden) = checks::check_rms_norm(OP, x, weight, out)?;
        let hidden32 = u32_of(OP, "hidden", hidden)?;
        let args = [
            Arg::Ptr(storage::tensor_bf16(OP, "x", x)?),
            Arg::Ptr(storage::weight_ptr(OP, "weight", weight, DType::BF16)?),
            Arg::Ptr(storage::tensor_bf16(OP, "out", out)?),
            Arg::U32(hidden32),
            Arg::F32(eps),
        ];
        self.launch(
            OP,
            Kernel::RmsNorm,
            geometry::norm_launch(u32_of(OP, "rows", rows)?, hidden32),
            &args,
        )
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
        self.bind(OP)?;
        let (rows, hidden) = checks::check_add_rms_norm(OP, residual, x, weight, out)?;
        let hidden32 = u32_of(OP, "hidden", hidden)?;
        let args = [
            Arg::Ptr(storage::tensor_bf16(OP, "x", x)?),
            Arg::Ptr(storage::tensor_bf16(OP, "residual", residual)?),
            Arg::Ptr(storage::weight_ptr(OP, "weight", weight, DType::BF16)?),
            Arg::Ptr(storage::tensor_bf16(OP, "out", out)?),
            Arg::U32(hidden32),
            Arg::F32(eps),
        ];
        self.launch(
            OP,
            Kernel::FusedAddRmsNorm,
            geometry::norm_launch(u32_of(OP, "rows", rows)?, hidden32),
            &args,
        )
    }

    fn linear(&mut self, x: &Tensor, weight: &Weight, out: &mut Tensor) -> Result<(), OpError> {
        const OP: &str = "linear";
        self.bind(OP)?;
        let (rows, k, n) = checks::check_linear(OP, x, weight, out)?;
        if rows == 0 || n == 0 {
            return Ok(());
        }
        let dims = gemm_dims(rows, k, n).map_err(|d| unsupported(OP, d))?;
        let x_ptr = storage::tensor_bf16(OP, "x", x)?;
        let w_ptr = storage::weight_ptr(OP, "weight", weight, DType::BF16)?;
        let (out_ptr, out_type) = match storage::tensor(OP, "out", out)? {
            DevBuf::Bf16(s) => (raw(s, &self.dev.stream), GemmOut::Bf16),
            DevBuf::F32(s) => (raw(s, &self.dev.stream), GemmOut::F32),
        };
        // SAFETY: the shape checks above size all three buffers for these dims; the handle
        // is bound to the backend's stream.
        unsafe {
            gemm_bf16(
                *self.dev.blas.handle(),
                dims,
                w_ptr,
                x_ptr,
                out_ptr,
                out_type,
            )
        }
        .map_err(|e| device_err(OP, e))
    }

    fn rope(
        &mut self,
        qkv: &mut Tensor,
        layout: &AttentionLayout,
        rope_table: &Weight,
        step: &PreparedStep,
    ) -> Result<(), OpError> {
        const OP: &str = "rope";
        self.bind(OP)?;
        if !layout.head_dim.is_multiple_of(2)
            || layout.n_kv_heads == 0
            || !layout.n_heads.is_multiple_of(layout.n_kv_heads)
        {
            return Err(unsupported(OP, format!("attention layout {layout:?}")));
        }
        checks::check_qkv(OP, qkv, layout, step)?;
        let (max_positions, rotary_dim) = checks::check_rope_table(OP, rope_table, layout)?;
        let st = storage::step(OP, step)?;
        checks::check_positions(OP, st.layout.max_position, max_positions)?;
        let base = storage::tensor_bf16(OP, "qkv", qkv)?;
        let width = u32_of(OP, "qkv width", layout.qkv_width())?;
        let args = [
            Arg::Ptr(base),
            Arg::Ptr(base + 2 * layout.q_width() as u64),
            Arg::Ptr(st.at(&self.dev.stream, st.layout.positions.start)),
            Arg::Ptr(storage::weight_ptr(
                OP,
                "rope_table",
                rope_table,
                DType::F32,
            )?),
            Arg::U32(rotary_dim as u32),
            Arg::U32(layout.n_heads as u32),
            Arg::U32(layout.n_kv_heads as u32),
            Arg::U32(layout.head_dim as u32),
            Arg::U32(width),
            Arg::U32(width),
        ];
        self.launch(
            OP,
            Kernel::RopeInplace,
            geometry::rope_launch(step.num_tokens() as u32),
            &args,
        )
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
        self.bind(OP)?;
        check_layout(OP, layout)?;
        checks::check_kv_write(OP, qkv, layout, kv, layer, step)?;
        let st = storage::step(OP, step)?;
        let cache = storage::kv(OP, kv)?;
        let stream = &self.dev.stream;
        let base = storage::tensor_bf16(OP, "qkv", qkv)?;
        let width = u32_of(OP, "qkv width", layout.qkv_width())?;
        let args = [
            Arg::Ptr(base + 2 * layout.q_width() as u64),
            Arg::Ptr(base + 2 * (layout.q_width() + layout.kv_width()) as u64),
            Arg::Ptr(raw(&cache.k[layer], stream)),
            Arg::Ptr(raw(&cache.v[layer], stream)),
            Arg::Ptr(st.at(stream, st.layout.slot_mapping.start)),
            Arg::U32(layout.n_kv_heads as u32),
            Arg::U32(layout.head_dim as u32),
            Arg::U32(width),
            Arg::U32(width),
        ];
        self.launch(
            OP,
            Kernel::KvCacheWrite,
            geometry::kv_write_launch(step.num_tokens() as u32),
            &args,
        )
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
        self.bind(OP)?;
        let head_dim = check_layout(OP, layout)?;
        checks::check_attention(OP, qkv, layout, kv, layer, step, out)?;
        let st = storage::step(OP, step)?;
        let cache = storage::kv(OP, kv)?;
        let q = storage::tensor_bf16(OP, "qkv", qkv)?;
        let o = storage::tensor_bf16(OP, "out", out)?;
        let stream = self.dev.stream.clone();
        let (k_cache, v_cache) = (raw(&cache.k[layer], &stream), raw(&cache.v[layer], &stream));
        let width = u32_of(OP, "qkv width", layout.qkv_width())?;
        let q_width = layout.q_width() as u32;
        let (n_heads, n_kv) = (layout.n_heads as u32, layout.n_kv_heads as u32);
        let block_size = step.block_size() as u32;
        let scale = layout.softmax_scale;

        if let Some(p) = &st.layout.prefill {
            let args = [
                Arg::Ptr(q),
                Arg::U32(width),
                Arg::Ptr(k_cache),
                Arg::Ptr(v_cache),
                Arg::Ptr(st.at(&stream, p.block_tables.start)),
                Arg::U32(p.max_blocks),
                Arg::Ptr(st.at(&stream, p.query_start.start)),
                Arg::Ptr(st.at(&stream, p.query_len.start)),
                Arg::Ptr(st.at(&stream, p.context_lens.start)),
                Arg::Ptr(st.at(&stream, p.tile_seq.start)),
                Arg::Ptr(st.at(&stream, p.tile_q_start.start)),
                Arg::Ptr(o),
                Arg::U32(q_width),
                Arg::U32(n_heads),
                Arg::U32(n_kv),
                Arg::U32(block_size),
                Arg::F32(scale),
            ];
            self.launch(
                OP,
                Kernel::PrefillAttention(head_dim),
                geometry::prefill_launch(p.n_tiles, n_heads),
                &args,
            )?;
        }
        if let Some(d) = &st.layout.decode {
            let ws = decode_workspace(
                d.n_seqs as usize,
                layout.n_heads,
                d.parts.max_partitions as usize,
                layout.head_dim,
            );
            let base = self.workspace(OP, ws.acc_len + 2 * ws.stats_len)?;
            let (acc, maxes, sums) = (
                base,
                base + 4 * ws.acc_len as u64,
                base + 4 * (ws.acc_len + ws.stats_len) as u64,
            );
            let args = [
                Arg::Ptr(q),
                Arg::U32(width),
                Arg::Ptr(k_cache),
                Arg::Ptr(v_cache),
                Arg::Ptr(st.at(&stream, d.block_tables.start)),
                Arg::U32(d.max_blocks),
                Arg::Ptr(st.at(&stream, d.context_lens.start)),
                Arg::Ptr(st.at(&stream, d.query_rows.start)),
                Arg::Ptr(acc),
                Arg::Ptr(maxes),
                Arg::Ptr(sums),
                Arg::U32(n_heads),
                Arg::U32(n_kv),
                Arg::U32(block_size),
                Arg::U32(d.parts.partition_size),
                Arg::U32(d.parts.max_partitions),
                Arg::F32(scale),
            ];
            self.launch(
                OP,
                Kernel::PagedAttentionDecode(head_dim),
                geometry::decode_launch(n_kv, d.n_seqs, d.parts),
                &args,
            )?;
            let args = [
                Arg::Ptr(acc),
                Arg::Ptr(maxes),
                Arg::Ptr(sums),
                Arg::Ptr(st.at(&stream, d.context_lens.start)),
                Arg::Ptr(st.at(&stream, d.query_rows.start)),
                Arg::Ptr(o),
                Arg::U32(q_width),
                Arg::U32(n_heads),
                Arg::U32(layout.head_dim as u32),
                Arg::U32(d.parts.partition_size),
                Arg::U32(d.parts.max_partitions),
            ];
            self.launch(
                OP,
                Kernel::PagedAttentionReduce,
                geometry::decode_reduce_launch(n_heads, d.n_seqs),
                &args,
            )?;
        }
        Ok(())
    }

    fn silu_mul(&mut self, gate_up: &Tensor, out: &mut Tensor) -> Result<(), OpError> {
        const OP: &str = "silu_mul";
        self.bind(OP)?;
        let (rows, inter) = checks::check_silu_mul(OP, gate_up, out)?;
        let inter = u32_of(OP, "intermediate", inter)?;
        let args = [
            Arg::Ptr(storage::tensor_bf16(OP, "gate_up", gate_up)?),
            Arg::Ptr(storage::tensor_bf16(OP, "out", out)?),
            Arg::U32(inter),
        ];
        self.launch(
            OP,
            Kernel::SiluMul,
            geometry::silu_mul_launch(u32_of(OP, "rows", rows)?, inter),
            &args,
        )
    }

    fn graph_step(&mut self, batch: &StepBatch, kv: &KvCache) -> Result<GraphStep, OpError> {
        self.graph_step_impl(batch, kv)
    }

    fn graph_batch_sizes(&self) -> Vec<usize> {
        self.graph_sizes()
    }

    fn graph_capture_begin(&mut self) -> Result<(), OpError> {
        self.graph_capture_begin_impl()
    }

    fn graph_capture_end(
        &mut self,
        captured: Option<&Tensor>,
        eager: Tensor,
    ) -> Result<Tensor, OpError> {
        self.graph_capture_end_impl(captured, eager)
    }

    fn synchronize(&mut self) -> Result<(), OpError> {
        self.wait_idle("synchronize")
    }

    fn sample(
        &mut self,
        logits: &Tensor,
        rows: &[RowSampling],
        logprobs: Option<usize>,
    ) -> Result<Vec<SampledToken>, OpError> {
        // Sampling ends in a blocking copy: in a group, bound the wait for the collectives.
        self.settle_collectives("sample")?;
        self.sample_on_device(logits, rows, logprobs)
    }

    fn gather_rows(
        &mut self,
        x: &Tensor,
        step: &PreparedStep,
        out: &mut Tensor,
    ) -> Result<(), OpError> {
        const OP: &str = "gather_rows";
        self.bind(OP)?;
        let (rows, cols) = checks::check_gather_rows(OP, x, step, out)?;
        let st = storage::step(OP, step)?;
        // The embedding gather with the activations as the table.
        let args = [
            Arg::Ptr(storage::tensor_bf16(OP, "x", x)?),
            Arg::Ptr(st.at(&self.dev.stream, st.layout.logits_rows.start)),
            Arg::Ptr(storage::tensor_bf16(OP, "out", out)?),
            Arg::U32(u32_of(OP, "rows", rows)?),
            Arg::U32(0),
            Arg::U32(u32_of(OP, "cols", cols)?),
        ];
        self.launch(
            OP,
            Kernel::EmbeddingGather,
            geometry::embedding_launch(step.num_logits_rows() as u32),
            &args,
        )
    }

    // Tensor parallelism (tp.rs, nccl.rs).

    fn embedding_shard(
        &mut self,
        table: &Weight,
        vocab_start: usize,
        vocab_size: usize,
        step: &PreparedStep,
        out: &mut Tensor,
    ) -> Result<(), OpError> {
        self.gather_embedding("embedding_shard", table, vocab_start, vocab_size, step, out)
    }

    fn world_size(&self) -> usize {
        self.nccl.as_ref().map_or(1, |g| g.world_size())
    }

    fn rank(&self) -> usize {
        self.nccl.as_ref().map_or(0, |g| g.rank())
    }

    fn all_reduce_sum(&mut self, x: &mut Tensor) -> Result<(), OpError> {
        self.tp_all_reduce_sum(x)
    }

    fn all_gather_cols(&mut self, x: &Tensor, out: &mut Tensor) -> Result<(), OpError> {
        self.tp_all_gather_cols(x, out)
    }
}
