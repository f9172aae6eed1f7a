// sampling.cu: next-token selection on the device, so only ids and a few floats cross to the
// host each step.
//
// Kernel `sample_rows_f32`: one CTA per logits row.
//   logits         [n_rows, logits_row_stride] f32 (the lm_head GEMM writes f32), vocab valid
//                  columns per row. NaN counts as -inf.
//   temperature    [n_rows] f32: <= 0 means greedy (argmax; ties -> lowest id).
//   top_k          [n_rows] u32: 0 or >= vocab disables it.
//   top_p          [n_rows] f32: >= 1 disables it.
//   uniform        [n_rows] f32 in [0, 1): the host's seeded draw for this row and step.
//   n_top          number of top logprobs to report, <= SAMPLE_MAX_TOP = 20 (0 = none).
//   out_token      [n_rows] u32 chosen id.
//   out_logprob    [n_rows] f32 log_softmax(logits)[chosen] (raw logits: temperature 1, no
//                  filtering, the same numbers the goldens and OpenAI `logprobs` report).
//   out_top_ids    [n_rows, SAMPLE_MAX_TOP] u32, out_top_logprobs [n_rows, SAMPLE_MAX_TOP] f32:
//                  the n_top largest raw logprobs, by logprob descending then id ascending.
//                  Entries n_top.. are left untouched.
// Sampling (temperature > 0): w_i = exp((l_i - max) / T). top-k keeps ids whose logit is >= the
//   k-th largest; top-p then keeps ids whose logit is >= the largest threshold t for which the
//   kept weight above t is >= top_p * (weight kept by top-k). Ties at a threshold are all kept
//   (HF/vLLM break them by sort order; with real logits exact ties are rare). The chosen id is
//   the first id in id order whose running kept weight exceeds uniform * total kept weight.
//   Thresholds are found exactly by a 32-step bitwise search over the order-preserving u32 key
//   of the f32 logit (no sort).
// Launch: grid (n_rows), block SAMPLE_THREADS = 512 (any multiple of 32 up to 1024 works).
// CPU twin: allam_backend_cpu `sample` (same rules, same uniform draw).
#include "bf16_math.cuh"

#define SAMPLE_MAX_TOP 20

