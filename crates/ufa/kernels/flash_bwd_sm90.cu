// Backward attention on Hopper tensor cores (wgmma, sm_90a), head dims 64 and 128.
//
// The algorithm, parameter block, workspace and deterministic dQ order are flash_bwd.cu's; the
// products run as warpgroup MMAs. A block owns BLOCK_N keys of one (batch, KV head), 64 per
// warpgroup, and walks every query block (BLOCK_M rows) and query head of the GQA group that
// sees them. Per query block each warpgroup, for its 64 keys:
//   1. Sᵀ = K Qᵀ and dPᵀ = V dOᵀ (both operands in shared memory);
//   2. Pᵀ = exp2(Sᵀ - LSE), dSᵀ = Pᵀ ∘ (dPᵀ - D), in the accumulator registers;
//   3. dV += Pᵀ dO and dK += dSᵀ Q, with Pᵀ and dSᵀ as register A operands (no shared-memory
//      round trip) and dO, Q read transposed by their descriptors;
//   4. dSᵀ to shared memory; after a block barrier, dQ(block) = dS K with the head dim split
//      between the warpgroups (dS read transposed), added into the fp32 buffer.
// Needs common.cuh, mma.cuh (red_add_tile, the turn counters) and wgmma.cuh (the swizzled
// tiles) before it, and the host-generated wrappers wgmma_sdp (N = BLOCK_M), wgmma_dkv
// (N = HEAD_DIM, register A, B transposed) and wgmma_dq (N = HEAD_DIM / warpgroups, at most 64;
// A and B transposed).

template <int HEAD_DIM, int BLOCK_M, int BLOCK_N>
struct BwdWgmmaConfig {
    static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "dK and dV of 64 keys fit registers");
    static_assert(BLOCK_M == 64, "dSᵀ is one 64-query swizzle block; dQ one m64 tile");
    static_assert(BLOCK_N % 64 == 0, "each warpgroup owns 64 keys");
    static constexpr int kHeadDim = HEAD_DIM;
    static constexpr int kBlockM = BLOCK_M;
    static constexpr int kBlockN = BLOCK_N;
    static constexpr int kWarpgroups = BLOCK_N / 64;
    static constexpr int kThreads = kWarpgroups * 128;
    static constexpr int kKvBytes = BLOCK_N * HEAD_DIM * 2;
    static constexpr int kQBytes = BLOCK_M * HEAD_DIM * 2;
    static constexpr int kDsBytes = BLOCK_N * BLOCK_M * 2;
    // K, V, two stages of (Q, dO), dSᵀ, two stages of (LSE, D), 1024 bytes of alignment slack.
    static constexpr int kSmemBytes = 2 * kKvBytes + 4 * kQBytes + kDsBytes + 4 * BLOCK_M * 4 + 1024;
    static_assert(BLOCK_M / 2 <= kThreads, "the LSE and D loads take a thread per 16 bytes");
};

