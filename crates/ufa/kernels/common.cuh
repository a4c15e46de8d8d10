// Shared by every ufa kernel: fixed-width types, the parameter block, element conversions and
// the few PTX instructions the kernels use. Self-contained on purpose: NVRTC compiles it with no
// CUDA headers, so ufa needs no toolkit on the machine, only libnvrtc.

typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef int int32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;

#define UFA_INF __int_as_float(0x7f800000)
#define UFA_LOG2E 1.4426950408889634f
#define UFA_LN2 0.6931471805599453f

// Mirrors `FwdParams` in crates/ufa/src/cuda/kernels.rs (#[repr(C)]); change both together.
// Strides are in elements of each tensor's dtype.
struct FwdParams {
    const void* q;
    const void* k;
    const void* v;
    void* out;
    float* lse;          // null: not requested
    const float* alibi;  // null: no ALiBi
    const void* mask;    // null: no mask
    int64_t q_stride[3];  // batch, seq, head
    int64_t k_stride[3];
    int64_t v_stride[3];
    int64_t o_stride[3];
    int64_t lse_stride[3];    // batch, head, seq
    int64_t alibi_stride[2];  // batch, head
    int64_t mask_stride[4];   // batch, head, query, key (0 where broadcast)
    int32_t batch, seqlen_q, seqlen_kv, heads_q, group;  // group = heads_q / heads_kv
    int32_t head_dim, head_dim_v;
    int32_t diag_offset;   // query i is aligned with key i + diag_offset
    int32_t window_left;   // keys visible: [i + off - left, i + off + right]; large = unbounded
    int32_t window_right;
    float scale;
    float scale_log2;      // scale * log2(e): scores live in the log2 domain so exp2 is one MUFU op
    float softcap;         // 0 = off
    int32_t mask_kind;     // MaskKind
    int32_t num_m_blocks;
};

static_assert(sizeof(FwdParams) == 288, "FwdParams must match its Rust mirror");

// Mirrors `BwdParams` in crates/ufa/src/cuda/backward.rs. `f` describes the forward (its `out`
// and `lse` are inputs here); the workspace arrays are ufa's own, allocated per call on the
// caller's stream.
struct BwdParams {
    FwdParams f;
    const void* dout;
    void* dq;
    void* dk;
    void* dv;
    float* lse2;      // [batch, heads_q, seqlen_q_pad]: LSE in the log2 domain, +inf for rows
                      // that see no key (so exp2(s - lse2) = 0), +inf past the end
    float* delta;     // same shape: rowsum(dO * O), 0 past the end
    float* dq_accum;  // [batch, heads_q, seqlen_q, head_dim] fp32, tensor-core path only
    int32_t* order;   // [batch, heads_q, num_m_blocks] turn counters, deterministic mode only
    int64_t do_stride[3];  // batch, seq, head
    int64_t dq_stride[3];
    int64_t dk_stride[3];
    int64_t dv_stride[3];
    int32_t seqlen_q_pad;  // multiple of 128
    int32_t block_m;       // query rows per tensor-core m-block (order counters are per block)
    int32_t num_m_blocks;
    int32_t deterministic;  // DqOrder: 0 = dQ adds in any order (atomics), 1 = in turns by
                            // key block, 2 = in turns with each key block's walk rotated
    int32_t dtype_out, dtype_dout, dtype_dq, dtype_dk, dtype_dv, dtype_in;  // DTypeKind
};

static_assert(sizeof(BwdParams) == 288 + 8 * 8 + 4 * 3 * 8 + 4 * 4 + 6 * 4, "BwdParams must match its Rust mirror");

// Element types chosen at run time, for the memory-bound row kernels where a template per
// combination of input, output and gradient dtypes would buy nothing.
enum DTypeKind { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };

enum MaskKind { MASK_NONE = 0, MASK_BOOL = 1, MASK_F16 = 2, MASK_BF16 = 3, MASK_F32 = 4 };

// Element types are tags: storage is raw 16-bit patterns, converted with PTX, so no cuda_fp16.h.
struct Half { typedef uint16_t storage; static constexpr bool is_bf16 = false; };
struct BFloat16 { typedef uint16_t storage; static constexpr bool is_bf16 = true; };
struct Float32 { typedef float storage; };

