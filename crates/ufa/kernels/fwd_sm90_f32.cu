// fp32 forward attention on Hopper tensor cores (wgmma TF32, sm_90a).
//
// The algorithm and parameter block of fwd_sm90.cu (online softmax in the log2 domain, tiles
// outside the band skipped, heaviest blocks first, one warpgroup per 64 query rows), with fp32
// operands: each product is three TF32 products (3xTF32, fp32 accuracy; T = Float32) or one
// (T = Tf32, the opt-in TF32 mode), as on mma.sync (fwd_tile.cuh, mma.cuh `tf32_pair`).
//
// wgmma reads TF32 operands from shared memory only K-major, and the TF32 split needs the high
// and low parts as separate operands, so the tiles are rewritten in shared memory once they
// land (cp.async, the 128-byte swizzle of wgmma.cuh with 32 floats a row): Q once, into its
// high part in place and its low part beside it; each K tile likewise; each V tile transposed
// into Vᵀ (head-dim rows, key columns), high and low. Within each k8 step of Vᵀ the key
// columns are permuted, column c holding key π(c) (π(c) = 2c, π(c + 4) = 2c + 1), so that a
// thread's S accumulators (keys 2 quad, 2 quad + 1 of each n8 tile) are exactly its A
// fragment of P V (columns quad, quad + 4), as in fwd_tile.cuh's tile_pv_tf32.
//
// Tensor cores add into their fp32 accumulators truncating (mma.cuh, mma_accumulate): with
// SPLIT, S sums each 32-column block of the head dim (12 products) into fresh accumulators
// that a rounded add brings to S, and each tile's P V into fresh ones added to O, so no sum
// runs long in the truncating adder.
//
// The host generates `wgmma_qk_tf32` (m64nBLOCK_Nk8, both operands in shared memory) and
// `wgmma_pv_tf32` (m64nHEAD_DIMk8, P from registers) into wgmma_ops.cuh (src/cuda/sm90.rs).
#include "fwd_sm90_tile.cuh"
#include "wgmma_ops.cuh"

// Shared memory: Q (and its low part), K (low), the V tile as it lands, Vᵀ (low); the high
// parts overwrite Q and K where they landed. 1024 bytes to align the tiles (wgmma.cuh).
template <int HEAD_DIM, int BLOCK_M, int BLOCK_N, bool SPLIT>
struct F32WgmmaConfig {
    static_assert(HEAD_DIM % 32 == 0 && HEAD_DIM <= 256, "rows are whole 128-byte swizzle atoms");
    static_assert(BLOCK_M % 64 == 0 && BLOCK_M <= 256, "each warpgroup owns 64 query rows");
    static_assert(BLOCK_N % 32 == 0 && BLOCK_N <= 256, "Vᵀ rows are whole 128-byte atoms");
    static constexpr int kHeadDim = HEAD_DIM;
    static constexpr int kBlockM = BLOCK_M;
    static constexpr int kBlockN = BLOCK_N;
    static constexpr int kThreads = BLOCK_M / 64 * 128;
    static constexpr int kParts = SPLIT ? 2 : 1;
    static constexpr int kQBytes = BLOCK_M * HEAD_DIM * 4;
    static constexpr int kKvBytes = BLOCK_N * HEAD_DIM * 4;
    static constexpr int kSmemBytes = kParts * kQBytes + (2 * kParts + 1) * kKvBytes + 1024;
    // What the cp.async loaders (load_tile_sw128) see: rows of 16-bit units.
    struct Units {
        static constexpr int kHeadDim = 2 * HEAD_DIM;
        static constexpr int kThreads = F32WgmmaConfig::kThreads;
    };
};

// The descriptor of the 128-byte-swizzled tile at `addr`, computed where it is used: the tiles
// stay put, so without the volatile asm the compiler hoists every k-step's descriptors out of
// the key loop and keeps them in registers (255 a thread, 200 bytes spilled at d128).
__device__ __forceinline__ uint64_t tile_desc(uint32_t addr) {
    uint32_t a;
    asm volatile("mov.b32 %0, %1;" : "=r"(a) : "r"(addr));
    return sw128_desc(a, 16);
}

