// Decoding: attention of a few query rows over many keys (flash-decoding), on tensor cores
// (mma.sync, sm_80+). A decoding step reads the whole KV cache once and computes little with it,
// so everything here serves memory bandwidth:
//
// - Packed GQA rows. The query heads that share a KV head, and the few query rows of each,
//   are one tile of packed rows (row r = query i * group + head g), so each K/V byte is read
//   once per KV head instead of once per query head. A block owns kRows packed rows of one
//   (batch entry, KV head).
// - Split keys. The keys the block's rows see are cut into `num_splits` ranges (the host
//   chooses the count from the problem and the SM count), one block each, so that a handful of
//   sequences still fills the GPU. With one split the block writes the output. On sm_90+ the
//   splits of a (batch entry, KV head, row block) are one thread-block cluster (up to
//   kDecodeClusterMax): each leaves its normalised partial output and LSE (fp32) in its shared
//   memory, and the cluster merges them by LSE through distributed shared memory, each block
//   finishing a share of the rows: one launch and no scratch memory. Otherwise (more splits,
//   or before sm_90) each split writes its partial state to scratch and decode_combine, a
//   second launch, merges them (on sm_90 as a programmatic dependent, resident while the
//   splits finish). Either way the splits are merged in split order, so the result depends
//   only on the problem and the device.
// - Independent warps. Inside the block every warp streams its own key tiles (tile t goes to
//   warp t mod WARPS) through its own ring of STAGES cp.async buffers, with no block-wide
//   barrier until the end, where the warps' states are merged in shared memory. Each warp keeps
//   STAGES - 1 tiles in flight while it computes one, which is what covers HBM latency.
//
// - A KV-cache call's append in the same launch. The warp whose tile holds a new row writes
//   it (rotated keys, values: append.cuh) into the cache before it copies that tile, so no
//   block waits for another; blocks of the same KV head that read the same rows write the
//   same bits there. The new rows that no block reads (outside every row's band) are shared
//   out among the first row block's splits. q is rotated in shared memory as it is loaded.
//   One launch where an append kernel, a q rotation kernel and a copy of q came first.
//
// The tile math (S = Q Kᵀ, online softmax, O += P V) is the prefill kernel's (fwd_tile.cuh);
// here every key tile is one warp's BLOCK_N keys against all the block's packed rows.
#include "append.cuh"
#include "fwd_tile.cuh"

template <int HEAD_DIM, int ROW_PITCH, int M_TILES, int WARPS, int BLOCK_N, int STAGES,
          bool Q_IN_REGS>
struct DecodeConfig {
    static_assert(HEAD_DIM % 16 == 0 && HEAD_DIM <= 256, "head_dim must be a multiple of 16");
    static_assert(BLOCK_N % 16 == 0, "key tiles are whole mma k-steps");
    static_assert(STAGES >= 2, "one tile computed while the next one loads");
    static constexpr int kHeadDim = HEAD_DIM;
    static constexpr int kMTiles = M_TILES;
    static constexpr int kRows = 16 * M_TILES;  // packed rows of a block
    static constexpr int kWarps = WARPS;
    static constexpr int kThreads = WARPS * 32;
    static constexpr int kBlockN = BLOCK_N;
    static constexpr int kStages = STAGES;
    static constexpr bool kQInRegs = Q_IN_REGS;
    // Shared rows ROW_PITCH elements apart: HEAD_DIM (swizzled, each copy's quarter warp
    // fills one 128-byte line) where rows pack 128-byte lines, else padded (smem_rows.cuh; the
    // host's DecodeTile::row_pitch chooses).
    using Rows = typename RowsFor<HEAD_DIM, ROW_PITCH>::type;
    static constexpr int kRowPitch = Rows::kPitch;
    static constexpr int kChunksPerRow = HEAD_DIM / 8;
    static constexpr int kSTiles = BLOCK_N / 8;
    static constexpr int kOTiles = HEAD_DIM / 8;
    static constexpr int kStageElems = 2 * BLOCK_N * kRowPitch;  // one K and one V tile
    static constexpr int kSmemElems = kRows * kRowPitch + WARPS * STAGES * kStageElems;
    // The closing merge reuses the buffers: each warp's O rows and its rows' max and sum, then
    // the block's rows' LSEs (read by the cluster's merge).
    static constexpr int kMergeFloats = WARPS * kRows * (HEAD_DIM + 2) + kRows;
    static_assert(kMergeFloats * 4 <= kSmemElems * 2, "the warps' merge fits in the buffers");
};

