/* Shared by the fuzz targets of the C ABI (fuzz/targets/): reading the fuzzer's bytes,
 * guarded host memory, tensor descriptors built from bytes, and the checks every call gets.
 *
 * Memory. Every tensor, shape array, stride array and parameter struct handed to the library
 * lies at the very end of a mapping whose next page is PROT_NONE, so a read or write one byte
 * past what the harness describes faults at once, even from the library's Rust code, which
 * AddressSanitizer cannot instrument on stable Rust. A descriptor the harness classifies as
 * invalid (negative sizes, an extent past 2^63/8 elements, a bad ndim, ...) points at the guard
 * page itself: the library must reject it before touching a byte.
 *
 * Verdicts. A call aborts the process (a crash the fuzzer records) when a panic reached the C
 * boundary (UFA_STATUS_INTERNAL: missing validation), when it returns an unknown status or an
 * error without a message, when it accepts a descriptor the harness knows is invalid, or when a
 * failed call wrote to any memory (the API promises that nothing is written on failure). */
#ifndef UFA_FUZZ_HARNESS_H
#define UFA_FUZZ_HARNESS_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "ufa.h"

#define FZ_PAGE 4096u
/* Bytes one tensor slot holds: inputs past it are skipped, so every call stays small. */
#define FZ_SLOT_BYTES (1u << 20)
#define FZ_SLOTS 24
#define FZ_SMALL_SLOTS 96
/* Valid descriptors with a dimension or element count beyond these are skipped: they are
 * legal but would make one execution slow (a broadcast stride 0 costs no memory). */
#define FZ_DIM_CAP 64
#define FZ_NUMEL_CAP (1u << 14)

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

/* ---- The fuzzer's bytes ---------------------------------------------------------------- */

typedef struct {
    const uint8_t* p;
    size_t n;
} fz_in;

/* Past the end every read is 0, which every generator below maps to its most ordinary choice:
 * a short input is a valid call. */
static inline uint8_t fz_u8(fz_in* in) {
    if (in->n == 0) return 0;
    in->n--;
    return *in->p++;
}

static inline uint32_t fz_u32(fz_in* in) {
    uint32_t x = 0;
    for (int i = 0; i < 4; i++) x |= (uint32_t)fz_u8(in) << (8 * i);
    return x;
}

static inline uint64_t fz_u64(fz_in* in) {
    uint64_t lo = fz_u32(in);
    return lo | ((uint64_t)fz_u32(in) << 32);
}

/* lo + (byte mod (hi - lo + 1)): small ranges from one byte; lo when the range is empty. */
static inline int64_t fz_range(fz_in* in, int64_t lo, int64_t hi) {
    if (hi < lo) return lo;
    return lo + (int64_t)(fz_u8(in) % (uint64_t)(hi - lo + 1));
}

/* Values that break size arithmetic. */
static const int64_t fz_interesting[] = {
    0, 1, -1, 2, -2, 3, 7, 8, 16, 255, 256, 4096, 65535, 65536,
    INT32_MAX, (int64_t)INT32_MAX + 1, INT32_MIN, UINT32_MAX, (int64_t)UINT32_MAX + 1,
    (int64_t)1 << 40, (int64_t)1 << 59, ((int64_t)1 << 60) - 1, (int64_t)1 << 60,
    ((int64_t)1 << 61) + 1, (int64_t)1 << 62, INT64_MAX / 8, INT64_MAX / 8 + 1, INT64_MAX / 2,
    INT64_MAX, INT64_MIN, INT64_MIN + 1,
};
#define FZ_N_INTERESTING (sizeof fz_interesting / sizeof fz_interesting[0])

static inline int64_t fz_int(fz_in* in) {
    uint8_t b = fz_u8(in);
    if (b < 0xf0) return fz_interesting[b % FZ_N_INTERESTING];
    return (int64_t)fz_u64(in);
}