__device__ __forceinline__ float4 lds128(uint32_t addr) {
    float4 v;
    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "r"(addr));
    return v;
}
__device__ __forceinline__ void sts128(uint32_t addr, const uint32_t (&x)[4]) {
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(x[0]), "r"(x[1]),
                 "r"(x[2]), "r"(x[3])
                 : "memory");
}
__device__ __forceinline__ void sts32(uint32_t addr, uint32_t x) {
    asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr), "r"(x) : "memory");
}

// The ROWS-row fp32 tile at `tile` in place as its TF32 high parts, with SPLIT the low parts at
// the same offsets from `lo` (element-wise, so the swizzle does not matter).
template <typename Cfg, int ROWS, bool SPLIT>
__device__ __forceinline__ void split_tile(uint32_t tile, uint32_t lo) {
    constexpr int kChunks = ROWS * Cfg::kHeadDim / 4;
    static_assert(kChunks % Cfg::kThreads == 0, "whole rounds of 16-byte chunks");
#pragma unroll
    for (int it = 0; it < kChunks / Cfg::kThreads; ++it) {
        const uint32_t off = (threadIdx.x + it * Cfg::kThreads) * 16;
        const float4 x = lds128(tile + off);
        uint32_t hi[4], low[4];
        tf32_pair<SPLIT>(x.x, hi[0], low[0]);
        tf32_pair<SPLIT>(x.y, hi[1], low[1]);
        tf32_pair<SPLIT>(x.z, hi[2], low[2]);
        tf32_pair<SPLIT>(x.w, hi[3], low[3]);
        sts128(tile + off, hi);
        if constexpr (SPLIT) sts128(lo + off, low);
    }
}

// The V tile at `vs` (BLOCK_N key rows, as it landed) as Vᵀ at `vt` (HEAD_DIM rows of key
// columns, permuted by π within each k8 step) in TF32 high parts, with SPLIT the low parts at
// `vt_lo`. A warp takes 32 consecutive key columns of 4 head-dim rows: its 16-byte reads meet
// 8 rows' swizzled chunks per 128 bytes, and each of its 4 rounds of 4-byte writes fills one
// whole 128-byte row, so neither side has bank conflicts.
template <typename Cfg, bool SPLIT>
__device__ __forceinline__ void transpose_v(uint32_t vs, uint32_t vt, uint32_t vt_lo) {
    constexpr int BN = Cfg::kBlockN;
    constexpr int D = Cfg::kHeadDim;
    constexpr int kItems = BN * D / 4;
    static_assert(kItems % Cfg::kThreads == 0, "whole rounds of 16-byte chunks");
#pragma unroll
    for (int it = 0; it < kItems / Cfg::kThreads; ++it) {
        const int i = threadIdx.x + it * Cfg::kThreads;
        const int j = i % BN;  // key column
        const int c = i / BN;  // 4-row chunk of the head dim
        const int step = j & 7;
        const int key = (j & ~7) | (step < 4 ? 2 * step : 2 * step - 7);
        const float4 x = lds128(vs + sw128_offset<BN>(key, c));
        const float xs[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const uint32_t at = sw128_offset<D>(4 * c + e, j / 4) + (j % 4) * 4;
            uint32_t hi, low;
            tf32_pair<SPLIT>(xs[e], hi, low);
            sts32(vt + at, hi);
            if constexpr (SPLIT) sts32(vt_lo + at, low);
        }
    }
}

