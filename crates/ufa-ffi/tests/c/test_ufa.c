/* The native API (ufa.h): results against the float64 reference (every dtype, GQA, causal with
 * seq_q != seq_kv, strided layouts, LSE), and every status code, NULL argument and bad size
 * returning a status and a message without writing. */
#include "common.h"
#include "ufa.h"

static ufa_context* ctx;

static int dtype_code(enum elem t) {
    return t == E_F32 ? UFA_DTYPE_F32 : t == E_F16 ? UFA_DTYPE_F16 : UFA_DTYPE_BF16;
}

/* A CPU tensor descriptor over `shape` (kept by the caller) with optional strides. */
static ufa_tensor desc(void* data, int dtype, int ndim, const int64_t* shape, const int64_t* strides) {
    ufa_tensor t = {data, dtype, UFA_DEVICE_CPU, 0, ndim, shape, strides, 0};
    return t;
}

struct native_case {
    int64_t batch, seq_q, seq_kv, heads_q, heads_kv, head_dim;
    int causal;
    enum elem type;
    int heads_first; /* q, k, v, out stored as [b, h, s, d] and passed with permuted strides */
};

static void run_case(const struct native_case* c) {
    int64_t B = c->batch, SQ = c->seq_q, SK = c->seq_kv, HQ = c->heads_q, HK = c->heads_kv, D = c->head_dim;
    size_t nq = (size_t)(B * SQ * HQ * D), nk = (size_t)(B * SK * HK * D), es = elem_size(c->type);
    void *q = random_tensor(nq, c->type), *k = random_tensor(nk, c->type), *v = random_tensor(nk, c->type);
    void* out = poisoned(nq * es);
    float* lse = poisoned((size_t)(B * HQ * SQ) * 4);
    int64_t sq_shape[4] = {B, SQ, HQ, D}, sk_shape[4] = {B, SK, HK, D}, lse_shape[3] = {B, HQ, SQ};
    int64_t st_q[4], st_k[4];
    strides_of(SQ, HQ, D, c->heads_first, st_q);
    strides_of(SK, HK, D, c->heads_first, st_k);
    int dt = dtype_code(c->type);
    ufa_tensor tq = desc(q, dt, 4, sq_shape, st_q), tk = desc(k, dt, 4, sk_shape, st_k);
    ufa_tensor tv = desc(v, dt, 4, sk_shape, st_k), to = desc(out, dt, 4, sq_shape, st_q);
    ufa_tensor tl = desc(lse, UFA_DTYPE_F32, 3, lse_shape, NULL);
    ufa_attention_params p = ufa_attention_params_default();
    p.causal = c->causal;
    p.lse = &tl;
    ufa_status s = ufa_attention_forward(ctx, &tq, &tk, &tv, &to, &p, NULL);
    char what[160];
    snprintf(what, sizeof what, "b%lld sq%lld skv%lld hq%lld hkv%lld d%lld causal%d %s %s", (long long)B,
             (long long)SQ, (long long)SK, (long long)HQ, (long long)HK, (long long)D, c->causal,
             elem_name(c->type), c->heads_first ? "bhsd" : "bshd");
    CHECK(s == UFA_STATUS_SUCCESS, "%s: %s", what, ufa_last_error_message());
    if (s == UFA_STATUS_SUCCESS) {
        struct problem pr = {B, SQ, SK, HQ, HK, D, D, 0, c->causal, NULL};
        struct operand oq = {q, c->type, {0}}, ok = {k, c->type, {0}}, ov = {v, c->type, {0}};
        struct operand oo = {out, c->type, {0}};
        memcpy(oq.st, st_q, sizeof st_q);
        memcpy(oo.st, st_q, sizeof st_q);
        memcpy(ok.st, st_k, sizeof st_k);
        memcpy(ov.st, st_k, sizeof st_k);
        double *ref = malloc(nq * sizeof(double)), *ref_lse = malloc((size_t)(B * HQ * SQ) * sizeof(double));
        reference(&pr, &oq, &ok, &ov, ref, ref_lse);
        CHECK(all_written(out, nq * es, es), "%s: output not fully written", what);
        double err = rel_error(&oo, &pr, ref);
        CHECK(err < tolerance(c->type, c->type), "%s: relative error %.3g", what, err);
        double worst = 0;
        for (int64_t i = 0; i < B * HQ * SQ; i++) worst = fmax(worst, fabs(lse[i] - ref_lse[i]));
        CHECK(worst < 1e-3, "%s: lse error %.3g", what, worst);
        free(ref);
        free(ref_lse);
    }
    free(q); free(k); free(v); free(out); free(lse);
}

