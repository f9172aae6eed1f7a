// paged_attention.cu: decode attention (one query token per sequence) over a paged KV cache,
// split-K ("flash-decoding"): each CTA scores one partition of one sequence's context for all
// query heads that share one KV head (GQA: K/V are read once per group), and a second kernel
// merges the partitions with their softmax statistics.
//
// Kernel `paged_attention_decode_hd{32,64,128}_bf16` (head_dim D fixed at compile time)
//   q            [n_tokens, q_row_stride] bf16; query head h of the sequence's query token at
//                q + query_rows[s]*q_row_stride + h*D (a column slice of the fused qkv output).
//   k_cache, v_cache [num_blocks, block_size, n_kv_heads, D] bf16 (see kv_write.cu).
//   block_tables [n_seqs, max_blocks_per_seq] u32: physical block of each logical block.
//   context_lens [n_seqs] u32: tokens the query attends to (positions 0..context_len-1, its own
//                K/V already written).
//   query_rows   [n_seqs] u32: token row of each sequence's query in q (and in the output).
//   part_acc     [n_seqs, n_heads, max_partitions, D] f32 workspace: sum_t p_t * v_t
//   part_max     [n_seqs, n_heads, max_partitions] f32 workspace: max_t score_t
//   part_sum     [n_seqs, n_heads, max_partitions] f32 workspace: sum_t p_t, p_t = exp(score_t - max)
//   score_t = scale * dot(q_h, k_t); query head h uses KV head h / (n_heads / n_kv_heads).
// Launch: grid (n_kv_heads, n_seqs, max_partitions), block PA_THREADS = 128, static shared
//   memory only (<= 22.5 KiB). Requires n_heads % n_kv_heads == 0, n_heads / n_kv_heads <=
//   PA_MAX_GROUP = 8, partition_size % 32 == 0 and 0 < partition_size <= PA_MAX_PARTITION = 512
//   (geometry::decode_partitions). Partitions that start past a sequence's context exit at once.
//
// Kernel `paged_attention_reduce_bf16`
//   Reads the workspaces above, writes out [n_tokens, out_row_stride] bf16: head h of sequence s
//   at out + query_rows[s]*out_row_stride + h*head_dim, = sum_i w_i acc_i / sum_i w_i sum_i with
//   w_i = exp(max_i - max_j max_j) over the ceil(context_len / partition_size) partitions.
// Launch: grid (n_heads, n_seqs), block PA_REDUCE_THREADS = 128.
//
// CPU twin: allam_backend_cpu `attention` (exact softmax(q K^T * scale) V in f32 over the same
//   paged cache, causal by position) restricted to query_len == 1 sequences.
#include "bf16_math.cuh"

#define PA_THREADS 128
#define PA_WARPS (PA_THREADS / 32)
#define PA_MAX_GROUP 8
#define PA_MAX_PARTITION 512

