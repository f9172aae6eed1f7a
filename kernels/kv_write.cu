// kv_write.cu: write this step's K and V rows into the paged KV cache.
//
// Kernel `kv_cache_write_bf16`
//   k [n_tokens, k_row_stride] bf16, v [n_tokens, v_row_stride] bf16: KV head h of token t at
//     k + t*k_row_stride + h*head_dim (column slices of the fused qkv output, after RoPE on k).
//   k_cache, v_cache [num_blocks, block_size, n_kv_heads, head_dim] bf16, so slot
//     s = block * block_size + offset starts at element s * n_kv_heads * head_dim.
//   slot_mapping [n_tokens] u32; SLOT_PAD = 0xffffffff skips the token (padding rows).
// Requires head_dim % 8 == 0 and both row strides % 8 == 0 (16-byte vectors; host checks).
// Launch: grid (n_tokens), block KV_WRITE_THREADS = 128; threads stride over the
//   n_kv_heads * head_dim / 8 vectors of their token.
// CPU twin: allam_backend_cpu `write_kv` (stores into an f32 cache; the CUDA cache holds the
//   bf16 values exactly as computed).
#include "bf16_math.cuh"

extern "C" __global__ void kv_cache_write_bf16(const bf16* __restrict__ k, const bf16* __restrict__ v,
                                               bf16* __restrict__ k_cache, bf16* __restrict__ v_cache,
                                               const u32* __restrict__ slot_mapping, u32 n_kv_heads,
                                               u32 head_dim, u32 k_row_stride, u32 v_row_stride) {
    const u32 tok = blockIdx.x;
    const u32 slot = slot_mapping[tok];
    if (slot == 0xffffffffu) return;
    const u32 width = n_kv_heads * head_dim;
    const u32 n_vec = width >> 3;
    const size_t dst = (size_t)slot * width;
    const uint4* ks = reinterpret_cast<const uint4*>(k + (size_t)tok * k_row_stride);
    const uint4* vs = reinterpret_cast<const uint4*>(v + (size_t)tok * v_row_stride);
    uint4* kd = reinterpret_cast<uint4*>(k_cache + dst);
    uint4* vd = reinterpret_cast<uint4*>(v_cache + dst);
    for (u32 i = threadIdx.x; i < n_vec; i += blockDim.x) {
        kd[i] = ks[i];
        vd[i] = vs[i];
    }
}
