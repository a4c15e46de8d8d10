// Forward attention on Hopper (sm_90a) for dense batches: warp-specialised, fed by the tensor
// memory accelerator, with the next tile's S = Q Kᵀ issued before this tile's P V.
//
// Same algorithm and parameter block as fwd_sm90.cu (online softmax in the log2 domain, tiles
// outside the causal/window band skipped, the last key tile first); what differs is who waits
// for what:
// - Warpgroup 0 is the producer (setmaxnreg down to 24 registers): one thread loads Q, then K
//   and V tile by tile into a ring of STAGES buffers by TMA (tensor maps in the
//   __grid_constant__ parameter block, src/cuda/tma.rs; the 128-byte swizzle of wgmma.cuh,
//   zeros past the sequence's end), each as soon as the consumers release it. K runs one tile
//   ahead of V, the order in which the consumers use them.
// - The other warpgroups consume (setmaxnreg up to their share), 64 query rows each. Per key
//   tile j: wait for K[j], issue S[j] = Q K[j]ᵀ; wait for V[j-1], issue O += P[j-1] V[j-1];
//   wait for S[j] only, release K[j], and compute P[j] (mask, softmax, dropout) while the
//   tensor cores run P V; then wait for it, release V[j-1] and rescale O by P[j]'s factors.
//   The softmax thus runs under the MMAs instead of between them.
// - PINGPONG (two consumers): the consumers take turns to issue their MMAs (two named
//   barriers), so that one's softmax runs while the other's MMAs hold the tensor cores.
// - PERSISTENT: one block an SM walks the (query block, head, batch) tiles gridDim.x apart,
//   query blocks of one head consecutive (they read the same K and V, so neighbours in time
//   share them in L2), in pairs of equal weight under a causal mask (for_each_tile). The ring
//   and its phases carry over from tile to tile, so the producer loads the next tile's Q and K
//   while the consumers finish and store this one. Otherwise the grid has a block per tile, as
//   fwd_sm90.cu's.
// Nothing waits at a block-wide barrier after the start.
#include "fwd_sm90_tile.cuh"
#include "tma.cuh"
#include "wgmma_ops.cuh"

// Whole 128-byte swizzle rows (64 elements) of a head dim: a tile's width in shared memory.
__host__ __device__ constexpr int sw128_width(int d) { return (d + 63) / 64 * 64; }

// QK_DIM and V_DIM are what the MMAs span: S = Q Kᵀ sums over QK_DIM columns (a multiple of
// 16, the wgmma k-step) and O = P V has V_DIM columns (a multiple of 8, the wgmma n-step).
// The tiles in shared memory are whole swizzle rows wider (TMA fills the columns past the
// real head dims with zeros), but the MMAs skip the 16-column steps and 8-column tiles that
// only hold padding: a head dim of 48 costs 3 of the d64 tile's 4 k-steps and 48 of its 64
// output columns, 80 costs 5 of 8 and 80 of 128. The two differ for pairs such as MLA's
// 192/128, where V's tile, O's registers and the P V MMAs take V's own width.
template <int QK_DIM, int V_DIM, int BLOCK_M, int BLOCK_N, int STAGES, bool PINGPONG,
          bool PERSISTENT>
struct TmaFwdConfig : Sm90FwdShape<sw128_width(QK_DIM), BLOCK_M, BLOCK_N, STAGES> {
    using Shape = Sm90FwdShape<sw128_width(QK_DIM), BLOCK_M, BLOCK_N, STAGES>;
    static_assert(QK_DIM % 16 == 0 && QK_DIM > 0, "S sums over whole wgmma k-steps");
    static_assert(V_DIM % 8 == 0 && V_DIM > 0 && V_DIM <= 256, "O has whole wgmma n-tiles");
    static constexpr int kQkDim = QK_DIM;
    static constexpr int kVDim = V_DIM;
    static constexpr int kHeadDimV = sw128_width(V_DIM);  // V's tile width
    static constexpr int kVBytes = BLOCK_N * kHeadDimV * 2;
    static constexpr int kConsumers = BLOCK_M / 64;
    static_assert(!PINGPONG || kConsumers == 2, "ping-pong takes turns between two consumers");
    static constexpr bool kPingPong = PINGPONG;
    static constexpr bool kPersistent = PERSISTENT;
    static constexpr int kConsumerThreads = kConsumers * 128;
    static constexpr int kThreads = kConsumerThreads + 128;
    // Offsets from the 1024-byte aligned base: Q, the K ring, the V ring, then the barriers
    // (Q full and empty; K full, V full, K empty, V empty per stage).
    static constexpr int kK = Shape::kQBytes;
    static constexpr int kV = kK + STAGES * Shape::kKvBytes;
    static constexpr int kBars = kV + STAGES * kVBytes;
    static constexpr int kSmemBytes = kBars + (2 + 4 * STAGES) * 8 + 1024;
    // Registers: the producer keeps 24 a thread and the consumers take the rest of the
    // block's share (one block an SM), at most 240.
    static constexpr int kProducerRegs = 24;
    static constexpr int kRegsPerThread = (65536 / kThreads) & ~7;
    static constexpr int kConsumerRegsFit =
        ((kRegsPerThread * kThreads - kProducerRegs * 128) / kConsumerThreads) & ~7;
    static constexpr int kConsumerRegs = kConsumerRegsFit < 240 ? kConsumerRegsFit : 240;
};

