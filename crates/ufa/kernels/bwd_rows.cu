// The backward pass's row kernels: the preprocessing both paths share, the fp32 dQ buffer's
// conversion after the tensor-core kernel, and the CUDA-core backward for what that kernel does
// not cover (fp32 inputs, head dims that are not multiples of 16 or differ between K and V,
// gradients in another dtype, unaligned views). Dtypes are read at run time (BwdParams'
// DTypeKind fields): these kernels are bound by memory or latency, not by conversions.
//
// The CUDA-core backward is deterministic by construction: one warp owns one dQ row
// (bwd_rows_dq) or one dK/dV row (bwd_rows_dkdv) and sums in a fixed order; it recomputes the
// scores in each of the two kernels instead of sharing them through atomics.
//
// The host generates each kernel's entry point (crates/ufa/src/cuda/backward.rs).
#include "bwd_keys.cuh"
#include "dropout.cuh"

constexpr int kRowCols = kMaxHeadDim / 32;

// The two streaming kernels (row statistics, dQ conversion) read and write whole rows and are
// bound by memory: a block takes kStreamRows rows, kStreamLanes threads a row (8 lanes of a
// warp: 128 bytes of a d64 16-bit row a step), each thread 8 elements a step.
constexpr int kStreamLanes = kRowWarps * 32 / kStreamRows;
static_assert(kStreamLanes * kStreamRows == kRowWarps * 32 && kStreamLanes <= 32 &&
                  (kStreamLanes & (kStreamLanes - 1)) == 0,
              "a row's threads are a power-of-two share of one warp");

