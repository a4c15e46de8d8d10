// Backward attention on Hopper (sm_90a), head dims 64, 128 and 256: warpgroup MMAs fed by the
// tensor memory accelerator, with warp specialisation. Narrower head dims (multiples of 8, Q/K
// and V/dO possibly different, as MLA's 192/128) run on the next tile with the columns past
// them zero-filled by the tensor maps; those columns' dK, dV and dQ are not stored.
//
// The algorithm, workspace and deterministic dQ order are flash_bwd.cu's. A block owns BLOCK_N
// keys of one (batch, KV head) and walks every query block (BLOCK_M rows) and query head of the
// GQA group that sees them. Warpgroup 0 is the producer: one thread loads K and V once, then
// Q, dO, LSE and D of each step into a ring of stages (TMA, transaction barriers), waiting
// only for a stage to be released; one thread of each of its next two warps adds the dQ tiles
// of alternate steps into the fp32 buffer (TMA reductions from a ring of two tiles), taking
// the deterministic turns, so the consumers never wait for global memory. The other
// warpgroups consume, per step:
//   1. Sᵀ = K Qᵀ and dPᵀ = V dOᵀ (both operands in shared memory);
//   2. Pᵀ = exp2(Sᵀ - LSE), dSᵀ = Pᵀ ∘ (dPᵀ - D), in the accumulator registers (with
//      dropout, DROPOUT variants, the forward's factors Z regenerated: dSᵀ = Pᵀ ∘ (Z ∘ dPᵀ - D)
//      and Pᵀ ∘ Z goes on);
//   3. dV += Pᵀ dO and dK += dSᵀ Q, with dO and Q read transposed by their descriptors;
//   4. dSᵀ to shared memory (two buffers, alternating by step); after a consumer barrier,
//      dQ(block) = dS K with the head dim split between the consumers (dS read transposed);
//      with 128 queries a step (head dim 64, two consumers: FlashAttention-3's 128 x 128 tile,
//      whose wgmmas are twice as wide as 64 queries' and whose steps are half as many), each
//      consumer takes 64 of dQ's rows instead, and there is one dQ tile.
// Up to head dim 128 each consumer owns 64 keys and the whole head dim: Pᵀ and dSᵀ are the
// register A operands of step 3, and dQ goes to a shared fp32 tile for the writer. At head dim
// 256 (SPLIT_D) dK and dV of 64 keys would take 256 registers a thread, so two consumers share
// 64 keys: each computes Sᵀ and dPᵀ for half the queries, both halves of Pᵀ and dSᵀ meet in
// shared memory, and each accumulates dK and dV for half the head dim from there. Two dQ tiles
// would not fit beside two stages of Q and dO, so the dQ tile of a step takes its stage's place
// once its MMAs are done, and the writer releases the stage when it has read the tile. (Threads
// adding dQ with red.global instead ran at 60% of the speed the kernel has without dQ adds:
// 262 against 444 TFLOP/s, H200, s4096.)
// The host generates the wrappers wgmma_sdp (N = the consumer's queries), wgmma_dkv (N = the
// consumer's head-dim columns; A in registers, or in shared memory when SPLIT_D; B transposed)
// and wgmma_dq (N = HEAD_DIM / consumers, at most 64; A and B transposed) into
// wgmma_ops.cuh. The parameter block is BwdSm90Params (ufa_abi.cuh). Dense batches only: a
// packed batch's backward runs bwd_sm80.cu.
#include "bwd_keys.cuh"
#include "dropout.cuh"
#include "tma.cuh"
#include "wgmma.cuh"
#include "wgmma_ops.cuh"

