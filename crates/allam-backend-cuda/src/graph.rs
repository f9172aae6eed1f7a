//! CUDA graphs for decode steps: a decode batch's ~15 launches per layer are recorded once per
//! batch size and replayed as one graph launch, which removes the CPU launch overhead that
//! dominates small-batch decode (the idea vLLM and TGI use).
//!
//! How a step becomes a replay (`Backend::graph_step`, driven by `Model::forward_logits`):
//! 1. Only pure decode batches qualify (every sequence has one query token and samples), up to
//!    `max_batch` sequences. The batch is padded to the next size of [`ladder`] with dummy
//!    sequences (token 0 at position 0, context 1, block 0, slot `allam_backend::PAD_SLOT`,
//!    which `kv_write` skips), so one graph serves every batch size up to its own.
//! 2. The step metadata goes into a buffer that the graph owns, at a layout that depends only
//!    on the padded size: decode block tables are as wide as the model's context and the
//!    split-K geometry is sized for that context (`step::pack_step_with`). Partitions past a
//!    sequence's context exit at once, so the fixed geometry costs little.
//! 3. First use of a size (the engine warms every size up with a padding-only step before
//!    serving, `Backend::graph_batch_sizes`): the model runs the pass for real while every
//!    activation the backend hands out is kept (the arena); then again under stream capture, where
//!    the allocations are served from the arena in the same order, so the graph's pointers
//!    stay valid as long as the graph does. Later uses upload the metadata, launch the graph
//!    and copy the batch's own logits rows out.
//!
//! Invariants: nothing is allocated from the device while the stream captures; a graph keeps
//! every buffer it touches alive (arena, metadata, the split-K workspace it was recorded with,
//! which a larger one may replace for eager steps without disturbing it, and the cuBLAS
//! workspace, which never changes); a failed capture costs only that size's graph, never
//! the step.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use allam_backend::Tensor;
use allam_backend::{checks, DType, Error as OpError, GraphStep, KvCache, PreparedStep, StepBatch};
use cudarc::driver::{result as cu, sys, CudaGraph, CudaSlice, CudaStream};

use crate::step::pack_step_with;
use crate::storage::{self, raw, CudaStep, CudaTensor, DevBuf};
use crate::{device_err, CudaBackend};

/// cuBLAS workspace while graphs are on: cuBLAS must not allocate inside a capture.
const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// Batch sizes graphs are captured at, up to `max_batch` (which is always the last): fine
/// steps where batches are small and padding would cost the most, coarser above.
pub(crate) fn ladder(max_batch: usize) -> Vec<usize> {
    let mut sizes = vec![1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256];
    let mut next = 320;
    while next < max_batch {
        sizes.push(next);
        next += 64;
    }
    sizes.retain(|&s| s < max_batch);
    if max_batch > 0 {
        sizes.push(max_batch);
    }
    sizes
}

/// The smallest ladder size that holds `n` sequences.
pub(crate) fn bucket(ladder: &[usize], n: usize) -> Option<usize> {
    ladder.iter().copied().find(|&size| size >= n)
}

/// Graphs are on for a backend (`CudaBackendConfig::cuda_graphs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaGraphOptions {
    /// Largest decode batch replayed from a graph; larger batches run eagerly.
    pub max_batch: usize,
}

impl Default for CudaGraphOptions {
    fn default() -> CudaGraphOptions {
        CudaGraphOptions { max_batch: 256 }
    }
}

/// A graph executable that moves with its backend.
struct OwnedGraph(CudaGraph);

// SAFETY: CUDA graph objects may be used from any thread as long as calls on one graph are
// serialized (CUDA "graphs thread safety"). An `OwnedGraph` lives inside one `CudaBackend`,
// which is `Send` but not `Sync` and reaches the graph only through `&mut self`, so every
// call is serialized; cudarc leaves `CudaGraph` `!Send` only because it holds raw pointers.
unsafe impl Send for OwnedGraph {}

struct DecodeGraph {
    graph: OwnedGraph,
    /// The KV cache the graph's kernels point into ([`kv_identity`]).
    cache: u64,
    meta: Arc<CudaSlice<u32>>,
    logits: Arc<DevBuf>,
    /// Every activation the graph reads or writes.
    _arena: Vec<Arc<DevBuf>>,
    /// The split-K workspace the graph was recorded with.
    _workspace: Option<Arc<CudaSlice<f32>>>,
}

