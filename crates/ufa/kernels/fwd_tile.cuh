// What the tensor-core forward kernels (fwd_sm80.cu, fwd_sm90.cu) share around their main
// loops: the block's rows, keys and head pointers, the loads of K and V rows from a dense batch,
// a packed one or a paged cache, and the epilogue that writes O and the LSE.
#pragma once
#include "mask.cuh"
#include "mma.cuh"
#include "smem_rows.cuh"
#include "softmax.cuh"

// What a tensor-core forward block works on: query rows [m0, m_last] of head h of sequence b
// (blocks run heaviest first: the last query blocks have the most causal keys), and the key
// tiles of `block_n` its band reaches, [n_first, n_last] (empty if n_last < n_first). A block
// whose rows lie past its sequence's end (a packed batch's grid covers the longest one) has
// `idle` set and must return before its first barrier. Head pointers count 16-bit units
// (an fp32 element is ELEM_UNITS = 2 of them, which the shared loaders copy alike); k and v
// are the head's row 0 (unused for a paged cache, whose rows are found row by row).
// SEQS: the call has sequence metadata (packed rows, per-sequence lengths, a cache);
// without it the sequence is the dense batch's (seq_for).
struct FwdBlock {
    Seq s;
    int b, h, hk, m0, m_last, n_first, n_last;
    bool idle;
    const uint16_t *q, *k, *v;
};

// The block of query rows `m_rev`, counted from the last, of head h and batch entry b.
template <bool SEQS, int ELEM_UNITS = 1>
__device__ __forceinline__ FwdBlock fwd_block_at(const FwdParams& p, int block_m, int block_n,
                                                 int m_rev, int h, int b) {
    FwdBlock w;
    w.h = h;
    w.b = b;
    w.hk = w.h / p.group;
    w.s = seq_for<SEQS>(p, w.b);
    w.m0 = (p.num_m_blocks - 1 - m_rev) * block_m;
    w.idle = w.m0 >= w.s.seqlen_q;
    w.m_last = min(w.m0 + block_m, w.s.seqlen_q) - 1;
    w.q = (const uint16_t*)p.q + row_offset(p.q_stride, w.b, w.s.q_row0, w.h) * ELEM_UNITS;
    w.k = (const uint16_t*)p.k +
          row_offset(p.k_stride, w.s.kv_batch, w.s.kv_row0, w.hk) * ELEM_UNITS;
    w.v = (const uint16_t*)p.v +
          row_offset(p.v_stride, w.s.kv_batch, w.s.kv_row0, w.hk) * ELEM_UNITS;
    int key_lo, key_hi;
    band_of_rows(p, w.s, w.m0, w.m_last, key_lo, key_hi);
    // Tiles wholly outside the causal/window band are never loaded.
    w.n_first = key_lo / block_n;
    w.n_last = key_hi > key_lo ? (key_hi - 1) / block_n : w.n_first - 1;
    return w;
}

// This thread block's rows: grid (m-blocks, heads, batch).
template <bool SEQS, int ELEM_UNITS = 1>
__device__ __forceinline__ FwdBlock fwd_block(const FwdParams& p, int block_m, int block_n) {
    return fwd_block_at<SEQS, ELEM_UNITS>(p, block_m, block_n, blockIdx.x, blockIdx.y, blockIdx.z);
}

// Copies rows [row0, row0 + ROWS) of a tile whose row r lies at element offset row_off(r) of
// `base` (-1: no such row) into shared memory, `place(r, chunk)` giving the shared address of
// 16-byte chunk `chunk` of row r; rows at or past `rows_total`, or without a place in memory,
// become zeros, as do chunks from `valid_chunks` on (see load_tile). The general loader, for a
// paged cache's rows; dense rows take load_tile / load_tile_sw128, which walk a fixed stride.
template <int THREADS, int CHUNKS_PER_ROW, int ROWS, typename RowOff, typename Place>
__device__ __forceinline__ void load_rows(const uint16_t* base, RowOff row_off, Place place,
                                          int row0, int rows_total,
                                          int valid_chunks = CHUNKS_PER_ROW) {
    constexpr int kChunks = ROWS * CHUNKS_PER_ROW;
#pragma unroll
    for (int it = 0; it < (kChunks + THREADS - 1) / THREADS; ++it) {
        const int c = threadIdx.x + it * THREADS;
        if (kChunks % THREADS != 0 && c >= kChunks) break;
        const int r = c / CHUNKS_PER_ROW;
        const int chunk = c % CHUNKS_PER_ROW;
        const int64_t off = row0 + r < rows_total && chunk < valid_chunks ? row_off(row0 + r) : -1;
        const bool valid = off >= 0;
        cp_async_16_to(place(r, chunk), base + (valid ? off + chunk * 8 : 0), valid ? 16 : 0);
    }
}

