// The causal/window band and the score modifiers (softcap, ALiBi, masks) of one sequence:
// one definition of which keys a query sees and what its scores are, for every kernel. The
// host's twin for planning is Problem::visible_keys (crates/ufa/src/problem.rs).
#pragma once
#include "sequence.cuh"

// The score transformations beyond scale (softcap, ALiBi, mask), in the order the reference
// applies them; returns the score in the log2 domain, or -inf for a hidden key. The backward
// also needs d(score)/d(scale * dot), which only softcap changes: with GRAD it goes to `dfac`.
template <bool GRAD = false>
__device__ __forceinline__ float modify_score(const FwdParams& p, const Seq& s, float dot, int b,
                                              int h, int i, int j, float slope,
                                              float* dfac = nullptr) {
    float x = dot * p.scale;
    if (p.softcap > 0.f) {
        const float t = tanhf(x / p.softcap);
        x = p.softcap * t;
        if constexpr (GRAD) *dfac = 1.f - t * t;
    } else if constexpr (GRAD) {
        *dfac = 1.f;
    }
    if (p.alibi != nullptr) x -= slope * fabsf((float)(i + s.diag_offset - j));
    if (p.mask_kind != MASK_NONE) {
        const int64_t at = b * p.mask_stride[0] + h * p.mask_stride[1] +
                           i * p.mask_stride[2] + j * p.mask_stride[3];
        switch (p.mask_kind) {
            case MASK_BOOL:
                if (((const uint8_t*)p.mask)[at] == 0) return -UFA_INF;
                break;
            case MASK_F16: x += half_to_float(((const uint16_t*)p.mask)[at]); break;
            case MASK_BF16: x += bf16_to_float(((const uint16_t*)p.mask)[at]); break;
            default: x += ((const float*)p.mask)[at]; break;
        }
    }
    return x * UFA_LOG2E;
}

// P and dS (before the softmax scale) of one score `x` (log2 domain), given its dP, the row's
// LSE (log2) and D, d(score)/d(scale * dot), and its dropout factor `keep` (0 or 1 / (1 - p);
// 1 without dropout): P is the kept probability and dS = P_before · (keep · dP - D), D being
// rowsum(dO ∘ O) of the output with dropout. A key `masked` by the caller (the band, a boolean
// mask, an additive -inf) gets exactly 0 for both even in a row whose LSE or D is NaN: a NaN
// row must not reach the gradients of keys it does not see (the f64 reference's rule,
// crates/ufa-testkit/src/reference).
__device__ __forceinline__ void grad_terms(bool masked, float x, float dpv, float lse2, float delta,
                                           float dfac, float keep, float& pv, float& ds) {
    const float e = fast_exp2(x - lse2);
    pv = masked ? 0.f : e * keep;
    ds = masked ? 0.f : e * (dpv * keep - delta) * dfac;
}

__device__ __forceinline__ float alibi_slope(const FwdParams& p, int b, int h) {
    return p.alibi != nullptr ? p.alibi[b * p.alibi_stride[0] + h * p.alibi_stride[1]] : 0.f;
}

// Keys [lo, hi) that some query row of [row0, row_last] may see by the causal/window band.
__device__ __forceinline__ void band_of_rows(const FwdParams& p, const Seq& s, int row0,
                                             int row_last, int& lo, int& hi) {
    lo = max(0, row0 + s.diag_offset - p.window_left);
    hi = min(s.seqlen_kv, row_last + s.diag_offset + p.window_right + 1);
}

// Query rows [lo, hi) whose band holds some key of [key0, key_last]: the band inverted.
__device__ __forceinline__ void rows_of_keys(const FwdParams& p, const Seq& s, int key0,
                                             int key_last, int& lo, int& hi) {
    lo = max(0, key0 - s.diag_offset - p.window_right);
    hi = min(s.seqlen_q, key_last - s.diag_offset + p.window_left + 1);
}

// Bitwise ands: three compares and a select per score, where short-circuit evaluation made
// the compiler branch around each one (SASS of the Hopper backward, 2026-11-26).
__device__ __forceinline__ bool in_band(const FwdParams& p, const Seq& s, int i, int j) {
    const int c = i + s.diag_offset;
    return (j < s.seqlen_kv) & (j >= c - p.window_left) & (j <= c + p.window_right);
}

// One accumulator row as the masking sees it: its query row, its head, the head's ALiBi slope,
// and whether the row exists (rows past a sequence's end are computed but never written).
struct MaskRow {
    int i, h;
    float slope;
    bool valid;
};

// Hides the scores of one 16-row accumulator tile (`row_of(r)` describes this thread's rows,
// r = 0 for `group` and 1 for `group + 8`; N_TILES n8 tiles of keys from n0, `at(t, e)` the
// thread's element e of tile t) outside the band or past the last key; with SCORE_MOD, applies
// the score modifiers (softcap, ALiBi, mask) and turns the scores into the log2 domain. Without
// it raw scores stay unscaled (the kernels fuse the scale into exp2's argument) and tiles that
// `visible` says lie wholly inside the band are left alone. The decoding kernel's rows are of
// several heads (packed GQA rows); the other kernels' tiles are of one head (mask_scores).
template <bool SCORE_MOD, int N_TILES, typename RowOf, typename At>
__device__ __forceinline__ void mask_row_scores(const FwdParams& p, const Seq& s, int n0, int quad,
                                                int b, bool visible, RowOf row_of, At at) {
    if (!SCORE_MOD && visible) return;
    const MaskRow rows[2] = {row_of(0), row_of(1)};
#pragma unroll
    for (int t = 0; t < N_TILES; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const MaskRow& r = rows[e / 2];
            const int j = n0 + t * 8 + quad * 2 + (e % 2);
            float& x = at(t, e);
            if (SCORE_MOD) {
                x = in_band(p, s, r.i, j) && r.valid
                        ? modify_score(p, s, x, b, r.h, r.i, j, r.slope)
                        : -UFA_INF;
            } else if (!in_band(p, s, r.i, j)) {
                x = -UFA_INF;
            }
        }
}

// mask_row_scores for a tile of query rows `row` and `row + 8` of head h.
template <bool SCORE_MOD, int N_TILES, typename At>
__device__ __forceinline__ void mask_scores(const FwdParams& p, const Seq& s, int row, int n0,
                                            int quad, int b, int h, float slope, bool visible,
                                            At at) {
    mask_row_scores<SCORE_MOD, N_TILES>(
        p, s, n0, quad, b, visible,
        [&](int r) {
            const int i = row + r * 8;
            return MaskRow{i, h, slope, i < s.seqlen_q};
        },
        at);
}

// Whether every key of [n0, n0 + block_n) is inside the band of every query row of
// [m0, m_last] (and before the last key): such tiles need no per-element test.
__device__ __forceinline__ bool tile_visible(const FwdParams& p, const Seq& s, int m0, int m_last,
                                             int n0, int block_n) {
    return n0 >= m_last + s.diag_offset - p.window_left &&
           n0 + block_n - 1 <= m0 + s.diag_offset + p.window_right && n0 + block_n <= s.seqlen_kv;
}
