// rmsnorm.cu: RMSNorm, plain and fused with the residual add.
//
//   rmsnorm(x, w)[i] = x[i] / sqrt(mean_j(x[j]^2) + eps) * w[i]      (f32 math, bf16 out)
//
// Kernel `rmsnorm_bf16`
//   x [n_rows, hidden] bf16, weight [hidden] bf16, out [n_rows, hidden] bf16. out may alias x.
// Kernel `fused_add_rmsnorm_bf16`
//   x [n_rows, hidden] bf16 (the sub-layer output), residual [n_rows, hidden] bf16 (in/out),
//   weight [hidden] bf16, out [n_rows, hidden] bf16.
//   residual <- residual + x (rounded to bf16: that is what the next layer reads), then
//   out <- rmsnorm(residual, weight). out may alias x; residual must not alias either.
// Row rows are independent; each thread revisits only the elements it wrote, so the second
// pass needs no barrier beyond the reduction's.
// Launch: grid (n_rows), block geometry::norm_launch(hidden).threads (a multiple of 32, <= 1024).
// CPU twin: allam_backend_cpu `rms_norm` / `add_rms_norm` (same formula in f32; HF Llama
//   LlamaRMSNorm computes the statistic in f32 too).
#include "bf16_math.cuh"

extern "C" __global__ void rmsnorm_bf16(const bf16* x, const bf16* __restrict__ weight, bf16* out,
                                        u32 hidden, float eps) {
    __shared__ float scratch[32];
    const bf16* xr = x + (size_t)blockIdx.x * hidden;
    bf16* outr = out + (size_t)blockIdx.x * hidden;
    float ss = 0.0f;
    for (u32 i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float v = bf2f(xr[i]);
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)hidden + eps);
    for (u32 i = threadIdx.x; i < hidden; i += blockDim.x) {
        outr[i] = f2bf(bf2f(xr[i]) * inv * bf2f(weight[i]));
    }
}

extern "C" __global__ void fused_add_rmsnorm_bf16(const bf16* x, bf16* __restrict__ residual,
                                                  const bf16* __restrict__ weight, bf16* out,
                                                  u32 hidden, float eps) {
    __shared__ float scratch[32];
    const bf16* xr = x + (size_t)blockIdx.x * hidden;
    bf16* rr = residual + (size_t)blockIdx.x * hidden;
    bf16* outr = out + (size_t)blockIdx.x * hidden;
    float ss = 0.0f;
    for (u32 i = threadIdx.x; i < hidden; i += blockDim.x) {
        const bf16 sum = f2bf(bf2f(rr[i]) + bf2f(xr[i]));
        rr[i] = sum;
        const float v = bf2f(sum);
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)hidden + eps);
    for (u32 i = threadIdx.x; i < hidden; i += blockDim.x) {
        outr[i] = f2bf(bf2f(rr[i]) * inv * bf2f(weight[i]));
    }
}