// The forward's epilogue for query row i, from the mma accumulator layout (each lane of a quad
// holds columns 8 t + 2 quad, +1 of every n8 tile t): adds up the quad's partial row sums,
// writes O / sum (`pair(t, x, y)` gives the unnormalised pair of tile t) and the LSE. Rows that
// saw no key get 0 and -inf; columns from head_dim_v on (a tile wider than the head) are not
// written. Every lane must call it (the sum is shuffled across the quad). `col0`: the first
// column of tile 0 (a wide head dim's second half of the columns starts past the first; that
// half's warps leave the LSE to the first's).
template <typename T, int O_TILES, typename Pair>
__device__ __forceinline__ void store_fwd_row(const FwdParams& p, const FwdBlock& w, int i,
                                              int quad, const SoftmaxRow& row, Pair pair,
                                              int col0 = 0) {
    float sum = row.sum;
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    if (i >= w.s.seqlen_q) return;
    const float inv = row.inv_sum(sum);
    const int64_t at = row_offset(p.o_stride, w.b, w.s.q_row0 + i, w.h);
#pragma unroll
    for (int t = 0; t < O_TILES; ++t) {
        float x, y;
        pair(t, x, y);
        const int c = col0 + t * 8 + quad * 2;
        if (c >= p.head_dim_v) continue;  // head dims are multiples of 2
        if constexpr (T::is_f32)
            *(float2*)((float*)p.out + at + c) = make_float2(x * inv, y * inv);
        else
            *(uint32_t*)((uint16_t*)p.out + at + c) = Convert<T>::pack(x * inv, y * inv);
    }
    if (p.lse != nullptr && quad == 0 && col0 == 0) {
        p.lse[lse_offset(p.lse_stride, w.b, w.h, w.s.q_row0 + i)] =
            row.lse(sum);
    }
}

// The math of one key tile on mma.sync, shared by the prefill (fwd_sm80.cu) and decoding
// (fwd_decode.cu) kernels. A warp owns MT 16-row m-tiles; S holds S_TILES n8 tiles of keys per
// m-tile and O O_TILES n8 tiles of columns, in the mma accumulator layout. The tiles lie in
// shared memory as ROWS lays them out (smem_rows.cuh); the lanes are ldmatrix lanes of it:
// `q_lane` at the warp's first query row (used when Q is not in registers), `k_lane` and
// `v_lane` at the tile's first key, as the kernels compute them.

// S = Q Kᵀ, Q from `q_frag` (Q_IN_REGS) or from shared memory.
template <typename T, int D, int MT, int S_TILES, typename ROWS, bool Q_IN_REGS, typename QFrag>
__device__ __forceinline__ void tile_qk(float (&s)[MT][S_TILES][4], const QFrag& q_frag,
                                        typename ROWS::Lane q_lane, typename ROWS::Lane k_lane) {
    zero_tiles(s);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a_reg[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            if constexpr (Q_IN_REGS) {
#pragma unroll
                for (int r = 0; r < 4; ++r) a_reg[mt][r] = q_frag[mt][kk][r];
            } else {
                ldmatrix_x4(a_reg[mt], q_lane.at(kk * 2) + mt * 16 * ROWS::kRowBytes);
            }
        }
#pragma unroll
        for (int t = 0; t < S_TILES; t += 2) {
            uint32_t k_reg[4];
            ldmatrix_x4(k_reg, k_lane.at(kk * 2) + t * 8 * ROWS::kRowBytes);
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
template <typename T, int MT, int S_TILES, int O_TILES, typename ROWS>
__device__ __forceinline__ void tile_pv(const float (&s)[MT][S_TILES][4], float (&o)[MT][O_TILES][4],
                                        typename ROWS::Lane v_lane) {
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
            ldmatrix_x4_trans(v_reg, v_lane.at(t) + kk * 16 * ROWS::kRowBytes);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_16816<T>(o[mt][t], p_reg[mt], v_reg[0], v_reg[1]);
                mma_16816<T>(o[mt][t + 1], p_reg[mt], v_reg[2], v_reg[3]);
            }
        }
    }
}

