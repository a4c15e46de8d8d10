// A KV-cache call's new rows: keys (rotated when rotary tables are given) and values written
// into the cache at each sequence's length, and the rotation of q. The append kernels
// (kvcache.cu) and the decoding kernel, which writes the rows it reads in the launch that
// reads them (fwd_decode.cu), both write through these, so the two paths write the same bits.
//
// `p` describes the cache as the attention reads it (k and v its cache, seqused_k its lengths,
// block_table or kv_batch_idx). A slot outside the cache (a length past its capacity, a page or
// entry the cache does not have) is skipped, never written: the host checks these where it can
// read them (crates/ufa/src/kvcache.rs).
#pragma once
#include "sequence.cuh"

// a·c − b·s in f64, where products of f32 values are exact, so that the one rounding, and
// then the one to f32, are the same on every backend (crates/ufa/src/kvcache.rs, rotate).
__device__ __forceinline__ float rotate(float a, float b, float c, float s) {
    return (float)((double)a * (double)c - (double)b * (double)s);
}

// The rotary table row of position `pos` (clamped to a row that exists).
__device__ __forceinline__ int rotary_row(const AppendRows& a, int64_t pos) {
    return (int)min(max(pos, (int64_t)0), (int64_t)a.seqlen_ro - 1);
}

// Element e's pair (first, and partner) and table column i: (2i, 2i + 1) interleaved,
// (i, i + rotary_dim / 2) otherwise.
struct RotaryPair {
    bool first;
    int partner, i;
};
__device__ __forceinline__ RotaryPair rotary_pair(const AppendRows& a, int e) {
    const int half = a.rotary_dim / 2;
    RotaryPair r;
    r.first = a.interleaved ? e % 2 == 0 : e < half;
    r.i = a.interleaved ? e / 2 : (r.first ? e : e - half);
    r.partner = a.interleaved ? (r.first ? e + 1 : e - 1) : (r.first ? e + half : e - half);
    return r;
}

// Element x rotated with its partner `other` at table row `row`: (a, b) -> (a·c − b·s,
// b·c + a·s), the second as b·c − (−a)·s.
__device__ __forceinline__ float rotated(const AppendRows& a, float x, float other,
                                         const RotaryPair& pr, int row) {
    const int64_t at = row * a.rot_stride[0] + pr.i * a.rot_stride[1];
    const float c = load_as(a.cos, at, a.dtype_rot), s = load_as(a.sin, at, a.dtype_rot);
    return pr.first ? rotate(x, other, c, s) : rotate(x, -other, c, s);
}

// Writes the `d` elements of row src[src_at..] rotated at position `pos` into dst[dst_at..]
// (both of the call's dtype); one warp, each lane a strided share of the columns.
__device__ __forceinline__ void rotate_row(const AppendRows& a, const void* src, int64_t src_at,
                                           void* dst, int64_t dst_at, int64_t pos, int d,
                                           int lane) {
    const int row = rotary_row(a, pos);
    for (int e = lane; e < d; e += 32) {
        const float x = load_as(src, src_at + e, a.dtype);
        float y = x;
        if (e < a.rotary_dim) {
            const RotaryPair pr = rotary_pair(a, e);
            y = rotated(a, x, load_as(src, src_at + pr.partner, a.dtype), pr, row);
        }
        store_as(dst, dst_at + e, a.dtype, y);
    }
}

// The first key slot of sequence b the call appends at: its cached keys.
__device__ __forceinline__ int64_t append_base(const FwdParams& p, int b) {
    return (int64_t)max(p.seqused_k[b], 0);
}

// New row i of KV head h of sequence b into its cache slot (append_base + i); one warp.
__device__ __forceinline__ void append_row(const FwdParams& p, const AppendRows& a, int b, int i,
                                           int h, int lane) {
    const int64_t pos = append_base(p, b) + i;
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
        rotate_row(a, a.k_new, src_k, (void*)p.k, k_at, pos, p.head_dim, lane);
    } else {
        for (int e = lane; e < p.head_dim; e += 32)
            store_as((void*)p.k, k_at + e, a.dtype, load_as(a.k_new, src_k + e, a.dtype));
    }
    for (int e = lane; e < p.head_dim_v; e += 32)
        store_as((void*)p.v, v_at + e, a.dtype, load_as(a.v_new, src_v + e, a.dtype));
}

// The position q row i of sequence b is rotated at: its own (append_base + i) in causal or
// windowed calls, else the first new key's for every row (as FlashAttention).
__device__ __forceinline__ int64_t q_position(const FwdParams& p, const AppendRows& a, int b,
                                              int i) {
    return append_base(p, b) + (a.q_advances ? i : 0);
}
