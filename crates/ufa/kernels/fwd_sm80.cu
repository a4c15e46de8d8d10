// Forward attention on tensor cores (mma.sync, sm_80+), FlashAttention-2 style: m16n8k16 for
// f16/bf16, m16n8k8 TF32 for fp32 (three products per product for fp32 accuracy, or one in
// the opt-in TF32 mode; fwd_tile.cuh).
//
// One thread block owns BLOCK_M query rows of one (batch, head); each warp owns one or two
// 16-row mma tiles of them (above head dim 256, two warps share each tile, half of the
// columns each: TileConfig).
// K and V tiles of BLOCK_N keys stream through shared memory; S = Q Kᵀ and O += P V run on
// tensor cores with fp32 accumulators, and the softmax is online (running max and sum per row)
// in the log2 domain. Loads overlap compute the FA2 way: V[n] is fetched while S = Q K[n]ᵀ runs,
// and K[n-1] while O += P V[n] runs, so one buffer of each suffices.
//
// Dropout (DROPOUT variants) zeroes the dropped probabilities of each tile after the row sums
// took them (the LSE is that of the probabilities before dropout) and before P V; the keep scale
// multiplies the output at the end.
//
// The host generates each variant's entry point (dtype, head dim, tile sizes, score
// modifiers, sequence metadata, dropout), one module per variant (crates/ufa/src/cuda/variants.rs).
#include "dropout.cuh"
#include "fwd_tile.cuh"
#include "mma.cuh"

// One tile configuration. The host picks the numbers (one table, with reasons, in src/cuda/tiles.rs);
// the asserts reject combinations the code below cannot run.
// ELEM_UNITS: 16-bit units an element takes (2 for fp32), which the shared loaders count in.
//
// Wide head dims (above 256) split the columns between two sets of warps: O's accumulators for
// 16 rows of a 512-column head would take 256 registers a thread, so warp w and warp
// w + WARPS / 2 own the same rows, each half of O's columns. Each sums S = Q Kᵀ over its half
// of the head dim, the two partial sums meet in shared memory (exchange_partial_scores), and
// both then hold the same S, run the same softmax and multiply P by their half of V.
template <int HEAD_DIM, int BLOCK_M, int BLOCK_N, int WARPS, bool Q_IN_REGS, int ELEM_UNITS = 1>
struct TileConfig {
    static constexpr int kHalves = HEAD_DIM > 256 ? 2 : 1;
    static constexpr int kRowWarps = WARPS / kHalves;  // warps that own different rows
    static_assert(WARPS % kHalves == 0, "a wide head dim pairs the warps");
    static_assert(BLOCK_M % (16 * kRowWarps) == 0, "each warp owns whole 16-row mma tiles");
    static_assert(HEAD_DIM % (16 * kHalves) == 0 && HEAD_DIM <= 512,
                  "head_dim must be a multiple of 16 (of 32 above 256), at most 512");
    static_assert(ELEM_UNITS == 1 || (ELEM_UNITS == 2 && !Q_IN_REGS),
                  "fp32 Q is read from shared memory (its TF32 split would not fit registers)");
    static_assert(kHalves == 1 || (ELEM_UNITS == 1 && !Q_IN_REGS),
                  "wide head dims: 16-bit elements, Q read from shared memory");
    static_assert(BLOCK_N % 16 == 0, "key tiles are whole mma k-steps");
    static constexpr int kHeadDim = HEAD_DIM;
    // Columns of a warp's share: of the sum over the head dim, and of O.
    static constexpr int kSpanDim = HEAD_DIM / kHalves;
    static constexpr int kBlockM = BLOCK_M;
    static constexpr int kBlockN = BLOCK_N;
    static constexpr int kThreads = WARPS * 32;
    // 16-row tiles per warp: every K/V fragment read from shared memory feeds this many mmas,
    // so two halve the shared-memory traffic per flop (at the price of twice the accumulators).
    static constexpr int kMTiles = BLOCK_M / (16 * kRowWarps);
    static constexpr bool kQInRegs = Q_IN_REGS;
    static constexpr int kElemUnits = ELEM_UNITS;
    // 16 bytes of padding per row put the 8 rows an ldmatrix phase reads on 8 different
    // 16-byte bank groups for every head dim (row pitch mod 128 bytes is an odd multiple of 16).
    // In 16-bit units, as the loaders count; an fp32 row is kRowPitch / 2 floats.
    static constexpr int kRowPitch = HEAD_DIM * ELEM_UNITS + 8;
    static constexpr int kChunksPerRow = HEAD_DIM * ELEM_UNITS / 8;  // 16-byte pieces of a row
    static constexpr int kSTiles = BLOCK_N / 8;         // n8 tiles of S per m-tile
    static constexpr int kOTiles = kSpanDim / 8;        // n8 tiles of O per m-tile
    // The partial scores' exchange (wide head dims): each warp's S accumulators, lane-major.
    static constexpr int kExchangeFloats = kHalves > 1 ? WARPS * kMTiles * kSTiles * 4 * 32 : 0;
    static constexpr int kSmemElems = (BLOCK_M + 2 * BLOCK_N) * kRowPitch + 2 * kExchangeFloats;
};