template <typename T, typename Cfg, bool SCORE_MOD>
__device__ __forceinline__ void flash_bwd_sm90(const BwdParams& bp) {
    const FwdParams& p = bp.f;
    constexpr int D = Cfg::kHeadDim;
    constexpr int BM = Cfg::kBlockM;
    constexpr int BN = Cfg::kBlockN;
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    const uint32_t sK = (smem_addr(smem_raw) + 1023) & ~1023u;
    const uint32_t sV = sK + Cfg::kKvBytes;
    const uint32_t sQ0 = sV + Cfg::kKvBytes;  // stage s: Q at sQ0 + 2 s kQBytes, dO after it
    const uint32_t sdS = sQ0 + 4 * Cfg::kQBytes;
    const uint32_t stat_addr = sdS + Cfg::kDsBytes;
    // The generic pointer of the LSE/D area, for ordinary loads.
    float* sStat = (float*)(smem_raw + (stat_addr - smem_addr(smem_raw)));

    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;
    const int wg = warp / 4;
    const int group = lane / 4;
    const int quad = lane % 4;
    const KeyBlock w = key_block(bp, BM, BN);
    const int b = w.b, hk = w.hk, n0 = w.n0;
    const int m_first = w.m_first, m_count = w.m_count, total = w.total;
    const uint16_t *k_head = w.k, *v_head = w.v;

    // This thread's key rows (accumulator rows): `group` and `group + 8` of its warp's 16.
    const int key_row = wg * 64 + (warp % 4) * 16 + group;  // within the block
    float dk[D / 2], dv[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.f;

    auto load_stage = [&](int stage, int it) {
        const int h = hk * p.group + it / m_count;
        const int m0 = (m_first + it % m_count) * BM;
        const uint32_t sQ = sQ0 + stage * 2 * Cfg::kQBytes;
        load_tile_sw128<Cfg, BM>(sQ, (const uint16_t*)p.q + b * p.q_stride[0] + h * p.q_stride[2],
                                 p.q_stride[1], m0, p.seqlen_q);
        load_tile_sw128<Cfg, BM>(sQ + Cfg::kQBytes,
                                 (const uint16_t*)bp.dout + b * bp.do_stride[0] + h * bp.do_stride[2],
                                 bp.do_stride[1], m0, p.seqlen_q);
        // LSE and D rows are padded to a multiple of 128 in the workspace: no bounds to check.
        const int64_t stat_row = ((int64_t)b * p.heads_q + h) * bp.seqlen_q_pad + m0;
        const uint32_t st = stat_addr + stage * 2 * BM * 4;
        if (tid < BM / 4) {
            cp_async_16_to(st + tid * 16, bp.lse2 + stat_row + tid * 4, 16);
        } else if (tid < BM / 2) {
            const int c = tid - BM / 4;
            cp_async_16_to(st + BM * 4 + c * 16, bp.delta + stat_row + c * 4, 16);
        }
    };

    if (total > 0) {
        load_tile_sw128<Cfg, BN>(sK, k_head, p.k_stride[1], n0, p.seqlen_kv);
        load_tile_sw128<Cfg, BN>(sV, v_head, p.v_stride[1], n0, p.seqlen_kv);
        load_stage(0, 0);
        cp_async_commit();
    }

    for (int it = 0; it < total; ++it) {
        const int stage = it % 2;
        cp_async_wait<0>();
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        __syncthreads();  // this stage landed; every warp is done with the previous iteration
        if (it + 1 < total) {
            load_stage(stage ^ 1, it + 1);
            cp_async_commit();
        }
        const int h = hk * p.group + it / m_count;
        const int m_block = m_first + it % m_count;
        const int m0 = m_block * BM;
        const int m_last = min(m0 + BM, p.seqlen_q) - 1;
        const uint32_t sQ = sQ0 + stage * 2 * Cfg::kQBytes;
        const uint32_t sdO = sQ + Cfg::kQBytes;
        const float* lse2 = sStat + stage * 2 * BM;
        const float* delta = lse2 + BM;

        // 1. Sᵀ = K Qᵀ and dPᵀ = V dOᵀ for this warpgroup's 64 keys.
        float s[BM / 2], dp[BM / 2];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const uint32_t col = (kk / 4) * (BN * 128) + wg * 64 * 128 + (kk % 4) * 32;
            const uint32_t qcol = (kk / 4) * (BM * 128) + (kk % 4) * 32;
            wgmma_sdp<T>(s, sw128_desc(sK + col, 16), sw128_desc(sQ + qcol, 16), kk > 0);
        }
        wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const uint32_t col = (kk / 4) * (BN * 128) + wg * 64 * 128 + (kk % 4) * 32;
            const uint32_t qcol = (kk / 4) * (BM * 128) + (kk % 4) * 32;
            wgmma_sdp<T>(dp, sw128_desc(sV + col, 16), sw128_desc(sdO + qcol, 16), kk > 0);
        }
        wgmma_commit();

        // 2. Pᵀ and dSᵀ. Rows past the last query have LSE +inf (P = 0) and D = 0; keys past
        // the end and outside the band are hidden here. Plain scores take Pᵀ while dPᵀ is
        // still being computed.
        const float slope = SCORE_MOD ? alibi_slope(p, b, h) : 0.f;
        const bool whole_tile_visible = tile_visible(p, m0, m_last, n0, BN);
        if (SCORE_MOD) {
            wgmma_wait<0>();
        } else {
            wgmma_wait<1>();
        }
        fence_regs(s);
#pragma unroll
        for (int t = 0; t < BM / 8; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int ic = t * 8 + quad * 2 + (e % 2);
                const int i = m0 + ic;
                const int j = n0 + key_row + (e / 2) * 8;
                if (SCORE_MOD) {
                    float dfac;
                    const float x = in_band(p, i, j) && i < p.seqlen_q
                                        ? modify_score<true>(p, s[4 * t + e], b, h, i, j, slope, &dfac)
                                        : -UFA_INF;
                    const float pv = fast_exp2(x - lse2[ic]);
                    s[4 * t + e] = pv;
                    dp[4 * t + e] = pv * (dp[4 * t + e] - delta[ic]) * dfac;
                } else {
                    const float x = whole_tile_visible || in_band(p, i, j)
                                        ? s[4 * t + e] * p.scale_log2
                                        : -UFA_INF;
                    s[4 * t + e] = fast_exp2(x - lse2[ic]);
                }
            }
        if (!SCORE_MOD) {
            wgmma_wait<0>();
            fence_regs(dp);
#pragma unroll
            for (int t = 0; t < BM / 8; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    dp[4 * t + e] = s[4 * t + e] * (dp[4 * t + e] - delta[t * 8 + quad * 2 + (e % 2)]);
        }

        // 3. dV += Pᵀ dO, dK += dSᵀ Q: two n8 tiles of the accumulators are one k16 A fragment.
        uint32_t pa[BM / 16][4], da[BM / 16][4];
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                pa[kk][r] = Convert<T>::pack(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
                da[kk][r] = Convert<T>::pack(dp[8 * kk + 2 * r], dp[8 * kk + 2 * r + 1]);
            }
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk)
            wgmma_dkv<T>(dv, pa[kk], sw128_desc(sdO + kk * 16 * 128, BM * 128), 1);
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk)
            wgmma_dkv<T>(dk, da[kk], sw128_desc(sQ + kk * 16 * 128, BM * 128), 1);
        wgmma_commit();

        // 4. dSᵀ to shared memory while those run: [BLOCK_N keys][64 queries], swizzled, the
        // MN-major A of dQ = dS K. Registers da[kk][r] hold (row, cols 16 kk + 8 (r / 2) +
        // 2 quad, +1) with row `group` for even r and `group + 8` for odd r.
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int row = key_row + (r % 2) * 8;
                const int chunk = 2 * kk + r / 2;
                const uint32_t addr = sdS + row * 128 + ((chunk ^ (row % 8)) << 4) + quad * 4;
                asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr), "r"(da[kk][r]) : "memory");
            }
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        __syncthreads();  // every warpgroup's dSᵀ is in place

        // dQ(block)[:, columns of this warpgroup] = dS K over the block's keys, in passes of at
        // most 64 columns (32 accumulator registers) added into the fp32 buffer one by one.
        int my_turn = 0;
        int32_t* turn = dq_turn_wait(bp, w, h, m_block, m0, m_last, BN, my_turn);
        constexpr int DQ_COLS = D / Cfg::kWarpgroups;
        constexpr int DQ_N = DQ_COLS > 64 ? 64 : DQ_COLS;
        float* dq_rows = bp.dq_accum + ((int64_t)b * p.heads_q + h) * p.seqlen_q * D;
        const int i = m0 + (warp % 4) * 16;  // first row of this warp's 16
        const bool row_ok = i + group < p.seqlen_q, row8_ok = i + group + 8 < p.seqlen_q;