template <typename Cfg>
struct TmaFwdSmem {
    uint32_t base;
    __device__ __forceinline__ uint32_t q() const { return base; }
    __device__ __forceinline__ uint32_t k(int stage) const {
        return base + Cfg::kK + stage * Cfg::kKvBytes;
    }
    __device__ __forceinline__ uint32_t v(int stage) const {
        return base + Cfg::kV + stage * Cfg::kVBytes;
    }
    __device__ __forceinline__ uint32_t q_full() const { return base + Cfg::kBars; }
    __device__ __forceinline__ uint32_t q_empty() const { return q_full() + 8; }
    __device__ __forceinline__ uint32_t k_full(int stage) const { return q_full() + 16 + stage * 8; }
    __device__ __forceinline__ uint32_t v_full(int stage) const { return k_full(Cfg::kStages + stage); }
    __device__ __forceinline__ uint32_t k_empty(int stage) const {
        return k_full(2 * Cfg::kStages + stage);
    }
    __device__ __forceinline__ uint32_t v_empty(int stage) const {
        return k_full(3 * Cfg::kStages + stage);
    }
};

// Where the producer and the consumers are in the ring: `tiles` Q loads and `kv` K (and V)
// loads so far, over every tile this block has walked.
struct RingPos {
    int tiles = 0;
    int kv = 0;
};

// Calls f(w) for each (query block, head, batch) tile of this block.
//
// Persistent blocks walk the tiles gridDim.x apart, query blocks of a head consecutive. Under a
// causal or windowed mask, with more tiles than blocks, they walk pairs instead: query block i
// of a head with query block m - 1 - i (the heavier first), so that under a causal mask every
// pair holds the same number of key tiles and the blocks stay in step. Walking single tiles,
// the blocks drifted apart by whole heads, and with long sequences the K and V they read at
// once outgrew L2 (H100, 4 × 16384 × 16 heads × d128 causal: 40% L2 hits and 552 TFLOP/s,
// where a block a tile ran 615). Without a band every tile weighs the same and pairs would
// only round the last wave up to two tiles.
template <typename Cfg, typename F>
__device__ __forceinline__ void for_each_tile(const FwdParams& p, F f) {
    if constexpr (Cfg::kPersistent) {
        const int m = p.num_m_blocks;
        const int heads = p.heads_q * p.batch;
        const bool banded = p.window_left < p.seqlen_kv || p.window_right < p.seqlen_kv;
        const int per_head = banded && m * heads > (int)gridDim.x ? (m + 1) / 2 : m;
        const int total = per_head * heads;
        // One call site for f (its body is the whole consumer): `second` marks a pair's
        // lighter tile.
        bool second = false;
        for (int t = blockIdx.x; t < total;) {
            const int hb = t / per_head, i = t % per_head;
            f(fwd_block_at<false>(p, Cfg::kBlockM, Cfg::kBlockN, second ? m - 1 - i : i,
                                  hb % p.heads_q, hb / p.heads_q));
            second = !second && per_head < m && m - 1 - i != i;
            if (!second) t += gridDim.x;
        }
    } else {
        f(fwd_block<false>(p, Cfg::kBlockM, Cfg::kBlockN));
    }
}

