/* Fuzz target `mfa`: the UMFA-compatible API (include/mfa.h). Buffers are wrapped caller memory
 * of exactly the size they claim (ending at a guard page), ufa-allocated memory, or wrapped with
 * shape and strides; the four attention calls get fuzzed sizes, precisions, transpose flags and
 * masks. Unlike ufa_tensor, an mfa buffer knows its size, so sizes may be hostile too: the
 * library must compare what a call needs with what each buffer holds before reading it. */
#include "../harness.h"
#include "mfa.h"

/* Calls whose sizes might be accepted are skipped beyond this many multiply-adds (a broadcast
 * stride-0 buffer makes a huge call cost no memory). */
#define WORK_CAP ((unsigned __int128)1 << 22)

enum { ROLE_Q, ROLE_K, ROLE_V, ROLE_O, ROLE_LSE };

typedef struct {
    uint32_t B, Sq, Skv, H;
    uint16_t D;
    int transpose[4];
} dims_t;

/* The shape a call uses a buffer as, in the buffer's own dimension order. */
static int logical(const dims_t* d, int role, int64_t* shape) {
    if (role == ROLE_LSE) {
        shape[0] = d->B, shape[1] = d->H, shape[2] = d->Sq;
        return 3;
    }
    int64_t seq = (role == ROLE_Q || role == ROLE_O) ? d->Sq : d->Skv;
    if (d->transpose[role]) shape[0] = d->B, shape[1] = seq, shape[2] = d->H, shape[3] = d->D;
    else shape[0] = d->B, shape[1] = d->H, shape[2] = seq, shape[3] = d->D;
    return 4;
}

/* Bytes a row-major buffer of `shape` needs (exact), or -1 past 2^64 elements. */
static __int128 row_major_bytes(const int64_t* shape, int nd, size_t elem) {
    unsigned __int128 n = 1, prod = 1;
    for (int i = 0; i < nd; i++) {
        n *= (unsigned __int128)shape[i];
        prod *= (unsigned __int128)(shape[i] > 1 ? shape[i] : 1);
        if (prod > (unsigned __int128)UINT64_MAX) return -1;
    }
    return (__int128)(n * elem);
}

typedef struct {
    mfa_buffer_t h;
    /* 1: the library must reject any call using this buffer for its role; 0: it may accept. */
    int must_fail;
    int strided;
} buf_t;

static mfa_buffer_t g_bufs[16];
static int g_nbufs;
static int g_slot;

/* `size` bytes of guarded host memory, filled from the input. */
static void* host_memory(fz_in* in, size_t size) {
    if (g_slot >= FZ_SLOTS) abort();
    uint8_t* p = fz_slots[g_slot].end - size;
    fz_slot_used[g_slot++] = size;
    uint32_t seed = fz_u8(in) | 0x100u;
    for (size_t i = 0; i + 4 <= size; i += 4) {
        seed = seed * 1664525u + 1013904223u;
        uint32_t w = 0x3c000000u | (seed & 0x80ffffffu);
        memcpy(p + i, &w, 4);
    }
    for (size_t i = size & ~(size_t)3; i < size; i++) p[i] = 0x3c;
    return p;
}

/* `attention`: an attention call, after fz_snapshot: a failure must have written nothing. */
static void check_mfa(const char* call, int st, int must_fail, int attention) {
    if (st == MFA_ERROR_EXECUTION_FAILED) fz_fail("a panic or backend failure (CPU only here)", call, st);
    if (st < MFA_SUCCESS || st > MFA_ERROR_EXECUTION_FAILED || st == MFA_ERROR_KERNEL_COMPILATION)
        fz_fail("an unexpected status code", call, st);
    if (st == MFA_SUCCESS && must_fail) fz_fail("accepted an invalid call", call, st);
    if (st != MFA_SUCCESS) {
        const char* m = ufa_last_error_message();
        if (m == NULL || m[0] == '\0') fz_fail("an error without a message", call, st);
        if (strstr(m, "panic")) fz_fail("a panic message", call, st);
        if (strcmp(mfa_error_string(st), "") == 0) fz_fail("an empty error string", call, st);
        for (int s = 0; attention && s < FZ_SLOTS; s++)
            if (fz_slot_used[s] && memcmp(fz_shadow[s], fz_slots[s].end - fz_slot_used[s], fz_slot_used[s]))
                fz_fail("a failed call wrote to its buffers", call, st);
    }
}