static void test_correctness(void) {
    const struct native_case cases[] = {
        {1, 1, 1, 1, 1, 32, 0, E_F32, 0},
        {2, 17, 17, 4, 1, 64, 1, E_F32, 0},    /* MQA */
        {1, 33, 129, 8, 2, 80, 1, E_F32, 1},   /* GQA 4, causal bottom-right, [b, h, s, d] */
        {1, 129, 17, 2, 2, 96, 0, E_F16, 0},
        {2, 40, 40, 8, 1, 128, 1, E_BF16, 1},  /* GQA 8 */
        {1, 24, 50, 2, 2, 192, 0, E_F16, 1},
        {1, 16, 16, 1, 1, 256, 1, E_BF16, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_case(&cases[i]);
}

/* Every score modifier the parameter struct carries (window, ALiBi, an additive and a boolean
 * mask) on one head, folded into the reference's bias. */
static void test_params(void) {
    enum { SQ = 13, SK = 29, D = 48 };
    const int64_t off = SK - SQ, left = 5;
    const float slope = 0.3f;
    float *q = random_tensor(SQ * D, E_F32), *k = random_tensor(SK * D, E_F32), *v = random_tensor(SK * D, E_F32);
    float *out = poisoned(SQ * D * 4), *add = random_tensor(SQ * SK, E_F32);
    unsigned char keep[SK];
    double bias[SQ * SK];
    for (int j = 0; j < SK; j++) keep[j] = j % 4 != 1;
    int64_t qs[4] = {1, SQ, 1, D}, ks[4] = {1, SK, 1, D}, one = 1, ms[2] = {SQ, SK}, bs[1] = {SK};
    ufa_tensor tq = desc(q, UFA_DTYPE_F32, 4, qs, NULL), tk = desc(k, UFA_DTYPE_F32, 4, ks, NULL);
    ufa_tensor tv = desc(v, UFA_DTYPE_F32, 4, ks, NULL), to = desc(out, UFA_DTYPE_F32, 4, qs, NULL);
    float slopes[1] = {slope};
    ufa_tensor ta = desc(slopes, UFA_DTYPE_F32, 1, &one, NULL), tm = desc(add, UFA_DTYPE_F32, 2, ms, NULL);
    ufa_tensor tb = desc(keep, UFA_DTYPE_BOOL, 1, bs, NULL); /* broadcast over query rows */
    ufa_attention_params p = ufa_attention_params_default();
    p.causal = 1;
    p.window_left = left;
    p.alibi_slopes = &ta;
    p.mask = &tm;
    /* The core takes one mask; run the boolean one as a second call and compare both. */
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1) p.mask = &tb;
        for (int64_t i = 0; i < SQ; i++)
            for (int64_t j = 0; j < SK; j++) {
                int64_t c = i + off; /* the key query i is aligned with */
                int visible = j <= c && j >= c - left && (pass == 0 || keep[j]);
                double mask = pass == 0 ? add[i * SK + j] : 0;
                bias[i * SK + j] = visible ? mask - slope * (double)llabs(c - j) : -INFINITY;
            }
        ufa_status s = ufa_attention_forward(ctx, &tq, &tk, &tv, &to, &p, NULL);
        CHECK(s == UFA_STATUS_SUCCESS, "params pass %d: %s", pass, ufa_last_error_message());
        struct problem pr = {1, SQ, SK, 1, 1, D, D, 0, 0, bias};
        struct operand oq = {q, E_F32, {0}}, ok = {k, E_F32, {0}}, ov = {v, E_F32, {0}}, oo = {out, E_F32, {0}};
        strides_of(SQ, 1, D, 0, oq.st);
        strides_of(SQ, 1, D, 0, oo.st);
        strides_of(SK, 1, D, 0, ok.st);
        strides_of(SK, 1, D, 0, ov.st);
        double ref[SQ * D], lse[SQ];
        reference(&pr, &oq, &ok, &ov, ref, lse);
        double err = rel_error(&oo, &pr, ref);
        CHECK(err < 1e-5, "params pass %d (window, ALiBi, %s mask): relative error %.3g", pass,
              pass ? "boolean" : "additive", err);
    }
    free(q); free(k); free(v); free(out); free(add);
}

