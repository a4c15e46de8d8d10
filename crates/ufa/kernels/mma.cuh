// Tensor-core building blocks shared by the forward and backward kernels (sm_80+): shared
// memory addressing, cp.async copies, ldmatrix, mma.sync m16n8k16, the tile loader, and the
// backward's dQ reductions and deterministic turn counters.
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

// Adds one mma accumulator tile (rows `row` and `row + 8`, columns 2·quad and 2·quad + 1 of
// an n8 tile starting at `p`, rows `pitch` floats apart) into global memory without returning
// the old values. On sm_90, lanes pair up (quad ^ 1) so that each adds four consecutive floats
// of one row with one vector reduction: a quarter of the L2 requests of scalar adds, which
// bounded the backward (179 -> 214 TFLOP/s with pairs alone at d128, H100).
__device__ __forceinline__ void red_add_f32(float* p, float x) {
    asm volatile("red.global.add.f32 [%0], %1;" ::"l"(p), "f"(x) : "memory");
}
__device__ __forceinline__ void red_add_tile(float* p, int64_t pitch, const float (&c)[4], int group,
                                             int quad, bool row_ok, bool row8_ok) {
#if __CUDA_ARCH__ >= 900
    const bool odd = quad & 1;
    // Even lanes keep row `group` and take the partner's two columns of it; odd lanes keep
    // row `group + 8` and take the partner's two columns before their own.
    const float x = __shfl_xor_sync(0xffffffffu, odd ? c[0] : c[2], 1);
    const float y = __shfl_xor_sync(0xffffffffu, odd ? c[1] : c[3], 1);
    const int row = group + (odd ? 8 : 0);
    const int col = (quad & ~1) * 2;
    const float v0 = odd ? x : c[0], v1 = odd ? y : c[1];
    const float v2 = odd ? c[2] : x, v3 = odd ? c[3] : y;
    if (odd ? row8_ok : row_ok)
        asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p + row * pitch + col),
                     "f"(v0), "f"(v1), "f"(v2), "f"(v3)
                     : "memory");
#else
    const int col = quad * 2;
    if (row_ok) {
        red_add_f32(p + group * pitch + col, c[0]);
        red_add_f32(p + group * pitch + col + 1, c[1]);
    }
    if (row8_ok) {
        red_add_f32(p + (group + 8) * pitch + col, c[2]);
        red_add_f32(p + (group + 8) * pitch + col + 1, c[3]);
    }
#endif
}