#pragma unroll
        for (int pass = 0; pass < DQ_COLS / DQ_N; ++pass) {
            const int col0 = wg * DQ_COLS + pass * DQ_N;
            // K's column `col0`: a column block, plus 64 bytes into it when two warpgroups
            // split d64 (the swizzle is applied to the whole address, so a start inside a row
            // is exact).
            const uint32_t kcol = (col0 / 64) * (BN * 128) + (col0 % 64) * 2;
            float acc[DQ_N / 2];
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk)
                wgmma_dq<T>(acc, sw128_desc(sdS + kk * 16 * 128, BN * 128),
                            sw128_desc(sK + kcol + kk * 16 * 128, BN * 128), kk > 0);
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs(acc);
#pragma unroll
            for (int t = 0; t < DQ_N / 8; ++t) {
                const float c[4] = {acc[4 * t], acc[4 * t + 1], acc[4 * t + 2], acc[4 * t + 3]};
                red_add_tile(dq_rows + (int64_t)i * D + col0 + t * 8, D, c, group, quad, row_ok,
                             row8_ok);
            }
        }
        fence_regs(dk);
        fence_regs(dv);
        dq_turn_pass(turn, my_turn);
    }

    // dK (times the softmax scale, which the scores carried) and dV; keys of blocks no query
    // sees get zeros.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int j = n0 + key_row + r * 8;
        if (j >= p.seqlen_kv) continue;
        uint16_t* dk_row = (uint16_t*)bp.dk + row_offset(bp.dk_stride, b, j, hk);
        uint16_t* dv_row = (uint16_t*)bp.dv + row_offset(bp.dv_stride, b, j, hk);
#pragma unroll
        for (int t = 0; t < D / 8; ++t) {
            const int col = t * 8 + quad * 2;
            *(uint32_t*)(dk_row + col) =
                Convert<T>::pack(dk[4 * t + 2 * r] * p.scale, dk[4 * t + 2 * r + 1] * p.scale);
            *(uint32_t*)(dv_row + col) = Convert<T>::pack(dv[4 * t + 2 * r], dv[4 * t + 2 * r + 1]);
        }
    }
}