/* Runs the forward on one tiny valid problem with one descriptor swapped, expecting `want`. */
struct tiny {
    float q[64], k[64], v[64], out[64];
    int64_t shape[4];
    ufa_tensor tq, tk, tv, to;
};

static void tiny_init(struct tiny* t) {
    for (int i = 0; i < 64; i++) t->q[i] = t->k[i] = t->v[i] = uniform();
    memset(t->out, 0xff, sizeof t->out);
    int64_t shape[4] = {1, 4, 1, 16};
    memcpy(t->shape, shape, sizeof shape);
    t->tq = desc(t->q, UFA_DTYPE_F32, 4, t->shape, NULL);
    t->tk = desc(t->k, UFA_DTYPE_F32, 4, t->shape, NULL);
    t->tv = desc(t->v, UFA_DTYPE_F32, 4, t->shape, NULL);
    t->to = desc(t->out, UFA_DTYPE_F32, 4, t->shape, NULL);
}

static void expect(ufa_status want, ufa_status got, const char* what, const char* needle) {
    CHECK(got == want, "%s: want %d (%s), got %d: %s", what, want, ufa_status_string(want), got,
          ufa_last_error_message());
    if (needle) CHECK(strstr(ufa_last_error_message(), needle) != NULL, "%s: message '%s' lacks '%s'", what,
                      ufa_last_error_message(), needle);
}

