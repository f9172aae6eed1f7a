//! Launch geometry: grid/block sizes, split-K partitioning, prefill tiling and workspace sizes,
//! as pure functions so they are tested on the CPU. The constants mirror the `#define`s and
//! launch contracts in `kernels/*.cu`; a test reads the sources to keep the two in step.

/// Grid and block dimensions plus dynamic shared memory (every kernel here uses static shared
/// memory only, so it is 0 today).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_mem_bytes: u32,
}

impl Launch {
    fn new(grid: [u32; 3], threads: u32) -> Launch {
        Launch {
            grid,
            block: [threads, 1, 1],
            shared_mem_bytes: 0,
        }
    }
}

pub const EMBEDDING_THREADS: u32 = 256;
pub const ROPE_THREADS: u32 = 128;
pub const KV_WRITE_THREADS: u32 = 128;
pub const SILU_THREADS: u32 = 256;
/// Decode attention CTA size (`PA_THREADS` in paged_attention.cu).
pub const PA_THREADS: u32 = 128;
/// Most query heads per KV head the decode kernel supports (`PA_MAX_GROUP`).
pub const PA_MAX_GROUP: usize = 8;
/// Largest split-K partition in tokens (`PA_MAX_PARTITION`).
pub const PA_MAX_PARTITION: u32 = 512;
/// Smallest partition the heuristic picks (more splits cost more reduce work than they save).
pub const PA_MIN_PARTITION: u32 = 64;
pub const PA_REDUCE_THREADS: u32 = 128;
pub const PF_THREADS: u32 = 128;
/// Query rows per prefill tile (`PF_BLOCK_M`).
pub const PF_BLOCK_M: u32 = 32;
/// Keys per prefill tile (`PF_BLOCK_N`).
pub const PF_BLOCK_N: u32 = 32;
pub const SAMPLE_THREADS: u32 = 512;
/// Most top logprobs the sampling kernel reports per row (`SAMPLE_MAX_TOP`).
pub const SAMPLE_MAX_TOP: usize = 20;
/// slot_mapping value that makes kv_cache_write skip a token.
pub const SLOT_PAD: u32 = u32::MAX;
/// Static shared memory a CTA may use without opting in.
pub const STATIC_SMEM_LIMIT: usize = 48 * 1024;

/// `embedding_gather_bf16`: one CTA per output row.
pub fn embedding_launch(n_rows: u32) -> Launch {
    Launch::new([n_rows, 1, 1], EMBEDDING_THREADS)
}

/// `rmsnorm_bf16` / `fused_add_rmsnorm_bf16`: one CTA per row, about 4 elements per thread,
/// 32..=1024 threads.
pub fn norm_launch(n_rows: u32, hidden: u32) -> Launch {
    let threads = hidden.div_ceil(4).next_multiple_of(32).clamp(32, 1024);
    Launch::new([n_rows, 1, 1], threads)
}

/// `rope_inplace_bf16`: one CTA per token.
pub fn rope_launch(n_tokens: u32) -> Launch {
    Launch::new([n_tokens, 1, 1], ROPE_THREADS)
}

/// `kv_cache_write_bf16`: one CTA per token.
pub fn kv_write_launch(n_tokens: u32) -> Launch {
    Launch::new([n_tokens, 1, 1], KV_WRITE_THREADS)
}

/// `silu_mul_bf16`: rows on x, 8 columns per thread on y.
pub fn silu_mul_launch(n_rows: u32, inter: u32) -> Launch {
    let col_blocks = inter.div_ceil(8).div_ceil(SILU_THREADS).max(1);
    Launch::new([n_rows, col_blocks, 1], SILU_THREADS)
}

/// `sample_rows_f32`: one CTA per logits row.
pub fn sample_launch(n_rows: u32) -> Launch {
    Launch::new([n_rows, 1, 1], SAMPLE_THREADS)
}

/// Split-K plan of one decode launch: every sequence's context is cut into partitions of
/// `partition_size` tokens; the grid's z extent is `max_partitions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodePartitions {
    pub partition_size: u32,
    pub max_partitions: u32,
}

