// Backward attention on tensor cores (mma.sync m16n8k16, sm_80+), FlashAttention-2 style.
//
// One thread block owns BLOCK_N keys of one (batch, KV head) and keeps their dK and dV in fp32
// registers. It walks every query block that can see those keys, for every query head of the
// GQA group (so dK/dV are summed over the group without atomics), and per query block:
//   1. Sᵀ = K Qᵀ and dPᵀ = V dOᵀ; Pᵀ = exp2(Sᵀ - LSE) from the forward's LSE (no running max);
//      dSᵀ = Pᵀ ∘ (dPᵀ - D) with D = rowsum(dO ∘ O) from the row kernel. Pᵀ and dSᵀ go to shared
//      memory in the input dtype.
//   2. dV += Pᵀ dO, dK += dSᵀ Q.
//   3. dQ(block) = dS K, added into an fp32 buffer with red.global.add. Deterministic mode
//      serialises those adds per query block in key-block order with a turn counter, so the
//      sums are bitwise the same on every run.
// Scores are computed transposed (keys are the rows) so that each warp's Pᵀ and dSᵀ rows are
// the rows of the dK/dV tile the same warp accumulates. The next query block's Q, dO, LSE and
// D load while this one computes (two stages where shared memory allows).
//
// Needs common.cuh and mma.cuh before it; the instantiations are appended at run time by the
// host (crates/ufa/src/cuda/backward.rs).

template <int HEAD_DIM, int BLOCK_M, int BLOCK_N, int WARPS, int STAGES>
struct BwdTileConfig {
    static constexpr int kHeadDim = HEAD_DIM;
    static constexpr int kBlockM = BLOCK_M;
    static constexpr int kBlockN = BLOCK_N;
    static constexpr int kThreads = WARPS * 32;
    static constexpr int kStages = STAGES;
    static constexpr int kRowPitch = HEAD_DIM + 8;  // see TileConfig: conflict-free ldmatrix
    static constexpr int kChunksPerRow = HEAD_DIM / 8;
    static constexpr int kPPitch = BLOCK_M + 8;     // Pᵀ and dSᵀ rows
    // Phases 1 and 2: warps tile the keys by 16 rows, then split the query columns of Sᵀ
    // (phase 1) and the head-dim columns of dK/dV (phase 2) kWarpsM ways.
    static constexpr int kKeyTiles = BLOCK_N / 16;
    static constexpr int kWarpsM = WARPS / kKeyTiles;
    static constexpr int kColsS = BLOCK_M / kWarpsM;
    static constexpr int kColsKV = HEAD_DIM / kWarpsM;
    // Phase 3: warps tile the query rows of dQ by 16, then split its head-dim columns.
    static constexpr int kRowTilesQ = BLOCK_M / 16;
    static constexpr int kWarpsD = WARPS / kRowTilesQ;
    static constexpr int kColsQ = HEAD_DIM / kWarpsD;
    static_assert(BLOCK_N % 16 == 0 && WARPS % kKeyTiles == 0, "warps tile the keys by 16");
    static_assert(kColsS % 16 == 0 && kColsKV % 16 == 0, "column splits are pairs of n8 tiles");
    static_assert(BLOCK_M % 16 == 0 && WARPS % kRowTilesQ == 0 && kColsQ % 16 == 0,
                  "warps tile dQ by 16 rows and pairs of n8 tiles");
    static_assert(STAGES == 1 || STAGES == 2, "one or two Q/dO buffers");
    // Elements of the 16-bit part of shared memory; fp32 LSE and D follow.
    static constexpr int kSmemElems =
        2 * BLOCK_N * kRowPitch + STAGES * 2 * BLOCK_M * kRowPitch + 2 * BLOCK_N * kPPitch;
};

__device__ __forceinline__ void red_add_f32(float* p, float x) {
    asm volatile("red.global.add.f32 [%0], %1;" ::"l"(p), "f"(x) : "memory");
}

