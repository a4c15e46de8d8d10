// The per-tile math of the Hopper forward kernels (fwd_sm90.cu, fwd_sm90_tma.cu) on a
// warpgroup's wgmma accumulators: S = Q Kᵀ of 64 query rows and BN keys, masked and turned
// into P for O += P V, and the epilogue. The accumulator layout is mma.sync's m16n8 fragment
// repeated over N in n8 tiles: a thread holds rows `group` and `group + 8` of its warp's 16,
// columns 8 t + 2 quad, +1 of every n8 tile t (element 4 t + 2 r + e of the array for row r).
#pragma once
#include "dropout.cuh"
#include "fwd_tile.cuh"
#include "wgmma.cuh"

// S of the tile at key n0 (raw scores from wgmma) to P in place: masked, the rows' running
// maxima and sums moved (SoftmaxRow), exponentiated and, with DROPOUT, dropped. `corr[r]`
// receives the factor that rescales row r's accumulated O, which the caller applies when it
// owns O (in the pipelined kernel, only after the previous tile's P V has finished).
template <bool SCORE_MOD, bool DROPOUT, int BN>
__device__ __forceinline__ void sm90_scores_to_p(const FwdParams& p, const Seq& sq, int b, int h,
                                                 int row_a, int m0, int m_last, int n0, int quad,
                                                 float slope, float (&s)[BN / 2],
                                                 SoftmaxRow (&row)[2], float (&corr)[2]) {
    constexpr int kSTiles = BN / 8;
    mask_scores<SCORE_MOD, kSTiles>(p, sq, row_a, n0, quad, b, h, slope,
                                    tile_visible(p, sq, m0, m_last, n0, BN),
                                    [&](int t, int e) -> float& { return s[4 * t + e]; });
    // Plain scores are raw q·k with a positive scale, so the maximum commutes with it and the
    // scale is fused into each exp2's FFMA; modified scores arrive scaled.
    const float score_scale = SCORE_MOD ? 1.f : p.scale_log2;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float tile_max = -UFA_INF;
#pragma unroll
        for (int t = 0; t < kSTiles; ++t)
            tile_max = fmaxf(tile_max, fmaxf(s[4 * t + 2 * r], s[4 * t + 2 * r + 1]));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
        float base;
        corr[r] = row[r].rescale(tile_max * score_scale, base);
        float sum = 0.f;
#pragma unroll
        for (int t = 0; t < kSTiles; ++t) {
            s[4 * t + 2 * r] = fast_exp2(fmaf(s[4 * t + 2 * r], score_scale, -base));
            s[4 * t + 2 * r + 1] = fast_exp2(fmaf(s[4 * t + 2 * r + 1], score_scale, -base));
            sum += s[4 * t + 2 * r] + s[4 * t + 2 * r + 1];
        }
        row[r].sum += sum;  // before dropout: the softmax normalises the undropped row
    }
    if constexpr (DROPOUT) {
#pragma unroll
        for (int t = 0; t < kSTiles; t += 2)
            dropout_fwd_tiles(p, (uint32_t)(b * p.heads_q + h), row_a, n0 + t * 8, quad,
                              *reinterpret_cast<float(*)[4]>(&s[4 * t]),
                              *reinterpret_cast<float(*)[4]>(&s[4 * t + 4]));
    }
}

// P packed as the register A fragments of O += P V: two n8 tiles of S are one k16 fragment.
template <typename T, int BN>
__device__ __forceinline__ void sm90_pack_p(const float (&s)[BN / 2], uint32_t (&pa)[BN / 16][4]) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
        pa[kk][0] = Convert<T>::pack(s[8 * kk + 0], s[8 * kk + 1]);
        pa[kk][1] = Convert<T>::pack(s[8 * kk + 2], s[8 * kk + 3]);
        pa[kk][2] = Convert<T>::pack(s[8 * kk + 4], s[8 * kk + 5]);
        pa[kk][3] = Convert<T>::pack(s[8 * kk + 6], s[8 * kk + 7]);
    }
}

// O's rows scaled by the factors sm90_scores_to_p returned.
template <int D>
__device__ __forceinline__ void sm90_rescale_o(float (&o)[D / 2], const float (&corr)[2]) {
#pragma unroll
    for (int t = 0; t < D / 8; ++t) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            o[4 * t + 2 * r] *= corr[r];
            o[4 * t + 2 * r + 1] *= corr[r];
        }
    }
}

// The epilogue of a warpgroup's rows: O / sum and the LSE (store_fwd_row), with the dropout
// keep scale.
template <typename T, bool DROPOUT, int D>
__device__ __forceinline__ void sm90_store_o(const FwdParams& p, const FwdBlock& w, int row_a,
                                             int quad, const SoftmaxRow (&row)[2],
                                             const float (&o)[D / 2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
        store_fwd_row<T, D / 8>(p, w, row_a + r * 8, quad, row[r], [&](int t, float& x, float& y) {
            x = o[4 * t + 2 * r];
            y = o[4 * t + 2 * r + 1];
            if constexpr (DROPOUT) {
                x *= p.dropout_scale;
                y *= p.dropout_scale;
            }
        });
}