template <int D>
__device__ __forceinline__ void paged_attention_decode(
    const bf16* __restrict__ q, u32 q_row_stride, const bf16* __restrict__ k_cache,
    const bf16* __restrict__ v_cache, const u32* __restrict__ block_tables, u32 max_blocks_per_seq,
    const u32* __restrict__ context_lens, const u32* __restrict__ query_rows,
    float* __restrict__ part_acc, float* __restrict__ part_max, float* __restrict__ part_sum,
    u32 n_heads, u32 n_kv_heads, u32 block_size, u32 partition_size, u32 max_partitions,
    float scale) {
    constexpr int VEC = 8;
    constexpr int TPT = D / VEC;                  // threads per token: 4, 8, 16
    constexpr int TOK_PER_PASS = PA_THREADS / TPT;  // tokens scored at once: 32, 16, 8
    static_assert(TPT >= 1 && TPT <= 32 && (32 % TPT) == 0, "head_dim must be 8..256, power of 2");

    __shared__ __align__(16) float q_s[PA_MAX_GROUP * D];
    __shared__ float logits_s[PA_MAX_GROUP * PA_MAX_PARTITION];
    __shared__ __align__(16) float out_s[PA_WARPS * D];
    __shared__ float scratch[32];

    const u32 kv_head = blockIdx.x, seq = blockIdx.y, part = blockIdx.z;
    const u32 ctx = context_lens[seq];
    const u32 start = part * partition_size;
    if (start >= ctx) return;  // uniform across the CTA: nothing below is reached by anyone
    const u32 n_tok = min(partition_size, ctx - start);
    const u32 group = n_heads / n_kv_heads;
    const u32 tid = threadIdx.x;
    const u32 lane = tid & 31u, warp = tid >> 5;
    const u32 lane_t = tid % TPT;   // which 8-wide slice of head_dim this thread owns
    const u32 tok_slot = tid / TPT; // which token of a pass this thread works on

    const bf16* q_row = q + (size_t)query_rows[seq] * q_row_stride + (size_t)kv_head * group * D;
    for (u32 i = tid; i < group * D; i += PA_THREADS) q_s[i] = bf2f(q_row[i]) * scale;
    __syncthreads();

    const u32* table = block_tables + (size_t)seq * max_blocks_per_seq;
    const size_t token_stride = (size_t)n_kv_heads * D;
    const size_t head_off = (size_t)kv_head * D + lane_t * VEC;

    // Phase 1: scores. Every thread runs the same number of passes (shuffles need the whole
    // warp); out-of-range tokens compute on zeros and do not store.
    for (u32 base = 0; base < n_tok; base += TOK_PER_PASS) {
        const u32 t = base + tok_slot;
        const bool valid = t < n_tok;
        float kf[VEC];
        if (valid) {
            const u32 pos = start + t;
            const u32 blk = table[pos / block_size];
            load_bf16x8(k_cache + ((size_t)blk * block_size + pos % block_size) * token_stride + head_off, kf);
        } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) kf[i] = 0.0f;
        }
        for (u32 g = 0; g < group; ++g) {
            const float4* qv = reinterpret_cast<const float4*>(q_s + g * D + lane_t * VEC);
            const float4 a = qv[0], b = qv[1];
            float d = a.x * kf[0] + a.y * kf[1] + a.z * kf[2] + a.w * kf[3] + b.x * kf[4] +
                      b.y * kf[5] + b.z * kf[6] + b.w * kf[7];
#pragma unroll
            for (int o = TPT / 2; o > 0; o >>= 1) d += __shfl_xor_sync(ALLAM_FULL_MASK, d, o);
            if (valid && lane_t == 0) logits_s[g * PA_MAX_PARTITION + t] = d;
        }
    }
    __syncthreads();

    // Phase 2: softmax statistics per query head; logits_s becomes p = exp(score - max).
    const size_t stat_base = ((size_t)seq * n_heads + (size_t)kv_head * group) * max_partitions + part;
    for (u32 g = 0; g < group; ++g) {
        float* lg = logits_s + g * PA_MAX_PARTITION;
        float m = ALLAM_NEG_INF;
        for (u32 t = tid; t < n_tok; t += PA_THREADS) m = fmaxf(m, lg[t]);
        m = block_max(m, scratch);
        float s = 0.0f;
        for (u32 t = tid; t < n_tok; t += PA_THREADS) {
            const float e = __expf(lg[t] - m);
            lg[t] = e;
            s += e;
        }
        s = block_sum(s, scratch);
        if (tid == 0) {
            part_max[stat_base + (size_t)g * max_partitions] = m;
            part_sum[stat_base + (size_t)g * max_partitions] = s;
        }
    }
    __syncthreads();

    // Phase 3: acc[g] = sum_t p[g][t] * v_t over this thread's tokens and dims.
    float acc[PA_MAX_GROUP][VEC];
#pragma unroll
    for (int g = 0; g < PA_MAX_GROUP; ++g)
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[g][i] = 0.0f;
    for (u32 t = tok_slot; t < n_tok; t += TOK_PER_PASS) {
        const u32 pos = start + t;
        const u32 blk = table[pos / block_size];
        float vf[VEC];
        load_bf16x8(v_cache + ((size_t)blk * block_size + pos % block_size) * token_stride + head_off, vf);
#pragma unroll
        for (int g = 0; g < PA_MAX_GROUP; ++g) {
            if ((u32)g < group) {
                const float p = logits_s[g * PA_MAX_PARTITION + t];
#pragma unroll
                for (int i = 0; i < VEC; ++i) acc[g][i] += p * vf[i];
            }
        }
    }

    // Sum over the token slots that share lane_t: first inside the warp, then across warps.
