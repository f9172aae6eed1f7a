// cuda_emu.h: runs CUDA kernels on the CPU for tests. Every CUDA thread of a block is a
// fiber (own stack, hand-written x86-64 context switch); fibers run one at a time and switch
// only at __syncthreads / __syncwarp / warp shuffles, so shared memory is plain `static`
// storage and block-level atomics are plain updates. Barrier misuse that is undefined on a
// GPU (a shuffle or __syncthreads that not every live thread reaches, or reached after some
// threads exited) aborts with a message instead of silently working.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct uint3_ {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

extern "C" void emu_switch(void** save_sp, void* new_sp);
extern "C" void emu_trampoline();

namespace emu {

enum State { READY, WAIT_BLOCK, WAIT_WARP, DONE };

struct Fiber {
    void* sp = nullptr;
    State state = READY;
    uint3_ tidx{0, 0, 0};
    unsigned linear = 0;
    unsigned warp_barriers = 0;  // warp barriers passed: selects the shuffle buffer
};

inline Fiber* g_cur = nullptr;
inline void* g_sched_sp = nullptr;
inline std::function<void()> g_body;
inline uint3_ g_block_idx{0, 0, 0};
inline uint3_ g_block_dim{1, 1, 1};
inline uint3_ g_grid_dim{1, 1, 1};
inline std::vector<Fiber> g_fibers;
inline std::vector<char> g_stacks;
inline std::vector<uint64_t> g_shfl;  // [warp][2][32]
constexpr size_t kStack = 64 * 1024;
inline uint64_t g_order_state = 0x9e3779b97f4a7c15ull;

inline void fail(const char* what) {
    std::fprintf(stderr, "cuda_emu: %s (block %u,%u,%u thread %u)\n", what, g_block_idx.x, g_block_idx.y,
                 g_block_idx.z, g_cur ? g_cur->linear : 0u);
    std::exit(3);
}

inline void yield() { emu_switch(&g_cur->sp, g_sched_sp); }

inline void syncthreads() {
    g_cur->state = WAIT_BLOCK;
    yield();
}

inline void warp_barrier() {
    g_cur->state = WAIT_WARP;
    yield();
    g_cur->warp_barriers++;
}

template <class T>
inline T shuffle(T v, int src_lane_fn(int lane, int arg), int arg) {
    static_assert(sizeof(T) <= 8, "shuffle of a wide type");
    const unsigned lane = g_cur->linear & 31u, warp = g_cur->linear >> 5;
    const unsigned buf = g_cur->warp_barriers & 1u;
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    g_shfl[(warp * 2 + buf) * 32 + lane] = bits;
    warp_barrier();
    int src = src_lane_fn((int)lane, arg);
    if (src < 0 || src > 31) src = (int)lane;
    T out;
    bits = g_shfl[(warp * 2 + buf) * 32 + (unsigned)src];
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}

inline int xor_lane(int lane, int m) { return lane ^ m; }
inline int up_lane(int lane, int d) { return lane - d; }

inline void run_block() {
    const unsigned n = g_block_dim.x * g_block_dim.y * g_block_dim.z;
    if (n % 32 != 0) fail("block size is not a multiple of 32 (the kernels assume whole warps)");
    g_fibers.assign(n, Fiber{});
    if (g_stacks.size() < n * kStack) g_stacks.resize(n * kStack);
    g_shfl.assign((n / 32) * 2 * 32, 0);
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = g_fibers[i];
        f.linear = i;
        f.tidx = uint3_{i % g_block_dim.x, (i / g_block_dim.x) % g_block_dim.y, i / (g_block_dim.x * g_block_dim.y)};
        uintptr_t top = reinterpret_cast<uintptr_t>(g_stacks.data() + (i + 1) * kStack) & ~uintptr_t(15);
        void** sp = reinterpret_cast<void**>(top);
        *--sp = nullptr;                                   // alignment slot (fake return address)
        *--sp = reinterpret_cast<void*>(&emu_trampoline);  // where the first switch "returns"
        for (int r = 0; r < 6; ++r) *--sp = nullptr;       // rbp rbx r12 r13 r14 r15
        f.sp = sp;
    }
    // Between barriers, fibers run in a fresh pseudo-random order each pass, so code that
    // reads shared memory another thread writes in the same phase (a race on a GPU) sees
    // stale or fresh data unpredictably and fails the comparison instead of passing by luck.
    std::vector<unsigned> order(n);
    for (unsigned i = 0; i < n; ++i) order[i] = i;
    for (;;) {
        for (unsigned i = n; i > 1; --i) {
            g_order_state = g_order_state * 6364136223846793005ull + 1442695040888963407ull;
            std::swap(order[i - 1], order[(g_order_state >> 33) % i]);
        }
        for (unsigned idx : order) {
            Fiber& f = g_fibers[idx];
            if (f.state != READY) continue;
            g_cur = &f;
            emu_switch(&g_sched_sp, f.sp);
        }
        g_cur = nullptr;
        unsigned done = 0, at_block = 0;
        for (auto& f : g_fibers) {
            done += f.state == DONE;
            at_block += f.state == WAIT_BLOCK;
        }
        if (done == n) return;
        bool released = false;
        for (unsigned w = 0; w < n / 32; ++w) {
            unsigned waiting = 0, exited = 0;
            for (unsigned l = 0; l < 32; ++l) {
                waiting += g_fibers[w * 32 + l].state == WAIT_WARP;
                exited += g_fibers[w * 32 + l].state == DONE;
            }
            if (waiting == 32) {
                for (unsigned l = 0; l < 32; ++l) g_fibers[w * 32 + l].state = READY;
                released = true;
            } else if (waiting > 0 && exited > 0) {
                g_cur = &g_fibers[w * 32];
                fail("warp shuffle/__syncwarp with exited lanes (undefined on a GPU)");
            }
        }
        if (!released && at_block > 0 && at_block + done == n) {
            if (done > 0) fail("__syncthreads reached after some threads exited");
            for (auto& f : g_fibers) f.state = READY;
            released = true;
        }
        // Every READY fiber ran to its next barrier (or exit) this pass, so if no barrier
        // opened now, none ever will.
        if (!released) fail("deadlock: threads wait at different barriers (divergent barrier)");
    }
}

template <class F>
inline void launch(dim3 grid, dim3 block, F body) {
    g_body = body;
    g_block_dim = uint3_{block.x, block.y, block.z};
    g_grid_dim = uint3_{grid.x, grid.y, grid.z};
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                g_block_idx = uint3_{x, y, z};
                run_block();
            }
}

}  // namespace emu

#define threadIdx (emu::g_cur->tidx)
#define blockIdx (emu::g_block_idx)
#define blockDim (emu::g_block_dim)
#define gridDim (emu::g_grid_dim)

inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_barrier(); }
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask) { return emu::shuffle(v, emu::xor_lane, mask); }
template <class T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta) { return emu::shuffle(v, emu::up_lane, (int)delta); }
