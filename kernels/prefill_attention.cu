// prefill_attention.cu: causal attention for query chunks of any length over a paged KV cache
// (tiled, online softmax, f32 accumulation). Serves whole prompts, chunked prefill and
// prefix-cache hits alike: a sequence's query_len tokens are its LAST query_len positions,
//   query i (0-based in the chunk) sits at position context_len - query_len + i
// and attends to cached positions 0..=that position. Their own K/V were written by
// kv_cache_write_bf16 before this launch.
//
// Kernel `prefill_attention_hd{32,64,128}_bf16` (head_dim D fixed at compile time)
//   q            [n_tokens, q_row_stride] bf16, query head h of token row r at q + r*q_row_stride + h*D
//   k_cache, v_cache [num_blocks, block_size, n_kv_heads, D] bf16
//   block_tables [n_seqs, max_blocks_per_seq] u32
//   seq_query_start [n_seqs] u32: first token row of the sequence's chunk
//   seq_query_len   [n_seqs] u32
//   context_lens    [n_seqs] u32 (>= seq_query_len)
//   tile_seq     [n_tiles] u32: sequence of work tile blockIdx.x
//   tile_q_start [n_tiles] u32: first query (0-based in the chunk) of that tile, a multiple of
//                PF_BLOCK_M (geometry::prefill_tiles builds both arrays)
//   out          [n_tokens, out_row_stride] bf16, head h of row r at out + r*out_row_stride + h*D
//   Query head h uses KV head h / (n_heads / n_kv_heads). scale is usually 1/sqrt(D).
// Launch: grid (n_tiles, n_heads), block PF_THREADS = 128, static shared memory
//   (geometry::prefill_smem_bytes(128) = 37376 bytes). Requires n_heads % n_kv_heads == 0.
// Thread layout: row r = tid / 4 of the PF_BLOCK_M = 32 query rows; the 4 threads of a row
//   split the PF_BLOCK_N = 32 key columns (c = tid%4 + 4j) and the head_dim pairs
//   (pair tid%4 + 4k) between them.
// CPU twin: allam_backend_cpu `attention` (exact causal softmax(q K^T * scale) V in f32).
#include "bf16_math.cuh"

#define PF_THREADS 128
#define PF_BLOCK_M 32
#define PF_BLOCK_N 32