// Adds the partner warp's partial scores to this warp's (wide head dims): each warp stores its
// accumulators, lane-major so that a warp's stores and loads are conflict-free, and after a
// block barrier adds the other half's. Both warps of a pair then hold the same sums (the
// addition commutes exactly), so their softmax and row sums agree bit for bit. The buffer is
// next written after the main loop's next barrier, which follows every read of this one.
template <typename Cfg, int MT, int S_TILES>
__device__ __forceinline__ void exchange_partial_scores(float (&s)[MT][S_TILES][4], float* buf,
                                                        int warp, int lane) {
    constexpr int kWarpFloats = MT * S_TILES * 4 * 32;
    float* mine = buf + warp * kWarpFloats + lane;
    const float* theirs =
        buf + ((warp + Cfg::kRowWarps) % (2 * Cfg::kRowWarps)) * kWarpFloats + lane;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int t = 0; t < S_TILES; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) mine[((mt * S_TILES + t) * 4 + e) * 32] = s[mt][t][e];
    __syncthreads();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int t = 0; t < S_TILES; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[mt][t][e] += theirs[((mt * S_TILES + t) * 4 + e) * 32];
}

template <typename T, typename Cfg, bool SCORE_MOD, bool SEQS, bool DROPOUT>
__device__ __forceinline__ void fwd_sm80(const FwdParams& p) {
    // The MMAs' extent over the head dim: the whole tile, or a wide one's half (TileConfig).
    constexpr int D = Cfg::kSpanDim;
    constexpr int BM = Cfg::kBlockM;
    constexpr int BN = Cfg::kBlockN;
    constexpr int PITCH = Cfg::kRowPitch;
    extern __shared__ __align__(16) uint16_t smem[];
    uint16_t* sQ = smem;
    uint16_t* sK = sQ + BM * PITCH;
    uint16_t* sV = sK + BN * PITCH;
    float* sX = (float*)(sV + BN * PITCH);  // partial scores (wide head dims)

    const int warp = threadIdx.x / 32;
    const int row_warp = warp % Cfg::kRowWarps;
    const int col0 = warp / Cfg::kRowWarps * D;  // the warp's first column of the head dim
    const int lane = threadIdx.x % 32;
    const int group = lane / 4;  // mma fragment row within 8
    const int quad = lane % 4;   // mma fragment column pair
    constexpr int U = Cfg::kElemUnits;
    const FwdBlock w = fwd_block<SEQS, U>(p, BM, BN);
    // 16-byte chunks of a row that hold data: a head dim below D (a multiple of 16-byte pieces,
    // the host's rule) runs on this tile with zeros after it. Q and K rows have head_dim
    // values, V rows head_dim_v (which may differ: MLA's 192 and 128 run on the 192 tile, V's
    // padding columns coming out of P V as zeros that are not stored).
    const int valid_chunks = p.head_dim * U / 8;
    const int valid_chunks_v = p.head_dim_v * U / 8;
    if (w.idle) return;  // rows past this sequence's end (the whole block leaves)
    const Seq& sq = w.s;
    const int b = w.b, h = w.h, m0 = w.m0, m_last = w.m_last;
    const int n_first = w.n_first, n_last = w.n_last;
    const uint16_t *q_head = w.q, *k_head = w.k, *v_head = w.v;
    // K and V rows of tile n0: a fixed stride apart, or found through a paged cache's block
    // table (a SEQS variant's run-time choice). Offsets in 16-bit units (a missing page's -1
    // stays negative).
    auto load_kv = [&](uint16_t* tile, const uint16_t* head, const void* base,
                       const int64_t(&st)[3], int n0, int chunks) {
        if (SEQS && p.block_table != nullptr) {
            load_rows<Cfg::kThreads, Cfg::kChunksPerRow, BN>(
                (const uint16_t*)base, [&](int j) { return paged_row(p, b, j, st, w.hk) * U; },
                [&](int r, int chunk) { return smem_addr(tile + r * PITCH + chunk * 8); }, n0,
                sq.seqlen_kv, chunks);
        } else {
            load_tile<Cfg, BN>(tile, head, st[1] * U, n0, sq.seqlen_kv, chunks);
        }
    };

    // Rows this thread accumulates: `group` and `group + 8` of each of the warp's m-tiles.
    constexpr int MT = Cfg::kMTiles;
    const int warp_row0 = row_warp * 16 * MT;
    const int row_a = m0 + warp_row0 + group;  // + 16 * mt + 8 * r
    float o[MT][Cfg::kOTiles][4];
    zero_tiles(o);
    SoftmaxRow row[MT][2];  // sums of this thread's columns only until the epilogue
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) row[mt][0].init(), row[mt][1].init();
    const float slope = SCORE_MOD ? alibi_slope(p, b, h) : 0.f;

    if (n_first <= n_last) {
        load_tile<Cfg, BM>(sQ, q_head, p.q_stride[1] * U, m0, sq.seqlen_q, valid_chunks);
        cp_async_commit();
        load_kv(sK, k_head, p.k, p.k_stride, n_last * BN, valid_chunks);
        cp_async_commit();

        uint32_t q_frag[Cfg::kQInRegs ? MT : 1][Cfg::kQInRegs ? D / 16 : 1][4];
        // Per-lane ldmatrix bases (bytes, shared space); the tile loops add constants. fp32
        // (fwd_tile.cuh): Q's 4 matrices are rows 0-7 / 8-15 × floats 0-3 / 4-7, K's the 8 keys
        // × 4 runs of 4 floats, and V is read per float.
        constexpr int FPITCH = PITCH / 2;  // fp32 row pitch in floats
        // (A wide head dim's second half of the warps starts col0 columns in; fp32 has none.)
        const uint32_t q_lane =
            T::is_f32
                ? smem_addr(sQ) + ((warp_row0 + lane % 16) * FPITCH + (lane / 16) * 4) * 4
                : smem_addr(sQ) + ((warp_row0 + lane % 16) * PITCH + (lane / 16) * 8 + col0) * 2;
        const uint32_t k_lane =
            T::is_f32 ? smem_addr(sK) + ((lane % 8) * FPITCH + (lane / 8) * 4) * 4
                      : smem_addr(sK) +
                            ((lane % 8 + (lane / 16) * 8) * PITCH + ((lane / 8) % 2) * 8 + col0) * 2;
        const uint32_t v_lane =
            smem_addr(sV) +
            ((lane % 8 + ((lane / 8) % 2) * 8) * PITCH + (lane / 16) * 8 + col0) * 2;
        const float* v_lane_f32 = (const float*)sV + 2 * quad * FPITCH + group;
        if constexpr (Cfg::kQInRegs) {
            cp_async_wait<1>();
            __syncthreads();
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int kk = 0; kk < D / 16; ++kk)
                    ldmatrix_x4(q_frag[mt][kk], q_lane + (mt * 16 * PITCH + kk * 16) * 2);
        }

        for (int n = n_last; n >= n_first; --n) {
            const int n0 = n * BN;
            cp_async_wait<0>();
            __syncthreads();  // K[n] landed; every warp is done with V[n+1]
            load_kv(sV, v_head, p.v, p.v_stride, n0, valid_chunks_v);
            cp_async_commit();

            // S = Q K[n]ᵀ
            float s[MT][Cfg::kSTiles][4];
            if constexpr (T::is_f32)
                tile_qk_tf32<T, D, MT, Cfg::kSTiles, FPITCH>(s, q_lane, k_lane);
            else
                tile_qk<T, D, MT, Cfg::kSTiles, PaddedRows<PITCH>, Cfg::kQInRegs>(s, q_frag, {q_lane},
                                                                                  {k_lane});
            if constexpr (Cfg::kHalves > 1) exchange_partial_scores<Cfg>(s, sX, warp, lane);

            // Scores to the log2 domain (modifiers) or raw; keys outside the band, past the
            // end, or masked are hidden.
            const bool visible = tile_visible(p, sq, m0, m_last, n0, BN);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                mask_scores<SCORE_MOD, Cfg::kSTiles>(
                    p, sq, row_a + mt * 16, n0, quad, b, h, slope, visible,
                    [&](int t, int e) -> float& { return s[mt][t][e]; });

            // Online softmax: new running max, rescale what was accumulated, P = exp2(S - max).
            tile_softmax(s, o, row, SCORE_MOD ? 1.f : p.scale_log2);
            if constexpr (DROPOUT) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int t = 0; t < Cfg::kSTiles; t += 2)
                        dropout_fwd_tiles(p, (uint32_t)(b * p.heads_q + h), row_a + mt * 16,
                                          n0 + t * 8, quad, s[mt][t], s[mt][t + 1]);
            }

            cp_async_wait<0>();
            __syncthreads();  // V[n] landed; every warp is done with K[n]
            if (n > n_first) {
                load_kv(sK, k_head, p.k, p.k_stride, n0 - BN, valid_chunks);
                cp_async_commit();
            }

            // O += P V[n]
            if constexpr (T::is_f32)
                tile_pv_tf32<T, MT, Cfg::kSTiles, Cfg::kOTiles, FPITCH>(s, o, v_lane_f32);
            else
                tile_pv<T, MT, Cfg::kSTiles, Cfg::kOTiles, PaddedRows<PITCH>>(s, o, {v_lane});
        }
    }

#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r)
            store_fwd_row<T, Cfg::kOTiles>(p, w, row_a + mt * 16 + r * 8, quad, row[mt][r],
                                           [&](int t, float& x, float& y) {
                                               x = o[mt][t][2 * r];
                                               y = o[mt][t][2 * r + 1];
                                               if constexpr (DROPOUT) {
                                                   x *= p.dropout_scale;
                                                   y *= p.dropout_scale;
                                               }
                                           },
                                           col0);
}
