//! The CUDA backend's tensor-parallel ops: the vocabulary-sliced embedding lookup (the
//! embedding kernel with a row offset), the all-reduce after the row-parallel projections, and
//! the column all-gather of the vocabulary-parallel `lm_head` logits.
//!
//! Column gather: NCCL's all-gather concatenates equal-sized buffers rank-major, so every rank
//! sends `rows * max_width` elements (its `[rows, width]` block, padded at the end when the
//! split is uneven) and the gathered blocks are then copied column-wise into `[rows, total]`
//! with one strided 2-D copy per rank ([`gather_copies`] is the index math). Every rank's
//! width follows from `total` and the world size by the even split allam-model shards the
//! vocabulary with ([`balanced_widths`]); a slice of another width is refused.
//!
//! Without an NCCL group (world size 1) the all-reduce is the identity and the gather a copy.

use allam_backend::checks;
use allam_backend::{Backend, DType, Error as OpError, PreparedStep, Tensor, Weight};
use allam_kernels::{geometry, Kernel};
use cudarc::driver::sys as cu;
use cudarc::driver::{CudaSlice, CudaStream, DriverError};
use cudarc::nccl::sys::ncclDataType_t;

use crate::ops::u32_of;
use crate::storage::{self, raw, DevBuf};
use crate::{device_err, Arg, CudaBackend};

/// Column widths of `total` split over `world` ranks as evenly as possible: rank `r` takes
/// `r * total / world .. (r + 1) * total / world`, allam-model's `TpShard::split`.
pub(crate) fn balanced_widths(total: usize, world: usize) -> Vec<usize> {
    let world = world.max(1);
    (0..world)
        .map(|r| (r + 1) * total / world - r * total / world)
        .collect()
}

/// One strided copy, in elements: `height` rows of `width` elements, row `h` from
/// `src_offset + h * src_pitch` to `dst_offset + h * dst_pitch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ColumnCopy {
    pub(crate) src_offset: usize,
    pub(crate) src_pitch: usize,
    pub(crate) dst_offset: usize,
    pub(crate) dst_pitch: usize,
    pub(crate) width: usize,
    pub(crate) height: usize,
}

/// The copies that turn a rank-major gather (rank `p`'s row-major `[rows, widths[p]]` block at
/// element `p * slot`) into the row-major `[rows, sum of widths]` concatenation along the
/// columns. Ranks with no columns get no copy.
pub(crate) fn gather_copies(rows: usize, widths: &[usize], slot: usize) -> Vec<ColumnCopy> {
    let total: usize = widths.iter().sum();
    let mut column = 0;
    let mut copies = Vec::with_capacity(widths.len());
    for (rank, &width) in widths.iter().enumerate() {
        if width > 0 && rows > 0 {
            copies.push(ColumnCopy {
                src_offset: rank * slot,
                src_pitch: width,
                dst_offset: column,
                dst_pitch: total,
                width,
                height: rows,
            });
        }
        column += width;
    }
    copies
}

/// The NCCL type and element size of a buffer.
fn nccl_type(buf: &DevBuf) -> (ncclDataType_t, usize) {
    match buf {
        DevBuf::Bf16(_) => (ncclDataType_t::ncclBfloat16, 2),
        DevBuf::F32(_) => (ncclDataType_t::ncclFloat32, 4),
    }
}

fn buf_ptr(buf: &DevBuf, stream: &CudaStream) -> u64 {
    match buf {
        DevBuf::Bf16(s) => raw(s, stream),
        DevBuf::F32(s) => raw(s, stream),
    }
}

/// Enqueues `copy` (elements of `elem` bytes) between device buffers on `stream`.
fn copy_columns(
    stream: &CudaStream,
    src: u64,
    dst: u64,
    copy: &ColumnCopy,
    elem: usize,
) -> Result<(), DriverError> {
    let params = cu::CUDA_MEMCPY2D {
        srcXInBytes: 0,
        srcY: 0,
        srcMemoryType: cu::CUmemorytype::CU_MEMORYTYPE_DEVICE,
        srcHost: std::ptr::null(),
        srcDevice: src + (copy.src_offset * elem) as u64,
        srcArray: std::ptr::null_mut(),
        srcPitch: copy.src_pitch * elem,
        dstXInBytes: 0,
        dstY: 0,
        dstMemoryType: cu::CUmemorytype::CU_MEMORYTYPE_DEVICE,
        dstHost: std::ptr::null_mut(),
        dstDevice: dst + (copy.dst_offset * elem) as u64,
        dstArray: std::ptr::null_mut(),
        dstPitch: copy.dst_pitch * elem,
        WidthInBytes: copy.width * elem,
        Height: copy.height,
    };
    // SAFETY: the caller sized both buffers for `copy` (see `gather_copies`); the copy is
    // ordered on the backend's only stream after the writes it reads.
    unsafe { cu::cuMemcpy2DAsync_v2(&params, stream.cu_stream()) }.result()
}