template <int HEAD_DIM, int BLOCK_M, int BLOCK_N, int MIN_BLOCKS>
struct BwdWgmmaConfig {
    static_assert(HEAD_DIM == 64 || HEAD_DIM == 128 || HEAD_DIM == 256, "a Hopper head dim");
    // 128 query rows a step only at head dim 64 with two consumers: their Sᵀ and dPᵀ (64
    // keys x 128 queries, 64 registers each) beside dK and dV (32 each) still fit.
    static_assert(BLOCK_M == 64 || (BLOCK_M == 128 && HEAD_DIM == 64 && BLOCK_N == 128),
                  "64 query rows a step, or 128 at head dim 64 with two consumers");
    static_assert(BLOCK_N % 64 == 0, "consumers own 64 keys");
    static constexpr bool kSplitD = HEAD_DIM > 128;
    static_assert(!kSplitD || BLOCK_N == 64, "two consumers share one 64-key block");
    static constexpr int kHeadDim = HEAD_DIM;
    static constexpr int kBlockM = BLOCK_M;
    static constexpr int kBlockN = BLOCK_N;
    static constexpr int kConsumers = kSplitD ? 2 : BLOCK_N / 64;
    static constexpr int kSdpN = kSplitD ? BLOCK_M / 2 : BLOCK_M;     // a consumer's queries
    static constexpr int kDkvCols = kSplitD ? HEAD_DIM / 2 : HEAD_DIM;  // its dK/dV columns
    static constexpr int kConsumerThreads = kConsumers * 128;
    static constexpr int kThreads = kConsumerThreads + 128;
    static constexpr int kStages = 2;
    static constexpr int kKvBytes = BLOCK_N * HEAD_DIM * 2;
    static constexpr int kQBytes = BLOCK_M * HEAD_DIM * 2;
    static constexpr int kDsBytes = BLOCK_N * BLOCK_M * 2;
    static constexpr int kDqBytes = BLOCK_M * HEAD_DIM * 4;
    static constexpr int kStatBytes = 2 * BLOCK_M * 4;  // LSE and D of one stage
    // dQ = dS K: with 64 queries a step the consumers split its columns; with 128 its rows
    // (64 each, an m64 tile), and a second dQ tile would no longer fit.
    static constexpr bool kDqByRows = BLOCK_M > 64;
    static constexpr int kDqTiles = kDqByRows ? 1 : 2;
    // SPLIT_D: dQ tile t is stage t's Q and dO, which are as large.
    static constexpr bool kDqInStage = kSplitD;
    static_assert(!kDqInStage || (kStages == kDqTiles && 2 * kQBytes == kDqBytes),
                  "a stage holds one dQ tile");
    // dSᵀ buffers (and Pᵀ beside each when SPLIT_D).
    static constexpr int kDsStride = (kSplitD ? 2 : 1) * kDsBytes;
    // Offsets from the 1024-byte aligned base: K, V, the stages' (Q, dO), the two dSᵀ (, Pᵀ)
    // buffers, the dQ tiles, the stages' (LSE, D), then the barriers (K/V full; full and empty
    // per stage; full and empty per dQ tile).
    static constexpr int kV = kKvBytes;
    static constexpr int kQ = 2 * kKvBytes;
    static constexpr int kDs = kQ + kStages * 2 * kQBytes;
    static constexpr int kDq = kDs + 2 * kDsStride;
    static constexpr int kStat = kDq + (kDqInStage ? 0 : kDqTiles * kDqBytes);
    static constexpr int kBars = kStat + kStages * kStatBytes;
    static constexpr int kSmemBytes = kBars + (1 + 2 * kStages + 2 * kDqTiles) * 8 + 1024;
    static_assert(kDs % 1024 == 0 && kDq % 1024 == 0, "swizzled tiles start 1024-byte aligned");
    // Registers: the producer keeps 24 a thread and the consumers take the rest of the block's
    // share (MIN_BLOCKS blocks an SM), at most 240.
    static constexpr int kProducerRegs = 24;
    static constexpr int kRegsPerThread = (65536 / MIN_BLOCKS / kThreads) & ~7;
    static constexpr int kConsumerRegsFit =
        ((kRegsPerThread * kThreads - kProducerRegs * 128) / kConsumerThreads) & ~7;
    static constexpr int kConsumerRegs = kConsumerRegsFit < 240 ? kConsumerRegsFit : 240;
    static_assert(kRegsPerThread <= 248, "setmaxnreg needs the launch's count a multiple of 8");
};

