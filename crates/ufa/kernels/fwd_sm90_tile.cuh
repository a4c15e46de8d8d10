// The per-tile math of the Hopper forward kernels (fwd_sm90.cu, fwd_sm90_tma.cu) on a
// warpgroup's wgmma accumulators: S = Q Kᵀ of 64 query rows and BN keys, masked and turned
// into P for O += P V, and the epilogue. The accumulator layout is mma.sync's m16n8 fragment
// repeated over N in n8 tiles: a thread holds rows `group` and `group + 8` of its warp's 16,
// columns 8 t + 2 quad, +1 of every n8 tile t (element 4 t + 2 r + e of the array for row r).
#pragma once
#include "dropout.cuh"
#include "fwd_tile.cuh"
#include "wgmma.cuh"

// The tile shape both Hopper forwards share: 64 query rows a (consumer) warpgroup, BLOCK_M a
// block, BLOCK_N keys a tile, STAGES K/V buffers, every tile whole 128-byte swizzle rows.
template <int HEAD_DIM, int BLOCK_M, int BLOCK_N, int STAGES>
struct Sm90FwdShape {
    static_assert(HEAD_DIM % 64 == 0 && HEAD_DIM <= 256, "rows are whole 128-byte swizzle atoms");
    static_assert(BLOCK_M % 64 == 0 && BLOCK_M <= 256, "each warpgroup owns 64 query rows");
    static_assert(BLOCK_N % 16 == 0 && BLOCK_N <= 256, "wgmma N; P V takes k16 steps");
    static_assert(STAGES >= 2, "the next K/V pair loads while this one is used");
    static constexpr int kHeadDim = HEAD_DIM;
    static constexpr int kBlockM = BLOCK_M;
    static constexpr int kBlockN = BLOCK_N;
    static constexpr int kStages = STAGES;
    static constexpr int kQBytes = BLOCK_M * HEAD_DIM * 2;
    static constexpr int kKvBytes = BLOCK_N * HEAD_DIM * 2;
};

// S of the tile at key n0 (raw scores from wgmma) to P in place: masked, the rows' running
// maxima and sums moved (SoftmaxRow), exponentiated and, with DROPOUT, dropped.
// `rescaled(r, c)` receives the factor c that rescales row r's accumulated O, as soon as it is
// known: the cp.async kernel applies it there (in that order it spills least), the pipelined
// one keeps it until the previous tile's P V has finished.
template <bool SCORE_MOD, bool DROPOUT, int BN, typename Rescaled>
__device__ __forceinline__ void sm90_scores_to_p(const FwdParams& p, const Seq& sq, int b, int h,
                                                 int row_a, int m0, int m_last, int n0, int quad,
                                                 float slope, float (&s)[BN / 2],
                                                 SoftmaxRow (&row)[2], Rescaled rescaled) {
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
        const float correction = row[r].rescale(tile_max * score_scale, base);
        float sum = 0.f;
#pragma unroll
        for (int t = 0; t < kSTiles; ++t) {
            s[4 * t + 2 * r] = fast_exp2(fmaf(s[4 * t + 2 * r], score_scale, -base));
            s[4 * t + 2 * r + 1] = fast_exp2(fmaf(s[4 * t + 2 * r + 1], score_scale, -base));
            sum += s[4 * t + 2 * r] + s[4 * t + 2 * r + 1];
        }
        row[r].sum += sum;  // before dropout: the softmax normalises the undropped row
        rescaled(r, correction);
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

// O's row r (of the thread's two) scaled by c.
template <int D>
__device__ __forceinline__ void sm90_rescale_row(float (&o)[D / 2], int r, float c) {
#pragma unroll
    for (int t = 0; t < D / 8; ++t) {
        o[4 * t + 2 * r] *= c;
        o[4 * t + 2 * r + 1] *= c;
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
