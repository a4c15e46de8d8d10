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

// The math of one key tile on mma.sync, shared by the prefill (fwd_sm80.cu) and decoding
// (fwd_decode.cu) kernels. A warp owns MT 16-row m-tiles; S holds S_TILES n8 tiles of keys per
// m-tile and O O_TILES n8 tiles of columns, in the mma accumulator layout. The lane bases are
// ldmatrix addresses (shared space, bytes) with rows PITCH elements apart: `q_lane` at the
// warp's first query row (used when Q is not in registers), `k_lane` and `v_lane` at the tile's
// first key, as the kernels compute them.

// S = Q Kᵀ, Q from `q_frag` (Q_IN_REGS) or from shared memory.
template <typename T, int D, int MT, int S_TILES, int PITCH, bool Q_IN_REGS, typename QFrag>
__device__ __forceinline__ void tile_qk(float (&s)[MT][S_TILES][4], const QFrag& q_frag,
                                        uint32_t q_lane, uint32_t k_lane) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int t = 0; t < S_TILES; ++t) s[mt][t][0] = s[mt][t][1] = s[mt][t][2] = s[mt][t][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a_reg[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            if constexpr (Q_IN_REGS) {
#pragma unroll
                for (int r = 0; r < 4; ++r) a_reg[mt][r] = q_frag[mt][kk][r];
            } else {
                ldmatrix_x4(a_reg[mt], q_lane + (mt * 16 * PITCH + kk * 16) * 2);
            }
        }
#pragma unroll
        for (int t = 0; t < S_TILES; t += 2) {
            uint32_t k_reg[4];
            ldmatrix_x4(k_reg, k_lane + (t * 8 * PITCH + kk * 16) * 2);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_16816<T>(s[mt][t], a_reg[mt], k_reg[0], k_reg[1]);
                mma_16816<T>(s[mt][t + 1], a_reg[mt], k_reg[2], k_reg[3]);
            }
        }
    }
}

// The online softmax of one tile: each row's new running maximum (over the quad that shares
// it), O and the row sums rescaled, and S turned into P = exp2(S * score_scale - max). Without
// score modifiers S is raw q·k and `score_scale` (> 0, the host's rule for those variants, so
// the maximum commutes with it) is applied in one FFMA per element; with them it is 1.
template <int MT, int S_TILES, int O_TILES>
__device__ __forceinline__ void tile_softmax(float (&s)[MT][S_TILES][4], float (&o)[MT][O_TILES][4],
                                             SoftmaxRow (&row)[MT][2], float score_scale) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float tile_max = -UFA_INF;
#pragma unroll
            for (int t = 0; t < S_TILES; ++t)
                tile_max = fmaxf(tile_max, fmaxf(s[mt][t][2 * r], s[mt][t][2 * r + 1]));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
            float base;
            const float correction = row[mt][r].rescale(tile_max * score_scale, base);
            float sum = 0.f;
#pragma unroll
            for (int t = 0; t < S_TILES; ++t) {
                s[mt][t][2 * r] = fast_exp2(fmaf(s[mt][t][2 * r], score_scale, -base));
                s[mt][t][2 * r + 1] = fast_exp2(fmaf(s[mt][t][2 * r + 1], score_scale, -base));
                sum += s[mt][t][2 * r] + s[mt][t][2 * r + 1];
            }
            row[mt][r].sum += sum;
#pragma unroll
            for (int t = 0; t < O_TILES; ++t) {
                o[mt][t][2 * r] *= correction;
                o[mt][t][2 * r + 1] *= correction;
            }
        }
}

// O += P V; the S accumulators of two n8 tiles are exactly one A fragment.
template <typename T, int MT, int S_TILES, int O_TILES, int PITCH>
__device__ __forceinline__ void tile_pv(const float (&s)[MT][S_TILES][4], float (&o)[MT][O_TILES][4],
                                        uint32_t v_lane) {
#pragma unroll
    for (int kk = 0; kk < S_TILES / 2; ++kk) {
        uint32_t p_reg[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            p_reg[mt][0] = Convert<T>::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
            p_reg[mt][1] = Convert<T>::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
            p_reg[mt][2] = Convert<T>::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
            p_reg[mt][3] = Convert<T>::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
        }
#pragma unroll
        for (int t = 0; t < O_TILES; t += 2) {
            uint32_t v_reg[4];
            ldmatrix_x4_trans(v_reg, v_lane + (kk * 16 * PITCH + t * 8) * 2);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_16816<T>(o[mt][t], p_reg[mt], v_reg[0], v_reg[1]);
                mma_16816<T>(o[mt][t + 1], p_reg[mt], v_reg[2], v_reg[3]);
            }
        }
    }
}
