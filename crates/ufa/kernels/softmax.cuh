// The online softmax of one score row, in the log2 domain (scores times log2(e), so that every
// exponential is one ex2 instruction): the running maximum and the running sum of
// exp2(score - maximum), rescaled whenever the maximum moves. Every forward kernel keeps one per
// row it owns.
//
// A row that has seen no key keeps maximum -inf and sum 0: its output is 0 and its LSE -inf.
// A NaN score is never the maximum (fmaxf drops it) but exp2 of it is NaN, so the sum, the
// output and the LSE become NaN, as in the f64 reference: a NaN in q or k is never hidden.
#pragma once
#include "common.cuh"

struct SoftmaxRow {
    float max;  // log2 domain
    float sum;  // a thread's share of the row until the kernel adds the shares up

    __device__ __forceinline__ void init() {
        max = -UFA_INF;
        sum = 0.f;
    }

    // Moves the maximum to cover `tile_max` (a new tile's largest scaled score); returns the
    // factor that rescales what was accumulated (the sum is rescaled here) and sets `base`,
    // what to subtract from scaled scores before exp2: 0 while the row has seen no key, so
    // that its -inf scores give exactly 0.
    __device__ __forceinline__ float rescale(float tile_max, float& base) {
        const float mx = fmaxf(max, tile_max);
        base = mx == -UFA_INF ? 0.f : mx;
        const float correction = fast_exp2(max - base);
        max = mx;
        sum *= correction;
        return correction;
    }

    // What the output is multiplied by, given the row's total sum: 0 for a row that saw no
    // key (a visible key contributes at least exp2(0) = 1), NaN for a NaN sum.
    __device__ __forceinline__ float inv_sum(float total) const {
        return total == 0.f ? 0.f : 1.f / total;
    }

    // The row's log-sum-exp (natural log): -inf for a row that saw no key.
    __device__ __forceinline__ float lse(float total) const {
        return total == 0.f ? -UFA_INF : (max + log2f(total)) * UFA_LN2;
    }
};

// The largest of several log-sum-exps, NaN if any is NaN: what states merged by LSE are
// weighed against (merge.cu, the decoding splits).
struct LseMax {
    float mx = -UFA_INF;
    bool nan = false;

    __device__ __forceinline__ void add(float lse) {
        nan |= isnan(lse);
        mx = fmaxf(mx, lse);
    }
    __device__ __forceinline__ float value() const {
        return nan ? __int_as_float(0x7fffffff) : mx;
    }
    // The maximum over a warp's lanes, each having added its share of the states.
    __device__ __forceinline__ float warp_value() const {
        const float m = warp_max(mx);
        return __any_sync(0xffffffffu, nan) ? __int_as_float(0x7fffffff) : m;
    }
};

// The weight of a state with log-sum-exp `lse` against the maximum `mx`: exactly 0 for a state
// that saw no key (-inf), NaN when either is NaN.
__device__ __forceinline__ float lse_weight(float lse, float mx) {
    return lse == -UFA_INF ? 0.f : expf(lse - mx);
}