// Row of query i of head h of batch entry b in the split's partials: [num_splits, batch,
// heads_q, seqlen_q] (the outputs' rows have head_dim_v floats).
__device__ __forceinline__ int64_t decode_partial_row(const FwdParams& p, int split, int b, int h,
                                                      int i) {
    return (((int64_t)split * p.batch + b) * p.heads_q + h) * p.seqlen_q + i;
}

// Where packed row r of a block lies: its query row and head, or `valid` false past the end.
struct PackedRow {
    int i, h;
    bool valid;
};

__device__ __forceinline__ PackedRow packed_row(const FwdParams& p, const Seq& s, int hk, int r) {
    PackedRow row;
    row.i = r / p.group;
    row.h = hk * p.group + r % p.group;
    row.valid = row.i < s.seqlen_q;
    return row;
}

// Eight finished columns from `col` of packed row `pr` into the output (columns past
// head_dim_v, a padded tile's, are not written), and the row's LSE with its first columns.
template <typename T>
__device__ __forceinline__ void store_decoded(const FwdParams& p, const Seq& s, int b,
                                              const PackedRow& pr, int col, const float (&x)[8],
                                              float lse) {
    uint16_t* out_row = (uint16_t*)p.out + row_offset(p.o_stride, b, s.q_row0 + pr.i, pr.h);
    uint4 v;
    v.x = Convert<T>::pack(x[0], x[1]);
    v.y = Convert<T>::pack(x[2], x[3]);
    v.z = Convert<T>::pack(x[4], x[5]);
    v.w = Convert<T>::pack(x[6], x[7]);
    if (col < p.head_dim_v) *(uint4*)(out_row + col) = v;
    if (col == 0 && p.lse != nullptr) p.lse[lse_offset(p.lse_stride, b, pr.h, s.q_row0 + pr.i)] = lse;
}

// The new rows of a KV-cache call that no split of this row block reads (outside its keys
// [skip_lo, skip_hi), as new-row indices: past every row's band, or all of them where the
// sequence's q has no rows), shared out among the first row block's splits: every
// `shares`-th from `share`, one warp a row. Nothing here is read by this block, so nothing
// waits for these writes.
template <int WARPS>
__device__ __forceinline__ void append_unread_rows(const FwdParams& p, const AppendRows& a,
                                                   int b, int hk, int skip_lo, int skip_hi,
                                                   int share, int shares) {
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    for (int i = share + warp * shares; i < a.seqlen_new; i += WARPS * shares)
        if (i < skip_lo || i >= skip_hi) append_row(p, a, b, i, hk, lane);
}

// The block's packed q rows rotated in place in shared memory (each thread one pair of
// elements of a row), at their positions (q_position): the bits kv_rotate_q writes.
template <typename T, typename Rows, int THREADS>
__device__ __forceinline__ void rotate_packed_q(const FwdParams& p, const AppendRows& a,
                                                const Seq& s, int b, int hk, int r0,
                                                int rows_here, uint16_t* sQ) {
    const int half = a.rotary_dim / 2;
    for (int idx = threadIdx.x; idx < rows_here * half; idx += THREADS) {
        const int r = idx / half;
        const int j = idx % half;
        // The pair's first element; its partner follows.
        const int e = a.interleaved ? 2 * j : j;
        const RotaryPair pr = rotary_pair(a, e);
        const RotaryPair partner = rotary_pair(a, pr.partner);
        uint16_t* x_at = (uint16_t*)((char*)sQ + Rows::offset(r, e / 8)) + e % 8;
        uint16_t* y_at = (uint16_t*)((char*)sQ + Rows::offset(r, pr.partner / 8)) + pr.partner % 8;
        const float x = Convert<T>::load(x_at, 0), y = Convert<T>::load(y_at, 0);
        const int row = rotary_row(a, q_position(p, a, b, packed_row(p, s, hk, r0 + r).i));
        Convert<T>::store(x_at, 0, rotated(a, x, y, pr, row));
        Convert<T>::store(y_at, 0, rotated(a, y, x, partner, row));
    }
}