// The loader (one producer thread) for tile w: Q, then K of key tile j and V of key tile
// j - 1 in turn, key tile j being key block n_last - j.
template <typename Cfg>
__device__ __forceinline__ void fwd_tma_load(const FwdSm90Params& sp, const FwdBlock& w,
                                             const TmaFwdSmem<Cfg>& sm, RingPos& pos) {
    constexpr int D = Cfg::kHeadDim;
    constexpr int BM = Cfg::kBlockM;
    constexpr int BN = Cfg::kBlockN;
    constexpr int S = Cfg::kStages;
    const int tiles = w.n_last - w.n_first + 1;
    if (tiles <= 0) return;
    if (pos.tiles > 0) mbar_wait(sm.q_empty(), (pos.tiles - 1) & 1);
    mbar_arrive_expect_tx(sm.q_full(), Cfg::kQBytes);
#pragma unroll
    for (int cb = 0; cb < D / 64; ++cb)
        tma_load_4d(sm.q() + cb * BM * 128, &sp.q, cb * 64, w.m0, w.h, w.b, sm.q_full());
    auto load = [&](const TmaMap* map, bool is_k, int j) {
        const int g = pos.kv + j, stage = g % S;
        const uint32_t full = is_k ? sm.k_full(stage) : sm.v_full(stage);
        if (g >= S) mbar_wait(is_k ? sm.k_empty(stage) : sm.v_empty(stage), ((g / S) & 1) ^ 1);
        mbar_arrive_expect_tx(full, is_k ? Cfg::kKvBytes : Cfg::kVBytes);
        const uint32_t dst = is_k ? sm.k(stage) : sm.v(stage);
        const int column_blocks = (is_k ? D : Cfg::kHeadDimV) / 64;
#pragma unroll
        for (int cb = 0; cb < (D > Cfg::kHeadDimV ? D : Cfg::kHeadDimV) / 64; ++cb)
            if (cb < column_blocks)
                tma_load_4d(dst + cb * BN * 128, map, cb * 64, (w.n_last - j) * BN, w.hk, w.b,
                            full);
    };
    for (int j = 0; j <= tiles; ++j) {
        if (j < tiles) load(&sp.k, true, j);
        if (j > 0) load(&sp.v, false, j - 1);
    }
    pos.tiles += 1;
    pos.kv += tiles;
}

// Keeps the packed P fragments in their registers until the MMA reading them has finished
// (an asynchronous wgmma reads its register operands after the issuing instruction retires).
template <int N> __device__ __forceinline__ void hold_regs(const uint32_t (&r)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" ::"r"(r[i][e]) : "memory");
}

// Consumer `cw`'s 64 rows of tile w. Its turns (PINGPONG): it waits at barrier 1 + cw until
// the other consumer has issued its MMAs, and signals the other's barrier when it has issued
// its own (fwd_sm90_tma sets up the first turn and settles the last).
template <typename T, typename Cfg, bool SCORE_MOD, bool DROPOUT>
__device__ __forceinline__ void fwd_tma_consume(const FwdParams& p, const FwdBlock& w,
                                                const TmaFwdSmem<Cfg>& sm, int cw, RingPos& pos) {
    constexpr int BM = Cfg::kBlockM;
    constexpr int BN = Cfg::kBlockN;
    constexpr int S = Cfg::kStages;
    const int warp = (threadIdx.x / 32) % 4;
    const int lane = threadIdx.x % 32;
    const int group = lane / 4;
    const int quad = lane % 4;
    const int row_a = w.m0 + cw * 64 + warp * 16 + group;
    const float slope = SCORE_MOD ? alibi_slope(p, w.b, w.h) : 0.f;
    constexpr int DV = Cfg::kVDim;  // O's columns: V's head dim, to whole n8 tiles
    float o[DV / 2];
#pragma unroll
    for (int i = 0; i < DV / 2; ++i) o[i] = 0.f;
    SoftmaxRow row[2];
    row[0].init(), row[1].init();
    const int tiles = w.n_last - w.n_first + 1;

    auto take_turn = [&] {
        if constexpr (Cfg::kPingPong) named_barrier_sync(1 + cw, 256);
    };
    auto pass_turn = [&] {
        if constexpr (Cfg::kPingPong) named_barrier_arrive(2 - cw, 256);
    };
    auto issue_qk = [&](float (&s)[BN / 2], int stage) {
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < Cfg::kQkDim / 16; ++kk) {
            const uint32_t col = (kk % 4) * 32;  // bytes into the 128-byte column block
            const uint64_t da = sw128_desc(sm.q() + (kk / 4) * (BM * 128) + cw * 64 * 128 + col, 16);
            const uint64_t db = sw128_desc(sm.k(stage) + (kk / 4) * (BN * 128) + col, 16);
            wgmma_qk<T>(s, da, db, kk > 0);
        }
        wgmma_commit();
    };
    auto issue_pv = [&](uint32_t (&pa)[BN / 16][4], int stage) {
        fence_regs(o);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk)
            wgmma_pv<T>(o, pa[kk], sw128_desc(sm.v(stage) + kk * 16 * 128, BN * 128), 1);
        wgmma_commit();
    };
    auto release = [&](uint32_t bar) {
        if (lane == 0) mbar_arrive(bar);
    };
    // Ring position of key tile j of this tile, and the parity of its use.
    auto stage_of = [&](int j) { return (pos.kv + j) % S; };
    auto parity_of = [&](int j) { return ((pos.kv + j) / S) & 1; };

    if (tiles > 0) {
        mbar_wait(sm.q_full(), pos.tiles & 1);
        float s[BN / 2];
        uint32_t pa[BN / 16][4];
        float corr[2];  // P[j]'s factors for O, applied once P[j-1] V[j-1] is done
        auto keep = [&](int r, float c) { corr[r] = c; };
        // Key tile 0: S, then P (O is still zero: its factors need no applying).
        mbar_wait(sm.k_full(stage_of(0)), parity_of(0));
        take_turn();
        issue_qk(s, stage_of(0));
        pass_turn();
        wgmma_wait<0>();
        fence_regs(s);
        release(sm.k_empty(stage_of(0)));
        if (tiles == 1) release(sm.q_empty());
        sm90_scores_to_p<SCORE_MOD, DROPOUT, BN>(p, w.s, w.b, w.h, row_a, w.m0, w.m_last,
                                                 w.n_last * BN, quad, slope, s, row, keep);
        sm90_pack_p<T, BN>(s, pa);
        for (int j = 1; j < tiles; ++j) {
            const int sk = stage_of(j), sv = stage_of(j - 1);
            mbar_wait(sm.k_full(sk), parity_of(j));
            take_turn();
            issue_qk(s, sk);
            mbar_wait(sm.v_full(sv), parity_of(j - 1));
            issue_pv(pa, sv);
            pass_turn();
            wgmma_wait<1>();  // S[j] done; P[j-1] V[j-1] may still run
            fence_regs(s);
            release(sm.k_empty(sk));
            if (j == tiles - 1) release(sm.q_empty());
            sm90_scores_to_p<SCORE_MOD, DROPOUT, BN>(p, w.s, w.b, w.h, row_a, w.m0, w.m_last,
                                                     (w.n_last - j) * BN, quad, slope, s, row,
                                                     keep);
            wgmma_wait<0>();
            fence_regs(o);
            hold_regs(pa);
            release(sm.v_empty(sv));
            sm90_rescale_row<DV>(o, 0, corr[0]);
            sm90_rescale_row<DV>(o, 1, corr[1]);
            // P[j] packed only now that P[j-1] V[j-1] no longer reads the fragments. Packed
            // into a second set and copied here, it made ptxas serialise every wgmma of the
            // persistent kernel (C7513); two sets used in turn spilled 250 bytes.
            sm90_pack_p<T, BN>(s, pa);
        }
        const int sv = stage_of(tiles - 1);
        mbar_wait(sm.v_full(sv), parity_of(tiles - 1));
        issue_pv(pa, sv);
        wgmma_wait<0>();
        fence_regs(o);
        hold_regs(pa);
        release(sm.v_empty(sv));
        pos.tiles += 1;
        pos.kv += tiles;
    }
    sm90_store_o<T, DROPOUT, DV>(p, w, row_a, quad, row, o);
}