static void test_errors(void) {
    struct tiny t;
    tiny_init(&t);
    const ufa_status INVALID = UFA_STATUS_INVALID_ARGUMENT;
    /* NULL for every pointer argument. */
    expect(INVALID, ufa_attention_forward(NULL, &t.tq, &t.tk, &t.tv, &t.to, NULL, NULL), "ctx NULL", "ctx");
    expect(INVALID, ufa_attention_forward(ctx, NULL, &t.tk, &t.tv, &t.to, NULL, NULL), "q NULL", "q is NULL");
    expect(INVALID, ufa_attention_forward(ctx, &t.tq, NULL, &t.tv, &t.to, NULL, NULL), "k NULL", "k is NULL");
    expect(INVALID, ufa_attention_forward(ctx, &t.tq, &t.tk, NULL, &t.to, NULL, NULL), "v NULL", "v is NULL");
    expect(INVALID, ufa_attention_forward(ctx, &t.tq, &t.tk, &t.tv, NULL, NULL, NULL), "out NULL", "out is NULL");
    ufa_tensor bad = t.tq;
    bad.data = NULL;
    expect(INVALID, ufa_attention_forward(ctx, &bad, &t.tk, &t.tv, &t.to, NULL, NULL), "data NULL", "q: data is NULL");
    bad = t.tk;
    bad.shape = NULL;
    expect(INVALID, ufa_attention_forward(ctx, &t.tq, &bad, &t.tv, &t.to, NULL, NULL), "shape NULL", "k.shape");
    ufa_context* c = NULL;
    expect(INVALID, ufa_context_create(NULL, NULL), "create out NULL", "out");
    uint32_t n = 7;
    expect(INVALID, ufa_context_num_threads(NULL, &n), "num_threads ctx NULL", "ctx");
    expect(INVALID, ufa_context_num_threads(ctx, NULL), "num_threads out NULL", "out");
    expect(INVALID, ufa_device_count(NULL, UFA_DEVICE_CPU, &n), "device_count ctx NULL", "ctx");
    expect(INVALID, ufa_device_count(ctx, UFA_DEVICE_CPU, NULL), "device_count out NULL", "out");
    expect(INVALID, ufa_device_count(ctx, 9, &n), "device_count type 9", "device_type=9");
    expect(INVALID, ufa_context_cpu_isa(NULL, NULL), "cpu_isa NULL", NULL);
    CHECK(n == 7, "out-parameter written on failure");
    for (int i = 0; i < 9; i++) {
        const ufa_tensor* a[9] = {&t.tq, &t.tk, &t.tv, &t.to, &t.to, &t.tq, &t.tq, &t.tk, &t.tv};
        a[i] = NULL;
        expect(INVALID, ufa_attention_backward(ctx, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], NULL, NULL),
               "backward argument NULL", "is NULL");
    }
    expect(INVALID, ufa_attention_backward(NULL, &t.tq, &t.tk, &t.tv, &t.to, &t.to, &t.tq, &t.tq, &t.tk, &t.tv,
                                           NULL, NULL), "backward ctx NULL", "ctx is NULL");

    /* Dimensions: count, negative, zero, overflowing, mismatched. */
    bad = t.tq;
    bad.ndim = 0;
    expect(INVALID, ufa_attention_forward(ctx, &bad, &t.tk, &t.tv, &t.to, NULL, NULL), "ndim 0", "q.ndim=0");
    bad.ndim = 5;
    expect(INVALID, ufa_attention_forward(ctx, &bad, &t.tk, &t.tv, &t.to, NULL, NULL), "ndim 5", "q.ndim=5");
    bad.ndim = 3;
    expect(INVALID, ufa_attention_forward(ctx, &bad, &t.tk, &t.tv, &t.to, NULL, NULL), "ndim 3", "dimensions");
    int64_t neg[4] = {1, -4, 1, 16}, zero[4] = {1, 4, 0, 16}, huge[4] = {INT64_MAX, INT64_MAX, 1, 16};
    int64_t heads3[4] = {1, 4, 3, 16}, big[4] = {1, 4, 1, 16}, neg_st[4] = {64, 16, 16, -1};
    bad = t.tq;
    bad.shape = neg;
    expect(INVALID, ufa_attention_forward(ctx, &bad, &t.tk, &t.tv, &t.to, NULL, NULL), "negative", "q.shape[1]=-4");
    bad.shape = zero;
    expect(INVALID, ufa_attention_forward(ctx, &bad, &t.tk, &t.tv, &t.to, NULL, NULL), "zero heads", "heads_q)=0");
    bad.shape = huge;
    expect(INVALID, ufa_attention_forward(ctx, &bad, &t.tk, &t.tv, &t.to, NULL, NULL), "overflow", "memory");
    bad.shape = big;
    bad.strides = neg_st;
    expect(INVALID, ufa_attention_forward(ctx, &bad, &t.tk, &t.tv, &t.to, NULL, NULL), "negative stride",
           "q.strides[3]=-1");
    /* Found by fuzzing (fuzz/regressions/native/): a stride of a size-1 dimension addresses
     * nothing, but kernels scaled INT64_MAX by the element size and overflowed (a panic). */
    int64_t ones[4] = {1, 1, 1, 1}, huge_st[4] = {INT64_MAX, 1, 1, 1};
    ufa_tensor one[4] = {t.tq, t.tk, t.tv, t.to};
    for (int i = 0; i < 4; i++) one[i].shape = ones;
    one[1].strides = huge_st;
    expect(INVALID, ufa_attention_forward(ctx, &one[0], &one[1], &one[2], &one[3], NULL, NULL),
           "huge stride of a size-1 dimension", "k: shape [1, 1, 1, 1] with strides [9223372036854775807, 1, 1, 1]");
    CHECK(!all_written(t.out, sizeof t.out, 4), "a failed call wrote the output");
    /* Found by fuzzing (fuzz/regressions/mfa/): a data pointer not aligned for its dtype reached
     * the kernels' typed loads (undefined behaviour); it is an error before anything is read. */
    bad = t.tq;
    bad.data = (char*)t.q + 2;
    expect(INVALID, ufa_attention_forward(ctx, &bad, &t.tk, &t.tv, &t.to, NULL, NULL), "misaligned q",
           "q: data=");
    expect(INVALID, ufa_attention_forward(ctx, &bad, &t.tk, &t.tv, &t.to, NULL, NULL), "misaligned q",
           "is not aligned to 4 bytes, as f32 elements must be");
    CHECK(!all_written(t.out, sizeof t.out, 4), "a failed call wrote the output");
    /* heads_q=1 with k's heads=3: k.shape[2] must divide q.shape[2]. */
    bad = t.tk;
    bad.shape = heads3;
    expect(INVALID, ufa_attention_forward(ctx, &t.tq, &bad, &t.tv, &t.to, NULL, NULL), "mismatched heads", "k");
    /* dtype and device. */
    bad = t.tv;
    bad.dtype = UFA_DTYPE_F16;
    expect(INVALID, ufa_attention_forward(ctx, &t.tq, &t.tk, &bad, &t.to, NULL, NULL), "dtype mismatch",
           "v.dtype=f16");
    bad.dtype = 0;
    expect(INVALID, ufa_attention_forward(ctx, &t.tq, &t.tk, &bad, &t.to, NULL, NULL), "dtype 0", "v.dtype=0");
    bad = t.tv;
    bad.device_type = 5;
    expect(INVALID, ufa_attention_forward(ctx, &t.tq, &t.tk, &bad, &t.to, NULL, NULL), "device 5",
           "v.device_type=5");
    /* Parameters. */
    ufa_attention_params p = ufa_attention_params_default();
    p.struct_size = 12;
    expect(INVALID, ufa_attention_forward(ctx, &t.tq, &t.tk, &t.tv, &t.to, &p, NULL), "struct_size", "struct_size");
    p = ufa_attention_params_default();
    p.window_left = -5;
    expect(INVALID, ufa_attention_forward(ctx, &t.tq, &t.tk, &t.tv, &t.to, &p, NULL), "window", "window_left=-5");
    p = ufa_attention_params_default();
    p.causal_alignment = 3;
    expect(INVALID, ufa_attention_forward(ctx, &t.tq, &t.tk, &t.tv, &t.to, &p, NULL), "alignment",
           "causal_alignment=3");
    p = ufa_attention_params_default();
    p.fp32_precision = 7;
    expect(INVALID, ufa_attention_forward(ctx, &t.tq, &t.tk, &t.tv, &t.to, &p, NULL), "precision",
           "fp32_precision=7");
    p = ufa_attention_params_default();
    p.lse = &t.tq; /* wrong shape and aliases q */
    expect(INVALID, ufa_attention_forward(ctx, &t.tq, &t.tk, &t.tv, &t.to, &p, NULL), "bad lse", "lse");
    CHECK(!all_written(t.out, sizeof t.out, 4), "a failed call wrote the output");
    /* A caller built before fp32_precision was appended (64 bytes) gets the default. */
    p = ufa_attention_params_default();
    p.fp32_precision = 7;
    p.struct_size = 64;
    expect(UFA_STATUS_SUCCESS, ufa_attention_forward(ctx, &t.tq, &t.tk, &t.tv, &t.to, &p, NULL),
           "64-byte params", NULL);
    /* Dropout (the 96-byte layout): a rate outside [0, 1) is refused with nothing written; a
     * 72-byte caller (before the dropout fields) gets none, whatever follows its 72 bytes; one
     * (p, seed, offset) gives the same bits twice, another offset another mask. */
    memset(t.out, 0xff, sizeof t.out);
    p = ufa_attention_params_default();
    p.dropout_p = 1.0f;
    expect(INVALID, ufa_attention_forward(ctx, &t.tq, &t.tk, &t.tv, &t.to, &p, NULL), "dropout 1",
           "dropout p=1");
    CHECK(!all_written(t.out, sizeof t.out, 4), "a failed call wrote the output");
    p.struct_size = 72;
    expect(UFA_STATUS_SUCCESS, ufa_attention_forward(ctx, &t.tq, &t.tk, &t.tv, &t.to, &p, NULL),
           "72-byte params", NULL);
    float plain[64], first[64];
    memcpy(plain, t.out, sizeof plain);
    p = ufa_attention_params_default();
    p.dropout_p = 0.5f;
    p.dropout_seed = 7;
    p.dropout_offset = 1;
    expect(UFA_STATUS_SUCCESS, ufa_attention_forward(ctx, &t.tq, &t.tk, &t.tv, &t.to, &p, NULL),
           "dropout", NULL);
    memcpy(first, t.out, sizeof first);
    CHECK(memcmp(first, plain, sizeof first) != 0, "dropout changed nothing");
    expect(UFA_STATUS_SUCCESS, ufa_attention_forward(ctx, &t.tq, &t.tk, &t.tv, &t.to, &p, NULL),
           "dropout again", NULL);
    CHECK(memcmp(first, t.out, sizeof first) == 0, "the same seed gave another output");
    p.dropout_offset = 2;
    expect(UFA_STATUS_SUCCESS, ufa_attention_forward(ctx, &t.tq, &t.tk, &t.tv, &t.to, &p, NULL),
           "dropout offset 2", NULL);
    CHECK(memcmp(first, t.out, sizeof first) != 0, "another offset gave the same output");

    /* Options. */
    ufa_context_options o = ufa_context_options_default();
    o.cpu_isa = "bogus";
    expect(INVALID, ufa_context_create(&o, &c), "cpu_isa bogus", "bogus");
    o = ufa_context_options_default();
    o.struct_size = 3;
    expect(INVALID, ufa_context_create(&o, &c), "options struct_size", "struct_size");
    CHECK(c == NULL, "context written on failure");

    /* Device unavailable: a CUDA tensor where no CUDA device can be used (skipped where one can). */
    uint32_t gpus = 0;
    expect(UFA_STATUS_SUCCESS, ufa_device_count(ctx, UFA_DEVICE_CUDA, &gpus), "cuda count", NULL);
    if (gpus == 0) {
        ufa_tensor g[4] = {t.tq, t.tk, t.tv, t.to};
        for (int i = 0; i < 4; i++) g[i].device_type = UFA_DEVICE_CUDA;
        expect(UFA_STATUS_DEVICE_UNAVAILABLE, ufa_attention_forward(ctx, &g[0], &g[1], &g[2], &g[3], NULL, NULL),
               "cuda tensors", NULL);
        o = ufa_context_options_default();
        o.device_ordinal = 0;
        expect(UFA_STATUS_DEVICE_UNAVAILABLE, ufa_context_create(&o, &c), "device_ordinal 0", NULL);
    }
