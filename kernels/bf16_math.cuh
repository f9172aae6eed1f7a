// bf16_math.cuh: helpers shared by every allam-serve kernel.
//
// Storage is bf16 (__nv_bfloat16), arithmetic is f32. Vector helpers move 8 bf16 (16 bytes)
// per thread: callers guarantee 16-byte alignment (row strides and head_dim are multiples
// of 8 elements, and cudaMalloc'd buffers are 256-byte aligned).
//
// allam-kernels splices this file into each .cu in place of the line that includes it,
// before NVRTC sees it (so the cache key covers it and no header callback is needed).
// Only <cuda_bf16.h> comes from the CUDA include directory.
#pragma once
#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;
typedef __nv_bfloat162 bf162;
typedef unsigned int u32;
typedef unsigned long long u64;

#define ALLAM_FULL_MASK 0xffffffffu
#define ALLAM_NEG_INF (__int_as_float(0xff800000))

__device__ __forceinline__ float bf2f(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ bf16 f2bf(float x) { return __float2bfloat16_rn(x); }

// Loads 8 consecutive bf16 (16-byte aligned) as f32.
__device__ __forceinline__ void load_bf16x8(const bf16* p, float out[8]) {
    uint4 raw = *reinterpret_cast<const uint4*>(p);
    const bf162* h = reinterpret_cast<const bf162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 f = __bfloat1622float2(h[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

// Stores 8 f32 as 8 consecutive bf16 (16-byte aligned), round to nearest even.
__device__ __forceinline__ void store_bf16x8(bf16* p, const float in[8]) {
    uint4 raw;
    bf162* h = reinterpret_cast<bf162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        h[i] = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);
    }
    *reinterpret_cast<uint4*>(p) = raw;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(ALLAM_FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(ALLAM_FULL_MASK, v, o));
    return v;
}

__device__ __forceinline__ u32 warp_sum_u32(u32 v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(ALLAM_FULL_MASK, v, o);
    return v;
}

// Block-wide reductions. Every thread of the block must call them (they synchronize), the
// block size must be a multiple of 32, and `scratch` must hold 32 elements. The leading
// __syncthreads makes back-to-back calls with the same scratch safe.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (lane < n_warps) ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (lane < n_warps) ? scratch[lane] : ALLAM_NEG_INF;
    return warp_max(v);
}

__device__ __forceinline__ u32 block_sum_u32(u32 v, u32* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = warp_sum_u32(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (lane < n_warps) ? scratch[lane] : 0u;
    return warp_sum_u32(v);
}

// Exclusive prefix sum of one f32 per thread across the block (same calling rules as
// block_sum). Returns this thread's exclusive prefix.
__device__ __forceinline__ float block_exclusive_scan(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    float incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        float n = __shfl_up_sync(ALLAM_FULL_MASK, incl, o);
        if (lane >= o) incl += n;
    }
    __syncthreads();
    if (lane == 31) scratch[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        float w = (lane < n_warps) ? scratch[lane] : 0.0f;
        float wi = w;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            float n = __shfl_up_sync(ALLAM_FULL_MASK, wi, o);
            if (lane >= o) wi += n;
        }
        if (lane < n_warps) scratch[lane] = wi - w;  // exclusive prefix of warp totals
    }
    __syncthreads();
    return scratch[warp] + incl - v;
}

// u32 version of block_exclusive_scan.
__device__ __forceinline__ u32 block_exclusive_scan_u32(u32 v, u32* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    u32 incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        u32 n = __shfl_up_sync(ALLAM_FULL_MASK, incl, o);
        if (lane >= o) incl += n;
    }
    __syncthreads();
    if (lane == 31) scratch[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        u32 w = (lane < n_warps) ? scratch[lane] : 0u;
        u32 wi = w;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            u32 n = __shfl_up_sync(ALLAM_FULL_MASK, wi, o);
            if (lane >= o) wi += n;
        }
        if (lane < n_warps) scratch[lane] = wi - w;
    }
    __syncthreads();
    return scratch[warp] + incl - v;
}