__device__ __forceinline__ float half_to_float(uint16_t h) {
    float f;
    asm("{ .reg .b16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ float bf16_to_float(uint16_t h) {
    return __uint_as_float(((uint32_t)h) << 16);
}
__device__ __forceinline__ uint16_t float_to_half(float f) {
    uint16_t h;
    asm("{ .reg .b16 t; cvt.rn.f16.f32 t, %1; mov.b16 %0, t; }" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ uint16_t float_to_bf16(float f) {
    uint16_t h;
    asm("{ .reg .b16 t; cvt.rn.bf16.f32 t, %1; mov.b16 %0, t; }" : "=h"(h) : "f"(f));
    return h;
}

template <typename T> struct Convert;
template <> struct Convert<Half> {
    static __device__ __forceinline__ float load(const void* p, int64_t i) {
        return half_to_float(((const uint16_t*)p)[i]);
    }
    static __device__ __forceinline__ void store(void* p, int64_t i, float x) {
        ((uint16_t*)p)[i] = float_to_half(x);
    }
    // Two floats as one register of two halves, `lo` in the low 16 bits (mma operand order).
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        uint32_t r;
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
};
template <> struct Convert<BFloat16> {
    static __device__ __forceinline__ float load(const void* p, int64_t i) {
        return bf16_to_float(((const uint16_t*)p)[i]);
    }
    static __device__ __forceinline__ void store(void* p, int64_t i, float x) {
        ((uint16_t*)p)[i] = float_to_bf16(x);
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        uint32_t r;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
};
template <> struct Convert<Float32> {
    static __device__ __forceinline__ float load(const void* p, int64_t i) {
        return ((const float*)p)[i];
    }
    static __device__ __forceinline__ void store(void* p, int64_t i, float x) {
        ((float*)p)[i] = x;
    }
};

__device__ __forceinline__ float load_as(const void* p, int64_t i, int kind) {
    switch (kind) {
        case DT_F16: return half_to_float(((const uint16_t*)p)[i]);
        case DT_BF16: return bf16_to_float(((const uint16_t*)p)[i]);
        default: return ((const float*)p)[i];
    }
}
__device__ __forceinline__ void store_as(void* p, int64_t i, int kind, float x) {
    switch (kind) {
        case DT_F16: ((uint16_t*)p)[i] = float_to_half(x); break;
        case DT_BF16: ((uint16_t*)p)[i] = float_to_bf16(x); break;
        default: ((float*)p)[i] = x; break;
    }
}

// Offset of row `i` of head `h` of batch entry `b` in a [b, s, h, d] tensor with (batch, seq,
// head) strides `st`.
__device__ __forceinline__ int64_t row_offset(const int64_t (&st)[3], int b, int i, int h) {
    return b * st[0] + (int64_t)i * st[1] + h * st[2];
}

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// The score transformations beyond scale (softcap, ALiBi, mask), in the order the reference
// applies them; returns the score in the log2 domain, or -inf for a hidden key. The backward
// also needs d(score)/d(scale * dot), which only softcap changes: with GRAD it goes to `dfac`.
template <bool GRAD = false>
__device__ __forceinline__ float modify_score(const FwdParams& p, float dot, int b, int h, int i,
                                              int j, float slope, float* dfac = nullptr) {
    float x = dot * p.scale;
    if (p.softcap > 0.f) {
        const float t = tanhf(x / p.softcap);
        x = p.softcap * t;
        if constexpr (GRAD) *dfac = 1.f - t * t;
    } else if constexpr (GRAD) {
        *dfac = 1.f;
    }
    if (p.alibi != nullptr) x -= slope * fabsf((float)(i + p.diag_offset - j));
    if (p.mask_kind != MASK_NONE) {
        const int64_t at = b * p.mask_stride[0] + h * p.mask_stride[1] +
                           i * p.mask_stride[2] + j * p.mask_stride[3];
        switch (p.mask_kind) {
            case MASK_BOOL:
                if (((const uint8_t*)p.mask)[at] == 0) return -UFA_INF;
                break;
            case MASK_F16: x += half_to_float(((const uint16_t*)p.mask)[at]); break;
            case MASK_BF16: x += bf16_to_float(((const uint16_t*)p.mask)[at]); break;
            default: x += ((const float*)p.mask)[at]; break;
        }
    }
    return x * UFA_LOG2E;
}

__device__ __forceinline__ float alibi_slope(const FwdParams& p, int b, int h) {
    return p.alibi != nullptr ? p.alibi[b * p.alibi_stride[0] + h * p.alibi_stride[1]] : 0.f;
}

// Keys [lo, hi) that some query row of [row0, row_last] may see by the causal/window band.
__device__ __forceinline__ void band_of_rows(const FwdParams& p, int row0, int row_last, int& lo,
                                             int& hi) {
    lo = max(0, row0 + p.diag_offset - p.window_left);
    hi = min(p.seqlen_kv, row_last + p.diag_offset + p.window_right + 1);
}

// Bitwise ands: three compares and a select per score, where short-circuit evaluation made
// the compiler branch around each one (SASS of the Hopper backward, 2026-11-26).
__device__ __forceinline__ bool in_band(const FwdParams& p, int i, int j) {
    const int c = i + p.diag_offset;
    return (j < p.seqlen_kv) & (j >= c - p.window_left) & (j <= c + p.window_right);
}

// What a tensor-core forward block works on: query rows [m0, m_last] of head h of batch
// entry b (blocks run heaviest first: the last query blocks have the most causal keys), and
// the key tiles of `block_n` its band reaches, [n_first, n_last] (empty if n_last < n_first).
// Head pointers are for 16-bit inputs.
struct FwdBlock {
    int b, h, hk, m0, m_last, n_first, n_last;
    const uint16_t *q, *k, *v;
};

__device__ __forceinline__ FwdBlock fwd_block(const FwdParams& p, int block_m, int block_n) {
    FwdBlock w;
    w.h = blockIdx.y;
    w.b = blockIdx.z;
    w.hk = w.h / p.group;
    w.m0 = (p.num_m_blocks - 1 - blockIdx.x) * block_m;
    w.m_last = min(w.m0 + block_m, p.seqlen_q) - 1;
    w.q = (const uint16_t*)p.q + w.b * p.q_stride[0] + w.h * p.q_stride[2];
    w.k = (const uint16_t*)p.k + w.b * p.k_stride[0] + w.hk * p.k_stride[2];
    w.v = (const uint16_t*)p.v + w.b * p.v_stride[0] + w.hk * p.v_stride[2];
    int key_lo, key_hi;
    band_of_rows(p, w.m0, w.m_last, key_lo, key_hi);
    // Tiles wholly outside the causal/window band are never loaded.
    w.n_first = key_lo / block_n;
    w.n_last = key_hi > key_lo ? (key_hi - 1) / block_n : w.n_first - 1;
    return w;
}

// Hides the scores of one 16-row accumulator tile (rows `row` and `row + 8` for this thread,
// N_TILES n8 tiles of keys from n0, `at(t, e)` the thread's element e of tile t) outside the
// band or past the last key; with SCORE_MOD, applies the score modifiers (softcap, ALiBi, mask)
// and turns the scores into the log2 domain. Without it raw scores stay unscaled (the kernels
// fuse the scale into exp2's argument) and tiles that `visible` says lie wholly inside the band
// are left alone.
template <bool SCORE_MOD, int N_TILES, typename At>
__device__ __forceinline__ void mask_scores(const FwdParams& p, int row, int n0, int quad, int b,
                                            int h, float slope, bool visible, At at) {
    if (!SCORE_MOD && visible) return;
#pragma unroll
    for (int t = 0; t < N_TILES; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int i = row + (e / 2) * 8;
            const int j = n0 + t * 8 + quad * 2 + (e % 2);
            float& x = at(t, e);
            if (SCORE_MOD) {
                x = in_band(p, i, j) && i < p.seqlen_q ? modify_score(p, x, b, h, i, j, slope)
                                                       : -UFA_INF;
            } else if (!in_band(p, i, j)) {
                x = -UFA_INF;
            }
        }
}

// Whether every key of [n0, n0 + block_n) is inside the band of every query row of
// [m0, m_last] (and before the last key): such tiles need no per-element test.
__device__ __forceinline__ bool tile_visible(const FwdParams& p, int m0, int m_last, int n0,
                                             int block_n) {
    return n0 >= m_last + p.diag_offset - p.window_left &&
           n0 + block_n - 1 <= m0 + p.diag_offset + p.window_right && n0 + block_n <= p.seqlen_kv;
}

// The forward's epilogue for query row i, from the mma accumulator layout (each lane of a quad
// holds columns 8 t + 2 quad, +1 of every n8 tile t): adds up the quad's partial row sums,
// writes O / sum (`pair(t, x, y)` gives the unnormalised pair of tile t) and the LSE. Rows that
// saw no key get 0 and -inf. Every lane must call it (the sum is shuffled across the quad).
template <typename T, int O_TILES, typename Pair>
__device__ __forceinline__ void store_fwd_row(const FwdParams& p, int b, int h, int i, int quad,
                                              float sum, float row_max, Pair pair) {
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    if (i >= p.seqlen_q) return;
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    uint16_t* out_row = (uint16_t*)p.out + row_offset(p.o_stride, b, i, h);
#pragma unroll
    for (int t = 0; t < O_TILES; ++t) {
        float x, y;
        pair(t, x, y);
        *(uint32_t*)(out_row + t * 8 + quad * 2) = Convert<T>::pack(x * inv, y * inv);
    }
    if (p.lse != nullptr && quad == 0) {
        p.lse[b * p.lse_stride[0] + h * p.lse_stride[1] + (int64_t)i * p.lse_stride[2]] =
            sum > 0.f ? (row_max + log2f(sum)) * UFA_LN2 : -UFA_INF;
    }
}