template <int D>
__device__ __forceinline__ void prefill_attention(
    const bf16* __restrict__ q, u32 q_row_stride, const bf16* __restrict__ k_cache,
    const bf16* __restrict__ v_cache, const u32* __restrict__ block_tables, u32 max_blocks_per_seq,
    const u32* __restrict__ seq_query_start, const u32* __restrict__ seq_query_len,
    const u32* __restrict__ context_lens, const u32* __restrict__ tile_seq,
    const u32* __restrict__ tile_q_start, bf16* __restrict__ out, u32 out_row_stride, u32 n_heads,
    u32 n_kv_heads, u32 block_size, float scale) {
    constexpr int PAIRS = D / 2;          // bf16 pairs per head row
    constexpr int KSTRIDE = PAIRS + 1;    // padded smem row (in pairs) against bank conflicts
    constexpr int QSTRIDE = D + 1;        // padded smem row (in floats)
    constexpr int COLS_PER_THREAD = PF_BLOCK_N / 4;
    constexpr int PAIRS_PER_THREAD = PAIRS / 4;
    constexpr int VECS_PER_ROW = D / 8;
    static_assert(D % 32 == 0, "head_dim must be a multiple of 32");

    __shared__ float q_s[PF_BLOCK_M * QSTRIDE];
    __shared__ bf162 k_s[PF_BLOCK_N * KSTRIDE];
    __shared__ bf162 v_s[PF_BLOCK_N * KSTRIDE];
    __shared__ float p_s[PF_BLOCK_M * (PF_BLOCK_N + 1)];

    const u32 tile = blockIdx.x, head = blockIdx.y;
    const u32 seq = tile_seq[tile];
    const u32 q0 = tile_q_start[tile];
    const u32 qlen = seq_query_len[seq];
    const u32 ctx = context_lens[seq];
    const u32 row0 = seq_query_start[seq];
    const u32 kv_head = head / (n_heads / n_kv_heads);
    const u32 tid = threadIdx.x;
    const u32 r = tid >> 2;    // query row within the tile
    const u32 quad = tid & 3u; // position within the row's 4 threads

    // Queries of this tile: rows q0 .. q0 + rows_here - 1 of the chunk.
    const u32 rows_here = min((u32)PF_BLOCK_M, qlen - q0);
    const u32 first_pos = ctx - qlen;  // position of chunk query 0
    for (u32 idx = tid; idx < (u32)(PF_BLOCK_M * D); idx += PF_THREADS) {
        const u32 rr = idx / D, d = idx - rr * D;
        float v = 0.0f;
        if (rr < rows_here) {
            v = bf2f(q[(size_t)(row0 + q0 + rr) * q_row_stride + (size_t)head * D + d]) * scale;
        }
        q_s[rr * QSTRIDE + d] = v;
    }

    const bool row_valid = r < rows_here;
    const u32 my_pos = first_pos + q0 + r;            // meaningful only if row_valid
    const u32 kv_end = first_pos + q0 + rows_here;    // keys 0 .. kv_end-1 are needed
    const u32* table = block_tables + (size_t)seq * max_blocks_per_seq;
    const size_t token_stride = (size_t)n_kv_heads * D;

    float m_i = ALLAM_NEG_INF, l_i = 0.0f;
    float acc[PAIRS_PER_THREAD * 2];
#pragma unroll
    for (int i = 0; i < PAIRS_PER_THREAD * 2; ++i) acc[i] = 0.0f;

    for (u32 kt = 0; kt < kv_end; kt += PF_BLOCK_N) {
        __syncthreads();  // previous tile's k_s/v_s readers are done (and q_s is visible)
        for (u32 idx = tid; idx < (u32)(PF_BLOCK_N * VECS_PER_ROW); idx += PF_THREADS) {
            const u32 c = idx / VECS_PER_ROW, vec = idx - c * VECS_PER_ROW;
            const u32 pos = kt + c;
            uint4 kraw = make_uint4(0u, 0u, 0u, 0u), vraw = make_uint4(0u, 0u, 0u, 0u);
            if (pos < kv_end) {
                const u32 blk = table[pos / block_size];
                const size_t off = ((size_t)blk * block_size + pos % block_size) * token_stride +
                                   (size_t)kv_head * D + vec * 8u;
                kraw = *reinterpret_cast<const uint4*>(k_cache + off);
                vraw = *reinterpret_cast<const uint4*>(v_cache + off);
            }
            const bf162* kh = reinterpret_cast<const bf162*>(&kraw);
            const bf162* vh = reinterpret_cast<const bf162*>(&vraw);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                k_s[c * KSTRIDE + vec * 4u + i] = kh[i];
                v_s[c * KSTRIDE + vec * 4u + i] = vh[i];
            }
        }
        __syncthreads();

        // Scores for row r, columns quad + 4j.
        float s[COLS_PER_THREAD];
#pragma unroll
        for (int j = 0; j < COLS_PER_THREAD; ++j) s[j] = 0.0f;
        const float* qr = q_s + r * QSTRIDE;
#pragma unroll 4
        for (int dp = 0; dp < PAIRS; ++dp) {
            const float qa = qr[2 * dp], qb = qr[2 * dp + 1];
#pragma unroll
            for (int j = 0; j < COLS_PER_THREAD; ++j) {
                const float2 kk = __bfloat1622float2(k_s[(quad + 4 * j) * KSTRIDE + dp]);
                s[j] += qa * kk.x + qb * kk.y;
            }
        }
        float tile_max = ALLAM_NEG_INF;
#pragma unroll
        for (int j = 0; j < COLS_PER_THREAD; ++j) {
            const u32 pos = kt + quad + 4u * j;
            if (!row_valid || pos > my_pos) s[j] = ALLAM_NEG_INF;
            tile_max = fmaxf(tile_max, s[j]);
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(ALLAM_FULL_MASK, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(ALLAM_FULL_MASK, tile_max, 2));
        const float m_new = fmaxf(m_i, tile_max);
        // A row with nothing visible yet keeps m = -inf; use 0 as the reference so that
        // exp(-inf - ref) = 0 instead of NaN.
        const float ref = m_new == ALLAM_NEG_INF ? 0.0f : m_new;
        const float alpha = __expf(m_i - ref);
        float row_sum = 0.0f;
#pragma unroll
        for (int j = 0; j < COLS_PER_THREAD; ++j) {
            const float p = __expf(s[j] - ref);
            row_sum += p;
            p_s[r * (PF_BLOCK_N + 1) + quad + 4 * j] = p;
        }
        row_sum += __shfl_xor_sync(ALLAM_FULL_MASK, row_sum, 1);
        row_sum += __shfl_xor_sync(ALLAM_FULL_MASK, row_sum, 2);
        l_i = l_i * alpha + row_sum;
        m_i = m_new;
#pragma unroll
        for (int i = 0; i < PAIRS_PER_THREAD * 2; ++i) acc[i] *= alpha;
        __syncwarp();  // p_s row r is written and read only by the 4 threads of row r

        const float* pr = p_s + r * (PF_BLOCK_N + 1);
#pragma unroll 4
        for (int c = 0; c < PF_BLOCK_N; ++c) {
            const float p = pr[c];
#pragma unroll
            for (int k = 0; k < PAIRS_PER_THREAD; ++k) {
                const float2 vv = __bfloat1622float2(v_s[c * KSTRIDE + quad + 4 * k]);
                acc[2 * k] += p * vv.x;
                acc[2 * k + 1] += p * vv.y;
            }
        }
    }

    if (row_valid) {
        const float inv = l_i > 0.0f ? 1.0f / l_i : 0.0f;
        bf16* o = out + (size_t)(row0 + q0 + r) * out_row_stride + (size_t)head * D;
#pragma unroll
        for (int k = 0; k < PAIRS_PER_THREAD; ++k) {
            reinterpret_cast<bf162*>(o)[quad + 4 * k] =
                __floats2bfloat162_rn(acc[2 * k] * inv, acc[2 * k + 1] * inv);
        }
    }
}