// Shared-memory addresses of the block (shared state space, 1024-byte aligned base): the
// layout of BwdWgmmaConfig.
template <typename Cfg>
struct BwdSm90Smem {
    uint32_t base;
    __device__ __forceinline__ uint32_t k() const { return base; }
    __device__ __forceinline__ uint32_t v() const { return base + Cfg::kV; }
    __device__ __forceinline__ uint32_t q(int stage) const {
        return base + Cfg::kQ + stage * 2 * Cfg::kQBytes;
    }
    __device__ __forceinline__ uint32_t dout(int stage) const { return q(stage) + Cfg::kQBytes; }
    // dSᵀ of buffer `buf`, with Pᵀ after it when the head dim is split.
    __device__ __forceinline__ uint32_t ds(int buf) const {
        return base + Cfg::kDs + buf * Cfg::kDsStride;
    }
    __device__ __forceinline__ uint32_t dq(int tile) const {
        return Cfg::kDqInStage ? q(tile) : base + Cfg::kDq + tile * Cfg::kDqBytes;
    }
    __device__ __forceinline__ uint32_t stat(int stage) const {
        return base + Cfg::kStat + stage * Cfg::kStatBytes;
    }
    // Transaction barriers: K/V loaded; a stage full / empty; a dQ tile full / empty (the
    // latter unused when the tiles are the stages, whose empty barrier the writer arrives on).
    __device__ __forceinline__ uint32_t kv_full() const { return base + Cfg::kBars; }
    __device__ __forceinline__ uint32_t full(int stage) const { return kv_full() + 8 + stage * 8; }
    __device__ __forceinline__ uint32_t empty(int stage) const {
        return full(Cfg::kStages) + stage * 8;
    }
    __device__ __forceinline__ uint32_t dq_full(int tile) const {
        return empty(Cfg::kStages) + tile * 8;
    }
    __device__ __forceinline__ uint32_t dq_empty(int tile) const {
        return dq_full(Cfg::kDqTiles) + tile * 8;
    }
};

// The loader (one producer thread): K and V once, then Q, dO, LSE and D of each step into the
// ring of stages, each as soon as the consumers release it.
template <typename Cfg>
__device__ __forceinline__ void bwd_sm90_load(const BwdSm90Params& sp, const KeyBlock& w,
                                              const BwdSm90Smem<Cfg>& sm) {
    const BwdParams& bp = sp.bp;
    const FwdParams& p = bp.f;
    constexpr int D = Cfg::kHeadDim;
    constexpr int BM = Cfg::kBlockM;
    constexpr int BN = Cfg::kBlockN;
    constexpr int S = Cfg::kStages;
    mbar_arrive_expect_tx(sm.kv_full(), 2 * Cfg::kKvBytes);
#pragma unroll
    for (int cb = 0; cb < D / 64; ++cb) {
        tma_load_4d(sm.k() + cb * BN * 128, &sp.k, cb * 64, w.n0, w.hk, w.b, sm.kv_full());
        tma_load_4d(sm.v() + cb * BN * 128, &sp.v, cb * 64, w.n0, w.hk, w.b, sm.kv_full());
    }
    for (int it = 0; it < w.total; ++it) {
        const int stage = it % S;
        if (it >= S) mbar_wait(sm.empty(stage), ((it / S) & 1) ^ 1);
        const int h = w.head_at(it, p.group);
        const int m0 = w.m_block_at(it) * BM;
        mbar_arrive_expect_tx(sm.full(stage), 2 * Cfg::kQBytes + Cfg::kStatBytes);
#pragma unroll
        for (int cb = 0; cb < D / 64; ++cb) {
            tma_load_4d(sm.q(stage) + cb * BM * 128, &sp.q, cb * 64, m0, h, w.b, sm.full(stage));
            tma_load_4d(sm.dout(stage) + cb * BM * 128, &sp.dout, cb * 64, m0, h, w.b,
                        sm.full(stage));
        }
        // LSE and D rows are padded to a multiple of 128 in the workspace: no bounds.
        const int64_t stat_row = stat_row0<false>(bp, w.s, w.b, h) + m0;
        bulk_load(sm.stat(stage), bp.lse2 + stat_row, BM * 4, sm.full(stage));
        bulk_load(sm.stat(stage) + BM * 4, bp.delta + stat_row, BM * 4, sm.full(stage));
    }
}