/* A float from a short list of the awkward ones, or raw bits. */
static inline float fz_float(fz_in* in) {
    static const float special[] = {0.0f, 1.0f, -1.0f, 0.5f, 1e-30f, 1e30f, -1e30f, 3.4e38f,
                                    1e-45f, -0.0f, 0.125f, 30.0f, 2.0f};
    uint8_t b = fz_u8(in);
    if (b < 0xe0) return special[b % (sizeof special / sizeof special[0])];
    uint32_t bits = fz_u32(in);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* ---- Guarded memory -------------------------------------------------------------------- */

typedef struct {
    uint8_t* end; /* first byte of the guard page */
    size_t cap;
} fz_region;

static fz_region fz_slots[FZ_SLOTS];
static fz_region fz_small[FZ_SMALL_SLOTS];
static int fz_small_used;
/* The bytes a slot held before the call, to prove a failed call wrote nothing. */
static uint8_t* fz_shadow[FZ_SLOTS];
static size_t fz_slot_used[FZ_SLOTS];

static void fz_map(fz_region* r, size_t cap) {
    size_t total = FZ_PAGE + cap + FZ_PAGE;
    uint8_t* base = (uint8_t*)mmap(NULL, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED || mprotect(base + FZ_PAGE, cap, PROT_READ | PROT_WRITE) != 0) {
        perror("fuzz harness: mmap");
        abort();
    }
    r->end = base + FZ_PAGE + cap;
    r->cap = cap;
}

static void fz_init_memory(void) {
    static int done = 0;
    if (done) return;
    done = 1;
    for (int i = 0; i < FZ_SLOTS; i++) {
        fz_map(&fz_slots[i], FZ_SLOT_BYTES);
        fz_shadow[i] = (uint8_t*)malloc(FZ_SLOT_BYTES);
    }
    for (int i = 0; i < FZ_SMALL_SLOTS; i++) fz_map(&fz_small[i], FZ_PAGE);
}

/* A pointer to the guard page: reading or writing through it faults. */
static inline void* fz_guard(void) { return fz_small[FZ_SMALL_SLOTS - 1].end; }

/* `bytes` (at most a page) ending exactly at a guard page, zeroed; `bytes` should be a multiple
 * of the alignment the contents need. */
static void* fz_small_alloc(size_t bytes) {
    if (bytes > FZ_PAGE) bytes = FZ_PAGE;
    if (fz_small_used >= FZ_SMALL_SLOTS - 1) {
        fprintf(stderr, "fuzz harness: out of small slots\n");
        abort();
    }
    uint8_t* p = fz_small[fz_small_used++].end - bytes;
    memset(p, 0, bytes);
    return p;
}

/* A copy of `n` bytes of `src` in guarded memory. */
static void* fz_small_copy(const void* src, size_t n) {
    void* p = fz_small_alloc(n);
    if (n) memcpy(p, src, n);
    return p;
}

/* ---- Tensor descriptors ---------------------------------------------------------------- */

enum fz_class {
    FZ_VALID = 0, /* a legal descriptor of memory the harness allocated */
    FZ_INVALID,   /* the library must reject it without touching its memory */
};

typedef struct {
    ufa_tensor t;
    int64_t shape[8], strides[8];
    int shape_len; /* entries of shape/strides given to the library */
    int explicit_strides;
    int null_shape, null_data;
    int klass;
    size_t bytes;  /* extent of a valid descriptor, in bytes */
    int slot;      /* -1: none */
    size_t offset; /* bytes from the slot's base */
    int alias_of;  /* index of the tensor whose slot it shares, or -1 */
    int on_cuda;   /* invalid only for being a CUDA tensor */
    int misalign;  /* data one byte off its element alignment (rejected unless bool) */
    int nbytes_mode; /* t.nbytes: 0 unknown, 1 exact, 2 more, 3 fewer than the view reaches */
    int used;
} fz_tensor;

#define FZ_MAX_TENSORS 20

typedef struct {
    fz_tensor t[FZ_MAX_TENSORS];
    int n;
    int any_invalid; /* some descriptor the call reads is FZ_INVALID */
    int skip;        /* some descriptor is legal but too large for this harness */
} fz_call;

static inline size_t fz_elem_bytes(int32_t dtype) {
    switch (dtype) {
    case UFA_DTYPE_F16:
    case UFA_DTYPE_BF16: return 2;
    case UFA_DTYPE_BOOL: return 1;
    default: return 4; /* f32, i32, and invalid codes (never allocated) */
    }
}

static void fz_call_reset(fz_call* c) {
    memset(c, 0, sizeof *c);
    fz_small_used = 0;
    memset(fz_slot_used, 0, sizeof fz_slot_used);
}

/* Judges a descriptor as the library must, with exact 128-bit arithmetic: the library rejects
 * ndim outside 1..4, NULL pointers, bad codes, negative sizes or strides, and extents whose
 * last element lies at or past 2^63/8 elements. */
static void fz_classify(fz_call* c, fz_tensor* x) {
    const ufa_tensor* t = &x->t;
    x->klass = FZ_INVALID;
    x->bytes = 0;
    if (x->null_shape || t->ndim < 1 || t->ndim > UFA_MAX_DIMS) return;
    if (t->device_type != UFA_DEVICE_CPU && (t->device_type != UFA_DEVICE_CUDA || t->device_ordinal < 0)) return;
    if (t->dtype < UFA_DTYPE_F16 || t->dtype > UFA_DTYPE_I32) return;
    int nd = t->ndim;
    int any_zero = 0;
    for (int i = 0; i < nd; i++) {
        if (x->shape[i] < 0 || (x->explicit_strides && x->strides[i] < 0)) return;
        if (x->shape[i] == 0) any_zero = 1;
    }
    if (x->null_data && !any_zero) return; /* NULL is the data of empty tensors only */
    unsigned __int128 strides[8];
    if (x->explicit_strides) {
        for (int i = 0; i < nd; i++) strides[i] = (unsigned __int128)x->strides[i];
    } else {
        /* Row-major strides; the library also rejects a product of sizes past 2^64. */
        unsigned __int128 acc = 1;
        for (int i = nd - 1; i >= 0; i--) {
            strides[i] = acc;
            acc *= (unsigned __int128)(x->shape[i] > 1 ? x->shape[i] : 1);
            if (acc > (unsigned __int128)UINT64_MAX) {
                if (!any_zero) return; /* must be rejected */
                c->skip = 1;           /* may be rejected or not: empty either way */
                return;
            }
        }
    }
    unsigned __int128 last = 0;
    for (int i = 0; i < nd; i++)
        if (!any_zero) last += (unsigned __int128)(x->shape[i] - 1) * strides[i];
    if (!any_zero && last + 1 > (unsigned __int128)(INT64_MAX / 8)) return; /* must be rejected */
    /* A well-formed CUDA descriptor: no call can run it here (no GPU), but a query that reads
     * only the descriptor may accept it. */
    if (t->device_type == UFA_DEVICE_CUDA) {
        x->on_cuda = 1;
        return;
    }
    x->klass = FZ_VALID;
    unsigned __int128 numel = 1;
    for (int i = 0; i < nd; i++) {
        if (x->shape[i] > FZ_DIM_CAP) {
            c->skip = 1;
            return;
        }
        numel *= (unsigned __int128)x->shape[i];
    }
    if (numel > FZ_NUMEL_CAP) {
        c->skip = 1;
        return;
    }
    unsigned __int128 bytes = any_zero ? 0 : (last + 1) * fz_elem_bytes(t->dtype);
    if (bytes > FZ_SLOT_BYTES / 2) {
        c->skip = 1;
        return;
    }
    x->bytes = (size_t)bytes;
}

/* A descriptor of role `want_shape` (ndim entries) and dtype, usually exactly that, contiguous or
 * strided; one byte in eight picks something hostile. Returns its index in the call. */
static int fz_tensor_gen(fz_in* in, fz_call* c, int32_t dtype, int ndim, const int64_t* want_shape) {
    if (c->n >= FZ_MAX_TENSORS) abort();
    int idx = c->n++;
    fz_tensor* x = &c->t[idx];
    memset(x, 0, sizeof *x);
    x->slot = -1;
    x->alias_of = -1;
    x->used = 1;
    x->t.dtype = dtype;
    x->t.device_type = UFA_DEVICE_CPU;
    x->t.ndim = ndim;
    for (int i = 0; i < ndim; i++) x->shape[i] = want_shape[i];
    uint8_t mode = fz_u8(in);
    x->nbytes_mode = mode / 24 % 4; /* from the same byte, so older corpus inputs keep their meaning */
    switch (mode % 24) {
    default: break; /* as wanted, row-major, NULL strides */
    case 1:
    case 2: { /* explicit strides: row-major with padding in each dimension */
        x->explicit_strides = 1;
        int64_t acc = 1;
        for (int i = ndim - 1; i >= 0; i--) {
            x->strides[i] = acc;
            int64_t pad = i == ndim - 1 ? 0 : fz_range(in, 0, 3);
            acc = acc * (x->shape[i] > 0 ? x->shape[i] : 1) + pad;
        }
        break;
    }
    case 3: { /* permuted storage order (last dim kept innermost) */
        x->explicit_strides = 1;
        int order[8];
        for (int i = 0; i < ndim; i++) order[i] = i;
        for (int i = ndim - 2; i > 0; i--) {
            int j = (int)fz_range(in, 0, i);
            int tmp = order[i];
            order[i] = order[j];
            order[j] = tmp;
        }
        int64_t acc = 1;
        x->strides[ndim - 1] = 1;
        acc = x->shape[ndim - 1] > 0 ? x->shape[ndim - 1] : 1;
        for (int k = ndim - 2; k >= 0; k--) {
            int d = order[k];
            x->strides[d] = acc;
            acc *= x->shape[d] > 0 ? x->shape[d] : 1;
        }
        break;
    }
    case 4: /* broadcast: one stride 0 */
        x->explicit_strides = 1;
        {
            int64_t acc = 1;
            for (int i = ndim - 1; i >= 0; i--) {
                x->strides[i] = acc;
                acc *= x->shape[i] > 0 ? x->shape[i] : 1;
            }
            x->strides[fz_range(in, 0, ndim - 1)] = 0;
        }
        break;
    case 5: /* one size off by a little */
        x->shape[fz_range(in, 0, ndim - 1)] += fz_range(in, -1, 2);
        break;
    case 6: /* small random sizes and strides */
        x->t.ndim = (int32_t)fz_range(in, 1, 4);
        x->explicit_strides = fz_u8(in) & 1;
        for (int i = 0; i < x->t.ndim; i++) {
            x->shape[i] = fz_range(in, 0, 9);
            x->strides[i] = fz_range(in, 0, 40);
        }
        break;
    case 7: /* one hostile size */
        x->shape[fz_range(in, 0, ndim - 1)] = fz_int(in);
        break;
    case 8: /* one hostile stride */
        x->explicit_strides = 1;
        for (int i = 0; i < ndim; i++) x->strides[i] = 1;
        x->strides[fz_range(in, 0, ndim - 1)] = fz_int(in);
        break;
    case 9: { /* hostile ndim */
        static const int32_t bad[] = {0, -1, 5, 6, 8, 100, INT32_MAX, INT32_MIN};
        x->t.ndim = bad[fz_u8(in) % 8];
        break;
    }
    case 10: { /* another or no dtype */
        static const int32_t codes[] = {0, 1, 2, 3, 4, 5, 6, -1, 255, INT32_MAX, INT32_MIN};
        x->t.dtype = codes[fz_u8(in) % 11];
        break;
    }
    case 11: { /* another device */
        static const int32_t devs[] = {1, 2, -1, INT32_MAX};
        x->t.device_type = devs[fz_u8(in) % 4];
        x->t.device_ordinal = (int32_t)fz_int(in);
        break;
    }
    case 12: /* NULL data or shape */
        if (fz_u8(in) & 1) x->null_data = 1;
        else x->null_shape = 1;
        break;
    case 13: /* every size and stride hostile */
        x->explicit_strides = fz_u8(in) & 1;
        for (int i = 0; i < ndim; i++) {
            x->shape[i] = fz_int(in);
            x->strides[i] = fz_int(in);
        }
        break;
    case 14: /* shares the memory of an earlier tensor, a few elements in */
        if (idx > 0) {
            x->alias_of = (int)fz_range(in, 0, idx - 1);
            x->offset = (size_t)fz_range(in, 0, 7) * fz_elem_bytes(dtype);
        }
        break;
    case 16: /* a data pointer one byte past an element boundary */
        x->misalign = 1;
        break;
    case 15: /* inner stride other than 1 */
        x->explicit_strides = 1;
        {
            int64_t inner = fz_range(in, 0, 3), acc = 1;
            for (int i = ndim - 1; i >= 0; i--) {
                x->strides[i] = i == ndim - 1 ? inner : acc;
                acc *= (x->shape[i] > 0 ? x->shape[i] : 1) * (i == ndim - 1 && inner > 1 ? inner : 1);
            }
        }
        break;
    }
    x->shape_len = x->t.ndim < 0 ? 0 : (x->t.ndim > 8 ? 8 : x->t.ndim);
    fz_classify(c, x);
    return idx;
}

/* Gives each descriptor its memory (a fresh slot, or the slot of the tensor it aliases, sized
 * for every tensor in it and ending at the guard page), fills the memory from the input, and
 * copies the shape and stride arrays into guarded memory of exactly their length. Returns 0
 * when the input is to be skipped. */
static int fz_layout(fz_in* in, fz_call* c) {
    if (c->skip) return 0;
    size_t need[FZ_SLOTS] = {0}, align[FZ_SLOTS] = {0};
    int next = 0;
    for (int i = 0; i < c->n; i++) {
        fz_tensor* x = &c->t[i];
        if (x->klass != FZ_VALID) {
            c->any_invalid = 1;
            continue;
        }
        int owner = x->alias_of;
        while (owner >= 0 && c->t[owner].klass != FZ_VALID) owner = c->t[owner].alias_of;
        if (owner >= 0) {
            x->slot = c->t[owner].slot;
        } else {
            x->offset = 0;
            if (next >= FZ_SLOTS) abort();
            x->slot = next++;
        }
        if (x->misalign) {
            x->offset += 1;
            if (fz_elem_bytes(x->t.dtype) > 1) c->any_invalid = 1;
        }
        size_t end = x->offset + x->bytes, a = fz_elem_bytes(x->t.dtype);
        if (end > need[x->slot]) need[x->slot] = end;
        if (a > align[x->slot]) align[x->slot] = a;
    }
    uint32_t seed = fz_u32(in) | 1;
    uint8_t special = fz_u8(in);
    for (int s = 0; s < next; s++) {
        size_t a = align[s] ? align[s] : 1;
        need[s] = (need[s] + a - 1) / a * a;
        fz_slot_used[s] = need[s];
        uint8_t* base = fz_slots[s].end - need[s];
        /* Small finite values, with the odd NaN, infinity or huge value when asked for. */
        for (size_t b = 0; b + 4 <= need[s]; b += 4) {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            uint32_t w = 0x3c000000u | (seed & 0x80ffffffu); /* |x| < 1 in f32 and both halves */
            if (special && (seed >> 24) % 61 == special % 61) {
                static const uint32_t odd[] = {0x7fc00000u, 0x7f800000u, 0xff800000u, 0x7f7fffffu,
                                               0x7c007c00u, 0x00000001u};
                w = odd[special % 6];
            }
            memcpy(base + b, &w, 4);
        }
        for (size_t b = need[s] & ~(size_t)3; b < need[s]; b++) base[b] = (uint8_t)seed;
    }
    for (int i = 0; i < c->n; i++) {
        fz_tensor* x = &c->t[i];
        if (x->klass == FZ_VALID)
            x->t.data = fz_slots[x->slot].end - need[x->slot] + x->offset;
        else
            x->t.data = fz_guard();
        if (x->null_data) x->t.data = NULL;
        /* The allocation size: unknown, exact, larger, or too small (which must be refused). */
        size_t b = x->bytes;
        switch (x->nbytes_mode) {
        case 0: x->t.nbytes = 0; break;
        case 1: x->t.nbytes = b; break;
        case 2: x->t.nbytes = b + 1 + (size_t)(seed % 64); break;
        case 3:
            x->t.nbytes = b > 1 ? b - 1 - (size_t)(seed % (b - 1)) : b;
            if (x->klass == FZ_VALID && b > 1) c->any_invalid = 1;
            break;
        }
        x->t.shape = x->null_shape ? NULL
                                   : (const int64_t*)fz_small_copy(x->shape, sizeof(int64_t) * (size_t)x->shape_len);
        x->t.strides = x->explicit_strides
                           ? (const int64_t*)fz_small_copy(x->strides, sizeof(int64_t) * (size_t)x->shape_len)
                           : NULL;
    }
    for (int s = next; s < FZ_SLOTS; s++) fz_slot_used[s] = 0;
    return 1;
}

/* The descriptor itself in guarded memory (so is every struct the library reads). */
static const ufa_tensor* fz_desc(fz_call* c, int idx) {
    return (const ufa_tensor*)fz_small_copy(&c->t[idx].t, sizeof(ufa_tensor));
}

/* Element `i` (row-major over the descriptor's own shape) of a valid int32 tensor. */
static int32_t* fz_i32_at(fz_tensor* x, int64_t i) {
    int64_t off = 0;
    for (int d = x->t.ndim - 1; d >= 0; d--) {
        int64_t n = x->shape[d] > 0 ? x->shape[d] : 1;
        int64_t idx = i % n;
        i /= n;
        int64_t stride;
        if (x->explicit_strides) {
            stride = x->strides[d];
        } else {
            stride = 1;
            for (int e = d + 1; e < x->t.ndim; e++) stride *= x->shape[e] > 1 ? x->shape[e] : 1;
        }
        off += idx * stride;
    }
    return (int32_t*)x->t.data + off;
}

static int64_t fz_numel(const fz_tensor* x) {
    int64_t n = 1;
    for (int d = 0; d < x->t.ndim; d++) n *= x->shape[d];
    return n;
}

/* Writes `values` (then the input's bytes) into the elements of an int32 metadata tensor,
 * when it is a valid one. With `hostile`, one element gets a hostile value instead. */
static void fz_fill_i32(fz_in* in, fz_call* c, int idx, const int32_t* values, int64_t n_values) {
    fz_tensor* x = &c->t[idx];
    if (x->klass != FZ_VALID || x->t.dtype != UFA_DTYPE_I32 || x->bytes == 0 || x->misalign) return;
    int64_t n = fz_numel(x);
    for (int64_t i = 0; i < n; i++) *fz_i32_at(x, i) = i < n_values ? values[i] : (int32_t)fz_range(in, -1, 8);
    uint8_t b = fz_u8(in);
    if (n > 0 && b >= 0xe0) *fz_i32_at(x, (int64_t)fz_u8(in) % n) = (int32_t)fz_int(in);
}

/* With FUZZ_DEBUG set, prints every descriptor of the call (for writing up a finding). */
static void fz_dump(const fz_call* c) {
    if (!getenv("FUZZ_DEBUG")) return;
    for (int i = 0; i < c->n; i++) {
        const fz_tensor* x = &c->t[i];
        fprintf(stderr, "tensor %d: %s dtype=%d device=%d/%d ndim=%d data=%p shape=", i,
                x->klass == FZ_VALID ? "valid" : "invalid", x->t.dtype, x->t.device_type, x->t.device_ordinal,
                x->t.ndim, x->t.data);
        for (int d = 0; d < x->shape_len; d++) fprintf(stderr, "%s%lld", d ? "," : "[", (long long)x->shape[d]);
        fprintf(stderr, "] strides=");
        if (!x->explicit_strides) fprintf(stderr, "NULL");
        for (int d = 0; x->explicit_strides && d < x->shape_len; d++)
            fprintf(stderr, "%s%lld", d ? "," : "[", (long long)x->strides[d]);
        fprintf(stderr, "%s bytes=%zu slot=%d offset=%zu\n", x->explicit_strides ? "]" : "", x->bytes, x->slot,
                x->offset);
    }
}

/* Records the slots' contents so that a failed call can be shown to have written nothing. */
static void fz_snapshot(const fz_call* c) {
    fz_dump(c);
    for (int s = 0; s < FZ_SLOTS; s++)
        if (fz_slot_used[s]) memcpy(fz_shadow[s], fz_slots[s].end - fz_slot_used[s], fz_slot_used[s]);
}

static void fz_fail(const char* what, const char* call, int st) {
    fprintf(stderr, "\n*** fuzz finding in %s: %s (status %d: %s; message: %s)\n", call, what, st,
            ufa_status_string(st), ufa_last_error_message());
    abort();
}

/* The verdict on one ufa_* call's status; `must_fail` when the harness knows it is invalid. */
static void fz_check(const char* call, int st, int must_fail) {
    if (st == UFA_STATUS_INTERNAL) fz_fail("a panic reached the C boundary", call, st);
    if (st < UFA_STATUS_SUCCESS || st > UFA_STATUS_INTERNAL) fz_fail("unknown status code", call, st);
    if (st == UFA_STATUS_SUCCESS && must_fail) fz_fail("accepted an invalid descriptor", call, st);
    if (st != UFA_STATUS_SUCCESS) {
        const char* m = ufa_last_error_message();
        if (m == NULL || m[0] == '\0') fz_fail("an error without a message", call, st);
        if (strstr(m, "panic")) fz_fail("a panic message", call, st);
        for (int s = 0; s < FZ_SLOTS; s++)
            if (fz_slot_used[s] && memcmp(fz_shadow[s], fz_slots[s].end - fz_slot_used[s], fz_slot_used[s]))
                fz_fail("a failed call wrote to its tensors", call, st);
    }
}

/* A context per CPU kernel family this machine runs (0 = the best one, 1 = portable), one
 * thread each: small calls run inline and executions stay deterministic. */
static ufa_context* fz_context(uint8_t which) {
    static ufa_context* ctx[2];
    which &= 1;
    if (!ctx[which]) {
        ufa_context_options o = ufa_context_options_default();
        o.num_threads = 1;
        o.cpu_isa = which ? "portable" : NULL;
        if (ufa_context_create(&o, &ctx[which]) != UFA_STATUS_SUCCESS) {
            fprintf(stderr, "fuzz harness: context: %s\n", ufa_last_error_message());
            abort();
        }
    }
    return ctx[which];
}

/* The sizes released headers gave ufa_attention_params: 64 (before fp32_precision), 72
 * (before the dropout fields) and the current one. The library reads each; older ones get the
 * defaults for the fields they lack (their tensor fields all lie in the first 64 bytes). */
static int fz_params_size_known(uint32_t size) {
    return size == 64 || size == 72 || size == sizeof(ufa_attention_params);
}

/* A parameter struct in guarded memory of the size its struct_size claims (at least the size
 * field, at most a page), or NULL; `*ok` is cleared when the library must reject it. */
static const ufa_attention_params* fz_params(fz_in* in, fz_call* c, const int64_t* lse_shape, int lse_ndim,
                                             int64_t batch, int64_t heads_q, int64_t seqlen_q, int64_t seqlen_kv,
                                             int* ok) {
    uint8_t b = fz_u8(in);
    if (b == 1) return NULL;
    ufa_attention_params p = ufa_attention_params_default();
    uint8_t flags = fz_u8(in);
    p.causal = flags & 1 ? (flags & 2 ? 1 : (int32_t)fz_int(in)) : 0;
    if (flags & 4) p.softmax_scale = fz_float(in);
    if (flags & 8) p.softcap = fz_float(in);
    if (flags & 16) p.causal_alignment = (flags & 32) ? UFA_CAUSAL_TOP_LEFT : (int32_t)fz_int(in);
    if (flags & 64) p.deterministic = 1;
    if (flags & 128) { /* dropout: a rate (often valid, sometimes anything) and a generator state */
        uint8_t d = fz_u8(in);
        p.dropout_p = d & 1 ? fz_float(in) : (float)(d >> 1) / 128.0f;
        p.dropout_seed = fz_u64(in);
        p.dropout_offset = fz_u64(in);
    }
    uint8_t w = fz_u8(in);
    if (w & 1) p.window_left = w & 2 ? fz_range(in, -2, 8) : fz_int(in);
    if (w & 4) p.window_right = w & 8 ? fz_range(in, -2, 8) : fz_int(in);
    if (w & 16) { /* ALiBi slopes [heads_q] or [batch, heads_q] */
        int64_t s2[2] = {batch, heads_q};
        int two = (w & 32) != 0;
        p.alibi_slopes = (const ufa_tensor*)(intptr_t)(fz_tensor_gen(in, c, UFA_DTYPE_F32, 1 + two, two ? s2 : s2 + 1) + 1);
    }
    uint8_t m = fz_u8(in);
    if (m & 1) { /* a mask broadcastable to [batch, heads_q, seqlen_q, seqlen_kv] */
        int64_t full[4] = {batch, heads_q, seqlen_q, seqlen_kv}, shape[4];
        int nd = 1 + (int)((m >> 1) & 3);
        for (int i = 0; i < nd; i++) shape[i] = (m >> (3 + i)) & 1 ? 1 : full[4 - nd + i];
        static const int32_t mdt[] = {UFA_DTYPE_BOOL, UFA_DTYPE_F32, UFA_DTYPE_F16, UFA_DTYPE_BF16};
        p.mask = (const ufa_tensor*)(intptr_t)(fz_tensor_gen(in, c, mdt[fz_u8(in) & 3], nd, shape) + 1);
    }
    if (lse_shape && (m & 128)) p.lse = (const ufa_tensor*)(intptr_t)(fz_tensor_gen(in, c, UFA_DTYPE_F32, lse_ndim, lse_shape) + 1);
    uint32_t size = (uint32_t)sizeof p;
    uint8_t sz = fz_u8(in);
    if (sz >= 0xf0) {
        static const uint32_t sizes[] = {0, 4, 8, 56, 60, 63, 65, 72, 128, 4096, 4097, UINT32_MAX};
        size = sz == 0xff ? fz_u32(in) : sizes[sz % 12];
    }
    p.struct_size = size;
    if (!fz_params_size_known(size)) *ok = 0;
    /* A rate outside [0, 1) is refused where the struct is large enough to hold it. */
    if (size >= offsetof(ufa_attention_params, dropout_p) + sizeof p.dropout_p &&
        fz_params_size_known(size) && !(p.dropout_p >= 0.0f && p.dropout_p < 1.0f))
        *ok = 0;
    /* The tensor fields hold indices + 1 until the tensors have memory: see fz_params_fix. */
    size_t bytes = size < 4 ? 4 : (size > FZ_PAGE ? FZ_PAGE : size);
    bytes = (bytes + 7) & ~(size_t)7;
    void* mem = fz_small_alloc(bytes);
    memcpy(mem, &p, bytes < sizeof p ? bytes : sizeof p);
    return (const ufa_attention_params*)mem;
}

/* Replaces the index placeholders of a params struct by guarded descriptors, after fz_layout. */
static void fz_params_fix(fz_call* c, const ufa_attention_params* cp) {
    if (!cp || (cp->struct_size < sizeof(ufa_attention_params) && !fz_params_size_known(cp->struct_size))) {
        /* A truncated struct: its tensor fields (if any bytes of them are there) are garbage
         * the library must never follow; point them at the guard page. */
        if (cp && cp->struct_size >= 8) {
            ufa_attention_params* p = (ufa_attention_params*)cp;
            size_t have = cp->struct_size;
            if (have > offsetof(ufa_attention_params, alibi_slopes)) p->alibi_slopes = (const ufa_tensor*)fz_guard();
            if (have > offsetof(ufa_attention_params, mask)) p->mask = (const ufa_tensor*)fz_guard();
            if (have > offsetof(ufa_attention_params, lse)) p->lse = (const ufa_tensor*)fz_guard();
        }
        return;
    }
    ufa_attention_params* p = (ufa_attention_params*)cp;
    if (p->alibi_slopes) p->alibi_slopes = fz_desc(c, (int)(intptr_t)p->alibi_slopes - 1);
    if (p->mask) p->mask = fz_desc(c, (int)(intptr_t)p->mask - 1);
    if (p->lse) p->lse = fz_desc(c, (int)(intptr_t)p->lse - 1);
}

#endif /* UFA_FUZZ_HARNESS_H */
