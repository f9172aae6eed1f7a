// embedding.cu: row gather (token embedding lookup, and picking the hidden rows that need logits).
//
// Kernel `embedding_gather_bf16`
//   table  [n_table_rows, hidden] bf16, row-major. Row r holds global id `row_offset + r`
//          (a vocab-parallel shard; row_offset = 0 and the full table on one rank).
//   ids    [n_out] u32 global ids.
//   out    [n_out, hidden] bf16. A row whose id is not in [row_offset, row_offset + n_table_rows)
//          is written as zeros, so summing the shards (all-reduce) gives the full embedding.
// Launch: grid (n_out), block EMBEDDING_THREADS = 256 (geometry::embedding_launch). Any
//   hidden; the 16-byte vector path is taken when hidden % 8 == 0.
// CPU twin: allam_backend_cpu `embedding` (row_offset = 0) and `embedding_shard` (tp.rs, a
//   vocabulary slice: the CUDA backend's `embedding_shard` passes its `vocab_start` as
//   row_offset); f32 table row copies, and a bf16 table row is copied exactly.
#include "bf16_math.cuh"

extern "C" __global__ void embedding_gather_bf16(const bf16* __restrict__ table,
                                                 const u32* __restrict__ ids,
                                                 bf16* __restrict__ out,
                                                 u32 n_table_rows, u32 row_offset, u32 hidden) {
    const u32 row = blockIdx.x;
    const u32 id = ids[row];
    bf16* dst = out + (size_t)row * hidden;
    // Unsigned wrap makes ids below row_offset fail the range check too.
    const u32 local = id - row_offset;
    const bool owned = local < n_table_rows;
    const bf16* src = table + (size_t)local * hidden;
    if ((hidden & 7u) == 0u) {
        const u32 n_vec = hidden >> 3;
        const uint4* s = reinterpret_cast<const uint4*>(src);
        uint4* d = reinterpret_cast<uint4*>(dst);
        for (u32 i = threadIdx.x; i < n_vec; i += blockDim.x) {
            d[i] = owned ? s[i] : make_uint4(0u, 0u, 0u, 0u);
        }
    } else {
        for (u32 i = threadIdx.x; i < hidden; i += blockDim.x) {
            dst[i] = owned ? src[i] : f2bf(0.0f);
        }
    }
}
