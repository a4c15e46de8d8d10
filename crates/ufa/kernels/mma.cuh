// Tensor-core building blocks shared by the forward and backward kernels (sm_80+): shared
// memory addressing, cp.async copies, ldmatrix, mma.sync m16n8k16 and the tile loader.
//
// Needs common.cuh before it.

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    uint32_t a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 16 bytes global -> shared, bypassing L1; src_bytes = 0 writes zeros (rows past the end).
// `dst` is a shared-state-space address (smem_addr).
__device__ __forceinline__ void cp_async_16_to(uint32_t dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src),
                 "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
    cp_async_16_to(smem_addr(dst), src, src_bytes);
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

// `addr` is a shared-state-space address (smem_addr): kept as one 32-bit base per thread plus
// compile-time offsets, so each ldmatrix is one instruction with an immediate offset.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// d += a · b for one 16x8x16 tile; fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
    if constexpr (T::is_bf16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// Copies rows [row0, row0 + ROWS) of one head (rows `row_stride` elements apart) into a padded
// shared tile; rows at or past `rows_total` become zeros, so padded keys contribute nothing.
// Every row starts on a 16-byte boundary (the host sends other layouts to the CUDA-core
// kernel). Fully unrolled with compile-time chunk positions: a run-time loop here cost more
// instructions than the tile's mma work (seen in SASS, 2026-11-25).
// `Cfg` supplies kThreads, kChunksPerRow (16-byte pieces of a row) and kRowPitch (elements).
template <typename Cfg, int ROWS>
__device__ __forceinline__ void load_tile(uint16_t* tile, const uint16_t* head_base,
                                          int64_t row_stride, int row0, int rows_total) {
    constexpr int kChunks = ROWS * Cfg::kChunksPerRow;
    constexpr int kIters = (kChunks + Cfg::kThreads - 1) / Cfg::kThreads;
    const int tid = threadIdx.x;
    if constexpr (Cfg::kThreads % Cfg::kChunksPerRow == 0) {
        // Each thread keeps one column and walks down the rows: one pointer, one add a chunk.
        constexpr int kRowsPerIter = Cfg::kThreads / Cfg::kChunksPerRow;
        const int r0 = tid / Cfg::kChunksPerRow;
        const int col = (tid % Cfg::kChunksPerRow) * 8;
        const uint16_t* src = head_base + (int64_t)(row0 + r0) * row_stride + col;
        const int64_t step = (int64_t)kRowsPerIter * row_stride;
        uint16_t* dst = tile + r0 * Cfg::kRowPitch + col;
#pragma unroll
        for (int it = 0; it < kIters; ++it) {
            if (ROWS % kRowsPerIter != 0 && r0 + it * kRowsPerIter >= ROWS) break;
            const bool valid = row0 + r0 + it * kRowsPerIter < rows_total;
            cp_async_16(dst + it * kRowsPerIter * Cfg::kRowPitch, valid ? src : head_base,
                        valid ? 16 : 0);
            src += step;
        }
    } else {
#pragma unroll
        for (int it = 0; it < kIters; ++it) {
            const int c = tid + it * Cfg::kThreads;
            if (kChunks % Cfg::kThreads != 0 && c >= kChunks) break;
            const int r = c / Cfg::kChunksPerRow;
            const int col = (c % Cfg::kChunksPerRow) * 8;
            const bool valid = row0 + r < rows_total;
            const uint16_t* src = head_base + (valid ? (int64_t)(row0 + r) * row_stride + col : 0);
            cp_async_16(tile + r * Cfg::kRowPitch + col, src, valid ? 16 : 0);
        }
    }
}

