// A KV-cache call's writes before its attention, where the attention is a second launch (the
// decoding kernel writes the rows itself): the new keys (rotated when rotary tables are given)
// and values into the cache at each sequence's length, and q rotated into a contiguous copy
// that the attention then reads. One warp per row; dtypes read at run time (these kernels
// move a few rows each: memory, not arithmetic, bounds them). What a row's slot is, and which
// slots are skipped: append.cuh.
#include "append.cuh"

// Grid (ceil(seqlen_new / kRowWarps), heads_kv, batch): new row i of KV head h of sequence b
// goes to slot seqused_k[b] + i of the cache.
__device__ __forceinline__ void kv_append(const AppendParams& a) {
    const int warp = threadIdx.x / 32;
    const int i = blockIdx.x * kRowWarps + warp;
    if (i >= a.rows.seqlen_new) return;
    append_row(a.f, a.rows, blockIdx.z, i, blockIdx.y, threadIdx.x % 32);
}

// Grid (ceil(seqlen_q / kRowWarps), heads_q, batch): q row i of head h of sequence b, rotated at
// its position (q_position), into q_rot.
__device__ __forceinline__ void kv_rotate_q(const AppendParams& a) {
    const FwdParams& p = a.f;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int i = blockIdx.x * kRowWarps + warp;
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    if (i >= p.seqlen_q) return;
    const int64_t dst = (((int64_t)b * p.seqlen_q + i) * p.heads_q + h) * p.head_dim;
    rotate_row(a.rows, p.q, row_offset(p.q_stride, b, i, h), a.q_rot, dst, q_position(p, a.rows, b, i),
               p.head_dim, lane);
}
