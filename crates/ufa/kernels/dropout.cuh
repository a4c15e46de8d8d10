// Attention dropout on the GPU: the generator and keep rule of crates/ufa/src/dropout.rs (one
// definition, which the f64 reference also calls). Probability P[b, h, i, j] is kept when word
// j % 4 of philox4x32_10(counter = [j / 4, i, b·heads_q + h, offset_lo], key) is at most
// `dropout_keep_max`, and then scaled by `dropout_scale` (1 / (1 - p)); FwdParams carries the
// key, the offset word and both numbers, and `dropout_scale` is 0 when the call has no dropout.
//
// One generator call yields the words of four keys of one row. The tensor-core kernels hold
// their probabilities in the mma accumulator layout, where a call's four words belong to two or
// four lanes; each lane computes one call and the lanes trade words with shuffles, so a tile
// costs one call per four probabilities (the minimum) wherever it is held.
#pragma once
#include "common.cuh"

// Random123's philox4x32_10.
__device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint32_t k0, uint32_t k1) {
    constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
    constexpr uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        const uint32_t hi0 = __umulhi(M0, c.x), lo0 = M0 * c.x;
        const uint32_t hi1 = __umulhi(M1, c.z), lo1 = M1 * c.z;
        c = make_uint4(hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0);
        k0 += W0;
        k1 += W1;
    }
    return c;
}

// The words of keys 4·key_quad .. 4·key_quad + 3 of row i of head bh = b·heads_q + h.
__device__ __forceinline__ uint4 dropout_words(const FwdParams& p, uint32_t bh, int i,
                                               int key_quad) {
    return philox4x32_10(make_uint4((uint32_t)key_quad, (uint32_t)i, bh, p.dropout_offset),
                         p.dropout_key[0], p.dropout_key[1]);
}

// What a probability whose word is `w` is multiplied by: 1 / (1 - p) if kept, else 0.
__device__ __forceinline__ float dropout_factor(const FwdParams& p, uint32_t w) {
    return w <= p.dropout_keep_max ? p.dropout_scale : 0.f;
}

// The factor of P[bh, i, j] from a call of its own: for the CUDA-core kernels, whose lanes hold
// keys (or rows) one apiece. 1 when the call has no dropout.
__device__ __forceinline__ float dropout_factor_at(const FwdParams& p, uint32_t bh, int i, int j) {
    if (p.dropout_scale == 0.f) return 1.f;
    const uint4 w = dropout_words(p, bh, i, j >> 2);
    const int k = j & 3;
    return dropout_factor(p, k == 0 ? w.x : k == 1 ? w.y : k == 2 ? w.z : w.w);
}

// The forward's layout (rows are query rows): lane (group, quad) of an m16 x n8 accumulator tile
// holds keys 2·quad, 2·quad + 1 of rows `group` (elements 0, 1) and `group + 8` (2, 3). Those two
// keys are half of a key quad, whose other half is in lane quad ^ 1: the even lane of the pair
// computes the call of row `row`, the odd one that of row `row + 8`, and each hands the other
// the two words it needs. `row` is the tile's row `group` (in the sequence), `key0` its first key
// (a multiple of 8). Multiplies the four probabilities by their factors.
__device__ __forceinline__ void dropout_fwd_tile(const FwdParams& p, uint32_t bh, int row, int key0,
                                                 int quad, float (&s)[4]) {
    const bool odd = quad & 1;
    const uint4 w = dropout_words(p, bh, row + (odd ? 8 : 0), (key0 >> 2) + (quad >> 1));
    // The even lane keeps words 0, 1 (its keys) of row `row` and sends 2, 3; the odd lane keeps
    // 2, 3 of row `row + 8` and sends 0, 1.
    const uint32_t r0 = __shfl_xor_sync(0xffffffffu, odd ? w.x : w.z, 1);
    const uint32_t r1 = __shfl_xor_sync(0xffffffffu, odd ? w.y : w.w, 1);
    s[0] *= dropout_factor(p, odd ? r0 : w.x);
    s[1] *= dropout_factor(p, odd ? r1 : w.y);
    s[2] *= dropout_factor(p, odd ? w.z : r0);
    s[3] *= dropout_factor(p, odd ? w.w : r1);
}

// One step of a 4 x 4 transpose over the lanes whose `group % 4` differ (lane bits 2 and 3):
// swaps entry k of lane w with entry k ^ 2^M of lane w ^ 2^M where bit M of k and w differ.
template <int M>
__device__ __forceinline__ void transpose_quad_step(uint32_t (&a)[4], int w) {
    const bool bit = (w >> M) & 1;
    // The two entries whose bit M differs from this lane's, in ascending order.
    constexpr int A0 = 0, A1 = M == 0 ? 2 : 1;   // bit M clear
    constexpr int B0 = 1 << M, B1 = A1 + (1 << M);  // bit M set
    const uint32_t y0 = __shfl_xor_sync(0xffffffffu, bit ? a[A0] : a[B0], 4 << M);
    const uint32_t y1 = __shfl_xor_sync(0xffffffffu, bit ? a[A1] : a[B1], 4 << M);
    a[A0] = bit ? y0 : a[A0];
    a[A1] = bit ? y1 : a[A1];
    a[B0] = bit ? a[B0] : y0;
    a[B1] = bit ? a[B1] : y1;
}

// The backward's layout (transposed scores: rows are keys): lane (group, quad) of an m16 x n8
// tile holds queries 2·quad + (e % 2) of keys `group + 8·(e / 2)`, element e. The four lanes
// that share quad and group / 4 need word group % 4 of the same four calls (their elements'
// queries and key quads): lane group % 4 = c computes call c, and a 4 x 4 transpose over the
// four lanes gives each its words. `key_row` is the tile's key `group` (in the sequence), `query`
// its query 2·quad. Returns the four factors.
__device__ __forceinline__ void dropout_bwd_tile(const FwdParams& p, uint32_t bh, int key_row,
                                                 int query, int group, float (&f)[4]) {
    const int c = group & 3;
    const int key_quad = ((key_row - c) >> 2) + (c >> 1) * 2;
    const uint4 w = dropout_words(p, bh, query + (c & 1), key_quad);
    uint32_t a[4] = {w.x, w.y, w.z, w.w};
    transpose_quad_step<0>(a, c);
    transpose_quad_step<1>(a, c);
#pragma unroll
    for (int e = 0; e < 4; ++e) f[e] = dropout_factor(p, a[e]);
}
