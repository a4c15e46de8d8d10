// Tensor-core building blocks shared by the forward and backward kernels (sm_80+): shared
// memory addressing, cp.async copies, ldmatrix, mma.sync m16n8k16, the tile loader, fp32
// reductions into global memory and the acquire/release pair of the deterministic turns.
#pragma once
#include "common.cuh"

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
// 16 bytes global -> shared, bypassing L1, with no size operand: for copies known to lie
// within the tensor (whole tiles), which spares each one its size and predicate.
__device__ __forceinline__ void cp_async_16_whole(uint32_t dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src));
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

// x rounded to the nearest TF32 value (sign, 8 exponent bits, 10 mantissa bits) as a
// tensor-core operand register.
__device__ __forceinline__ uint32_t to_tf32(float x) {
    uint32_t r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
}

// d += a · b for one 16x8x8 tile of TF32 operands; fp32 accumulators. Fragments (PTX ISA,
// m16n8k8 .tf32): a0 (row g, col t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4);
// b0 (k t, col g), b1 (k t + 4, col g); the accumulators as for m16n8k16.
__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                              uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// An fp32 value as tensor-core input: `hi` rounded to TF32 and, with SPLIT, `lo` the
// remainder rounded too (0 without), so that a·b = a_hi·b_hi + a_hi·b_lo + a_lo·b_hi to about
// 2^-22 relative (the 3xTF32 scheme, CUTLASS's "fast fp32"; a_lo·b_lo is below fp32 rounding).
// Without SPLIT one TF32 product (2^-11 per operand), with IEEE infinities.
//
// With SPLIT, x is clamped to ±MAX (the largest finite TF32, about 2^128) before hi is
// rounded from it, so an infinity splits into a finite hi and an infinite lo of its sign. An
// infinite remainder (inf - inf) would be NaN, and a zero one would meet the infinity as
// inf · 0 = NaN in a cross product: either would turn a score the reference has as ±inf (a key
// masked by -inf, a softcap's ±cap) into NaN. Split this way, inf · b is ±inf for
// 0 < |b| < 2^12 (beyond, MAX · b_lo may overflow to the other sign: NaN), inf · inf is ±inf,
// inf · 0 is NaN, and a NaN (which the clamp drops from hi) stays in lo. Finite values near
// FLT_MAX keep their remainder instead of rounding to infinity. The clamp and the integer
// rounding (round half away from zero, cvt.rna's rule, exact for finite clamped values) cost
// the four instructions sm_80/sm_90 spend on cvt.rna.tf32 alone (cvt.rna.satfinite: six).
template <bool SPLIT>
__device__ __forceinline__ void tf32_pair(float x, uint32_t& hi, uint32_t& lo) {
    if constexpr (SPLIT) {
        const float max_tf32 = __uint_as_float(0x7f7fe000u);
        const float c = fminf(fmaxf(x, -max_tf32), max_tf32);
        hi = (__float_as_uint(c) + 0x1000u) & 0xffffe000u;
        lo = to_tf32(x - __uint_as_float(hi));
    } else {
        hi = to_tf32(x);
        lo = 0;
    }
}

// `tf32_pair` for the N values of an mma.sync fragment.
template <int N, bool SPLIT>
struct Tf32Frag {
    uint32_t hi[N];
    uint32_t lo[SPLIT ? N : 1];

    __device__ __forceinline__ void set(int i, float x) {
        uint32_t low;
        tf32_pair<SPLIT>(x, hi[i], low);
        if constexpr (SPLIT) lo[i] = low;
    }
    __device__ __forceinline__ void set_bits(int i, uint32_t bits) { set(i, __uint_as_float(bits)); }
};