enum Phase {
    /// The real pass: allocations are made and kept.
    Recording,
    /// The captured pass: allocation `next` of the arena is served next.
    Capturing { next: usize },
}

struct Capture {
    size: usize,
    cache: u64,
    rows: usize,
    meta: Arc<CudaSlice<u32>>,
    arena: Vec<Arc<DevBuf>>,
    phase: Phase,
}

/// The graph state of one backend.
pub(crate) struct Graphs {
    ladder: Vec<usize>,
    /// Rows of the RoPE table: the model's context, which fixes the tables' width.
    max_positions: Option<usize>,
    ready: HashMap<usize, DecodeGraph>,
    failed: HashSet<usize>,
    capture: Option<Capture>,
    _cublas_workspace: CudaSlice<u8>,
}

impl Graphs {
    pub(crate) fn note_max_positions(&mut self, rows: usize) {
        self.max_positions = Some(rows);
    }
}

impl CudaBackend {
    /// Turns graphs on: gives cuBLAS a workspace of its own, so no GEMM allocates while the
    /// stream captures.
    pub(crate) fn enable_graphs(&mut self, options: CudaGraphOptions) -> Result<(), OpError> {
        const OP: &str = "enable_graphs";
        self.bind(OP)?;
        let workspace = self
            .dev
            .stream
            .alloc_zeros::<u8>(CUBLAS_WORKSPACE_BYTES)
            .map_err(|e| device_err(OP, e))?;
        let ptr = raw(&workspace, &self.dev.stream);
        // SAFETY: the handle belongs to this backend's stream; the buffer lives in `Graphs`
        // as long as the backend (and so the handle) does.
        let status = unsafe {
            cudarc::cublas::sys::cublasSetWorkspace_v2(
                *self.dev.blas.handle(),
                ptr as *mut std::ffi::c_void,
                CUBLAS_WORKSPACE_BYTES,
            )
        };
        if status != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(device_err(OP, format!("cublasSetWorkspace: {status:?}")));
        }
        self.graphs = Some(Graphs {
            ladder: ladder(options.max_batch),
            max_positions: None,
            ready: HashMap::new(),
            failed: HashSet::new(),
            capture: None,
            _cublas_workspace: workspace,
        });
        Ok(())
    }

    /// The ladder of sizes graphs are captured at (empty when graphs are off).
    pub(crate) fn graph_sizes(&self) -> Vec<usize> {
        self.graphs
            .as_ref()
            .map_or_else(Vec::new, |g| g.ladder.clone())
    }

    /// Every activation goes through here: from the device normally, kept in the arena while
    /// a graph's real pass runs, and taken back from it, in order, while the stream captures.
    pub(crate) fn activation(
        &mut self,
        op: &'static str,
        dtype: DType,
        len: usize,
    ) -> Result<Arc<DevBuf>, OpError> {
        self.bind(op)?;
        let capture = self.graphs.as_mut().and_then(|g| g.capture.as_mut());
        if let Some(Capture {
            phase: Phase::Capturing { next },
            arena,
            ..
        }) = capture
        {
            let buf = arena
                .get(*next)
                .filter(|b| b.dtype() == dtype && b.len() == len);
            let Some(buf) = buf else {
                return Err(OpError::Unsupported {
                    op,
                    backend: storage::BACKEND_NAME,
                    detail: format!(
                        "allocation {next} of the recorded pass differs ({dtype} x {len})"
                    ),
                });
            };
            *next += 1;
            return Ok(Arc::clone(buf));
        }
        let stream = &self.dev.stream;
        let buf = Arc::new(match dtype {
            DType::F32 => DevBuf::F32(
                stream
                    .alloc_zeros::<f32>(len)
                    .map_err(|e| device_err(op, e))?,
            ),
            _ => DevBuf::Bf16(stream.alloc_zeros(len).map_err(|e| device_err(op, e))?),
        });
        if let Some(Capture {
            phase: Phase::Recording,
            arena,
            ..
        }) = self.graphs.as_mut().and_then(|g| g.capture.as_mut())
        {
            arena.push(Arc::clone(&buf));
        }
        Ok(buf)
    }

    /// Whether the stream is capturing (then nothing may be allocated or synchronized).
    pub(crate) fn capturing(&self) -> bool {
        matches!(
            self.graphs.as_ref().and_then(|g| g.capture.as_ref()),
            Some(Capture {
                phase: Phase::Capturing { .. },
                ..
            })
        )
    }

    /// Drops every graph (their buffers are freed in stream order after queued replays).
    pub(crate) fn drop_graphs(&mut self) {
        if let Some(g) = self.graphs.as_mut() {
            if !g.ready.is_empty() {
                tracing::debug!(graphs = g.ready.len(), "dropping decode graphs");
                // Replays still queued must finish before their executables go.
                let _ = self.dev.stream.synchronize();
                g.ready.clear();
            }
        }
    }

    /// Leaves a capture that a failed step abandoned, restoring the stream.
    fn abandon_capture(&mut self) {
        let Some(g) = self.graphs.as_mut() else {
            return;
        };
        if let Some(c) = g.capture.take() {
            if matches!(c.phase, Phase::Capturing { .. }) {
                let _ = self
                    .dev
                    .stream
                    .end_capture(sys::CUgraphInstantiate_flags(0));
            }
            g.failed.insert(c.size);
        }
    }

    /// Drops one size's graph and never captures that size again.
    fn retire_graph(&mut self, size: usize) {
        let _ = self.dev.stream.synchronize();
        if let Some(g) = self.graphs.as_mut() {
            g.ready.remove(&size);
            g.failed.insert(size);
        }
    }

    pub(crate) fn graph_step_impl(
        &mut self,
        batch: &StepBatch,
        kv: &KvCache,
    ) -> Result<GraphStep, OpError> {
        const OP: &str = "graph_step";
        if self.graphs.is_none() {
            return Ok(GraphStep::Eager);
        }
        self.abandon_capture();
        self.bind(OP)?;
        storage::kv(OP, kv)?;
        checks::check_step_batch(OP, batch, kv.spec())?;
        let Some(g) = self.graphs.as_ref() else {
            return Ok(GraphStep::Eager);
        };
        let Some(max_positions) = g.max_positions else {
            return Ok(GraphStep::Eager);
        };
        // `rope` checks positions against its table, but a replay runs no op, and the block
        // tables allow `max_blocks * block_size` positions: past the table's rows when
        // `max_positions` is not a multiple of the block size. The eager path reports these.
        if batch.positions.iter().any(|&p| p as usize >= max_positions) {
            return Ok(GraphStep::Eager);
        }
        let n = batch.seqs.len();
        let Some(size) = bucket(&g.ladder, n).filter(|s| !g.failed.contains(s)) else {
            return Ok(GraphStep::Eager);
        };
        let max_blocks = (max_positions as u32).div_ceil(batch.block_size.max(1));
        let Some(padded) = batch.padded_decode(size, max_blocks) else {
            return Ok(GraphStep::Eager);
        };
        let layout = pack_step_with(
            &padded,
            kv.spec().n_kv_heads as u32,
            self.dev.num_sms,
            Some(max_blocks),
        );
        let stream = self.dev.stream.clone();
        let cache = kv_identity(kv, &stream, OP)?;
        if g.ready.values().any(|graph| graph.cache != cache) {
            // Captured against another KV cache, whose buffers may be gone.
            self.drop_graphs();
        }
        let Some(g) = self.graphs.as_ref() else {
            return Ok(GraphStep::Eager);
        };
        if let Some(graph) = g.ready.get(&size) {
            // The eager path checks ids against the embedding table; a replay has no such
            // op, so check against the graph's vocabulary (embedding rows = lm_head rows).
            let vocab = graph.logits.len() / size;
            if batch.token_ids.iter().any(|&t| t as usize >= vocab) {
                return Ok(GraphStep::Eager);
            }
            // The graph reads exactly its own layout; anything else would write past it.
            if graph.meta.len() != layout.words.len() {
                tracing::warn!(size, "decode graph layout changed; this size runs eagerly");
                self.retire_graph(size);
                return Ok(GraphStep::Eager);
            }
            // SAFETY: the metadata buffer has the layout's length (checked above); the copy
            // is queued before the replay that reads it.
            unsafe {
                cu::memcpy_htod_async(raw(&graph.meta, &stream), &layout.words, stream.cu_stream())
            }
            .map_err(|e| device_err(OP, e))?;
            if let Err(e) = graph.graph.0.launch() {
                tracing::warn!(size, error = ?e, "replaying a decode graph failed; this size runs eagerly");
                self.retire_graph(size);
                return Ok(GraphStep::Eager);
            }
            let logits = Arc::clone(&graph.logits);
            let logits = self.first_rows(OP, &logits, size, n)?;
            return Ok(GraphStep::Replayed(logits));
        }
        let meta = Arc::new(
            stream
                .clone_htod(&layout.words)
                .map_err(|e| device_err(OP, e))?,
        );
        let step = PreparedStep::new(
            &padded,
            Box::new(CudaStep {
                buf: Arc::clone(&meta),
                layout,
            }),
        );
        if let Some(g) = self.graphs.as_mut() {
            g.capture = Some(Capture {
                size,
                cache,
                rows: n,
                meta,
                arena: Vec::new(),
                phase: Phase::Recording,
            });
        }
        Ok(GraphStep::Capture(step))
    }

    pub(crate) fn graph_capture_begin_impl(&mut self) -> Result<(), OpError> {
        const OP: &str = "graph_capture_begin";
        self.bind(OP)?;
        let capture = self.graphs.as_mut().and_then(|g| g.capture.as_mut());
        let Some(c) = capture.filter(|c| matches!(c.phase, Phase::Recording)) else {
            return Err(OpError::Unsupported {
                op: OP,
                backend: storage::BACKEND_NAME,
                detail: "no recorded pass to capture".to_owned(),
            });
        };
        c.phase = Phase::Capturing { next: 0 };
        let begun = self
            .dev
            .stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL);
        if let Err(e) = begun {
            // Keep the capture, back in `Recording`: `graph_capture_end` then marks the size
            // failed and still cuts the real pass's logits to the batch's rows (taking the
            // capture here made it return all the padded rows).
            if let Some(c) = self.graphs.as_mut().and_then(|g| g.capture.as_mut()) {
                c.phase = Phase::Recording;
            }
            return Err(device_err(OP, e));
        }
        Ok(())
    }

    pub(crate) fn graph_capture_end_impl(
        &mut self,
        captured: Option<&Tensor>,
        eager: Tensor,
    ) -> Result<Tensor, OpError> {
        const OP: &str = "graph_capture_end";
        if let Err(e) = self.bind(OP) {
            // Never leave the stream capturing: every later op would be recorded, not run.
            self.abandon_capture();
            return Err(e);
        }
        let Some(c) = self.graphs.as_mut().and_then(|g| g.capture.take()) else {
            return Ok(eager);
        };
        // The capture ends before anything below can fail.
        let graph = match c.phase {
            Phase::Capturing { .. } => self
                .dev
                .stream
                .end_capture(sys::CUgraphInstantiate_flags(0))
                .map_err(|e| format!("{e:?}")),
            Phase::Recording => Err("the capture never began".to_owned()),
        };
        let eager_buf = storage::tensor_arc(OP, "eager", &eager)?;
        let same_logits = captured
            .map(|t| storage::tensor_arc(OP, "captured", t))
            .transpose()?
            .is_some_and(|t| Arc::ptr_eq(&t, &eager_buf));
        let kept = match graph {
            Ok(Some(graph)) if same_logits => match graph.upload() {
                Ok(()) => Some(graph),
                Err(e) => {
                    tracing::warn!(size = c.size, error = ?e, "uploading a decode graph failed");
                    None
                }
            },
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(size = c.size, error = %e, "capturing a decode graph failed");
                None
            }
        };
        if let Some(g) = self.graphs.as_mut() {
            match kept {
                Some(graph) => {
                    tracing::debug!(size = c.size, "decode graph captured");
                    g.ready.insert(
                        c.size,
                        DecodeGraph {
                            graph: OwnedGraph(graph),
                            cache: c.cache,
                            meta: c.meta,
                            logits: Arc::clone(&eager_buf),
                            _arena: c.arena,
                            _workspace: self.workspace.clone(),
                        },
                    );
                }
                None => {
                    g.failed.insert(c.size);
                }
            }
        }
        self.first_rows(OP, &eager_buf, c.size, c.rows)
    }

    /// A fresh f32 `[rows, vocab]` tensor holding the first `rows` rows of `logits`, a
    /// graph's `[padded_rows, vocab]` output (which the next replay overwrites).
    fn first_rows(
        &mut self,
        op: &'static str,
        logits: &Arc<DevBuf>,
        padded_rows: usize,
        rows: usize,
    ) -> Result<Tensor, OpError> {
        let DevBuf::F32(src) = logits.as_ref() else {
            return Err(OpError::DTypeMismatch {
                op,
                operand: "logits",
                expected: "f32".to_owned(),
                actual: logits.dtype(),
            });
        };
        let vocab = src.len() / padded_rows.max(1);
        if rows > padded_rows {
            return Err(device_err(
                op,
                format!("{rows} rows of a {padded_rows}-row graph output"),
            ));
        }
        let out = self.activation(op, DType::F32, rows * vocab)?;
        let DevBuf::F32(dst) = out.as_ref() else {
            unreachable!("activation returns the dtype it is asked for");
        };
        let stream = &self.dev.stream;
        // SAFETY: both buffers hold at least rows * vocab f32; stream order covers the
        // replay that wrote `src`.
        unsafe {
            cu::memcpy_dtod_async(
                raw(dst, stream),
                raw(src, stream),
                rows * vocab * std::mem::size_of::<f32>(),
                stream.cu_stream(),
            )
        }
        .map_err(|e| device_err(op, e))?;
        Ok(Tensor::new(
            &[rows, vocab],
            DType::F32,
            Box::new(CudaTensor(out)),
        ))
    }
}