/// Picks the partition size: the largest power of two in
/// [`PA_MIN_PARTITION`, `PA_MAX_PARTITION`] that still gives at least two CTAs per SM, so a
/// small batch with long contexts still fills the GPU while a big batch keeps one partition
/// (no reduce traffic) per sequence.
pub fn decode_partitions(
    max_context: u32,
    n_seqs: u32,
    n_kv_heads: u32,
    num_sms: u32,
) -> DecodePartitions {
    let base_ctas = u64::from(n_seqs.max(1)) * u64::from(n_kv_heads.max(1));
    let want = 2 * u64::from(num_sms.max(1));
    let ctx = max_context.max(1);
    let mut p = PA_MAX_PARTITION;
    while p > PA_MIN_PARTITION && base_ctas * u64::from(ctx.div_ceil(p)) < want {
        p /= 2;
    }
    DecodePartitions {
        partition_size: p,
        max_partitions: ctx.div_ceil(p),
    }
}

/// `paged_attention_decode_hd*_bf16`: (KV head, sequence, partition).
pub fn decode_launch(n_kv_heads: u32, n_seqs: u32, parts: DecodePartitions) -> Launch {
    Launch::new([n_kv_heads, n_seqs, parts.max_partitions], PA_THREADS)
}

/// `paged_attention_reduce_bf16`: (query head, sequence).
pub fn decode_reduce_launch(n_heads: u32, n_seqs: u32) -> Launch {
    Launch::new([n_heads, n_seqs, 1], PA_REDUCE_THREADS)
}

/// f32 workspace lengths of one decode launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeWorkspace {
    /// `part_acc`: n_seqs * n_heads * max_partitions * head_dim.
    pub acc_len: usize,
    /// `part_max` and `part_sum`, each: n_seqs * n_heads * max_partitions.
    pub stats_len: usize,
}

pub fn decode_workspace(
    n_seqs: usize,
    n_heads: usize,
    max_partitions: usize,
    head_dim: usize,
) -> DecodeWorkspace {
    let stats_len = n_seqs * n_heads * max_partitions;
    DecodeWorkspace {
        acc_len: stats_len * head_dim,
        stats_len,
    }
}

/// Static shared memory of the decode kernel (mirrors its `__shared__` arrays).
pub fn decode_smem_bytes(head_dim: usize) -> usize {
    let warps = (PA_THREADS / 32) as usize;
    4 * (PA_MAX_GROUP * head_dim + PA_MAX_GROUP * PA_MAX_PARTITION as usize + warps * head_dim + 32)
}

/// Static shared memory of the prefill kernel (mirrors its `__shared__` arrays).
pub fn prefill_smem_bytes(head_dim: usize) -> usize {
    let m = PF_BLOCK_M as usize;
    let n = PF_BLOCK_N as usize;
    let q = m * (head_dim + 1) * 4;
    let kv = 2 * n * (head_dim / 2 + 1) * 4;
    let p = m * (n + 1) * 4;
    q + kv + p
}

/// Work list of one prefill launch: tile `i` covers queries `tile_q_start[i] ..` (up to
/// [`PF_BLOCK_M`]) of sequence `tile_seq[i]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefillTiles {
    pub tile_seq: Vec<u32>,
    pub tile_q_start: Vec<u32>,
}

impl PrefillTiles {
    pub fn len(&self) -> usize {
        self.tile_seq.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tile_seq.is_empty()
    }
}

/// Tiles for `(seq_index, query_len)` pairs. Within a sequence the last tile comes first: with
/// causal masking it sees the most keys, so starting it early shortens the tail of the launch.
pub fn prefill_tiles(seqs: impl IntoIterator<Item = (u32, u32)>) -> PrefillTiles {
    let mut tiles = PrefillTiles::default();
    for (seq, query_len) in seqs {
        let n = query_len.div_ceil(PF_BLOCK_M);
        for t in (0..n).rev() {
            tiles.tile_seq.push(seq);
            tiles.tile_q_start.push(t * PF_BLOCK_M);
        }
    }
    tiles
}

/// `prefill_attention_hd*_bf16`: (tile, query head).
pub fn prefill_launch(n_tiles: u32, n_heads: u32) -> Launch {
    Launch::new([n_tiles, n_heads, 1], PF_THREADS)
}