#ifdef UFA_TEST_HOOKS
    /* The rest of the codes (no machine here runs out of memory or has a failing driver on cue). */
    for (ufa_status s = UFA_STATUS_INVALID_ARGUMENT; s <= UFA_STATUS_INTERNAL; s++)
        expect(s, ufa_debug_fail_with(s), "debug_fail_with", NULL);
    expect(UFA_STATUS_INTERNAL, ufa_debug_trigger_panic(), "panic", "deliberate panic");
    expect(UFA_STATUS_SUCCESS, ufa_debug_fail_with(0), "debug_fail_with(0)", NULL);
#endif
    /* A valid call after all that still works. */
    expect(UFA_STATUS_SUCCESS, ufa_attention_forward(ctx, &t.tq, &t.tk, &t.tv, &t.to, NULL, NULL), "valid", NULL);
    CHECK(all_written(t.out, sizeof t.out, 4), "output written");
}

static void test_backward(void) {
    struct tiny t;
    tiny_init(&t);
    float lse[4], dout[64], dq[64], dk[64], dv[64];
    for (int i = 0; i < 64; i++) dout[i] = uniform();
    int64_t lse_shape[3] = {1, 1, 4};
    ufa_tensor tl = desc(lse, UFA_DTYPE_F32, 3, lse_shape, NULL), tdo = desc(dout, UFA_DTYPE_F32, 4, t.shape, NULL);
    ufa_tensor tdq = desc(dq, UFA_DTYPE_F32, 4, t.shape, NULL), tdk = desc(dk, UFA_DTYPE_F32, 4, t.shape, NULL);
    ufa_tensor tdv = desc(dv, UFA_DTYPE_F32, 4, t.shape, NULL);
    ufa_attention_params p = ufa_attention_params_default();
    p.lse = &tl;
    expect(UFA_STATUS_SUCCESS, ufa_attention_forward(ctx, &t.tq, &t.tk, &t.tv, &t.to, &p, NULL), "fwd", NULL);
    memset(dq, 0xff, sizeof dq); memset(dk, 0xff, sizeof dk); memset(dv, 0xff, sizeof dv);
    expect(UFA_STATUS_INVALID_ARGUMENT, ufa_attention_backward(ctx, &t.tq, &t.tk, &t.tv, &t.to, &tdo,
                                                                          &tl, &tdq, &tdk, &tdv, &p, NULL),
           "backward with params->lse", "params->lse");
    expect(UFA_STATUS_SUCCESS, ufa_attention_backward(ctx, &t.tq, &t.tk, &t.tv, &t.to, &tdo, &tl, &tdq, &tdk,
                                                      &tdv, NULL, NULL), "backward", NULL);
    CHECK(all_written(dq, sizeof dq, 4) && all_written(dk, sizeof dk, 4) && all_written(dv, sizeof dv, 4),
          "gradients written");
    /* Without masking every query sees every key and each row of P sums to 1, so the columns of dV = P^T dO sum to those of dO. */
    for (int e = 0; e < 16; e++) {
        double a = 0, b = 0;
        for (int j = 0; j < 4; j++) a += dv[j * 16 + e], b += dout[j * 16 + e];
        CHECK(fabs(a - b) < 1e-5, "sum of dV column %d: %g vs %g", e, a, b);
    }
}