template <typename T, typename Cfg, bool SCORE_MOD, bool DROPOUT>
__device__ __forceinline__ void fwd_sm90_tma(const FwdSm90Params& sp) {
    const FwdParams& p = sp.f;
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    const TmaFwdSmem<Cfg> sm{(smem_addr(smem_raw) + 1023) & ~1023u};
    if (threadIdx.x == 0) {
        mbar_init(sm.q_full(), 1);
        // One arrival per consumer warp.
        mbar_init(sm.q_empty(), Cfg::kConsumerThreads / 32);
        for (int s = 0; s < Cfg::kStages; ++s) {
            mbar_init(sm.k_full(s), 1);
            mbar_init(sm.v_full(s), 1);
            mbar_init(sm.k_empty(s), Cfg::kConsumerThreads / 32);
            mbar_init(sm.v_empty(s), Cfg::kConsumerThreads / 32);
        }
        mbar_init_fence();
    }
    __syncthreads();
    const int wg = threadIdx.x / 128;
    RingPos pos;
    if (wg == 0) {
        regs_release<Cfg::kProducerRegs>();
        if (threadIdx.x == 0)
            for_each_tile<Cfg>(p, [&](const FwdBlock& w) { fwd_tma_load<Cfg>(sp, w, sm, pos); });
    } else {
        regs_claim<Cfg::kConsumerRegs>();
        const int cw = wg - 1;
        // Consumer 1 hands consumer 0 the first turn; consumer 0 takes the hand-over that
        // consumer 1's last turn left, so that both barriers complete as often as they are
        // waited at.
        if (Cfg::kPingPong && cw == 1) named_barrier_arrive(1, 256);
        for_each_tile<Cfg>(p, [&](const FwdBlock& w) {
            fwd_tma_consume<T, Cfg, SCORE_MOD, DROPOUT>(p, w, sm, cw, pos);
        });
        if (Cfg::kPingPong && cw == 0) named_barrier_sync(1, 256);
    }
}