// The dQ writer of tile `tile` (one producer thread each): adds the fp32 dQ tile of every step
// that fills it into the dQ buffer, in the key blocks' turn when deterministic, and hands the
// tile (or the stage it lies in) back as soon as it has been read. A writer per tile, so that
// one step's adds are under way while the other waits for its turn, and a deterministic writer
// never holds one turn while waiting for another.
template <typename Cfg>
__device__ __forceinline__ void bwd_sm90_write_dq(const BwdSm90Params& sp, const KeyBlock& w,
                                                  const BwdSm90Smem<Cfg>& sm, int tile) {
    const BwdParams& bp = sp.bp;
    const FwdParams& p = bp.f;
    constexpr int D = Cfg::kHeadDim;
    constexpr int BM = Cfg::kBlockM;
    for (int it = tile; it < w.total; it += Cfg::kDqTiles) {
        mbar_wait(sm.dq_full(tile), (it / Cfg::kDqTiles) & 1);
        const int h = w.head_at(it, p.group);
        const int m0 = w.m_block_at(it) * BM;
        int my_turn = 0;
        int32_t* turn =
            dq_turn(bp, w, it, m0, min(m0 + BM, w.s.seqlen_q) - 1, Cfg::kBlockN, my_turn);
        if (turn != nullptr) {
            dq_turn_spin(turn, my_turn);
            fence_proxy_async_global();
        }
#pragma unroll
        for (int box = 0; box < D / 32; ++box)
            if (box * 32 < p.head_dim)  // boxes of padding columns only (a narrower head dim)
                tma_reduce_add_3d(&sp.dq, box * 32, m0, w.b * p.heads_q + h,
                                  sm.dq(tile) + box * (BM * 128));
        bulk_commit();
        bulk_wait_read();
        mbar_arrive(Cfg::kDqInStage ? sm.empty(tile) : sm.dq_empty(tile));
        if (turn != nullptr) {
            // The adds are performed before the next key block takes the turn.
            bulk_wait();
            fence_proxy_async_global();
            store_release(turn, my_turn + 1);
        }
    }
    bulk_wait();  // the block's shared memory outlives its last reduction
}