// Monotone map from f32 (NaN -> -inf) to u32: a < b  <=>  key(a) < key(b).
__device__ __forceinline__ u32 order_key(float f) {
    if (f != f) f = ALLAM_NEG_INF;
    const u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float clean(float f) { return f != f ? ALLAM_NEG_INF : f; }

// Largest key t with count(key_i >= t) >= k (that is, the key of the k-th largest logit).
__device__ u32 kth_largest_key(const float* row, u32 vocab, u32 k, u32* scratch_u) {
    u32 t = 0u;
    for (int bit = 31; bit >= 0; --bit) {
        const u32 cand = t | (1u << bit);
        u32 c = 0u;
        for (u32 i = threadIdx.x; i < vocab; i += blockDim.x) c += order_key(row[i]) >= cand ? 1u : 0u;
        c = block_sum_u32(c, scratch_u);
        if (c >= k) t = cand;
    }
    return t;
}

// Sum of exp((l_i - mx) * inv_t) over ids with key >= max(lo, floor_key).
__device__ float kept_weight(const float* row, u32 vocab, u32 lo, u32 floor_key, float mx,
                             float inv_t, float* scratch) {
    const u32 th = max(lo, floor_key);
    float s = 0.0f;
    for (u32 i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float l = clean(row[i]);
        if (order_key(l) >= th) s += __expf((l - mx) * inv_t);
    }
    return block_sum(s, scratch);
}

extern "C" __global__ void sample_rows_f32(const float* __restrict__ logits, u32 vocab,
                                           u32 logits_row_stride,
                                           const float* __restrict__ temperature,
                                           const u32* __restrict__ top_k,
                                           const float* __restrict__ top_p,
                                           const float* __restrict__ uniform, u32 n_top,
                                           u32* __restrict__ out_token,
                                           float* __restrict__ out_logprob,
                                           u32* __restrict__ out_top_ids,
                                           float* __restrict__ out_top_logprobs) {
    __shared__ float scratch[32];
    __shared__ u32 scratch_u[32];
    __shared__ float red_val[32];
    __shared__ u32 red_idx[32];
    __shared__ u32 chosen_s;
    __shared__ u32 top_count;
    __shared__ u32 top_ids_s[SAMPLE_MAX_TOP];
    __shared__ float top_val_s[SAMPLE_MAX_TOP];

    const u32 row_idx = blockIdx.x;
    const float* row = logits + (size_t)row_idx * logits_row_stride;
    const u32 tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5, n_warps = blockDim.x >> 5;

    // Pass 1: max and argmax (first occurrence).
    float best = ALLAM_NEG_INF;
    u32 best_i = 0xffffffffu;
    for (u32 i = tid; i < vocab; i += blockDim.x) {
        const float l = clean(row[i]);
        if (best_i == 0xffffffffu || l > best) { best = l; best_i = i; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(ALLAM_FULL_MASK, best, o);
        const u32 oi = __shfl_xor_sync(ALLAM_FULL_MASK, best_i, o);
        if (ov > best || (ov == best && oi < best_i)) { best = ov; best_i = oi; }
    }
    if (lane == 0) { red_val[warp] = best; red_idx[warp] = best_i; }
    __syncthreads();
    if (warp == 0) {
        best = lane < n_warps ? red_val[lane] : ALLAM_NEG_INF;
        best_i = lane < n_warps ? red_idx[lane] : 0xffffffffu;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(ALLAM_FULL_MASK, best, o);
            const u32 oi = __shfl_xor_sync(ALLAM_FULL_MASK, best_i, o);
            if (ov > best || (ov == best && oi < best_i)) { best = ov; best_i = oi; }
        }
        if (lane == 0) { red_val[0] = best; red_idx[0] = best_i; }
    }
    __syncthreads();
    const float mx = red_val[0];
    const u32 argmax = red_idx[0] == 0xffffffffu ? 0u : red_idx[0];

    // Pass 2: log-sum-exp of the raw logits.
    float se = 0.0f;
    if (mx != ALLAM_NEG_INF) {
        for (u32 i = tid; i < vocab; i += blockDim.x) se += __expf(clean(row[i]) - mx);
    }
    se = block_sum(se, scratch);
    const float lse = mx + logf(se);

    // Choose.
    const float temp = temperature[row_idx];
    const u32 k = top_k[row_idx];
    u32 chosen = argmax;
    if (temp > 0.0f && k != 1u && mx != ALLAM_NEG_INF) {
        const float inv_t = 1.0f / temp;
        const u32 floor_key = (k == 0u || k >= vocab) ? 0u : kth_largest_key(row, vocab, k, scratch_u);
        u32 th = floor_key;
        float total = kept_weight(row, vocab, 0u, floor_key, mx, inv_t, scratch);
        const float p = top_p[row_idx];
        if (p < 1.0f) {
            const float target = p * total;
            u32 t = 0u;
            for (int bit = 31; bit >= 0; --bit) {
                const u32 cand = t | (1u << bit);
                if (kept_weight(row, vocab, cand, floor_key, mx, inv_t, scratch) >= target) t = cand;
            }
            th = max(t, floor_key);
            total = kept_weight(row, vocab, th, floor_key, mx, inv_t, scratch);
        }
        // Inverse CDF in id order: contiguous chunks per thread, block scan of chunk weights.
        const u32 chunk = (vocab + blockDim.x - 1) / blockDim.x;
        const u32 lo = min(tid * chunk, vocab), hi = min(lo + chunk, vocab);
        float local = 0.0f;
        for (u32 i = lo; i < hi; ++i) {
            const float l = clean(row[i]);
            if (order_key(l) >= th) local += __expf((l - mx) * inv_t);
        }
        const float prefix = block_exclusive_scan(local, scratch);
        if (tid == 0) chosen_s = 0xffffffffu;
        __syncthreads();
        const float target = uniform[row_idx] * total;
        if (prefix <= target && target < prefix + local) {
            float run = prefix;
            for (u32 i = lo; i < hi; ++i) {
                const float l = clean(row[i]);
                if (order_key(l) >= th) {
                    run += __expf((l - mx) * inv_t);
                    if (run > target) { atomicMin(&chosen_s, i); break; }
                }
            }
        }
        __syncthreads();
        // Rounding can leave the target past every boundary: fall back to the argmax (always kept).
        chosen = chosen_s == 0xffffffffu ? argmax : chosen_s;
    }
    if (tid == 0) {
        out_token[row_idx] = chosen;
        out_logprob[row_idx] = clean(row[chosen]) - lse;
    }

    // Top-n raw logprobs.
    const u32 n = min(min(n_top, (u32)SAMPLE_MAX_TOP), vocab);
    if (n == 0u) return;  // uniform
    const u32 tn = kth_largest_key(row, vocab, n, scratch_u);
    if (tid == 0) top_count = 0u;
    __syncthreads();
    // Strictly above the n-th largest: fewer than n ids, any order (sorted below).
    for (u32 i = tid; i < vocab; i += blockDim.x) {
        if (order_key(row[i]) > tn) {
            const u32 slot = atomicAdd(&top_count, 1u);
            if (slot < n) { top_ids_s[slot] = i; top_val_s[slot] = clean(row[i]); }
        }
    }
    __syncthreads();
    const u32 above = min(top_count, n);
    // Equal to the n-th largest: fill the rest with the lowest ids, deterministically.
    {
        const u32 chunk = (vocab + blockDim.x - 1) / blockDim.x;
        const u32 lo = min(tid * chunk, vocab), hi = min(lo + chunk, vocab);
        u32 eq = 0u;
        for (u32 i = lo; i < hi; ++i) eq += order_key(row[i]) == tn ? 1u : 0u;
        u32 slot = above + block_exclusive_scan_u32(eq, scratch_u);
        for (u32 i = lo; i < hi && slot < n; ++i) {
            if (order_key(row[i]) == tn) {
                top_ids_s[slot] = i;
                top_val_s[slot] = clean(row[i]);
                ++slot;
            }
        }
    }
    __syncthreads();
    if (tid == 0) {
        // Insertion sort of <= 20 entries: logprob descending, id ascending.
        for (u32 a = 1; a < n; ++a) {
            const u32 id = top_ids_s[a];
            const float v = top_val_s[a];
            int b = (int)a - 1;
            while (b >= 0 && (top_val_s[b] < v || (top_val_s[b] == v && top_ids_s[b] > id))) {
                top_ids_s[b + 1] = top_ids_s[b];
                top_val_s[b + 1] = top_val_s[b];
                --b;
            }
            top_ids_s[b + 1] = id;
            top_val_s[b + 1] = v;
        }
        for (u32 a = 0; a < n; ++a) {
            out_top_ids[(size_t)row_idx * SAMPLE_MAX_TOP + a] = top_ids_s[a];
            out_top_logprobs[(size_t)row_idx * SAMPLE_MAX_TOP + a] = top_val_s[a] - lse;
        }
    }
}
