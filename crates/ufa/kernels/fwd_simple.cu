// Forward attention on CUDA cores, for what the tensor-core kernels do not cover: fp32 inputs,
// head dims that are not multiples of 16 (or differ between K and V), and an output dtype other
// than the input's. Correct first: one warp per query row, fp32 throughout, online softmax over
// chunks of 32 keys (one key per lane for the scores, one output column per lane for P V).
// Dense, packed and paged keys alike (the block table is read per key: this kernel is bound by
// its arithmetic, not by that lookup). Dropout, when the call has it, scales each probability
// after the row sum took it (a generator call per key: kernels/dropout.cuh).
#include "dropout.cuh"
#include "mask.cuh"
#include "softmax.cuh"

constexpr int kSimpleCols = kMaxHeadDim / 32;

template <typename TIn, typename TOut>
__device__ __forceinline__ void fwd_simple(const FwdParams& p) {
    __shared__ float q_row[kSimpleWarps][kMaxHeadDim];
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int i = blockIdx.x * kSimpleWarps + warp;
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    const Seq s = seq_of(p, b);
    if (i >= s.seqlen_q) return;  // whole warp leaves together
    const int hk = h / p.group;
    // Element offset of key j's row in k or v (-1: a page the cache does not have).
    auto key_row = [&](const int64_t(&st)[3], int j) { return kv_row(p, b, s, st, hk, j); };

    const int64_t q_at = row_offset(p.q_stride, b, s.q_row0 + i, h);
    for (int d = lane; d < p.head_dim; d += 32) q_row[warp][d] = Convert<TIn>::load(p.q, q_at + d);
    __syncwarp();

    const bool score_mod = p.softcap > 0.f || p.alibi != nullptr || p.mask_kind != MASK_NONE;
    const float slope = alibi_slope(p, b, h);
    int lo, hi;
    band_of_rows(p, s, i, i, lo, hi);

    float o[kSimpleCols];
#pragma unroll
    for (int c = 0; c < kSimpleCols; ++c) o[c] = 0.f;
    SoftmaxRow row;  // the sum is this lane's share until the end
    row.init();
    for (int j0 = lo; j0 < hi; j0 += 32) {
        const int j = j0 + lane;
        float x = -UFA_INF;
        if (j < hi) {
            const int64_t k_at = key_row(p.k_stride, j);
            if (k_at >= 0) {
                float dot = 0.f;
                for (int d = 0; d < p.head_dim; ++d)
                    dot += q_row[warp][d] * Convert<TIn>::load(p.k, k_at + d);
                x = score_mod ? modify_score(p, s, dot, b, h, i, j, slope) : dot * p.scale_log2;
            }
        }
        float base;
        const float correction = row.rescale(warp_max(x), base);
        const float pj = fast_exp2(x - base);
        row.sum += pj;
        const float kept = pj * dropout_factor_at(p, (uint32_t)(b * p.heads_q + h), i, j);
#pragma unroll
        for (int c = 0; c < kSimpleCols; ++c) o[c] *= correction;
        const int n = min(32, hi - j0);
        for (int jj = 0; jj < n; ++jj) {
            const float w = __shfl_sync(0xffffffffu, kept, jj);
            const int64_t v_at = key_row(p.v_stride, j0 + jj);
            if (v_at < 0) continue;
#pragma unroll
            for (int c = 0; c < kSimpleCols; ++c) {
                const int e = c * 32 + lane;
                if (e < p.head_dim_v) o[c] += w * Convert<TIn>::load(p.v, v_at + e);
            }
        }
    }

    const float sum = warp_sum(row.sum);
    const float inv = row.inv_sum(sum);
    const int64_t o_at = row_offset(p.o_stride, b, s.q_row0 + i, h);
#pragma unroll
    for (int c = 0; c < kSimpleCols; ++c) {
        const int e = c * 32 + lane;
        if (e < p.head_dim_v) Convert<TOut>::store(p.out, o_at + e, o[c] * inv);
    }
    if (p.lse != nullptr && lane == 0) {
        p.lse[lse_offset(p.lse_stride, b, h, s.q_row0 + i)] =
            row.lse(sum);
    }
}