/* nbytes, the allocation's size: exact or larger passes; a view reaching past it is refused
 * before anything is read or written (k's strides reach one element past its 64 floats). */
static void test_nbytes(void) {
    struct tiny t;
    tiny_init(&t);
    t.tq.nbytes = sizeof t.q;
    t.tk.nbytes = sizeof t.k + 100;
    t.to.nbytes = sizeof t.out;
    expect(UFA_STATUS_SUCCESS, ufa_attention_forward(ctx, &t.tq, &t.tk, &t.tv, &t.to, NULL, NULL), "exact nbytes", NULL);
    memset(t.out, 0xff, sizeof t.out);
    t.to.nbytes = sizeof t.out - 4;
    expect(UFA_STATUS_INVALID_ARGUMENT, ufa_attention_forward(ctx, &t.tq, &t.tk, &t.tv, &t.to, NULL, NULL), "out short",
           "out.shape=[1, 4, 1, 16] with strides [64, 16, 16, 1] reaches 256 bytes from out.data but out.nbytes=252");
    t.to.nbytes = 0;
    int64_t past[4] = {64, 17, 16, 1};
    t.tk.strides = past;
    t.tk.nbytes = sizeof t.k;
    expect(UFA_STATUS_INVALID_ARGUMENT, ufa_attention_forward(ctx, &t.tq, &t.tk, &t.tv, &t.to, NULL, NULL), "k strides",
           "k.nbytes=256");
    const unsigned char* o = (const unsigned char*)t.out;
    for (size_t i = 0; i < sizeof t.out; i++) CHECK(o[i] == 0xff, "out byte %zu written on an nbytes error", i);
}