// S = Q Kᵀ for the warpgroup's 64 rows. With SPLIT, each 32-column block of the head dim (four
// k8 steps of three products) goes into fresh accumulators: block 0 straight into S, the others
// alternately into t[0] and t[1], each added to S once finished while the next runs.
template <typename Cfg, bool SPLIT>
__device__ __forceinline__ void qk_tf32(float (&s)[Cfg::kBlockN / 2], uint32_t q, uint32_t q_lo,
                                        uint32_t k, uint32_t k_lo) {
    constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN, D = Cfg::kHeadDim;
    constexpr int kBlocks = D / 32;
    // The products of column block g: into `d`, overwriting it first. A descriptor of base +
    // offset is the base's plus offset / 16 (wgmma.cuh).
    auto block = [&](float(&d)[BN / 2], int g) {
        const uint64_t dq = tile_desc(q + g * (BM * 128)), dk = tile_desc(k + g * (BN * 128));
        const uint64_t dq_lo = SPLIT ? tile_desc(q_lo + g * (BM * 128)) : 0;
        const uint64_t dk_lo = SPLIT ? tile_desc(k_lo + g * (BN * 128)) : 0;
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            const uint64_t step = kk * 32 / 16;
            if constexpr (SPLIT) {
                wgmma_qk_tf32(d, dq_lo + step, dk + step, kk > 0);
                wgmma_qk_tf32(d, dq + step, dk_lo + step, 1);
                wgmma_qk_tf32(d, dq + step, dk + step, 1);
            } else {
                wgmma_qk_tf32(d, dq + step, dk + step, g > 0 || kk > 0);
            }
        }
    };
    wgmma_fence();
    if constexpr (!SPLIT) {
#pragma unroll
        for (int g = 0; g < kBlocks; ++g) block(s, g);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(s);
    } else {
        float t[2][BN / 2];
        block(s, 0);
        wgmma_commit();
#pragma unroll
        for (int g = 1; g < kBlocks; ++g) {
            if (g > 1) wgmma_fence();  // t[g % 2] was read by the add below
            block(t[g % 2], g);
            wgmma_commit();
            wgmma_wait<1>();  // every block but g has finished
            fence_regs(s);
            if (g > 1) {
                fence_regs(t[(g - 1) % 2]);
#pragma unroll
                for (int i = 0; i < BN / 2; ++i) s[i] += t[(g - 1) % 2][i];
            }
        }
        wgmma_wait<0>();
        if constexpr (kBlocks > 1) {
            fence_regs(t[(kBlocks - 1) % 2]);
#pragma unroll
            for (int i = 0; i < BN / 2; ++i) s[i] += t[(kBlocks - 1) % 2][i];
        }
        fence_regs(s);
    }
}

// O += P V: P's TF32 parts from the S accumulators as they stand (key order π, see above), Vᵀ
// from shared memory; with SPLIT into fresh accumulators added to O.
template <typename Cfg, bool SPLIT>
__device__ __forceinline__ void pv_tf32(float (&o)[Cfg::kHeadDim / 2],
                                        const float (&s)[Cfg::kBlockN / 2], uint32_t vt,
                                        uint32_t vt_lo) {
    constexpr int BN = Cfg::kBlockN, D = Cfg::kHeadDim;
    uint32_t hi[BN / 8][4], lo[BN / 8][4];
#pragma unroll
    for (int kk = 0; kk < BN / 8; ++kk) {
        tf32_pair<SPLIT>(s[4 * kk + 0], hi[kk][0], lo[kk][0]);
        tf32_pair<SPLIT>(s[4 * kk + 2], hi[kk][1], lo[kk][1]);
        tf32_pair<SPLIT>(s[4 * kk + 1], hi[kk][2], lo[kk][2]);
        tf32_pair<SPLIT>(s[4 * kk + 3], hi[kk][3], lo[kk][3]);
    }
    const uint64_t dv = tile_desc(vt), dv_lo = SPLIT ? tile_desc(vt_lo) : 0;
    // k-step kk of Vᵀ: 32 keys a 128-byte row, column blocks of D rows.
    auto step = [](int kk) { return (uint64_t)((kk / 4) * (D * 128) + (kk % 4) * 32) / 16; };
    wgmma_fence();
    if constexpr (SPLIT) {
        float acc[D / 2];
#pragma unroll
        for (int kk = 0; kk < BN / 8; ++kk) {
            wgmma_pv_tf32(acc, lo[kk], dv + step(kk), kk > 0);
            wgmma_pv_tf32(acc, hi[kk], dv_lo + step(kk), 1);
            wgmma_pv_tf32(acc, hi[kk], dv + step(kk), 1);
        }
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(acc);
#pragma unroll
        for (int i = 0; i < D / 2; ++i) o[i] += acc[i];
    } else {
#pragma unroll
        for (int kk = 0; kk < BN / 8; ++kk) wgmma_pv_tf32(o, hi[kk], dv + step(kk), 1);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(o);
    }
}