#pragma unroll
    for (int g = 0; g < PA_MAX_GROUP; ++g) {
        if ((u32)g >= group) break;  // uniform
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            float v = acc[g][i];
#pragma unroll
            for (int o = TPT; o < 32; o <<= 1) v += __shfl_xor_sync(ALLAM_FULL_MASK, v, o);
            acc[g][i] = v;
        }
        if (lane < (u32)TPT) {
#pragma unroll
            for (int i = 0; i < VEC; ++i) out_s[warp * D + lane_t * VEC + i] = acc[g][i];
        }
        __syncthreads();
        for (u32 d = tid; d < (u32)D; d += PA_THREADS) {
            float v = 0.0f;
#pragma unroll
            for (int w = 0; w < PA_WARPS; ++w) v += out_s[w * D + d];
            part_acc[(stat_base + (size_t)g * max_partitions) * D + d] = v;
        }
        __syncthreads();
    }
}

#define ALLAM_DECODE_ENTRY(D)                                                                     \
    extern "C" __global__ void __launch_bounds__(PA_THREADS) paged_attention_decode_hd##D##_bf16( \
        const bf16* __restrict__ q, u32 q_row_stride, const bf16* __restrict__ k_cache,           \
        const bf16* __restrict__ v_cache, const u32* __restrict__ block_tables,                   \
        u32 max_blocks_per_seq, const u32* __restrict__ context_lens,                             \
        const u32* __restrict__ query_rows, float* __restrict__ part_acc,                         \
        float* __restrict__ part_max, float* __restrict__ part_sum, u32 n_heads, u32 n_kv_heads,  \
        u32 block_size, u32 partition_size, u32 max_partitions, float scale) {                    \
        paged_attention_decode<D>(q, q_row_stride, k_cache, v_cache, block_tables,                \
                                  max_blocks_per_seq, context_lens, query_rows, part_acc,         \
                                  part_max, part_sum, n_heads, n_kv_heads, block_size,            \
                                  partition_size, max_partitions, scale);                         \
    }

ALLAM_DECODE_ENTRY(32)
ALLAM_DECODE_ENTRY(64)
ALLAM_DECODE_ENTRY(128)

#define PA_REDUCE_THREADS 128

extern "C" __global__ void __launch_bounds__(PA_REDUCE_THREADS) paged_attention_reduce_bf16(
    const float* __restrict__ part_acc, const float* __restrict__ part_max,
    const float* __restrict__ part_sum, const u32* __restrict__ context_lens,
    const u32* __restrict__ query_rows, bf16* __restrict__ out, u32 out_row_stride, u32 n_heads,
    u32 head_dim, u32 partition_size, u32 max_partitions) {
    const u32 head = blockIdx.x, seq = blockIdx.y;
    const u32 ctx = context_lens[seq];
    bf16* o = out + (size_t)query_rows[seq] * out_row_stride + (size_t)head * head_dim;
    const u32 n_parts = (ctx + partition_size - 1) / partition_size;
    const size_t base = ((size_t)seq * n_heads + head) * max_partitions;
    float global_max = ALLAM_NEG_INF;
    for (u32 i = 0; i < n_parts; ++i) global_max = fmaxf(global_max, part_max[base + i]);
    float denom = 0.0f;
    for (u32 i = 0; i < n_parts; ++i) denom += __expf(part_max[base + i] - global_max) * part_sum[base + i];
    const float inv = denom > 0.0f ? 1.0f / denom : 0.0f;
    for (u32 d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float num = 0.0f;
        for (u32 i = 0; i < n_parts; ++i) {
            num += __expf(part_max[base + i] - global_max) * part_acc[(base + i) * head_dim + d];
        }
        o[d] = f2bf(num * inv);
    }
}