/* Empty problems as PyTorch answers them: NULL data for tensors without elements; no keys gives
 * zero output and LSE -inf; no queries gives zero dK and dV. */
static void test_empty(void) {
    int64_t q0[4] = {0, 4, 2, 16}, kv0[4] = {0, 6, 1, 16};
    ufa_tensor tq = desc(NULL, UFA_DTYPE_F32, 4, q0, NULL), tk = desc(NULL, UFA_DTYPE_F32, 4, kv0, NULL);
    ufa_tensor tv = tk, to = tq;
    expect(UFA_STATUS_SUCCESS, ufa_attention_forward(ctx, &tq, &tk, &tv, &to, NULL, NULL), "batch 0, NULL data", NULL);
    int64_t qs[4] = {1, 3, 2, 16}, nokeys[4] = {1, 0, 1, 16}, lse_shape[3] = {1, 2, 3};
    float q[96], out[96], lse[6];
    for (int i = 0; i < 96; i++) q[i] = uniform(), out[i] = NAN;
    for (int i = 0; i < 6; i++) lse[i] = NAN;
    tq = desc(q, UFA_DTYPE_F32, 4, qs, NULL);
    tk = desc(NULL, UFA_DTYPE_F32, 4, nokeys, NULL);
    tv = tk;
    to = desc(out, UFA_DTYPE_F32, 4, qs, NULL);
    ufa_tensor tl = desc(lse, UFA_DTYPE_F32, 3, lse_shape, NULL);
    ufa_attention_params p = ufa_attention_params_default();
    p.lse = &tl;
    expect(UFA_STATUS_SUCCESS, ufa_attention_forward(ctx, &tq, &tk, &tv, &to, &p, NULL), "seqlen_kv 0", NULL);
    for (int i = 0; i < 96; i++) CHECK(out[i] == 0.0f, "seqlen_kv 0: out[%d]=%g, want 0", i, out[i]);
    for (int i = 0; i < 6; i++) CHECK(isinf(lse[i]) && lse[i] < 0, "seqlen_kv 0: lse[%d]=%g, want -inf", i, lse[i]);
    /* No queries: dK and dV are zero, and dQ, out, dout and the LSE are NULL. */
    int64_t noq[4] = {1, 0, 2, 16}, kvs[4] = {1, 5, 1, 16}, lse0[3] = {1, 2, 0};
    float k[80], dk[80], dv[80];
    for (int i = 0; i < 80; i++) k[i] = uniform(), dk[i] = dv[i] = NAN;
    ufa_tensor e = desc(NULL, UFA_DTYPE_F32, 4, noq, NULL), el = desc(NULL, UFA_DTYPE_F32, 3, lse0, NULL);
    ufa_tensor kk = desc(k, UFA_DTYPE_F32, 4, kvs, NULL), tdk = desc(dk, UFA_DTYPE_F32, 4, kvs, NULL);
    ufa_tensor tdv = desc(dv, UFA_DTYPE_F32, 4, kvs, NULL);
    expect(UFA_STATUS_SUCCESS, ufa_attention_backward(ctx, &e, &kk, &kk, &e, &e, &el, &e, &tdk, &tdv, NULL, NULL),
           "backward, seqlen_q 0", NULL);
    for (int i = 0; i < 80; i++) CHECK(dk[i] == 0.0f && dv[i] == 0.0f, "seqlen_q 0: dk/dv[%d]=%g/%g", i, dk[i], dv[i]);
    /* NULL data with elements is still an error. */
    tq.data = NULL;
    expect(UFA_STATUS_INVALID_ARGUMENT, ufa_attention_forward(ctx, &tq, &tk, &tv, &to, NULL, NULL), "NULL with elements",
           "q: data is NULL but shape [1, 3, 2, 16] has 96 elements");
}