/* A buffer for `role` of the call `d` with elements of `elem` bytes. */
static buf_t make_buffer(fz_in* in, mfa_context_t ctx, const dims_t* d, int role, size_t elem) {
    buf_t b = {NULL, 0, 0};
    int64_t shape[4];
    int nd = logical(d, role, shape);
    __int128 need = row_major_bytes(shape, nd, elem);
    uint8_t mode = fz_u8(in);
    int st = MFA_ERROR_INVALID_ARGS;
    size_t size;
    if (mode < 0xb0 || (mode >= 0xd0 && mode < 0xe0)) {
        /* Caller memory of the size the call needs, or near it, or hostile. */
        __int128 want = need < 0 ? 64 : need;
        if (mode >= 0x80 && mode < 0xb0) want += fz_range(in, -8, 8);
        if (mode >= 0xd0) want = (__int128)(fz_int(in) & 0xfffff);
        /* A call too large for the harness gets a small buffer it must refuse (filling half a
         * MiB per buffer would cost more than the call). */
        if (want > FZ_SLOT_BYTES / 2) want = 64;
        if (want < 0) want = 0;
        size = (size_t)want;
        void* mem = size ? host_memory(in, size) : fz_guard();
        st = mfa_buffer_from_ptr(ctx, mem, size, &b.h);
        check_mfa("mfa_buffer_from_ptr", st, size == 0, 0);
        b.must_fail = st != MFA_SUCCESS || need < 0 || need > (__int128)size;
    } else if (mode < 0xd0) {
        /* Wrapped with shape and strides: the call's shape (or not), strides of any kind. */
        int64_t st_shape[8], strides[8];
        uint32_t ndim = (uint32_t)nd;
        memcpy(st_shape, shape, sizeof shape);
        uint8_t how = fz_u8(in);
        uint64_t acc = 1; /* wraps for hostile sizes: any stride is a fair input */
        for (int i = nd - 1; i >= 0; i--) {
            strides[i] = (int64_t)acc;
            acc *= (uint64_t)(shape[i] > 0 ? shape[i] : 1) + (i < nd - 1 && (how & 1) ? 1 : 0);
        }
        if (how & 2) strides[fz_range(in, 0, nd - 1)] = 0;
        if (how & 4) strides[fz_range(in, 0, nd - 1)] = fz_int(in);
        if (how & 8) st_shape[fz_range(in, 0, nd - 1)] = fz_int(in);
        if ((how & 0x30) == 0x30) ndim = (uint32_t)fz_int(in);
        int with_strides = !(how & 0x40);
        /* The extent the strides reach, as the library computes it; the memory is that much. */
        unsigned __int128 last = 0;
        int any_zero = 0, bad = ndim < 1 || ndim > 4;
        for (uint32_t i = 0; !bad && i < ndim; i++) {
            if (st_shape[i] < 0 || (with_strides && strides[i] < 0)) bad = 1;
            if (st_shape[i] == 0) any_zero = 1;
        }
        int64_t rm[4];
        for (uint32_t i = 0; !bad && !with_strides && i < ndim; i++) {
            unsigned __int128 s = 1;
            for (uint32_t j = i + 1; j < ndim; j++) s *= (unsigned __int128)(st_shape[j] > 1 ? st_shape[j] : 1);
            if (s > (unsigned __int128)INT64_MAX) bad = 1;
            else rm[i] = (int64_t)s;
        }
        for (uint32_t i = 0; !bad && !any_zero && i < ndim; i++)
            last += (unsigned __int128)(st_shape[i] - 1) * (unsigned __int128)(with_strides ? strides[i] : rm[i]);
        __int128 ext = bad ? 64 : any_zero ? 0 : (__int128)((last + 1) * elem);
        int known = !bad && ext <= FZ_SLOT_BYTES / 2; /* the library must take it */
        if (ext > FZ_SLOT_BYTES / 2) ext = 64;
        int shrunk = fz_u8(in) >= 0xf0;
        if (shrunk) ext -= fz_range(in, 1, 8);
        size = ext < 0 ? 0 : (size_t)ext;
        void* mem = size ? host_memory(in, size) : fz_guard();
        size_t n = ndim > 8 ? 8 : ndim;
        const int64_t* sh = (const int64_t*)fz_small_copy(st_shape, n * sizeof(int64_t));
        const int64_t* sd = with_strides ? (const int64_t*)fz_small_copy(strides, n * sizeof(int64_t)) : NULL;
        st = mfa_buffer_from_ptr_with_strides(ctx, mem, size, sh, sd, ndim, &b.h);
        check_mfa("mfa_buffer_from_ptr_with_strides", st, bad || size == 0, 0);
        b.strided = 1;
        b.must_fail = st != MFA_SUCCESS || ndim != (uint32_t)nd || memcmp(st_shape, shape, sizeof shape) != 0 ||
                      (known && shrunk && !any_zero);
    } else if (mode < 0xf8) {
        /* ufa-allocated memory (not guarded: it is ufa's own); sizes near what is needed. */
        __int128 want = need < 0 ? 64 : need + fz_range(in, -4, 4);
        if (want > FZ_SLOT_BYTES / 2) want = 64;
        size = want < 0 ? 0 : (size_t)want;
        st = mfa_create_buffer(ctx, size, &b.h);
        check_mfa("mfa_create_buffer", st, size == 0, 0);
        b.must_fail = st != MFA_SUCCESS || need < 0 || need > (__int128)size;
    } else if (mode < 0xfc) {
        /* Sizes no allocator grants (checked before any allocation is tried). */
        static const uint64_t absurd[] = {UINT64_MAX, (uint64_t)INT64_MAX + 1, (uint64_t)INT64_MAX};
        st = mfa_create_buffer(ctx, (size_t)absurd[mode % 3], &b.h);
        check_mfa("mfa_create_buffer", st, 1, 0);
        b.must_fail = 1;
    } else {
        b.must_fail = 1; /* NULL */
    }
    if (st == MFA_SUCCESS) {
        if (mfa_buffer_contents(b.h) == NULL) fz_fail("a buffer without contents", "mfa_buffer_contents", 0);
        g_bufs[g_nbufs++] = b.h;
    } else if (b.h != NULL) {
        fz_fail("wrote *buffer on failure", "mfa_buffer_*", st);
    }
    return b;
}