// A consumer warpgroup (`cw` of Cfg::kConsumers): steps 1-4 of the header, then dK and dV.
template <typename T, typename Cfg, bool SCORE_MOD, bool DROPOUT>
__device__ __forceinline__ void bwd_sm90_consume(const BwdSm90Params& sp, const KeyBlock& w,
                                                 const BwdSm90Smem<Cfg>& sm, const float* stat_ptr,
                                                 int cw) {
    const BwdParams& bp = sp.bp;
    const FwdParams& p = bp.f;
    constexpr int D = Cfg::kHeadDim;
    constexpr int BM = Cfg::kBlockM;
    constexpr int BN = Cfg::kBlockN;
    constexpr int S = Cfg::kStages;
    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;
    const int b = w.b, hk = w.hk, n0 = w.n0;
    const int total = w.total;
    const uint32_t sK = sm.k(), sV = sm.v();
    constexpr bool SPLIT_D = Cfg::kSplitD;
    constexpr int NQ = Cfg::kSdpN;       // this consumer's queries in Sᵀ, dPᵀ
    constexpr int DC = Cfg::kDkvCols;    // its dK, dV columns
    const int key0 = SPLIT_D ? 0 : cw * 64;  // its keys within the block
    const int q0 = SPLIT_D ? cw * NQ : 0;    // its queries within a step's block
    const int c0 = SPLIT_D ? cw * DC : 0;    // its dK, dV columns
    const int group = lane / 4;
    const int quad = lane % 4;

    // This thread's key rows (accumulator rows): `group` and `group + 8` of its warp's 16.
    const int key_row = key0 + (warp % 4) * 16 + group;  // within the block; % 8 == group
    float dk[DC / 2], dv[DC / 2];
#pragma unroll
    for (int i = 0; i < DC / 2; ++i) dk[i] = dv[i] = 0.f;
    if (total > 0) mbar_wait(sm.kv_full(), 0);

    for (int it = 0; it < total; ++it) {
        const int stage = it % S;
        mbar_wait(sm.full(stage), (it / S) & 1);
        const int h = w.head_at(it, p.group);
        const int m0 = w.m_block_at(it) * BM;
        const int m_last = min(m0 + BM, w.s.seqlen_q) - 1;
        const uint32_t sQs = sm.q(stage);
        const uint32_t sdO = sm.dout(stage);
        const uint32_t sdS_it = sm.ds(it % 2);
        const float* lse2 = stat_ptr + stage * 2 * BM;
        const float* delta = lse2 + BM;

        // 1. Sᵀ = K Qᵀ and dPᵀ = V dOᵀ for this consumer's keys and queries, one commit
        // group each (Pᵀ is computed while dPᵀ runs).
        float s[NQ / 2], dp[NQ / 2];
        auto keys_by_queries = [&](float(&acc)[NQ / 2], uint32_t keys, uint32_t queries) {
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                const uint32_t col = (kk / 4) * (BN * 128) + key0 * 128 + (kk % 4) * 32;
                const uint32_t qcol = (kk / 4) * (BM * 128) + q0 * 128 + (kk % 4) * 32;
                wgmma_sdp<T>(acc, sw128_desc(keys + col, 16), sw128_desc(queries + qcol, 16),
                             kk > 0);
            }
            wgmma_commit();
        };
        wgmma_fence();
        keys_by_queries(s, sK, sQs);
        keys_by_queries(dp, sV, sdO);

        // 2. Pᵀ and dSᵀ. Rows past the last query have LSE +inf (P = 0) and D = 0; keys past
        // the end and outside the band are hidden here. Plain scores take Pᵀ while dPᵀ is
        // still being computed.
        const float slope = SCORE_MOD ? alibi_slope(p, b, h) : 0.f;
        const bool whole_tile_visible = tile_visible(p, w.s, m0, m_last, n0, BN);
        if (SCORE_MOD) {
            wgmma_wait<0>();
        } else {
            wgmma_wait<1>();
        }
        fence_regs(s);
        // Dropout's factors of tiles t and t + 1 (dropout.cuh), made at even t.
        float kp[2][4];
        auto dropout_pair = [&](int t) {
            if (DROPOUT && t % 2 == 0)
                dropout_bwd_tiles(p, (uint32_t)(b * p.heads_q + h), n0 + key_row - group,
                                  m0 + q0 + t * 8 + quad * 2, group, kp[0], kp[1]);
        };
        if (SCORE_MOD) {
            fence_regs(dp);
#pragma unroll
            for (int t = 0; t < NQ / 8; ++t) {
                dropout_pair(t);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int ic = q0 + t * 8 + quad * 2 + (e % 2);
                    const int i = m0 + ic;
                    const int j = n0 + key_row + (e / 2) * 8;
                    float dfac = 1.f;
                    const float x = in_band(p, w.s, i, j) && i < w.s.seqlen_q
                                        ? modify_score<true>(p, w.s, s[4 * t + e], b, h, i, j, slope, &dfac)
                                        : -UFA_INF;
                    grad_terms(x == -UFA_INF, x, dp[4 * t + e], lse2[ic], delta[ic], dfac,
                               DROPOUT ? kp[t % 2][e] : 1.f, s[4 * t + e], dp[4 * t + e]);
                }
            }
        } else if (whole_tile_visible) {
#pragma unroll
            for (int t = 0; t < NQ / 8; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    s[4 * t + e] = fast_exp2(
                        fmaf(s[4 * t + e], p.scale_log2, -lse2[q0 + t * 8 + quad * 2 + (e % 2)]));
        } else {
            // A key outside the band gets P = -0 (exp2 never gives it), which tells the dS loop
            // below to write 0 even where D is NaN (grad_terms' rule, split across two loops).
#pragma unroll
            for (int t = 0; t < NQ / 8; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int ic = q0 + t * 8 + quad * 2 + (e % 2);
                    const int j = n0 + key_row + (e / 2) * 8;
                    s[4 * t + e] = in_band(p, w.s, m0 + ic, j)
                                       ? fast_exp2(s[4 * t + e] * p.scale_log2 - lse2[ic])
                                       : -0.f;
                }
        }
        // Up to head dim 128, Pᵀ and dSᵀ as the 16-bit k16 A fragments of step 3 (two n8 tiles
        // of the accumulators are one fragment), each packed as soon as its two tiles are
        // final, so that the fp32 values of the tiles done give their registers back (128
        // queries a step with dropout spilled 372 bytes when all were packed at the end).
        uint32_t pa[NQ / 16][4], da[NQ / 16][4];
        auto fragment = [&](int kk) {
            if constexpr (!SPLIT_D) {
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    pa[kk][r] = Convert<T>::pack(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
                    da[kk][r] = Convert<T>::pack(dp[8 * kk + 2 * r], dp[8 * kk + 2 * r + 1]);
                }
            }
        };
        if (SCORE_MOD) {
#pragma unroll
            for (int kk = 0; kk < NQ / 16; ++kk) fragment(kk);
        } else {
            wgmma_wait<0>();
            fence_regs(dp);
            // With dropout, dS = P (Z dP - D) and Pᵀ goes on as P Z (grad_terms' rule).
            if (whole_tile_visible) {
#pragma unroll
                for (int t = 0; t < NQ / 8; ++t) {
                    dropout_pair(t);
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const float z = DROPOUT ? kp[t % 2][e] : 1.f;
                        dp[4 * t + e] = s[4 * t + e] *
                                        (dp[4 * t + e] * z - delta[q0 + t * 8 + quad * 2 + (e % 2)]);
                        if (DROPOUT) s[4 * t + e] *= z;
                    }
                    if (t % 2 == 1) fragment(t / 2);
                }
            } else {
#pragma unroll
                for (int t = 0; t < NQ / 8; ++t) {
                    dropout_pair(t);
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const float z = DROPOUT ? kp[t % 2][e] : 1.f;
                        const float pv = s[4 * t + e];
                        const float ds =
                            pv * (dp[4 * t + e] * z - delta[q0 + t * 8 + quad * 2 + (e % 2)]);
                        dp[4 * t + e] = signbit(pv) ? 0.f : ds;
                        if (DROPOUT) s[4 * t + e] = pv * z;
                    }
                    if (t % 2 == 1) fragment(t / 2);
                }
            }
        }

        // Accumulator tile `x` as 16-bit values in a [BLOCK_N keys][BLOCK_M queries] tile of
        // 64-query swizzled blocks: the K-major A of dV/dK (SPLIT_D) and the MN-major A of
        // dQ = dS K. Accumulators 4 t + 2 h, + 1 (register 2 (t % 2) + h of fragment t / 2)
        // hold key row `key_row + 8 h`, queries q0 + 8 t + 2 quad, + 1: chunk c = q0 / 8 + t
        // of the row, in block c / 8. From the accumulators, or from their fragments.
        const uint32_t row_addr = key_row * 128 + (group << 4) + quad * 4;
        auto keys_by_queries_at = [&](uint32_t tile, int t, int h8) {
            const int c = q0 / 8 + t;  // q0 (SPLIT_D only) keeps c within block 0
            const int block = BM > 64 ? c / 8 : 0;
            return sw128_chunk(tile + block * (BN * 128) + row_addr, BM > 64 ? c % 8 : c) +
                   h8 * 8 * 128;
        };
        auto store_keys_by_queries = [&](uint32_t tile, const float(&x)[NQ / 2]) {
#pragma unroll
            for (int t = 0; t < NQ / 8; ++t)
#pragma unroll
                for (int h8 = 0; h8 < 2; ++h8)
                    asm volatile("st.shared.b32 [%0], %1;" ::"r"(keys_by_queries_at(tile, t, h8)),
                                 "r"(Convert<T>::pack(x[4 * t + 2 * h8], x[4 * t + 2 * h8 + 1]))
                                 : "memory");
        };
        auto store_fragments = [&](uint32_t tile, const uint32_t(&a)[NQ / 16][4]) {
#pragma unroll
            for (int t = 0; t < NQ / 8; ++t)
#pragma unroll
                for (int h8 = 0; h8 < 2; ++h8)
                    asm volatile("st.shared.b32 [%0], %1;" ::"r"(keys_by_queries_at(tile, t, h8)),
                                 "r"(a[t / 2][2 * (t % 2) + h8])
                                 : "memory");
        };

        // 3. dV += Pᵀ dO, dK += dSᵀ Q, over the step's queries (K), into this consumer's
        // columns (N), dO and Q transposed.
        if constexpr (SPLIT_D) {
            // Both consumers' halves of Pᵀ and dSᵀ meet in shared memory first.
            store_keys_by_queries(sdS_it, dp);
            store_keys_by_queries(sdS_it + Cfg::kDsBytes, s);
            fence_proxy_async_shared();
            named_barrier_sync(1, Cfg::kConsumerThreads);
            const uint32_t cols = (c0 / 64) * (BM * 128);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BM / 16; ++kk)
                wgmma_dkv<T>(dv, sw128_desc(sdS_it + Cfg::kDsBytes + kk * 32, 16),
                             sw128_desc(sdO + cols + kk * 16 * 128, BM * 128), 1);
