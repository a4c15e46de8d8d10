// What a backward block works on (its keys, and the query blocks and heads that see them), the
// backward's workspace rows, and the deterministic dQ turns (DqOrder in ufa_abi.cuh: the rotated
// walks of DQ_ROTATED need every key block to see every query block, and every key block of a
// (batch, KV head) resident at once, since the first block of one query block's turn order may
// have been launched after blocks it waits for; the host picks it only then).
#pragma once
#include "mask.cuh"
#include "mma.cuh"

// Where sequence `s` (batch entry b) of head h starts in the workspace's LSE2/D rows: a dense
// batch's rows are (batch, head) planes of seqlen_q_pad; a packed batch's sequences are placed
// one after another in each head's plane (stat_stride[1] floats), each kSeqlenQPad + 4 rows
// longer than itself (so its padded rows never reach the next sequence's) and 16-byte aligned
// (the kernels copy them in 16-byte pieces). SEQS as in key_block.
template <bool SEQS>
__device__ __forceinline__ int64_t stat_row0(const BwdParams& bp, const Seq& s, int b, int h) {
    if constexpr (SEQS) {
        if (bp.f.cu_seqlens_q != nullptr)
            return h * bp.stat_stride[1] + ((s.q_row0 + 3) & ~3ll) + (int64_t)(kSeqlenQPad + 4) * b;
    }
    return ((int64_t)b * bp.f.heads_q + h) * bp.seqlen_q_pad;
}

// The fp32 dQ buffer's row 0 of sequence `s` and head h, rows of `head_dim` floats: (batch,
// head) planes of a dense batch's seqlen_q rows, or each head's plane of q's packed rows
// (accum_stride[1] floats).
template <bool SEQS>
__device__ __forceinline__ float* accum_rows(const BwdParams& bp, const Seq& s, int b, int h,
                                             int head_dim) {
    if constexpr (SEQS) {
        if (bp.f.cu_seqlens_q != nullptr)
            return bp.dq_accum + h * bp.accum_stride[1] + s.q_row0 * head_dim;
    }
    return bp.dq_accum + ((int64_t)b * bp.f.heads_q + h) * bp.f.seqlen_q * head_dim;
}

// What a tensor-core backward block works on: keys [n0, n0 + block_n) of KV head hk of batch
// entry b (k and v point at the head's row 0, counted in 16-bit units), and the query blocks
// (of block_m rows) that see some of them, [m_first, m_first + m_count), for each of the
// `group` query heads: `total` items, walked from item `first` (0, or spread over the key
// blocks when DQ_ROTATED, so that the key blocks of a deterministic run do not queue for the
// same query block's turn at the start). Deterministic mode launches the key blocks in
// descending order (see bwd_sm80.cu): with the descending turns, a block then only ever waits
// for one launched before it.
// `half`: which half of the gradients' columns the block computes (head dims above 256 split
// them between the key blocks of grid rows y and y + heads_kv; 0 otherwise).
struct KeyBlock {
    Seq s;
    int b, hk, half, n_block, n0, m_first, m_count, total, first;
    const uint16_t *k, *v;

    // The item of step `it`, its query head head_at(it) and query block m_block_at(it).
    __device__ __forceinline__ int item(int it) const {
        const int x = it + first;
        return x < total ? x : x - total;
    }
    __device__ __forceinline__ int head_at(int it, int group) const {
        return hk * group + item(it) / m_count;
    }
    __device__ __forceinline__ int m_block_at(int it) const { return m_first + item(it) % m_count; }
};

