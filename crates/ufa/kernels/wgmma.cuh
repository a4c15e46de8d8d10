// Hopper (sm_90a) building blocks shared by the wgmma forward and backward kernels: tiles in
// shared memory with the 128-byte swizzle, their matrix descriptors, and the wgmma fences.
//
// A tile of ROWS rows is stored as HEAD_DIM / 64 column blocks of ROWS rows x 64 elements
// (128 bytes), 16-byte chunk c of row r at chunk c ^ (r % 8). The same bytes serve as a
// K-major operand and, transposed by the descriptor, as an MN-major one. Tiles start on
// 1024-byte boundaries (the swizzle repeats every 8 rows and descriptors assume it starts
// aligned). Templates take `Cfg` with kHeadDim and kThreads.
//
#pragma once
#include "mma.cuh"

// Byte offset of 16-byte chunk `chunk` (of HEAD_DIM / 8) of row `row` in a swizzled tile of
// ROWS rows.
template <int ROWS>
__device__ __forceinline__ uint32_t sw128_offset(int row, int chunk) {
    return (chunk / 8) * (ROWS * 128) + row * 128 + (((chunk % 8) ^ (row % 8)) << 4);
}

// Copies rows [row0, row0 + ROWS) of one head into a swizzled tile at shared address `tile`;
// rows at or past `rows_total` become zeros. Consecutive threads take consecutive chunks of a
// row, so global reads are coalesced.
template <typename Cfg, int ROWS>
__device__ __forceinline__ void load_tile_sw128(uint32_t tile, const uint16_t* head_base,
                                                int64_t row_stride, int row0, int rows_total) {
    constexpr int kChunksPerRow = Cfg::kHeadDim / 8;
    constexpr int kThreads = Cfg::kThreads;
    if constexpr (kThreads % kChunksPerRow == 0) {
        // Each thread keeps one chunk column and walks down the rows.
        constexpr int kRowsPerIter = kThreads / kChunksPerRow;
        constexpr int kIters = (ROWS + kRowsPerIter - 1) / kRowsPerIter;
        const int r0 = threadIdx.x / kChunksPerRow;
        const int chunk = threadIdx.x % kChunksPerRow;
        const uint16_t* src = head_base + (int64_t)(row0 + r0) * row_stride + chunk * 8;
        const int64_t step = (int64_t)kRowsPerIter * row_stride;
#pragma unroll
        for (int it = 0; it < kIters; ++it) {
            const int r = r0 + it * kRowsPerIter;
            if (ROWS % kRowsPerIter != 0 && r >= ROWS) break;
            const bool valid = row0 + r < rows_total;
            cp_async_16_to(tile + sw128_offset<ROWS>(r, chunk), valid ? src : head_base,
                           valid ? 16 : 0);
            src += step;
        }
    } else {
        constexpr int kChunks = ROWS * kChunksPerRow;
#pragma unroll
        for (int it = 0; it < (kChunks + kThreads - 1) / kThreads; ++it) {
            const int c = threadIdx.x + it * kThreads;
            if (kChunks % kThreads != 0 && c >= kChunks) break;
            const int r = c / kChunksPerRow;
            const int chunk = c % kChunksPerRow;
            const bool valid = row0 + r < rows_total;
            const uint16_t* src =
                head_base + (valid ? (int64_t)(row0 + r) * row_stride + chunk * 8 : 0);
            cp_async_16_to(tile + sw128_offset<ROWS>(r, chunk), src, valid ? 16 : 0);
        }
    }
}

// Address of 16-byte chunk `chunk` (0..7) of a row of a 128-byte swizzled block, given
// `row_addr`: the row's address with chunk 0's swizzled position, (row % 8) * 16, added (and any
// byte offset below 16). The swizzle is an xor of address bits 4-6, so this is one xor. The asm
// is volatile so that it is computed where used: hoisted out of the backward's loop, a row's
// eight addresses took registers that its MMA accumulators need, and spilled (2026-11-26).
__device__ __forceinline__ uint32_t sw128_chunk(uint32_t row_addr, int chunk) {
    uint32_t a;
    asm volatile("xor.b32 %0, %1, %2;" : "=r"(a) : "r"(row_addr), "r"(chunk << 4));
    return a;
}

// Shared-memory matrix descriptor, 128-byte swizzle. `lbo` is the distance between 64-element
// column blocks for MN-major operands (V); K-major ones (Q, K) span one block per k-step and
// pass 16, the customary placeholder. 8-row groups are 1024 bytes apart. `addr` (a shared
// address, below 2^18, a multiple of 16) goes in unmasked, so that the descriptor of base +
// constant is the base's plus a constant: one add in the loops instead of a recomputation.
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr, uint32_t lbo) {
    return (uint64_t)((addr >> 4) | ((lbo >> 4) << 16)) | ((uint64_t)(1024 >> 4) << 32) |
           (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses of accumulator registers across the asynchronous
// MMA's issue and wait.
template <int N> __device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