#pragma unroll
            for (int kk = 0; kk < BM / 16; ++kk)
                wgmma_dkv<T>(dk, sw128_desc(sdS_it + kk * 32, 16),
                             sw128_desc(sQs + cols + kk * 16 * 128, BM * 128), 1);
            wgmma_commit();
        } else {
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BM / 16; ++kk)
                wgmma_dkv<T>(dv, pa[kk], sw128_desc(sdO + kk * 16 * 128, BM * 128), 1);
#pragma unroll
            for (int kk = 0; kk < BM / 16; ++kk)
                wgmma_dkv<T>(dk, da[kk], sw128_desc(sQs + kk * 16 * 128, BM * 128), 1);
            wgmma_commit();
            // 4. dSᵀ to shared memory while those run, from its fragments (dPᵀ's registers are
            // free once they are packed).
            store_fragments(sdS_it, da);
            fence_proxy_async_shared();
            named_barrier_sync(1, Cfg::kConsumerThreads);  // every consumer's dSᵀ is in place
        }

        // dQ(block)[rows, columns of this consumer] = dS K over the block's keys, in passes of
        // at most 64 columns (32 accumulator registers each): into a shared fp32 tile (boxes of
        // 32 columns x BLOCK_M rows, 128-byte swizzle, as the TMA reduction reads them) for the
        // writer. The consumers split the columns, or with kDqByRows the rows: consumer cw
        // takes queries 64 cw.. (dSᵀ's swizzle block cw) and every column.
        constexpr bool BY_ROWS = Cfg::kDqByRows;
        constexpr int DQ_COLS = BY_ROWS ? D : D / Cfg::kConsumers;
        constexpr int DQ_N = DQ_COLS > 64 ? 64 : DQ_COLS;
        static_assert(DQ_N % 32 == 0, "dQ passes start on a box");
        static_assert(!BY_ROWS || BM == 64 * Cfg::kConsumers, "a consumer's dQ rows are one m64 tile");
        const int dq_row0 = BY_ROWS ? cw * 64 : 0;
        const uint32_t sdS_rows = sdS_it + (BY_ROWS ? cw * (BN * 128) : 0);
        const int row = dq_row0 + (warp % 4) * 16 + group;  // this thread's dQ rows: row, row + 8
        constexpr int PASSES = DQ_COLS / DQ_N;
        float acc[PASSES][DQ_N / 2];
        wgmma_fence();