// ELEM_UNITS: 16-bit units an element takes (2 for fp32), which the head pointers count in.
template <bool SEQS, int ELEM_UNITS = 1>
__device__ __forceinline__ KeyBlock key_block(const BwdParams& bp, int block_m, int block_n) {
    const FwdParams& p = bp.f;
    KeyBlock w;
    w.n_block = bp.deterministic ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
    const int heads_kv = p.heads_q / p.group;
    w.hk = blockIdx.y % heads_kv;
    w.half = blockIdx.y / heads_kv;
    w.b = blockIdx.z;
    w.s = seq_for<SEQS>(p, w.b);
    w.n0 = w.n_block * block_n;
    const int n_end = min(w.n0 + block_n, w.s.seqlen_kv) - 1;
    // Query rows that see some key of this block: the band inverted. It selects exactly the
    // query blocks whose band (band_of_rows) meets these keys, which the deterministic turn
    // order relies on. A block past its sequence's keys (a packed batch's grid covers the
    // longest one) has none, and takes no turns.
    int row_lo, row_hi;
    rows_of_keys(p, w.s, w.n0, n_end, row_lo, row_hi);
    if (w.n0 >= w.s.seqlen_kv) row_hi = row_lo;
    w.m_first = row_lo / block_m;
    w.m_count = row_hi > row_lo ? (row_hi - 1) / block_m - w.m_first + 1 : 0;
    w.total = w.m_count * p.group;
    w.first =
        bp.deterministic == DQ_ROTATED ? (int)((int64_t)blockIdx.x * w.total / gridDim.x) : 0;
    w.k = (const uint16_t*)p.k + row_offset(p.k_stride, w.b, w.s.kv_row0, w.hk) * ELEM_UNITS;
    w.v = (const uint16_t*)p.v + row_offset(p.v_stride, w.b, w.s.kv_row0, w.hk) * ELEM_UNITS;
    return w;
}

// Deterministic mode: the turn counter of step `it`'s query block (rows m0..m_last) and this
// key block's turn in it (`my_turn`), or null when not deterministic. Key blocks add into a
// query block in descending order; with rotated walks, in the order they reach it: the block
// whose walk starts at or last before the item (`lead`, the largest rank r with
// first(r) = floor(r total / n) <= item), then the ranks below it, then from the last rank
// down. A block waits only for blocks that reached the item at an earlier step of their walk
// (or at the same step and are of higher rank), so the waits form no cycle. The second half
// of a wide head dim's columns (w.half, grid rows launched after the first half's) takes its
// turns after every block of the first half has added: its turns count on from theirs.
__device__ __forceinline__ int32_t* dq_turn(const BwdParams& bp, const KeyBlock& w, int it,
                                            int m0, int m_last, int block_n, int& my_turn) {
    if (!bp.deterministic) return nullptr;
    const int h = w.head_at(it, bp.f.group);
    int blocks;  // key blocks that add into this query block
    if (bp.deterministic == DQ_ROTATED) {
        const int n = gridDim.x;
        const int lead = (int)(((int64_t)(w.item(it) + 1) * n - 1) / w.total);
        my_turn = lead - (int)blockIdx.x;
        if (my_turn < 0) my_turn += n;
        blocks = n;
    } else {
        int key_lo, key_hi;
        band_of_rows(bp.f, w.s, m0, m_last, key_lo, key_hi);
        my_turn = (key_hi - 1) / block_n - w.n_block;
        blocks = (key_hi - 1) / block_n - key_lo / block_n + 1;
    }
    my_turn += w.half * blocks;
    return bp.order + ((int64_t)w.b * bp.f.heads_q + h) * bp.num_m_blocks + w.m_block_at(it);
}

__device__ __forceinline__ void dq_turn_spin(const int32_t* turn, int my_turn) {
    while (load_acquire(turn) != my_turn) {
    }
}

// dq_turn, then blocks (thread 0 spins, then all) until it is this key block's turn.
__device__ __forceinline__ int32_t* dq_turn_wait(const BwdParams& bp, const KeyBlock& w, int it,
                                                 int m0, int m_last, int block_n, int& my_turn) {
    int32_t* turn = dq_turn(bp, w, it, m0, m_last, block_n, my_turn);
    if (turn == nullptr) return nullptr;
    if (threadIdx.x == 0) dq_turn_spin(turn, my_turn);
    __syncthreads();
    return turn;
}

// Hands the turn to the next key block once every thread's adds are issued: they precede the
// barrier and the release store follows it (the pattern of CUTLASS's semaphore).
__device__ __forceinline__ void dq_turn_pass(int32_t* turn, int my_turn) {
    if (turn == nullptr) return;
    __syncthreads();
    if (threadIdx.x == 0) store_release(turn, my_turn + 1);
}