impl CudaBackend {
    /// The embedding gather of ids `vocab_start..vocab_start + rows` of a vocabulary of
    /// `vocab_size` from `table`'s rows; other ids give zero rows. `embedding` is the whole
    /// table at 0, `embedding_shard` a tensor-parallel rank's slice.
    pub(crate) fn gather_embedding(
        &mut self,
        op: &'static str,
        table: &Weight,
        vocab_start: usize,
        vocab_size: usize,
        step: &PreparedStep,
        out: &mut Tensor,
    ) -> Result<(), OpError> {
        self.bind(op)?;
        let (rows, hidden) =
            checks::check_embedding_shard(op, table, vocab_start, vocab_size, step, out)?;
        let st = storage::step(op, step)?;
        checks::check_token_ids(op, st.layout.max_token_id, vocab_size)?;
        let args = [
            Arg::Ptr(storage::weight_ptr(op, "table", table, DType::BF16)?),
            Arg::Ptr(st.at(&self.dev.stream, st.layout.token_ids.start)),
            Arg::Ptr(storage::tensor_bf16(op, "out", out)?),
            Arg::U32(u32_of(op, "table rows", rows)?),
            Arg::U32(u32_of(op, "vocab_start", vocab_start)?),
            Arg::U32(u32_of(op, "hidden", hidden)?),
        ];
        self.launch(
            op,
            Kernel::EmbeddingGather,
            geometry::embedding_launch(step.num_tokens() as u32),
            &args,
        )
    }

    /// `Backend::all_reduce_sum`: NCCL sum in place (bf16 or f32); the identity without a
    /// group.
    pub(crate) fn tp_all_reduce_sum(&mut self, x: &mut Tensor) -> Result<(), OpError> {
        const OP: &str = "all_reduce_sum";
        self.bind(OP)?;
        let buf = storage::tensor(OP, "x", x)?;
        let Some(group) = self.nccl.as_mut() else {
            return Ok(());
        };
        let count = x.numel();
        if count == 0 {
            // Every rank runs the same step, so every rank skips it alike.
            return Ok(());
        }
        let (dtype, _) = nccl_type(buf);
        let ptr = buf_ptr(buf, &self.dev.stream);
        group.all_reduce_sum(OP, ptr, count, dtype, &self.dev.stream)
    }