static void destroy_all(void) {
    for (int i = 0; i < g_nbufs; i++) mfa_destroy_buffer(g_bufs[i]);
    g_nbufs = 0;
}

static mfa_precision_t precision(fz_in* in, int* bad) {
    uint8_t b = fz_u8(in);
    if (b < 0xf0) return b % 3;
    mfa_precision_t p = b == 0xff ? (int)fz_int(in) : 3 + (b & 3); /* INT8, INT4, 5, 6 */
    if (p < MFA_PRECISION_FP16 || p > MFA_PRECISION_FP32) *bad = 1;
    return p;
}

static size_t elem_of(mfa_precision_t p) { return p == MFA_PRECISION_FP32 ? 4 : 2; }

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    fz_init_memory();
    fz_in in = {data, size};
    fz_call call;
    fz_call_reset(&call);
    g_slot = 0;
    g_nbufs = 0;
    static mfa_context_t own_ctx;
    if (!own_ctx && mfa_create_context(&own_ctx) != MFA_SUCCESS) abort();

    uint8_t op = fz_u8(&in);
    mfa_context_t ctx = (op & 0x10) ? own_ctx : (mfa_context_t)fz_context(op >> 5);
    int call_kind = op % 4; /* forward, masked, with_lse, backward */
    dims_t d;
    uint8_t hostile = fz_u8(&in);
    d.B = (uint32_t)fz_range(&in, 1, 2);
    d.H = (uint32_t)fz_range(&in, 1, 3);
    d.Sq = (uint32_t)fz_range(&in, 1, 6);
    d.Skv = (uint32_t)fz_range(&in, 1, 6);
    d.D = (uint16_t)fz_range(&in, 1, 16);
    if (hostile >= 0xe0) { /* one size of any value, 0 and 2^32-1 included */
        uint32_t x = (uint32_t)fz_int(&in);
        switch (hostile % 5) {
        case 0: d.B = x; break;
        case 1: d.H = x; break;
        case 2: d.Sq = x; break;
        case 3: d.Skv = x; break;
        default: d.D = (uint16_t)x; break;
        }
    }
    uint8_t tr = fz_u8(&in);
    for (int i = 0; i < 4; i++) d.transpose[i] = (tr >> i) & 1;
    int bad = 0;
    mfa_precision_t in_p = precision(&in, &bad), mid_p = precision(&in, &bad);
    mfa_precision_t out_p = call_kind == 0 || call_kind == 1 ? precision(&in, &bad) : in_p;
    float scale = fz_u8(&in) < 0xe0 ? 0.0f : fz_float(&in);
    bool causal = fz_u8(&in) & 1;
    size_t ie = elem_of(in_p), oe = elem_of(out_p);

    buf_t q = make_buffer(&in, ctx, &d, ROLE_Q, ie), k = make_buffer(&in, ctx, &d, ROLE_K, ie);
    buf_t v = make_buffer(&in, ctx, &d, ROLE_V, ie), o = make_buffer(&in, ctx, &d, ROLE_O, oe);
    int must_fail = bad || q.must_fail || k.must_fail || v.must_fail || o.must_fail;
    int strided = q.strided || k.strided || v.strided || o.strided;
    buf_t lse = {NULL, 0, 0}, dout = lse, dq = lse, dk = lse, dv = lse;
    uint8_t lse_mode = 0;
    if (call_kind >= 2) {
        lse_mode = fz_u8(&in);
        lse = make_buffer(&in, ctx, &d, ROLE_LSE, 4);
        /* NULL: the forward simply writes none; the backward needs it. */
        if (lse.h != NULL || call_kind == 3) must_fail |= lse.must_fail;
        strided |= lse.strided;
    }
    if (call_kind == 3) {
        dout = make_buffer(&in, ctx, &d, ROLE_O, ie);
        dq = make_buffer(&in, ctx, &d, ROLE_Q, ie);
        dk = make_buffer(&in, ctx, &d, ROLE_K, ie);
        dv = make_buffer(&in, ctx, &d, ROLE_V, ie);
        must_fail |= dout.must_fail || dq.must_fail || dk.must_fail || dv.must_fail;
        strided |= dout.strided || dq.strided || dk.strided || dv.strided;
    }
    /* The same buffer in two roles (an output over an input, say). */
    uint8_t share = fz_u8(&in);
    if (share >= 0xf0) {
        buf_t* all[] = {&q, &k, &v, &o, &dq, &dk, &dv, &dout};
        int n = call_kind == 3 ? 8 : 4;
        *all[share % n] = *all[(share >> 2) % n];
        /* Sizes were judged for each buffer's own role; now only NULL is sure to fail. */
        must_fail = bad;
        for (int i = 0; i < n; i++) must_fail |= all[i]->h == NULL;
        if (call_kind == 3) must_fail |= lse.h == NULL;
    }
    unsigned __int128 work = (unsigned __int128)d.B * d.H * d.Sq * d.Skv * d.D;
    /* Each (batch, head) pair and each row also cost a fixed setup: bound them too. */
    unsigned __int128 rows = (unsigned __int128)d.B * d.H * ((uint64_t)d.Sq + d.Skv);
    if (!must_fail && (work > WORK_CAP || (uint64_t)d.B * d.H > 64 || rows > 4096)) {
        destroy_all();
        return -1;
    }
    (void)strided;
    if (fz_u8(&in) >= 0xf8) ctx = NULL, must_fail = 1;
    fz_snapshot(&call);
    int st;
    switch (call_kind) {
    case 0:
        st = mfa_attention_forward(ctx, q.h, k.h, v.h, o.h, d.B, d.Sq, d.Skv, d.H, d.D, scale, causal, in_p, mid_p,
                                   out_p, d.transpose[0], d.transpose[1], d.transpose[2], d.transpose[3]);
        check_mfa("mfa_attention_forward", st, must_fail, 1);
        break;
    case 1: {
        /* A mask broadcastable to [B, H, Sq, Skv], its memory exactly mask_size_bytes. */
        uint8_t m = fz_u8(&in);
        int64_t full[4] = {d.B, d.H, d.Sq, d.Skv}, shape[8] = {0}, strides[8] = {0};
        uint32_t ndim = 1 + ((m >> 1) & 3);
        for (uint32_t i = 0; i < ndim; i++) shape[i] = (m >> (3 + i)) & 1 ? 1 : full[4 - ndim + i];
        static const int types[][2] = {{MFA_MASK_TYPE_BOOL, MFA_MASK_SCALAR_BYTE},
                                       {MFA_MASK_TYPE_ADDITIVE, MFA_MASK_SCALAR_FP32},
                                       {MFA_MASK_TYPE_ADDITIVE, MFA_MASK_SCALAR_FP16},
                                       {MFA_MASK_TYPE_ADDITIVE, MFA_MASK_SCALAR_BF16},
                                       {MFA_MASK_TYPE_NONE, MFA_MASK_SCALAR_BYTE},
                                       {MFA_MASK_TYPE_BOOL, MFA_MASK_SCALAR_FP32},
                                       {MFA_MASK_TYPE_ADDITIVE, MFA_MASK_SCALAR_BYTE},
                                       {7, 9}};
        uint8_t t = fz_u8(&in) % 8;
        int type = types[t][0], scalar = types[t][1];
        size_t me = scalar == MFA_MASK_SCALAR_BYTE ? 1 : scalar == MFA_MASK_SCALAR_FP32 ? 4 : 2;
        int mask_bad = t >= 5;
        uint8_t h = fz_u8(&in);
        int with_strides = h & 1;
        if (h & 2) shape[fz_range(&in, 0, ndim - 1)] = fz_int(&in), mask_bad = -1; /* may or may not fit */
        if (h & 4) ndim = (uint32_t)fz_int(&in), mask_bad = ndim < 1 || ndim > 4 ? 1 : -1;
        __int128 need = -1;
        if (with_strides) {
            uint64_t acc = 1; /* wraps for hostile shapes: any stride is a fair input */
            for (int i = (int)(ndim > 4 ? 4 : ndim) - 1; i >= 0; i--) {
                strides[i] = (h & 8) && shape[i] == 1 ? 0 : (int64_t)acc;
                acc *= shape[i] > 1 ? (uint64_t)shape[i] : 1;
            }
            if (h & 16) strides[fz_range(&in, 0, 3)] = fz_int(&in), mask_bad = mask_bad ? mask_bad : -1;
        }
        if (mask_bad == 0) need = row_major_bytes(shape, (int)ndim, me);
        __int128 msize = need < 0 ? 64 : need;
        /* Shorter than the mask needs: sure to fail only when the need is known. */
        if (fz_u8(&in) >= 0xf0) msize -= fz_range(&in, 1, 16), mask_bad = mask_bad == 0 ? 1 : mask_bad;
        if (msize > FZ_SLOT_BYTES / 2) msize = 64, mask_bad = mask_bad ? mask_bad : -1;
        if (msize < 0) msize = 0;
        void* mem = msize ? host_memory(&in, (size_t)msize) : fz_guard();
        size_t n = ndim > 8 ? 8 : ndim;
        const int64_t* sh = (const int64_t*)fz_small_copy(shape, n * sizeof(int64_t));
        const int64_t* sd = with_strides ? (const int64_t*)fz_small_copy(strides, n * sizeof(int64_t)) : NULL;
        if (fz_u8(&in) >= 0xf8) sh = NULL, mask_bad = 1;
        if (type == MFA_MASK_TYPE_NONE) mask_bad = 0; /* the mask arguments are ignored */
        /* A shortened size makes a mask with any empty dimension still fit. */
        if (mask_bad == 1 && need == 0 && sh != NULL && t < 5 && ndim >= 1 && ndim <= 4) mask_bad = -1;
        if (getenv("FUZZ_DEBUG"))
            fprintf(stderr, "mask: type=%d scalar=%d ndim=%u shape=[%lld,%lld,%lld,%lld] strides=%s[%lld,%lld,%lld,%lld] "
                    "size=%lld need=%lld bad=%d\n", type, scalar, ndim, (long long)shape[0], (long long)shape[1],
                    (long long)shape[2], (long long)shape[3], sd ? "" : "NULL", (long long)strides[0],
                    (long long)strides[1], (long long)strides[2], (long long)strides[3], (long long)msize,
                    (long long)need, mask_bad);
        fz_snapshot(&call);
        st = mfa_attention_forward_masked(ctx, q.h, k.h, v.h, o.h, d.B, d.Sq, d.Skv, d.H, d.D, scale, causal, in_p,
                                          mid_p, out_p, d.transpose[0], d.transpose[1], d.transpose[2],
                                          d.transpose[3], mem, (size_t)msize, sh, sd, ndim, type, scalar);
        check_mfa("mfa_attention_forward_masked", st, must_fail || mask_bad == 1, 1);
        break;
    }
    case 2:
        st = mfa_attention_forward_with_lse(ctx, q.h, k.h, v.h, o.h, lse.h, d.B, d.Sq, d.Skv, d.H, d.D, scale,
                                            causal, in_p, mid_p, d.transpose[0], d.transpose[1], d.transpose[2],
                                            d.transpose[3]);
        check_mfa("mfa_attention_forward_with_lse", st, must_fail, 1);
        break;
    default: {
        /* d_buffer is never touched: a pointer to the guard page proves it. */
        mfa_buffer_t scratch = (lse_mode & 1) ? (mfa_buffer_t)fz_guard() : NULL;
        st = mfa_attention_backward(ctx, dout.h, q.h, k.h, v.h, o.h, lse.h, dq.h, dk.h, dv.h, scratch, d.B, d.Sq,
                                    d.Skv, d.H, d.D, scale, causal, in_p, mid_p, d.transpose[0], d.transpose[1],
                                    d.transpose[2], d.transpose[3]);
        check_mfa("mfa_attention_backward", st, must_fail, 1);
        break;
    }
    }
    if (st == MFA_SUCCESS && ctx && !(mfa_get_gpu_latency(ctx) >= 0.0))
        fz_fail("a negative latency", "mfa_get_gpu_latency", st);
    destroy_all();
    return 0;
}
