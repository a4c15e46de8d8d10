// One sequence of a call: its lengths, where its causal diagonal lies and where its rows are.
// A dense batch's sequences all have the parameter block's lengths; a packed batch's start at
// cu_seqlens rows; a KV cache's keys are counted by seqused_k and found through a block table
// (paged) or kv_batch_idx (gathered). The host validates these arrays when it can read them; the
// kernels still clamp every index they read, so bad metadata gives wrong numbers, never an access
// outside the tensors (crates/ufa/src/sequences.rs describes the same rules on the host).
#pragma once
#include "common.cuh"

struct Seq {
    int seqlen_q, seqlen_kv;
    int diag_offset;   // query i is aligned with key i + diag_offset
    int64_t q_row0;    // first row of its q, out and LSE rows (packed batches; 0 otherwise)
    int64_t kv_row0;   // first row of its keys (packed keys; 0 otherwise)
    int64_t kv_batch;  // its batch entry of k and v (a gathered cache's index; b otherwise)
};

__device__ __forceinline__ int64_t clamp64(int64_t x, int64_t lo, int64_t hi) {
    return x < lo ? lo : (x > hi ? hi : x);
}

__device__ __forceinline__ Seq seq_of(const FwdParams& p, int b) {
    Seq s;
    s.q_row0 = 0;
    s.seqlen_q = p.seqlen_q;
    if (p.cu_seqlens_q != nullptr) {
        const int64_t start = clamp64(p.cu_seqlens_q[b], 0, p.rows_q);
        const int64_t end = clamp64(p.cu_seqlens_q[b + 1], start, p.rows_q);
        s.q_row0 = start;
        s.seqlen_q = (int)min(end - start, (int64_t)p.seqlen_q);
    }
    s.kv_row0 = 0;
    int64_t kv = p.seqlen_kv;
    if (p.cu_seqlens_k != nullptr) {
        const int64_t start = clamp64(p.cu_seqlens_k[b], 0, p.rows_kv);
        const int64_t end = clamp64(p.cu_seqlens_k[b + 1], start, p.rows_kv);
        // Over a paged cache cu_seqlens_k only counts keys; the block table places them.
        s.kv_row0 = p.block_table != nullptr ? 0 : start;
        kv = end - start;
    }
    if (p.seqused_k != nullptr) kv = min(kv, max((int64_t)p.seqused_k[b], (int64_t)0) + p.seqused_add);
    s.seqlen_kv = (int)min(kv, (int64_t)p.seqlen_kv);
    s.kv_batch = b;
    if (p.kv_batch_idx != nullptr) {
        const int64_t e = p.kv_batch_idx[b];
        if (e < 0 || e >= p.kv_entries) {
            s.seqlen_kv = 0;  // an entry the cache does not have: skipped, not followed
        } else {
            s.kv_batch = e;
        }
    }
    s.diag_offset = p.top_left ? 0 : s.seqlen_kv - s.seqlen_q;
    return s;
}

// A dense batch's sequence b: the parameter block's lengths. Kernels instantiated without
// sequence metadata (SEQS = false) take this, whose values stay constants of the parameter
// space instead of registers that the tuned tensor-core loops need.
__device__ __forceinline__ Seq dense_seq(const FwdParams& p, int b) {
    Seq s;
    s.seqlen_q = p.seqlen_q;
    s.seqlen_kv = p.seqlen_kv;
    s.diag_offset = p.top_left ? 0 : p.seqlen_kv - p.seqlen_q;
    s.q_row0 = 0;
    s.kv_row0 = 0;
    s.kv_batch = b;
    return s;
}

template <bool SEQS>
__device__ __forceinline__ Seq seq_for(const FwdParams& p, int b) {
    if constexpr (SEQS) return seq_of(p, b);
    return dense_seq(p, b);
}

// The page of a paged cache holding key j of sequence b, or -1 where the block table names a
// page the cache does not have.
__device__ __forceinline__ int paged_page(const FwdParams& p, int b, int j) {
    const int page = p.block_table[b * p.block_table_stride + (j >> p.page_shift)];
    return page < 0 || page >= p.kv_entries ? -1 : page;
}

// Element offset of key j's row of KV head `h` in page `page` (strides `st`: page, row, head).
__device__ __forceinline__ int64_t page_row(const FwdParams& p, int page, int j,
                                            const int64_t (&st)[3], int h) {
    return page * st[0] + (int64_t)(j & ((1 << p.page_shift) - 1)) * st[1] + h * st[2];
}

// Element offset of key j's row of KV head `h` in a paged cache with strides `st` (page, row,
// head), or -1 where the block table names a page the cache does not have.
__device__ __forceinline__ int64_t paged_row(const FwdParams& p, int b, int j,
                                             const int64_t (&st)[3], int h) {
    const int page = paged_page(p, b, j);
    return page < 0 ? -1 : page_row(p, page, j, st, h);
}

// Element offset of key j's row of KV head `h` of sequence `s` in k or v (strides `st`): in
// its page of a paged cache (-1 for a page the cache does not have), else a stride apart.
__device__ __forceinline__ int64_t kv_row(const FwdParams& p, int b, const Seq& s,
                                          const int64_t (&st)[3], int h, int j) {
    if (p.block_table != nullptr) return paged_row(p, b, j, st, h);
    return row_offset(st, s.kv_batch, s.kv_row0 + j, h);
}
