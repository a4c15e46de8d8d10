// Backward attention on tensor cores (mma.sync, sm_80+), FlashAttention-2 style: m16n8k16 for
// f16/bf16, m16n8k8 TF32 for fp32 (three products per product for fp32 accuracy, or one in the
// opt-in TF32 mode; bwd_tf32.cuh).
//
// One thread block owns BLOCK_N keys of one (batch, KV head) and keeps their dK and dV in fp32
// registers. It walks every query block that can see those keys, for every query head of the
// GQA group (so dK/dV are summed over the group without atomics), and per query block:
//   1. Sᵀ = K Qᵀ and dPᵀ = V dOᵀ; Pᵀ = exp2(Sᵀ - LSE) from the forward's LSE (no running max);
//      dSᵀ = Pᵀ ∘ (dPᵀ - D) with D = rowsum(dO ∘ O) from the row kernel (with dropout, the
//      forward's factors Z regenerated: Pᵀ ∘ Z goes on, and dSᵀ = Pᵀ ∘ (Z ∘ dPᵀ - D)). Pᵀ and dSᵀ
//      go to shared memory in the input dtype (fp32 ones with each 8 queries in the order
//      bwd_tf32.cuh reads them).
//   2. dV += Pᵀ dO, dK += dSᵀ Q.
//   3. dQ(block) = dS K, added into an fp32 buffer with red.global.add. Deterministic mode
//      serialises those adds per query block in key-block order with a turn counter, so the
//      sums are bitwise the same on every run.
// Scores are computed transposed (keys are the rows), so that Pᵀ and dSᵀ are stored as the
// row-major A operands of phase 2. Each phase spreads its output over the warps as its own grid
// (BwdTileConfig). The next query block's Q, dO, LSE and D load while this one computes (two
// stages where shared memory allows).
//
// The host generates each variant's entry point (crates/ufa/src/cuda/backward.rs).
#include "bwd_keys.cuh"
#include "bwd_tf32.cuh"
#include "dropout.cuh"

// ELEM_UNITS: 16-bit units an element takes (2 for fp32), which shared memory is counted in.
//
// Head dims above 256 split the gradients' columns in two halves, one a key block (the grid
// has twice the KV heads' rows, KeyBlock::half): dK and dV of a 512-wide head would not fit a
// block's registers. Each block computes Sᵀ and dPᵀ over the whole head dim (they need every
// column) and dK, dV and its share of dQ over its half: 7 products' work for the 5 of one
// block, a price the tensor cores pay easily against the CUDA-core kernel it replaces.
template <int HEAD_DIM, int BLOCK_M, int BLOCK_N, int WARPS, int STAGES, int WN1, int WN2, int WQ3,
          int ELEM_UNITS = 1>