#define ALLAM_PREFILL_ENTRY(D)                                                                  \
    extern "C" __global__ void __launch_bounds__(PF_THREADS) prefill_attention_hd##D##_bf16(   \
        const bf16* __restrict__ q, u32 q_row_stride, const bf16* __restrict__ k_cache,         \
        const bf16* __restrict__ v_cache, const u32* __restrict__ block_tables,                 \
        u32 max_blocks_per_seq, const u32* __restrict__ seq_query_start,                        \
        const u32* __restrict__ seq_query_len, const u32* __restrict__ context_lens,            \
        const u32* __restrict__ tile_seq, const u32* __restrict__ tile_q_start,                 \
        bf16* __restrict__ out, u32 out_row_stride, u32 n_heads, u32 n_kv_heads, u32 block_size, \
        float scale) {                                                                          \
        prefill_attention<D>(q, q_row_stride, k_cache, v_cache, block_tables, max_blocks_per_seq, \
                             seq_query_start, seq_query_len, context_lens, tile_seq,            \
                             tile_q_start, out, out_row_stride, n_heads, n_kv_heads, block_size, \
                             scale);                                                            \
    }

ALLAM_PREFILL_ENTRY(32)
ALLAM_PREFILL_ENTRY(64)
ALLAM_PREFILL_ENTRY(128)