/// Why an attention shape cannot run on these kernels, if it cannot.
pub fn attention_unsupported(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Option<String> {
    if crate::HeadDim::new(head_dim).is_none() {
        return Some(format!(
            "head_dim {head_dim} (kernels exist for 32, 64, 128)"
        ));
    }
    if n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
        return Some(format!(
            "{n_heads} query heads over {n_kv_heads} KV heads (must divide)"
        ));
    }
    if n_heads / n_kv_heads > PA_MAX_GROUP {
        return Some(format!(
            "{} query heads per KV head (decode kernel supports up to {PA_MAX_GROUP})",
            n_heads / n_kv_heads
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KernelFile;

    /// Each constant appears in its file, as `#define NAME value` or `NAME = value` in the
    /// launch contract, so the Rust side cannot drift from the kernels.
    #[test]
    fn constants_match_the_kernel_sources() {
        let cases: &[(KernelFile, &str, u64)] = &[
            (
                KernelFile::Embedding,
                "EMBEDDING_THREADS",
                EMBEDDING_THREADS.into(),
            ),
            (KernelFile::Rope, "ROPE_THREADS", ROPE_THREADS.into()),
            (
                KernelFile::KvWrite,
                "KV_WRITE_THREADS",
                KV_WRITE_THREADS.into(),
            ),
            (KernelFile::SiluMul, "SILU_THREADS", SILU_THREADS.into()),
            (KernelFile::PagedAttention, "PA_THREADS", PA_THREADS.into()),
            (
                KernelFile::PagedAttention,
                "PA_MAX_GROUP",
                PA_MAX_GROUP as u64,
            ),
            (
                KernelFile::PagedAttention,
                "PA_MAX_PARTITION",
                PA_MAX_PARTITION.into(),
            ),
            (
                KernelFile::PagedAttention,
                "PA_REDUCE_THREADS",
                PA_REDUCE_THREADS.into(),
            ),
            (
                KernelFile::PrefillAttention,
                "PF_THREADS",
                PF_THREADS.into(),
            ),
            (
                KernelFile::PrefillAttention,
                "PF_BLOCK_M",
                PF_BLOCK_M.into(),
            ),
            (
                KernelFile::PrefillAttention,
                "PF_BLOCK_N",
                PF_BLOCK_N.into(),
            ),
            (
                KernelFile::Sampling,
                "SAMPLE_THREADS",
                SAMPLE_THREADS.into(),
            ),
            (
                KernelFile::Sampling,
                "SAMPLE_MAX_TOP",
                SAMPLE_MAX_TOP as u64,
            ),
        ];
        for (file, name, value) in cases {
            let src = file.source();
            let define = format!("#define {name} {value}\n");
            let contract = format!("{name} = {value}");
            assert!(
                src.contains(&define) || src.contains(&contract),
                "kernels/{} does not state {name} = {value}",
                file.file_name()
            );
        }
    }

    #[test]
    fn static_shared_memory_fits_without_opt_in() {
        for d in crate::HeadDim::ALL {
            assert!(
                decode_smem_bytes(d.get()) <= STATIC_SMEM_LIMIT,
                "decode hd{}",
                d.get()
            );
            assert!(
                prefill_smem_bytes(d.get()) <= STATIC_SMEM_LIMIT,
                "prefill hd{}",
                d.get()
            );
        }
        // The figure quoted in prefill_attention.cu's header for head_dim 128.
        assert_eq!(prefill_smem_bytes(128), 37_376);
    }

    #[test]
    fn norm_threads_cover_the_row_in_multiples_of_a_warp() {
        for (hidden, threads) in [
            (1, 32),
            (256, 64),
            (4096, 1024),
            (8192, 1024),
            (100, 32),
            (200, 64),
        ] {
            let l = norm_launch(3, hidden);
            assert_eq!(l.block[0], threads, "hidden {hidden}");
            assert_eq!(l.grid, [3, 1, 1]);
            assert_eq!(l.block[0] % 32, 0);
        }
    }

    #[test]
    fn silu_grid_covers_every_column() {
        for inter in [1u32, 7, 8, 688, 2048, 2049, 11008, 5504] {
            let l = silu_mul_launch(5, inter);
            let covered = l.grid[1] * l.block[0] * 8;
            assert!(covered >= inter, "inter {inter}");
            assert!(
                covered < inter + l.block[0] * 8,
                "inter {inter}: a whole idle column block"
            );
            assert_eq!(l.grid[0], 5);
        }
    }

    #[test]
    fn decode_partitions_fill_the_gpu_and_cover_the_context() {
        // batch 1, 32 KV heads, 2048 context, 132 SMs: 512 -> 4 parts = 128 CTAs < 264,
        // 256 -> 256 CTAs < 264, 128 -> 16 parts = 512 CTAs.
        let p = decode_partitions(2048, 1, 32, 132);
        assert_eq!(
            p,
            DecodePartitions {
                partition_size: 128,
                max_partitions: 16
            }
        );
        // A big batch keeps the largest partition.
        let p = decode_partitions(640, 256, 32, 132);
        assert_eq!(
            p,
            DecodePartitions {
                partition_size: 512,
                max_partitions: 2
            }
        );
        // Never below the floor, even for one tiny sequence.
        let p = decode_partitions(10, 1, 1, 132);
        assert_eq!(p.partition_size, PA_MIN_PARTITION);
        assert_eq!(p.max_partitions, 1);
        for (ctx, seqs, heads) in [
            (1u32, 1u32, 8u32),
            (4096, 3, 8),
            (513, 64, 2),
            (100_000, 1, 32),
        ] {
            let p = decode_partitions(ctx, seqs, heads, 132);
            assert!(p.partition_size.is_multiple_of(32) && p.partition_size <= PA_MAX_PARTITION);
            assert!(u64::from(p.partition_size) * u64::from(p.max_partitions) >= u64::from(ctx));
            assert!(
                u64::from(p.partition_size) * u64::from(p.max_partitions - 1)
                    < u64::from(ctx.max(1))
            );
        }
    }

    #[test]
    fn decode_workspace_matches_the_kernel_indexing() {
        // Highest index the kernel writes: ((seq * n_heads + h) * max_parts + part) * hd + d.
        let (seqs, heads, parts, hd) = (3usize, 4usize, 5usize, 32usize);
        let w = decode_workspace(seqs, heads, parts, hd);
        let last = (((seqs - 1) * heads + heads - 1) * parts + parts - 1) * hd + hd - 1;
        assert_eq!(w.acc_len, last + 1);
        assert_eq!(
            w.stats_len,
            ((seqs - 1) * heads + heads - 1) * parts + parts
        );
    }

    #[test]
    fn prefill_tiles_cover_each_query_once() {
        let seqs = [(0u32, 1u32), (1, 32), (2, 33), (3, 100)];
        let tiles = prefill_tiles(seqs);
        assert_eq!(tiles.len(), 1 + 1 + 2 + 4);
        for (seq, qlen) in seqs {
            let mut covered = vec![0u32; qlen as usize];
            for i in 0..tiles.len() {
                if tiles.tile_seq[i] == seq {
                    let start = tiles.tile_q_start[i];
                    assert_eq!(start % PF_BLOCK_M, 0);
                    for q in start..(start + PF_BLOCK_M).min(qlen) {
                        covered[q as usize] += 1;
                    }
                }
            }
            assert!(covered.iter().all(|c| *c == 1), "seq {seq}: {covered:?}");
        }
        // Last tile of a sequence first.
        assert_eq!(&tiles.tile_q_start[4..8], &[96, 64, 32, 0]);
        assert!(prefill_tiles([]).is_empty());
    }

    #[test]
    fn attention_shapes() {
        assert_eq!(attention_unsupported(32, 32, 128), None);
        assert_eq!(attention_unsupported(8, 2, 32), None);
        assert_eq!(attention_unsupported(64, 8, 128), None);
        assert!(attention_unsupported(8, 3, 32).is_some());
        assert!(attention_unsupported(8, 0, 32).is_some());
        assert!(attention_unsupported(32, 2, 128).is_some());
        assert!(attention_unsupported(8, 8, 96).is_some());
    }

    #[test]
    fn fixed_launches() {
        assert_eq!(embedding_launch(7).grid, [7, 1, 1]);
        assert_eq!(rope_launch(7).block, [ROPE_THREADS, 1, 1]);
        assert_eq!(kv_write_launch(7).grid, [7, 1, 1]);
        assert_eq!(sample_launch(3).block, [SAMPLE_THREADS, 1, 1]);
        let parts = DecodePartitions {
            partition_size: 256,
            max_partitions: 3,
        };
        assert_eq!(decode_launch(8, 5, parts).grid, [8, 5, 3]);
        assert_eq!(decode_reduce_launch(32, 5).grid, [32, 5, 1]);
        assert_eq!(prefill_launch(9, 32).grid, [9, 32, 1]);
    }
}
