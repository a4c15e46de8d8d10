// Attention dropout on the GPU: the generator and keep rule of crates/ufa/src/dropout.rs (one
// definition, which the f64 reference also calls). Probability P[b, h, i, j] is kept when 16-bit
// piece j % 8 (piece k: bits 16·(k % 2) of word k / 2) of philox4x32_10(counter = [j / 8, i,
// b·heads_q + h, offset_lo], key) is at most `dropout_keep_max`, and then scaled by
// `dropout_scale`; FwdParams carries the key, the offset word and both numbers, and
// `dropout_scale` is 0 when the call has no dropout.
//
// One generator call decides eight probabilities of one row, and the generator is most of what
// dropout costs. The tensor-core kernels hold their probabilities in the mma accumulator layout,
// where a call's eight pieces belong to four or eight lanes; each lane computes one call and the
// lanes trade pieces with shuffles (a transpose over the lanes that share calls), so a tile
// costs one call per eight probabilities wherever it is held.
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

// The random bits of keys 8·key_oct .. 8·key_oct + 7 of row i of head bh = b·heads_q + h.
__device__ __forceinline__ uint4 dropout_words(const FwdParams& p, uint32_t bh, int i,
                                               int key_oct) {
    return philox4x32_10(make_uint4((uint32_t)key_oct, (uint32_t)i, bh, p.dropout_offset),
                         p.dropout_key[0], p.dropout_key[1]);
}

// Whether the probability whose 16-bit piece is the low (HI = false) or high half of `w` is
// kept.
template <bool HI>
__device__ __forceinline__ bool dropout_keep(const FwdParams& p, uint32_t w) {
    return (HI ? w >> 16 : w & 0xffffu) <= p.dropout_keep_max;
}

// What that probability is multiplied by: the keep scale if kept, else 0.
template <bool HI>
__device__ __forceinline__ float dropout_factor(const FwdParams& p, uint32_t w) {
    return dropout_keep<HI>(p, w) ? p.dropout_scale : 0.f;
}

// The factor of P[bh, i, j] from a call of its own: for the CUDA-core kernels, whose lanes hold
// keys (or rows) one apiece. 1 when the call has no dropout.
__device__ __forceinline__ float dropout_factor_at(const FwdParams& p, uint32_t bh, int i, int j) {
    if (p.dropout_scale == 0.f) return 1.f;
    const uint4 w = dropout_words(p, bh, i, j >> 3);
    const int k = j & 7;
    const uint32_t word = k < 2 ? w.x : k < 4 ? w.y : k < 6 ? w.z : w.w;
    return (k & 1) ? dropout_factor<true>(p, word) : dropout_factor<false>(p, word);
}

// One step of a transpose of words over lanes: entry k of lane w (w: the lane's index bits
// LANE_SHIFT.. among the lanes that trade) is swapped with entry k ^ 2^M of lane w ^ 2^M where
// bit M of k and of w differ. N entries; the lanes differ in lane bit LANE_SHIFT + M.
template <int M, int LANE_SHIFT, int N>
__device__ __forceinline__ void transpose_words_step(uint32_t (&a)[N], int w) {
    const bool bit = (w >> M) & 1;
#pragma unroll
    for (int k = 0; k < N; ++k) {
        if (k & (1 << M)) continue;  // k: bit M clear, k | 2^M: set
        const int hi = k | (1 << M);
        // A lane with bit M set sends its entry with the bit clear, and the other way round.
        const uint32_t y = __shfl_xor_sync(0xffffffffu, bit ? a[k] : a[hi], 1 << (LANE_SHIFT + M));
        a[k] = bit ? y : a[k];
        a[hi] = bit ? a[hi] : y;
    }
}

