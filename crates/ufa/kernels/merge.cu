// Merging attention states (crates/ufa/src/merge.rs): one warp per (batch, row, head) reads
// every state's LSE, weighs each state by exp(lse - max) and writes the weighted mean of their
// output rows and the merged LSE. A state with LSE -inf saw no key and contributes nothing; a
// NaN LSE makes the row NaN. With `running`, what the output holds (and its LSE) is one more
// state: larger merges run in rounds of kMergeMaxStates. Every state's row is read before the
// merged row is written, so the output may be the first state itself.
#include "softmax.cuh"

__device__ __forceinline__ void merge_states(const MergeParams& m) {
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int i = blockIdx.x * kRowWarps + warp;
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    if (i >= m.seqlen) return;
    const int64_t lse_at = lse_offset(m.lse_stride, b, h, i);
    const int64_t out_at = row_offset(m.out_stride, b, i, h);
    // States 0..n-1 are m.states; state n (when running) the output's current contents.
    const int n = m.num_states;
    float lse[kMergeMaxStates + 1];
    LseMax max;
#pragma unroll
    for (int k = 0; k <= kMergeMaxStates; ++k) {
        lse[k] = -UFA_INF;
        if (k < n) {
            const MergeState& st = m.states[k];
            lse[k] = st.lse[lse_offset(st.lse_stride, b, h, i)];
        } else if (k == n && m.running) {
            lse[k] = m.lse[lse_at];
        }
        max.add(lse[k]);
    }
    const float mx = max.value();
    float w[kMergeMaxStates + 1];
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k <= kMergeMaxStates; ++k) {
        // -inf states weigh exactly 0 (and are skipped below, whatever their rows hold).
        w[k] = lse_weight(lse[k], mx);
        sum += w[k];
    }
    const bool none = mx == -UFA_INF;
    const float inv = none ? 0.f : 1.f / sum;
    for (int e = lane; e < m.head_dim; e += 32) {
        float acc = 0.f;
#pragma unroll
        for (int k = 0; k <= kMergeMaxStates; ++k) {
            if (lse[k] == -UFA_INF) continue;
            if (k < n) {
                const MergeState& st = m.states[k];
                acc += w[k] * load_as(st.out, row_offset(st.out_stride, b, i, h) + e, st.dtype);
            } else if (k == n && m.running) {
                acc += w[k] * load_as(m.out, out_at + e, m.dtype_out);
            }
        }
        store_as(m.out, out_at + e, m.dtype_out, acc * inv);
    }
    __syncwarp();  // every lane has read the LSEs (the output's may be rewritten next)
    if (lane == 0 && m.lse != nullptr) m.lse[lse_at] = none ? -UFA_INF : mx + logf(sum);
}