/// Which KV cache a graph was recorded against: the device address of layer 0's K array
/// (a cache is allocated once and never moves).
fn kv_identity(kv: &KvCache, stream: &CudaStream, op: &'static str) -> Result<u64, OpError> {
    let cache = storage::kv(op, kv)?;
    Ok(cache.k.first().map_or(0, |k| raw(k, stream)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::step::pack_step_with;

    #[test]
    fn the_ladder_is_increasing_and_ends_at_the_maximum() {
        for max in [1usize, 3, 8, 100, 256, 512, 1000] {
            let l = ladder(max);
            assert!(l.windows(2).all(|w| w[0] < w[1]), "{l:?}");
            assert_eq!(l.last(), Some(&max));
            assert_eq!(l[0], 1);
            for n in 1..=max {
                let b = bucket(&l, n).expect("fits");
                assert!(b >= n && b <= max);
            }
            assert_eq!(bucket(&l, max + 1), None);
        }
        // Padding never more than doubles a batch, and above 32 never adds half.
        let l = ladder(512);
        for n in 33..=512 {
            let b = bucket(&l, n).expect("fits");
            assert!(b * 2 <= n * 3, "{n} -> {b}");
        }
    }

    fn decode_batch(contexts: &[u32]) -> StepBatch {
        let mut b = StepBatch {
            block_size: 4,
            ..Default::default()
        };
        for (i, &ctx) in contexts.iter().enumerate() {
            let blocks: Vec<u32> = (0..ctx.div_ceil(4))
                .map(|j| (10 * i as u32) + j + 1)
                .collect();
            let rows = b.push_seq(&[7 + i as u32], ctx, blocks);
            b.logits_rows.push(rows.start);
        }
        b
    }

    /// A graph replays whatever batch of its size comes: the layout of the metadata, and every
    /// scalar the kernels were recorded with, must not depend on the batch.
    #[test]
    fn the_layout_of_a_size_does_not_depend_on_the_batch() {
        let a = decode_batch(&[5, 9, 1]).padded_decode(8, 16).expect("a");
        let b = decode_batch(&[60, 2, 33, 17, 4])
            .padded_decode(8, 16)
            .expect("b");
        let la = pack_step_with(&a, 8, 132, Some(16));
        let lb = pack_step_with(&b, 8, 132, Some(16));
        assert_eq!(la.words.len(), lb.words.len());
        assert_eq!(
            (
                la.token_ids.clone(),
                la.positions.clone(),
                la.slot_mapping.clone()
            ),
            (
                lb.token_ids.clone(),
                lb.positions.clone(),
                lb.slot_mapping.clone()
            )
        );
        let (da, db) = (la.decode.expect("decode"), lb.decode.expect("decode"));
        assert_eq!(da.block_tables, db.block_tables);
        assert_eq!(da.context_lens, db.context_lens);
        assert_eq!(da.query_rows, db.query_rows);
        assert_eq!(
            (da.n_seqs, da.max_blocks, da.parts),
            (db.n_seqs, db.max_blocks, db.parts)
        );
        assert!(la.prefill.is_none() && lb.prefill.is_none());
        // The split-K geometry covers the whole context the tables allow.
        assert!(da.parts.partition_size * da.parts.max_partitions >= 16 * 4);
    }
}
