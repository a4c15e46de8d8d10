// What the tensor-core forward kernels (fwd_sm80.cu, fwd_sm90.cu) share around their main
// loops: the block's rows, keys and head pointers, the loads of K and V rows from a dense batch,
// a packed one or a paged cache, and the epilogue that writes O and the LSE.
#pragma once
#include "mask.cuh"
#include "mma.cuh"
#include "softmax.cuh"

// What a tensor-core forward block works on: query rows [m0, m_last] of head h of sequence b
// (blocks run heaviest first: the last query blocks have the most causal keys), and the key
// tiles of `block_n` its band reaches, [n_first, n_last] (empty if n_last < n_first). A block
// whose rows lie past its sequence's end (a packed batch's grid covers the longest one) has
// `idle` set and must return before its first barrier. Head pointers are for 16-bit inputs;
// k and v are the head's row 0 (unused for a paged cache, whose rows are found row by row).
// SEQS: the call has sequence metadata (packed rows, per-sequence lengths, a cache);
// without it the sequence is the dense batch's (seq_for).
struct FwdBlock {
    Seq s;
    int b, h, hk, m0, m_last, n_first, n_last;
    bool idle;
    const uint16_t *q, *k, *v;
};

template <bool SEQS>
__device__ __forceinline__ FwdBlock fwd_block(const FwdParams& p, int block_m, int block_n) {
    FwdBlock w;
    w.h = blockIdx.y;
    w.b = blockIdx.z;
    w.hk = w.h / p.group;
    w.s = seq_for<SEQS>(p, w.b);
    w.m0 = (p.num_m_blocks - 1 - blockIdx.x) * block_m;
    w.idle = w.m0 >= w.s.seqlen_q;
    w.m_last = min(w.m0 + block_m, w.s.seqlen_q) - 1;
    w.q = (const uint16_t*)p.q + row_offset(p.q_stride, w.b, w.s.q_row0, w.h);
    w.k = (const uint16_t*)p.k + row_offset(p.k_stride, w.s.kv_batch, w.s.kv_row0, w.hk);
    w.v = (const uint16_t*)p.v + row_offset(p.v_stride, w.s.kv_batch, w.s.kv_row0, w.hk);
    int key_lo, key_hi;
    band_of_rows(p, w.s, w.m0, w.m_last, key_lo, key_hi);
    // Tiles wholly outside the causal/window band are never loaded.
    w.n_first = key_lo / block_n;
    w.n_last = key_hi > key_lo ? (key_hi - 1) / block_n : w.n_first - 1;
    return w;
}

// Copies rows [row0, row0 + ROWS) of a tile whose row r lies at element offset row_off(r) of
// `base` (-1: no such row) into shared memory, `place(r, chunk)` giving the shared address of
// 16-byte chunk `chunk` of row r; rows at or past `rows_total`, or without a place in memory,
// become zeros. The general loader, for a paged cache's rows; dense rows take load_tile /
// load_tile_sw128, which walk a fixed stride.
template <int THREADS, int CHUNKS_PER_ROW, int ROWS, typename RowOff, typename Place>
__device__ __forceinline__ void load_rows(const uint16_t* base, RowOff row_off, Place place,
                                          int row0, int rows_total) {
    constexpr int kChunks = ROWS * CHUNKS_PER_ROW;
#pragma unroll
    for (int it = 0; it < (kChunks + THREADS - 1) / THREADS; ++it) {
        const int c = threadIdx.x + it * THREADS;
        if (kChunks % THREADS != 0 && c >= kChunks) break;
        const int r = c / CHUNKS_PER_ROW;
        const int chunk = c % CHUNKS_PER_ROW;
        const int64_t off = row0 + r < rows_total ? row_off(row0 + r) : -1;
        const bool valid = off >= 0;
        cp_async_16_to(place(r, chunk), base + (valid ? off + chunk * 8 : 0), valid ? 16 : 0);
    }
}

// The forward's epilogue for query row i, from the mma accumulator layout (each lane of a quad
// holds columns 8 t + 2 quad, +1 of every n8 tile t): adds up the quad's partial row sums,
// writes O / sum (`pair(t, x, y)` gives the unnormalised pair of tile t) and the LSE. Rows that
// saw no key get 0 and -inf. Every lane must call it (the sum is shuffled across the quad).
template <typename T, int O_TILES, typename Pair>
__device__ __forceinline__ void store_fwd_row(const FwdParams& p, const FwdBlock& w, int i,
                                              int quad, const SoftmaxRow& row, Pair pair) {
    float sum = row.sum;
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    if (i >= w.s.seqlen_q) return;
    const float inv = row.inv_sum(sum);
    uint16_t* out_row = (uint16_t*)p.out + row_offset(p.o_stride, w.b, w.s.q_row0 + i, w.h);
#pragma unroll
    for (int t = 0; t < O_TILES; ++t) {
        float x, y;
        pair(t, x, y);
        *(uint32_t*)(out_row + t * 8 + quad * 2) = Convert<T>::pack(x * inv, y * inv);
    }
    if (p.lse != nullptr && quad == 0) {
        p.lse[w.b * p.lse_stride[0] + w.h * p.lse_stride[1] + (w.s.q_row0 + i) * p.lse_stride[2]] =
            row.lse(sum);
    }
}