template <typename T, typename Cfg, bool SCORE_MOD>
__device__ __forceinline__ void flash_bwd(const BwdParams& bp) {
    const FwdParams& p = bp.f;
    constexpr int D = Cfg::kHeadDim;
    constexpr int BM = Cfg::kBlockM;
    constexpr int BN = Cfg::kBlockN;
    constexpr int PITCH = Cfg::kRowPitch;
    constexpr int PP = Cfg::kPPitch;
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
    const int n_block = blockIdx.x;
    const int hk = blockIdx.y;
    const int b = blockIdx.z;
    const int n0 = n_block * BN;
    const int n_end = min(n0 + BN, p.seqlen_kv) - 1;

    // Query rows that see some key of this block: the band inverted, [n0 - off - right,
    // n_end - off + left]. It selects exactly the query blocks whose band (band_of_rows) meets
    // these keys, which the deterministic turn order relies on.
    const int row_lo = max(0, n0 - p.diag_offset - p.window_right);
    const int row_hi = min(p.seqlen_q - 1, n_end - p.diag_offset + p.window_left);
    const int m_first = row_lo / BM;
    const int m_count = row_hi >= row_lo ? row_hi / BM - m_first + 1 : 0;
    const int total = m_count * p.group;

    const uint16_t* k_head = (const uint16_t*)p.k + b * p.k_stride[0] + hk * p.k_stride[2];
    const uint16_t* v_head = (const uint16_t*)p.v + b * p.v_stride[0] + hk * p.v_stride[2];

    // Phase 1/2 warp roles: 16 key rows, a slice of query columns (1) or head-dim columns (2).
    const int kr0 = (warp % Cfg::kKeyTiles) * 16;
    const int wm = warp / Cfg::kKeyTiles;
    const int qc0 = wm * Cfg::kColsS;
    const int dc0 = wm * Cfg::kColsKV;
    // Phase 3 warp roles: 16 query rows, a slice of head-dim columns.
    const int q0 = (warp % Cfg::kRowTilesQ) * 16;
    const int dq0 = (warp / Cfg::kRowTilesQ) * Cfg::kColsQ;

    constexpr int NT1 = Cfg::kColsS / 8;
    constexpr int NT2 = Cfg::kColsKV / 8;
    constexpr int NT3 = Cfg::kColsQ / 8;
    float dk[NT2][4], dv[NT2][4];
#pragma unroll
    for (int t = 0; t < NT2; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[t][e] = dv[t][e] = 0.f;

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

    // Iteration `it` covers query head hk * group + it / m_count, block m_first + it % m_count.
    auto load_stage = [&](int stage, int it) {
        const int h = hk * p.group + it / m_count;
        const int m0 = (m_first + it % m_count) * BM;
        uint16_t* sQ = sQ0 + stage * 2 * BM * PITCH;
        load_tile<Cfg, BM>(sQ, (const uint16_t*)p.q + b * p.q_stride[0] + h * p.q_stride[2],
                           p.q_stride[1], m0, p.seqlen_q);
        load_tile<Cfg, BM>(sQ + BM * PITCH,
                           (const uint16_t*)bp.dout + b * bp.do_stride[0] + h * bp.do_stride[2],
                           bp.do_stride[1], m0, p.seqlen_q);
        // LSE and D rows are padded to a multiple of 128 in the workspace: no bounds to check.
        const int64_t stat_row = ((int64_t)b * p.heads_q + h) * bp.seqlen_q_pad + m0;
        float* st = sStat + stage * 2 * BM;
        if (tid < BM / 4) {
            cp_async_16(st + tid * 4, bp.lse2 + stat_row + tid * 4, 16);
        } else if (tid < BM / 2) {
            const int c = tid - BM / 4;
            cp_async_16(st + BM + c * 4, bp.delta + stat_row + c * 4, 16);
        }
    };

    if (total > 0) {
        load_tile<Cfg, BN>(sK, k_head, p.k_stride[1], n0, p.seqlen_kv);
        load_tile<Cfg, BN>(sV, v_head, p.v_stride[1], n0, p.seqlen_kv);
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
        const int h = hk * p.group + it / m_count;
        const int m_block = m_first + it % m_count;
        const int m0 = m_block * BM;
        const int m_last = min(m0 + BM, p.seqlen_q) - 1;
        const uint16_t* sQ = sQ0 + stage * 2 * BM * PITCH;
        const uint32_t q_base = smem_addr(sQ);
        const uint32_t do_base = q_base + BM * PITCH * 2;
        const float* lse2 = sStat + stage * 2 * BM;
        const float* delta = lse2 + BM;

        // Phase 1: Sᵀ = K Qᵀ and dPᵀ = V dOᵀ for this warp's 16 keys and query columns.
        float s[NT1][4], dp[NT1][4];
#pragma unroll
        for (int t = 0; t < NT1; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[t][e] = dp[t][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t a[4], av[4];
            ldmatrix_x4(a, k_base + a_rows + (kr0 * PITCH + kk * 16) * 2);
            ldmatrix_x4(av, v_base + a_rows + (kr0 * PITCH + kk * 16) * 2);
#pragma unroll
            for (int t = 0; t < NT1; t += 2) {
                uint32_t bq[4], bo[4];
                ldmatrix_x4(bq, q_base + b_nk + ((qc0 + t * 8) * PITCH + kk * 16) * 2);
                mma_16816<T>(s[t], a, bq[0], bq[1]);
                mma_16816<T>(s[t + 1], a, bq[2], bq[3]);
                ldmatrix_x4(bo, do_base + b_nk + ((qc0 + t * 8) * PITCH + kk * 16) * 2);
                mma_16816<T>(dp[t], av, bo[0], bo[1]);
                mma_16816<T>(dp[t + 1], av, bo[2], bo[3]);
            }
        }

        // Pᵀ and dSᵀ. Rows past the last query have LSE +inf (P = 0) and D = 0; keys past the
        // end and outside the band are hidden here.
        const float slope = SCORE_MOD ? alibi_slope(p, b, h) : 0.f;
        const bool whole_tile_visible = n0 >= m_last + p.diag_offset - p.window_left &&
                                        n0 + BN - 1 <= m0 + p.diag_offset + p.window_right &&
                                        n0 + BN <= p.seqlen_kv;
#pragma unroll
        for (int t = 0; t < NT1; ++t) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int jr = kr0 + group + (e / 2) * 8;
                const int ic = qc0 + t * 8 + quad * 2 + (e % 2);
                const int i = m0 + ic;
                const int j = n0 + jr;
                float x, dfac = 1.f;
                if (SCORE_MOD) {
                    x = in_band(p, i, j) && i < p.seqlen_q
                            ? modify_score<true>(p, s[t][e], b, h, i, j, slope, &dfac)
                            : -UFA_INF;
                } else {
                    x = whole_tile_visible || in_band(p, i, j) ? s[t][e] * p.scale_log2 : -UFA_INF;
                }
                const float pv = fast_exp2(x - lse2[ic]);
                s[t][e] = pv;
                dp[t][e] = pv * (dp[t][e] - delta[ic]) * dfac;
            }
            const int c = qc0 + t * 8 + quad * 2;
            *(uint32_t*)(sP + (kr0 + group) * PP + c) = Convert<T>::pack(s[t][0], s[t][1]);
            *(uint32_t*)(sP + (kr0 + group + 8) * PP + c) = Convert<T>::pack(s[t][2], s[t][3]);
            *(uint32_t*)(sdS + (kr0 + group) * PP + c) = Convert<T>::pack(dp[t][0], dp[t][1]);
            *(uint32_t*)(sdS + (kr0 + group + 8) * PP + c) = Convert<T>::pack(dp[t][2], dp[t][3]);
        }
        __syncthreads();  // Pᵀ and dSᵀ complete

        // Phase 2: dV += Pᵀ dO and dK += dSᵀ Q over this block's query rows.
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
            uint32_t ap[4], as[4];
            ldmatrix_x4(ap, p_base + a_rows_p + (kr0 * PP + kk * 16) * 2);
            ldmatrix_x4(as, ds_base + a_rows_p + (kr0 * PP + kk * 16) * 2);
#pragma unroll
            for (int t = 0; t < NT2; t += 2) {
                uint32_t bo[4], bq[4];
                ldmatrix_x4_trans(bo, do_base + b_kn + (kk * 16 * PITCH + dc0 + t * 8) * 2);
                mma_16816<T>(dv[t], ap, bo[0], bo[1]);
                mma_16816<T>(dv[t + 1], ap, bo[2], bo[3]);
                ldmatrix_x4_trans(bq, q_base + b_kn + (kk * 16 * PITCH + dc0 + t * 8) * 2);
                mma_16816<T>(dk[t], as, bq[0], bq[1]);
                mma_16816<T>(dk[t + 1], as, bq[2], bq[3]);
            }
        }

        // Phase 3: this key block's share of dQ = dS K, into the fp32 buffer.
        float acc[NT3][4];
#pragma unroll
        for (int t = 0; t < NT3; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[t][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            uint32_t a[4];
            ldmatrix_x4_trans(a, ds_base + a_km_p + (kk * 16 * PP + q0) * 2);
#pragma unroll
            for (int t = 0; t < NT3; t += 2) {
                uint32_t bk[4];
                ldmatrix_x4_trans(bk, k_base + b_kn + (kk * 16 * PITCH + dq0 + t * 8) * 2);
                mma_16816<T>(acc[t], a, bk[0], bk[1]);
                mma_16816<T>(acc[t + 1], a, bk[2], bk[3]);
            }
        }
        int32_t* turn = nullptr;
        if (bp.deterministic) {
            // Key blocks add into a query block in ascending order: wait for the previous one.
            // The first block that sees these rows has turn 0; lower blocks are scheduled first,
            // so the wait always ends.
            int key_lo, key_hi;
            band_of_rows(p, m0, m_last, key_lo, key_hi);
            const int my_turn = n_block - key_lo / BN;
            turn = bp.order + ((int64_t)b * p.heads_q + h) * bp.num_m_blocks + m_block;
            if (tid == 0) {
                while (*(volatile int32_t*)turn != my_turn) {
                }
                __threadfence();
            }
            __syncthreads();
        }
        float* dq_rows = bp.dq_accum + ((int64_t)b * p.heads_q + h) * p.seqlen_q * D;
#pragma unroll
        for (int t = 0; t < NT3; ++t)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int i = m0 + q0 + group + r * 8;
                if (i < p.seqlen_q) {
                    float* row = dq_rows + (int64_t)i * D + dq0 + t * 8 + quad * 2;
                    red_add_f32(row, acc[t][2 * r]);
                    red_add_f32(row + 1, acc[t][2 * r + 1]);
                }
            }
        if (bp.deterministic) {
            __threadfence();
            __syncthreads();
            if (tid == 0) *(volatile int32_t*)turn = *(volatile int32_t*)turn + 1;
        } else if (Cfg::kStages == 1) {
            __syncthreads();  // the next iteration's load overwrites this stage
        }
    }

    // Epilogue: dK (times the softmax scale, which the scores carried) and dV, summed over the
    // GQA group already. Keys of blocks no query sees get zeros.
#pragma unroll
    for (int t = 0; t < NT2; ++t)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int j = n0 + kr0 + group + r * 8;
            if (j >= p.seqlen_kv) continue;
            const int col = dc0 + t * 8 + quad * 2;
            uint16_t* dk_row = (uint16_t*)bp.dk + b * bp.dk_stride[0] + (int64_t)j * bp.dk_stride[1] +
                               hk * bp.dk_stride[2];
            uint16_t* dv_row = (uint16_t*)bp.dv + b * bp.dv_stride[0] + (int64_t)j * bp.dv_stride[1] +
                               hk * bp.dv_stride[2];
            *(uint32_t*)(dk_row + col) =
                Convert<T>::pack(dk[t][2 * r] * p.scale, dk[t][2 * r + 1] * p.scale);
            *(uint32_t*)(dv_row + col) = Convert<T>::pack(dv[t][2 * r], dv[t][2 * r + 1]);
        }
}