// The splits of a cluster merged by LSE in split order (block rank = split), each block
// finishing an equal share of the rows' 8-column chunks: every split's normalised rows (`sO`,
// D floats apart) and LSEs (`sLse`) lie in its shared memory. The weights and sums are the
// combine's (decode_combine), so a split that saw no key weighs exactly 0 and a NaN is kept.
template <typename T, int D, int THREADS>
__device__ __forceinline__ void merge_cluster_splits(const FwdParams& p, const Seq& s, int b,
                                                     int hk, int r0, int rows_here,
                                                     const float* sO, const float* sLse) {
    cluster_sync();  // every split's rows written and visible
    const int n = (int)cluster_blocks();
    const int rank = (int)cluster_rank();
    const int chunks = rows_here * (D / 8);
    const int lo = rank * chunks / n, hi = (rank + 1) * chunks / n;
    for (int c = lo + threadIdx.x; c < hi; c += THREADS) {
        const int rr = c / (D / 8);
        const int col = (c % (D / 8)) * 8;
        float lse[kDecodeClusterMax];
        LseMax mx;
#pragma unroll
        for (int k = 0; k < kDecodeClusterMax; ++k) {
            lse[k] = k < n ? cluster_load(cluster_map(smem_addr(sLse + rr), k)) : -UFA_INF;
            mx.add(lse[k]);
        }
        const float m = mx.value();
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        float sum = 0.f;
#pragma unroll
        for (int k = 0; k < kDecodeClusterMax; ++k) {
            const float w = lse_weight(lse[k], m);
            if (k >= n || w == 0.f) continue;  // no split, or one that saw no key
            sum += w;
            const uint32_t at = cluster_map(smem_addr(sO + rr * D + col), k);
            const float4 x0 = cluster_load4(at), x1 = cluster_load4(at + 16);
            acc[0] += w * x0.x, acc[1] += w * x0.y, acc[2] += w * x0.z, acc[3] += w * x0.w;
            acc[4] += w * x1.x, acc[5] += w * x1.y, acc[6] += w * x1.z, acc[7] += w * x1.w;
        }
        const bool none = m == -UFA_INF;
        const float inv = none ? 0.f : 1.f / sum;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] *= inv;
        store_decoded<T>(p, s, b, packed_row(p, s, hk, r0 + rr), col, acc,
                         none ? -UFA_INF : m + logf(sum));
    }
    cluster_sync();  // no block leaves while another still reads its shared memory
}