template <typename T, typename Cfg, bool SCORE_MOD, bool SEQS, bool DROPOUT>
__device__ __forceinline__ void fwd_sm90_f32(const FwdParams& p) {
    constexpr bool SPLIT = T::tf32_split;
    constexpr int D = Cfg::kHeadDim;
    constexpr int BM = Cfg::kBlockM;
    constexpr int BN = Cfg::kBlockN;
    using Units = typename Cfg::Units;
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    const uint32_t sQ = (smem_addr(smem_raw) + 1023) & ~1023u;
    const uint32_t sQlo = sQ + Cfg::kQBytes;  // with SPLIT
    const uint32_t sK = sQ + Cfg::kParts * Cfg::kQBytes;
    const uint32_t sKlo = sK + Cfg::kKvBytes;  // with SPLIT
    const uint32_t sV = sK + Cfg::kParts * Cfg::kKvBytes;
    const uint32_t sVt = sV + Cfg::kKvBytes;
    const uint32_t sVtlo = sVt + Cfg::kKvBytes;  // with SPLIT

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int wg = warp / 4;
    const int group = lane / 4;
    const int quad = lane % 4;
    // Head pointers and row strides in 16-bit units, as the loaders count.
    const FwdBlock w = fwd_block<SEQS, 2>(p, BM, BN);
    if (w.idle) return;
    const Seq& sq = w.s;
    const int b = w.b, h = w.h, m0 = w.m0, m_last = w.m_last;
    const int n_first = w.n_first, n_last = w.n_last;
    const int64_t k_rows = 2 * p.k_stride[1], v_rows = 2 * p.v_stride[1];

    const int row_a = m0 + wg * 64 + (warp % 4) * 16 + group;
    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    SoftmaxRow row[2];
    row[0].init(), row[1].init();
    const float slope = SCORE_MOD ? alibi_slope(p, b, h) : 0.f;

    if (n_first <= n_last) {
        load_tile_sw128<Units, BM>(sQ, w.q, 2 * p.q_stride[1], m0, sq.seqlen_q);
        load_tile_sw128<Units, BN>(sK, w.k, k_rows, n_last * BN, sq.seqlen_kv);
        load_tile_sw128<Units, BN>(sV, w.v, v_rows, n_last * BN, sq.seqlen_kv);
        cp_async_commit();
        // The warpgroup's 64 rows of Q.
        const uint32_t q_rows = wg * 64 * 128;
        for (int n = n_last; n >= n_first; --n) {
            const int n0 = n * BN;
            // K[n] and V[n] have landed, and every warpgroup is done with the last tile's Vᵀ.
            cp_async_wait<0>();
            __syncthreads();
            if (n == n_last) split_tile<Cfg, BM, SPLIT>(sQ, sQlo);
            split_tile<Cfg, BN, SPLIT>(sK, sKlo);
            transpose_v<Cfg, SPLIT>(sV, sVt, sVtlo);
            // Written through the generic proxy, read by wgmma through the async one.
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            __syncthreads();
            if (n > n_first) {
                load_tile_sw128<Units, BN>(sV, w.v, v_rows, n0 - BN, sq.seqlen_kv);
                cp_async_commit();
            }

            float s[BN / 2];
            qk_tf32<Cfg, SPLIT>(s, sQ + q_rows, sQlo + q_rows, sK, sKlo);
            __syncthreads();  // every warpgroup has read this K
            if (n > n_first) {
                load_tile_sw128<Units, BN>(sK, w.k, k_rows, n0 - BN, sq.seqlen_kv);
                cp_async_commit();
            }
            sm90_scores_to_p<SCORE_MOD, DROPOUT, BN>(
                p, sq, b, h, row_a, m0, m_last, n0, quad, slope, s, row,
                [&](int r, float c) { sm90_rescale_row<D>(o, r, c); });
            pv_tf32<Cfg, SPLIT>(o, s, sVt, sVtlo);
        }
    }

    sm90_store_o<T, DROPOUT, D>(p, w, row_a, quad, row, o);
}