#pragma unroll
        for (int pass = 0; pass < PASSES; ++pass) {
            // K's column `col0`: a column block, plus 64 bytes into it when two consumers
            // split d64 (the swizzle is applied to the whole address, so a start inside a row
            // is exact).
            const int col0 = (BY_ROWS ? 0 : cw * DQ_COLS) + pass * DQ_N;
            const uint32_t kcol = (col0 / 64) * (BN * 128) + (col0 % 64) * 2;
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk)
                wgmma_dq<T>(acc[pass], sw128_desc(sdS_rows + kk * 16 * 128, BN * 128),
                            sw128_desc(sK + kcol + kk * 16 * 128, BN * 128), kk > 0);
        }
        wgmma_commit();
        wgmma_wait<0>();
#pragma unroll
        for (int pass = 0; pass < PASSES; ++pass) fence_regs(acc[pass]);
        const int tile = it % Cfg::kDqTiles;
        if constexpr (Cfg::kDqInStage) {
            // The tile replaces this stage's Q and dO: every consumer's MMAs are done with them.
            named_barrier_sync(1, Cfg::kConsumerThreads);
        } else if (it >= Cfg::kDqTiles) {
            mbar_wait(sm.dq_empty(tile), ((it / Cfg::kDqTiles) & 1) ^ 1);
        }
        // Column col0 + 8 t + 2 quad: box (col0 + 8 t) / 32, chunk 2 t % 8 + quad / 2 (col0 is
        // a multiple of 32), byte 8 (quad % 2) of it.
        const uint32_t dq_row =
            sm.dq(tile) + row * 128 + (((quad / 2) ^ group) << 4) + (quad % 2) * 8;