// PAGED (with SEQS): K and V rows are found through a block table, a compile-time choice so that
// the other variants' loads stay a plain stride apart.
template <typename T, typename Cfg, bool SCORE_MOD, bool SEQS, bool PAGED>
__device__ __forceinline__ void fwd_decode(const DecodeParams& dp) {
    static_assert(!PAGED || SEQS, "a paged cache is sequence metadata");
    static_assert(!PAGED || Cfg::kBlockN <= 32, "one lane looks up each row's page");
    constexpr int D = Cfg::kHeadDim;
    constexpr int BN = Cfg::kBlockN;
    constexpr int PITCH = Cfg::kRowPitch;
    constexpr int MT = Cfg::kMTiles;
    constexpr int W = Cfg::kWarps;
    constexpr int STAGES = Cfg::kStages;
    const FwdParams& p = dp.f;
    using Rows = typename Cfg::Rows;
    // 128-byte aligned: a swizzled row's lines are the copies' lines.
    extern __shared__ __align__(128) uint16_t smem[];
    uint16_t* sQ = smem;

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int group = lane / 4;
    const int quad = lane % 4;
    const int split = blockIdx.x;
    const int hk = blockIdx.y / dp.row_blocks;
    const int r0 = (blockIdx.y % dp.row_blocks) * Cfg::kRows;  // first packed row
    const int b = blockIdx.z;
    const Seq s = seq_for<SEQS>(p, b);
    const int rows = s.seqlen_q * p.group;
    // A KV-cache call's new rows (append.cuh); only calls with sequence metadata append.
    const bool appends = SEQS && dp.append.k_new != nullptr;
    const bool first_row_block = blockIdx.y % dp.row_blocks == 0;
    if (r0 >= rows) {
        // Rows past this sequence's end (the whole block, or cluster, leaves), but the first
        // row block's splits still write their share of the new rows.
        if (appends && first_row_block)
            append_unread_rows<W>(p, dp.append, b, hk, 0, 0, split, dp.num_splits);
        return;
    }
    const int rows_here = min(Cfg::kRows, rows - r0);

    // The keys some row of the block sees, cut into tiles of BN from key_lo; this split's
    // tiles are [t_begin, t_end).
    int key_lo, key_hi;
    const int i_first = r0 / p.group, i_last = (r0 + rows_here - 1) / p.group;
    band_of_rows(p, s, i_first, i_last, key_lo, key_hi);
    const int tiles = key_hi > key_lo ? (key_hi - key_lo + BN - 1) / BN : 0;
    const int per_split = (tiles + dp.num_splits - 1) / dp.num_splits;
    const int t_begin = min(split * per_split, tiles);
    const int t_end = min(t_begin + per_split, tiles);

    // A KV-cache call's new rows among this split's keys [read_lo, read_hi) (new-row indices
    // from `base`, the sequence's cached keys): each is written by the warp whose tile holds
    // it, before that warp copies the tile (the copies read through L2; the fence and
    // __syncwarp order the lanes' stores before them). The other warps never wait for it, and
    // the writer waits for its loads of the new rows while its ring fills where the tile is
    // not among its first STAGES - 1 (a decoding step's new key is in the last tile). H100,
    // bf16, d128, a step appending one key over the same call without an append: +1.4 to
    // +5.8 µs at 8-32 sequences of 1k-8k keys; +2.5 to +6.2 with the writes ahead of the
    // ring; +8 with every warp of the block waiting at a barrier for them; +6.4 to +7.2 with
    // the append kernel launched first (bench/results/decode_kvcache_step_2026-12-07_h100.md).
    int64_t base = 0;
    int read_lo = 0, read_hi = 0;
    if (appends) {
        base = append_base(p, b);
        const int n = dp.append.seqlen_new;
        const auto new_row = [&](int64_t key) {
            return (int)min(max(key - base, (int64_t)0), (int64_t)n);
        };
        if (first_row_block)
            append_unread_rows<W>(p, dp.append, b, hk, new_row(key_lo), new_row(key_hi), split,
                                  dp.num_splits);
        read_lo = new_row(key_lo + (int64_t)t_begin * BN);
        read_hi = new_row(min((int64_t)key_lo + (int64_t)t_end * BN, (int64_t)key_hi));
    }
    // This warp's new rows in its first STAGES - 1 tiles (`ring_fill`) or in the later ones.
    const auto append_warp_rows = [&](bool ring_fill) {
        for (int i = read_lo; i < read_hi; ++i) {
            const int k = (int)((base + i - key_lo) / BN) - t_begin;  // tile k of the split
            if (k % W == warp && (k / W < STAGES - 1) == ring_fill)
                append_row(p, dp.append, b, i, hk, lane);
        }
        __threadfence_block();
        __syncwarp();
    };
    if (appends) append_warp_rows(true);

    // The thread's rows: `group` and `group + 8` of each m-tile.
    PackedRow prow[MT][2];
    float slope[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            prow[mt][e] = packed_row(p, s, hk, r0 + mt * 16 + e * 8 + group);
            slope[mt][e] = SCORE_MOD && prow[mt][e].valid ? alibi_slope(p, b, prow[mt][e].h) : 0.f;
        }

    float o[MT][Cfg::kOTiles][4];
    zero_tiles(o);
    SoftmaxRow row[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) row[mt][0].init(), row[mt][1].init();

    // 16-byte chunks of a row that hold data: a head dim below D (whole chunks, the host's
    // rule) runs on this tile with zeros after it.
    const int valid_chunks = p.head_dim / 8;
    if (t_begin < t_end) {
        // Q: every packed row from its own head's row (zeros past the end).
        load_rows<Cfg::kThreads, Cfg::kChunksPerRow, Cfg::kRows>(
            (const uint16_t*)p.q,
            [&](int r) {
                const PackedRow pr = packed_row(p, s, hk, r0 + r);
                return row_offset(p.q_stride, b, s.q_row0 + pr.i, pr.h);
            },
            [&](int r, int chunk) { return smem_addr(sQ) + Rows::offset(r, chunk); }, 0, rows_here,
            valid_chunks);
        cp_async_commit();

        uint16_t* ring = smem + Cfg::kRows * PITCH + warp * STAGES * Cfg::kStageElems;
        const uint16_t* k_head =
            (const uint16_t*)p.k + row_offset(p.k_stride, s.kv_batch, s.kv_row0, hk);
        const uint16_t* v_head =
            (const uint16_t*)p.v + row_offset(p.v_stride, s.kv_batch, s.kv_row0, hk);
        // Tile t of this warp into ring stage `stage`: K rows then V rows, one commit group,
        // each copy instruction two whole rows. Rows past the end of the keys become zeros.
        // In a paged cache lane r works out row r's K and V offsets once (its page lookup
        // included) and the lanes copying that row's chunks take them by shuffle: a lookup
        // shared by shuffle with the offsets' 64-bit products worked out per chunk read pages
        // of 16 rows at 61% of the bandwidth, against 78–83% so (H200, batch 32, d128, 4 × 32
        // tiles; bench/results/decode_paged_2026-12-05_h200.md). Copies of 16 rows × 32 bytes
        // each, one address per row, were slower still, dense ones too (62% against 92%): the
        // L2 takes a request per row, so whole 128-byte lines a request are what it serves
        // fastest.
        // Whole tiles (every row below key_hi, every chunk data; in a paged cache, rows of one
        // page) take a shorter path where a copy instruction covers whole rows (32 lanes a
        // multiple of a row's chunks: head dims 32, 64, 128 and 256): each lane's offset
        // within a tile is worked out once, a tile's base once (one block-table entry for all
        // lanes when paged), and its copies step by a row stride. The general path below spent
        // about 35 integer instructions a copy on offsets, bounds and predicates (SASS of the
        // d128 tile, 3 with this path); with one warp a scheduler they delayed the copies that
        // keep HBM busy.
        constexpr int CPR = Cfg::kChunksPerRow;
        constexpr bool kWholeRows = 32 % CPR == 0;
        constexpr int kRowsPerCopy = kWholeRows ? 32 / CPR : 1;
        auto load_kv = [&](int t, int stage) {
            uint16_t* sK = ring + stage * Cfg::kStageElems;
            uint16_t* sV = sK + BN * PITCH;
            const int n0 = key_lo + t * BN;
            if constexpr (kWholeRows) {
                const uint16_t* ks = nullptr;
                const uint16_t* vs = nullptr;
                if (n0 + BN <= key_hi && valid_chunks == CPR) {
                    if constexpr (PAGED) {
                        const int page_rows = 1 << p.page_shift;
                        const int page = (n0 & (page_rows - 1)) + BN <= page_rows
                                             ? paged_page(p, b, n0)
                                             : -1;
                        if (page >= 0) {
                            ks = (const uint16_t*)p.k + page_row(p, page, n0, p.k_stride, hk);
                            vs = (const uint16_t*)p.v + page_row(p, page, n0, p.v_stride, hk);
                        }
                    } else {
                        ks = k_head + (int64_t)n0 * p.k_stride[1];
                        vs = v_head + (int64_t)n0 * p.v_stride[1];
                    }
                }
                if (ks != nullptr) {
                    // Worked out per tile rather than held across the loop: registers are
                    // what the tile math is short of.
                    const int64_t k_step = (int64_t)kRowsPerCopy * p.k_stride[1];
                    const int64_t v_step = (int64_t)kRowsPerCopy * p.v_stride[1];
                    ks += (int64_t)(lane / CPR) * p.k_stride[1] + (lane % CPR) * 8;
                    vs += (int64_t)(lane / CPR) * p.v_stride[1] + (lane % CPR) * 8;
                    // The lane's row lane / CPR of each copy's kRowsPerCopy (a power of two).
                    const uint32_t lane_dst = Rows::offset(lane / CPR, lane % CPR);
                    const uint32_t dk = smem_addr(sK);
                    const uint32_t dv = smem_addr(sV);
#pragma unroll
                    for (int it = 0; it < BN / kRowsPerCopy; ++it) {
                        const uint32_t at = Rows::step(lane_dst, it * kRowsPerCopy);
                        cp_async_16_whole(dk + at, ks);
                        cp_async_16_whole(dv + at, vs);
                        ks += k_step;
                        vs += v_step;
                    }
                    return;
                }
            }
            int64_t my_k = -1, my_v = -1;
            if constexpr (PAGED) {
                if (lane < BN && n0 + lane < key_hi) {
                    const int page = paged_page(p, b, n0 + lane);
                    if (page >= 0) {
                        my_k = page_row(p, page, n0 + lane, p.k_stride, hk);
                        my_v = page_row(p, page, n0 + lane, p.v_stride, hk);
                    }
                }
            }
            constexpr int kChunks = BN * Cfg::kChunksPerRow;
#pragma unroll
            for (int it = 0; it < kChunks / 32; ++it) {
                const int c = lane + it * 32;
                const int r = c / Cfg::kChunksPerRow;
                const int chunk = c % Cfg::kChunksPerRow;
                const int j = n0 + r;
                int64_t k_off = -1, v_off = -1;
                if constexpr (PAGED) {
                    k_off = __shfl_sync(0xffffffffu, my_k, r);
                    v_off = __shfl_sync(0xffffffffu, my_v, r);
                } else if (j < key_hi) {
                    k_off = (int64_t)j * p.k_stride[1];
                    v_off = (int64_t)j * p.v_stride[1];
                }
                if (chunk >= valid_chunks) k_off = v_off = -1;  // the padding columns: zeros
                const uint16_t* kb = PAGED ? (const uint16_t*)p.k : k_head;
                const uint16_t* vb = PAGED ? (const uint16_t*)p.v : v_head;
                cp_async_16_to(smem_addr(sK) + Rows::offset(r, chunk),
                               kb + (k_off >= 0 ? k_off + chunk * 8 : 0), k_off >= 0 ? 16 : 0);
                cp_async_16_to(smem_addr(sV) + Rows::offset(r, chunk),
                               vb + (v_off >= 0 ? v_off + chunk * 8 : 0), v_off >= 0 ? 16 : 0);
            }
        };

        // This warp's tiles: t_begin + warp, + W, ...; the ring's first STAGES - 1 fills.
        const int my_tiles = t_begin + warp < t_end ? (t_end - t_begin - warp + W - 1) / W : 0;
#pragma unroll
        for (int st = 0; st < STAGES - 1; ++st) {
            if (st < my_tiles) load_kv(t_begin + warp + st * W, st);
            cp_async_commit();  // empty groups keep the count uniform for the waits below
        }
        if (appends) append_warp_rows(false);  // while the ring fills
        // Q landed (the oldest group) for every warp.
        cp_async_wait<STAGES - 1>();
        __syncthreads();
        if (appends && dp.append.cos != nullptr) {
            rotate_packed_q<T, Rows, Cfg::kThreads>(p, dp.append, s, b, hk, r0, rows_here, sQ);
            __syncthreads();
        }

        const typename Rows::Lane q_lane = Rows::lane(smem_addr(sQ), lane % 16, lane / 16);
        uint32_t q_frag[Cfg::kQInRegs ? MT : 1][Cfg::kQInRegs ? D / 16 : 1][4];
        if constexpr (Cfg::kQInRegs) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int kk = 0; kk < D / 16; ++kk)
                    ldmatrix_x4(q_frag[mt][kk], q_lane.at(kk * 2) + mt * 16 * Rows::kRowBytes);
        }
        const float score_scale = SCORE_MOD ? 1.f : p.scale_log2;

        for (int it = 0; it < my_tiles; ++it) {
            const int stage = it % STAGES;
            cp_async_wait<STAGES - 2>();  // tile `it` landed (this lane's copies)
            __syncwarp();                 // ... every lane's; and every lane is done with stage it-1
            {
                const int next = it + STAGES - 1;
                if (next < my_tiles) load_kv(t_begin + warp + next * W, next % STAGES);
                cp_async_commit();
            }
            const int n0 = key_lo + (t_begin + warp + it * W) * BN;
            const typename Rows::Lane k_lane = Rows::lane(
                smem_addr(ring + stage * Cfg::kStageElems), lane % 8 + (lane / 16) * 8, (lane / 8) % 2);
            const typename Rows::Lane v_lane =
                Rows::lane(smem_addr(ring + stage * Cfg::kStageElems + BN * PITCH),
                           lane % 8 + ((lane / 8) % 2) * 8, lane / 16);

            // S = Q K[n]ᵀ
            float sc[MT][Cfg::kSTiles][4];
            tile_qk<T, D, MT, Cfg::kSTiles, Rows, Cfg::kQInRegs>(sc, q_frag, q_lane, k_lane);

            // Keys outside a row's band or past the end are hidden; modifiers per row's head.
            const bool visible = tile_visible(p, s, i_first, i_last, n0, BN) && n0 + BN <= key_hi;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                mask_row_scores<SCORE_MOD, Cfg::kSTiles>(
                    p, s, n0, quad, b, visible,
                    [&](int e) -> MaskRow {
                        const PackedRow& pr = prow[mt][e];
                        return MaskRow{pr.i, pr.h, slope[mt][e], pr.valid};
                    },
                    [&](int t, int e) -> float& { return sc[mt][t][e]; });

            tile_softmax(sc, o, row, score_scale);
            tile_pv<T, MT, Cfg::kSTiles, Cfg::kOTiles, Rows>(sc, o, v_lane);
        }
        cp_async_wait<0>();  // no copy may land in the buffers the merge below reuses
    }
    // The combine (a programmatic dependent on sm_90) may be scheduled from here on; it waits
    // for this grid's completion before it reads the partials.
    pdl_launch_dependents();

    // The warps' states merged in shared memory: each warp's unnormalised O rows, row maxima
    // and sums, then every thread finishes 8 columns of a row at a time.
    __syncthreads();
    float* sO = (float*)smem;                        // [W][kRows][D]
    float* sMax = sO + W * Cfg::kRows * D;           // [W][kRows]
    float* sSum = sMax + W * Cfg::kRows;             // [W][kRows]
    float* sLse = sSum + W * Cfg::kRows;             // [kRows], a cluster merge's
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int rr = mt * 16 + r * 8 + group;
            float sum = row[mt][r].sum;
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            if (quad == 0) {
                sMax[warp * Cfg::kRows + rr] = row[mt][r].max;
                sSum[warp * Cfg::kRows + rr] = sum;
            }
            float* dst = sO + (warp * Cfg::kRows + rr) * D + quad * 2;
