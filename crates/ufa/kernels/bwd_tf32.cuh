// The backward's tile products for fp32 inputs on TF32 tensor cores (m16n8k8; bwd_sm80.cu):
// T = Float32 splits each product in three, Tf32 takes one (mma.cuh). Every sum goes through
// mma_accumulate two k8 steps at a time, so sums over thousands of queries or keys are
// rounded, not truncated. The loops over the sum stay loops: dK and dV hold registers through
// the whole kernel, and unrolled, the operand loads hoisted ahead spilled (ptxas, d128).
// Rows of Q, dO, K and V are PITCH floats apart in shared memory, rows of Pᵀ and dSᵀ PP
// floats; both are ≡ 4 mod 32, which the layouts below rely on.
//
// Phase 1 (Sᵀ = K Qᵀ, dPᵀ = V dOᵀ) sums over the head dim and reads both operands with
// ldmatrix, as the forward's tile_qk_tf32 (fwd_tile.cuh), which it calls.
//
// Phases 2 (dV += Pᵀ dO, dK += dSᵀ Q) and 3 (dQ = dS K) sum over queries and keys, whose
// order within a k8 step is free. Both take column c of a step to be row π(c) of its 8 rows,
// π(t) = 2t and π(t + 4) = 2t + 1 (as the forward's tile_pv_tf32), so a lane's B operands
// are rows 2 quad and 2 quad + 1 of column group: two scalar loads that a warp spreads over
// the 32 banks (row 2 quad is 8 quad banks on). Phase 1 stores Pᵀ and dSᵀ with each group of
// 8 queries in that order too (query 2t at column t, 2t + 1 at t + 4: `pi_column`), so that
// phase 2 reads its A operand with ldmatrix, and phase 3 reads dS's (keys 2 quad and
// 2 quad + 1 of query rows group and group + 8) with scalar loads on 32 banks again.
#pragma once
#include "fwd_tile.cuh"

// The column of query x (0-7) of a group of 8 in the stored Pᵀ and dSᵀ.
__device__ __forceinline__ int pi_column(int x) { return (x >> 1) | ((x & 1) << 2); }

// C += A B over K_ROWS rows of the sum, in π order: `load_a(a, mt, k)` sets A fragment `a` of
// m-tile mt at sum row k (a multiple of 8); B comes from a [k][n] tile, `b_lane` the lane's
// float at row 2 quad, column group of the warp's first column (B_PITCH floats a row).
template <bool SPLIT, int K_ROWS, int MT, int NT, int B_PITCH, typename LoadA>
__device__ __forceinline__ void tf32_products_pi(float (&c)[MT][NT][4], LoadA load_a,
                                                 const float* b_lane) {
    static_assert(K_ROWS % 16 == 0, "two k8 steps at a time");
#pragma unroll 1
    for (int k0 = 0; k0 < K_ROWS; k0 += 16) {
        Tf32Frag<4, SPLIT> a[MT][2];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int step = 0; step < 2; ++step) load_a(a[mt][step], mt, k0 + step * 8);
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            Tf32Frag<4, SPLIT> b;
            const float* x = b_lane + k0 * B_PITCH + t * 8;
            b.set(0, x[0]);
            b.set(1, x[B_PITCH]);
            b.set(2, x[8 * B_PITCH]);
            b.set(3, x[9 * B_PITCH]);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                mma_accumulate<SPLIT>(c[mt][t], [&](float(&acc)[4]) {
                    mma_f32<SPLIT>(acc, a[mt][0], b, 0);
                    mma_f32<SPLIT>(acc, a[mt][1], b, 2);
                });
        }
    }
}

// Phase 2: C += A B with A = Pᵀ or dSᵀ ([key][query], queries in π order) read by ldmatrix
// at `a_lane` (rows lane % 16, floats 4 (lane / 16) of the warp's first key), and B = dO or Q.
template <bool SPLIT, int K_ROWS, int MT, int NT, int A_PITCH, int B_PITCH>
__device__ __forceinline__ void tf32_key_grads(float (&c)[MT][NT][4], uint32_t a_lane,
                                               const float* b_lane) {
    tf32_products_pi<SPLIT, K_ROWS, MT, NT, B_PITCH>(
        c,
        [&](Tf32Frag<4, SPLIT>& a, int mt, int k) {
            uint32_t raw[4];
            ldmatrix_x4(raw, a_lane + (mt * 16 * A_PITCH + k) * 4);
#pragma unroll
            for (int r = 0; r < 4; ++r) a.set_bits(r, raw[r]);
        },
        b_lane);
}

// Phase 3: dQ's share C = dS K, A = dS read from the stored dSᵀ: `a_lane` the lane's float at
// key 2 quad, column pi_column(group) of the warp's first query row; B = K.
template <bool SPLIT, int K_ROWS, int MT, int NT, int A_PITCH, int B_PITCH>
__device__ __forceinline__ void tf32_query_grads(float (&c)[MT][NT][4], const float* a_lane,
                                                 const float* b_lane) {
    tf32_products_pi<SPLIT, K_ROWS, MT, NT, B_PITCH>(
        c,
        [&](Tf32Frag<4, SPLIT>& a, int mt, int k) {
            // (row group, col t), (group + 8, t), (group, t + 4), (group + 8, t + 4).
            const float* x = a_lane + k * A_PITCH + mt * 16;
            a.set(0, x[0]);
            a.set(1, x[8]);
            a.set(2, x[A_PITCH]);
            a.set(3, x[A_PITCH + 8]);
        },
        b_lane);
}