// The same tile math for fp32 operands on TF32 tensor cores (m16n8k8; T = Float32 splits each
// product in three, Tf32 takes one; mma.cuh). Shared rows are PITCH floats apart; ldmatrix
// (b16) moves fp32 data too: an 8x8 b16 matrix is 8 rows of 4 floats, and lane l receives row
// l / 4, float l % 4, which is the TF32 fragment layout. `q_lane` and `k_lane` are those
// kernels' ldmatrix bases, `v_lane` the lane's float in V (key 2 * quad, column group).

// S = Q Kᵀ from shared memory, two k8 steps (16 head-dim columns) at a time: per m-tile two
// ldmatrix.x4 of Q (rows 0-7 and 8-15 × columns 0-3 and 4-7 of each step), per n8 tile of keys
// one of K (its 8 keys × 4 groups of 4 columns: b0 and b1 of both steps). ROLLED keeps the
// loop over the head dim a loop (the backward, whose dK and dV hold registers throughout:
// unrolled, the loads hoisted ahead spilled).
template <typename T, int D, int MT, int S_TILES, int PITCH, bool ROLLED = false>
__device__ __forceinline__ void tile_qk_tf32(float (&s)[MT][S_TILES][4], uint32_t q_lane,
                                             uint32_t k_lane) {
    constexpr bool SPLIT = T::tf32_split;
    static_assert(D % 16 == 0, "two k8 steps at a time");
    zero_tiles(s);
#pragma unroll(ROLLED ? 1 : D / 16)
    for (int kk = 0; kk < D / 16; ++kk) {
        Tf32Frag<4, SPLIT> a[MT][2];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int step = 0; step < 2; ++step) {
                uint32_t raw[4];
                ldmatrix_x4(raw, q_lane + (mt * 16 * PITCH + kk * 16 + step * 8) * 4);
#pragma unroll
                for (int r = 0; r < 4; ++r) a[mt][step].set_bits(r, raw[r]);
            }
#pragma unroll
        for (int t = 0; t < S_TILES; ++t) {
            uint32_t raw[4];
            ldmatrix_x4(raw, k_lane + (t * 8 * PITCH + kk * 16) * 4);
            Tf32Frag<4, SPLIT> b;
#pragma unroll
            for (int r = 0; r < 4; ++r) b.set_bits(r, raw[r]);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                mma_accumulate<SPLIT>(s[mt][t], [&](float(&acc)[4]) {
                    mma_f32<SPLIT>(acc, a[mt][0], b, 0);
                    mma_f32<SPLIT>(acc, a[mt][1], b, 2);
                });
        }
    }
}

// O += P V with P straight from the S accumulators. Key order within a k8 step is free (it is
// summed over), so the step's A column c is taken to be key π(c), π(t) = 2t, π(t + 4) = 2t + 1:
// then a lane's accumulators (keys 2 quad, 2 quad + 1 of rows group, group + 8) are exactly its
// A fragment, and B's b0, b1 are V at keys 2 quad and 2 quad + 1 of column group, two scalar
// shared loads (rows PITCH ≡ 4 or 20 floats mod 32 apart put a warp's 32 on 32 banks).
template <typename T, int MT, int S_TILES, int O_TILES, int PITCH>
__device__ __forceinline__ void tile_pv_tf32(const float (&s)[MT][S_TILES][4],
                                             float (&o)[MT][O_TILES][4], const float* v_lane) {
    constexpr bool SPLIT = T::tf32_split;
#pragma unroll
    for (int kk = 0; kk < S_TILES; ++kk) {
        Tf32Frag<4, SPLIT> a[MT];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            a[mt].set(0, s[mt][kk][0]);
            a[mt].set(1, s[mt][kk][2]);
            a[mt].set(2, s[mt][kk][1]);
            a[mt].set(3, s[mt][kk][3]);
        }
#pragma unroll
        for (int t = 0; t < O_TILES; ++t) {
            Tf32Frag<2, SPLIT> b;
            b.set(0, v_lane[kk * 8 * PITCH + t * 8]);
            b.set(1, v_lane[(kk * 8 + 1) * PITCH + t * 8]);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                mma_accumulate<SPLIT>(o[mt][t],
                                      [&](float(&acc)[4]) { mma_f32<SPLIT>(acc, a[mt], b, 0); });
        }
    }
}