// Sum over the kStreamLanes threads of a row (aligned groups of lanes, so xor stays inside).
__device__ __forceinline__ float row_lanes_sum(float x) {
#pragma unroll
    for (int o = kStreamLanes / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// Zeroes n floats from z with the whole block, 16 bytes a store where z is aligned.
__device__ __forceinline__ void block_zero(float* z, int64_t n) {
    int64_t e = threadIdx.x;
    if (aligned16(z)) {
        const int64_t n4 = n / 4;
        for (int64_t k = threadIdx.x; k < n4; k += blockDim.x)
            ((float4*)z)[k] = make_float4(0.f, 0.f, 0.f, 0.f);
        e += n4 * 4;
    }
    for (; e < n; e += blockDim.x) z[e] = 0.f;
}

// Per query row: D = rowsum(dO ∘ O), the LSE in the log2 domain (+inf for rows that see no key,
// so that exp2(s - lse2) is 0), padding rows up to the next multiple of kSeqlenQPad, and zeroed
// dQ buffer rows and turn counters when the tensor-core path runs next.
__device__ __forceinline__ void bwd_preprocess(const BwdParams& bp) {
    const FwdParams& p = bp.f;
    const int sub = threadIdx.x % kStreamLanes;
    const int i0 = blockIdx.x * kStreamRows;
    const int i = i0 + threadIdx.x / kStreamLanes;
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    const Seq s = seq_of(p, b);
    const int padded = (s.seqlen_q + kSeqlenQPad - 1) / kSeqlenQPad * kSeqlenQPad;
    if (i0 >= padded) return;  // the whole block leaves together
    // The block's dQ buffer rows are contiguous (rows of one head plane). Stores first: they
    // do not wait, and go out while the loads below are in flight.
    if (bp.dq_accum != nullptr && i0 < s.seqlen_q) {
        const int rows = min(kStreamRows, s.seqlen_q - i0);
        block_zero(accum_rows<true>(bp, s, b, h, p.head_dim) + (int64_t)i0 * p.head_dim,
                   (int64_t)rows * p.head_dim);
    }
    // A step's loads all go out before the thread waits on any: the row's LSE (first step only),
    // O's and dO's chunks, then the products; one wait on memory a step instead of three. (Two
    // steps' chunks at once need more registers than 12 blocks an SM leave: they spilled.)
    const bool real = i < s.seqlen_q;
    float lse = 0.f;
    if (sub == 0 && real)
        lse = p.lse[lse_offset(p.lse_stride, b, h, s.q_row0 + i)];
    float acc = 0.f;
    if (real) {
        const int64_t o_at = row_offset(p.o_stride, b, s.q_row0 + i, h);
        const int64_t do_at = row_offset(bp.do_stride, b, s.q_row0 + i, h);
        for (int d = sub * 8; d < p.head_dim_v; d += kStreamLanes * 8) {
            const int n = p.head_dim_v - d;
            Fetched8 fo, fg;
            if (fetch8(p.out, o_at + d, n, bp.dtype_out, fo) &&
                fetch8(bp.dout, do_at + d, n, bp.dtype_dout, fg)) {
                float o[8], g[8];
                widen8(bp.dtype_out, fo, o);
                widen8(bp.dtype_dout, fg, g);
#pragma unroll
                for (int k = 0; k < 8; ++k) acc += o[k] * g[k];
            } else {
#pragma unroll 1
                for (int e = d; e < min(d + 8, p.head_dim_v); ++e)
                    acc += load_as(p.out, o_at + e, bp.dtype_out) *
                           load_as(bp.dout, do_at + e, bp.dtype_dout);
            }
        }
    }
    acc = row_lanes_sum(acc);
    if (sub == 0 && i < padded) {
        const int64_t at = stat_row0<true>(bp, s, b, h) + i;
        if (real) {
            bp.lse2[at] = lse == -UFA_INF ? UFA_INF : lse * UFA_LOG2E;
            bp.delta[at] = acc;
        } else {
            bp.lse2[at] = UFA_INF;
            bp.delta[at] = 0.f;
        }
        if (bp.order != nullptr && real && i % bp.block_m == 0)
            bp.order[((int64_t)b * p.heads_q + h) * bp.num_m_blocks + i / bp.block_m] = 0;
    }
}

// dQ = scale · (the fp32 buffer), in dQ's dtype and strides.
__device__ __forceinline__ void bwd_convert_dq(const BwdParams& bp) {
    const FwdParams& p = bp.f;
    const int sub = threadIdx.x % kStreamLanes;
    const int i = blockIdx.x * kStreamRows + threadIdx.x / kStreamLanes;
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    const Seq s = seq_of(p, b);
    if (i >= s.seqlen_q) return;  // no shuffles here: threads may leave alone
    const float* row = accum_rows<true>(bp, s, b, h, p.head_dim) + (int64_t)i * p.head_dim;
    const int64_t at = row_offset(bp.dq_stride, b, s.q_row0 + i, h);
    for (int d = sub * 8; d < p.head_dim; d += kStreamLanes * 8) {
        Fetched8 f;
        if (fetch8(row, d, p.head_dim - d, DT_F32, f)) {
            float x[8];
            widen8(DT_F32, f, x);
#pragma unroll
            for (int k = 0; k < 8; ++k) x[k] *= p.scale;
            store8_as(bp.dq, at + d, p.head_dim - d, bp.dtype_dq, x);
        } else {
#pragma unroll 1
            for (int e = d; e < min(d + 8, p.head_dim); ++e)
                store_as(bp.dq, at + e, bp.dtype_dq, row[e] * p.scale);
        }
    }
}

// P and dS (before the softmax scale) of query row i and key j, given q·k and dO·v (dropout's
// factor from a generator call of its own: these kernels hold one score per lane).
__device__ __forceinline__ void row_grad_terms(const BwdParams& bp, const Seq& s, float dot,
                                               float dpv, float lse2, float delta, int b, int h,
                                               int i, int j, float slope, bool score_mod,
                                               float& pv, float& ds) {
    const FwdParams& p = bp.f;
    float dfac = 1.f;
    const float x = score_mod ? modify_score<true>(p, s, dot, b, h, i, j, slope, &dfac)
                              : dot * p.scale_log2;
    const float keep = dropout_factor_at(p, (uint32_t)(b * p.heads_q + h), i, j);
    grad_terms(x == -UFA_INF, x, dpv, lse2, delta, dfac, keep, pv, ds);
}

// One warp per query row: dQ_i = scale · Σ_j dS_ij K_j, one key per lane for the dot products
// and one output column per lane for the sum.
__device__ __forceinline__ void bwd_rows_dq(const BwdParams& bp) {
    const FwdParams& p = bp.f;
    __shared__ float q_row[kRowWarps][kMaxHeadDim];
    __shared__ float do_row[kRowWarps][kMaxHeadDim];
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int i = blockIdx.x * kRowWarps + warp;
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    const Seq s = seq_of(p, b);
    if (i >= s.seqlen_q) return;  // whole warp leaves together
    const int hk = h / p.group;
    const int64_t q_at = row_offset(p.q_stride, b, s.q_row0 + i, h);
    const int64_t do_at = row_offset(bp.do_stride, b, s.q_row0 + i, h);
    for (int d = lane; d < p.head_dim; d += 32) q_row[warp][d] = load_as(p.q, q_at + d, bp.dtype_in);
    for (int d = lane; d < p.head_dim_v; d += 32)
        do_row[warp][d] = load_as(bp.dout, do_at + d, bp.dtype_dout);
    __syncwarp();
    const int64_t stat = stat_row0<true>(bp, s, b, h) + i;
    const float lse2 = bp.lse2[stat];
    const float delta = bp.delta[stat];
    const bool score_mod = p.softcap > 0.f || p.alibi != nullptr || p.mask_kind != MASK_NONE;
    const float slope = alibi_slope(p, b, h);
    int lo, hi;
    band_of_rows(p, s, i, i, lo, hi);

    float acc[kRowCols];
#pragma unroll
    for (int c = 0; c < kRowCols; ++c) acc[c] = 0.f;
    for (int j0 = lo; j0 < hi; j0 += 32) {
        const int j = j0 + lane;
        float ds = 0.f;
        if (j < hi) {
            const int64_t k_at = row_offset(p.k_stride, b, s.kv_row0 + j, hk);
            const int64_t v_at = row_offset(p.v_stride, b, s.kv_row0 + j, hk);
            float dot = 0.f, dpv = 0.f;
            for (int d = 0; d < p.head_dim; ++d) dot += q_row[warp][d] * load_as(p.k, k_at + d, bp.dtype_in);
            for (int d = 0; d < p.head_dim_v; ++d) dpv += do_row[warp][d] * load_as(p.v, v_at + d, bp.dtype_in);
            float pv;
            row_grad_terms(bp, s, dot, dpv, lse2, delta, b, h, i, j, slope, score_mod, pv, ds);
        }
        const int n = min(32, hi - j0);
        for (int jj = 0; jj < n; ++jj) {
            const float w = __shfl_sync(0xffffffffu, ds, jj);
            const int64_t k_at = row_offset(p.k_stride, b, s.kv_row0 + j0 + jj, hk);
#pragma unroll
            for (int c = 0; c < kRowCols; ++c) {
                const int e = c * 32 + lane;
                if (e < p.head_dim) acc[c] += w * load_as(p.k, k_at + e, bp.dtype_in);
            }
        }
    }
    const int64_t dq_at = row_offset(bp.dq_stride, b, s.q_row0 + i, h);
#pragma unroll
    for (int c = 0; c < kRowCols; ++c) {
        const int e = c * 32 + lane;
        if (e < p.head_dim) store_as(bp.dq, dq_at + e, bp.dtype_dq, acc[c] * p.scale);
    }
}

// One warp per key row of a KV head: dV_j = Σ P_ij dO_i and dK_j = scale · Σ dS_ij Q_i over
// every query row of every head of the GQA group, one query row per lane for the dot products.
__device__ __forceinline__ void bwd_rows_dkdv(const BwdParams& bp) {
    const FwdParams& p = bp.f;
    __shared__ float k_row[kRowWarps][kMaxHeadDim];
    __shared__ float v_row[kRowWarps][kMaxHeadDim];
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int j = blockIdx.x * kRowWarps + warp;
    const int hk = blockIdx.y;
    const int b = blockIdx.z;
    const Seq s = seq_of(p, b);
    if (j >= s.seqlen_kv) return;
    const int64_t k_at = row_offset(p.k_stride, b, s.kv_row0 + j, hk);
    const int64_t v_at = row_offset(p.v_stride, b, s.kv_row0 + j, hk);
    for (int d = lane; d < p.head_dim; d += 32) k_row[warp][d] = load_as(p.k, k_at + d, bp.dtype_in);
    for (int d = lane; d < p.head_dim_v; d += 32) v_row[warp][d] = load_as(p.v, v_at + d, bp.dtype_in);
    __syncwarp();
    const bool score_mod = p.softcap > 0.f || p.alibi != nullptr || p.mask_kind != MASK_NONE;
    // Query rows whose band holds key j.
    int lo, hi;
    rows_of_keys(p, s, j, j, lo, hi);

    float acc_k[kRowCols], acc_v[kRowCols];
#pragma unroll
    for (int c = 0; c < kRowCols; ++c) acc_k[c] = acc_v[c] = 0.f;
    for (int h = hk * p.group; h < (hk + 1) * p.group; ++h) {
        const float slope = alibi_slope(p, b, h);
        const int64_t stat0 = stat_row0<true>(bp, s, b, h);
        for (int i0 = lo; i0 < hi; i0 += 32) {
            const int i = i0 + lane;
            float pv = 0.f, ds = 0.f;
            if (i < hi) {
                const int64_t q_at = row_offset(p.q_stride, b, s.q_row0 + i, h);
                const int64_t do_at = row_offset(bp.do_stride, b, s.q_row0 + i, h);
                float dot = 0.f, dpv = 0.f;
                for (int d = 0; d < p.head_dim; ++d) dot += k_row[warp][d] * load_as(p.q, q_at + d, bp.dtype_in);
                for (int d = 0; d < p.head_dim_v; ++d)
                    dpv += v_row[warp][d] * load_as(bp.dout, do_at + d, bp.dtype_dout);
                row_grad_terms(bp, s, dot, dpv, bp.lse2[stat0 + i], bp.delta[stat0 + i], b, h, i,
                               j, slope, score_mod, pv, ds);
            }
            const int n = min(32, hi - i0);
            for (int ii = 0; ii < n; ++ii) {
                const float wp = __shfl_sync(0xffffffffu, pv, ii);
                const float ws = __shfl_sync(0xffffffffu, ds, ii);
                const int64_t q_at = row_offset(p.q_stride, b, s.q_row0 + i0 + ii, h);
                const int64_t do_at = row_offset(bp.do_stride, b, s.q_row0 + i0 + ii, h);
#pragma unroll
                for (int c = 0; c < kRowCols; ++c) {
                    const int e = c * 32 + lane;
                    if (e < p.head_dim) acc_k[c] += ws * load_as(p.q, q_at + e, bp.dtype_in);
                    if (e < p.head_dim_v) acc_v[c] += wp * load_as(bp.dout, do_at + e, bp.dtype_dout);
                }
            }
        }
    }
    const int64_t dk_at = row_offset(bp.dk_stride, b, s.kv_row0 + j, hk);
    const int64_t dv_at = row_offset(bp.dv_stride, b, s.kv_row0 + j, hk);
#pragma unroll
    for (int c = 0; c < kRowCols; ++c) {
        const int e = c * 32 + lane;
        if (e < p.head_dim) store_as(bp.dk, dk_at + e, bp.dtype_dk, acc_k[c] * p.scale);
        if (e < p.head_dim_v) store_as(bp.dv, dv_at + e, bp.dtype_dv, acc_v[c]);
    }
}
