// silu_mul.cu: the Llama MLP activation over the fused gate|up GEMM output.
//
//   out[r, j] = silu(gate_up[r, j]) * gate_up[r, inter + j],   silu(g) = g / (1 + exp(-g))
//
// Kernel `silu_mul_bf16`
//   gate_up [n_rows, 2 * inter] bf16 (gate columns first, then up: the order the model crate
//     concatenates gate_proj and up_proj), out [n_rows, inter] bf16. f32 math, one rounding.
// Launch: grid (n_rows, ceil(inter / (SILU_THREADS * 8))), block SILU_THREADS = 256
//   (geometry::silu_mul_launch). Each thread handles 8 consecutive columns; the vector path is
//   taken when inter % 8 == 0, otherwise a scalar path.
// CPU twin: allam_backend_cpu `silu_mul`.
#include "bf16_math.cuh"

__device__ __forceinline__ float silu(float g) { return g / (1.0f + __expf(-g)); }

extern "C" __global__ void silu_mul_bf16(const bf16* __restrict__ gate_up, bf16* __restrict__ out,
                                         u32 inter) {
    const u32 row = blockIdx.x;
    const u32 col = (blockIdx.y * blockDim.x + threadIdx.x) * 8u;
    if (col >= inter) return;
    const bf16* g = gate_up + (size_t)row * 2u * inter;
    const bf16* u = g + inter;
    bf16* o = out + (size_t)row * inter;
    if ((inter & 7u) == 0u) {
        float gv[8], uv[8], ov[8];
        load_bf16x8(g + col, gv);
        load_bf16x8(u + col, uv);
#pragma unroll
        for (int i = 0; i < 8; ++i) ov[i] = silu(gv[i]) * uv[i];
        store_bf16x8(o + col, ov);
    } else {
        const u32 end = min(col + 8u, inter);
        for (u32 j = col; j < end; ++j) o[j] = f2bf(silu(bf2f(g[j])) * bf2f(u[j]));
    }
}