struct BwdTileConfig {
    static constexpr int kHeadDim = HEAD_DIM;
    static constexpr int kHalves = HEAD_DIM > 256 ? 2 : 1;
    static constexpr int kSpan = HEAD_DIM / kHalves;  // the gradients' columns of a block
    static_assert(kHalves == 1 || ELEM_UNITS == 1, "wide head dims: 16-bit elements");
    static constexpr int kBlockM = BLOCK_M;
    static constexpr int kBlockN = BLOCK_N;
    static constexpr int kThreads = WARPS * 32;
    static constexpr int kStages = STAGES;
    static constexpr int kElemUnits = ELEM_UNITS;
    // Rows padded by 16 bytes (see TileConfig: conflict-free ldmatrix). fp32 rows are then
    // HEAD_DIM + 4 and BLOCK_M + 4 floats, ≡ 4 mod 32 as bwd_tf32.cuh's loads need.
    static constexpr int kRowPitch = HEAD_DIM * ELEM_UNITS + 8;
    static constexpr int kChunksPerRow = HEAD_DIM * ELEM_UNITS / 8;
    static constexpr int kPPitch = BLOCK_M * ELEM_UNITS + 8;  // Pᵀ and dSᵀ rows
    // Each phase tiles its output over the warps as a grid (rows x columns); a warp's share is
    // a block of whole 16-row m-tiles and 16-column pairs of n8 tiles. Square-ish shares read
    // fewer fragments from shared memory per mma.
    // Phase 1, Sᵀ and dPᵀ [BLOCK_N x BLOCK_M]: WN1 x (WARPS / WN1).
    static constexpr int kMT1 = BLOCK_N / WN1 / 16;
    static constexpr int kCols1 = BLOCK_M / (WARPS / WN1);
    // Phase 2, dK and dV [BLOCK_N x HEAD_DIM]: WN2 x (WARPS / WN2).
    static constexpr int kMT2 = BLOCK_N / WN2 / 16;
    static constexpr int kCols2 = kSpan / (WARPS / WN2);
    // Phase 3, dQ [BLOCK_M x HEAD_DIM]: WQ3 x (WARPS / WQ3).
    static constexpr int kMT3 = BLOCK_M / WQ3 / 16;
    static constexpr int kCols3 = kSpan / (WARPS / WQ3);
    static_assert(WARPS % WN1 == 0 && WARPS % WN2 == 0 && WARPS % WQ3 == 0, "warp grids");
    static_assert(kMT1 * WN1 * 16 == BLOCK_N && kMT2 * WN2 * 16 == BLOCK_N &&
                      kMT3 * WQ3 * 16 == BLOCK_M && kMT1 > 0 && kMT2 > 0 && kMT3 > 0,
                  "warp rows are whole m-tiles");
    static_assert(kCols1 % 16 == 0 && kCols2 % 16 == 0 && kCols3 % 16 == 0 &&
                      kCols1 * (WARPS / WN1) == BLOCK_M && kCols2 * (WARPS / WN2) == kSpan &&
                      kCols3 * (WARPS / WQ3) == kSpan,
                  "warp columns are pairs of n8 tiles");
    static_assert(STAGES == 1 || STAGES == 2, "one or two Q/dO buffers");
    static_assert(BLOCK_M / 2 <= kThreads, "the LSE and D loads take a thread per 16 bytes");
    static_assert(ELEM_UNITS == 1 || (HEAD_DIM % 32 == 0 && BLOCK_M % 32 == 0),
                  "fp32 row pitches are 4 mod 32 floats");
    // 16-bit units of the operand part of shared memory; fp32 LSE and D follow.
    static constexpr int kSmemElems =
        2 * BLOCK_N * kRowPitch + STAGES * 2 * BLOCK_M * kRowPitch + 2 * BLOCK_N * kPPitch;
};

