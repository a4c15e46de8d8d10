// A KV-cache call's writes before its attention: the new keys (rotated when rotary tables are
// given) and values into the cache at each sequence's length, and q rotated into a contiguous
// copy that the attention then reads. One warp per row; dtypes read at run time (these kernels
// move a few rows each: memory, not arithmetic, bounds them).
//
// The cache is AppendParams::f's k and v, placed as the attention reads them (block table or
// kv_batch_idx); f.seqused_k holds each sequence's cached keys. A slot outside the cache (a
// length past its capacity, a page or entry the cache does not have) is skipped, never written:
// the host checks these where it can read them (crates/ufa/src/kvcache.rs).
#include "sequence.cuh"

// a·c − b·s in f64, where products of f32 values are exact, so that the one rounding, and
// then the one to f32, are the same on every backend (crates/ufa/src/kvcache.rs, rotate).
__device__ __forceinline__ float rotate(float a, float b, float c, float s) {
    return (float)((double)a * (double)c - (double)b * (double)s);
}

// Writes the `d` elements of row src[src_at..] rotated at position `pos` into dst[dst_at..]
// (both of the call's dtype); one warp, each lane a strided share of the columns.
__device__ __forceinline__ void rotate_row(const AppendParams& a, const void* src, int64_t src_at,
                                           void* dst, int64_t dst_at, int pos, int d, int lane) {
    const int half = a.rotary_dim / 2;
    const int row = min(max(pos, 0), a.seqlen_ro - 1);  // a table row that exists
    for (int e = lane; e < d; e += 32) {
        const float x = load_as(src, src_at + e, a.dtype);
        float y = x;
        if (e < a.rotary_dim) {
            // Element e pairs with `partner`: (2i, 2i + 1) interleaved, (i, i + half) otherwise.
            const bool first = a.interleaved ? e % 2 == 0 : e < half;
            const int i = a.interleaved ? e / 2 : (first ? e : e - half);
            const int partner = a.interleaved ? (first ? e + 1 : e - 1) : (first ? e + half : e - half);
            const float other = load_as(src, src_at + partner, a.dtype);
            const int64_t at = row * a.rot_stride[0] + i * a.rot_stride[1];
            const float c = load_as(a.cos, at, a.dtype_rot), s = load_as(a.sin, at, a.dtype_rot);
            // (a, b) -> (a·c − b·s, b·c + a·s), the second as b·c − (−a)·s.
            y = first ? rotate(x, other, c, s) : rotate(x, -other, c, s);
        }
        store_as(dst, dst_at + e, a.dtype, y);
    }
}

// Grid (ceil(seqlen_new / kRowWarps), heads_kv, batch): new row i of KV head h of sequence b
// goes to slot seqused_k[b] + i of the cache.
__device__ __forceinline__ void kv_append(const AppendParams& a) {
    const FwdParams& p = a.f;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int i = blockIdx.x * kRowWarps + warp;
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    if (i >= a.seqlen_new) return;
    const int64_t pos = (int64_t)max(p.seqused_k[b], 0) + i;
    if (pos >= p.seqlen_kv) return;  // past the cache's capacity
    int64_t k_at, v_at;
    if (p.block_table != nullptr) {
        k_at = paged_row(p, b, (int)pos, p.k_stride, h);
        v_at = paged_row(p, b, (int)pos, p.v_stride, h);
    } else {
        int64_t entry = b;
        if (p.kv_batch_idx != nullptr) entry = p.kv_batch_idx[b];
        if (entry < 0 || entry >= p.kv_entries) return;
        k_at = row_offset(p.k_stride, entry, pos, h);
        v_at = row_offset(p.v_stride, entry, pos, h);
    }
    if (k_at < 0) return;  // a page the cache does not have
    const int64_t src_k = row_offset(a.k_new_stride, b, i, h);
    const int64_t src_v = row_offset(a.v_new_stride, b, i, h);
    if (a.cos != nullptr) {
        rotate_row(a, a.k_new, src_k, (void*)p.k, k_at, (int)pos, p.head_dim, lane);
    } else {
        for (int e = lane; e < p.head_dim; e += 32)
            store_as((void*)p.k, k_at + e, a.dtype, load_as(a.k_new, src_k + e, a.dtype));
    }
    for (int e = lane; e < p.head_dim_v; e += 32)
        store_as((void*)p.v, v_at + e, a.dtype, load_as(a.v_new, src_v + e, a.dtype));
}

// Grid (ceil(seqlen_q / kRowWarps), heads_q, batch): q row i of head h of sequence b, rotated at
// position seqused_k[b] + i (causal or windowed calls) or seqused_k[b], into q_rot.
__device__ __forceinline__ void kv_rotate_q(const AppendParams& a) {
    const FwdParams& p = a.f;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int i = blockIdx.x * kRowWarps + warp;
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    if (i >= p.seqlen_q) return;
    const int64_t pos = (int64_t)max(p.seqused_k[b], 0) + (a.q_advances ? i : 0);
    const int64_t dst = (((int64_t)b * p.seqlen_q + i) * p.heads_q + h) * p.head_dim;
    rotate_row(a, p.q, row_offset(p.q_stride, b, i, h), a.q_rot, dst, (int)pos, p.head_dim, lane);
}
