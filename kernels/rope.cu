// rope.cu: rotary position embedding, applied in place to the q and k heads.
//
// Hugging Face Llama convention ("rotate_half", not interleaved pairs): with R = rotary_dim
// (= head_dim for Llama), half = R/2 and i in [0, half):
//   x'[i]        = x[i] * cos_p[i] - x[i + half] * sin_p[i]
//   x'[i + half] = x[i + half] * cos_p[i] + x[i] * sin_p[i]
// Elements R..head_dim-1 (partial rotary) are left alone. Positions are per token, so one
// launch serves any mix of prefill chunks and decodes.
//
// Kernel `rope_inplace_bf16`
//   q [n_tokens, q_row_stride] bf16: head h of token t at q + t*q_row_stride + h*head_dim (h < n_heads)
//   k [n_tokens, k_row_stride] bf16: head h of token t at k + t*k_row_stride + h*head_dim (h < n_kv_heads)
//     (the strides let q and k be column slices of the fused qkv GEMM output)
//   positions [n_tokens] u32, each < the table's rows (the host validates).
//   cos_sin   [max_positions, R] f32, row p = [cos(p f_0) .. cos(p f_{half-1}), sin(p f_0) .. sin(p f_{half-1})]
//     (the model crate computes it in f64/f32 on the host: the table is the one source of angles).
// Launch: grid (n_tokens), block ROPE_THREADS = 128; threads stride over the
//   (n_heads + n_kv_heads) * half rotation pairs of their token.
// CPU twin: allam_backend_cpu `rope` (same table, f32 math; transformers' bf16 path rounds
//   cos/sin to bf16, we do not).
#include "bf16_math.cuh"

extern "C" __global__ void rope_inplace_bf16(bf16* __restrict__ q, bf16* __restrict__ k,
                                             const u32* __restrict__ positions,
                                             const float* __restrict__ cos_sin, u32 rotary_dim,
                                             u32 n_heads, u32 n_kv_heads, u32 head_dim,
                                             u32 q_row_stride, u32 k_row_stride) {
    const u32 tok = blockIdx.x;
    const u32 half = rotary_dim >> 1;
    const float* table = cos_sin + (size_t)positions[tok] * rotary_dim;
    const u32 n_pairs = (n_heads + n_kv_heads) * half;
    for (u32 p = threadIdx.x; p < n_pairs; p += blockDim.x) {
        const u32 head = p / half;
        const u32 i = p - head * half;
        bf16* base = head < n_heads
                         ? q + (size_t)tok * q_row_stride + (size_t)head * head_dim
                         : k + (size_t)tok * k_row_stride + (size_t)(head - n_heads) * head_dim;
        const float c = table[i];
        const float s = table[half + i];
        const float x1 = bf2f(base[i]);
        const float x2 = bf2f(base[i + half]);
        base[i] = f2bf(x1 * c - x2 * s);
        base[i + half] = f2bf(x2 * c + x1 * s);
    }
}