#pragma unroll
            for (int t = 0; t < Cfg::kOTiles; ++t)
                *(float2*)(dst + t * 8) = make_float2(o[mt][t][2 * r], o[mt][t][2 * r + 1]);
        }
    __syncthreads();

    const bool one_split = dp.num_splits == 1;
    const bool in_cluster = !one_split && dp.cluster_merge != 0;
    for (int c = threadIdx.x; c < rows_here * (D / 8); c += Cfg::kThreads) {
        const int rr = c / (D / 8);
        const int col = (c % (D / 8)) * 8;
        // The row's maximum over the warps, and each warp's weight: 0 for a warp that saw no
        // visible key (max -inf, sum 0), NaN for one whose scores were all NaN (max -inf, sum
        // NaN), so that a NaN is never hidden.
        SoftmaxRow total;
        total.init();
#pragma unroll
        for (int w = 0; w < W; ++w) total.max = fmaxf(total.max, sMax[w * Cfg::kRows + rr]);
        float wt[W];
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < W; ++w) {
            const float m = sMax[w * Cfg::kRows + rr];
            const float ws = sSum[w * Cfg::kRows + rr];
            wt[w] = m != -UFA_INF ? fast_exp2(m - total.max) : (ws == 0.f ? 0.f : ws);
            sum += wt[w] * ws;
        }
        const float inv = total.inv_sum(sum);
        float x[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            float acc = 0.f;
#pragma unroll
            for (int w = 0; w < W; ++w) acc += wt[w] * sO[(w * Cfg::kRows + rr) * D + col + e];
            x[e] = acc * inv;
        }
        const PackedRow pr = packed_row(p, s, hk, r0 + rr);
        // Columns past head_dim_v (a padded tile) are not written; partial rows are head_dim_v
        // floats long, as decode_combine reads them.
        const bool col_ok = col < p.head_dim_v;
        if (one_split) {
            store_decoded<T>(p, s, b, pr, col, x, total.lse(sum));
        } else if (in_cluster) {
            // Over warp 0's copy of the same columns, which no other thread reads.
            float* dst = sO + rr * D + col;
            *(float4*)dst = make_float4(x[0], x[1], x[2], x[3]);
            *(float4*)(dst + 4) = make_float4(x[4], x[5], x[6], x[7]);
            if (col == 0) sLse[rr] = total.lse(sum);
        } else {
            const int64_t at = decode_partial_row(p, split, b, pr.h, pr.i);
            float* dst = dp.o_part + at * p.head_dim_v + col;
            if (col_ok) {
                *(float4*)dst = make_float4(x[0], x[1], x[2], x[3]);
                *(float4*)(dst + 4) = make_float4(x[4], x[5], x[6], x[7]);
            }
            if (col == 0) dp.lse_part[at] = total.lse(sum);
        }
    }
    if (in_cluster) merge_cluster_splits<T, D, W * 32>(p, s, b, hk, r0, rows_here, sO, sLse);
}