template <typename T, typename Cfg, bool SCORE_MOD, bool SEQS, bool DROPOUT>
__device__ __forceinline__ void bwd_sm80(const BwdParams& bp) {
    const FwdParams& p = bp.f;
    constexpr int D = Cfg::kHeadDim;
    constexpr int BM = Cfg::kBlockM;
    constexpr int BN = Cfg::kBlockN;
    constexpr int PITCH = Cfg::kRowPitch;
    constexpr int PP = Cfg::kPPitch;
    constexpr int U = Cfg::kElemUnits;
    static_assert(T::is_f32 == (U == 2), "fp32 takes two 16-bit units an element");
    constexpr int FP = PITCH / 2, FPP = PP / 2;  // fp32 row pitches in floats
    extern __shared__ __align__(16) uint16_t smem[];
    uint16_t* sK = smem;
    uint16_t* sV = sK + BN * PITCH;
    uint16_t* sQ0 = sV + BN * PITCH;  // stage s: Q at sQ0 + s * 2 * BM * PITCH, dO after it
    uint16_t* sP = sQ0 + Cfg::kStages * 2 * BM * PITCH;
    uint16_t* sdS = sP + BN * PP;
    float* sStat = (float*)(sdS + BN * PP);  // stage s: LSE (log2) at s * 2 * BM, D after it

    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;
    const int group = lane / 4;
    const int quad = lane % 4;
    // Deterministic mode adds into each dQ block in descending key-block order and launches the
    // key blocks in that order too (key_block), so a block only ever waits for one launched
    // before it. With a causal band the wait then points to a block that started on the same
    // query block at the same time; ascending order would chain every block to the first one
    // (2x slower). Without a band, the walks are rotated instead (DQ_ROTATED, bwd_keys.cuh).
    const KeyBlock w = key_block<SEQS, U>(bp, BM, BN);
    const Seq& sq = w.s;
    const int b = w.b, hk = w.hk, n0 = w.n0;
    const int total = w.total;
    const uint16_t *k_head = w.k, *v_head = w.v;

    // Warp roles (first row, first column) in each phase's grid.
    constexpr int W1 = Cfg::kThreads / 32 / (Cfg::kBlockN / Cfg::kMT1 / 16);  // columns of grid 1
    constexpr int W2 = Cfg::kThreads / 32 / (Cfg::kBlockN / Cfg::kMT2 / 16);
    constexpr int W3 = Cfg::kThreads / 32 / (Cfg::kBlockM / Cfg::kMT3 / 16);
    const int kr1 = (warp / W1) * Cfg::kMT1 * 16, qc1 = (warp % W1) * Cfg::kCols1;
    // Gradient columns start at the block's half (wide head dims; 0 otherwise).
    const int half0 = w.half * Cfg::kSpan;
    const int kr2 = (warp / W2) * Cfg::kMT2 * 16, dc2 = half0 + (warp % W2) * Cfg::kCols2;
    const int qr3 = (warp / W3) * Cfg::kMT3 * 16, dc3 = half0 + (warp % W3) * Cfg::kCols3;

    constexpr int MT1 = Cfg::kMT1, MT2 = Cfg::kMT2, MT3 = Cfg::kMT3;
    constexpr int NT1 = Cfg::kCols1 / 8;
    constexpr int NT2 = Cfg::kCols2 / 8;
    constexpr int NT3 = Cfg::kCols3 / 8;
    float dk[MT2][NT2][4], dv[MT2][NT2][4];
#pragma unroll
    for (int mt = 0; mt < MT2; ++mt)
#pragma unroll
        for (int t = 0; t < NT2; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) dk[mt][t][e] = dv[mt][t][e] = 0.f;

    // Per-lane ldmatrix offsets (bytes): A from a row-major [m][k] tile; B from an [n][k] tile;
    // B from a [k][n] tile (transposing load); A from a [k][m] tile (transposing load).
    const uint32_t a_rows = ((lane % 16) * PITCH + (lane / 16) * 8) * 2;
    const uint32_t b_nk = ((lane % 8 + (lane / 16) * 8) * PITCH + ((lane / 8) % 2) * 8) * 2;
    const uint32_t b_kn = ((lane % 8 + ((lane / 8) % 2) * 8) * PITCH + (lane / 16) * 8) * 2;
    const uint32_t a_rows_p = ((lane % 16) * PP + (lane / 16) * 8) * 2;
    const uint32_t a_km_p = ((lane % 8 + (lane / 16) * 8) * PP + ((lane / 8) % 2) * 8) * 2;
    const uint32_t k_base = smem_addr(sK);
    const uint32_t v_base = smem_addr(sV);
    const uint32_t p_base = smem_addr(sP);
    const uint32_t ds_base = smem_addr(sdS);

    // 16-byte chunks of a row that hold data: head dims below D run on this tile with zeros
    // after them (Q and K rows have head_dim values, V and dO rows head_dim_v; the padding
    // adds nothing to the products, and the gradients' padding columns are not stored).
    const int chunks_qk = p.head_dim * U / 8, chunks_v = p.head_dim_v * U / 8;
    auto load_stage = [&](int stage, int it) {
        const int h = w.head_at(it, p.group);
        const int m0 = w.m_block_at(it) * BM;
        uint16_t* sQ = sQ0 + stage * 2 * BM * PITCH;
        load_tile<Cfg, BM>(sQ, (const uint16_t*)p.q + row_offset(p.q_stride, b, sq.q_row0, h) * U,
                           p.q_stride[1] * U, m0, sq.seqlen_q, chunks_qk);
        load_tile<Cfg, BM>(
            sQ + BM * PITCH,
            (const uint16_t*)bp.dout + row_offset(bp.do_stride, b, sq.q_row0, h) * U,
            bp.do_stride[1] * U, m0, sq.seqlen_q, chunks_v);
        // LSE and D rows are padded to a multiple of 128 in the workspace: no bounds to check.
        const int64_t stat_row = stat_row0<SEQS>(bp, sq, b, h) + m0;
        float* st = sStat + stage * 2 * BM;
        if (tid < BM / 4) {
            cp_async_16(st + tid * 4, bp.lse2 + stat_row + tid * 4, 16);
        } else if (tid < BM / 2) {
            const int c = tid - BM / 4;
            cp_async_16(st + BM + c * 4, bp.delta + stat_row + c * 4, 16);
        }
    };

    if (total > 0) {
        load_tile<Cfg, BN>(sK, k_head, p.k_stride[1] * U, n0, sq.seqlen_kv, chunks_qk);
        load_tile<Cfg, BN>(sV, v_head, p.v_stride[1] * U, n0, sq.seqlen_kv, chunks_v);
        load_stage(0, 0);
        cp_async_commit();
    }

    for (int it = 0; it < total; ++it) {
        const int stage = Cfg::kStages == 2 ? it % 2 : 0;
        if (Cfg::kStages == 1 && it > 0) {
            load_stage(0, it);
            cp_async_commit();
        }
        cp_async_wait<0>();
        __syncthreads();  // this stage landed; every warp is done with the previous iteration
        if (Cfg::kStages == 2 && it + 1 < total) {
            load_stage((it + 1) % 2, it + 1);
            cp_async_commit();
        }
        const int h = w.head_at(it, p.group);
        const int m0 = w.m_block_at(it) * BM;
        const int m_last = min(m0 + BM, sq.seqlen_q) - 1;
        const uint16_t* sQ = sQ0 + stage * 2 * BM * PITCH;
        const uint32_t q_base = smem_addr(sQ);
        const uint32_t do_base = q_base + BM * PITCH * 2;
        const float* lse2 = sStat + stage * 2 * BM;
        const float* delta = lse2 + BM;

        // Phase 1: Sᵀ = K Qᵀ and dPᵀ = V dOᵀ for this warp's keys and query columns.
        float s[MT1][NT1][4], dp[MT1][NT1][4];
        if constexpr (T::is_f32) {
            // ldmatrix bases as tile_qk_tf32 takes them: A rows lane % 16, floats 4 (lane / 16);
            // B rows lane % 8, floats 4 (lane / 8).
            const uint32_t a_rows_f = ((kr1 + lane % 16) * FP + (lane / 16) * 4) * 4;
            const uint32_t b_rows_f = ((qc1 + lane % 8) * FP + (lane / 8) * 4) * 4;
            tile_qk_tf32<T, D, MT1, NT1, FP, true>(s, k_base + a_rows_f, q_base + b_rows_f);
            tile_qk_tf32<T, D, MT1, NT1, FP, true>(dp, v_base + a_rows_f, do_base + b_rows_f);
        } else {
            zero_tiles(s);
            zero_tiles(dp);
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                uint32_t a[MT1][4], av[MT1][4];
#pragma unroll
                for (int mt = 0; mt < MT1; ++mt) {
                    ldmatrix_x4(a[mt], k_base + a_rows + ((kr1 + mt * 16) * PITCH + kk * 16) * 2);
                    ldmatrix_x4(av[mt], v_base + a_rows + ((kr1 + mt * 16) * PITCH + kk * 16) * 2);
                }
#pragma unroll
                for (int t = 0; t < NT1; t += 2) {
                    uint32_t bq[4], bo[4];
                    ldmatrix_x4(bq, q_base + b_nk + ((qc1 + t * 8) * PITCH + kk * 16) * 2);
                    ldmatrix_x4(bo, do_base + b_nk + ((qc1 + t * 8) * PITCH + kk * 16) * 2);
#pragma unroll
                    for (int mt = 0; mt < MT1; ++mt) {
                        mma_16816<T>(s[mt][t], a[mt], bq[0], bq[1]);
                        mma_16816<T>(s[mt][t + 1], a[mt], bq[2], bq[3]);
                        mma_16816<T>(dp[mt][t], av[mt], bo[0], bo[1]);
                        mma_16816<T>(dp[mt][t + 1], av[mt], bo[2], bo[3]);
                    }
                }
            }
        }

        // Pᵀ and dSᵀ. Rows past the last query have LSE +inf (P = 0) and D = 0; keys past the
        // end and outside the band are hidden here.
        const float slope = SCORE_MOD ? alibi_slope(p, b, h) : 0.f;
        const bool whole_tile_visible = tile_visible(p, sq, m0, m_last, n0, BN);
        float keep_pair[2][4];
#pragma unroll
        for (int mt = 0; mt < MT1; ++mt)
#pragma unroll
            for (int t = 0; t < NT1; ++t) {
                // Dropout's factors, computed for tiles t and t + 1 at even t.
                float keep[4] = {1.f, 1.f, 1.f, 1.f};
                if constexpr (DROPOUT) {
                    if (t % 2 == 0)
                        dropout_bwd_tiles(p, (uint32_t)(b * p.heads_q + h), n0 + kr1 + mt * 16,
                                          m0 + qc1 + t * 8 + quad * 2, group, keep_pair[0],
                                          keep_pair[1]);
#pragma unroll
                    for (int e = 0; e < 4; ++e) keep[e] = keep_pair[t % 2][e];
                }
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int jr = kr1 + mt * 16 + group + (e / 2) * 8;
                    const int ic = qc1 + t * 8 + quad * 2 + (e % 2);
                    const int i = m0 + ic;
                    const int j = n0 + jr;
                    float x, dfac = 1.f;
                    bool masked;
                    if (SCORE_MOD) {
                        x = in_band(p, sq, i, j) && i < sq.seqlen_q
                                ? modify_score<true>(p, sq, s[mt][t][e], b, h, i, j, slope, &dfac)
                                : -UFA_INF;
                        masked = x == -UFA_INF;
                    } else {
                        x = s[mt][t][e] * p.scale_log2;
                        masked = !(whole_tile_visible || in_band(p, sq, i, j));
                    }
                    grad_terms(masked, x, dp[mt][t][e], lse2[ic], delta[ic], dfac, keep[e],
                               s[mt][t][e], dp[mt][t][e]);
                }
                const int r = kr1 + mt * 16 + group;
                if constexpr (T::is_f32) {
                    // Queries 2 quad and 2 quad + 1 of the n8 tile at columns pi_column of them.
                    float* fp = (float*)sP + r * FPP + qc1 + t * 8 + quad;
                    float* fds = (float*)sdS + r * FPP + qc1 + t * 8 + quad;
                    fp[0] = s[mt][t][0], fp[4] = s[mt][t][1];
                    fp[8 * FPP] = s[mt][t][2], fp[8 * FPP + 4] = s[mt][t][3];
                    fds[0] = dp[mt][t][0], fds[4] = dp[mt][t][1];
                    fds[8 * FPP] = dp[mt][t][2], fds[8 * FPP + 4] = dp[mt][t][3];
                } else {
                    const int c = qc1 + t * 8 + quad * 2;
                    uint32_t* p0 = (uint32_t*)(sP + r * PP + c);
                    uint32_t* ds0 = (uint32_t*)(sdS + r * PP + c);
                    p0[0] = Convert<T>::pack(s[mt][t][0], s[mt][t][1]);
                    p0[4 * PP] = Convert<T>::pack(s[mt][t][2], s[mt][t][3]);
                    ds0[0] = Convert<T>::pack(dp[mt][t][0], dp[mt][t][1]);
                    ds0[4 * PP] = Convert<T>::pack(dp[mt][t][2], dp[mt][t][3]);
                }
            }
        __syncthreads();  // Pᵀ and dSᵀ complete

        // Phase 2: dV += Pᵀ dO and dK += dSᵀ Q over this block's query rows.
        if constexpr (T::is_f32) {
            constexpr bool SPLIT = T::tf32_split;
            const uint32_t a_rows_f = ((kr2 + lane % 16) * FPP + (lane / 16) * 4) * 4;
            const int b_lane = 2 * quad * FP + group + dc2;
            tf32_key_grads<SPLIT, BM, MT2, NT2, FPP, FP>(dv, p_base + a_rows_f,
                                                         (const float*)sQ + BM * FP + b_lane);
            tf32_key_grads<SPLIT, BM, MT2, NT2, FPP, FP>(dk, ds_base + a_rows_f,
                                                         (const float*)sQ + b_lane);
        } else {
#pragma unroll
            for (int kk = 0; kk < BM / 16; ++kk) {
                uint32_t ap[MT2][4], as[MT2][4];
#pragma unroll
                for (int mt = 0; mt < MT2; ++mt) {
                    ldmatrix_x4(ap[mt], p_base + a_rows_p + ((kr2 + mt * 16) * PP + kk * 16) * 2);
                    ldmatrix_x4(as[mt], ds_base + a_rows_p + ((kr2 + mt * 16) * PP + kk * 16) * 2);
                }
#pragma unroll
                for (int t = 0; t < NT2; t += 2) {
                    uint32_t bo[4], bq[4];
                    ldmatrix_x4_trans(bo, do_base + b_kn + (kk * 16 * PITCH + dc2 + t * 8) * 2);
                    ldmatrix_x4_trans(bq, q_base + b_kn + (kk * 16 * PITCH + dc2 + t * 8) * 2);
#pragma unroll
                    for (int mt = 0; mt < MT2; ++mt) {
                        mma_16816<T>(dv[mt][t], ap[mt], bo[0], bo[1]);
                        mma_16816<T>(dv[mt][t + 1], ap[mt], bo[2], bo[3]);
                        mma_16816<T>(dk[mt][t], as[mt], bq[0], bq[1]);
                        mma_16816<T>(dk[mt][t + 1], as[mt], bq[2], bq[3]);
                    }
                }
            }
        }

        // Phase 3: this key block's share of dQ = dS K, into the fp32 buffer.
        float acc[MT3][NT3][4];