static void test_queries_and_lifetimes(void) {
    CHECK(strcmp(ufa_status_string(UFA_STATUS_SUCCESS), "success") == 0, "status string");
    for (ufa_status s = -1; s <= 7; s++) CHECK(ufa_status_string(s) && *ufa_status_string(s), "string %d", s);
    uint32_t major = 99, minor = 99, patch = 99;
    ufa_version_numbers(&major, &minor, &patch);
    ufa_version_numbers(NULL, NULL, NULL);
    char v[64];
    snprintf(v, sizeof v, "%u.%u.%u", major, minor, patch);
    CHECK(strcmp(v, ufa_version()) == 0, "version %s vs %s", v, ufa_version());
    uint32_t n = 0;
    expect(UFA_STATUS_SUCCESS, ufa_device_count(ctx, UFA_DEVICE_CPU, &n), "cpu count", NULL);
    CHECK(n == 1, "one CPU device");
    const char* isa = NULL;
    expect(UFA_STATUS_SUCCESS, ufa_context_cpu_isa(ctx, &isa), "isa", NULL);
    CHECK(isa && *isa, "isa name");
    ufa_context_destroy(NULL);
    for (int i = 0; i < 20; i++) {
        ufa_context_options o = ufa_context_options_default();
        o.num_threads = (uint32_t)(i % 3 + 1);
        o.cpu_isa = i % 2 ? "portable" : NULL;
        ufa_context* c = NULL;
        expect(UFA_STATUS_SUCCESS, ufa_context_create(&o, &c), "create", NULL);
        uint32_t threads = 0;
        expect(UFA_STATUS_SUCCESS, ufa_context_num_threads(c, &threads), "threads", NULL);
        CHECK(threads == o.num_threads, "threads %u vs %u", threads, o.num_threads);
        ufa_context_destroy(c);
    }
}

int main(void) {
    seed_rng("test_ufa");
    ufa_context_options o = ufa_context_options_default();
    o.num_threads = 2;
    CHECK(ufa_context_create(&o, &ctx) == UFA_STATUS_SUCCESS, "%s", ufa_last_error_message());
    test_correctness();
    test_params();
    test_errors();
    test_backward();
    test_empty();
    test_nbytes();
    test_queries_and_lifetimes();
    ufa_context_destroy(ctx);
    return finish("test_ufa");
}