// The forward's layout (rows are query rows): lane (group, quad) of an m16 x n8 accumulator tile
// holds keys 2·quad, 2·quad + 1 of rows `group` (elements 0, 1) and `group + 8` (2, 3): the
// 16-bit pieces of word `quad` of the calls of those rows for the tile's eight keys. Over two
// adjacent tiles the four lanes of a quad need four calls: lane quad computes call c = quad (row
// `row` + 8·(c % 2), tile c / 2) and a 4 x 4 transpose over the quad gives lane q word q of each.
// `row` is the lanes' row `group` (in the sequence), `key0` the first tile's first key (a
// multiple of 8). Zeroes the probabilities dropped; the keep scale, the same for all, is the
// caller's to apply to the output.
__device__ __forceinline__ void dropout_fwd_tiles(const FwdParams& p, uint32_t bh, int row,
                                                  int key0, int quad, float (&s0)[4],
                                                  float (&s1)[4]) {
    const uint4 w = dropout_words(p, bh, row + (quad & 1) * 8, (key0 >> 3) + (quad >> 1));
    uint32_t a[4] = {w.x, w.y, w.z, w.w};
    transpose_words_step<0, 0>(a, quad);
    transpose_words_step<1, 0>(a, quad);
    // a[c]: word `quad` of call c.
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        float& x = e < 2 ? s0[2 * e] : s1[2 * e - 4];
        float& y = e < 2 ? s0[2 * e + 1] : s1[2 * e - 3];
        x = dropout_keep<false>(p, a[e]) ? x : 0.f;
        y = dropout_keep<true>(p, a[e]) ? y : 0.f;
    }
}

// The backward's layout (transposed scores: rows are keys): lane (group, quad) of an m16 x n8
// tile holds queries 2·quad + (e % 2) of keys `group + 8·(e / 2)`, element e: piece `group` of
// the calls of its two queries for the tile's two key octets. Over two adjacent query tiles the
// eight lanes that share quad need eight calls: lane group computes call c = group (query tile
// c / 4, query 2·quad + c % 2, key octet (c / 2) % 2), and an 8 x 8 transpose of 16-bit pieces
// over those lanes gives lane g piece g of each call, at piece c. `key_row` is the tile's first
// key (a multiple of 16, in the sequence), `query` the first tile's query 2·quad. Returns the
// factors of both tiles' elements.
__device__ __forceinline__ void dropout_bwd_tiles(const FwdParams& p, uint32_t bh, int key_row,
                                                  int query, int group, float (&f0)[4],
                                                  float (&f1)[4]) {
    const int c = group;
    const uint4 w =
        dropout_words(p, bh, query + (c >> 2) * 8 + (c & 1), (key_row >> 3) + ((c >> 1) & 1));
    // Pieces 2k, 2k + 1 are the halves of a[k]; piece bits 1 and 2 are word bits 0 and 1, so
    // those steps trade whole words (lane bits 3 and 4).
    uint32_t a[4] = {w.x, w.y, w.z, w.w};
    transpose_words_step<0, 3>(a, c >> 1);
    transpose_words_step<1, 3>(a, c >> 1);
    // Piece bit 0 (lane bit 2): a lane with it clear takes its partner's low halves into its
    // high ones, and sends its high halves; the other way round for a lane with it set.
    const bool odd = c & 1;
    const uint32_t send0 = __byte_perm(a[0], a[1], odd ? 0x5410 : 0x7632);
    const uint32_t send1 = __byte_perm(a[2], a[3], odd ? 0x5410 : 0x7632);
    const uint32_t r0 = __shfl_xor_sync(0xffffffffu, send0, 4);
    const uint32_t r1 = __shfl_xor_sync(0xffffffffu, send1, 4);
    a[0] = __byte_perm(a[0], r0, odd ? 0x3254 : 0x5410);
    a[1] = __byte_perm(a[1], r0, odd ? 0x3276 : 0x7610);
    a[2] = __byte_perm(a[2], r1, odd ? 0x3254 : 0x5410);
    a[3] = __byte_perm(a[3], r1, odd ? 0x3276 : 0x7610);
    // Piece c of the lane is call c's: tile c / 4, element c % 4.
    f0[0] = dropout_factor<false>(p, a[0]);
    f0[1] = dropout_factor<true>(p, a[0]);
    f0[2] = dropout_factor<false>(p, a[1]);
    f0[3] = dropout_factor<true>(p, a[1]);
    f1[0] = dropout_factor<false>(p, a[2]);
    f1[1] = dropout_factor<true>(p, a[2]);
    f1[2] = dropout_factor<false>(p, a[3]);
    f1[3] = dropout_factor<true>(p, a[3]);
}