#pragma unroll
        for (int mt = 0; mt < MT3; ++mt)
#pragma unroll
            for (int t = 0; t < NT3; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[mt][t][e] = 0.f;
        if constexpr (T::is_f32) {
            tf32_query_grads<T::tf32_split, BN, MT3, NT3, FPP, FP>(
                acc, (const float*)sdS + 2 * quad * FPP + qr3 + pi_column(group),
                (const float*)sK + 2 * quad * FP + group + dc3);
        } else {
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                uint32_t a[MT3][4];
#pragma unroll
                for (int mt = 0; mt < MT3; ++mt)
                    ldmatrix_x4_trans(a[mt], ds_base + a_km_p + (kk * 16 * PP + qr3 + mt * 16) * 2);
#pragma unroll
                for (int t = 0; t < NT3; t += 2) {
                    uint32_t bk[4];
                    ldmatrix_x4_trans(bk, k_base + b_kn + (kk * 16 * PITCH + dc3 + t * 8) * 2);
#pragma unroll
                    for (int mt = 0; mt < MT3; ++mt) {
                        mma_16816<T>(acc[mt][t], a[mt], bk[0], bk[1]);
                        mma_16816<T>(acc[mt][t + 1], a[mt], bk[2], bk[3]);
                    }
                }
            }
        }
        int my_turn = 0;
        int32_t* turn = dq_turn_wait(bp, w, it, m0, m_last, BN, my_turn);
        // The buffer's rows are head_dim floats (a multiple of 8, the host's rule for a tile
        // wider than the head): n8 tiles past it are padding.
        const int dq_pitch = p.head_dim;
        float* dq_rows = accum_rows<SEQS>(bp, sq, b, h, dq_pitch);
