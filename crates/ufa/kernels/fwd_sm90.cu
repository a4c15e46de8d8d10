// Forward attention on Hopper tensor cores (wgmma, sm_90a).
//
// Same algorithm and parameter block as fwd_sm80.cu (online softmax in the log2 domain, tiles
// outside the causal/window band skipped, heaviest blocks first), with the two products issued
// as warpgroup MMAs: each warpgroup (4 warps, 128 threads) owns 64 query rows, S = Q Kᵀ reads
// both operands straight from shared memory, and O += P V takes P from registers (the S
// accumulators repacked, no shared-memory round trip) and V from shared memory.
//
// Shared memory holds Q once and K/V in STAGES buffers, each tile stored as 64-element
// (128-byte) column blocks of all its rows, with the 128-byte swizzle (16-byte chunk c of row
// r stored at chunk c ^ (r % 8)) that the wgmma descriptors name. The same bytes serve as a
// K-major operand (Q, K) and as an MN-major one (V, transposed by the descriptor), so every
// tile is loaded the same way, by cp.async from all threads, one tile pair ahead.
//
// It serves what the warp-specialised kernel (fwd_sm90_tma.cu) does not: packed batches,
// caches, strides a tensor map cannot express, and dense batches while that one is off.
//
// `wgmma_qk<T>` / `wgmma_pv<T>` are the inline-PTX wrappers for this variant's N (BLOCK_N and
// HEAD_DIM), which the host generates into wgmma_ops.cuh (crates/ufa/src/cuda/sm90.rs)
// because PTX needs one operand list per shape.
#include "fwd_sm90_tile.cuh"
#include "wgmma_ops.cuh"

template <int HEAD_DIM, int BLOCK_M, int BLOCK_N, int STAGES>
struct WgmmaConfig : Sm90FwdShape<HEAD_DIM, BLOCK_M, BLOCK_N, STAGES> {
    using Shape = Sm90FwdShape<HEAD_DIM, BLOCK_M, BLOCK_N, STAGES>;
    static constexpr int kThreads = BLOCK_M / 64 * 128;
    // The host adds 1024 bytes so the tiles can start on a 1024-byte boundary (the swizzle
    // pattern repeats every 8 rows of 128 bytes and descriptors assume it starts aligned).
    static constexpr int kSmemBytes = Shape::kQBytes + 2 * STAGES * Shape::kKvBytes + 1024;
};

// PAGED (with SEQS): K and V rows are found through the block table (the host selects it for
// paged caches, and only for them). DROPOUT: as in fwd_sm80.cu (the accumulator layout is the
// same), the dropped probabilities zeroed before P V and the keep scale applied to the output.
template <typename T, typename Cfg, bool SCORE_MOD, bool SEQS, bool PAGED, bool DROPOUT>
__device__ __forceinline__ void fwd_sm90(const FwdParams& p) {
    static_assert(SEQS || !PAGED, "a paged cache is sequence metadata");
    constexpr int D = Cfg::kHeadDim;
    constexpr int BM = Cfg::kBlockM;
    constexpr int BN = Cfg::kBlockN;
    constexpr int STAGES = Cfg::kStages;
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    const uint32_t sQ = (smem_addr(smem_raw) + 1023) & ~1023u;
    const uint32_t sK0 = sQ + Cfg::kQBytes;
    const uint32_t sV0 = sK0 + STAGES * Cfg::kKvBytes;

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int wg = warp / 4;  // warpgroup: query rows [64 wg, 64 wg + 64) of the block
    const int group = lane / 4;
    const int quad = lane % 4;
    const FwdBlock w = fwd_block<SEQS>(p, BM, BN);
    if (w.idle) return;  // rows past this sequence's end (the whole block leaves)
    const Seq& sq = w.s;
    const int b = w.b, h = w.h, m0 = w.m0, m_last = w.m_last;
    const int n_first = w.n_first, n_last = w.n_last;
    const uint16_t *q_head = w.q, *k_head = w.k, *v_head = w.v;
    // K and V rows of tile n0 into swizzled tile `tile`: a fixed stride apart, or found through
    // a paged cache's block table.
    auto load_kv = [&](uint32_t tile, const uint16_t* head, const void* base,
                       const int64_t(&st)[3], int n0) {
        if (PAGED) {
            load_rows<Cfg::kThreads, D / 8, BN>(
                (const uint16_t*)base, [&](int j) { return paged_row(p, b, j, st, w.hk); },
                [&](int r, int chunk) { return tile + sw128_offset<BN>(r, chunk); }, n0,
                sq.seqlen_kv);
        } else {
            load_tile_sw128<Cfg, BN>(tile, head, st[1], n0, sq.seqlen_kv);
        }
    };

    // This thread's rows: `group` and `group + 8` of its warp's 16 (the wgmma accumulator
    // layout is mma.sync's m16n8 fragment, repeated over N in n8 tiles).
    const int row_a = m0 + wg * 64 + (warp % 4) * 16 + group;
    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    SoftmaxRow row[2];  // sums of this thread's columns until the epilogue
    row[0].init(), row[1].init();
    const float slope = SCORE_MOD ? alibi_slope(p, b, h) : 0.f;

    if (n_first <= n_last) {
        load_tile_sw128<Cfg, BM>(sQ, q_head, p.q_stride[1], m0, sq.seqlen_q);
        load_kv(sK0, k_head, p.k, p.k_stride, n_last * BN);
        load_kv(sV0, v_head, p.v, p.v_stride, n_last * BN);
        cp_async_commit();

        int stage = 0;
        for (int n = n_last; n >= n_first; --n) {
            const int n0 = n * BN;
            const uint32_t sK = sK0 + stage * Cfg::kKvBytes;
            const uint32_t sV = sV0 + stage * Cfg::kKvBytes;
            if (n > n_first) {
                // The buffer the previous iteration used: free since its closing barrier.
                const int next = stage + 1 == STAGES ? 0 : stage + 1;
                load_kv(sK0 + next * Cfg::kKvBytes, k_head, p.k, p.k_stride, n0 - BN);
                load_kv(sV0 + next * Cfg::kKvBytes, v_head, p.v, p.v_stride, n0 - BN);
                cp_async_commit();
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            // cp.async wrote through the generic proxy; wgmma reads through the async one.
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            __syncthreads();

            // S = Q K[n]ᵀ, k-steps of 16 along the head dim (4 per 128-byte column block).
            float s[BN / 2];
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                const uint32_t col = (kk % 4) * 32;  // bytes into the column block
                const uint64_t da = sw128_desc(sQ + (kk / 4) * (BM * 128) + wg * 64 * 128 + col, 16);
                const uint64_t db = sw128_desc(sK + (kk / 4) * (BN * 128) + col, 16);
                wgmma_qk<T>(s, da, db, kk > 0);
            }
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs(s);

            uint32_t pa[BN / 16][4];
            sm90_scores_to_p<SCORE_MOD, DROPOUT, BN>(
                p, sq, b, h, row_a, m0, m_last, n0, quad, slope, s, row,
                [&](int r, float c) { sm90_rescale_row<D>(o, r, c); });
            sm90_pack_p<T, BN>(s, pa);

            // O += P V[n]: P as register A fragments, V MN-major.
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk)
                wgmma_pv<T>(o, pa[kk], sw128_desc(sV + kk * 16 * 128, BN * 128), 1);
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs(o);
            __syncthreads();  // every warpgroup is done with this stage before it is refilled
            stage = stage + 1 == STAGES ? 0 : stage + 1;
        }
    }

    sm90_store_o<T, DROPOUT, D>(p, w, row_a, quad, row, o);
}