// d += a · b for a 16x8 A fragment and the 8x8 B fragment held in b's registers (i, i + 1):
// one TF32 mma, or three with SPLIT (the small products first).
template <bool SPLIT, int NB>
__device__ __forceinline__ void mma_f32(float (&d)[4], const Tf32Frag<4, SPLIT>& a,
                                        const Tf32Frag<NB, SPLIT>& b, int i) {
    if constexpr (SPLIT) {
        mma_1688_tf32(d, a.lo, b.hi[i], b.hi[i + 1]);
        mma_1688_tf32(d, a.hi, b.lo[i], b.lo[i + 1]);
    }
    mma_1688_tf32(d, a.hi, b.hi[i], b.hi[i + 1]);
}

// d += the products `mmas(acc)` adds. With ROUNDED they go into fresh accumulators that one
// rounded fp32 add per element adds to d; without, straight into d. Tensor cores add into
// their fp32 accumulators truncating (toward zero), which biases a long sum: with the 3xTF32
// products accumulated in place over thousands of keys, O drifted 5e-5 from the f64 reference
// (relative RMS, 8k keys, H200, 2026-12-04), five times the fp32 bound. Kept short (one or two
// k8 steps), the truncated sums stay at fp32 rounding; TF32's own error (2^-11) needs no care.
template <bool ROUNDED, typename Mmas>
__device__ __forceinline__ void mma_accumulate(float (&d)[4], Mmas mmas) {
    if constexpr (ROUNDED) {
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        mmas(acc);
#pragma unroll
        for (int e = 0; e < 4; ++e) d[e] += acc[e];
    } else {
        mmas(d);
    }
}

// Sets N n8 accumulator tiles of each of MT m-tiles to zero.
template <int MT, int N>
__device__ __forceinline__ void zero_tiles(float (&x)[MT][N][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int t = 0; t < N; ++t) x[mt][t][0] = x[mt][t][1] = x[mt][t][2] = x[mt][t][3] = 0.f;
}

// Copies rows [row0, row0 + ROWS) of one head (rows `row_stride` elements apart) into a padded
// shared tile; rows at or past `rows_total` become zeros, so padded keys contribute nothing,
// and so do the 16-byte chunks of a row from `valid_chunks` on (a head dim below the tile's,
// whose padding columns then add nothing to Q·Kᵀ and come out of P·V as zeros).
// Every row starts on a 16-byte boundary (the host sends other layouts to the CUDA-core
// kernel). Fully unrolled with compile-time chunk positions: a run-time loop here cost more
// instructions than the tile's mma work (seen in SASS, 2026-11-25).
// `Cfg` supplies kThreads, kChunksPerRow (16-byte pieces of a row) and kRowPitch (elements).
template <typename Cfg, int ROWS>
__device__ __forceinline__ void load_tile(uint16_t* tile, const uint16_t* head_base,
                                          int64_t row_stride, int row0, int rows_total,
                                          int valid_chunks = Cfg::kChunksPerRow) {
    constexpr int kChunks = ROWS * Cfg::kChunksPerRow;
    constexpr int kIters = (kChunks + Cfg::kThreads - 1) / Cfg::kThreads;
    const int tid = threadIdx.x;
    if constexpr (Cfg::kThreads % Cfg::kChunksPerRow == 0) {
        // Each thread keeps one column and walks down the rows: one pointer, one add a chunk.
        constexpr int kRowsPerIter = Cfg::kThreads / Cfg::kChunksPerRow;
        const int r0 = tid / Cfg::kChunksPerRow;
        const int col = (tid % Cfg::kChunksPerRow) * 8;
        const bool col_ok = tid % Cfg::kChunksPerRow < valid_chunks;
        const uint16_t* src = head_base + (int64_t)(row0 + r0) * row_stride + col;
        const int64_t step = (int64_t)kRowsPerIter * row_stride;
        uint16_t* dst = tile + r0 * Cfg::kRowPitch + col;
#pragma unroll
        for (int it = 0; it < kIters; ++it) {
            if (ROWS % kRowsPerIter != 0 && r0 + it * kRowsPerIter >= ROWS) break;
            const bool valid = col_ok && row0 + r0 + it * kRowsPerIter < rows_total;
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
            const bool valid = row0 + r < rows_total && c % Cfg::kChunksPerRow < valid_chunks;
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