#pragma unroll
        for (int pass = 0; pass < PASSES; ++pass) {
            const int col0 = (BY_ROWS ? 0 : cw * DQ_COLS) + pass * DQ_N;
#pragma unroll
            for (int t = 0; t < DQ_N / 8; ++t) {
                const uint32_t addr =
                    sw128_chunk(dq_row, (2 * t) % 8) + ((col0 + 8 * t) / 32) * (BM * 128);
                asm volatile("st.shared.v2.f32 [%0], {%1, %2};" ::"r"(addr), "f"(acc[pass][4 * t]),
                             "f"(acc[pass][4 * t + 1])
                             : "memory");
                asm volatile("st.shared.v2.f32 [%0], {%1, %2};" ::"r"(addr + 8 * 128),
                             "f"(acc[pass][4 * t + 2]), "f"(acc[pass][4 * t + 3])
                             : "memory");
            }
        }
        // Every MMA reading this stage (dK's and dV's too) has completed, and so have this
        // thread's reads of its LSE and D: release it (unless the dQ tile lies in it: then the
        // writer does, once it has read the tile). Then this thread's part of the dQ tile is in place (made visible
        // to the TMA by the proxy fence). Every consumer thread arrives, so each one's accesses
        // are ordered by its own release.
        if constexpr (!Cfg::kDqInStage) mbar_arrive(sm.empty(stage));
        fence_proxy_async_shared();
        mbar_arrive(sm.dq_full(tile));
        fence_regs(dk);
        fence_regs(dv);
    }

    // dK (times the softmax scale, which the scores carried) and dV; keys of blocks no query
    // sees get zeros.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int j = n0 + key_row + r * 8;
        if (j >= w.s.seqlen_kv) continue;
        uint16_t* dk_row = (uint16_t*)bp.dk + row_offset(bp.dk_stride, b, j, hk) + c0;
        uint16_t* dv_row = (uint16_t*)bp.dv + row_offset(bp.dv_stride, b, j, hk) + c0;
        // Columns past a head dim narrower than the tile (zeros, from the padding) are not
        // stored; head dims are multiples of 8, so whole n8 tiles are in or out.
        const int dk_tiles = (p.head_dim - c0) / 8, dv_tiles = (p.head_dim_v - c0) / 8;
#pragma unroll
        for (int t = 0; t < DC / 8; ++t) {
            const int col = t * 8 + quad * 2;
            if (t < dk_tiles)
                *(uint32_t*)(dk_row + col) = Convert<T>::pack(dk[4 * t + 2 * r] * p.scale,
                                                              dk[4 * t + 2 * r + 1] * p.scale);
            if (t < dv_tiles)
                *(uint32_t*)(dv_row + col) =
                    Convert<T>::pack(dv[4 * t + 2 * r], dv[4 * t + 2 * r + 1]);
        }
    }
}

template <typename T, typename Cfg, bool SCORE_MOD, bool DROPOUT>
__device__ __forceinline__ void bwd_sm90(const BwdSm90Params& sp) {
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    const BwdSm90Smem<Cfg> sm{(smem_addr(smem_raw) + 1023) & ~1023u};
    const KeyBlock w = key_block<false>(sp.bp, Cfg::kBlockM, Cfg::kBlockN);
    const int tid = threadIdx.x;
    if (tid == 0) {
        mbar_init(sm.kv_full(), 1);
        for (int s = 0; s < Cfg::kStages; ++s) {
            mbar_init(sm.full(s), 1);
            // Every consumer thread arrives, or the dQ writer when the stage holds the dQ tile.
            mbar_init(sm.empty(s), Cfg::kDqInStage ? 1 : Cfg::kConsumerThreads);
        }
        for (int t = 0; t < Cfg::kDqTiles; ++t) {
            mbar_init(sm.dq_full(t), Cfg::kConsumerThreads);
            mbar_init(sm.dq_empty(t), 1);
        }
        mbar_init_fence();
    }
    __syncthreads();  // the last block-wide barrier: the roles part here

    if (tid < 128) {
        regs_release<Cfg::kProducerRegs>();
        if (w.total == 0) return;
        if (tid == 0) bwd_sm90_load<Cfg>(sp, w, sm);
        const int writer = tid / 32 - 1;  // warps 1 and 2
        if (tid % 32 == 0 && writer >= 0 && writer < Cfg::kDqTiles)
            bwd_sm90_write_dq<Cfg>(sp, w, sm, writer);
        return;
    }
    regs_claim<Cfg::kConsumerRegs>();
    // The LSE/D area's generic pointer, for ordinary loads.
    const float* stat_ptr = (const float*)(smem_raw + (sm.stat(0) - smem_addr(smem_raw)));
    bwd_sm90_consume<T, Cfg, SCORE_MOD, DROPOUT>(sp, w, sm, stat_ptr, tid / 128 - 1);
}
