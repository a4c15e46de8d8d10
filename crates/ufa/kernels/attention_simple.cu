// Forward attention on CUDA cores, for what the tensor-core kernel does not cover: fp32 inputs,
// head dims that are not multiples of 16 (or differ between K and V), and an output dtype other
// than the input's. Correct first: one warp per query row, fp32 throughout, online softmax over
// chunks of 32 keys (one key per lane for the scores, one output column per lane for P V).
//
// Needs common.cuh before it; instantiations are appended at run time by the host.

constexpr int kSimpleWarps = 4;
constexpr int kSimpleMaxDim = 512;  // problem.rs MAX_HEAD_DIM
constexpr int kSimpleCols = kSimpleMaxDim / 32;

template <typename TIn, typename TOut>
__device__ __forceinline__ void attention_simple(const FwdParams& p) {
    __shared__ float q_row[kSimpleWarps][kSimpleMaxDim];
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int i = blockIdx.x * kSimpleWarps + warp;
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    if (i >= p.seqlen_q) return;  // whole warp leaves together
    const int hk = h / p.group;

    const int64_t q_at = b * p.q_stride[0] + (int64_t)i * p.q_stride[1] + h * p.q_stride[2];
    for (int d = lane; d < p.head_dim; d += 32) q_row[warp][d] = Convert<TIn>::load(p.q, q_at + d);
    __syncwarp();

    const bool score_mod = p.softcap > 0.f || p.alibi != nullptr || p.mask_kind != MASK_NONE;
    const float slope = alibi_slope(p, b, h);
    int lo, hi;
    band_of_rows(p, i, i, lo, hi);

    float o[kSimpleCols];
#pragma unroll
    for (int c = 0; c < kSimpleCols; ++c) o[c] = 0.f;
    float row_max = -UFA_INF;  // log2 domain
    float lane_sum = 0.f;
    for (int j0 = lo; j0 < hi; j0 += 32) {
        const int j = j0 + lane;
        float x = -UFA_INF;
        if (j < hi) {
            const int64_t k_at = b * p.k_stride[0] + (int64_t)j * p.k_stride[1] + hk * p.k_stride[2];
            float dot = 0.f;
            for (int d = 0; d < p.head_dim; ++d) dot += q_row[warp][d] * Convert<TIn>::load(p.k, k_at + d);
            x = score_mod ? modify_score(p, dot, b, h, i, j, slope) : dot * p.scale_log2;
        }
        const float mx = fmaxf(row_max, warp_max(x));
        const float base = mx == -UFA_INF ? 0.f : mx;
        const float correction = fast_exp2(row_max - base);
        row_max = mx;
        const float pj = fast_exp2(x - base);
        lane_sum = lane_sum * correction + pj;
#pragma unroll
        for (int c = 0; c < kSimpleCols; ++c) o[c] *= correction;
        const int n = min(32, hi - j0);
        for (int jj = 0; jj < n; ++jj) {
            const float w = __shfl_sync(0xffffffffu, pj, jj);
            const int64_t v_at =
                b * p.v_stride[0] + (int64_t)(j0 + jj) * p.v_stride[1] + hk * p.v_stride[2];
#pragma unroll
            for (int c = 0; c < kSimpleCols; ++c) {
                const int e = c * 32 + lane;
                if (e < p.head_dim_v) o[c] += w * Convert<TIn>::load(p.v, v_at + e);
            }
        }
    }

    const float sum = warp_sum(lane_sum);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    const int64_t o_at = b * p.o_stride[0] + (int64_t)i * p.o_stride[1] + h * p.o_stride[2];
#pragma unroll
    for (int c = 0; c < kSimpleCols; ++c) {
        const int e = c * 32 + lane;
        if (e < p.head_dim_v) Convert<TOut>::store(p.out, o_at + e, o[c] * inv);
    }
    if (p.lse != nullptr && lane == 0) {
        p.lse[b * p.lse_stride[0] + h * p.lse_stride[1] + (int64_t)i * p.lse_stride[2]] =
            sum > 0.f ? (row_max + log2f(sum)) * UFA_LN2 : -UFA_INF;
    }
}