#pragma unroll
        for (int mt = 0; mt < MT3; ++mt) {
            const int i = m0 + qr3 + mt * 16;  // first row of the m-tile
            const bool row_ok = i + group < sq.seqlen_q, row8_ok = i + group + 8 < sq.seqlen_q;
#pragma unroll
            for (int t = 0; t < NT3; ++t)
                if (dc3 + t * 8 < dq_pitch)
                    red_add_tile(dq_rows + (int64_t)i * dq_pitch + dc3 + t * 8, dq_pitch,
                                 acc[mt][t], group, quad, row_ok, row8_ok);
        }
        if (bp.deterministic) {
            dq_turn_pass(turn, my_turn);
        } else if (Cfg::kStages == 1) {
            __syncthreads();  // the next iteration's load overwrites this stage
        }
    }

    // Epilogue: dK (times the softmax scale, which the scores carried) and dV, summed over the
    // GQA group already, each up to its head dim. Keys of blocks no query sees get zeros.
#pragma unroll
    for (int mt = 0; mt < MT2; ++mt)
#pragma unroll
        for (int t = 0; t < NT2; ++t)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int j = n0 + kr2 + mt * 16 + group + r * 8;
                if (j >= sq.seqlen_kv) continue;
                const int col = dc2 + t * 8 + quad * 2;
                const int64_t dk_at = row_offset(bp.dk_stride, b, sq.kv_row0 + j, hk) + col;
                const int64_t dv_at = row_offset(bp.dv_stride, b, sq.kv_row0 + j, hk) + col;
                const float k0 = dk[mt][t][2 * r] * p.scale, k1 = dk[mt][t][2 * r + 1] * p.scale;
                const float v0 = dv[mt][t][2 * r], v1 = dv[mt][t][2 * r + 1];
                const bool k_ok = col < p.head_dim, v_ok = col < p.head_dim_v;
                if constexpr (T::is_f32) {
                    if (k_ok) *(float2*)((float*)bp.dk + dk_at) = make_float2(k0, k1);
                    if (v_ok) *(float2*)((float*)bp.dv + dv_at) = make_float2(v0, v1);
                } else {
                    if (k_ok) *(uint32_t*)((uint16_t*)bp.dk + dk_at) = Convert<T>::pack(k0, k1);
                    if (v_ok) *(uint32_t*)((uint16_t*)bp.dv + dv_at) = Convert<T>::pack(v0, v1);
                }
            }
}