    /// `Backend::all_gather_cols` (bf16 or f32; `out` of `x`'s dtype).
    pub(crate) fn tp_all_gather_cols(
        &mut self,
        x: &Tensor,
        out: &mut Tensor,
    ) -> Result<(), OpError> {
        const OP: &str = "all_gather_cols";
        self.bind(OP)?;
        let (rows, cols) = checks::dims_2d(OP, "x", x.shape())?;
        let (out_rows, total) = checks::dims_2d(OP, "out", out.shape())?;
        if out_rows != rows {
            return Err(OpError::shape(
                OP,
                "out",
                format!("[{rows}, _]"),
                out.shape(),
            ));
        }
        let (world, rank) = (self.world_size(), self.rank());
        let widths = balanced_widths(total, world);
        if widths[rank] != cols {
            return Err(OpError::shape(
                OP,
                "x",
                format!(
                    "[{rows}, {}] (rank {rank}'s share of {total} columns split evenly over {world} ranks)",
                    widths[rank]
                ),
                x.shape(),
            ));
        }
        let stream = self.dev.stream.clone();
        let x_buf = storage::tensor(OP, "x", x)?;
        let out_buf = storage::tensor(OP, "out", out)?;
        if out_buf.dtype() != x_buf.dtype() {
            return Err(OpError::DTypeMismatch {
                op: OP,
                operand: "out",
                expected: format!("{} (the dtype of x)", x_buf.dtype().as_str()),
                actual: out_buf.dtype(),
            });
        }
        if rows == 0 || total == 0 {
            // Nothing to gather; every rank sees the same shapes and skips alike.
            return Ok(());
        }
        let (dtype, elem) = nccl_type(x_buf);
        let (x_ptr, out_ptr) = (buf_ptr(x_buf, &stream), buf_ptr(out_buf, &stream));
        let max_width = widths.iter().copied().max().unwrap_or(0);
        let slot = rows * max_width;
        // Scratch buffers live until the copies below are enqueued; dropping them frees them
        // in stream order.
        let mut scratch: Vec<CudaSlice<u8>> = Vec::new();
        let gathered = match self.nccl.as_mut() {
            None => x_ptr, // one rank: x is the whole gather
            Some(group) => {
                let mut alloc = |bytes: usize| -> Result<u64, OpError> {
                    // SAFETY: every byte read from the buffer is written first (the send
                    // buffer's padding is sent but never placed, see `gather_copies`).
                    let buf =
                        unsafe { stream.alloc::<u8>(bytes) }.map_err(|e| device_err(OP, e))?;
                    let ptr = raw(&buf, &stream);
                    scratch.push(buf);
                    Ok(ptr)
                };
                let send = if cols == max_width {
                    x_ptr
                } else {
                    let padded = alloc(slot * elem)?;
                    // SAFETY: `padded` holds `slot >= rows * cols` elements, x holds
                    // `rows * cols`; ordered on the backend's stream.
                    unsafe {
                        cudarc::driver::result::memcpy_dtod_async(
                            padded,
                            x_ptr,
                            rows * cols * elem,
                            stream.cu_stream(),
                        )
                    }
                    .map_err(|e| device_err(OP, e))?;
                    padded
                };
                let recv = alloc(world * slot * elem)?;
                group.all_gather(OP, send, recv, slot, dtype, &stream)?;
                recv
            }
        };
        for copy in gather_copies(rows, &widths, slot) {
            copy_columns(&stream, gathered, out_ptr, &copy, elem).map_err(|e| device_err(OP, e))?;
        }
        drop(scratch);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use allam_model::TpShard;

    /// Applies `copies` on the host, as the 2-D copies do on the device.
    fn apply(copies: &[ColumnCopy], src: &[f32], dst: &mut [f32]) {
        for c in copies {
            for h in 0..c.height {
                for w in 0..c.width {
                    dst[c.dst_offset + h * c.dst_pitch + w] =
                        src[c.src_offset + h * c.src_pitch + w];
                }
            }
        }
    }

    #[test]
    fn widths_are_the_models_vocabulary_split() {
        for total in [1usize, 7, 100, 4000, 64_000, 64_003] {
            for world in 1usize..=8 {
                if total < world {
                    continue;
                }
                let widths = balanced_widths(total, world);
                assert_eq!(widths.iter().sum::<usize>(), total);
                for (rank, w) in widths.iter().enumerate() {
                    let split = TpShard {
                        rank,
                        world_size: world,
                    }
                    .split(total);
                    assert_eq!(*w, split.len(), "total {total}, world {world}, rank {rank}");
                }
            }
        }
    }

    #[test]
    fn gathered_blocks_land_as_the_column_concatenation() {
        const PAD: f32 = -1.0;
        for widths in [
            vec![4usize],
            vec![3, 3],
            vec![3, 2, 3],
            vec![1, 2, 2, 1],
            vec![5, 0, 2],
        ] {
            for rows in [1usize, 3] {
                let total: usize = widths.iter().sum();
                // Rank p's [rows, w_p] block: value = 1000 p + 10 row + col (all distinct).
                let block = |p: usize, r: usize, c: usize| (1000 * p + 10 * r + c) as f32;
                let max_w = *widths.iter().max().expect("ranks");
                let slot = rows * max_w;
                // What NCCL's all-gather leaves: each rank's block, padded to the slot.
                let mut gathered = vec![PAD; widths.len() * slot];
                for (p, &w) in widths.iter().enumerate() {
                    for r in 0..rows {
                        for c in 0..w {
                            gathered[p * slot + r * w + c] = block(p, r, c);
                        }
                    }
                }
                // The expected result, built row by row from the blocks in rank order.
                let mut want = Vec::new();
                for r in 0..rows {
                    for (p, &w) in widths.iter().enumerate() {
                        want.extend((0..w).map(|c| block(p, r, c)));
                    }
                }
                let mut out = vec![f32::NAN; rows * total];
                apply(&gather_copies(rows, &widths, slot), &gathered, &mut out);
                assert_eq!(out, want, "widths {widths:?}, rows {rows}");
            }
        }
    }

    #[test]
    fn copies_stay_inside_their_buffers() {
        let widths = [3usize, 2, 3];
        let (rows, slot) = (4usize, 12usize);
        let total = 8;
        for c in gather_copies(rows, &widths, slot) {
            assert!(c.width <= c.src_pitch && c.width <= c.dst_pitch);
            let src_end = c.src_offset + (c.height - 1) * c.src_pitch + c.width;
            assert!(src_end <= widths.len() * slot, "{c:?}");
            // A rank's block never reaches into the next rank's slot.
            assert!(src_end <= (c.src_offset / slot + 1) * slot, "{c:?}");
            let dst_end = c.dst_offset + (c.height - 1) * c.dst_pitch + c.width;
            assert!(dst_end <= rows * total, "{c:?}");
        }
        assert!(gather_copies(0, &widths, 0).is_empty());
    }
}