// The split partials merged by LSE: one warp per (batch, head, query row), the splits in
// order, so the result is the same on every run. Each lane owns 4 adjacent columns (one 16-byte
// load per split) and the split loop is unrolled, so that many loads are in flight at once: a
// loop of dependent loads, one L2 round trip per split and column, took longer than the
// attention itself at one sequence (H200, 2026-12-04).
__device__ __forceinline__ void decode_combine(const DecodeParams& dp) {
    const FwdParams& p = dp.f;
    __shared__ float weights[kRowWarps][kDecodeMaxSplits];
    // Launched as the split kernel's programmatic dependent (sm_90): its blocks may be resident
    // before the partials are written.
    pdl_wait();
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int i = blockIdx.x * kRowWarps + warp;
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    const Seq s = seq_of(p, b);
    if (i >= s.seqlen_q) return;
    const int n = min(dp.num_splits, kDecodeMaxSplits);
    const int64_t row0 = decode_partial_row(p, 0, b, h, i);
    const int64_t split_stride = decode_partial_row(p, 1, b, h, i) - row0;
    LseMax mx;
    for (int k = lane; k < n; k += 32) mx.add(dp.lse_part[row0 + k * split_stride]);
    const float m = mx.warp_value();
    float sum = 0.f;
    for (int k = lane; k < n; k += 32) {
        const float w = lse_weight(dp.lse_part[row0 + k * split_stride], m);
        weights[warp][k] = w;
        sum += w;
    }
    sum = warp_sum(sum);
    __syncwarp();
    const bool none = m == -UFA_INF;
    const float inv = none ? 0.f : 1.f / sum;
    const int64_t out_at = row_offset(p.o_stride, b, s.q_row0 + i, h);
    const int dim = p.head_dim_v;  // a multiple of 8 (the decoding kernel's head dims)
    for (int col = lane * 4; col < dim; col += 128) {
        const float* src = dp.o_part + row0 * dim + col;
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 8
        for (int k = 0; k < n; ++k) {
            const float w = weights[warp][k];
            const float4 x = *(const float4*)(src + k * split_stride * dim);
            // A split that saw no key weighs exactly 0, whatever its row holds.
            acc[0] += w != 0.f ? w * x.x : 0.f;
            acc[1] += w != 0.f ? w * x.y : 0.f;
            acc[2] += w != 0.f ? w * x.z : 0.f;
            acc[3] += w != 0.f ? w * x.w : 0.f;
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) store_as(p.out, out_at + col + e, dp.dtype_out, acc[e] * inv);
    }
    if (lane == 0 && p.lse != nullptr)
        p.lse[lse_offset(p.lse_stride, b, h, s.q_row0 + i)] =
            none ? -UFA_INF : m + logf(sum);
}