// The deterministic turn counters: a gpu-scope acquire load and release store, so that the
// dQ adds of the block that hands over the turn are visible to the one that takes it.
__device__ __forceinline__ int32_t load_acquire(const int32_t* p) {
    int32_t v;
    asm volatile("ld.global.acquire.gpu.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ void store_release(int32_t* p, int32_t v) {
    asm volatile("st.global.release.gpu.b32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// `BwdParams::deterministic`: the rotated walks of DQ_ROTATED need every key block to see
// every query block, and every key block of a (batch, KV head) resident at once, since the
// first block of one query block's turn order may have been launched after blocks it waits
// for; the host picks it only then (`DqOrder` in src/cuda/backward.rs).
#define DQ_ROTATED 2

// What a tensor-core backward block works on: keys [n0, n0 + block_n) of KV head hk of batch
// entry b, and the query blocks (of block_m rows) that see some of them, [m_first, m_first +
// m_count), for each of the `group` query heads: `total` items, walked from item `first`
// (0, or spread over the key blocks when DQ_ROTATED, so that the key blocks of a
// deterministic run do not queue for the same query block's turn at the start).
// Deterministic mode launches the key blocks in descending order (see flash_bwd.cu): with the
// descending turns, a block then only ever waits for one launched before it.
struct KeyBlock {
    int b, hk, n_block, n0, m_first, m_count, total, first;
    const uint16_t *k, *v;

    // The item of step `it`, its query head head_at(it) and query block m_block_at(it).
    __device__ __forceinline__ int item(int it) const {
        const int x = it + first;
        return x < total ? x : x - total;
    }
    __device__ __forceinline__ int head_at(int it, int group) const {
        return hk * group + item(it) / m_count;
    }
    __device__ __forceinline__ int m_block_at(int it) const { return m_first + item(it) % m_count; }
};

__device__ __forceinline__ KeyBlock key_block(const BwdParams& bp, int block_m, int block_n) {
    const FwdParams& p = bp.f;
    KeyBlock w;
    w.n_block = bp.deterministic ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
    w.hk = blockIdx.y;
    w.b = blockIdx.z;
    w.n0 = w.n_block * block_n;
    const int n_end = min(w.n0 + block_n, p.seqlen_kv) - 1;
    // Query rows that see some key of this block: the band inverted, [n0 - off - right,
    // n_end - off + left]. It selects exactly the query blocks whose band (band_of_rows) meets
    // these keys, which the deterministic turn order relies on.
    const int row_lo = max(0, w.n0 - p.diag_offset - p.window_right);
    const int row_hi = min(p.seqlen_q - 1, n_end - p.diag_offset + p.window_left);
    w.m_first = row_lo / block_m;
    w.m_count = row_hi >= row_lo ? row_hi / block_m - w.m_first + 1 : 0;
    w.total = w.m_count * p.group;
    w.first =
        bp.deterministic == DQ_ROTATED ? (int)((int64_t)blockIdx.x * w.total / gridDim.x) : 0;
    w.k = (const uint16_t*)p.k + w.b * p.k_stride[0] + w.hk * p.k_stride[2];
    w.v = (const uint16_t*)p.v + w.b * p.v_stride[0] + w.hk * p.v_stride[2];
    return w;
}

// Deterministic mode: the turn counter of step `it`'s query block (rows m0..m_last) and this
// key block's turn in it (`my_turn`), or null when not deterministic. Key blocks add into a
// query block in descending order; with rotated walks, in the order they reach it: the block
// whose walk starts at or last before the item (`lead`, the largest rank r with
// first(r) = floor(r total / n) <= item), then the ranks below it, then from the last rank
// down. A block waits only for blocks that reached the item at an earlier step of their walk
// (or at the same step and are of higher rank), so the waits form no cycle.
__device__ __forceinline__ int32_t* dq_turn(const BwdParams& bp, const KeyBlock& w, int it,
                                            int m0, int m_last, int block_n, int& my_turn) {
    if (!bp.deterministic) return nullptr;
    const int h = w.head_at(it, bp.f.group);
    if (bp.deterministic == DQ_ROTATED) {
        const int n = gridDim.x;
        const int lead = (int)(((int64_t)(w.item(it) + 1) * n - 1) / w.total);
        my_turn = lead - (int)blockIdx.x;
        if (my_turn < 0) my_turn += n;
    } else {
        int key_lo, key_hi;
        band_of_rows(bp.f, m0, m_last, key_lo, key_hi);
        my_turn = (key_hi - 1) / block_n - w.n_block;
    }
    return bp.order + ((int64_t)w.b * bp.f.heads_q + h) * bp.num_m_blocks + w.m_block_at(it);
}

__device__ __forceinline__ void dq_turn_spin(const int32_t* turn, int my_turn) {
    while (load_acquire(turn) != my_turn) {
    }
}

// dq_turn, then blocks (thread 0 spins, then all) until it is this key block's turn.
__device__ __forceinline__ int32_t* dq_turn_wait(const BwdParams& bp, const KeyBlock& w, int it,
                                                 int m0, int m_last, int block_n, int& my_turn) {
    int32_t* turn = dq_turn(bp, w, it, m0, m_last, block_n, my_turn);
    if (turn == nullptr) return nullptr;
    if (threadIdx.x == 0) dq_turn_spin(turn, my_turn);
    __syncthreads();
    return turn;
}

// Hands the turn to the next key block once every thread's adds are issued: they precede the
// barrier and the release store follows it (the pattern of CUTLASS's semaphore).
__device__ __forceinline__ void dq_turn_pass(int32_t* turn, int my_turn) {
    if (turn == nullptr) return;
    __syncthreads();
    if (threadIdx.x == 0) store_release(turn, my_turn + 1);
}
