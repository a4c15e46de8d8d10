// Shared by every ufa kernel: element conversions, row addressing and the few PTX
// instructions the kernels use. Self-contained on purpose: NVRTC compiles it with no CUDA
// headers, so ufa needs no toolkit on the machine, only libnvrtc. The parameter blocks, enums
// and constants shared with the host come from ufa_abi.cuh, generated from
// crates/ufa/src/cuda/abi.rs.
#pragma once
#include "ufa_abi.cuh"

#define UFA_INF __int_as_float(0x7f800000)
#define UFA_LOG2E 1.4426950408889634f
#define UFA_LN2 0.6931471805599453f

// Element types are tags: storage is raw 16-bit patterns, converted with PTX, so no cuda_fp16.h.
// fp32 has two tags for the tensor-core forward (fwd_sm80.cu): Float32 splits each product into
// three TF32 products (3xTF32, fp32 accuracy), Tf32 rounds each operand to TF32 once (the
// faster mode PyTorch's allow_tf32 asks for). The CUDA-core kernels take Float32.
struct Half {
    typedef uint16_t storage;
    static constexpr bool is_bf16 = false, is_f32 = false, tf32_split = false;
};
struct BFloat16 {
    typedef uint16_t storage;
    static constexpr bool is_bf16 = true, is_f32 = false, tf32_split = false;
};
struct Float32 {
    typedef float storage;
    static constexpr bool is_bf16 = false, is_f32 = true, tf32_split = true;
};
struct Tf32 {
    typedef float storage;
    static constexpr bool is_bf16 = false, is_f32 = true, tf32_split = false;
};

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

// Eight elements of a row from element i, n of them left in the row, for the streaming kernels
// (bound by memory), in two steps so that a thread can have several loads in flight before it
// waits on any: fetch8 issues one 16-byte load (two for fp32) and returns true where all eight
// are there and 16-byte aligned (else it loads nothing: the caller reads the elements one at a
// time, in a loop of its own that keeps the kernel's registers for the fast path); widen8
// converts what fetch8 loaded.
__device__ __forceinline__ bool aligned16(const void* p) {
    return ((unsigned long long)p & 15) == 0;
}
struct Fetched8 {
    uint4 w[2];  // w[1] for fp32 only
};
__device__ __forceinline__ bool fetch8(const void* p, int64_t i, int n, int kind, Fetched8& f) {
    const bool f32 = kind == DT_F32;
    const char* at = (const char*)p + i * (f32 ? 4 : 2);
    if (n < 8 || !aligned16(at)) return false;
    f.w[0] = ((const uint4*)at)[0];
    if (f32) f.w[1] = ((const uint4*)at)[1];
    return true;
}
__device__ __forceinline__ void widen8(int kind, const Fetched8& f, float (&x)[8]) {
    if (kind == DT_F32) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            x[k] = __uint_as_float((&f.w[0].x)[k]);
            x[4 + k] = __uint_as_float((&f.w[1].x)[k]);
        }
        return;
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const uint32_t w = (&f.w[0].x)[k];
        const uint16_t lo = w & 0xffffu, hi = w >> 16;
        x[2 * k] = kind == DT_F16 ? half_to_float(lo) : bf16_to_float(lo);
        x[2 * k + 1] = kind == DT_F16 ? half_to_float(hi) : bf16_to_float(hi);
    }
}
// The store of fetch8 and widen8: elements i .. i + min(n, 8) - 1.
__device__ __forceinline__ void store8_as(void* p, int64_t i, int n, int kind,
                                          const float (&x)[8]) {
    if (kind == DT_F32) {
        float* f = (float*)p + i;
        if (n >= 8 && aligned16(f)) {
            ((float4*)f)[0] = make_float4(x[0], x[1], x[2], x[3]);
            ((float4*)f)[1] = make_float4(x[4], x[5], x[6], x[7]);
            return;
        }
    } else {
        uint16_t* u = (uint16_t*)p + i;
        if (n >= 8 && aligned16(u)) {
            uint32_t w[4];
#pragma unroll
            for (int k = 0; k < 4; ++k)
                w[k] = kind == DT_F16 ? Convert<Half>::pack(x[2 * k], x[2 * k + 1])
                                      : Convert<BFloat16>::pack(x[2 * k], x[2 * k + 1]);
            *(uint4*)u = make_uint4(w[0], w[1], w[2], w[3]);
            return;
        }
    }
#pragma unroll
    for (int k = 0; k < 8; ++k)
        if (k < n) store_as(p, i + k, kind, x[k]);
}

// Offset of row `i` of head `h` of batch entry `b` in a [b, s, h, d] tensor with (batch, seq,
// head) strides `st` (a packed batch's rows count from its first row, with batch stride 0).
__device__ __forceinline__ int64_t row_offset(const int64_t (&st)[3], int64_t b, int64_t i,
                                              int64_t h) {
    return b * st[0] + i * st[1] + h * st[2];
}

// Element offset of the LSE of row i of head h of batch entry b (LSE strides: batch, head, row).
__device__ __forceinline__ int64_t lse_offset(const int64_t (&st)[3], int64_t b, int64_t h,
                                              int64_t i) {
    return b * st[0] + h * st[1] + i * st[2];
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

// Programmatic dependent launch (sm_90+; nothing before, where the host launches dependents
// plainly): a grid lets the grid queued after it begin once all its blocks have said so or
// exited (pdl_launch_dependents), and that dependent grid waits for the grid before it to
// complete, its memory visible, before it touches what that grid writes (pdl_wait). The host
// launches such dependents with driver::launch (Order::Programmatic).
__device__ __forceinline__ void pdl_launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Thread-block clusters (sm_90+): the blocks of a cluster run at once on one GPC and may read
// each other's shared memory. Before sm_90 (where the host launches no clusters) every block
// is a cluster of one, so these reduce to the block's own shared memory and a block barrier.
__device__ __forceinline__ uint32_t cluster_rank() {
    uint32_t r = 0;
#if __CUDA_ARCH__ >= 900
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
#endif
    return r;
}
__device__ __forceinline__ uint32_t cluster_blocks() {
    uint32_t n = 1;
#if __CUDA_ARCH__ >= 900
    asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(n));
#endif
    return n;
}
// Every thread of every block of the cluster arrives; shared-memory writes before it are
// visible to the whole cluster after it (release / acquire).
__device__ __forceinline__ void cluster_sync() {
#if __CUDA_ARCH__ >= 900
    asm volatile(
        "barrier.cluster.arrive.release.aligned;\n\t"
        "barrier.cluster.wait.acquire.aligned;" ::: "memory");
#else
    __syncthreads();
#endif
}
// The address in block `rank`'s shared memory of what lies at `addr` (a shared::cta address)
// in this block's.
__device__ __forceinline__ uint32_t cluster_map(uint32_t addr, uint32_t rank) {
#if __CUDA_ARCH__ >= 900
    uint32_t r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(addr), "r"(rank));
    return r;
#else
    return addr;
#endif
}
__device__ __forceinline__ float cluster_load(uint32_t addr) {
    float x;
#if __CUDA_ARCH__ >= 900
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(x) : "r"(addr) : "memory");
#else
    asm volatile("ld.shared.f32 %0, [%1];" : "=f"(x) : "r"(addr) : "memory");
#endif
    return x;
}
__device__ __forceinline__ float4 cluster_load4(uint32_t addr) {
    float4 v;
#if __CUDA_ARCH__ >= 900
    asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "r"(addr)
                 : "memory");
#else
    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "r"(addr)
                 : "memory");
#endif
    return v;
}
